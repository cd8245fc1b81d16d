"""Continuous batching: many requests decoded together in the rows of one decode state.

The shape is JetStream's: the device sees rows, never requests, so nothing recompiles when
requests come and go. `serving.slots.Slots` is the server's view of the one runner
(`engine.Engine`): rows of cache slots and the bucketed programs over them (prefill, insert,
extend, step). `Batcher` runs them in one thread: it admits queued requests into free rows between steps
(vision tower through the vision cache, prefill, insert), hands each row's tokens to its
request, and frees a row the moment its request ends: the runner says when a row is finished
(an EOS: "stop"; max_tokens: "length"); a cancel (a closed connection, a stop string) ends it
from the host.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import logging
import threading
from typing import Callable, Sequence

import jax
import numpy as np

from qwen2vl_jax.decode_state import FINISH_REASONS, mask_words
from qwen2vl_jax.errors import InputError
from qwen2vl_jax.inputs import bucket
from qwen2vl_jax.sampling import GenerationConfig
from qwen2vl_jax.serving.prefix_cache import PrefixCache, block_hashes, placeholder_spans
from qwen2vl_jax.serving.slots import (FEATURE_BUCKET_MIN, Slots, block_buckets, choice_settings, chunk_bucket,
                                       chunk_shape, seen_words, short_prompt_lengths)
from qwen2vl_jax.serving.vision_cache import VisionCache

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0  # an idle leader tells the followers it is alive this often


@dataclasses.dataclass
class VisionInput:
    """One image or video of a request: its patches and grid, and the vision cache key (None:
    do not cache)."""

    pixel_values: np.ndarray
    grid_thw: np.ndarray  # int[1, 3]
    key: str | None = None

    def content_key(self) -> str:
        """`key`, or without one a hash of the pixels and grid (what the prefix cache keys on)."""
        if self.key is not None:
            return self.key
        d = hashlib.sha256(np.ascontiguousarray(self.pixel_values).tobytes())
        d.update(np.asarray(self.grid_thw, np.int64).tobytes())
        return d.hexdigest()


@dataclasses.dataclass(frozen=True)
class Event:
    """What a request's `emit` receives: a token of choice `index`, or its end ("stop": an EOS,
    "length": max_tokens, "cancelled", "error" with a message; cancelled and error end every
    choice). With logprobs: the token's logprob and the most likely (id, logprob) pairs."""

    token: int | None = None
    finish: str | None = None
    message: str | None = None
    index: int = 0
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] | None = None


@dataclasses.dataclass(eq=False)
class Request:
    """One generation: the expanded prompt, its images (in placeholder order) then videos, and
    the settings. `emit` is called from the batcher's thread; `cancel` may be called from any."""

    input_ids: np.ndarray  # int[L]
    images: Sequence[VisionInput]
    videos: Sequence[VisionInput]
    config: GenerationConfig  # max_new_tokens, sampling, seed, eos_token_ids
    emit: Callable[[Event], None]
    ignore_eos: bool = False
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    choices: int = 1  # OpenAI's n: rows prefilled once that draw apart
    top_logprobs: int | None = None  # None: no logprobs; else how many of the most likely tokens
    grammar: object | None = None  # a compiled grammar (`grammar.Grammar`): each choice's tokens follow it
    stopped: set = dataclasses.field(default_factory=set)  # choices the reply has ended (stop strings)
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache (set before any event)

    def cancel(self) -> None:
        self.cancelled.set()

    def stop_choice(self, index: int) -> None:
        """Ends one choice from the host (any thread); the request is cancelled once all are."""
        self.stopped.add(index)
        if len(self.stopped) >= self.choices:
            self.cancel()

    @property
    def logprobs(self) -> bool:
        return self.top_logprobs is not None


@dataclasses.dataclass(eq=False)
class Row:
    """One choice of a request in a row of the decode state."""

    request: Request
    index: int
    matcher: object | None = None  # the choice's grammar state (`grammar.Matcher`)
    generated: int = 0
    done: bool = False
    ready: bool = True  # False while its prompt is still being written (`Fill`): steps pass it by


@dataclasses.dataclass(eq=False)
class Fill:
    """A request whose prompt is written into its row chunk by chunk (`Engine.extend`)."""

    row: Row
    slot: int
    ids: np.ndarray  # int32[n]: the prompt
    positions: np.ndarray  # int32[3, n]: its M-RoPE positions
    pos_offset: int  # slot j's position for decoding is j + pos_offset
    media: list  # VisionInput: images then videos
    spans: list  # prefix_cache.Span of each, in the same order
    hashes: list | None  # the prompt's block hashes (prefix caching on)
    start: int = 0  # the next slot to write
    features: dict = dataclasses.field(default_factory=dict)  # media index -> merged features [n, D]


class QueueFull(Exception):
    """The batcher's queue holds its maximum of waiting requests."""


# ---------------------------------------------------------------------------- the batcher
class Batcher:
    """Runs `Slots` in one thread over a bounded queue of `Request`s.

    `submit` queues a request (QueueFull when the queue is full); the thread admits waiting
    requests into free rows between steps (vision tower with the cache, prefill, insert), steps
    every active row, and frees a row the moment its request ends."""

    def __init__(self, slots: Slots, params, *, max_queue: int = 64, vision_cache: VisionCache | None = None,
                 prefill_chunk: int = 0, prefix_cache: PrefixCache | None = None):
        """prefill_chunk: prompts are written into their row at most this many tokens per
        iteration, between decode steps (0: a whole prompt at once). prefix_cache: prompt
        prefixes kept and reused (None: off). With either, a request of one choice is filled
        into its row by `Engine.extend`; otherwise (and for n > 1) it is prefilled whole and
        inserted."""
        self.slots, self.params = slots, params
        self.max_queue = max_queue
        self.vision_cache = vision_cache if vision_cache is not None else VisionCache()
        if prefill_chunk < 0:
            raise InputError(f"prefill_chunk must be 0 (off) or a number of tokens (got {prefill_chunk})")
        self.prefill_chunk = int(prefill_chunk)
        self.prefix_cache = prefix_cache
        self._pool: list = []  # the prefix cache's pool: its segments made so far (device arrays)
        self._fill: Fill | None = None
        self._queue: collections.deque[Request] = collections.deque()
        self._active: list[Row | None] = [None] * slots.max_batch
        self._cond = threading.Condition()
        self._closing = False
        self._state = None
        self._thread: threading.Thread | None = None
        self.steps = 0

    # ------------------------------------------------------------ public
    @property
    def max_context(self) -> int:
        """Cache slots per request: prompt plus generated tokens."""
        return self.slots.max_context

    @property
    def max_batch(self) -> int:
        return self.slots.max_batch

    @property
    def _words(self) -> int:
        """int32 words of a row's allowed-token bitmask."""
        return mask_words(self.slots.config.text.vocab_size)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active_slots(self) -> int:
        """Rows held by a request (decoding, or being filled)."""
        return sum(r is not None for r in self._active)

    def _fills(self, req: Request) -> bool:
        """The request is written into its row by `extend` (chunked prefill or prefix caching)."""
        return req.choices == 1 and (self.prefill_chunk > 0 or self.prefix_cache is not None)

    def start(self) -> "Batcher":
        """Starts the thread (once; later calls do nothing)."""
        if self._thread is not None:
            return self
        self._state = self.slots.init_state()
        self._thread = threading.Thread(target=self._run, name="qwen2vl-batcher", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self.slots.stop_leading()
        live = dict.fromkeys(r.request for r in self._active if r is not None)
        for req in list(self._queue) + list(live):
            req.emit(Event(finish="error", message="the server is shutting down"))
        self._queue.clear()
        self._active = [None] * len(self._active)

    def submit(self, request: Request) -> None:
        if not 1 <= request.choices <= self.slots.max_batch:
            raise InputError(f"n must be between 1 and the server's --max-batch of {self.slots.max_batch} "
                             f"(got {request.choices})")
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting already (the queue holds {self.max_queue})")
            self._queue.append(request)
            self._cond.notify_all()

    def warm_up(self, prompt_lengths: Sequence[int] | None = None, mask_words: int = 0) -> None:
        """Compiles the step and the prefill/insert of the given prompt lengths' buckets before
        the thread starts (call before `start`); by default every bucket up to 64 tokens, where
        most chat turns fall (longer prompts compile their bucket when one first comes).
        mask_words > 0: also their variants under a grammar's token mask (int32[rows, mask_words]),
        which structured output and forced tool calls run."""
        if prompt_lengths is None:
            prompt_lengths = short_prompt_lengths(self.slots.max_context)
        state = self.slots.init_state()
        generation = GenerationConfig(max_new_tokens=2)
        fills = self.prefill_chunk > 0 or self.prefix_cache is not None
        masks = [None] + ([lambda rows: np.full((rows, mask_words), -1, np.int32)] if mask_words > 0 else [])
        # insert (or extend) and step, each on a fresh state and on one a step returned: on a
        # mesh the two can differ in layout, and each compiles its own variant here rather than later.
        for _ in range(2):
            sizes = sorted({c for c in map(chunk_bucket, prompt_lengths) if c <= self.slots.max_context})
            for n, mask in itertools.product(sizes if fills else prompt_lengths, masks):
                allow = None if mask is None else mask(1)
                if fills:
                    state = self.slots.restore(state, self._pool, 0, (), 0)
                    ids = np.zeros((min(n, self.prefill_chunk or n),), np.int32)
                    state, out = self.slots.extend(self.params, state, self._chunk(ids, np.zeros((3, ids.size), np.int32),
                                                                                  0, 0, ids.size, True, 0),
                                                   None, choice_settings(generation, 1), self.slots.context_for(ids.size),
                                                   allow=allow)
                    continue
                inputs = self.slots.prompt_inputs(np.zeros((n,), np.int32), max_new_tokens=1)
                prefix, out = self.slots.start(self.params, inputs, None, generation, allow=allow)
                state = self.slots.insert(state, prefix, 0)
            if self.prefix_cache is not None:  # the pool's copies, each index bucket, on a segment made for them
                cache = self.prefix_cache
                pool = [self.slots.pool_segment(0, cache.segment, cache.block)]
                for size in block_buckets(cache.segment):
                    size = min(size, self.slots.max_context // cache.block)
                    pool = self.slots.save(state, pool, 0, 0, range(size))
                    state = self.slots.restore(state, pool, 0, range(size), 0)
            for rows in self.slots.row_buckets:  # every bucket, on a state each kind of step returned
                for context, mask in itertools.product(self.slots.context_buckets, masks):
                    state, out = self.slots.step(self.params, state, rows, context,
                                                 allow=None if mask is None else mask(rows))
        jax.block_until_ready(out)

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._queue and self.active_slots == 0:
                    if not self._cond.wait(HEARTBEAT_S) and self.slots.leader is not None:
                        self.slots.leader.ping()
                if self._closing:
                    return
            self._release_cancelled()
            self._admit()
            if self._fill is not None:
                self._fill_some()
            if any(r is not None and r.ready for r in self._active):
                self._step()

    def _release_cancelled(self) -> None:
        ended = set()
        for slot, row in enumerate(self._active):
            if row is None:
                continue
            req = row.request
            if row.index in req.stopped:  # the reply ended this choice (a stop string): nothing to say
                self._active[slot] = None
            elif req.cancelled.is_set():
                self._active[slot] = None
                if req not in ended:  # one event for the whole request
                    ended.add(req)
                    req.emit(Event(finish="cancelled"))
            if self._active[slot] is None and self._fill is not None and self._fill.row is row:
                self._fill = None

    def _admit(self) -> None:
        while True:
            with self._cond:
                free = [i for i, row in enumerate(self._active) if row is None]
                if not self._queue:
                    return
                fills = self._fills(self._queue[0])
                if (self._fill is not None or not free) if fills else len(free) < self._queue[0].choices:
                    return
                req = self._queue.popleft()
            if req.cancelled.is_set():
                req.emit(Event(finish="cancelled"))
                continue
            if fills:
                self._begin_fill(req, free[0])
                continue
            rows = [Row(req, i, None if req.grammar is None else req.grammar.matcher()) for i in range(req.choices)]
            try:
                prefix, out = self._prefill(req, rows)
                for row, slot in zip(rows, free):
                    self._state = self.slots.insert(self._state, prefix, slot, None if req.choices == 1 else row.index)
                out = [np.asarray(x) for x in jax.device_get(out)]
            except InputError as e:
                req.emit(Event(finish="error", message=str(e)))
                continue
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the others
                log.exception("prefill failed")
                req.emit(Event(finish="error", message=f"prefill failed: {type(e).__name__}: {e}"))
                continue
            for i, (row, slot) in enumerate(zip(rows, free)):
                self._active[slot] = row
                self._deliver(slot, row, out, i)

    # ------------------------------------------------------------ filling a row by chunks
    def _begin_fill(self, req: Request, slot: int) -> None:
        """Takes row `slot` for the request: its prompt's positions, the longest cached prefix
        restored into the row (else the row only parked); `_fill_some` writes the rest."""
        row = Row(req, 0, None if req.grammar is None else req.grammar.matcher(), ready=False)
        try:
            ids = np.asarray(req.input_ids, np.int32).reshape(-1)
            inputs = self.slots.prompt_inputs(ids, _grids(req.images), _grids(req.videos),
                                              max_new_tokens=req.config.max_new_tokens)
            n, lb = ids.size, inputs.shape[1]
            media = [*req.images, *req.videos]
            cfg = self.slots.config
            merge = cfg.vision.merge_unit
            spans = []
            for items, token in ((req.images, cfg.image_token_id), (req.videos, cfg.video_token_id)):
                counts = [int(np.prod(v.grid_thw)) // merge for v in items]
                keys = [v.content_key() for v in items] if self.prefix_cache is not None else [""] * len(items)
                spans += placeholder_spans(ids, token, counts, keys)
            fill = Fill(row, slot, ids, inputs.positions[:, 0, lb - n:], int(inputs.pos_offset[0]) + lb - n,
                        media, spans, None)
            run = []
            if self.prefix_cache is not None:
                fill.hashes = block_hashes(ids, spans, self.prefix_cache.block)
                run = self.prefix_cache.lookup(fill.hashes)
                fill.start = min(len(run) * self.prefix_cache.block, n - 1)
                self.prefix_cache.record(fill.start)
            req.cached_tokens = fill.start
            self._state = self.slots.restore(self._state, self._pool, slot, run, fill.start)
        except InputError as e:
            req.emit(Event(finish="error", message=str(e)))
            return
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the others
            log.exception("prefill failed")
            req.emit(Event(finish="error", message=f"prefill failed: {type(e).__name__}: {e}"))
            return
        self._active[slot] = row
        self._fill = fill

    def _chunk(self, ids, positions, row: int, start: int, length: int, last: bool, pos_offset: int, seen=None,
               size: int | None = None) -> dict:
        """`Engine.extend`'s chunk: `length` tokens and positions padded to `size` (default
        their `chunk_bucket`)."""
        size = size or chunk_bucket(length)
        pad = size - length
        return {"input_ids": np.pad(np.asarray(ids, np.int32), (0, pad))[None],
                "positions": np.pad(np.asarray(positions, np.int32), ((0, 0), (0, pad)))[:, None],
                "row": np.int32(row), "start": np.int32(start), "length": np.int32(length), "last": np.bool_(last),
                "pos_offset": np.full((1,), pos_offset, np.int32),
                "seen": np.zeros((1, self._words), np.int32) if seen is None else seen}

    def _fill_some(self) -> None:
        """One piece of the filling request's work: the vision tower of one image or video its
        next chunk needs (chunked prefill: one per iteration), or that chunk; the last chunk
        starts the row and hands over its first token."""
        fill = self._fill
        row, req = fill.row, fill.row.request
        n, s = fill.ids.size, self.slots.max_context
        try:
            size, m = chunk_shape(fill.start, min(n - fill.start, self.prefill_chunk or n), s)
            end = fill.start + m
            need = [i for i, sp in enumerate(fill.spans) if sp.start < end and sp.end > fill.start
                    and i not in fill.features]
            for i in need:
                fill.features[i] = self._features(fill.media[i])
                if self.prefill_chunk:  # one tower call per iteration: the decoding rows step between
                    return
            last = end == n
            chunk = self._chunk(fill.ids[fill.start:end], fill.positions[:, fill.start:end], fill.slot, fill.start, m,
                                last, fill.pos_offset, seen_words(fill.ids, self.slots.config.text.vocab_size) if last
                                else None, size)
            generation = dataclasses.replace(req.config, eos_token_ids=()) if req.ignore_eos else req.config
            self._state, out = self.slots.extend(
                self.params, self._state, chunk, self._chunk_features(fill, end), choice_settings(generation, 1),
                self.slots.context_for(end), logprobs=req.logprobs and last, allow=self._allow([row]) if last else None)
            fill.start = end
            if not last:
                return
            out = [np.asarray(x) for x in jax.device_get(out)]
            self._fill = None
            if self.prefix_cache is not None:
                self._keep_prefix(fill)
        except InputError as e:
            self._active[fill.slot], self._fill = None, None
            req.emit(Event(finish="error", message=str(e)))
            return
        except Exception as e:  # noqa: BLE001 - the state was donated: fail the rows in flight, keep serving
            log.exception("prefill failed")
            self._fail_all(f"prefill failed: {type(e).__name__}: {e}")
            return
        row.ready = True
        self._deliver(fill.slot, row, out, 0)

    def _chunk_features(self, fill: Fill, end: int) -> np.ndarray | None:
        """The merged features of the placeholders in slots [fill.start, end): images' then
        videos' (as `merge_vision` takes them), padded to a bucket; None when there are none."""
        parts = [fill.features[i][max(sp.start, fill.start) - sp.start:min(sp.end, end) - sp.start]
                 for i, sp in enumerate(fill.spans) if sp.start < end and sp.end > fill.start]
        if not parts:
            return None
        features = np.concatenate(parts)
        f = bucket(features.shape[0], FEATURE_BUCKET_MIN)
        return np.concatenate([features, np.zeros((f - features.shape[0], features.shape[1]), features.dtype)])

    def _keep_prefix(self, fill: Fill) -> None:
        """Copies the full blocks of the prompt just written that the pool does not hold yet into
        it (making a segment of it first when the cache asks for one)."""
        cache = self.prefix_cache
        first, slots = cache.store(fill.hashes[:fill.ids.size // cache.block])
        if not slots:
            return
        while len(self._pool) * cache.segment < cache.allocated:
            self._pool.append(self.slots.pool_segment(len(self._pool), cache.segment, cache.block))
        self._pool = self.slots.save(self._state, self._pool, fill.slot, first, slots)

    def _fail_all(self, message: str) -> None:
        """Ends every request in a row with an error and starts from a fresh state (after a device
        call failed on the donated state)."""
        failed = dict.fromkeys(r.request for r in self._active if r is not None)
        self._active = [None] * len(self._active)
        self._fill = None
        for req in failed:
            req.emit(Event(finish="error", message=message))
        self._state = self.slots.init_state()
        if self.prefix_cache is not None:  # a pool segment may have been donated to the failed call
            self.prefix_cache.clear()
            self._pool = []

    def _prefill(self, req: Request, rows: list[Row]):
        inputs = self.slots.prompt_inputs(req.input_ids, _grids(req.images), _grids(req.videos),
                                          max_new_tokens=req.config.max_new_tokens)
        parts = [self._features(v) for v in (*req.images, *req.videos)]
        features = np.concatenate(parts) if parts else None
        return self.slots.start(self.params, inputs, features, req.config, req.ignore_eos, choices=req.choices,
                                logprobs=req.logprobs, allow=self._allow(rows))

    def _allow(self, rows: Sequence[Row | None]) -> np.ndarray | None:
        """The rows' allowed-token bitmasks (every bit set for a row without a grammar), or
        None when no row has one (the step compiled without a mask)."""
        masked = [(row.matcher, i) for i, row in enumerate(rows) if row is not None and row.matcher is not None]
        if not masked:
            return None
        from qwen2vl_jax.serving.grammar import fill_rows

        allow = np.full((len(rows), self._words), -1, np.int32)
        fill_rows(masked, allow)
        return allow

    def _features(self, item: VisionInput) -> np.ndarray:
        hit = None if item.key is None else self.vision_cache.get(item.key)
        if hit is not None:
            return hit[1]
        features = self.slots.encode(self.params, item.pixel_values, item.grid_thw)
        if item.key is not None:
            self.vision_cache.put(item.key, item.grid_thw, features)
        return features

    def _step(self) -> None:
        try:
            ready = [r if r is not None and r.ready else None for r in self._active]
            live = max(i for i, r in enumerate(ready) if r is not None) + 1
            rows = self.slots.rows_for(live)
            # a row writes its last token at slot prompt + generated - 1 and attends up to it
            context = max(np.size(r.request.input_ids) + r.generated for r in ready if r is not None)
            logprobs = any(r is not None and r.request.logprobs for r in ready)
            allow = self._allow(ready[:rows] + [None] * (rows - len(ready[:rows])))
            self._state, out = self.slots.step(self.params, self._state, rows, context, logprobs=logprobs,
                                               allow=allow)
            out = [np.asarray(x) for x in jax.device_get(out)]
        except Exception as e:  # noqa: BLE001 - fail the rows in flight, keep serving
            log.exception("decode step failed")
            self._fail_all(f"decode failed: {type(e).__name__}: {e}")
            return
        self.steps += 1
        for slot, row in enumerate(self._active):
            if row is not None and row.ready:
                self._deliver(slot, row, out, slot)

    def _deliver(self, slot: int, row: Row, out: list[np.ndarray], i: int) -> None:
        """Hands row i of a readout (token, finish[, logprob, top ids, top logprobs]) to the
        choice in `slot`; the runner's finish code says whether it was the last (FINISH_REASONS
        names it)."""
        req = row.request
        if req.cancelled.is_set() or row.index in req.stopped:
            self._release_cancelled()
            return
        token, reason = int(out[0][i]), FINISH_REASONS.get(int(out[1][i]))
        row.generated += 1
        if row.matcher is not None and reason is None:
            row.matcher.accept(token)
        logprob = top = None
        if req.logprobs:
            logprob = float(out[2][i])
            top = tuple((int(t), float(lp)) for t, lp in zip(out[3][i][:req.top_logprobs], out[4][i][:req.top_logprobs]))
        if reason is not None:
            self._active[slot] = None
        req.emit(Event(token=token, finish=reason, index=row.index, logprob=logprob, top=top))


def _grids(items: Sequence[VisionInput]) -> np.ndarray | None:
    if not items:
        return None
    return np.concatenate([np.asarray(v.grid_thw).reshape(-1, 3) for v in items])

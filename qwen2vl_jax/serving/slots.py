"""The server's view of the one runner (`engine.Engine`): max_batch rows of max_context cache
slots and the buckets its programs are compiled for.
  prefill  one request's prompt (bucketed as `inputs.build_inputs` buckets it, from 16 tokens,
           the vision features merged in) into a prefix of its bucket's length, its first token
           drawn (compiled per (prompt bucket, feature bucket));
  insert   that prefix into a free row, its prompt moved to slots [0, n) (per prompt bucket);
  extend   a chunk of one row's prompt written into the row in place (per chunk bucket), the
           last chunk drawing its first token (chunked prefill and the prefix cache);
  step     one token for the first k rows, k the smallest row bucket (1, 2, 4, ..., max_batch)
           holding every live row, attending over the first c cache slots, c the smallest
           context bucket holding every live row's tokens (all compiled at warm-up); each row
           has its own slot, sampling settings and random key;
  pool / save / restore  the prefix cache's pool, made a segment at a time, and blocks of a row
           copied into it or out of it, each call within one segment and its index lists
           padded to a `block_bucket` (compiled per bucket, at warm-up when the cache is on).
The device calls go through `Slots.runner`: the engine, or a `lockstep.Leader` on process 0 of
a multi-process run. `serving.scheduler.Batcher` drives them between requests.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from qwen2vl_jax.decode_state import DecodeState, KVCache, RowSettings, mask_words
from qwen2vl_jax.engine import Engine
from qwen2vl_jax.errors import InputError
from qwen2vl_jax.inputs import ModelInputs, bucket, build_inputs, pack_vision
from qwen2vl_jax.sampling import GenerationConfig
from qwen2vl_jax.serving.lockstep import Leader, Lockstep, to_host

FEATURE_BUCKET_MIN = 16  # the smallest bucket of merged vision features a prompt carries
CONTEXT_BUCKET_MIN = 256  # the fewest cache slots a decode step attends over
# The smallest prompt bucket a request is prefilled in (inputs.bucket's ladder from here: 16,
# 20, 24, 28, 32, 40, ...): a short chat turn pays for its own length, not for 64 tokens.
PREFILL_BUCKET_MIN = 16


def short_prompt_lengths(max_context: int, up_to: int = 64) -> list[int]:
    """One prompt length per prefill bucket of prompts of 1 .. up_to tokens (buckets 16, 20, ...,
    64) that leaves room for a new token in `max_context`: what warm-up compiles."""
    longest = min(up_to, max_context - 1)
    return sorted({bucket(n, PREFILL_BUCKET_MIN): n for n in range(longest, 0, -1)}.values())


# ---------------------------------------------------------------------------- the rows
class Slots:
    """max_batch rows of max_context cache slots over the engine's prefill / insert / step.

    The device calls go through `runner`: the engine itself, or in a multi-process run's
    process 0 a `lockstep.Leader` that first sends each call to the other processes (`lead`)."""

    def __init__(self, engine: Engine, *, max_batch: int = 16, max_context: int | None = None):
        self.engine = self.runner = engine
        self.leader: Leader | None = None
        self.config = engine.config
        context = self.config.text.max_position_embeddings
        self.max_batch = int(max_batch)
        self.max_context = int(max_context or min(context, 4096))
        if self.max_batch < 1:
            raise InputError(f"max_batch must be at least 1 (got {max_batch})")
        if not 2 <= self.max_context <= context:
            raise InputError(f"max_context must be between 2 and the model's context of {context} "
                             f"(got {max_context})")
        # decode runs on the first k rows: k one of these (powers of two, and max_batch)
        self.row_buckets = tuple(sorted({min(1 << i, self.max_batch) for i in range(self.max_batch.bit_length() + 1)}))
        # and attends over the first c cache slots: c one of these (CONTEXT_BUCKET_MIN times
        # powers of four, and max_context), the fewest that hold every live row's tokens. Each
        # bucket is compiled at warm-up for every row bucket, so they are spaced x4, not x2:
        # warm-up time grows with their number faster than the steps speed up.
        self.context_buckets = tuple(sorted({min(CONTEXT_BUCKET_MIN << 2 * i, self.max_context)
                                             for i in range(max(1, self.max_context.bit_length()))}))

    def lead(self, lockstep: Lockstep | None = None) -> None:
        """From now on every device call is first sent to the other processes (process 0)."""
        self.runner = self.leader = Leader(self.engine, lockstep)

    def stop_leading(self) -> None:
        """Tells the other processes to stop following (once); calls stay on this process."""
        if self.leader is not None:
            self.leader.stop()
            self.runner, self.leader = self.engine, None

    # ------------------------------------------------------------ host side
    def init_state(self) -> DecodeState:
        return self.runner.empty(self.max_batch, self.max_context)

    def check_room(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """InputError unless the prompt and max_new_tokens fit in one row of the cache."""
        if max_new_tokens < 1:
            raise InputError(f"max_tokens must be at least 1 (got {max_new_tokens})")
        if prompt_tokens + max_new_tokens > self.max_context:
            raise InputError(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_new_tokens}) is over the "
                             f"context of {self.max_context} tokens")

    def prompt_inputs(self, input_ids, image_grid_thw=None, video_grid_thw=None, *, max_new_tokens: int = 0) -> ModelInputs:
        """One prompt (int[L], placeholders expanded) and its grids -> its bucketed
        `ModelInputs`, checked as every entry point checks them; no pixels: the features come
        from the vision tower or the cache."""
        ids = np.asarray(input_ids).reshape(1, -1)
        self.check_room(ids.shape[1], max_new_tokens)
        return build_inputs(self.config, ids, None, None, image_grid_thw, None, video_grid_thw, max_new_tokens=max_new_tokens,
                            bucket_min=PREFILL_BUCKET_MIN, pixels=False)

    def encode(self, params, pixel_values, grid_thw) -> np.ndarray:
        """The vision tower over one image (or video): merged features [n, D] on the host."""
        vision = pack_vision(self.config, pixel_values, grid_thw)
        n = int(np.prod(np.asarray(grid_thw).reshape(-1, 3), axis=1).sum()) // self.config.vision.merge_unit
        return to_host(self.runner.encode(params, vision))[:n]

    def prefill(self, params, inputs: ModelInputs, features: np.ndarray | None, generation: GenerationConfig,
                ignore_eos: bool = False) -> DecodeState:
        """inputs: one row (`prompt_inputs`); features [F, D]: every image's, then every video's,
        in placeholder order (padded here to a bucket) -> the prefix (one row). ignore_eos: the
        row ends at max_new_tokens only."""
        return self.start(params, inputs, features, generation, ignore_eos)[0]

    def start(self, params, inputs: ModelInputs, features: np.ndarray | None, generation: GenerationConfig,
              ignore_eos: bool = False, *, choices: int = 1, logprobs: bool = False, allow=None):
        """`prefill` with its readout -> (the prefix: `choices` rows that draw apart, the readout
        as `Engine.prefill` gives it). allow: the rows' allowed-token bitmasks int32[choices, W]
        or None."""
        if features is not None:
            f = bucket(features.shape[0], FEATURE_BUCKET_MIN)
            features = np.concatenate([features, np.zeros((f - features.shape[0], features.shape[1]),
                                                          features.dtype)])
        batch = {"input_ids": inputs.input_ids, "positions": inputs.positions, "mask": inputs.attention_mask,
                 "pos_offset": inputs.pos_offset}
        settings = choice_settings(dataclasses.replace(generation, eos_token_ids=()) if ignore_eos else generation,
                                   choices)
        return self.runner.prefill(params, batch, features, settings, inputs.shape[1], logprobs=logprobs, allow=allow)

    def insert(self, state: DecodeState, prefix: DecodeState, slot: int, source: int | None = None) -> DecodeState:
        """The state (donated) with row `slot` holding the prefilled request (with `source`: its
        choice `source`)."""
        return self.runner.insert(state, prefix, slot, source=source)

    def extend(self, params, state: DecodeState, chunk: dict, features, settings: RowSettings, context: int, *,
               logprobs: bool = False, allow=None):
        """One chunk of one row's prompt into the state (donated; `Engine.extend`) -> (the state,
        the row's readout)."""
        return self.runner.extend(params, state, chunk, features, settings, context, None, logprobs=logprobs,
                                  allow=allow)

    def block_nbytes(self, block: int) -> int:
        """Device bytes of `block` cache slots of one row, every layer's keys and values."""
        engine = self.engine
        return KVCache.abstract(self.config.text, 1, block, engine.module.dtype, engine.module.scan_layers).nbytes

    def pool_segment(self, index: int, blocks: int, block: int) -> KVCache:
        """Segment `index` of the prefix cache's pool: `blocks` zeroed blocks of `block` slots."""
        if self.leader is not None:
            return self.leader.pool(blocks, block, index)
        return self.engine.pool(blocks, block)

    def save(self, state: DecodeState, pool: list, row: int, first: int, slots: Sequence[int]) -> list:
        """The pool (a list of segments, each donated when written) with row `row`'s blocks
        first, first + 1, ... copied into its slots `slots` (numbered across the segments)."""
        for index, blocks, at in _by_segment(pool, range(first, first + len(slots)), slots):
            if self.leader is not None:
                pool[index] = self.leader.save(state, pool[index], row, blocks, at, index)
            else:
                pool[index] = self.engine.save(state, pool[index], row, blocks, at)
        return pool

    def restore(self, state: DecodeState, pool: list, row: int, slots: Sequence[int], length: int) -> DecodeState:
        """The state (donated) with the pool's slots `slots` (a cached prefix's blocks, in order)
        in row `row`'s first blocks and its first `length` slots valid (no slots: the row is only
        parked for the `extend` calls that fill it)."""
        parts = _by_segment(pool, range(len(slots)), slots) if len(slots) else [(None, None, None)]
        for index, blocks, at in parts:
            segment = None if index is None else pool[index]
            if self.leader is not None:
                state = self.leader.restore(state, segment, row, length, blocks, at, index)
            else:
                state = self.engine.restore(state, segment, row, length, blocks, at)
        return state

    def rows_for(self, live: int) -> int:
        """The row bucket that covers slots [0, live)."""
        return next(b for b in self.row_buckets if b >= live)

    def context_for(self, tokens: int) -> int:
        """The context bucket that holds `tokens` cache slots (max_context at most)."""
        return next((c for c in self.context_buckets if c >= tokens), self.max_context)

    def step(self, params, state: DecodeState, rows: int | None = None, context: int | None = None, *,
             logprobs: bool = False, allow=None):
        """One token for each of the first `rows` rows (a row bucket; default every row) ->
        (the next state, their readout: token int32[rows], finish int32[rows], and with
        logprobs each token's logprob and the most likely (ids, logprobs)); the state passed in
        is donated. context: the most cache slots a live row will hold after this step (prompt +
        tokens fed so far; default max_context): attention reads only its bucket's slots.
        allow: None, or the allowed-token bitmasks of the bucket's rows int32[bucket, W]."""
        rows = self.max_batch if rows is None else self.rows_for(rows)
        context = self.max_context if context is None else self.context_for(context)
        return self.runner.step(params, state, None, rows, context, logprobs=logprobs, allow=allow)


def block_bucket(n: int, segment: int) -> int:
    """The length an index list of n blocks within a pool segment of `segment` blocks is padded
    to: 1, 4, 16, 64, ... (x4: few programs; the padding copies nothing), `segment` at most."""
    size = 1
    while size < n:
        size *= 4
    return min(size, segment)


def block_buckets(segment: int) -> list[int]:
    """Every `block_bucket` of a segment of `segment` blocks (what warm-up compiles)."""
    return sorted({block_bucket(n, segment) for n in range(1, segment + 1)})


def _by_segment(pool: list, blocks: Sequence[int], slots: Sequence[int]) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Row blocks and the pool slots (numbered across the segments) they go to or come from ->
    per segment touched: (its index, the row blocks, the slots within it), each padded to a
    `block_bucket` (a padding slot is the segment's size: past its end)."""
    size = pool[0].k[0].shape[pool[0].batch_axis]  # blocks per segment
    out = []
    for index in sorted({s // size for s in slots}):
        mine = [(b, s % size) for b, s in zip(blocks, slots) if s // size == index]
        pad = block_bucket(len(mine), size) - len(mine)
        out.append((index, np.asarray([b for b, _ in mine] + [0] * pad, np.int32),
                    np.asarray([s for _, s in mine] + [size] * pad, np.int32)))
    return out


def choice_settings(generation: GenerationConfig, choices: int) -> RowSettings:
    """The rows of one request's `choices` (OpenAI's n): the same settings, and keys that draw
    apart: choice 0 draws as a lone request with that seed would, choice i from the seed's key
    folded with i."""
    settings = RowSettings.of([generation] * choices)
    if choices > 1:
        key = jax.random.PRNGKey(generation.seed)
        settings = settings.replace(rng=np.stack([np.asarray(key)] + [
            np.asarray(jax.random.fold_in(key, i)) for i in range(1, choices)]))
    return settings


# ---------------------------------------------------------------------------- chunks
def chunk_bucket(tokens: int) -> int:
    """The chunk sizes `extend` is compiled for: 16, 24, 32, 48, 64, 96, ... (two per octave:
    at most a third of a chunk is padding, and three sizes cover the prompts up to 64 tokens
    that warm-up compiles)."""
    rung = PREFILL_BUCKET_MIN
    while True:
        for size in (rung, rung * 3 // 2):
            if size >= tokens:
                return size
        rung *= 2


def chunk_shape(start: int, tokens: int, slots: int) -> tuple[int, int]:
    """The chunk that writes up to `tokens` prompt tokens from slot `start` of a row of `slots`
    -> (its size C, the real tokens m in it): C a `chunk_bucket`, and start + C within the row
    (else the largest power of two that fits, holding fewer tokens)."""
    c = chunk_bucket(tokens)
    if start + c <= slots:
        return c, tokens
    c = 1 << (slots - start).bit_length() - 1  # the largest power of two that fits
    return c, min(tokens, c)


def seen_words(ids: np.ndarray, vocab: int) -> np.ndarray:
    """The prompt's tokens as a bitmask int32[1, W] (`decode_state.unpack_mask`'s layout)."""
    words = np.zeros((1, mask_words(vocab)), np.uint32)
    ids = np.unique(np.asarray(ids, np.int64))
    np.bitwise_or.at(words[0], ids >> 5, (np.uint32(1) << (ids & 31).astype(np.uint32)))
    return words.view(np.int32)

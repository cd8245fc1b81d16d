"""Continuous batching: many requests decoded together in a fixed number of slots of one KV cache.

The shape is JetStream's: the device sees slots, never requests, so nothing recompiles when
requests come and go.
  `SlotEngine.prefill`  one request's prompt (bucketed as `inputs.build_inputs` buckets it, the
                        vision features merged in) into a cache of its own bucket's length, and
                        its first token drawn (jitted per (prompt bucket, feature bucket));
  `SlotEngine.insert`   that prefix moved into a free row of the shared cache, with its
                        positions, its first token and its sampling settings (jitted per prompt
                        bucket); the row's real tokens land in slots [0, n);
  `SlotEngine.step`     one token for every row at once; each row writes at its own slot
                        (`pos`), with its own temperature, top-k, top-p, repetition penalty and
                        random key, all data. It runs on the first k rows only, k the smallest
                        row bucket (1, 2, 4, ..., max_batch) holding every live row, so a lone
                        request is not decoded at the cost of a full batch (jitted once per
                        bucket, all of them at warm-up); requests take the lowest free slot.
`Batcher` runs them in one thread: it admits queued requests into free slots between steps,
hands each row's tokens to its request, and frees a slot as soon as its request ends (an EOS,
max_tokens, a cancel). Host-side stop conditions (stop strings) end a request by cancelling it.

In a multi-process run (one process per host), process 0 runs the Batcher and every other
process replays its device calls in the same order (`Lockstep`, `SlotEngine.follow`), so each
jitted call runs over the whole mesh as one program.

`VisionCache` keeps the vision tower's output per image (keyed by the caller's hash of the image
bytes and its resize settings), so a repeated image skips the tower.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import threading
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax import distributed
from qwen2vl_jax.engine import Engine, KVCache
from qwen2vl_jax.errors import InputError
from qwen2vl_jax.inputs import ModelInputs, bucket, build_inputs, pack_vision
from qwen2vl_jax.modules.qwen2vl import Qwen2VLModule
from qwen2vl_jax.sampling import GenerationConfig, Sampling, sample_token
from qwen2vl_jax.sharding import shard, use_mesh

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0  # an idle process 0 tells the followers it is alive this often
FEATURE_BUCKET_MIN = 16  # the smallest bucket of merged vision features a prompt carries
CONTEXT_BUCKET_MIN = 256  # the fewest cache slots a decode step attends over
# The smallest prompt bucket a request is prefilled in (inputs.bucket's ladder from here: 16,
# 20, 24, 28, 32, 40, ...): a short chat turn pays for its own length, not for 64 tokens.
PREFILL_BUCKET_MIN = 16


# ---------------------------------------------------------------------------- device state
@flax.struct.dataclass
class SlotState:
    """The decode batch: B slots (rows), S cache slots per row."""

    cache: KVCache  # [B, S, K, hd] per layer (stacked: [n, B, S, K, hd])
    kv_valid: jax.Array  # bool[B, S]: which cache slots of a row hold a real token
    pos: jax.Array  # int32[B]: the cache slot the row's next fed token is written to
    pos_offset: jax.Array  # int32[B]: the M-RoPE position of cache slot j is j + pos_offset
    token: jax.Array  # int32[B]: the last token drawn, fed to the next step
    seen: jax.Array  # bool[B, V]: tokens of the prompt or drawn so far (repetition penalty)
    greedy: jax.Array  # bool[B]: argmax for this row (else sample with its settings)
    rng: jax.Array  # uint32[B, 2]: each row's key, split every step
    sampling: Sampling  # every field with a leading [B]

    def rows(self, fn, *others: "SlotState") -> "SlotState":
        """fn(array, its batch axis, *the same field of `others`) on every field: the batch axis
        is 0 everywhere but in a scanned decoder's stacked cache."""
        cache = jax.tree.map(lambda a, *o: fn(a, self.cache.batch_axis, *o), self.cache, *(x.cache for x in others))
        rest = jax.tree.map(lambda a, *o: fn(a, 0, *o), self.replace(cache=None), *(x.replace(cache=None) for x in others))
        return rest.replace(cache=cache)

    def constrain(self) -> "SlotState":
        return self.replace(cache=self.cache.constrain(), kv_valid=shard(self.kv_valid, "batch", None),
                            seen=shard(self.seen, "batch", None), token=shard(self.token, None))


@flax.struct.dataclass
class Prefix:
    """One prefilled request, ready for `SlotEngine.insert`."""

    cache: KVCache  # [1, Lb, K, hd] per layer: the prompt right-aligned in its bucket
    length: jax.Array  # int32[]: real prompt tokens n
    pos_offset: jax.Array  # int32[]: the position of the slot after the prompt, minus n
    token: jax.Array  # int32[]: the first token
    seen: jax.Array  # bool[V]
    rng: jax.Array  # uint32[2]: the key after the first draw


def short_prompt_lengths(max_context: int, up_to: int = 64) -> list[int]:
    """One prompt length per prefill bucket of prompts of 1 .. up_to tokens (buckets 16, 20, ...,
    64) that leaves room for a new token in `max_context`: what warm-up compiles."""
    longest = min(up_to, max_context - 1)
    return sorted({bucket(n, PREFILL_BUCKET_MIN): n for n in range(longest, 0, -1)}.values())


def sample_rows(logits, seen, sampling: Sampling, keys, greedy):
    """logits f32[B, V], seen bool[B, V], sampling with [B] fields, keys [B, 2], greedy bool[B]
    -> int32[B]. Each row draws as `sample_token` draws for a batch of one; when every row is
    greedy the sort that sampling needs is skipped."""

    def rows(greedy_static: bool):
        def one(lg, sn, sm, key):
            return sample_token(lg[None], sn[None], sm, key, greedy_static)[0]
        return jax.vmap(one)(logits, seen, sampling, keys)

    def mixed():
        return jnp.where(greedy, rows(True), rows(False))

    return jax.lax.cond(jnp.all(greedy), lambda: rows(True), mixed)


def _split_rows(rng):
    both = jax.vmap(jax.random.split)(rng)  # [B, 2, 2]
    return both[:, 0], both[:, 1]


# ---------------------------------------------------------------------------- multi-process
class Lockstep:
    """Process 0's SlotEngine calls, sent to the other processes of a multi-process run.

    Every device call of the batcher is first sent (a name, a few numbers as JSON, the numpy
    arguments as .npz) through an all-gather of bytes; the followers (`SlotEngine.follow`)
    receive it and make the same jitted call with the same arguments."""

    def send(self, op: str, arrays: dict | None = None, **meta) -> None:
        header = json.dumps({"op": op, **meta}).encode()
        blob = len(header).to_bytes(4, "little") + header + distributed.pack_arrays(arrays or {})
        distributed.allgather_bytes(blob)

    def receive(self) -> tuple[str, dict, dict]:
        blob = distributed.allgather_bytes(b"")[0]
        n = int.from_bytes(blob[:4], "little")
        meta = json.loads(blob[4:4 + n])
        return meta.pop("op"), meta, distributed.unpack_arrays(blob[4 + n:])


def _flat(prefix: str, tree) -> dict:
    return {f"{prefix}{i}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(tree))}


def _unflat(prefix: str, arrays: dict, like):
    leaves, treedef = jax.tree_util.tree_flatten(like)
    return jax.tree_util.tree_unflatten(treedef, [arrays[f"{prefix}{i}"] for i in range(len(leaves))])


# ---------------------------------------------------------------------------- the engine
class SlotEngine:
    """prefill / insert / step over `max_batch` slots of `max_context` cache slots each.

    Built on an `Engine` (its module, mesh and jitted vision tower). Compiles `step` once;
    `prefill` per (prompt bucket, feature bucket), `insert` per prompt bucket."""

    def __init__(self, engine: Engine, *, max_batch: int = 16, max_context: int | None = None):
        self.engine = engine
        self.module: Qwen2VLModule = engine.module
        self.config = engine.config
        context = self.config.text.max_position_embeddings
        self.max_batch = int(max_batch)
        self.max_context = int(max_context or min(context, 4096))
        if self.max_batch < 1:
            raise InputError(f"max_batch must be at least 1 (got {max_batch})")
        if not 2 <= self.max_context <= context:
            raise InputError(f"max_context must be between 2 and the model's context of {context} "
                             f"(got {max_context})")
        self._prefill = jax.jit(self._prefill_impl)
        self._insert = jax.jit(self._insert_impl, donate_argnums=0)
        self._step = jax.jit(self._step_impl, donate_argnums=1, static_argnums=(2, 3))
        # decode runs on the first k rows: k one of these (powers of two, and max_batch)
        self.row_buckets = tuple(sorted({min(1 << i, self.max_batch) for i in range(self.max_batch.bit_length() + 1)}))
        # and attends over the first c cache slots: c one of these (CONTEXT_BUCKET_MIN times
        # powers of four, and max_context), the fewest that hold every live row's tokens. Each
        # bucket is compiled at warm-up for every row bucket, so they are spaced x4, not x2
        # (2B, 16 rows, 4096 slots: warm-up 186 s with x2 spacing for steps at most 1.25x faster).
        self.context_buckets = tuple(sorted({min(CONTEXT_BUCKET_MIN << 2 * i, self.max_context)
                                             for i in range(max(1, self.max_context.bit_length()))}))
        self._init = jax.jit(self._init_impl)
        self.lockstep: Lockstep | None = None  # set on process 0 of a multi-process run

    # ------------------------------------------------------------ traced bodies
    def _apply(self, params, *args, method):
        return self.module.apply({"params": params}, *args, method=method)

    @contextlib.contextmanager
    def _scope(self, name: str):
        with use_mesh(self.engine.mesh, self.engine.rules), jax.named_scope(name):
            yield

    def _init_impl(self):
        b, s, v = self.max_batch, self.max_context, self.config.text.vocab_size
        one = Sampling.of(GenerationConfig())
        sampling = jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (b, *np.shape(x))), one)
        with self._scope("slots_init"):
            return SlotState(
                cache=KVCache.zeros(self.config.text, b, s, self.module.dtype, self.module.scan_layers),
                kv_valid=jnp.zeros((b, s), bool), pos=jnp.zeros((b,), jnp.int32),
                pos_offset=jnp.zeros((b,), jnp.int32), token=jnp.zeros((b,), jnp.int32),
                seen=jnp.zeros((b, v), bool), greedy=jnp.ones((b,), bool),
                rng=jnp.zeros((b, 2), jnp.uint32), sampling=sampling,
            ).constrain()

    def _prefill_impl(self, params, batch, features, sampling: Sampling, greedy, rng):
        """batch: input_ids int32[1, Lb], positions int32[3, 1, Lb], mask bool[1, Lb],
        pos_offset int32[1], length int32[]; features [F, D] or None."""
        cfg = self.config.text
        ids, mask = batch["input_ids"], batch["mask"]
        lb = ids.shape[1]
        with self._scope("slot_prefill"):
            x = self._apply(params, ids, features, method=Qwen2VLModule.embed)
            cache = KVCache.zeros(cfg, 1, lb, self.module.dtype, self.module.scan_layers)
            hidden, layers = self._apply(params, x, batch["positions"], mask, cache.layers, 0,
                                         method=Qwen2VLModule.decode)
            logits = self._apply(params, hidden[:, -1], method=Qwen2VLModule.lm_logits).astype(jnp.float32)
            seen = jnp.zeros((cfg.vocab_size,), bool).at[ids[0]].max(mask[0])
            rng, key = jax.random.split(rng)
            tok = sample_rows(logits, seen[None], jax.tree.map(lambda a: a[None], sampling), key[None],
                              greedy[None])[0]
            n = batch["length"]
            # The slot after the prompt is Lb in the bucket, n once the prompt is moved to [0, n).
            return Prefix(KVCache.of_layers(layers), n, batch["pos_offset"][0] + lb - n, tok,
                          seen.at[tok].set(True), rng)

    def _insert_impl(self, state: SlotState, prefix: Prefix, slot, sampling: Sampling, greedy):
        """Row `slot` of the state <- the prefix: its real tokens moved from the end of the
        bucket to cache slots [0, n), the rest of the row masked off."""
        lb = prefix.cache.slots
        ax = prefix.cache.batch_axis  # 1 for a scanned decoder's stacked cache
        s = state.kv_valid.shape[1]
        shift = lb - prefix.length

        def put(big, small):  # big [(n,) B, S, K, hd], small [(n,) 1, Lb, K, hd]
            small = jnp.roll(small, -shift, axis=ax + 1).astype(big.dtype)
            if lb > s:  # only possible when the whole prompt still fits: keep its first S slots
                small = jax.lax.slice_in_dim(small, 0, s, axis=ax + 1)
            return jax.lax.dynamic_update_slice_in_dim(big, small, slot, axis=ax)

        with self._scope("slot_insert"):
            cache = state.cache.replace(k=tuple(map(put, state.cache.k, prefix.cache.k)),
                                        v=tuple(map(put, state.cache.v, prefix.cache.v)))
            row = lambda a, value: a.at[slot].set(value)  # noqa: E731
            return state.replace(
                cache=cache, kv_valid=row(state.kv_valid, jnp.arange(s) < prefix.length),
                pos=row(state.pos, prefix.length), pos_offset=row(state.pos_offset, prefix.pos_offset),
                token=row(state.token, prefix.token), seen=row(state.seen, prefix.seen),
                greedy=row(state.greedy, greedy), rng=row(state.rng, prefix.rng),
                sampling=jax.tree.map(row, state.sampling, sampling),
            ).constrain()

    def _step_impl(self, params, state: SlotState, rows: int, context: int):
        if rows == state.kv_valid.shape[0]:
            return self._step_rows(params, state, context)
        # rows past `rows` are free: step the first ones and write them back in place (donated)
        head, tok = self._step_rows(params, state.rows(lambda a, ax: jax.lax.slice_in_dim(a, 0, rows, axis=ax)),
                                    context)
        return state.rows(lambda a, ax, h: jax.lax.dynamic_update_slice_in_dim(a, h, 0, axis=ax), head).constrain(), tok

    def _step_rows(self, params, state: SlotState, context: int):
        """One token per row; attention reads cache slots [0, context) only (every live row's
        tokens are there; a free row's result is discarded)."""
        b, s = state.kv_valid.shape
        with self._scope("slot_step"):
            pos = jnp.minimum(state.pos, s - 1)  # a free row may run past its end: it is discarded
            rows = jnp.arange(b)
            kv_valid = state.kv_valid.at[rows, pos].set(True)
            x = self._apply(params, state.token[:, None], None, method=Qwen2VLModule.embed)
            positions = jnp.broadcast_to((pos + state.pos_offset)[None, :, None], (3, b, 1))
            hidden, layers = self._apply(params, x, positions, kv_valid[:, :context], state.cache.layers, pos,
                                         method=Qwen2VLModule.decode)
            logits = self._apply(params, hidden[:, -1], method=Qwen2VLModule.lm_logits).astype(jnp.float32)
            rng, keys = _split_rows(state.rng)
            tok = sample_rows(logits, state.seen, state.sampling, keys, state.greedy)
            state = state.replace(cache=KVCache.of_layers(layers), kv_valid=kv_valid, pos=pos + 1, token=tok,
                                  seen=state.seen.at[rows, tok].set(True), rng=rng).constrain()
            return state, jnp.copy(tok)

    # ------------------------------------------------------------ host side
    def init_state(self) -> SlotState:
        if self.lockstep is not None:
            self.lockstep.send("init")
        return self._init()

    def check_room(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """InputError unless the prompt and max_new_tokens fit in one row of the cache."""
        if max_new_tokens < 1:
            raise InputError(f"max_tokens must be at least 1 (got {max_new_tokens})")
        if prompt_tokens + max_new_tokens > self.max_context:
            raise InputError(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_new_tokens}) is over the "
                             f"context of {self.max_context} tokens")

    def prompt_inputs(self, input_ids, image_grid_thw=None, video_grid_thw=None, *, room: int = 0) -> ModelInputs:
        """One prompt (int[L], placeholders expanded) -> its bucketed `ModelInputs` (checked as
        every entry point checks them; the vision layout is left out: features come separately)."""
        cfg = self.config
        dim = cfg.vision.patch_dim

        def zeros(grid):  # placeholder pixels: only their count is checked here
            if grid is None:
                return None
            n = int(np.prod(np.asarray(grid).reshape(-1, 3), axis=1).sum())
            return np.broadcast_to(np.zeros((1, dim), np.float32), (n, dim))

        ids = np.asarray(input_ids).reshape(1, -1)
        self.check_room(ids.shape[1], room)
        inputs = build_inputs(cfg, ids, None, zeros(image_grid_thw), image_grid_thw, zeros(video_grid_thw),
                              video_grid_thw, room=room, bucket_min=PREFILL_BUCKET_MIN)
        return dataclasses.replace(inputs, vision=None)

    def encode(self, params, pixel_values, grid_thw) -> np.ndarray:
        """The vision tower over one image (or video): merged features [n, D] on the host."""
        if self.lockstep is not None:
            self.lockstep.send("encode", {"pixel_values": np.asarray(pixel_values), "grid_thw": np.asarray(grid_thw)})
        vision = pack_vision(self.config, pixel_values, grid_thw)
        n = int(np.prod(np.asarray(grid_thw).reshape(-1, 3), axis=1).sum()) // self.config.vision.merge_unit
        features = self.engine.encode(params, vision)
        if not features.is_fully_addressable:  # split over processes: every process gathers it
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(features, tiled=True))[:n]
        return np.asarray(jax.device_get(features))[:n]

    def prefill(self, params, inputs: ModelInputs, features: np.ndarray | None, gc: GenerationConfig) -> Prefix:
        """inputs: one row (`prompt_inputs`); features [F, D]: every image's, then every video's,
        in placeholder order (padded here to a bucket)."""
        if features is not None:
            f = bucket(features.shape[0], FEATURE_BUCKET_MIN)
            features = np.concatenate([features, np.zeros((f - features.shape[0], features.shape[1]),
                                                          features.dtype)])
        batch = {"input_ids": inputs.input_ids, "positions": inputs.positions, "mask": inputs.attention_mask,
                 "pos_offset": inputs.pos_offset, "length": np.int32(inputs.lengths[0])}
        sampling, greedy, rng = Sampling.of(gc), np.bool_(gc.greedy), np.asarray(jax.random.PRNGKey(gc.seed))
        if self.lockstep is not None:
            extra = {} if features is None else {"features": features}
            self.lockstep.send("prefill", {**batch, **extra, **_flat("sampling", sampling), "greedy": greedy, "rng": rng})
        return self._prefill(params, batch, features, sampling, greedy, rng)

    def insert(self, state: SlotState, prefix: Prefix, slot: int, gc: GenerationConfig) -> SlotState:
        """The state (donated) with row `slot` holding the prefilled request."""
        sampling, greedy = Sampling.of(gc), np.bool_(gc.greedy)
        if self.lockstep is not None:
            self.lockstep.send("insert", {**_flat("sampling", sampling), "greedy": greedy}, slot=int(slot))
        return self._insert(state, prefix, np.int32(slot), sampling, greedy)

    def rows_for(self, live: int) -> int:
        """The row bucket that covers slots [0, live)."""
        return next(b for b in self.row_buckets if b >= live)

    def context_for(self, tokens: int) -> int:
        """The context bucket that holds `tokens` cache slots (max_context at most)."""
        return next((c for c in self.context_buckets if c >= tokens), self.max_context)

    def step(self, params, state: SlotState, rows: int | None = None,
             context: int | None = None) -> tuple[SlotState, jax.Array]:
        """One token for each of the first `rows` rows (a row bucket; default every row) ->
        (the next state, their tokens int32[rows]); the state passed in is donated. context:
        the most cache slots a live row will hold after this step (prompt + tokens fed so far;
        default max_context): attention reads only its bucket's slots."""
        rows = self.max_batch if rows is None else self.rows_for(rows)
        context = self.max_context if context is None else self.context_for(context)
        if self.lockstep is not None:
            self.lockstep.send("step", rows=rows, context=context)
        return self._step(params, state, rows, context)

    def follow(self, params, lockstep: Lockstep | None = None) -> None:
        """In a process other than 0: make process 0's calls as they come (`Lockstep`) until
        it stops. Warm up first exactly as process 0 did (`Batcher.warm_up`)."""
        lockstep = lockstep or Lockstep()
        like = Sampling.of(GenerationConfig())
        state = prefix = None
        while True:
            op, meta, a = lockstep.receive()
            if op == "stop":
                return
            if op == "init":
                state = self._init()
            elif op == "encode":  # as process 0 does, gathering the features too
                self.encode(params, a["pixel_values"], a["grid_thw"])
            elif op == "prefill":
                batch = {k: a[k] for k in ("input_ids", "positions", "mask", "pos_offset", "length")}
                prefix = self._prefill(params, batch, a.get("features"), _unflat("sampling", a, like),
                                       a["greedy"], a["rng"])
            elif op == "insert":
                state = self._insert(state, prefix, np.int32(meta["slot"]), _unflat("sampling", a, like), a["greedy"])
            elif op == "step":
                state, _ = self._step(params, state, meta["rows"], meta["context"])
            elif op != "ping":
                raise RuntimeError(f"process 0 sent an unknown call {op!r}")


# ---------------------------------------------------------------------------- vision cache
class VisionCache:
    """A bounded LRU map: key (the caller's hash of the image bytes and resize settings) ->
    (grid_thw int[1, 3], merged features [n, D] on the host). Thread-safe; `get` counts hits
    and misses. Bounded by entries and by the features' bytes."""

    def __init__(self, max_entries: int = 256, max_bytes: int = 1 << 30):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: collections.OrderedDict[str, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, grid_thw: np.ndarray, features: np.ndarray) -> None:
        if features.nbytes > self.max_bytes or self.max_entries < 1:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1].nbytes
            self._items[key] = (np.asarray(grid_thw).reshape(1, 3), features)
            self._bytes += features.nbytes
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped.nbytes

    def __len__(self) -> int:
        return len(self._items)


# ---------------------------------------------------------------------------- requests
@dataclasses.dataclass
class VisionInput:
    """One image or video of a request: its patches and grid (`pixel_values` may be None when
    `features` came from the cache), and the cache key (None: do not cache)."""

    pixel_values: np.ndarray | None
    grid_thw: np.ndarray  # int[1, 3]
    key: str | None = None
    features: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Event:
    """What a request's `emit` receives: a token, or the end ("stop": an EOS, "length":
    max_tokens, "cancelled", "error" with a message)."""

    token: int | None = None
    finish: str | None = None
    message: str | None = None


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
    generated: int = 0

    def cancel(self) -> None:
        self.cancelled.set()


class QueueFull(Exception):
    """The batcher's queue holds its maximum of waiting requests."""


# ---------------------------------------------------------------------------- the batcher
class Batcher:
    """Runs a `SlotEngine` in one thread over a bounded queue of `Request`s.

    `submit` queues a request (QueueFull when the queue is full); the thread admits waiting
    requests into free slots between steps (vision tower with the cache, prefill, insert), steps
    every active slot, and frees a slot the moment its request ends."""

    def __init__(self, slots: SlotEngine, params, *, max_queue: int = 64, vision_cache: VisionCache | None = None):
        self.slots, self.params = slots, params
        self.max_queue = max_queue
        self.vision_cache = vision_cache if vision_cache is not None else VisionCache()
        self._queue: collections.deque[Request] = collections.deque()
        self._active: list[Request | None] = [None] * slots.max_batch
        self._cond = threading.Condition()
        self._closing = False
        self._state = None
        self._thread: threading.Thread | None = None
        self.steps = 0

    # ------------------------------------------------------------ public
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active_slots(self) -> int:
        return sum(r is not None for r in self._active)

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
        if self.slots.lockstep is not None:
            self.slots.lockstep.send("stop")
            self.slots.lockstep = None
        for req in list(self._queue) + [r for r in self._active if r is not None]:
            req.emit(Event(finish="error", message="the server is shutting down"))
        self._queue.clear()
        self._active = [None] * len(self._active)

    def submit(self, request: Request) -> None:
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting already (the queue holds {self.max_queue})")
            self._queue.append(request)
            self._cond.notify_all()

    def warm_up(self, prompt_lengths: Sequence[int] | None = None) -> None:
        """Compiles the step and the prefill/insert of the given prompt lengths' buckets before
        the thread starts (call before `start`); by default every bucket up to 64 tokens, where
        most chat turns fall (longer prompts compile their bucket when one first comes)."""
        if prompt_lengths is None:
            prompt_lengths = short_prompt_lengths(self.slots.max_context)
        state = self.slots.init_state()
        gc = GenerationConfig(max_new_tokens=2)
        # insert and step, each on a fresh state and on one a step returned: on a mesh the two
        # can differ in layout, and each compiles its own variant here rather than later.
        for _ in range(2):
            for n in prompt_lengths:
                inputs = self.slots.prompt_inputs(np.zeros((n,), np.int32), room=1)
                state = self.slots.insert(state, self.slots.prefill(self.params, inputs, None, gc), 0, gc)
            for rows in self.slots.row_buckets:  # every bucket, on a state each kind of step returned
                for context in self.slots.context_buckets:
                    state, tok = self.slots.step(self.params, state, rows, context)
        jax.block_until_ready(tok)

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._queue and self.active_slots == 0:
                    if not self._cond.wait(HEARTBEAT_S) and self.slots.lockstep is not None:
                        self.slots.lockstep.send("ping")  # followers wait in a collective: keep it short
                if self._closing:
                    return
            self._release_cancelled()
            self._admit()
            if self.active_slots:
                self._step()

    def _release_cancelled(self) -> None:
        for slot, req in enumerate(self._active):
            if req is not None and req.cancelled.is_set():
                self._finish(slot, Event(finish="cancelled"))

    def _admit(self) -> None:
        while None in self._active:
            with self._cond:
                if not self._queue:
                    return
                req = self._queue.popleft()
            if req.cancelled.is_set():
                req.emit(Event(finish="cancelled"))
                continue
            slot = self._active.index(None)
            try:
                prefix = self._prefill(req)
                self._state = self.slots.insert(self._state, prefix, slot, req.config)
                first = int(jax.device_get(prefix.token))
            except InputError as e:
                req.emit(Event(finish="error", message=str(e)))
                continue
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the others
                log.exception("prefill failed")
                req.emit(Event(finish="error", message=f"prefill failed: {type(e).__name__}: {e}"))
                continue
            self._active[slot] = req
            self._deliver(slot, req, first)

    def _prefill(self, req: Request) -> Prefix:
        image_grid = _grids(req.images)
        video_grid = _grids(req.videos)
        inputs = self.slots.prompt_inputs(req.input_ids, image_grid, video_grid, room=req.config.max_new_tokens)
        parts = [self._features(v) for v in (*req.images, *req.videos)]
        features = np.concatenate(parts) if parts else None
        return self.slots.prefill(self.params, inputs, features, req.config)

    def _features(self, item: VisionInput) -> np.ndarray:
        if item.features is not None:
            return item.features
        features = self.slots.encode(self.params, item.pixel_values, item.grid_thw)
        if item.key is not None:
            self.vision_cache.put(item.key, item.grid_thw, features)
        return features

    def _step(self) -> None:
        try:
            live = max(i for i, r in enumerate(self._active) if r is not None) + 1
            # a row writes its last token at slot prompt + generated - 1 and attends up to it
            context = max(np.size(r.input_ids) + r.generated for r in self._active if r is not None)
            self._state, tokens = self.slots.step(self.params, self._state, live, context)
            tokens = np.asarray(jax.device_get(tokens))
        except Exception as e:  # noqa: BLE001 - fail the rows in flight, keep serving
            log.exception("decode step failed")
            for slot, req in enumerate(self._active):
                if req is not None:
                    self._finish(slot, Event(finish="error", message=f"decode failed: {type(e).__name__}: {e}"))
            self._state = self.slots.init_state()
            return
        self.steps += 1
        for slot, req in enumerate(self._active):
            if req is not None:
                self._deliver(slot, req, int(tokens[slot]))

    def _deliver(self, slot: int, req: Request, token: int) -> None:
        if req.cancelled.is_set():
            self._finish(slot, Event(finish="cancelled"))
            return
        req.generated += 1
        if not req.ignore_eos and token in req.config.eos_token_ids:
            self._finish(slot, Event(token=token, finish="stop"))
        elif req.generated >= req.config.max_new_tokens:
            self._finish(slot, Event(token=token, finish="length"))
        else:
            req.emit(Event(token=token))

    def _finish(self, slot: int, event: Event) -> None:
        req = self._active[slot]
        self._active[slot] = None
        req.emit(event)


def _grids(items: Sequence[VisionInput]) -> np.ndarray | None:
    if not items:
        return None
    return np.concatenate([np.asarray(v.grid_thw).reshape(-1, 3) for v in items])


"""The one decode runner: a jitted vision tower and forward, and the device programs that every
way of generating drives.

  `prefill`  P rows of prompts (`inputs.ModelInputs`: each row right-aligned in a prompt bucket
             Lb), the vision features merged in, through the decoder into a cache of its own
             (`slots` >= Lb slots), and each row's first token drawn -> a `DecodeState` of P
             rows, the prefix (jitted per (P, Lb, slots, feature bucket));
  `insert`   a prefix's rows into rows of a decode state (with `pack`, each row's prompt moved
             to slots [0, n) so a row holds no padding) (jitted per shapes);
  `step`     every live row one token: the first `rows` rows, attending over the first
             `context` slots, the state donated (jitted per (B, S, rows, context));
  `extend`   C prompt tokens of one row of a served state written at its slots [start,
             start + C) (a prompt prefilled chunk by chunk between steps; its last chunk starts
             the row and draws its first token) (jitted per (C, context, feature bucket));
  `pool` / `save` / `restore`  a pool of blocks of cache slots (zeros), blocks of a row copied
             into it / from it into a row's blocks (prompt prefixes whose keys and values are
             reused: prefix caching) (jitted per (pool, index list) shapes).

Offline generation (`generate`, `stream`) prefills a batch straight into its own rows of
S = Lb + round_up(max_new_tokens, 64) slots (the prefix is the whole state, so its insert is the
identity) and runs `step` inside one `jax.lax.while_loop` (`generate`) or one call at a time
(`stream`, the next step always queued before the current token is read back). The server's
scheduler (`serving.scheduler`) prefills one request at a time, inserts it into a free row and
steps every live row, through the same programs (or fills the row with `extend`, chunk by chunk,
after `restore` of a cached prefix). Whether a row is finished is decided in
one place (`decode_state.advance`). Nothing here mutates the model: params are an argument of
every call, results come back as values (`GenerationResult`, `Token`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from qwen2vl_jax.decode_state import (FINISH_REASONS, LENGTH, RUNNING, STOP, DecodeState, KVCache, RowSettings, advance,
                                       token_logprobs, unpack_mask)
from qwen2vl_jax.inputs import ModelInputs, round_up
from qwen2vl_jax.modules.qwen2vl import Qwen2VLModule, init_shapes
from qwen2vl_jax.sampling import GenerationConfig, Sampling
from qwen2vl_jax.sharding import ShardingRules, named_sharding, param_shardings, shard, to_global, use_mesh

__all__ = ["Engine", "GenerationResult", "Token", "DecodeState", "KVCache", "RowSettings", "FINISH_REASONS"]

CACHE_ROOM_MULTIPLE = 64  # max_new_tokens is rounded up to this for the cache's extra slots
TOP_LOGPROBS = 20  # the most likely tokens a readout with logprobs carries per row (OpenAI's maximum)


# ---------------------------------------------------------------------------- results
@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What `Engine.generate` returns."""

    tokens: np.ndarray  # int32[B, n]: each row up to and including its EOS, pad after it
    finished: np.ndarray  # bool[B]: the row ended with an EOS (else it reached max_new_tokens)
    finish: np.ndarray  # int32[B]: decode_state.STOP or LENGTH (FINISH_REASONS names them)
    vision_s: float  # wall time of the vision tower (0 without images or videos)
    first_token_s: float  # from the call to the first token: vision tower + prefill + one draw
    total_s: float  # the whole call

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over the time they took (all rows)."""
        n = self.tokens.shape[1] - 1
        return self.tokens.shape[0] * n / (self.total_s - self.first_token_s) if n > 0 else float("nan")


@dataclasses.dataclass(frozen=True)
class Token:
    """One decoding step as `Engine.stream` yields it."""

    ids: np.ndarray  # int32[B]: the token of each row (pad for rows that ended earlier)
    done: np.ndarray  # bool[B]: the row has ended (with this token or before)
    index: int  # 0 for the first token
    vision_s: float  # wall time of this request's vision tower (0 without images or videos)
    finish: np.ndarray  # int32[B]: RUNNING, STOP (this token or an earlier one was an EOS) or LENGTH

    def reason(self, row: int = 0) -> str | None:
        """The row's finish reason ("stop", "length"), None while it runs."""
        return FINISH_REASONS.get(int(self.finish[row]))


# ---------------------------------------------------------------------------- the runner
class Engine:
    """The jitted forward, vision tower and the three decode programs for one module on one
    mesh (or none).

    The module's fields (dtype, attention kernel) are part of what is compiled: an engine for
    another kernel is another engine."""

    def __init__(self, module: Qwen2VLModule, mesh: Mesh | None = None, rules: ShardingRules | None = None,
                 *, params_sharding=None, loop_options: dict | None = None, steps_per_iteration: int = 1):
        """params_sharding: the layout of the params the calls will get (a tree of shardings);
        on a mesh it defaults to the rules' layout of the config's parameter tree.
        loop_options: XLA compiler options for `generate`'s decode loop; steps_per_iteration:
        decode steps in one iteration of that loop, so its stop test (a read of the
        predicate on a GPU) comes once per that many tokens. Every step of an iteration runs;
        one past the end keeps the state it was given (`_masked`), so up to K - 1 steps
        of compute are wasted at the end, and the program holds the decoder K times."""
        if steps_per_iteration < 1:
            raise ValueError(f"steps_per_iteration must be at least 1 (got {steps_per_iteration})")
        self.module = module
        self.steps_per_iteration = int(steps_per_iteration)
        self.config = module.config
        self.mesh = mesh
        self.rules = rules or ShardingRules()
        p_sh = params_sharding
        if p_sh is None and mesh is not None:
            p_sh = param_shardings(init_shapes(self.config, scan_layers=module.scan_layers), mesh, self.rules)

        # Params carry explicit shardings; the other inputs arrive laid out by their logical
        # axes (`_put`) and the state pins its own (`DecodeState.constrain`).
        def jit(fn, n_args, **kw):
            shardings = {} if p_sh is None else {"in_shardings": (p_sh,) + (None,) * (n_args - 1)}
            return jax.jit(fn, **shardings, **kw)

        self._encode = jit(self._encode_impl, 2)
        self._forward = jit(self._forward_impl, 5)
        self._prefill = jit(self._prefill_impl, 5, static_argnums=(4, 5, 6))
        self._insert = jax.jit(self._insert_impl, donate_argnums=0, static_argnums=3)
        self._empty = jax.jit(self._empty_impl, static_argnums=(0, 1))
        self._step = jit(self._step_impl, 3, static_argnums=(2, 3, 4, 5), donate_argnums=1)
        self._extend = jit(self._extend_impl, 6, static_argnums=(5, 6, 7), donate_argnums=1)
        self._pool = jax.jit(self._pool_impl, static_argnums=(0, 1))
        self._save = jax.jit(self._save_impl, donate_argnums=1)
        self._restore = jax.jit(self._restore_impl, donate_argnums=0)
        self._loop = jit(self._loop_impl, 2, static_argnums=(2, 3), donate_argnums=1,
                         **({"compiler_options": loop_options} if loop_options else {}))

    # ------------------------------------------------------------ traced bodies
    def _apply(self, params, *args, method):
        return self.module.apply({"params": params}, *args, method=method)

    def _encode_impl(self, params, vision):
        with use_mesh(self.mesh, self.rules), jax.named_scope("vision_tower"):
            return self.module.apply({"params": params}, method=Qwen2VLModule.encode_vision, **vision)

    def _forward_impl(self, params, input_ids, positions, mask, vision):
        with use_mesh(self.mesh, self.rules), jax.named_scope("forward"):
            return self.module.apply({"params": params}, input_ids, positions, mask, vision).astype(jnp.float32)

    def _logits(self, params, ids, features, positions, kv_valid, cache: KVCache, index, at=None):
        """The one model call of every program: tokens in, their keys into the cache from slot
        `index`, the logits of position `at` (default the last) out -> (f32[B, V], the new
        cache)."""
        x = self._apply(params, ids, features, method=Qwen2VLModule.embed)
        hidden, layers = self._apply(params, x, positions, kv_valid, cache.layers, index, method=Qwen2VLModule.decode)
        hidden = hidden[:, -1] if at is None else jax.lax.dynamic_index_in_dim(hidden, at, axis=1, keepdims=False)
        logits = self._apply(params, hidden, method=Qwen2VLModule.lm_logits).astype(jnp.float32)
        return logits, KVCache.of_layers(layers)

    @staticmethod
    def _readout(state: DecodeState, logits, logprobs: bool):
        """What the host reads after a draw: (token, finish), and with logprobs the drawn
        token's logprob and the TOP_LOGPROBS most likely (ids, logprobs) per row."""
        out = state.readout()
        if not logprobs:
            return out
        # replicated, as the token and finish are: every process reads them back
        return (*out, *(shard(x, *(None,) * x.ndim) for x in token_logprobs(logits, state.token, TOP_LOGPROBS)))

    def _prefill_impl(self, params, batch, features, settings: RowSettings, slots: int, greedy: bool | None,
                      logprobs: bool = False, allow=None):
        """batch: input_ids int32[P, Lb], positions int32[3, P, Lb], mask bool[P, Lb],
        pos_offset int32[P]; features [F, D] or None -> (the prefix, its readout). With R > P
        rows of settings (P = 1), the one prompt is prefilled once and its R rows draw apart
        (OpenAI's n)."""
        cfg = self.config.text
        ids, mask = batch["input_ids"], batch["mask"]
        p, lb = ids.shape
        r = settings.greedy.shape[0]
        # Slots after the prompt are open to the queries that will sit there (causal masking
        # keeps the prompt's own queries off them).
        kv_valid = jnp.concatenate([mask, jnp.ones((p, slots - lb), bool)], axis=1)
        with use_mesh(self.mesh, self.rules), jax.named_scope("prefill"):
            cache = KVCache.zeros(cfg, p, slots, self.module.dtype, self.module.scan_layers)
            logits, cache = self._logits(params, ids, features, batch["positions"], kv_valid, cache, 0)
            seen = jnp.zeros((p, cfg.vocab_size), bool).at[jnp.arange(p)[:, None], ids].max(mask)
            pos_offset = batch["pos_offset"]
            if r != p:  # one prompt, r rows
                many = lambda x, axis=0: jnp.repeat(x, r, axis=axis)  # noqa: E731
                cache = cache.map(lambda x: many(x, cache.batch_axis))
                logits, kv_valid, seen, pos_offset = many(logits), many(kv_valid), many(seen), many(pos_offset)
            zeros = jnp.zeros((r,), jnp.int32)
            state = DecodeState(
                cache=cache, kv_valid=kv_valid, pos=jnp.full((r,), lb, jnp.int32), pos_offset=pos_offset,
                token=zeros, logits=logits, seen=seen, generated=zeros, finish=zeros, greedy=settings.greedy,
                max_new=settings.max_new, rng=settings.rng, sampling=settings.sampling)
            state = advance(state, logits, greedy, allow).constrain()
            return state, self._readout(state, logits, logprobs)

    def _insert_impl(self, state: DecodeState, prefix: DecodeState, row, pack: bool, source=None) -> DecodeState:
        """Rows [row, row + P) of the state <- the prefix's P rows (see `insert`); with a
        `source` index, row `row` <- the prefix's row `source` alone."""
        if source is not None:
            prefix = prefix.rows(lambda a, ax: jax.lax.dynamic_slice_in_dim(a, source, 1, axis=ax))
        lb, s = prefix.cache.slots, state.kv_valid.shape[1]
        ax = prefix.cache.batch_axis  # 1 for a scanned decoder's stacked cache
        if pack:
            n = jnp.sum(prefix.kv_valid[:, :lb], axis=1).astype(jnp.int32)  # [P] real prompt tokens
            # each row's slots rolled left by its padding; one row's slot axis is `ax` once
            # the batch axis is mapped over
            roll = jax.vmap(lambda x, k: jnp.roll(x, -k, axis=ax), in_axes=(ax, 0), out_axes=ax)
            prefix = prefix.replace(
                cache=prefix.cache.map(lambda x: roll(x, lb - n)), kv_valid=jnp.arange(s) < n[:, None], pos=n,
                # The slot after the prompt was Lb in the bucket and is n once moved to [0, n).
                pos_offset=prefix.pos_offset + lb - n)
        else:
            grow = max(s - prefix.kv_valid.shape[1], 0)
            prefix = prefix.replace(kv_valid=jnp.pad(prefix.kv_valid[:, :s], ((0, 0), (0, grow))))
        if lb > s:  # only possible when the whole prompt still fits: keep its first S slots
            prefix = prefix.replace(cache=prefix.cache.map(lambda x: jax.lax.slice_in_dim(x, 0, s, axis=ax + 1)))

        if not state.logits.shape[-1]:  # a state that keeps no logits takes none from the prefix
            prefix = prefix.replace(logits=prefix.logits[:, :0])

        def put(big, axis, small):
            return jax.lax.dynamic_update_slice_in_dim(big, small.astype(big.dtype), row, axis=axis)

        with use_mesh(self.mesh, self.rules), jax.named_scope("insert"):
            out = state.rows(put, prefix)
            return (out.replace(rng=prefix.rng) if state.shared_key else out).constrain()

    def _empty_impl(self, rows: int, slots: int) -> DecodeState:
        """`rows` free rows of `slots` slots (finished, so they draw only pads). It keeps no logits
        (f32[rows, 0]): a served state is stepped for its tokens, and carrying [rows, V] floats
        through every step would cost a copy of them each time."""
        cfg = self.config.text
        one = Sampling.of(GenerationConfig())
        zeros = jnp.zeros((rows,), jnp.int32)
        with use_mesh(self.mesh, self.rules), jax.named_scope("empty_state"):
            return DecodeState(
                cache=KVCache.zeros(cfg, rows, slots, self.module.dtype, self.module.scan_layers),
                kv_valid=jnp.zeros((rows, slots), bool), pos=zeros, pos_offset=zeros, token=zeros,
                logits=jnp.zeros((rows, 0), jnp.float32), seen=jnp.zeros((rows, cfg.vocab_size), bool),
                generated=zeros, finish=jnp.full((rows,), LENGTH, jnp.int32), greedy=jnp.ones((rows,), bool),
                max_new=zeros, rng=jnp.zeros((rows, 2), jnp.uint32),
                sampling=jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (rows, *np.shape(x))), one),
            ).constrain()

    def _extend_impl(self, params, state: DecodeState, chunk: dict, features, settings: RowSettings, context: int,
                     greedy: bool | None, logprobs: bool = False, allow=None):
        """Row `row` of the served state (donated) <- C prompt tokens at slots [start, start + C),
        `length` of them real (the rest padding at the end, written past the prompt and masked
        off) -> (the state, the row's readout). The row attends over its first `context` slots.
        A row being filled is finished and parked at its last slot: the decode steps between
        two chunks draw only pads for it and write only there, and this call masks off whatever
        they wrote. On the `last` chunk the row is started: its pos, pos_offset, the prompt's
        tokens as `seen` (a bitmask), settings and key, and its first token drawn from the
        logits of the chunk's last real token.

        chunk: input_ids int32[1, C], positions int32[3, 1, C], and scalars row, start, length,
        last, with pos_offset int32[1] and seen int32[1, W] (the whole prompt's); features
        [F, D] of the placeholders in this chunk (in `merge_vision`'s order) or None; settings
        of one row; allow None or int32[1, W]."""
        b, s = state.kv_valid.shape
        row, start, length, last = chunk["row"], chunk["start"], chunk["length"], chunk["last"]
        with use_mesh(self.mesh, self.rules), jax.named_scope("extend"):
            one = state.rows(lambda a, ax: jax.lax.dynamic_slice_in_dim(a, row, 1, axis=ax))
            end = start + length
            kv_valid = (jnp.arange(s) < end)[None]
            logits, cache = self._logits(params, chunk["input_ids"], features, chunk["positions"],
                                         kv_valid[:, :context], one.cache, start, length - 1)
            one = one.replace(kv_valid=kv_valid)
            zeros = jnp.zeros((1,), jnp.int32)
            started = one.replace(
                pos=end[None].astype(jnp.int32), pos_offset=chunk["pos_offset"], token=zeros, generated=zeros,
                seen=unpack_mask(chunk["seen"], self.config.text.vocab_size), finish=zeros + RUNNING,
                greedy=settings.greedy, max_new=settings.max_new, rng=settings.rng, sampling=settings.sampling)
            started = advance(started, logits, greedy, allow)
            parked = one.replace(pos=jnp.full((1,), s - 1, jnp.int32), finish=jnp.full((1,), LENGTH, jnp.int32))
            new = jax.tree.map(lambda a, p: jnp.where(last, a, p).astype(p.dtype), started.replace(cache=None),
                               parked.replace(cache=None)).replace(cache=cache).constrain()
            out = state.rows(lambda a, ax, n: jax.lax.dynamic_update_slice_in_dim(a, n.astype(a.dtype), row, axis=ax),
                             new)
            return out.constrain(), self._readout(new, logits, logprobs)

    def _pool_impl(self, blocks: int, block: int) -> KVCache:
        """A pool of `blocks` blocks of `block` zeroed cache slots (the cache's dtype and form)."""
        with use_mesh(self.mesh, self.rules), jax.named_scope("prefix_pool"):
            return KVCache.zeros(self.config.text, blocks, block, self.module.dtype, self.module.scan_layers, pool=True)

    @staticmethod
    def _block_slots(blocks, block: int):
        """Row block numbers int32[N] -> the cache slots they cover, int32[N, block]."""
        return blocks[:, None] * block + jnp.arange(block, dtype=jnp.int32)

    def _save_impl(self, state: DecodeState, pool: KVCache, row, blocks, slots) -> KVCache:
        """The pool (donated) with row `row`'s blocks `blocks` (int32[N], each `block` cache
        slots) copied into its blocks `slots` (int32[N]); a slot past the pool's end (padding)
        copies nothing."""
        ax = state.cache.batch_axis  # a pool's block axis is the cache's batch axis
        at = self._block_slots(blocks, pool.slots)  # [N, block]

        def put(dst, src):
            one = jax.lax.dynamic_index_in_dim(src, row, axis=ax, keepdims=False)  # [(n,) S, K, hd]
            taken = jnp.take(one, at, axis=ax, mode="clip")  # [(n,) N, block, K, hd]
            return dst.at[(slice(None),) * ax + (slots,)].set(taken.astype(dst.dtype), mode="drop")

        with use_mesh(self.mesh, self.rules), jax.named_scope("save_prefix"):
            return pool.replace(k=tuple(map(put, pool.k, state.cache.k)),
                                v=tuple(map(put, pool.v, state.cache.v))).constrain()

    def _restore_impl(self, state: DecodeState, pool: KVCache | None, row, blocks, slots, length) -> DecodeState:
        """The state (donated) with the pool's blocks `slots` (int32[N]) in row `row`'s blocks
        `blocks` (int32[N]; a slot past the pool's end is padding and copies nothing) and the
        row's first `length` slots valid; the row finished and parked at its last slot, as
        `_extend_impl` leaves a row it has not started (pool None: only that)."""
        ax, s = state.cache.batch_axis, state.kv_valid.shape[1]

        def put(big, src):
            count, block = src.shape[ax], src.shape[ax + 1]
            taken = jnp.take(src, jnp.minimum(slots, count - 1), axis=ax)  # [(n,) N, block, K, hd]
            taken = taken.reshape(*taken.shape[:ax], -1, *taken.shape[ax + 2:])  # [(n,) N * block, K, hd]
            at = jnp.where((slots < count)[:, None], self._block_slots(blocks, block), s).reshape(-1)
            return big.at[(slice(None),) * ax + (row, at)].set(taken.astype(big.dtype), mode="drop")

        with use_mesh(self.mesh, self.rules), jax.named_scope("restore_prefix"):
            cache = state.cache if pool is None else state.cache.replace(
                k=tuple(map(put, state.cache.k, pool.k)), v=tuple(map(put, state.cache.v, pool.v)))
            return state.replace(
                cache=cache, kv_valid=state.kv_valid.at[row].set(jnp.arange(s) < length),
                pos=state.pos.at[row].set(s - 1), finish=state.finish.at[row].set(LENGTH)).constrain()

    def _decode_one(self, params, state: DecodeState, context: int, greedy: bool | None, allow=None):
        """One token for every row: each row's last token fed at its own slot `pos`; attention
        reads slots [0, context) only (every live row's tokens are there) -> (the state, the
        logits it drew from)."""
        b, s = state.kv_valid.shape
        pos = jnp.minimum(state.pos, s - 1)  # a free row may run past its end: its result is discarded
        kv_valid = state.kv_valid.at[jnp.arange(b), pos].set(True)
        positions = jnp.broadcast_to((pos + state.pos_offset)[None, :, None], (3, b, 1))
        logits, cache = self._logits(params, state.token[:, None], None, positions, kv_valid[:, :context],
                                     state.cache, pos)
        state = advance(state.replace(cache=cache, kv_valid=kv_valid, pos=pos + 1), logits, greedy, allow)
        return state.constrain(), logits

    def _step_impl(self, params, state: DecodeState, rows: int, context: int, greedy: bool | None,
                   logprobs: bool = False, allow=None):
        with use_mesh(self.mesh, self.rules), jax.named_scope("decode_step"):
            if rows == state.kv_valid.shape[0]:
                state, logits = self._decode_one(params, state, context, greedy, allow)
                return state, self._readout(state, logits, logprobs)
            # rows past `rows` are free: step the first ones and write them back in place (donated)
            head = state.rows(lambda a, ax: jax.lax.slice_in_dim(a, 0, rows, axis=ax))
            head, logits = self._decode_one(params, head, context, greedy, allow)
            out = state.rows(lambda a, ax, h: jax.lax.dynamic_update_slice_in_dim(a, h, 0, axis=ax), head)
            out = out.replace(rng=head.rng) if state.shared_key else out
            return out.constrain(), self._readout(head, logits, logprobs)

    def _loop_impl(self, params, state: DecodeState, length: int, greedy: bool):
        """Steps until every row is finished -> (the state, tokens int32[B, length] with the
        first n drawn (pad after a row's end), n)."""
        b, s = state.kv_valid.shape
        tokens = jnp.broadcast_to(state.sampling.pad[:, None], (b, length)).at[:, 0].set(state.token)

        def keep_going(carry):
            return jnp.any(carry[0].finish == RUNNING)

        def one(carry):
            st, toks, n = carry
            st, _ = self._decode_one(params, st, s, greedy)
            return st, jax.lax.dynamic_update_slice_in_dim(toks, st.token[:, None], n, axis=1), n + 1

        def masked(before, after):
            """`after` where the decode was still going, else `before`, with no branch. The cache
            is `after`'s either way: a step past the end writes into the next slot, which is in
            the cache (n never passes max_new <= length) and which nothing reads once it stops."""
            go = keep_going(before)
            pick = lambda new, old: jnp.where(go, new, old)  # noqa: E731
            st = jax.tree.map(pick, after[0].replace(cache=None), before[0].replace(cache=None))
            return (st.replace(cache=after[0].cache).constrain(), pick(after[1], before[1]), pick(after[2], before[2]))

        def body(carry):
            carry = one(carry)
            for _ in range(self.steps_per_iteration - 1):
                carry = masked(carry, one(carry))
            return carry

        with use_mesh(self.mesh, self.rules), jax.named_scope("decode_loop"):
            return jax.lax.while_loop(keep_going, body, (state, tokens, jnp.int32(1)))

    # ------------------------------------------------------------ ahead of time
    PROGRAMS = ("encode", "forward", "prefill", "insert", "empty", "step", "extend", "pool", "save", "restore",
                "loop")

    def program(self, name: str):
        """The jitted program `name` (one of PROGRAMS), for ahead-of-time work:
        `.lower(*args)` / `.eval_shape(*args)` with arrays or jax.ShapeDtypeStruct in the
        argument order of its traced body (`_<name>_impl`), static arguments as plain values;
        on a mesh every argument is given (prefill's and step's logprobs and allow too)."""
        if name not in self.PROGRAMS:
            raise ValueError(f"no program {name!r} (one of {', '.join(self.PROGRAMS)})")
        return getattr(self, f"_{name}")

    # ------------------------------------------------------------ the device calls
    # Host arrays in, device values out: what a multi-process leader replays on every process
    # (serving.lockstep wraps exactly these).
    def empty(self, rows: int, slots: int) -> DecodeState:
        """A decode state of `rows` free rows of `slots` cache slots."""
        return self._empty(rows, slots)

    def encode(self, params, vision: dict) -> jax.Array:
        """pack_vision's arrays -> merged features [N / merge_unit, D] (on device)."""
        return self._encode(params, self._put(vision, {}))

    def prefill(self, params, batch: dict, features, settings: RowSettings, slots: int,
                greedy: bool | None = None, *, logprobs: bool = False, allow=None) -> tuple[DecodeState, tuple]:
        """P prompts (batch: input_ids int32[P, Lb], positions int32[3, P, Lb], mask bool[P, Lb],
        pos_offset int32[P]) with their merged features [F, D] (or None) into a prefix of
        `slots` >= Lb cache slots, each row's first token drawn -> (the prefix, its readout:
        (token, finish), and with `logprobs` the token's logprob and the TOP_LOGPROBS most
        likely (ids, logprobs)). greedy: True/False when every row is greedy/sampling, None to
        follow each row's flag (a served batch). settings of R rows for one prompt: the prompt
        is prefilled once into R rows that draw apart. allow: None or an allowed-token bitmask
        int32[R, W] per row (`decode_state.unpack_mask`)."""
        return self._prefill(params, batch, features, settings, slots, greedy, logprobs, allow)

    def insert(self, state: DecodeState, prefix: DecodeState, row: int, pack: bool = True,
               source: int | None = None) -> DecodeState:
        """The state (donated) with rows [row, row + P) holding the prefix's rows, or with
        `source`, row `row` holding the prefix's row `source`. pack: each row's real prompt
        tokens move from the end of its bucket to slots [0, n) and the rest of the row is masked
        off (a served row holds no padding); else the rows keep the prefix's layout."""
        return self._insert(state, prefix, np.int32(row), pack, None if source is None else np.int32(source))

    def step(self, params, state: DecodeState, greedy: bool | None = None, rows: int | None = None,
             context: int | None = None, *, logprobs: bool = False, allow=None) -> tuple[DecodeState, tuple]:
        """One token for each of the first `rows` rows (default every row), attending over the
        first `context` cache slots (default all) -> (the next state, the readout of those rows,
        as `prefill` gives it); the state passed in is donated (read what you need first).
        allow: None or a bitmask int32[rows, W] of each stepped row's allowed tokens."""
        b, s = state.kv_valid.shape
        return self._step(params, state, b if rows is None else rows, s if context is None else context, greedy,
                          logprobs, allow)

    def extend(self, params, state: DecodeState, chunk: dict, features, settings: RowSettings, context: int,
               greedy: bool | None = None, *, logprobs: bool = False, allow=None) -> tuple[DecodeState, tuple]:
        """One chunk of one row's prompt into the served state (donated; see `_extend_impl`) ->
        (the state, the row's readout as `prefill` gives it; read it after the last chunk)."""
        return self._extend(params, state, chunk, features, settings, context, greedy, logprobs, allow)

    def pool(self, blocks: int, block: int) -> KVCache:
        """A pool of `blocks` zeroed blocks of `block` cache slots (prompt prefixes to reuse)."""
        return self._pool(blocks, block)

    def save(self, state: DecodeState, pool: KVCache, row: int, blocks, slots) -> KVCache:
        """The pool (donated) with row `row`'s blocks `blocks` (int32[N]) copied into its blocks
        `slots` (int32[N]; a slot past the pool's end: padding, nothing copied)."""
        return self._save(state, pool, np.int32(row), np.asarray(blocks, np.int32), np.asarray(slots, np.int32))

    def restore(self, state: DecodeState, pool: KVCache | None, row: int, length: int, blocks=None,
                slots=None) -> DecodeState:
        """The state (donated) with the pool's blocks `slots` in row `row`'s blocks `blocks`
        (int32[N] each; a slot past the pool's end: padding), the row's first `length` slots
        valid; `extend` goes on from slot `length`. pool None: the row is only parked (finished,
        its slots masked off) for the `extend` calls that will fill it."""
        if pool is not None:
            blocks, slots = np.asarray(blocks, np.int32), np.asarray(slots, np.int32)
        return self._restore(state, pool, np.int32(row), blocks, slots, np.int32(length))

    # ------------------------------------------------------------ offline generation
    def _put(self, tree: dict, axes: dict) -> dict:
        """Host arrays -> device arrays laid out by their logical axes (data parallel on batch)."""
        if self.mesh is None:
            return tree
        return {k: to_global(v, named_sharding(self.mesh, self.rules, np.shape(v), *axes.get(k, ())))
                for k, v in tree.items()}

    def forward(self, params, inputs: ModelInputs) -> jax.Array:
        """Logits f32[B, Lb, V] of the packed inputs (on device; `inputs.unpack` restores the
        caller's layout)."""
        batch = self._put({"input_ids": inputs.input_ids, "positions": inputs.positions,
                           "mask": inputs.attention_mask},
                          {"input_ids": ("batch",), "positions": (None, "batch"), "mask": ("batch",)})
        vision = None if inputs.vision is None else self._put(inputs.vision, {})
        return self._forward(params, batch["input_ids"], batch["positions"], batch["mask"], vision)

    def cache_slots(self, inputs: ModelInputs, max_new_tokens: int) -> int:
        return inputs.shape[1] + round_up(max_new_tokens, CACHE_ROOM_MULTIPLE)

    def start(self, params, inputs: ModelInputs, generation: GenerationConfig):
        """Dispatches the vision tower and the prefill of the whole batch into its own rows ->
        (features or None, the decode state, its first readout)."""
        features = None
        if inputs.vision is not None:
            features = self.encode(params, inputs.vision)
        batch = self._put({"input_ids": inputs.input_ids, "positions": inputs.positions,
                           "mask": inputs.attention_mask, "pos_offset": inputs.pos_offset},
                          {"input_ids": ("batch",), "positions": (None, "batch"), "mask": ("batch",),
                           "pos_offset": ("batch",)})
        settings = RowSettings.repeat(generation, inputs.shape[0])
        state, first = self.prefill(params, batch, features, settings, self.cache_slots(inputs, generation.max_new_tokens),
                                    generation.greedy)
        return features, state, first

    @staticmethod
    def _vision_time(features, t0: float) -> float:
        # Read after prefill is queued behind the tower, so the wait costs the device nothing.
        if features is None:
            return 0.0
        jax.block_until_ready(features)
        return time.perf_counter() - t0

    def generate(self, params, inputs: ModelInputs, generation: GenerationConfig) -> GenerationResult:
        """The whole decode as one while_loop that stops when every row is finished."""
        t0 = time.perf_counter()
        features, state, first = self.start(params, inputs, generation)
        length = state.kv_valid.shape[1] - inputs.shape[1]
        state, tokens, n = self._loop(params, state, length, generation.greedy)
        vision_s = self._vision_time(features, t0)
        jax.block_until_ready(first)
        t_first = time.perf_counter() - t0
        n, tokens, finish = jax.device_get((n, tokens, state.finish))
        finish = np.asarray(finish)
        return GenerationResult(np.asarray(tokens)[:, :int(n)], finish == STOP, finish, vision_s, t_first,
                                time.perf_counter() - t0)

    def stream(self, params, inputs: ModelInputs, generation: GenerationConfig) -> Iterator[Token]:
        """Yields a `Token` per step as soon as it is drawn; the next step is already queued
        when a token is read back (one step past the end may be computed and dropped)."""
        t0 = time.perf_counter()
        features, state, pending = self.start(params, inputs, generation)
        vision_s = self._vision_time(features, t0)
        index = 0
        while True:
            ahead = None
            if index + 1 < generation.max_new_tokens:
                state, ahead = self.step(params, state, generation.greedy)
            ids, finish = (np.asarray(x) for x in jax.device_get(pending))
            done = finish != RUNNING
            yield Token(ids, done, index, vision_s, finish)
            if ahead is None or done.all():
                return
            pending, index = ahead, index + 1

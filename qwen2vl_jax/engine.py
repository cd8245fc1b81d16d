"""The generation engine: a typed KV cache, the jitted vision tower, prefill and decode step, and
the two ways to run decoding (one `jax.lax.while_loop`, or step by step for streaming).

The flow for one batch (`inputs.ModelInputs`: B rows packed to the right of a prompt bucket Lb):
  `encode`   the vision tower over the batch's flat patch layout (jitted per patch bucket);
  `prefill`  embeddings with the features merged in, the decoder over the prompt into a fresh
             cache of S = Lb + round_up(max_new_tokens, 64) slots, the first token drawn
             (jitted per (B, Lb, S, feature bucket));
  `step`     one token for every row (jitted per (B, S)), either inside one while_loop
             (`generate`) or dispatched one at a time (`stream`), the next step always queued
             before the current token is read back, so the device never waits for the host.

A generated token in cache slot j of a row sits at M-RoPE position j + pos_offset, the same on
all three axes. Attention is masked by slot (`kv_valid`), so left padding needs no special case.
Nothing here mutates the model: params are an argument of every call, results come back as
values (`GenerationResult`, `Token`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import ClassVar, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from qwen2vl_jax.config import TextConfig
from qwen2vl_jax.inputs import ModelInputs, round_up
from qwen2vl_jax.modules.qwen2vl import Qwen2VLModule, init_shapes
from qwen2vl_jax.modules.text import LayerCache
from qwen2vl_jax.sampling import GenerationConfig, Sampling, sample_token
from qwen2vl_jax.sharding import ShardingRules, named_sharding, param_shardings, shard, to_global, use_mesh

CACHE_ROOM_MULTIPLE = 64  # max_new_tokens is rounded up to this for the cache's extra slots


# ---------------------------------------------------------------------------- the cache
@flax.struct.dataclass
class KVCache:
    """Keys and values of every decoder layer: k[i], v[i] are [B, S, K, hd] (S cache slots);
    for a scanned decoder (`stacked`), k[0] and v[0] are [n, B, S, K, hd], all n layers in one.

    The shapes, dtype and logical axes are declared here once; `abstract` gives the shapes for
    eval_shape/AOT, `shardings` the layout on a mesh, `constrain` pins it inside a trace."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    stacked: bool = flax.struct.field(pytree_node=False, default=False)

    AXES: ClassVar[tuple[str | None, ...]] = ("batch", None, "kv_heads", None)

    @property
    def axes(self) -> tuple[str | None, ...]:
        return (None, *self.AXES) if self.stacked else self.AXES

    @property
    def batch_axis(self) -> int:
        return 1 if self.stacked else 0

    @staticmethod
    def layer_shape(config: TextConfig, batch: int, slots: int) -> tuple[int, int, int, int]:
        return (batch, slots, config.num_key_value_heads, config.head_dim)

    @classmethod
    def _build(cls, config: TextConfig, batch: int, slots: int, stacked: bool, make) -> "KVCache":
        shape = cls.layer_shape(config, batch, slots)
        n = config.num_hidden_layers
        if stacked:
            return cls((make((n, *shape)),), (make((n, *shape)),), stacked=True)
        return cls(tuple(make(shape) for _ in range(n)), tuple(make(shape) for _ in range(n)))

    @classmethod
    def abstract(cls, config: TextConfig, batch: int, slots: int, dtype, stacked: bool = False) -> "KVCache":
        return cls._build(config, batch, slots, stacked, lambda shape: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)))

    @classmethod
    def zeros(cls, config: TextConfig, batch: int, slots: int, dtype, stacked: bool = False) -> "KVCache":
        """A fresh cache (inside a trace: constrained to its layout)."""
        return cls._build(config, batch, slots, stacked, lambda shape: jnp.zeros(shape, dtype)).constrain()

    def map(self, fn) -> "KVCache":
        """fn applied to every cache array (k and v alike)."""
        return self.replace(k=tuple(map(fn, self.k)), v=tuple(map(fn, self.v)))

    def constrain(self) -> "KVCache":
        return self.map(lambda x: shard(x, *self.axes))

    def shardings(self, mesh: Mesh, rules: ShardingRules | None = None) -> "KVCache":
        rules = rules or ShardingRules()
        return self.map(lambda x: named_sharding(mesh, rules, x.shape, *self.axes))

    @property
    def slots(self) -> int:
        return self.k[0].shape[self.batch_axis + 1]

    @property
    def layers(self) -> tuple[LayerCache, ...] | LayerCache:
        """The form the decoder module takes: one (k, v) per layer, or the stacked pair."""
        if self.stacked:
            return LayerCache(self.k[0], self.v[0])
        return tuple(LayerCache(k, v) for k, v in zip(self.k, self.v))

    @classmethod
    def of_layers(cls, layers) -> "KVCache":
        if isinstance(layers, LayerCache):  # a scanned decoder's stacked cache
            return cls((layers.k,), (layers.v,), stacked=True)
        return cls(tuple(c.k for c in layers), tuple(c.v for c in layers))

    @property
    def nbytes(self) -> int:
        return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in (*self.k, *self.v)))


# ---------------------------------------------------------------------------- decode state
@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries. B rows, S cache slots, T = S - start."""

    step: jax.Array  # int32[]: tokens generated so far
    start: jax.Array  # int32[]: cache slot of the first generated token (the prompt bucket)
    max_new: jax.Array  # int32[]: stop after this many tokens (<= T)
    token: jax.Array  # int32[B]: the last generated token, fed to the next step
    tokens: jax.Array  # int32[B, T]: generated tokens; pad after a row's EOS
    done: jax.Array  # bool[B]: the row has produced an EOS
    logits: jax.Array  # f32[B, V]: the logits the last token was drawn from
    cache: KVCache
    kv_valid: jax.Array  # bool[B, S]: which slots hold a real token (prompt pads do not)
    pos_offset: jax.Array  # int32[B]: the M-RoPE position of slot j is j + pos_offset
    seen: jax.Array  # bool[B, V]: tokens in the prompt or generated (repetition penalty)
    rng: jax.Array  # the key the next step splits
    sampling: Sampling

    def constrain(self) -> "DecodeState":
        """Pins the sharding of the batch-major fields (a no-op without a mesh)."""
        return self.replace(
            cache=self.cache.constrain(), kv_valid=shard(self.kv_valid, "batch", None),
            logits=shard(self.logits, "batch", "vocab"), seen=shard(self.seen, "batch", None),
            pos_offset=shard(self.pos_offset, "batch"),
            # What the host reads back stays replicated, so every process can read it.
            token=shard(self.token, None), tokens=shard(self.tokens, None, None), done=shard(self.done, None),
        )

    def readout(self) -> tuple[jax.Array, jax.Array]:
        """(token int32[B], done bool[B]) as fresh arrays: the host reads them while the state
        itself is donated to the next step."""
        return jnp.copy(self.token), jnp.copy(self.done)


def _advance(state: DecodeState, logits, greedy: bool) -> DecodeState:
    """Draws the next token from `logits` f32[B, V] and records it."""
    rng, key = jax.random.split(state.rng)
    tok = sample_token(logits, state.seen, state.sampling, key, greedy)
    tok = jnp.where(state.done, state.sampling.pad, tok)
    tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, tok[:, None], state.step, axis=1)
    is_eos = jnp.any(tok[:, None] == state.sampling.eos[None, :], axis=-1)
    seen = state.seen.at[jnp.arange(tok.shape[0]), tok].set(True)
    return state.replace(step=state.step + 1, token=tok, tokens=tokens, done=state.done | is_eos,
                         logits=logits, seen=seen, rng=rng)


def _keep_going(state: DecodeState):
    return (state.step < state.max_new) & ~jnp.all(state.done)


def _masked_step(state: DecodeState, after: DecodeState) -> DecodeState:
    """`after` (one step from `state`) where the decode was still going, else `state`'s tokens,
    counters, logits and key, with no branch. The cache is `after`'s either way: a step past
    the end writes the last token's keys into the next slot, which is in the cache (the step
    count never passes max_new <= T) and which nothing reads once the loop stops."""
    go = _keep_going(state)
    pick = lambda new, old: jnp.where(go, new, old)  # noqa: E731
    return after.replace(step=pick(after.step, state.step), token=pick(after.token, state.token),
                         tokens=pick(after.tokens, state.tokens), done=pick(after.done, state.done),
                         logits=pick(after.logits, state.logits), seen=pick(after.seen, state.seen),
                         rng=pick(after.rng, state.rng)).constrain()


# ---------------------------------------------------------------------------- results
@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What `Engine.generate` returns."""

    tokens: np.ndarray  # int32[B, n]: each row up to and including its EOS, pad after it
    finished: np.ndarray  # bool[B]: the row ended with an EOS (else it reached max_new_tokens)
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


# ---------------------------------------------------------------------------- the engine
class Engine:
    """Jitted forward, vision tower, prefill and decode for one module on one mesh (or none).

    Compiles once per bucket: `encode` per (patches, segments, segment length), `forward` per
    (B, Lb, patch bucket), `prefill` per (B, Lb, S, feature bucket), `step`/`loop` per (B, S).
    The module's fields (dtype, attention kernel) are part of what is compiled: an engine for
    another kernel is another engine."""

    def __init__(self, module: Qwen2VLModule, mesh: Mesh | None = None, rules: ShardingRules | None = None,
                 *, params_sharding=None, loop_options: dict | None = None, steps_per_iteration: int = 1):
        """params_sharding: the layout of the params the calls will get (a tree of shardings);
        on a mesh it defaults to the rules' layout of the config's parameter tree.
        loop_options: XLA compiler options for `generate`'s decode loop; steps_per_iteration:
        decode steps in one iteration of that loop, so its stop test (a read of the
        predicate on a GPU) comes once per that many tokens. Every step of an iteration runs;
        one past the end keeps the state it was given (`_masked_step`), so up to K - 1 steps
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
        self._prefill = jit(self._prefill_impl, 5, static_argnums=5)
        self._step = jit(self._step_impl, 2, static_argnums=2, donate_argnums=1)
        self._loop = jit(self._loop_impl, 2, static_argnums=2, donate_argnums=1,
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

    def _prefill_impl(self, params, batch, features, sampling, rng, greedy: bool):
        """batch: input_ids int32[B, Lb], positions int32[3, B, Lb], kv_valid bool[B, S],
        pos_offset int32[B], max_new int32[]; features [F, D] or None -> (DecodeState after
        the first token, its readout)."""
        cfg = self.config.text
        ids = batch["input_ids"]
        b, lb = ids.shape
        slots = batch["kv_valid"].shape[1]
        with use_mesh(self.mesh, self.rules), jax.named_scope("prefill"):
            x = self._apply(params, ids, features, method=Qwen2VLModule.embed)
            cache = KVCache.zeros(cfg, b, slots, self.module.dtype, self.module.scan_layers)
            hidden, layers = self._apply(params, x, batch["positions"], batch["kv_valid"], cache.layers, 0,
                                         method=Qwen2VLModule.decode)
            logits = self._apply(params, hidden[:, -1], method=Qwen2VLModule.lm_logits).astype(jnp.float32)
            prompt_valid = batch["kv_valid"][:, :lb]
            seen = jnp.zeros((b, cfg.vocab_size), bool).at[jnp.arange(b)[:, None], ids].max(prompt_valid)
            state = DecodeState(
                step=jnp.int32(0), start=jnp.int32(lb), max_new=batch["max_new"],
                token=jnp.zeros((b,), jnp.int32),
                tokens=jnp.full((b, slots - lb), sampling.pad, jnp.int32),
                done=jnp.zeros((b,), bool), logits=logits, cache=KVCache.of_layers(layers),
                kv_valid=batch["kv_valid"], pos_offset=batch["pos_offset"], seen=seen, rng=rng, sampling=sampling,
            )
            state = _advance(state, logits, greedy).constrain()
            return state, state.readout()

    def _decode_one(self, params, state: DecodeState, greedy: bool) -> DecodeState:
        slot = state.start + state.step - 1  # where the last token goes
        pos = jnp.broadcast_to((slot + state.pos_offset)[None, :, None], (3, state.token.shape[0], 1))
        x = self._apply(params, state.token[:, None], None, method=Qwen2VLModule.embed)
        hidden, layers = self._apply(params, x, pos, state.kv_valid, state.cache.layers, slot,
                                     method=Qwen2VLModule.decode)
        logits = self._apply(params, hidden[:, -1], method=Qwen2VLModule.lm_logits).astype(jnp.float32)
        return _advance(state.replace(cache=KVCache.of_layers(layers)), logits, greedy).constrain()

    def _step_impl(self, params, state: DecodeState, greedy: bool):
        with use_mesh(self.mesh, self.rules), jax.named_scope("decode_step"):
            state = self._decode_one(params, state, greedy)
            return state, state.readout()

    def _loop_impl(self, params, state: DecodeState, greedy: bool) -> DecodeState:
        def one(s):
            return self._decode_one(params, s, greedy)

        def body(s):
            s = one(s)
            for _ in range(self.steps_per_iteration - 1):
                s = _masked_step(s, one(s))
            return s

        with use_mesh(self.mesh, self.rules), jax.named_scope("decode_loop"):
            return jax.lax.while_loop(_keep_going, body, state)

    # ------------------------------------------------------------ host side
    def _put(self, tree: dict, axes: dict) -> dict:
        """Host arrays -> device arrays laid out by their logical axes (data parallel on batch)."""
        if self.mesh is None:
            return tree
        return {k: to_global(v, named_sharding(self.mesh, self.rules, np.shape(v), *axes.get(k, ())))
                for k, v in tree.items()}

    def encode(self, params, vision: dict) -> jax.Array:
        """pack_vision's arrays -> merged features [N / merge_unit, D] (on device)."""
        return self._encode(params, self._put(vision, {}))

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

    def start(self, params, inputs: ModelInputs, gc: GenerationConfig):
        """Dispatches the vision tower and prefill; -> (features or None, state, first readout)."""
        features = None
        if inputs.vision is not None:
            features = self.encode(params, inputs.vision)
        b, lb = inputs.shape
        slots = self.cache_slots(inputs, gc.max_new_tokens)
        kv_valid = np.concatenate([inputs.attention_mask, np.ones((b, slots - lb), bool)], axis=1)
        batch = {"input_ids": inputs.input_ids, "positions": inputs.positions, "kv_valid": kv_valid,
                 "pos_offset": inputs.pos_offset, "max_new": np.int32(gc.max_new_tokens)}
        batch = self._put(batch, {"input_ids": ("batch",), "positions": (None, "batch"),
                                  "kv_valid": ("batch",), "pos_offset": ("batch",)})
        state, first = self._prefill(params, batch, features, Sampling.of(gc), jax.random.PRNGKey(gc.seed),
                                     gc.greedy)
        return features, state, first

    def step(self, params, state: DecodeState, greedy: bool) -> tuple[DecodeState, tuple[jax.Array, jax.Array]]:
        """One decode step for every row -> (the next state, its (token, done) readout); the
        state passed in is donated (read what you need from it first)."""
        return self._step(params, state, greedy)

    @staticmethod
    def _vision_time(features, t0: float) -> float:
        # Read after prefill is queued behind the tower, so the wait costs the device nothing.
        if features is None:
            return 0.0
        jax.block_until_ready(features)
        return time.perf_counter() - t0

    def generate(self, params, inputs: ModelInputs, gc: GenerationConfig) -> GenerationResult:
        """The whole decode as one while_loop that stops when every row has its EOS."""
        t0 = time.perf_counter()
        features, state, first = self.start(params, inputs, gc)
        state = self._loop(params, state, gc.greedy)
        vision_s = self._vision_time(features, t0)
        jax.block_until_ready(first)
        t_first = time.perf_counter() - t0
        n, tokens, done = jax.device_get((state.step, state.tokens, state.done))
        return GenerationResult(np.asarray(tokens)[:, :int(n)], np.asarray(done), vision_s, t_first,
                                time.perf_counter() - t0)

    def stream(self, params, inputs: ModelInputs, gc: GenerationConfig) -> Iterator[Token]:
        """Yields a `Token` per step as soon as it is drawn; the next step is already queued
        when a token is read back (one step past the end may be computed and dropped)."""
        t0 = time.perf_counter()
        features, state, pending = self.start(params, inputs, gc)
        vision_s = self._vision_time(features, t0)
        index = 0
        while True:
            ahead = None
            if index + 1 < gc.max_new_tokens:
                state, ahead = self.step(params, state, gc.greedy)
            ids, done = jax.device_get(pending)
            yield Token(np.asarray(ids), np.asarray(done), index, vision_s)
            if ahead is None or done.all():
                return
            pending, index = ahead, index + 1

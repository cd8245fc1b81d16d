"""The decode state the one runner (`engine.Engine`) carries: a typed KV cache and, per row, where
it is, how it samples, whether it is finished and its random key.

A row's context sits in its cache slots [0, pos): prompt tokens (padding among them masked off
by `kv_valid`) then generated ones; the token drawn last is fed at slot `pos` by the next step.
Cache slot j has M-RoPE position j + pos_offset on all three axes. Offline generation keeps a
batch's prompts right-aligned in one bucket (every row then writes at the same slot); the
server's rows each start at slot 0 of their own row (`Engine.insert(pack=True)`).

`advance` is the one place a drawn token is recorded and a row found finished: STOP (one of its
EOS ids) or LENGTH (its max_new-th token); every caller reads `finish` rather than deciding.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from qwen2vl_jax.config import TextConfig
from qwen2vl_jax.modules.text import LayerCache
from qwen2vl_jax.sampling import GenerationConfig, Sampling, sample_token
from qwen2vl_jax.sharding import ShardingRules, named_sharding, shard

# A row's finish code, and the name each has in results and replies (OpenAI's finish_reason).
RUNNING, STOP, LENGTH = 0, 1, 2
FINISH_REASONS = {STOP: "stop", LENGTH: "length"}


# ---------------------------------------------------------------------------- the cache
@flax.struct.dataclass
class KVCache:
    """Keys and values of every decoder layer: k[i], v[i] are [B, S, K, hd] (S cache slots);
    for a scanned decoder (`stacked`), k[0] and v[0] are [n, B, S, K, hd], all n layers in one.
    A `pool` of prompt blocks (prefix caching) has the same form, B blocks of S slots each; its
    blocks are not a batch: they are not split over the data axis.

    The shapes, dtype and logical axes are declared here once; `abstract` gives the shapes for
    eval_shape/AOT, `shardings` the layout on a mesh, `constrain` pins it inside a trace."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    stacked: bool = flax.struct.field(pytree_node=False, default=False)
    pool: bool = flax.struct.field(pytree_node=False, default=False)

    AXES: ClassVar[tuple[str | None, ...]] = ("batch", None, "kv_heads", None)

    @property
    def axes(self) -> tuple[str | None, ...]:
        axes = (None, *self.AXES[1:]) if self.pool else self.AXES
        return (None, *axes) if self.stacked else axes

    @property
    def batch_axis(self) -> int:
        return 1 if self.stacked else 0

    @staticmethod
    def layer_shape(config: TextConfig, batch: int, slots: int) -> tuple[int, int, int, int]:
        return (batch, slots, config.num_key_value_heads, config.head_dim)

    @classmethod
    def _build(cls, config: TextConfig, batch: int, slots: int, stacked: bool, make, pool: bool = False) -> "KVCache":
        shape = cls.layer_shape(config, batch, slots)
        n = config.num_hidden_layers
        if stacked:
            return cls((make((n, *shape)),), (make((n, *shape)),), stacked=True, pool=pool)
        return cls(tuple(make(shape) for _ in range(n)), tuple(make(shape) for _ in range(n)), pool=pool)

    @classmethod
    def abstract(cls, config: TextConfig, batch: int, slots: int, dtype, stacked: bool = False) -> "KVCache":
        return cls._build(config, batch, slots, stacked, lambda shape: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)))

    @classmethod
    def zeros(cls, config: TextConfig, batch: int, slots: int, dtype, stacked: bool = False,
              pool: bool = False) -> "KVCache":
        """A fresh cache (inside a trace: constrained to its layout); pool: `batch` blocks of
        `slots` slots (see the class)."""
        return cls._build(config, batch, slots, stacked, lambda shape: jnp.zeros(shape, dtype), pool).constrain()

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


# ---------------------------------------------------------------------------- per-row settings
@flax.struct.dataclass
class RowSettings:
    """How each of P rows decodes, as host arrays (traced: new values never recompile)."""

    sampling: Sampling  # every field with a leading [P]
    greedy: np.ndarray  # bool[P]: argmax for this row
    max_new: np.ndarray  # int32[P]: the row is finished (LENGTH) with its max_new-th token
    rng: np.ndarray  # uint32[P, 2]: a key per row; or uint32[2]: one key for the whole batch

    @classmethod
    def of(cls, configs: Sequence[GenerationConfig], *, shared_key: bool = False) -> "RowSettings":
        """One row per config. shared_key: one key (the first config's seed) draws for every row
        at once, which is what a seed has always meant for an offline batch; otherwise each row
        draws from its own seed's key, so a served request's tokens do not depend on its
        neighbours."""
        rows = [Sampling.of(generation) for generation in configs]
        sampling = jax.tree.map(lambda *x: np.stack(x), *rows)
        if shared_key:
            rng = np.asarray(jax.random.PRNGKey(configs[0].seed))
        else:
            rng = np.stack([np.asarray(jax.random.PRNGKey(generation.seed)) for generation in configs])
        return cls(sampling, np.array([generation.greedy for generation in configs]),
                   np.array([generation.max_new_tokens for generation in configs], np.int32), rng)

    @classmethod
    def repeat(cls, config: GenerationConfig, rows: int) -> "RowSettings":
        """`rows` rows with the same settings and one shared key (an offline batch)."""
        one = cls.of([config], shared_key=True)
        many = lambda x: np.broadcast_to(x, (rows, *x.shape[1:]))  # noqa: E731
        return one.replace(sampling=jax.tree.map(many, one.sampling), greedy=many(one.greedy),
                           max_new=many(one.max_new))


# ---------------------------------------------------------------------------- decode state
@flax.struct.dataclass
class DecodeState:
    """B rows of S cache slots."""

    cache: KVCache  # [B, S, K, hd] per layer (stacked: [n, B, S, K, hd])
    kv_valid: jax.Array  # bool[B, S]: which slots hold a real token (prompt padding does not)
    pos: jax.Array  # int32[B]: the slot `token` is written to by the next step
    pos_offset: jax.Array  # int32[B]: the M-RoPE position of slot j is j + pos_offset
    token: jax.Array  # int32[B]: the last token drawn (the row's pad once it is finished)
    logits: jax.Array  # f32[B, V]: the logits it was drawn from; f32[B, 0] in a state that keeps none (the server's)
    seen: jax.Array  # bool[B, V]: tokens of the prompt or drawn (repetition penalty)
    generated: jax.Array  # int32[B]: tokens drawn while the row was running
    finish: jax.Array  # int32[B]: RUNNING, STOP or LENGTH
    greedy: jax.Array  # bool[B]
    max_new: jax.Array  # int32[B]
    rng: jax.Array  # uint32[B, 2] (a key per row) or uint32[2] (one for the batch): split every draw
    sampling: Sampling  # every field with a leading [B]

    @property
    def shared_key(self) -> bool:
        return self.rng.ndim == 1

    def rows(self, fn, *others: "DecodeState") -> "DecodeState":
        """fn(array, its batch axis, *the same field of `others`) on every per-row field: the
        batch axis is 0 everywhere but in a scanned decoder's stacked cache; a batch's shared
        key is no row's and is left as it is."""
        ax = self.cache.batch_axis
        cache = jax.tree.map(lambda a, *o: fn(a, ax, *o), self.cache, *(x.cache for x in others))
        strip = lambda s: s.replace(cache=None, rng=None)  # noqa: E731
        rest = jax.tree.map(lambda a, *o: fn(a, 0, *o), strip(self), *map(strip, others))
        rng = self.rng if self.shared_key else fn(self.rng, 0, *(x.rng for x in others))
        return rest.replace(cache=cache, rng=rng)

    def constrain(self) -> "DecodeState":
        """Pins the layout of the batch-major fields (a no-op without a mesh)."""
        return self.replace(
            cache=self.cache.constrain(), kv_valid=shard(self.kv_valid, "batch", None),
            logits=shard(self.logits, "batch", "vocab"), seen=shard(self.seen, "batch", None),
            pos_offset=shard(self.pos_offset, "batch"),
            # What the host reads back stays replicated, so every process can read it.
            token=shard(self.token, None), finish=shard(self.finish, None),
        )

    def readout(self) -> tuple[jax.Array, jax.Array]:
        """(token int32[B], finish int32[B]) as fresh arrays: the host reads them while the
        state itself is donated to the next step."""
        return jnp.copy(self.token), jnp.copy(self.finish)


def split_keys(rng):
    """(the keys to carry, the keys to draw with), for one shared key [2] or a key per row [B, 2]."""
    if rng.ndim == 1:
        return tuple(jax.random.split(rng))
    both = jax.vmap(jax.random.split)(rng)  # [B, 2, 2]
    return both[:, 0], both[:, 1]


def unpack_mask(words, vocab: int):
    """An allowed-token bitmask int32[B, W] (bit j of word i: token 32 i + j may be drawn, the
    layout grammar engines fill) -> bool[B, vocab]."""
    bits = (words[:, :, None] >> jnp.arange(32, dtype=words.dtype)) & 1
    return bits.reshape(words.shape[0], -1)[:, :vocab].astype(bool)


def mask_words(vocab: int) -> int:
    """The int32 words of one row's allowed-token bitmask."""
    return -(-vocab // 32)


def token_logprobs(logits, tokens, k: int):
    """The model's own distribution (log-softmax of the float32 logits, before any penalty,
    temperature, top-k/top-p or grammar mask): (logprob of `tokens` f32[B], the k most likely
    ids int32[B, k] and their logprobs f32[B, k])."""
    lsm = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lsm, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(lsm, k)
    return chosen, top_ids.astype(jnp.int32), top_lp


def advance(state: DecodeState, logits, greedy: bool | None, allow=None) -> DecodeState:
    """Draws every row's next token from `logits` f32[B, V] and records it; the one place a row
    is found finished. greedy: True when every row is argmax, False when every row samples
    (both fixed when compiled), None to follow each row's flag. allow: None, or each row's
    allowed tokens as a bitmask int32[B, W] (`unpack_mask`; a row with every bit set is
    unconstrained), applied before the penalty and the draw. A finished row draws its pad."""
    rng, keys = split_keys(state.rng)
    raw = logits
    if allow is not None:
        logits = jnp.where(unpack_mask(allow, logits.shape[-1]), logits, -jnp.inf)
    tok = sample_token(logits, state.seen, state.sampling, keys, state.greedy if greedy is None else greedy)
    running = state.finish == RUNNING
    tok = jnp.where(running, tok, state.sampling.pad)
    generated = state.generated + running
    is_eos = jnp.any(tok[:, None] == state.sampling.eos, axis=-1)
    finish = jnp.where(~running, state.finish,
                       jnp.where(is_eos, STOP, jnp.where(generated >= state.max_new, LENGTH, RUNNING)))
    seen = state.seen.at[jnp.arange(tok.shape[0]), tok].set(True)
    keep = raw if state.logits.shape[-1] else state.logits  # a state without logits stays without: no copy per step
    return state.replace(token=tok, logits=keep, seen=seen, generated=generated, finish=finish.astype(jnp.int32),
                         rng=rng)

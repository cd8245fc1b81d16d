"""The Qwen2 decoder with chunked M-RoPE and a fixed-size KV cache.

Shapes: B batch, L new tokens, S cache slots (S == L without a cache), H query heads,
K key/value heads, hd head dim, D hidden.

Attention is masked by slot: a query in slot q sees key slot s when s <= q and s holds a real
token (`kv_valid`). Left padding therefore needs no special case, and prefill, decode and the
plain forward are the same code.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen2vl_jax.config import TextConfig
from qwen2vl_jax.lora.layer import A as LORA_A, DROPOUT as LORA_DROPOUT, LEAVES as LORA_LEAVES, lora_delta
from qwen2vl_jax.modules.attention import attention_kernel, backend_field, dense_dot, fused_attention, masked_softmax
from qwen2vl_jax.quant.cpu import FEW_ROWS
from qwen2vl_jax.quant.format import RUNTIME_PARTS
from qwen2vl_jax.quant.matmul import embed_attend, embed_lookup, matmul
from qwen2vl_jax.modules.rope import apply_rotary, mrope_cos_sin
from qwen2vl_jax.sharding import gathered_packed, shard


class LayerCache(NamedTuple):
    k: jax.Array  # [B, S, K, hd]
    v: jax.Array  # [B, S, K, hd]


class StackedLayerCache(NamedTuple):
    """Every layer's cache in one pair, as a scanned decoder carries it; `layer` is the one a
    layer call reads and writes. Only the new keys are written (in place, in the loop's carry)
    and only the attended slots are read, so a step never copies the whole cache."""

    k: jax.Array  # [n, B, S, K, hd]
    v: jax.Array  # [n, B, S, K, hd]
    layer: jax.Array  # int32[]


def write_cache(cache, new, index):
    """cache [B, S, K, hd] with new [B, L, K, hd] written from slot `index`: a scalar (every row
    at the same slot) or int32[B] (each row at its own slot, as continuous batching needs)."""
    new = new.astype(cache.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, index, axis=1)
    row = lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis=0)  # noqa: E731
    return jax.vmap(row)(cache, new, index)


def write_stacked(cache, new, layer, index):
    """cache [n, B, S, K, hd] with new [B, L, K, hd] written into layer `layer` from slot
    `index` (a scalar, or int32[B]: each row at its own slot)."""
    new = new.astype(cache.dtype)
    zero = jnp.zeros((), jnp.int32)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(cache, new[None], (layer, zero, index, zero, zero))
    # One scatter, which XLA updates in place inside the loop (a vmapped dynamic_update_slice
    # there copied the whole cache: 16 rows of 4096 slots, 4 layers: 248 ms against 1.3 ms).
    b, l = new.shape[:2]
    slots = index[:, None] + jnp.arange(l)
    return cache.at[layer, jnp.arange(b)[:, None], slots].set(new, mode="promise_in_bounds")


def read_stacked(cache, layer, slots: int):
    """Layer `layer`'s first `slots` cache slots: [B, slots, K, hd]."""
    _, b, _, kh, hd = cache.shape
    zero = jnp.zeros((), jnp.int32)
    return jax.lax.dynamic_slice(cache, (layer, zero, zero, zero, zero), (1, b, slots, kh, hd))[0]


class Linear(nn.Dense):
    """nn.Dense that also takes a packed quantized weight (quant/format.py) in place of `kernel`,
    as stored or in its CPU form (`quant.cpu.cpu_layout`), and a LoRA adapter beside either
    (lora/layer.py): the params decide, so one module serves float, quantized and adapted
    checkpoints; `backend` picks the packed product's kernel."""

    backend: str = backend_field()
    matmul: str = "f32"  # the large products' precision (modules/attention.py), packed weights' too

    @nn.compact
    def __call__(self, inputs):
        if not self.has_variable("params", "qweight"):
            return adapted(self, inputs, super().__call__(inputs))
        leaves = {k: self.get_variable("params", k) for k in RUNTIME_PARTS if self.has_variable("params", k)}
        leaves = gathered_packed(leaves, "/".join(self.path))
        y = matmul(inputs, leaves, self.dtype, self.backend, products=self.matmul)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(self.dtype)
        return adapted(self, inputs, y)


def adapted(module: nn.Module, x, y):
    """y plus the LoRA term of x when `module`'s params hold an adapter (lora/layer.py); its
    dropout runs only when the caller passes a "dropout" rng (training)."""
    if not module.has_variable("params", LORA_A):
        return y
    leaves = {k: module.get_variable("params", k) for k in LORA_LEAVES if module.has_variable("params", k)}
    rng = module.make_rng("dropout") if LORA_DROPOUT in leaves and module.has_rng("dropout") else None
    return y + lora_delta(x, leaves, module.dtype, rng)


class Embed(nn.Embed):
    """nn.Embed that also takes a packed int8 table (quant/format.py: qweight [V, D], scales
    [V, 1]); `attend` is the tied output head, with the product for `backend`."""

    backend: str = backend_field()

    def setup(self):
        if self.has_variable("params", "qweight"):
            self.packed = {k: self.get_variable("params", k) for k in ("qweight", "scales")}
        else:
            super().setup()

    def __call__(self, inputs):
        if self.has_variable("params", "qweight"):
            return embed_lookup(inputs, self.packed, self.dtype)
        return super().__call__(inputs)

    def attend(self, query):
        if self.has_variable("params", "qweight"):
            return embed_attend(query, self.packed, self.dtype, self.backend)
        rows = math.prod(query.shape[:-1])
        if self.backend != "cpu" or rows == 1 or rows > FEW_ROWS:
            return super().attend(query)
        # A few rows (batched decoding) on CPU: XLA's product with the [V, D] table written
        # straight into [rows, V] picks a slow kernel; into [V, rows], kept apart from the
        # transpose by a barrier, it takes a much faster one.
        q = query.reshape(rows, query.shape[-1]).astype(self.dtype)
        table = jnp.asarray(self.embedding, self.dtype)
        out = jax.lax.optimization_barrier(jnp.dot(table, q.T)).T
        return out.reshape(*query.shape[:-1], -1)


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        # As HF: normalise in f32, cast back, then scale in the weight's dtype.
        return (scale.astype(self.dtype) * xf.astype(x.dtype)).astype(self.dtype)


def attend(q, k, v, mask, dtype, aligned: bool = False, kernel: str = "auto", backend: str = "cpu"):
    """q [B, L, H, hd], k/v [B, S, K, hd], mask bool[B, L, S] -> [B, L, H, hd].

    Grouped-query attention without repeating K/V; softmax in f32. Fully masked rows (left
    padding) get a uniform, finite distribution rather than NaN. `aligned`: query i sits in key
    slot i (a prefill from slot 0), so the fused kernel may skip the blocks above the diagonal.
    kernel, backend: the attention kernel choice and the platform it is for (modules/attention.py).
    """
    b, l, h, hd = q.shape
    if attention_kernel(kernel, dtype, l, hd, backend) == "cudnn":
        return fused_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask[:, None], causal=aligned)
    kh = k.shape[2]
    qg = q.reshape(b, l, kh, h // kh, hd)
    logits = jnp.einsum("blkgd,bskd->bkgls", qg, k) * (hd**-0.5)
    probs = masked_softmax(logits, mask[:, None, None], dtype)
    out = jnp.einsum("bkgls,bskd->blkgd", probs, v)
    return out.reshape(b, l, h, hd)


class Attention(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32
    attention: str = "auto"  # the kernel: auto, xla or cudnn (modules/attention.py)
    matmul: str = "f32"  # the large products' precision: f32 or bf16 (modules/attention.py)
    backend: str = backend_field()  # the platform the program is built for (modules/attention.py)

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache: LayerCache | None, cache_index):
        cfg = self.config
        b, l, _ = x.shape
        h, kh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dense = lambda n, name, bias=True: Linear(n, use_bias=bias, dtype=self.dtype,  # noqa: E731
                                                  dot_general=dense_dot(self.matmul), matmul=self.matmul,
                                                  backend=self.backend, name=name)
        if self.has_variable("params", "qkv_proj"):  # params.fuse_projections: one matmul for the three
            q, k, v = jnp.split(dense((h + 2 * kh) * hd, "qkv_proj")(x), [h * hd, (h + kh) * hd], axis=-1)
        else:
            q, k, v = (dense(n * hd, name)(x) for n, name in ((h, "q_proj"), (kh, "k_proj"), (kh, "v_proj")))
        q, k, v = q.reshape(b, l, h, hd), k.reshape(b, l, kh, hd), v.reshape(b, l, kh, hd)
        q = shard(q, "batch", "seq", "heads", "head_dim")
        k = shard(k, "batch", "seq", "kv_heads", "head_dim")
        v = shard(v, "batch", "seq", "kv_heads", "head_dim")
        # HF casts cos/sin to the activation dtype before rotating.
        cos_, sin_ = cos[:, :, None].astype(self.dtype), sin[:, :, None].astype(self.dtype)
        q, k = apply_rotary(q, cos_, sin_), apply_rotary(k, cos_, sin_)
        n = mask.shape[-1]  # a mask over fewer slots than the cache holds: attend over those only
        if isinstance(cache, StackedLayerCache):
            new_cache = cache._replace(k=write_stacked(cache.k, k, cache.layer, cache_index),
                                       v=write_stacked(cache.v, v, cache.layer, cache_index))
            k = read_stacked(new_cache.k, cache.layer, n).astype(self.dtype)
            v = read_stacked(new_cache.v, cache.layer, n).astype(self.dtype)
        elif cache is not None:
            k_all = write_cache(cache.k, k, cache_index)
            v_all = write_cache(cache.v, v, cache_index)
            new_cache = LayerCache(k_all, v_all)
            if n < k_all.shape[1]:
                k_all, v_all = k_all[:, :n], v_all[:, :n]
            k, v = k_all.astype(self.dtype), v_all.astype(self.dtype)
        else:
            new_cache = None
        aligned = isinstance(cache_index, int) and cache_index == 0
        out = attend(q, k, v, mask, self.dtype, aligned, self.attention, self.backend).reshape(b, l, h * hd)
        return dense(cfg.hidden_size, "o_proj", bias=False)(out), new_cache


class Mlp(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32
    matmul: str = "f32"
    backend: str = backend_field()

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda n, name: Linear(n, use_bias=False, dtype=self.dtype, dot_general=dense_dot(self.matmul),  # noqa: E731
                                       matmul=self.matmul, backend=self.backend, name=name)
        if self.has_variable("params", "gate_up_proj"):  # params.fuse_projections
            gate, up = jnp.split(dense(2 * cfg.intermediate_size, "gate_up_proj")(x), 2, axis=-1)
        else:
            gate, up = dense(cfg.intermediate_size, "gate_proj")(x), dense(cfg.intermediate_size, "up_proj")(x)
        gate, up = shard(gate, "batch", "seq", "mlp"), shard(up, "batch", "seq", "mlp")
        return dense(cfg.hidden_size, "down_proj")(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32
    attention: str = "auto"
    matmul: str = "f32"
    backend: str = backend_field()

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache, cache_index):
        eps = self.config.rms_norm_eps
        y = RMSNorm(eps, self.dtype, name="input_layernorm")(x)
        y, cache = Attention(self.config, self.dtype, self.attention, self.matmul, self.backend, name="self_attn")(y, cos, sin, mask, cache, cache_index)
        x = x + y
        y = RMSNorm(eps, self.dtype, name="post_attention_layernorm")(x)
        x = x + Mlp(self.config, self.dtype, self.matmul, self.backend, name="mlp")(y)
        return shard(x, "batch", "seq", "embed"), cache


class TextModel(nn.Module):
    """embed_tokens, layers_i (or the stacked `layers`), norm: the HF `model` (language_model) subtree."""

    config: TextConfig
    dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "auto"
    matmul: str = "f32"
    scan_layers: bool = False  # the layers as one scanned layer (params stacked: params.stack_layers)
    backend: str = backend_field()  # the platform the program is built for (modules/attention.py)

    def setup(self):
        cfg = self.config
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, backend=self.backend)
        layer_cls = nn.remat(DecoderLayer, static_argnums=()) if self.remat else DecoderLayer
        if self.scan_layers:
            # One layer, traced and compiled once and run n times by lax.scan (`__call__`) over
            # the stacked params (model/layers/X [n, ...]).
            self.layers = layer_cls(cfg, self.dtype, self.attention, self.matmul, self.backend)
        else:
            self.layers = [layer_cls(cfg, self.dtype, self.attention, self.matmul, self.backend)
                           for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def __call__(self, embeds, positions, kv_valid, cache=None, cache_index=0):
        """embeds [B, L, D]; positions int[3, B, L]; kv_valid bool[B, C] (C <= S: attention
        reads the cache's first C slots, new keys are written wherever cache_index says), or,
        without a cache, int segment ids [B, L] (packed training rows: a token sees the earlier
        tokens of its own segment only; 0 is padding);
        cache: tuple of LayerCache (one per layer), with scan_layers one LayerCache of
        [n, B, S, K, hd] arrays, or None -> (hidden [B, L, D], the new cache in the same form)."""
        cfg = self.config
        b, l, _ = embeds.shape
        cos, sin = mrope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
        index = jnp.asarray(cache_index)
        q_slot = (index[:, None] if index.ndim else index) + jnp.arange(l)  # [L], or [B, L] per row
        k_slot = jnp.arange(kv_valid.shape[1])
        if jnp.issubdtype(kv_valid.dtype, jnp.integer):  # segment ids: records packed in a row
            mask = ((k_slot <= q_slot[..., None]) & (kv_valid[:, None, :] == kv_valid[:, :, None])
                    & (kv_valid[:, None, :] > 0))  # [B, L, L]
        else:
            mask = (k_slot <= q_slot[..., None]) & kv_valid[:, None, :]  # [B, L, S]
        x = shard(embeds.astype(self.dtype), "batch", "seq", "embed")
        if self.scan_layers:
            # The stacked cache [n, B, S, K, hd] rides in the carry: each layer writes its new
            # keys into it and reads its own slots back (StackedLayerCache).
            def body(layer, carry, cos, sin, mask, cache_index):
                x, stacked = carry
                view = None if stacked is None else StackedLayerCache(*stacked)
                x, view = layer(x, cos, sin, mask, view, cache_index)
                return (x, None if view is None else (view.k, view.v, view.layer + 1)), None

            scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                           in_axes=(nn.broadcast,) * 4, length=cfg.num_hidden_layers)
            start = None if cache is None else (cache.k, cache.v, jnp.zeros((), jnp.int32))
            with jax.named_scope("decoder_layers"):
                (x, stacked), _ = scan(self.layers, (x, start), cos, sin, mask, cache_index)
            return self.norm(x), (None if stacked is None else LayerCache(stacked[0], stacked[1]))
        new_cache = []
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"decoder_layer_{i}"):
                x, c = layer(x, cos, sin, mask, None if cache is None else cache[i], cache_index)
            new_cache.append(c)
        return self.norm(x), (tuple(new_cache) if cache is not None else None)

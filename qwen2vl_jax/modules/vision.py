"""The vision tower (ViT with 2D RoPE) and the patch merger.

Patches arrive flattened ([N, C*T*P*P], already in 2x2 merge order) together with a segment
layout built on the host (`qwen2vl_jax.inputs.vision_layout`): attention runs inside each segment (one image, or
one temporal slice of a video) on a padded [S, Lmax] grid, so the cost is S * Lmax^2 rather than
N^2 and no N x N mask is ever built.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen2vl_jax.config import VisionConfig
from qwen2vl_jax.modules.attention import attention_kernel, backend_field, dense_dot, fused_attention, masked_softmax
from qwen2vl_jax.modules.rope import apply_rotary, vision_cos_sin
from qwen2vl_jax.modules.text import Linear
from qwen2vl_jax.sharding import shard


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


class VisionAttention(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32
    attention: str = "auto"  # the kernel: auto, xla or cudnn (modules/attention.py)
    matmul: str = "f32"  # the large products' precision: f32 or bf16 (modules/attention.py)
    backend: str = backend_field()  # the platform the program is built for (modules/attention.py)

    @nn.compact
    def __call__(self, x, cos, sin, gather, valid, scatter):
        """x: [N, D]; cos/sin: f32[N, hd]; gather/valid: [S, Lmax]; scatter: [N] -> [N, D]."""
        cfg = self.config
        n, d = x.shape
        h, hd = cfg.num_heads, cfg.head_dim
        qkv = Linear(3 * d, dtype=self.dtype, dot_general=dense_dot(self.matmul), name="qkv")(x).reshape(n, 3, h, hd)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [N, H, hd]
        q = apply_rotary(q, cos[:, None], sin[:, None]).astype(self.dtype)
        k = apply_rotary(k, cos[:, None], sin[:, None]).astype(self.dtype)
        # Regroup into segments: [S, Lmax, H, hd].
        qs, ks, vs = q[gather], k[gather], v[gather]
        if attention_kernel(self.attention, self.dtype, qs.shape[1], hd, self.backend) == "cudnn":
            # Real patches fill a prefix of each segment, so a length per segment is the mask.
            out = fused_attention(qs, ks, vs, lengths=jnp.sum(valid, axis=1, dtype=jnp.int32))
        else:
            logits = jnp.einsum("slhd,smhd->shlm", qs, ks) * (hd**-0.5)
            probs = masked_softmax(logits, valid[:, None, None, :], self.dtype)
            out = jnp.einsum("shlm,smhd->slhd", probs, vs)
        out = out.reshape(-1, h * hd)[scatter]  # back to patch order: [N, D]
        return Linear(d, dtype=self.dtype, dot_general=dense_dot(self.matmul), name="proj")(out)


class VisionMlp(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32
    matmul: str = "f32"

    @nn.compact
    def __call__(self, x):
        x = Linear(self.config.mlp_dim, dtype=self.dtype, dot_general=dense_dot(self.matmul), name="fc1")(x)
        x = shard(x, "patches", "mlp")
        return Linear(self.config.embed_dim, dtype=self.dtype, dot_general=dense_dot(self.matmul), name="fc2")(quick_gelu(x))


class VisionBlock(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32
    attention: str = "auto"
    matmul: str = "f32"
    backend: str = backend_field()

    @nn.compact
    def __call__(self, x, cos, sin, gather, valid, scatter):
        eps = self.config.layer_norm_eps
        y = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="norm1")(x)
        x = x + VisionAttention(self.config, self.dtype, self.attention, self.matmul, self.backend, name="attn")(y, cos, sin, gather, valid, scatter)
        y = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="norm2")(x)
        return x + VisionMlp(self.config, self.dtype, self.matmul, name="mlp")(y)


class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride is a matmul over the flattened patch."""

    config: VisionConfig
    dtype: Any = jnp.float32
    matmul: str = "f32"

    @nn.compact
    def __call__(self, patches):
        return Linear(self.config.embed_dim, use_bias=False, dtype=self.dtype, dot_general=dense_dot(self.matmul),
                        name="proj")(
            patches.astype(self.dtype)
        )


class PatchMerger(nn.Module):
    """LayerNorm -> concatenate each 2x2 group of patches -> MLP (erf GELU) to the LLM width."""

    config: VisionConfig
    dtype: Any = jnp.float32
    matmul: str = "f32"

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="ln_q")(x)
        width = cfg.embed_dim * cfg.merge_unit
        x = x.reshape(-1, width)
        x = Linear(width, dtype=self.dtype, dot_general=dense_dot(self.matmul), name="mlp_0")(x)
        x = jax.nn.gelu(x, approximate=False)
        return Linear(cfg.out_hidden_size, dtype=self.dtype, dot_general=dense_dot(self.matmul), name="mlp_2")(x)


class VisionTransformer(nn.Module):
    """patches f32[N, C*T*P*P] + layout -> merged features [N / merge_unit, out_hidden_size]."""

    config: VisionConfig
    dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "auto"
    matmul: str = "f32"
    backend: str = backend_field()

    @nn.compact
    def __call__(self, patches, pos_hw, gather, valid, scatter):
        cfg = self.config
        x = PatchEmbed(cfg, self.dtype, self.matmul, name="patch_embed")(patches)
        x = shard(x, "patches", "embed")
        cos, sin = vision_cos_sin(pos_hw, cfg.head_dim, cfg.rope_theta)
        block_cls = nn.remat(VisionBlock) if self.remat else VisionBlock
        for i in range(cfg.depth):
            with jax.named_scope(f"vision_block_{i}"):
                x = block_cls(cfg, self.dtype, self.attention, self.matmul, self.backend, name=f"blocks_{i}")(x, cos, sin, gather, valid, scatter)
        return PatchMerger(cfg, self.dtype, self.matmul, name="merger")(x)

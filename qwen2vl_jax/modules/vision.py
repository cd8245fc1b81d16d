"""The vision tower (ViT with 2D RoPE) and the patch merger.

Patches arrive flattened ([N, C*T*P*P], already in 2x2 merge order) together with a segment
layout built on the host (`vision_layout`): attention runs inside each segment (one image, or
one temporal slice of a video) on a padded [S, Lmax] grid, so the cost is S * Lmax^2 rather than
N^2 and no N x N mask is ever built.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax.config import VisionConfig
from qwen2vl_jax.modules.attention import attention_kernel, fused_attention, masked_softmax
from qwen2vl_jax.modules.rope import apply_rotary, vision_cos_sin
from qwen2vl_jax.sharding import shard


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def vision_layout(
    grid_thw: np.ndarray,
    merge_size: int,
    *,
    num_patches: int | None = None,
    num_segments: int | None = None,
    segment_len: int | None = None,
) -> dict[str, np.ndarray]:
    """Host-side index arrays for a batch of images/videos (vectorised numpy).

    grid_thw: int[n, 3] patch grids, in the order their patches are concatenated.
    The optional sizes pad the layout to fixed shapes (buckets); padding patches belong to no
    segment and padding segments attend to nothing real.

    Returns:
      pos_hw:  int32[N, 2]       row/column of each patch (for the 2D rotary embedding)
      gather:  int32[S, Lmax]    patch index at each slot of each segment
      valid:   bool[S, Lmax]     which slots hold a real patch
      scatter: int32[N]          flat slot (s * Lmax + l) of each patch
    """
    grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    m = merge_size
    if ((grid_thw[:, 1:] % m) != 0).any():
        bad = grid_thw[((grid_thw[:, 1:] % m) != 0).any(axis=1)][0]
        raise_input(f"grid_thw {bad.tolist()}: height and width must be multiples of the merge size {m}")
    seg_lens = np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])  # one per temporal slice
    n_real = int(seg_lens.sum())
    N = n_real if num_patches is None else num_patches
    S = len(seg_lens) if num_segments is None else num_segments
    L = int(seg_lens.max(initial=1)) if segment_len is None else segment_len
    if N < n_real or S < len(seg_lens) or L < seg_lens.max(initial=0):
        raise ValueError(f"vision layout ({N} patches, {S} segments of {L}) is too small for grids {grid_thw.tolist()}")

    # Row/column of every patch, in merge order: within each image, 2x2 blocks are contiguous.
    pos_parts = []
    for t, h, w in grid_thw:  # one iteration per image/video, vectorised inside
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blk = (h // m, m, w // m, m)
        hh = hh.reshape(blk).transpose(0, 2, 1, 3).reshape(-1)
        ww = ww.reshape(blk).transpose(0, 2, 1, 3).reshape(-1)
        pos_parts.append(np.tile(np.stack([hh, ww], axis=-1), (t, 1)))
    pos_hw = np.zeros((N, 2), np.int32)
    if pos_parts:
        pos_hw[:n_real] = np.concatenate(pos_parts)

    starts = np.concatenate([[0], np.cumsum(seg_lens)[:-1]]).astype(np.int64)
    slot = np.arange(L)
    gather = np.zeros((S, L), np.int32)
    valid = np.zeros((S, L), bool)
    gather[: len(seg_lens)] = np.where(slot < seg_lens[:, None], starts[:, None] + slot, 0)
    valid[: len(seg_lens)] = slot < seg_lens[:, None]
    seg_of_patch = np.repeat(np.arange(len(seg_lens)), seg_lens)
    scatter = np.zeros((N,), np.int32)
    scatter[:n_real] = seg_of_patch * L + (np.arange(n_real) - starts[seg_of_patch])
    return {"pos_hw": pos_hw, "gather": gather, "valid": valid, "scatter": scatter}


def raise_input(msg: str):
    from qwen2vl_jax.errors import InputError

    raise InputError(msg)


class VisionAttention(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, gather, valid, scatter):
        """x: [N, D]; cos/sin: f32[N, hd]; gather/valid: [S, Lmax]; scatter: [N] -> [N, D]."""
        cfg = self.config
        n, d = x.shape
        h, hd = cfg.num_heads, cfg.head_dim
        qkv = nn.Dense(3 * d, dtype=self.dtype, name="qkv")(x).reshape(n, 3, h, hd)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [N, H, hd]
        q = apply_rotary(q, cos[:, None], sin[:, None]).astype(self.dtype)
        k = apply_rotary(k, cos[:, None], sin[:, None]).astype(self.dtype)
        # Regroup into segments: [S, Lmax, H, hd].
        qs, ks, vs = q[gather], k[gather], v[gather]
        if attention_kernel(self.dtype, qs.shape[1], hd) == "cudnn":
            # Real patches fill a prefix of each segment, so a length per segment is the mask.
            out = fused_attention(qs, ks, vs, lengths=jnp.sum(valid, axis=1, dtype=jnp.int32))
        else:
            logits = jnp.einsum("slhd,smhd->shlm", qs, ks) * (hd**-0.5)
            probs = masked_softmax(logits, valid[:, None, None, :], self.dtype)
            out = jnp.einsum("shlm,smhd->slhd", probs, vs)
        out = out.reshape(-1, h * hd)[scatter]  # back to patch order: [N, D]
        return nn.Dense(d, dtype=self.dtype, name="proj")(out)


class VisionMlp(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.config.mlp_dim, dtype=self.dtype, name="fc1")(x)
        x = shard(x, "patches", "mlp")
        return nn.Dense(self.config.embed_dim, dtype=self.dtype, name="fc2")(quick_gelu(x))


class VisionBlock(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, gather, valid, scatter):
        eps = self.config.layer_norm_eps
        y = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="norm1")(x)
        x = x + VisionAttention(self.config, self.dtype, name="attn")(y, cos, sin, gather, valid, scatter)
        y = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="norm2")(x)
        return x + VisionMlp(self.config, self.dtype, name="mlp")(y)


class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride is a matmul over the flattened patch."""

    config: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, patches):
        return nn.Dense(self.config.embed_dim, use_bias=False, dtype=self.dtype, name="proj")(
            patches.astype(self.dtype)
        )


class PatchMerger(nn.Module):
    """LayerNorm -> concatenate each 2x2 group of patches -> MLP (erf GELU) to the LLM width."""

    config: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="ln_q")(x)
        width = cfg.embed_dim * cfg.merge_unit
        x = x.reshape(-1, width)
        x = nn.Dense(width, dtype=self.dtype, name="mlp_0")(x)
        x = jax.nn.gelu(x, approximate=False)
        return nn.Dense(cfg.out_hidden_size, dtype=self.dtype, name="mlp_2")(x)


class VisionTransformer(nn.Module):
    """patches f32[N, C*T*P*P] + layout -> merged features [N / merge_unit, out_hidden_size]."""

    config: VisionConfig
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, patches, pos_hw, gather, valid, scatter):
        cfg = self.config
        x = PatchEmbed(cfg, self.dtype, name="patch_embed")(patches)
        x = shard(x, "patches", "embed")
        cos, sin = vision_cos_sin(pos_hw, cfg.head_dim, cfg.rope_theta)
        block_cls = nn.remat(VisionBlock) if self.remat else VisionBlock
        for i in range(cfg.depth):
            with jax.named_scope(f"vision_block_{i}"):
                x = block_cls(cfg, self.dtype, name=f"blocks_{i}")(x, cos, sin, gather, valid, scatter)
        return PatchMerger(cfg, self.dtype, name="merger")(x)

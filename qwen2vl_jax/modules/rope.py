"""Rotary embeddings: the vision tower's 2D (h, w) form and the decoder's chunked M-RoPE.

Angles, cos and sin are computed in float32 whatever the compute dtype, as in HF.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp


def inv_freq(dim: int, theta: float) -> np.ndarray:
    """1 / theta^(2i/dim) for i < dim/2, rounded as HF's float32 torch code rounds it: the
    exponent 2i/dim in float32, the power rounded to float32, the reciprocal in float32.
    (torch's float32 pow is not always correctly rounded: about 1% of entries over all widths
    still differ in the last bit, one of the 64 of the 2B/7B decoder's table; none of the
    vision tower's.)"""
    exponent = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    power = (np.float64(np.float32(theta)) ** exponent.astype(np.float64)).astype(np.float32)
    return np.float32(1.0) / power


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x * cos + rotate_half(x) * sin, computed in the dtype of cos/sin."""
    x = x.astype(cos.dtype)
    return x * cos + rotate_half(x) * sin


def vision_cos_sin(pos_hw: jnp.ndarray, head_dim: int, theta: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """2D rotary tables for vision patches.

    pos_hw: int[N, 2] (row, column) of each patch. Returns cos, sin: f32[N, head_dim]. Half the
    rotated pairs follow the row, half the column; the same frequencies serve both axes.
    """
    freqs = jnp.asarray(inv_freq(head_dim // 2, theta))  # [head_dim/4]
    pos = pos_hw.astype(jnp.float32)
    ang = jnp.concatenate([pos[:, 0:1] * freqs, pos[:, 1:2] * freqs], axis=-1)  # [N, head_dim/2]
    emb = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def mrope_cos_sin(
    positions: jnp.ndarray, head_dim: int, theta: float, mrope_section: tuple[int, int, int]
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Chunked multimodal RoPE tables.

    positions: int[3, B, L] (temporal, height, width). Frequency i takes its position from the
    axis whose chunk of `mrope_section` holds i (Qwen2-VL's chunked layout, not Qwen3's
    interleaved one); both halves of the head use the same assignment.
    Returns cos, sin: f32[B, L, head_dim].
    """
    freqs = jnp.asarray(inv_freq(head_dim, theta))  # [head_dim/2]
    axis_of_freq = np.repeat(np.arange(3), np.asarray(mrope_section))  # static [head_dim/2]
    pos = positions.astype(jnp.float32)[axis_of_freq]  # [head_dim/2, B, L]
    ang = jnp.moveaxis(pos, 0, -1) * freqs  # [B, L, head_dim/2]
    emb = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)

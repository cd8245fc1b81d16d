"""The low-rank term a projection adds to its output, traced inside the model."""

from __future__ import annotations

import jax
import jax.numpy as jnp

A, B, SCALE, DROPOUT = "lora_a", "lora_b", "lora_scale", "lora_dropout"
LEAVES = (A, B, SCALE, DROPOUT)


def lora_delta(x, leaves: dict, dtype, rng=None):
    """x [..., I] -> dropout(x) @ A @ B * scale [..., O] in `dtype`: PEFT's LoRA term. leaves:
    the module's lora_a [I, r], lora_b [r, O], lora_scale [] (and lora_dropout [], the rate);
    rng: a key when training (dropout applies only then, as torch's in train mode)."""
    if rng is not None and DROPOUT in leaves:
        rate = leaves[DROPOUT].astype(jnp.float32)
        keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros((), x.dtype))
    h = jnp.dot(x.astype(dtype), leaves[A].astype(dtype))  # [..., r]
    return jnp.dot(h, leaves[B].astype(dtype)) * leaves[SCALE].astype(dtype)

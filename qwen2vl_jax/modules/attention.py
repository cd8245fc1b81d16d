"""What the vision and text attentions share."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_softmax(logits: jax.Array, mask: jax.Array, dtype) -> jax.Array:
    """Softmax over the last axis in f32, masked positions excluded, cast to `dtype`.

    Masked logits get the smallest finite f32 rather than -inf, so a row with nothing to attend
    to (left padding, padding segments) becomes a uniform, finite distribution instead of NaN,
    and no NaN can leak into real rows through the values it would multiply.
    """
    logits = jnp.where(mask, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1).astype(dtype)

"""What the vision and text layers share: the masked softmax, the choice of attention kernel,
and the precision of the large matrix products.

Two kernels compute the same attention:
  "xla"    einsums and a masked f32 softmax (below). Exact in f32; used on CPU, for f32 models,
           and for one-token decode steps, where a fused kernel gains nothing.
  "cudnn"  cuDNN's fused flash attention (`jax.nn.dot_product_attention(implementation=
           "cudnn")`) for bf16/f16 prefill and vision on NVIDIA GPUs: the [.., L, S] logits are
           never written to memory.
The choice is a static field of the modules (`attention`: "auto", "xla" or "cudnn"), fixed when
a model is loaded, so a different choice is a different module and jit traces it anew;
`attention_kernel` resolves "auto" from the dtype, the shape and the modules' `backend`.

`backend` ("cpu", "gpu" or "tpu") is the platform the modules' programs are built for, also a
static field fixed at load (`backend_field`): it picks cuDNN for "auto" attention on "gpu" and
the CPU kernels of packed weights (quant/matmul.py) on "cpu". It is never read from
`jax.default_backend()` while tracing, so a program lowered for TPU on a CPU host (AOT
compilation for a slice) is the TPU program.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qwen2vl_jax.quant.cpu import BF16_MIN_ROWS  # one threshold for float and packed products

BACKENDS = ("cpu", "gpu", "tpu")


def backend_field():
    """The `backend` field of a module: the platform its programs are built for. Unset, it is the
    platform JAX runs on when the module is built (host side, once); a loaded model passes its
    own setting (`Qwen2VL(backend=...)`) down to every submodule."""
    return dataclasses.field(default_factory=jax.default_backend)


def masked_softmax(logits: jax.Array, mask: jax.Array, dtype) -> jax.Array:
    """Softmax over the last axis in f32, masked positions excluded, cast to `dtype`.

    Masked logits get the smallest finite f32 rather than -inf, so a row with nothing to attend
    to (left padding, padding segments) becomes a uniform, finite distribution instead of NaN,
    and no NaN can leak into real rows through the values it would multiply.
    """
    logits = jnp.where(mask, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1).astype(dtype)


KERNELS = ("auto", "xla", "cudnn")


def attention_kernel(choice: str, dtype, num_queries: int, head_dim: int, backend: str) -> str:
    """The kernel for one attention: `choice` itself unless it is "auto"; then "cudnn" for
    half-precision attention over more than one query in a program built for a GPU (`backend`),
    with a head width cuDNN takes (a multiple of 8, at most 128), else "xla"."""
    if choice not in KERNELS:
        raise ValueError(f"attention kernel must be one of {', '.join(KERNELS)} (got {choice!r})")
    if choice != "auto":
        return choice
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    shape_ok = num_queries > 1 and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if half and shape_ok and backend == "gpu" else "xla"


def fused_attention(q, k, v, *, mask=None, lengths=None, causal=False):
    """cuDNN flash attention. q [B, L, H, hd], k/v [B, S, K, hd] (K divides H);
    mask bool broadcastable to [B, 1, L, S], or lengths int32[B] (a valid prefix of each row,
    queries and keys alike); causal: query slot i sees key slots <= i."""
    kw = {}
    if lengths is not None:
        kw = {"query_seq_lengths": lengths, "key_value_seq_lengths": lengths}
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn", **kw)


# ---------------------------------------------------------------- large products
# "f32": every product in the compute dtype (exact against an f32 reference).
# "bf16": a product of at least BF16_MIN_ROWS rows (the vision tower, prefill, training) takes
#         its inputs rounded to bf16 and accumulates in f32; its result, and every other step
#         (norms, softmax, residuals, one-token decoding), stays in the compute dtype. CPUs with
#         bf16 dot instructions (AVX512-BF16, AMX) run such products about twice as fast as f32.
#         Fewer rows stay in f32: there the weight's conversion would cost more than it saves.
MATMULS = ("f32", "bf16")


def check_matmul(choice: str) -> str:
    if choice not in MATMULS:
        raise ValueError(f"matmul must be one of {', '.join(MATMULS)} (got {choice!r})")
    return choice


def _bf16_products(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """lax.dot_general for nn.Dense under matmul="bf16" (see above)."""
    rows = lhs.size // max(lhs.shape[-1], 1)
    if rows < BF16_MIN_ROWS or lhs.dtype != jnp.float32:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                                   preferred_element_type=preferred_element_type)
    out = jax.lax.dot_general(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), dimension_numbers,
                              preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


def dense_dot(choice: str):
    """The `dot_general` an nn.Dense takes for a `matmul` choice (None: Flax's default)."""
    return None if check_matmul(choice) == "f32" else _bf16_products

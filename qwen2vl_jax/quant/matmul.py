"""The product of activations with a packed weight, traced inside the model.

`matmul` takes a kernel as stored (`format`) or in the CPU form (`cpu.cpu_layout`), and the
`backend` the model was built for (a setting fixed at load, never `jax.default_backend()` read
while tracing, so a program compiled for another platform gets that platform's kernel):
  - the CPU form: `cpu.cpu_matmul`;
  - "cpu", the stored form, up to FEW_ROWS rows (decoding under a mesh): `_blocked`, a loop over
    blocks of input rows, each dequantized into a buffer that stays in cache;
  - otherwise (GPU, TPU, or many rows): the weight dequantized and multiplied, which XLA fuses
    into one kernel on GPU and TPU.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qwen2vl_jax.quant.cpu import BF16_MIN_ROWS, FEW_ROWS, cpu_matmul, materialized
from qwen2vl_jax.quant.format import bits_of, zero_points

# A block's float buffer in `_blocked` is about BLOCK_BYTES: in cache, and big enough that the
# loop's per-step cost is small.
BLOCK_BYTES = 1 << 20


def _dequantized_rows(q, scales, zeros, per_group: int):
    """Integer rows [R, O] whose groups are runs of `per_group` rows, scales/zeros [R/per_group, O]
    -> f32 [R, O]."""
    r, o = q.shape
    w = q.astype(jnp.float32).reshape(r // per_group, per_group, o)
    w = (w - zeros[:, None].astype(jnp.float32)) * scales[:, None].astype(jnp.float32)
    return w.reshape(r, o)


def _halves(x, leaves: dict, in_features: int):
    """The weight as (inputs, integer rows, rows per group) pairs whose products sum to x @ W:
    one pair for 8 bit; for 4 bit the low and the high nibbles, which hold the even and the odd
    input rows (so no nibble is ever interleaved back into place)."""
    q, scales = leaves["qweight"], leaves["scales"]
    zeros = zero_points(leaves, in_features)
    g = in_features // scales.shape[0]
    if bits_of(q.shape[0], in_features) == 8:
        return [(x, q, g)], scales, zeros
    return [(x[..., 0::2], q & 15, g // 2), (x[..., 1::2], q >> 4, g // 2)], scales, zeros


def _blocked(x2, leaves: dict, in_features: int):
    """x2 f32[N, I] @ W for few rows N: a loop over blocks of (packed) weight rows, each
    dequantized into a cache-sized float buffer and multiplied; -> f32[N, O]."""
    pairs, scales, zeros = _halves(x2, leaves, in_features)
    rows_total, out_f = pairs[0][1].shape
    per_group = pairs[0][2]
    rows = _block_rows(rows_total, per_group, out_f * len(pairs))
    n = rows_total // rows
    cut = n * rows  # rows past `cut` (fewer than a block) are done after the loop

    def block(xs, qs, s, z):
        return sum(xi @ _dequantized_rows(qi, s, z, min(per_group, rows)) for xi, qi in zip(xs, qs))

    def group_rows(a, start, stop):  # the scales/zeros of weight rows start..stop
        if per_group >= rows:  # blocks inside groups: one row of `a` per block
            return jnp.repeat(a, per_group // rows, axis=0)[start // rows:stop // rows]
        return a[start // per_group:stop // per_group]

    def split(a, per):  # [n * per, ...] -> [n, per, ...]
        return a.reshape(n, per, *a.shape[1:])

    xs = [x[:, :cut].reshape(x.shape[0], n, rows).transpose(1, 0, 2) for x, _, _ in pairs]  # [n, N, rows]
    qs = [split(q[:cut], rows) for _, q, _ in pairs]
    per_block = max(rows // per_group, 1)
    sb, zb = split(group_rows(scales, 0, cut), per_block), split(group_rows(zeros, 0, cut), per_block)

    def step(acc, blk):
        xi, qi, si, zi = blk
        return acc + block(xi, qi, si, zi), None

    acc, _ = jax.lax.scan(step, jnp.zeros((x2.shape[0], out_f), jnp.float32), (xs, qs, sb, zb))
    if cut < rows_total:
        acc = acc + block([x[:, cut:] for x, _, _ in pairs], [q[cut:] for _, q, _ in pairs],
                          scales[cut // per_group:], zeros[cut // per_group:])
    return acc


def _block_rows(total: int, per_group: int, width: int) -> int:
    """Weight rows per block: a float buffer near BLOCK_BYTES (`width` floats a row), aligned
    with the groups (a multiple of `per_group`, or a divisor of it)."""
    target = max(1, BLOCK_BYTES // (4 * width))
    if target >= per_group:
        return min(total, target // per_group * per_group)
    return next(r for r in range(target, 0, -1) if per_group % r == 0)


def matmul(x, leaves: dict, dtype, backend: str = "cpu", products: str = "f32"):
    """x [..., I] @ W (packed, or in the CPU form of `cpu.cpu_layout`) -> [..., O] in `dtype`,
    with the kernel for `backend` (the platform the program is built for; see the module doc).
    products "bf16": the CPU form's many-row products (prefill) take bf16 inputs and accumulate
    in f32, as the float model's do under that setting (modules/attention.py)."""
    if "perm" in leaves:
        x = jnp.take(x, leaves["perm"], axis=-1)
    in_features = x.shape[-1]
    lead = x.shape[:-1]
    n = math.prod(lead)
    if leaves["qweight"].ndim == 3:
        y = cpu_matmul(x.reshape(n, in_features).astype(jnp.float32), leaves, in_features,
                       bf16=products == "bf16" and n >= BF16_MIN_ROWS)
        return y.reshape(*lead, -1).astype(dtype)
    if backend == "cpu" and n <= FEW_ROWS:
        y = _blocked(x.reshape(n, in_features).astype(jnp.float32), leaves, in_features)
        return y.reshape(*lead, -1).astype(dtype)
    pairs, scales, zeros = _halves(x.astype(dtype), leaves, in_features)
    return sum(jnp.dot(xi, _dequantized_rows(qi, scales, zeros, g).astype(dtype)) for xi, qi, g in pairs)


def embed_lookup(ids, leaves: dict, dtype):
    """int[...] ids -> rows of a packed embedding [..., D] in `dtype`."""
    q = jnp.take(leaves["qweight"], ids, axis=0).astype(jnp.float32)
    s = jnp.take(leaves["scales"], ids, axis=0).astype(jnp.float32)
    return (q * s).astype(dtype)


def embed_attend(h, leaves: dict, dtype, backend: str = "cpu"):
    """h [..., D] @ E.T for a packed embedding -> [..., V] in `dtype`: the int8 table
    multiplied as it is (converted inside the product), its row scales applied to the outputs.
    backend: the platform the program is built for ("cpu" keeps a few rows apart from their
    producer, see `cpu.materialized`)."""
    lead = h.shape[:-1]
    n = math.prod(lead)
    h2 = h.reshape(n, h.shape[-1]).astype(jnp.float32)
    # tied to the input, as in cpu_matmul: else a decode while_loop hoists the convert and
    # carries the whole table in f32
    h2, q = jax.lax.optimization_barrier((h2, leaves["qweight"]))
    if backend == "cpu" and n <= FEW_ROWS:
        h2 = materialized(h2)  # else the final norm is recomputed for each of V x D weights
    s = leaves["scales"][:, 0].astype(jnp.float32)
    # The table is [V, D], output-major: XLA's CPU compiler turns this matrix-vector product
    # into one loop that reads the int8 rows directly (for D up to about 2048).
    y = h2 @ q.astype(jnp.float32).T
    return (y * s).reshape(*lead, -1).astype(dtype)

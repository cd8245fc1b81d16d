"""The CPU form of packed kernels, laid out once at load, and the matmul that reads it.

XLA fuses a dequantize into the dot on GPU and TPU. On CPU it does not for the stored [I, O]
layout (the convert becomes its own loop that writes the whole float weight, then the dot
reads it back: slower than float). It does for one row times an output-major weight [O, I]
with I up to about 2048: the product becomes one loop that reads the integers. So a model
built for the CPU without a mesh re-lays its packed kernels once at load (`cpu_layout`:
output-major column blocks, scales per output or per run of a group, zero points folded into
offsets), and `cpu_matmul` runs one such loop per block and row for up to FEW_ROWS rows
(decoding), or dequantizes each block once for more (prefill). The stored form, its sharding
and the GPU/TPU path stay as they are (`matmul`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax.params import flatten, unflatten
from qwen2vl_jax.quant.format import PARTS, bits_of, float_leaf, unpack_int4

# Decoding rows at most this many take the CPU's row-by-row loops (here, and the blocked
# stored-form path of `matmul`).
FEW_ROWS = 16

# XLA's CPU compiler turns `x @ q.astype(f32).T` for one row x and an output-major integer
# weight q [O, I] (I up to about 2048) into one loop that reads q directly, elementwise work
# on q (a nibble unpack, a scale) included, as long as nothing else is fused into that dot (a
# following add is, and then the weight is converted into a buffer first: an
# optimization_barrier keeps the dots apart).
BLOCK_INPUTS = 2048
CHUNK_BYTES = 16 << 20  # prefill's f32 pieces: under glibc's 32 MiB mmap threshold, so reused
BF16_MIN_ROWS = 64  # products of this many rows or more take bf16 inputs under matmul="bf16" (modules/attention.py)


def cpu_layout(params, shapes):
    """The params with every packed Dense kernel re-laid once for CPU matmuls (`cpu_matmul`);
    everything else, the embedding table included, is returned as it is (numpy stays numpy).
    shapes: the float tree's shapes (`init_shapes`), which give each kernel's input count.

    The CPU form of a kernel W [I, O] with `nb` column blocks of `bi` inputs (I padded with
    zero weights to nb * bi; blocks at most BLOCK_INPUTS, aligned with the groups):

        qweight  int8/uint8 [nb, O, bi]    8 bit, output-major
                 uint8 [nb, O, bi/2]       4 bit: input 2r of a block in the low nibble of
                                           column r, 2r+1 in the high one
        scales   float [1, O]              one group: applied to the outputs
                 float [nb, O, R]          groups: one per run of bi/R inputs of a block
        offsets  float, as scales          zero point x scale (absent without zero points)
        perm     int32 [I]                 as stored

    W[i, c] = q * scale - offset, so x @ W = (x @ (q * scale)) - (sums of x over the runs) @
    offsets. Only for parameters on the CPU without a mesh: it has no sharding rules."""
    flat, float_shapes = flatten(params), flatten(shapes)
    heads = {p.rpartition("/")[0] for p in flat if p.endswith("/qweight") and not p.startswith("model/embed_tokens/")}
    out = {p: leaf for p, leaf in flat.items() if not (p.rpartition("/")[0] in heads and p.rpartition("/")[2] in PARTS)}
    for head in heads:
        leaves = {k: flat[f"{head}/{k}"] for k in PARTS if f"{head}/{k}" in flat}
        if leaves["qweight"].ndim != 2:  # already in the CPU form
            out.update({f"{head}/{k}": v for k, v in leaves.items()})
            continue
        host = isinstance(leaves["qweight"], np.ndarray)
        in_f = float_shapes[float_leaf(f"{head}/qweight")].shape[0]
        form = _cpu_form({k: np.asarray(v) for k, v in leaves.items()}, in_f)
        if form is None:  # 4 bit with odd groups: a nibble pair would straddle two
            out.update({f"{head}/{k}": v for k, v in leaves.items()})
            continue
        out.update({f"{head}/{k}": (v if host else jnp.asarray(v)) for k, v in form.items()})
    return unflatten(out)


def _cpu_blocks(in_features: int, group: int, bits: int) -> tuple[int, int]:
    """(nb, bi): nb blocks of bi inputs covering `in_features`, bi a multiple of the group
    when there are groups of at most BLOCK_INPUTS (so a block holds whole groups), even for 4
    bit, and the padding shorter than a block (the bit width is read back from the shapes)."""
    nb = -(-in_features // BLOCK_INPUTS)
    unit = group if group < in_features and group <= BLOCK_INPUTS else 2 if bits == 4 else 1
    bi = -(-in_features // (nb * unit)) * unit
    if nb * bi - in_features >= bi // 2:  # a tiny dim: one block
        nb, bi = 1, -(-in_features // unit) * unit
    return nb, bi


def _cpu_form(leaves: dict, in_f: int) -> dict | None:
    """Packed leaves (numpy, as stored) of a kernel with `in_f` inputs -> its CPU form (numpy),
    or None when it has none."""
    q = leaves["qweight"]
    bits = bits_of(q.shape[0], in_f)
    scales = leaves["scales"].astype(np.float32)  # [G, O]
    groups, out_f = scales.shape
    group = in_f // groups
    if bits == 4 and group % 2:
        return None
    q = unpack_int4(q) if bits == 4 else q  # [I, O]
    zeros = leaves.get("zeros")
    if zeros is None and bits == 4:
        zeros = np.full(scales.shape, 8, np.uint8)
    nb, bi = _cpu_blocks(in_f, group, bits)
    pad = nb * bi - in_f
    qp = np.concatenate([q, np.zeros((pad, out_f), q.dtype)]) if pad else q
    qo = np.ascontiguousarray(qp.reshape(nb, bi, out_f).transpose(0, 2, 1))  # [nb, O, bi]
    if bits == 4:
        qo = (qo[..., 0::2] & 15) | ((qo[..., 1::2] & 15) << 4)
    form = {"qweight": qo}
    if "perm" in leaves:
        form["perm"] = leaves["perm"]
    offsets = None if zeros is None else zeros.astype(np.float32) * scales  # [G, O]
    if groups == 1:
        form["scales"] = scales
        if offsets is not None:
            form["offsets"] = offsets
        return form
    run = math.gcd(group, bi)  # inputs of a block that share one group
    starts = np.arange(0, nb * bi, run)  # the first input of each run
    which = np.minimum(starts // group, groups - 1)
    real = (starts < in_f)[:, None]  # runs of padding get zeros
    per_run = lambda a: np.where(real, a[which], 0.0).reshape(nb, bi // run, out_f).transpose(0, 2, 1)  # noqa: E731
    form["scales"] = np.ascontiguousarray(per_run(scales))
    if offsets is not None:
        form["offsets"] = np.ascontiguousarray(per_run(offsets))
    return form


def materialized(x2):
    """x2 [N, I] computed into a buffer of its own before a fused integer loop reads it.

    XLA's CPU compiler fuses a cheap producer (an RMSNorm, silu(gate) * up, the embedding
    lookup, a permutation) into the loop, which then recomputes it for every weight element
    it reads, which can cost more than the product itself. A conditional is a fusion boundary. Its other branch gives a row whose first input is NaN all NaNs, which is
    what the product gives such a row anyway, so the result is the same either way."""
    has_nan = jnp.isnan(x2[:, :1])
    return jax.lax.cond(jnp.any(has_nan), lambda v: jnp.where(has_nan, jnp.nan, v), lambda v: v, x2)


def cpu_matmul(x2, leaves: dict, in_features: int, bf16: bool = False):
    """x2 f32[N, I] @ W in the CPU form -> f32[N, O]. One row: a loop per block that reads the
    integers directly (`cpu_layout`); up to FEW_ROWS rows: that, row by row; more: each block
    dequantized to f32 once and multiplied (bf16: dequantized to bf16 and multiplied with bf16
    inputs, accumulating in f32: the inputs are rounded as a float model's are under
    matmul="bf16"; the integers are exact in bf16, a group-scaled weight is rounded)."""
    # Tied to this layer's input, the weight's convert cannot be hoisted out of a decode
    # while_loop as loop-invariant (which would hold every layer's weight in f32), nor a
    # prefill's dequantize scheduled before the layer runs.
    x2, q = jax.lax.optimization_barrier((x2, leaves["qweight"]))
    if x2.shape[0] <= FEW_ROWS:
        x2 = materialized(x2)
    scales = leaves["scales"]
    nb, out_f, width = q.shape
    bits = 4 if nb * width < in_features else 8
    bi = width * (2 if bits == 4 else 1)
    pad = nb * bi - in_features
    if pad:
        x2 = jnp.pad(x2, ((0, 0), (0, pad)))
    grouped = scales.ndim == 3
    runs = scales.shape[2] if grouped else 1

    def weight(b, half=None):  # block b (or its even/odd inputs) as f32 [O, bi (/2)], scaled per run
        qb = q[b] if half is None else (q[b] & 15 if half == 0 else q[b] >> 4)
        w = qb.astype(jnp.float32)
        if grouped:
            per = w.shape[1] // runs
            s = jnp.broadcast_to(scales[b][:, :, None], (out_f, runs, per)).reshape(out_f, -1)
            w = w * s
        return w

    def products(xr):  # xr [n, nb * bi] -> the list of block products [n, O]
        out = []
        for b in range(nb):
            xb = xr[:, b * bi:(b + 1) * bi]
            if bits == 8:
                out.append(xb @ weight(b).T)
            else:
                out.extend(xb[:, h::2] @ weight(b, h).T for h in (0, 1))
        return out

    def one_row(xr):  # [1, I]: the fused loops, kept apart from each other and from the sum
        return sum(jax.lax.optimization_barrier(products(xr)))

    n = x2.shape[0]
    if n == 1:
        y = one_row(x2)
    elif n <= FEW_ROWS:  # unrolled: inside a loop (lax.map) the dots are not fused
        y = jnp.concatenate([one_row(x2[r:r + 1]) for r in range(n)])
    else:  # each block dequantized in chunks of outputs under CHUNK_BYTES (no fresh mmap per call)
        halves = (None,) if bits == 8 else (0, 1)
        wtype = jnp.bfloat16 if bf16 else jnp.float32
        pieces = -(-out_f * (bi // len(halves)) * jnp.dtype(wtype).itemsize // CHUNK_BYTES)  # ceil: bytes / CHUNK_BYTES
        step = -(-out_f // pieces)
        cuts = [(c, min(c + step, out_f)) for c in range(0, out_f, step)]
        outs = []
        for b in range(nb):
            for h in halves:
                xb = x2[:, b * bi:(b + 1) * bi] if h is None else x2[:, b * bi + h:(b + 1) * bi:2]
                ws = jax.lax.optimization_barrier([weight(b, h)[c0:c1].astype(wtype) for c0, c1 in cuts])
                outs.append(jnp.concatenate([jnp.dot(xb.astype(wtype), w.T, preferred_element_type=jnp.float32)
                                             for w in ws], axis=1))
        y = sum(outs)
    if not grouped:
        y = y * scales[0]
    if "offsets" in leaves:
        offsets = leaves["offsets"]
        if grouped:  # [n, nb, R] sums of x over each run
            sums = x2.reshape(n, nb, runs, bi // runs).sum(-1)
            y = y - jnp.einsum("nbr,bor->no", sums, offsets)
        else:
            y = y - x2.sum(-1, keepdims=True) * offsets[0]
    return y

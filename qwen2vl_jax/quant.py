"""Weight-only quantized parameters: the packed form, quantizing, dequantizing and the matmul.

A quantized Dense kernel W [I, O] (I input features, O outputs) is stored as sibling leaves of
its module, in place of `kernel`:

    qweight  int8  [I, O]     8 bit, signed and symmetric (no zeros)
             uint8 [I, O]     8 bit, unsigned with zero points
             uint8 [I/2, O]   4 bit, unsigned: input row 2r in the low nibble of row r, 2r+1 in the high
    scales   float [G, O]     one scale per output column for each of G groups of g = I / G
                              consecutive input rows (G = 1: per output channel)
    zeros    uint8 [G, O]     zero points; absent: 0 for int8 storage, 8 for 4 bit
    perm     int32 [I]        optional: the layer reads x[..., perm] (a GPTQ act-order g_idx,
                              sorted once at conversion so every group is a run of rows)

    W[r, c] = (q[r, c] - zeros[r // g, c]) * scales[r // g, c]

An embedding table E [V, D] (the tied output head) is stored as int8 qweight [V, D] with
scales [V, 1]: a row scale serves both the lookup and `attend` (h @ E.T), where it is the
scale of an output channel.

The leaves keep the float weight's dimensions in the same order, so they carry its logical
axes (`float_leaf`): a split of the input dimension splits qweight's rows and the groups
together, and `check_mesh` refuses a split that would cut a group.

The matmul: XLA fuses a dequantize into the dot on GPU and TPU, so there the weight is
dequantized and multiplied. On CPU it does not for this [I, O] layout (the convert becomes its
own loop that writes the whole float weight, then the dot reads it back: slower than float).
It does for one row times an output-major weight [O, I] with I up to about 2048: the product
becomes one loop that reads the integers. So a model whose params sit on the CPU without a
mesh re-lays its packed kernels once at load (`cpu_layout`: output-major column blocks, scales
per output or per run of a group, zero points folded into offsets), and `_cpu_matmul` runs one
such loop per block and row for up to FEW_ROWS rows (decoding), or dequantizes each block once
for more (prefill). The stored form, its sharding and the GPU/TPU path stay as they are; a
stored-form kernel on CPU (under a mesh) takes `_blocked`: a loop over blocks of input rows,
each dequantized into a buffer that stays in cache, for few rows, and one dequantize for many.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from importlib import metadata
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax.errors import InputError, listing
from qwen2vl_jax.params import flatten, layer_axes, unflatten

PARTS = ("qweight", "scales", "zeros", "perm")
RUNTIME_PARTS = PARTS + ("offsets",)  # the leaves a layer may hold in memory (`cpu_layout` adds offsets)
METHODS = ("int8", "int4", "gptq", "awq")
DEFAULT_GROUP = 128

# The decoder's linear layers, and the output head (an untied lm_head, or the tied embedding).
LINEARS = re.compile(r"^model/layers_\d+/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel$")
HEAD = re.compile(r"^(lm_head/kernel|model/embed_tokens/embedding)$")

# Decoding rows at most this many take the blocked CPU path; a block's float buffer is about
# BLOCK_BYTES (in cache, and big enough that the loop's per-step cost is small).
FEW_ROWS = 16
BLOCK_BYTES = 1 << 20


# XLA's concurrency-optimised CPU scheduler keeps every decoder layer's temporaries live at once:
# a quantized prefill then holds each layer's dequantized weights in one temporary, page-faulted
# afresh on every call (2B int8, 290-token prompt: peak RSS 10.8 GB and a prefill 1.3x to 2.3x
# fp32's; without it 6.2 GB and about fp32's time). Float models decode about 10% faster with it
# on, so it is turned off only for a process that loads a quantized folder, and only on the jaxlib
# versions it was measured on (an unknown flag in XLA_FLAGS stops JAX).
SCHEDULER_FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"
SCHEDULER_FLAG_VERSIONS = ((0, 10),)


def sequential_cpu_schedule() -> bool:
    """Turn XLA's concurrency-optimised CPU scheduler off for this process, if JAX has not made
    its backends yet (XLA reads XLA_FLAGS then) and XLA_FLAGS does not name it already. Returns
    whether it was turned off here; `Qwen2VL.from_pretrained` calls it for a quantized folder."""
    flags = os.environ.get("XLA_FLAGS", "")
    if SCHEDULER_FLAG in flags or _jaxlib_version() not in SCHEDULER_FLAG_VERSIONS:
        return False
    from jax._src import xla_bridge  # noqa: PLC0415  (no public way to ask this)

    ready = getattr(xla_bridge, "backends_are_initialized", None)
    if ready is None or ready():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} --{SCHEDULER_FLAG}=false".strip()
    return True


def _jaxlib_version() -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return ()


# ---------------------------------------------------------------- the scheme
@dataclasses.dataclass(frozen=True)
class Scheme:
    """How a converted folder's params are quantized (recorded in qwen2vl_jax.json).

    method: int8 (per output channel) or int4 (groups) from float weights; gptq or awq: a
    packed checkpoint kept as it is. bits 4 or 8; group_size -1 for one group over all input
    rows; head: the output head (lm_head or the tied embedding) is int8 too."""

    method: str
    bits: int
    group_size: int = -1
    head: bool = False

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: Any, where: str = "qwen2vl_jax.json") -> "Scheme":
        if not isinstance(raw, dict) or raw.get("method") not in METHODS or raw.get("bits") not in (4, 8):
            raise InputError(f"{where}: quantization {raw!r} is not one this qwen2vl-jax reads "
                             f"(method {'/'.join(METHODS)}, bits 4 or 8)")
        return cls(raw["method"], int(raw["bits"]), int(raw.get("group_size", -1)), bool(raw.get("head", False)))

    @classmethod
    def of(cls, method: str, group_size: int = DEFAULT_GROUP, head: bool = True) -> "Scheme":
        """The scheme for `--quantize int8|int4` of a float checkpoint."""
        if method == "int8":
            return cls("int8", 8, -1, head)
        if method == "int4":
            return cls("int4", 4, group_size, head)
        raise InputError(f"--quantize must be int8 or int4, not {method!r}")


# ---------------------------------------------------------------- packed leaves
def is_packed(node: Any) -> bool:
    """A module's params dict holding a quantized weight."""
    return isinstance(node, dict) and "qweight" in node


def is_quantized(params) -> bool:
    """Whether a param tree holds any packed weight."""
    return any(p.endswith("/qweight") for p in flatten(params))


def bits_of(qweight_rows: int, in_features: int) -> int:
    return 4 if qweight_rows * 2 == in_features else 8


def float_leaf(path: str) -> str:
    """The float parameter a packed leaf stands for: .../q_proj/scales -> .../q_proj/kernel
    (.../embed_tokens/qweight -> .../embed_tokens/embedding); other paths are returned as they
    are. The sharding rules of the float leaf apply to the packed one, dimension by dimension."""
    head, _, leaf = path.rpartition("/")
    if leaf not in ("qweight", "scales", "zeros"):
        return path
    return f"{head}/embedding" if head.endswith("embed_tokens") else f"{head}/kernel"


def pack_int4(q: np.ndarray) -> np.ndarray:
    """uint8 [I, O] of values 0..15 (I even) -> uint8 [I/2, O]: row 2r low nibble, 2r+1 high."""
    q = np.asarray(q, np.uint8)
    return (q[0::2] & 15) | ((q[1::2] & 15) << 4)


def unpack_int4(packed):
    """uint8 [I/2, O] -> [I, O] values 0..15 (numpy or jax; stays uint8)."""
    xp = jnp if isinstance(packed, jax.Array) else np
    low, high = packed & 15, packed >> 4
    return xp.stack([low, high], axis=1).reshape(packed.shape[0] * 2, *packed.shape[1:])


def unpacked(leaves: dict, in_features: int):
    """The integer weight [I, O] (int8 or 0..255 as uint8) of a packed kernel."""
    q = leaves["qweight"]
    return unpack_int4(q) if bits_of(q.shape[0], in_features) == 4 else q


def _zeros(leaves: dict, in_features: int, xp=jnp):
    """The zero points [G, O]: stored, or the implied 8 (4 bit) or 0 (int8) for every group."""
    if "zeros" in leaves:
        return leaves["zeros"]
    implied = 8 if bits_of(leaves["qweight"].shape[0], in_features) == 4 else 0
    return xp.full(leaves["scales"].shape, implied, xp.uint8)


def dequantize(leaves: dict, in_features: int, dtype=jnp.float32):
    """A packed kernel -> W [I, O] in `dtype` (rows in the permuted order when it has `perm`).

    Computed in float32, exact for fp16/bf16/f32 scales ((q - zero) has at most 9 bits), then
    rounded once; numpy in, numpy out."""
    xp = np if isinstance(leaves["qweight"], np.ndarray) else jnp
    q = unpacked(leaves, in_features).astype(xp.float32)
    scales = leaves["scales"].astype(xp.float32)  # [G, O]
    zeros = _zeros(leaves, in_features, xp).astype(xp.float32)
    groups = scales.shape[0]
    rows = q.reshape(groups, in_features // groups, -1)  # [G, g, O]
    w = (rows - zeros[:, None]) * scales[:, None]
    return w.reshape(in_features, -1).astype(dtype)


# ---------------------------------------------------------------- quantizing float weights
def quantize_int8(w: np.ndarray, scale_dtype=np.float32) -> dict:
    """W [I, O] -> int8 per output channel, symmetric: scales [1, O] = max|W[:, c]| / 127."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=0, keepdims=True)
    scales = np.where(amax > 0, amax / 127.0, 1.0).astype(scale_dtype)
    q = np.clip(np.rint(w / scales.astype(np.float32)), -127, 127).astype(np.int8)
    return {"qweight": q, "scales": scales}


MIN_GROUPS = 4  # a dim too small for 4 groups of group_size (a tiny model's) gets 4 smaller ones
CLIP = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # range shrink factors int4 tries per group (least error wins)


def group_for(in_features: int, group_size: int) -> int:
    """The group actually used for `in_features` rows: `group_size`, or smaller for a small
    dim (at least MIN_GROUPS groups: 128 rows of a tiny model get groups of 32), always a
    divisor of `in_features`."""
    if group_size == -1:
        return in_features
    return math.gcd(in_features, min(group_size, max(in_features // MIN_GROUPS, 1)))


def quantize_int4(w: np.ndarray, group_size: int = DEFAULT_GROUP, scale_dtype=np.float32) -> dict:
    """W [I, O] -> 4 bit with a scale and zero point per group of rows and output column:
    asymmetric, the 16 levels spanning each group's range shrunk by the factor of CLIP that
    gives the least squared error (a clipped outlier costs less than coarse steps for all)."""
    w = np.asarray(w, np.float32)
    in_f, out_f = w.shape
    if in_f % 2:
        raise InputError(f"int4 needs an even number of input features (a weight has {in_f})")
    g = group_for(in_f, group_size)
    rows = w.reshape(in_f // g, g, out_f)
    lo = np.minimum(rows.min(axis=1), 0.0)  # [G, O]; 0 stays representable
    hi = np.maximum(rows.max(axis=1), 0.0)
    best = None
    for shrink in CLIP:
        scales = np.where(hi > lo, (hi - lo) * shrink / 15.0, 1.0).astype(scale_dtype)
        s = scales.astype(np.float32)
        zeros = np.clip(np.rint(-lo * shrink / s), 0, 15).astype(np.uint8)
        z = zeros.astype(np.float32)[:, None]
        q = np.clip(np.rint(rows / s[:, None]) + z, 0, 15)
        err = (((q - z) * s[:, None] - rows) ** 2).sum(axis=1)  # [G, O]
        if best is None:
            best = [err, scales, zeros, q.astype(np.uint8)]
            continue
        better = err < best[0]
        best[0] = np.where(better, err, best[0])
        best[1] = np.where(better, scales, best[1])
        best[2] = np.where(better, zeros, best[2])
        best[3] = np.where(better[:, None], q.astype(np.uint8), best[3])
    _, scales, zeros, q = best
    return {"qweight": pack_int4(q.reshape(in_f, out_f)), "scales": scales, "zeros": zeros}


def quantize_embedding(table: np.ndarray, scale_dtype=np.float32) -> dict:
    """E [V, D] -> int8 qweight [V, D] with a scale per row, scales [V, 1]."""
    packed = quantize_int8(np.asarray(table, np.float32).T, scale_dtype)
    return {"qweight": np.ascontiguousarray(packed["qweight"].T), "scales": packed["scales"].T.copy()}


def kind_of(path: str, scheme: Scheme) -> str | None:
    """How `scheme` stores the float parameter at `path`: "embedding" (int8 rows), "int8",
    "int4", or None (float: the vision tower, norms, biases; the head unless scheme.head)."""
    if path == "model/embed_tokens/embedding":
        return "embedding" if scheme.head else None
    if path == "lm_head/kernel":
        return "int8" if scheme.head else None  # the head is int8 in both schemes
    if LINEARS.match(path):
        return "int8" if scheme.bits == 8 else "int4"
    return None


def quantize_leaf(path: str, w: np.ndarray, scheme: Scheme) -> dict | None:
    """The packed leaves for the float parameter at `path` under `scheme`, or None when the
    scheme leaves it float."""
    kind = kind_of(path, scheme)
    if kind == "embedding":
        return quantize_embedding(w)
    if kind == "int8":
        return quantize_int8(w)
    if kind == "int4":
        return quantize_int4(w, scheme.group_size)
    return None


def abstract(shapes: dict, scheme: Scheme) -> dict:
    """A tree of float ShapeDtypeStructs (e.g. `init_shapes`) -> the packed tree's, without
    computing anything: what `quantize_params` would give (scales float32)."""
    out = {}
    for path, leaf in flatten(shapes).items():
        kind, head = kind_of(path, scheme), path.rpartition("/")[0]
        sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))  # noqa: E731
        if kind is None:
            out[path] = leaf
        elif kind == "embedding":
            v, d = leaf.shape
            out.update({f"{head}/qweight": sds((v, d), jnp.int8), f"{head}/scales": sds((v, 1), jnp.float32)})
        elif kind == "int8":
            i, o = leaf.shape
            out.update({f"{head}/qweight": sds((i, o), jnp.int8), f"{head}/scales": sds((1, o), jnp.float32)})
        else:
            i, o = leaf.shape
            groups = i // group_for(i, scheme.group_size)
            out.update({f"{head}/qweight": sds((i // 2, o), jnp.uint8), f"{head}/scales": sds((groups, o), jnp.float32),
                        f"{head}/zeros": sds((groups, o), jnp.uint8)})
    return unflatten(out)


def quantize_params(params: dict, scheme: Scheme) -> dict:
    """A float param tree -> the same tree with the scheme's weights packed (host numpy)."""
    out = {}
    for path, leaf in flatten(params).items():
        packed = quantize_leaf(path, np.asarray(leaf), scheme)
        if packed is None:
            out[path] = leaf
        else:
            head = path.rpartition("/")[0]
            out.update({f"{head}/{k}": v for k, v in packed.items()})
    return unflatten(out)


# ---------------------------------------------------------------- the matmul
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
    zeros = _zeros(leaves, in_features)
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


def matmul(x, leaves: dict, dtype):
    """x [..., I] @ W (packed, or in the CPU form of `cpu_layout`) -> [..., O] in `dtype`."""
    if "perm" in leaves:
        x = jnp.take(x, leaves["perm"], axis=-1)
    in_features = x.shape[-1]
    lead = x.shape[:-1]
    n = math.prod(lead)
    if leaves["qweight"].ndim == 3:
        y = _cpu_matmul(x.reshape(n, in_features).astype(jnp.float32), leaves, in_features)
        return y.reshape(*lead, -1).astype(dtype)
    if jax.default_backend() == "cpu" and n <= FEW_ROWS:
        y = _blocked(x.reshape(n, in_features).astype(jnp.float32), leaves, in_features)
        return y.reshape(*lead, -1).astype(dtype)
    pairs, scales, zeros = _halves(x.astype(dtype), leaves, in_features)
    return sum(jnp.dot(xi, _dequantized_rows(qi, scales, zeros, g).astype(dtype)) for xi, qi, g in pairs)


# ---------------------------------------------------------------- the CPU form
# XLA's CPU compiler turns `x @ q.astype(f32).T` for one row x and an output-major integer
# weight q [O, I] (I up to about 2048) into one loop that reads q directly, elementwise work
# on q (a nibble unpack, a scale) included, as long as nothing else is fused into that dot (a
# following add is, and then the weight is converted into a buffer first: an
# optimization_barrier keeps the dots apart).
BLOCK_INPUTS = 2048
CHUNK_BYTES = 16 << 20  # prefill's f32 pieces: under glibc's 32 MiB mmap threshold, so reused


def cpu_layout(params, shapes):
    """The params with every packed Dense kernel re-laid once for CPU matmuls (`_cpu_matmul`);
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


def _materialized(x2):
    """x2 [N, I] computed into a buffer of its own before a fused integer loop reads it.

    XLA's CPU compiler fuses a cheap producer (an RMSNorm, silu(gate) * up, the embedding
    lookup, a permutation) into the loop, which then recomputes it for every weight element
    it reads: at 2B, int8 decoding spent 3.2 of 5.7 ms a layer on that. A conditional is a
    fusion boundary. Its other branch gives a row whose first input is NaN all NaNs, which is
    what the product gives such a row anyway, so the result is the same either way."""
    has_nan = jnp.isnan(x2[:, :1])
    return jax.lax.cond(jnp.any(has_nan), lambda v: jnp.where(has_nan, jnp.nan, v), lambda v: v, x2)


def _cpu_matmul(x2, leaves: dict, in_features: int):
    """x2 f32[N, I] @ W in the CPU form -> f32[N, O]. One row: a loop per block that reads the
    integers directly (`cpu_layout`); up to FEW_ROWS rows: that, row by row; more: each block
    dequantized to f32 once and multiplied."""
    # Tied to this layer's input, the weight's convert cannot be hoisted out of a decode
    # while_loop as loop-invariant (which would hold every layer's weight in f32), nor a
    # prefill's dequantize scheduled before the layer runs.
    x2, q = jax.lax.optimization_barrier((x2, leaves["qweight"]))
    if x2.shape[0] <= FEW_ROWS:
        x2 = _materialized(x2)
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
        pieces = -(-out_f * (bi // len(halves)) * 4 // CHUNK_BYTES)  # ceil: f32 bytes / CHUNK_BYTES
        step = -(-out_f // pieces)
        cuts = [(c, min(c + step, out_f)) for c in range(0, out_f, step)]
        outs = []
        for b in range(nb):
            for h in halves:
                xb = x2[:, b * bi:(b + 1) * bi] if h is None else x2[:, b * bi + h:(b + 1) * bi:2]
                ws = jax.lax.optimization_barrier([weight(b, h)[c0:c1] for c0, c1 in cuts])
                outs.append(jnp.concatenate([xb @ w.T for w in ws], axis=1))
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


def embed_lookup(ids, leaves: dict, dtype):
    """int[...] ids -> rows of a packed embedding [..., D] in `dtype`."""
    q = jnp.take(leaves["qweight"], ids, axis=0).astype(jnp.float32)
    s = jnp.take(leaves["scales"], ids, axis=0).astype(jnp.float32)
    return (q * s).astype(dtype)


def embed_attend(h, leaves: dict, dtype):
    """h [..., D] @ E.T for a packed embedding -> [..., V] in `dtype`: the int8 table
    multiplied as it is (converted inside the product), its row scales applied to the outputs."""
    lead = h.shape[:-1]
    n = math.prod(lead)
    h2 = h.reshape(n, h.shape[-1]).astype(jnp.float32)
    # tied to the input, as in _cpu_matmul: else a decode while_loop hoists the convert and
    # carries the whole table in f32
    h2, q = jax.lax.optimization_barrier((h2, leaves["qweight"]))
    if jax.default_backend() == "cpu" and n <= FEW_ROWS:
        h2 = _materialized(h2)  # else the final norm is recomputed for each of V x D weights
    s = leaves["scales"][:, 0].astype(jnp.float32)
    # The table is [V, D], output-major: XLA's CPU compiler turns this matrix-vector product
    # into one loop that reads the int8 rows directly (for D up to about 2048: 2B's 1536).
    y = h2 @ q.astype(jnp.float32).T
    return (y * s).reshape(*lead, -1).astype(dtype)


# ---------------------------------------------------------------- checking a stored tree
def float_view(stored: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]):
    """Stored leaf shapes (path -> shape) with each packed layer's leaves replaced by the float
    parameter they stand for, checked against `expected` (path -> float shape). -> (the view,
    problems): a packed layer that does not fit its float shape is a problem naming it; leaves
    of a layer the model lacks stay under their own names (the caller reports them unknown)."""
    view = {p: shape for p, shape in stored.items() if p.rpartition("/")[2] not in PARTS}
    heads = {p.rpartition("/")[0] for p in stored if p.endswith("/qweight")}
    problems = []
    for p, shape in stored.items():
        head, _, leaf = p.rpartition("/")
        if leaf in PARTS and head not in heads:
            view[p] = shape  # a stray part without its qweight
    for head in sorted(heads):
        parts = {k: tuple(stored[f"{head}/{k}"]) for k in PARTS if f"{head}/{k}" in stored}
        target = float_leaf(f"{head}/qweight")
        if target not in expected:
            view.update({f"{head}/{k}": shape for k, shape in parts.items()})
            continue
        problem = _packed_problem(parts, tuple(expected[target]), target.endswith("embedding"))
        if problem:
            problems.append(f"{head}: {problem}")
        else:
            view[target] = tuple(expected[target])
    return view, problems


def _packed_problem(parts: dict, shape: tuple[int, ...], embedding: bool) -> str | None:
    q, scales = parts["qweight"], parts.get("scales")
    if scales is None:
        return "packed weight without scales"
    if embedding:
        want = {"qweight": shape, "scales": (shape[0], 1)}
        got = {k: parts.get(k) for k in want}
        return None if got == want and set(parts) == set(want) else f"packed table {got}, the config needs {want}"
    in_f, out_f = shape
    if q not in ((in_f, out_f), (in_f // 2, out_f)) or (q[0] != in_f and in_f % 2):
        return f"qweight {q} does not pack a ({in_f}, {out_f}) kernel in 8 or 4 bits"
    if len(scales) != 2 or scales[1] != out_f or scales[0] < 1 or in_f % scales[0]:
        return f"scales {scales} are not (groups dividing {in_f}, {out_f})"
    if "zeros" in parts and parts["zeros"] != scales:
        return f"zeros {parts['zeros']} differ from scales {scales}"
    if "perm" in parts and parts["perm"] != (in_f,):
        return f"perm {parts['perm']}, the config needs ({in_f},)"
    return None


# ---------------------------------------------------------------- sharding and bytes
def check_mesh(params, shardings) -> None:
    """Refuses (InputError, one line) a layout that splits a packed weight's input rows across
    a group: each shard's rows must hold whole groups. shardings: NamedShardings like `params`
    (sharding.param_shardings); None (no mesh) passes."""
    if shardings is None:
        return
    flat, layout = flatten(params), flatten(shardings)
    bad = []
    for path, scales in flat.items():
        head, _, leaf = path.rpartition("/")
        dim = layer_axes(path)  # a scanned decoder's layer axis comes first
        if leaf != "scales" or head.endswith("embed_tokens") or scales.shape[dim] == 1:
            continue
        sharding = layout[f"{head}/qweight"]
        split = sharding.spec[dim] if len(sharding.spec) > dim else None
        split = (split,) if isinstance(split, str) else tuple(split or ())
        ways = math.prod(sharding.mesh.shape[a] for a in split)
        if ways > 1 and scales.shape[dim] % ways:
            bad.append(f"{head} ({scales.shape[dim]} groups over {'*'.join(split)}={ways})")
    if bad:
        raise InputError(f"the mesh would cut the quantization groups of {len(bad)} weight(s): {listing(bad)}; "
                         "choose a mesh whose split of their input rows divides the group count")


def param_bytes(params) -> int:
    """Bytes of the parameter arrays (logical sizes; `device_bytes` gives each device's share)."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(params)))


def device_bytes(params) -> dict:
    """{device: bytes of parameter data it holds} for placed jax arrays."""
    out: dict = {}
    for x in jax.tree_util.tree_leaves(params):
        for shard in getattr(x, "addressable_shards", ()):
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out

"""The packed form of a quantized weight, as a converted folder stores it (numpy only).

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
together, and `sharding.check_groups` refuses a split that would cut a group.

Everything here works on shapes and numpy arrays; `unpack_int4` and `dequantize` also take
jax arrays (through the array's own namespace), so this module never imports jax.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from qwen2vl_jax.errors import InputError

PARTS = ("qweight", "scales", "zeros", "perm")
RUNTIME_PARTS = PARTS + ("offsets",)  # the leaves a layer may hold in memory (`cpu.cpu_layout` adds offsets)
METHODS = ("int8", "int4", "gptq", "awq")
DEFAULT_GROUP = 128

# The decoder's linear layers, and the output head (an untied lm_head, or the tied embedding).
LINEARS = re.compile(r"^model/layers_\d+/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel$")
HEAD = re.compile(r"^(lm_head/kernel|model/embed_tokens/embedding)$")


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


# ---------------------------------------------------------------- packed leaves
def is_packed(node: Any) -> bool:
    """A module's params dict holding a quantized weight."""
    return isinstance(node, dict) and "qweight" in node


def is_quantized(params) -> bool:
    """Whether a nested param dict holds any packed weight."""
    if not hasattr(params, "items") or hasattr(params, "shape"):  # a leaf
        return False
    return "qweight" in params or any(is_quantized(v) for v in params.values())


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


def _namespace(x):
    """numpy for numpy arrays, else the array's own namespace (jax.numpy for jax arrays and
    tracers), so the same code serves the host and a traced function."""
    return np if isinstance(x, np.ndarray) else x.__array_namespace__()


def pack_int4(q: np.ndarray) -> np.ndarray:
    """uint8 [I, O] of values 0..15 (I even) -> uint8 [I/2, O]: row 2r low nibble, 2r+1 high."""
    q = np.asarray(q, np.uint8)
    return (q[0::2] & 15) | ((q[1::2] & 15) << 4)


def unpack_int4(packed):
    """uint8 [I/2, O] -> [I, O] values 0..15 (numpy or jax; stays uint8)."""
    xp = _namespace(packed)
    low, high = packed & 15, packed >> 4
    return xp.stack([low, high], axis=1).reshape(packed.shape[0] * 2, *packed.shape[1:])


def unpacked(leaves: dict, in_features: int):
    """The integer weight [I, O] (int8 or 0..255 as uint8) of a packed kernel."""
    q = leaves["qweight"]
    return unpack_int4(q) if bits_of(q.shape[0], in_features) == 4 else q


def zero_points(leaves: dict, in_features: int):
    """The zero points [G, O]: stored, or the implied 8 (4 bit) or 0 (int8) for every group."""
    if "zeros" in leaves:
        return leaves["zeros"]
    xp = _namespace(leaves["scales"])
    implied = 8 if bits_of(leaves["qweight"].shape[0], in_features) == 4 else 0
    return xp.full(leaves["scales"].shape, implied, xp.uint8)


def dequantize(leaves: dict, in_features: int, dtype=np.float32):
    """A packed kernel -> W [I, O] in `dtype` (rows in the permuted order when it has `perm`).

    Computed in float32, exact for fp16/bf16/f32 scales ((q - zero) has at most 9 bits), then
    rounded once; numpy in, numpy out (jax in, jax out)."""
    xp = _namespace(leaves["qweight"])
    q = unpacked(leaves, in_features).astype(xp.float32)
    scales = leaves["scales"].astype(xp.float32)  # [G, O]
    zeros = zero_points(leaves, in_features).astype(xp.float32)
    groups = scales.shape[0]
    rows = q.reshape(groups, in_features // groups, -1)  # [G, g, O]
    w = (rows - zeros[:, None]) * scales[:, None]
    return w.reshape(in_features, -1).astype(dtype)


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

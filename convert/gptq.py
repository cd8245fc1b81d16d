"""Packed checkpoints: GPTQ (AutoGPTQ's "gptq" v1 format) and AWQ (AutoAWQ's GEMM packing).

Qwen2-VL-{2B,7B,72B}-Instruct-GPTQ-Int4/Int8 and -AWQ quantize only the decoder's linear
layers. Each such Linear (in_features I, out_features O, G = ceil(I / group_size) groups, or 1
for group_size -1) holds, instead of `.weight`:

  GPTQ  .qweight  int32 [I/n, O]   n = 32/bits values per int32; input row r is bits
                                   bits*(r%n) .. of qweight[r//n, :] (unsigned)
        .qzeros   int32 [G, O/n]   packed the same way along the output axis; v1 stores zero - 1
        .scales   float [G, O]
        .g_idx    int32 [I]        the group of each input row (a permutation of groups when
                                   desc_act, else r // group_size)
  AWQ   .qweight  int32 [I, O/8]   4 bit along the output axis: nibble i of word k is column
                                   8k + (0, 2, 4, 6, 1, 3, 5, 7)[i]
        .qzeros   int32 [G, O/8]   the same packing; the zero itself
        .scales   float [G, O]     groups of consecutive input rows

and W[r, c] = (q[r, c] - zero[group(r), c]) * scales[group(r), c], shaped [I, O]: already the
Dense kernel layout. `fold` replaces each such layer by one `.weight` entry, so the ordinary
name/shape check takes it from there; when the conversion keeps the weights packed, `packed`
gives the layer in qwen2vl_jax.quant.format's form (integers unpacked and repacked, zero points and
scales as stored, an act-order g_idx sorted into a one-time input permutation), else the
entry's load() dequantizes it to float.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np

from qwen2vl_jax.hf_mapping import hf_to_jax_name
from qwen2vl_jax.jsonio import read_json
from qwen2vl_jax.errors import CheckpointError, listing
from qwen2vl_jax.quant.format import pack_int4

PARTS = ("qweight", "qzeros", "scales", "g_idx")
AWQ_PARTS = ("qweight", "qzeros", "scales")
AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # nibble i of an AWQ word holds column AWQ_ORDER[i]
BITS = (4, 8)  # whole values per int32; 2/3 bits are rare and 3 does not pack evenly
ROWS = 4096  # input rows dequantized at a time: bounds the float32 temporaries

Tensor = tuple[str, Callable[[], np.ndarray], tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class GPTQ:
    bits: int
    group_size: int  # -1: one group over all input rows
    method: str = "gptq"  # or "awq"

    @property
    def parts(self) -> tuple[str, ...]:
        return PARTS if self.method == "gptq" else AWQ_PARTS

    @property
    def per_int(self) -> int:
        return 32 // self.bits

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else -(-in_features // self.group_size)

    def shapes(self, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
        """The four tensors' shapes for a Linear of the given size."""
        n, g = self.per_int, self.groups(in_features)
        if self.method == "awq":
            return {"qweight": (in_features, out_features // n), "qzeros": (g, out_features // n),
                    "scales": (g, out_features)}
        return {"qweight": (in_features // n, out_features), "qzeros": (g, out_features // n),
                "scales": (g, out_features), "g_idx": (in_features,)}


# ---------------------------------------------------------------- config
def quantization(raw: dict) -> GPTQ | None:
    """The checkpoint's GPTQ settings from a parsed config.json (top level, or under
    text_config in transformers 5's nested layout); None when it is not quantized. Any
    quantization this module cannot read is refused with one line."""
    text = raw.get("text_config")
    q = raw.get("quantization_config") or (text.get("quantization_config") if isinstance(text, dict) else None)
    if not q:
        return None
    if not isinstance(q, dict):
        raise CheckpointError("config.json: quantization_config is not a JSON object")
    method = str(q.get("quant_method", "unknown")).lower()
    if method == "awq":
        return _awq(q)
    if method != "gptq":
        raise CheckpointError(
            f"config.json: quantization method {method!r} is not supported (only GPTQ and AWQ checkpoints convert)"
        )
    fmt = str(q.get("checkpoint_format", "gptq"))
    if fmt != "gptq":
        raise CheckpointError(
            f"config.json: GPTQ checkpoint_format {fmt!r} is not supported (only AutoGPTQ's 'gptq' v1 format)"
        )
    bits, group_size = q.get("bits"), q.get("group_size", -1)
    if bits not in BITS:
        supported = " or ".join(map(str, BITS))
        raise CheckpointError(f"config.json: GPTQ with bits={bits} is not supported (only {supported})")
    _check_group(group_size, "GPTQ")
    return GPTQ(bits=bits, group_size=group_size)


def _check_group(group_size, what: str) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or (group_size <= 0 and group_size != -1):
        raise CheckpointError(f"config.json: {what} group_size {group_size!r} is not a positive integer or -1")


def _awq(q: dict) -> GPTQ:
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise CheckpointError(f"config.json: AWQ version {q.get('version')!r} is not supported (only GEMM packing)")
    if q.get("bits", q.get("w_bit", 4)) != 4:
        raise CheckpointError(f"config.json: AWQ with bits={q.get('bits', q.get('w_bit'))} is not supported (only 4)")
    if not q.get("zero_point", True):
        raise CheckpointError("config.json: AWQ without zero points is not supported")
    group_size = q.get("group_size", q.get("q_group_size", 128))
    _check_group(group_size, "AWQ")
    return GPTQ(bits=4, group_size=group_size, method="awq")


def read_quantization(folder: Path) -> GPTQ | None:
    """`quantization` of folder/config.json; None without one (Qwen2VLConfig.from_hf refuses that)."""
    raw = read_json(Path(folder) / "config.json", error=CheckpointError, missing_ok=True)
    return None if raw is None else quantization(raw)


def strip_quantization(config_path: Path) -> None:
    """Drops quantization_config from a copied config.json: the converted params are float, and
    an exported HF folder must not claim to be quantized."""
    raw = read_json(config_path, error=CheckpointError)
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    if "quantization_config" not in raw and "quantization_config" not in text:
        return
    raw.pop("quantization_config", None)
    text.pop("quantization_config", None)
    config_path.write_text(json.dumps(raw, indent=2) + "\n")


# ---------------------------------------------------------------- unpack and dequantize
def unpack(packed: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 [R, C] holding 32/bits unsigned values each -> uint32 [R*n, C] (axis 0) or
    [R, C*n] (axis 1); value j of a word sits at bits bits*j .. bits*j + bits - 1."""
    n, mask = 32 // bits, np.uint32(2**bits - 1)
    words = np.ascontiguousarray(packed).view(np.uint32)
    shifts = np.arange(n, dtype=np.uint32) * np.uint32(bits)
    rows, cols = words.shape
    if axis == 0:
        return ((words[:, None, :] >> shifts[None, :, None]) & mask).reshape(rows * n, cols)  # [R, n, C]
    return ((words[:, :, None] >> shifts) & mask).reshape(rows, cols * n)  # [R, C, n]


def dequantize(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray, bits: int,
               dtype=np.float32, name: str = "layer") -> np.ndarray:
    """A GPTQ layer -> W [I, O] in `dtype` (see `dequantize_layer`)."""
    arrays = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}
    return dequantize_layer(arrays, GPTQ(bits, -1), dtype, name)


def dequantize_layer(arrays: dict[str, np.ndarray], quant: GPTQ, dtype=np.float32, name: str = "layer") -> np.ndarray:
    """-> W [I, O] in `dtype`, W[r, c] = (q[r, c] - zero[group(r), c]) * scales[group(r), c].

    Computed in float32, where it is exact for fp16/bf16 scales ((q - zero) has at most 9
    bits), then rounded once to `dtype`; ROWS input rows at a time."""
    q, zeros, scales, g_idx = integers(arrays, quant, name)
    zeros, scales = zeros.astype(np.float32), scales.astype(np.float32)
    out = np.empty(q.shape, dtype)
    for start in range(0, q.shape[0], ROWS):
        g = g_idx[start:start + ROWS]
        out[start:start + ROWS] = (q[start:start + ROWS].astype(np.float32) - zeros[g]) * scales[g]
    return out


def awq_unpack(packed: np.ndarray) -> np.ndarray:
    """AWQ int32 [R, C] -> uint32 [R, 8C] in column order (undoing the interleaved nibbles)."""
    nibbles = unpack(packed, 4, axis=1)  # [R, 8C] in nibble order
    rows, cols = nibbles.shape
    out = np.empty_like(nibbles).reshape(rows, cols // 8, 8)
    out[:, :, AWQ_ORDER] = nibbles.reshape(rows, cols // 8, 8)
    return out.reshape(rows, cols)


def integers(arrays: dict[str, np.ndarray], quant: GPTQ, name: str = "layer"):
    """A layer's tensors -> (q uint8 [I, O], zeros uint8 [G, O], scales [G, O] as stored,
    g_idx [I]): the checkpoint's integers unpacked, nothing rounded."""
    _check_dtypes(arrays, name)
    mask = np.uint32(2**quant.bits - 1)
    scales = arrays["scales"]
    if quant.method == "awq":
        q = awq_unpack(arrays["qweight"])
        zeros = awq_unpack(arrays["qzeros"])
        g = quant.group_size if quant.group_size != -1 else q.shape[0]
        g_idx = np.arange(q.shape[0]) // g
    else:
        q = unpack(arrays["qweight"], quant.bits, axis=0)
        zeros = (unpack(arrays["qzeros"], quant.bits, axis=1) + 1) & mask  # v1 stores zero - 1
        g_idx = np.asarray(arrays["g_idx"])
    groups = scales.shape[0]
    if g_idx.size and (g_idx.min() < 0 or g_idx.max() >= groups):
        raise CheckpointError(f"{name}.g_idx: group ids outside 0..{groups - 1}")
    return q.astype(np.uint8), zeros.astype(np.uint8), scales, g_idx


def packed(arrays: dict[str, np.ndarray], quant: GPTQ, name: str = "layer") -> dict[str, np.ndarray]:
    """A layer's tensors -> qwen2vl_jax.quant.format's packed leaves, without a float round trip.

    The rows are sorted by group (a stable sort: the identity for an ordered g_idx, which then
    needs no `perm`); the groups become runs of g' rows, g' the largest step that every group
    boundary falls on (the group size, unless a group is short), with scales and zero points
    repeated where one group spans several runs."""
    q, zeros, scales, g_idx = integers(arrays, quant, name)
    in_features = q.shape[0]
    order = np.argsort(g_idx, kind="stable")
    sorted_groups = g_idx[order]
    bounds = np.flatnonzero(np.diff(sorted_groups)) + 1
    step = int(np.gcd.reduce(np.concatenate([bounds, [in_features]]).astype(np.int64)))
    run_group = sorted_groups[::step]  # [I / g'] the group of each run
    out = {"qweight": q[order] if quant.bits == 8 else pack_int4(q[order]),
           "scales": np.ascontiguousarray(scales[run_group]), "zeros": np.ascontiguousarray(zeros[run_group])}
    if not np.array_equal(order, np.arange(in_features)):
        out["perm"] = order.astype(np.int32)
    return out


def _check_dtypes(arrays: dict[str, np.ndarray], name: str) -> None:
    for part in ("qweight", "qzeros", "g_idx"):
        if part in arrays and not np.issubdtype(arrays[part].dtype, np.integer):
            raise CheckpointError(f"{name}.{part}: dtype {arrays[part].dtype}, expected int32")
    if arrays["qweight"].dtype.itemsize != 4 or arrays["qzeros"].dtype.itemsize != 4:
        raise CheckpointError(f"{name}.qweight/.qzeros: dtype {arrays['qweight'].dtype}/{arrays['qzeros'].dtype}, "
                              "expected int32")
    scales = arrays["scales"]
    if not np.issubdtype(scales.dtype, np.floating) and scales.dtype.name != "bfloat16":
        raise CheckpointError(f"{name}.scales: dtype {scales.dtype}, expected a float type")


# ---------------------------------------------------------------- the hook into the plan
def fold(tensors: list[Tensor], expected: dict[str, tuple[int, ...]], quant: GPTQ,
         dtype=np.float32, keep: dict | None = None) -> tuple[list[Tensor], list[str]]:
    """Replaces every quantized layer's tensors (qweight, qzeros, scales and, for GPTQ, g_idx)
    with one `.weight` entry in the torch layout [O, I] whose load() dequantizes, so
    `plan_conversion` checks and maps it like a float Linear. With `keep` (a dict), the
    conversion keeps the layers packed: keep[name + ".weight"] is a load() -> `packed` leaves.

    Each tensor's shape is checked against the Linear the config expects; the problems
    (wrong shapes, missing parts) are returned for `plan_conversion` to report with its own.
    Groups whose layer the config does not have are passed through, to be reported unmapped.
    """
    layers: dict[str, dict[str, Tensor]] = {}
    out: list[Tensor] = []
    for tensor in tensors:
        prefix, _, part = tensor[0].rpartition(".")
        if part in quant.parts:
            layers.setdefault(prefix, {})[part] = tensor
        else:
            out.append(tensor)
    problems = []
    for prefix, parts in layers.items():
        mapped = hf_to_jax_name(prefix + ".weight")
        if mapped is None or mapped[1] != "linear" or mapped[0] not in expected:
            out.extend(parts.values())
            continue
        in_features, out_features = expected[mapped[0]]
        lacking = [f"{prefix}.{p}" for p in quant.parts if p not in parts]
        if lacking:
            problems.append(f"{prefix}: quantized layer lacks {listing(lacking)}")
        if in_features % quant.per_int or out_features % quant.per_int:
            problems.append(f"{prefix}: the config's ({in_features}, {out_features}) Linear cannot hold "
                            f"{quant.per_int} {quant.bits}-bit values per int32")
        else:
            want = quant.shapes(in_features, out_features)
            for part, (name, _, shape) in parts.items():
                if tuple(shape) != want[part]:
                    problems.append(f"{name}: checkpoint shape {tuple(shape)}, config expects {want[part]}")

        def arrays(parts=parts) -> dict[str, np.ndarray]:
            return {p: parts[p][1]() for p in quant.parts}

        def load(arrays=arrays, prefix=prefix) -> np.ndarray:
            return dequantize_layer(arrays(), quant, dtype, prefix).T  # a view; [O, I]

        out.append((prefix + ".weight", load, (out_features, in_features)))
        if keep is not None:
            keep[prefix + ".weight"] = lambda arrays=arrays, prefix=prefix: packed(arrays(), quant, prefix)
    return out, problems

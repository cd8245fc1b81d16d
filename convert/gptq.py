"""GPTQ-Int4 checkpoints (AutoGPTQ's "gptq" v1 format): read, check and dequantize.

Qwen2-VL-{2B,7B,72B}-Instruct-GPTQ-Int4 quantize only the decoder's linear layers. Each such
Linear (in_features I, out_features O, G = ceil(I / group_size) groups, or 1 for group_size -1)
holds, instead of `.weight`:

    .qweight  int32 [I/n, O]   n = 32/bits values per int32; input row r is bits
                               bits*(r%n) .. of qweight[r//n, :] (unsigned)
    .qzeros   int32 [G, O/n]   packed the same way along the output axis; v1 stores zero - 1
    .scales   float [G, O]
    .g_idx    int32 [I]        the group of each input row (a permutation of groups when
                               desc_act, else r // group_size)

and W[r, c] = (q[r, c] - zero[g_idx[r], c]) * scales[g_idx[r], c], shaped [I, O]: already the
Dense kernel layout. `fold` replaces each such group by one float `.weight` entry, so the
ordinary name/shape check and the layer-by-layer writer take it from there; dequantizing
happens only when the writer loads the tensor.
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

PARTS = ("qweight", "qzeros", "scales", "g_idx")
BITS = (4, 8)  # whole values per int32; 2/3 bits are rare and 3 does not pack evenly
ROWS = 4096  # input rows dequantized at a time: bounds the float32 temporaries

Tensor = tuple[str, Callable[[], np.ndarray], tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class GPTQ:
    bits: int
    group_size: int  # -1: one group over all input rows

    @property
    def per_int(self) -> int:
        return 32 // self.bits

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else -(-in_features // self.group_size)

    def shapes(self, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
        """The four tensors' shapes for a Linear of the given size."""
        n, g = self.per_int, self.groups(in_features)
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
    if method != "gptq":
        raise CheckpointError(
            f"config.json: quantization method {method!r} is not supported (only GPTQ checkpoints convert)"
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
    if not isinstance(group_size, int) or isinstance(group_size, bool) or (group_size <= 0 and group_size != -1):
        raise CheckpointError(f"config.json: GPTQ group_size {group_size!r} is not a positive integer or -1")
    return GPTQ(bits=bits, group_size=group_size)


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
    """-> W [I, O] in `dtype`, W[r, c] = (q[r, c] - zero[g_idx[r], c]) * scales[g_idx[r], c].

    Computed in float32, where it is exact for fp16/bf16 scales ((q - zero) has at most 9
    bits), then rounded once to `dtype`; ROWS input rows at a time."""
    for part, array in (("qweight", qweight), ("qzeros", qzeros), ("g_idx", g_idx)):
        if not np.issubdtype(array.dtype, np.integer):
            raise CheckpointError(f"{name}.{part}: dtype {array.dtype}, expected int32")
    if qweight.dtype.itemsize != 4 or qzeros.dtype.itemsize != 4:
        raise CheckpointError(f"{name}.qweight/.qzeros: dtype {qweight.dtype}/{qzeros.dtype}, expected int32")
    if not np.issubdtype(scales.dtype, np.floating) and scales.dtype.name != "bfloat16":
        raise CheckpointError(f"{name}.scales: dtype {scales.dtype}, expected a float type")
    groups = scales.shape[0]
    if g_idx.size and (g_idx.min() < 0 or g_idx.max() >= groups):
        raise CheckpointError(f"{name}.g_idx: group ids outside 0..{groups - 1}")
    # v1 stores zero - 1, wrapping within `bits` as AutoGPTQ reads it back; [G, O]
    zeros = ((unpack(qzeros, bits, axis=1) + 1) & np.uint32(2**bits - 1)).astype(np.float32)
    scales = scales.astype(np.float32)
    n = 32 // bits
    in_features, out_features = qweight.shape[0] * n, qweight.shape[1]
    out = np.empty((in_features, out_features), dtype)
    for start in range(0, in_features, ROWS):  # ROWS is a multiple of n
        stop = min(start + ROWS, in_features)
        q = unpack(qweight[start // n:stop // n], bits, axis=0).astype(np.float32)  # [rows, O]
        g = g_idx[start:stop]
        out[start:stop] = (q - zeros[g]) * scales[g]
    return out


# ---------------------------------------------------------------- the hook into the plan
def fold(tensors: list[Tensor], expected: dict[str, tuple[int, ...]], quant: GPTQ,
         dtype=np.float32) -> tuple[list[Tensor], list[str]]:
    """Replaces every quantized layer's {qweight, qzeros, scales, g_idx} with one `.weight`
    entry in the torch layout [O, I] whose load() dequantizes, so `plan_conversion` checks and
    maps it like a float Linear.

    Each tensor's shape is checked against the Linear the config expects; the problems
    (wrong shapes, missing parts) are returned for `plan_conversion` to report with its own.
    Groups whose layer the config does not have are passed through, to be reported unmapped.
    """
    layers: dict[str, dict[str, Tensor]] = {}
    out: list[Tensor] = []
    for tensor in tensors:
        prefix, _, part = tensor[0].rpartition(".")
        if part in PARTS:
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
        lacking = [f"{prefix}.{p}" for p in PARTS if p not in parts]
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

        def load(parts=parts, prefix=prefix) -> np.ndarray:
            arrays = {p: parts[p][1]() for p in PARTS}
            return dequantize(**arrays, bits=quant.bits, dtype=dtype, name=prefix).T  # a view; [O, I]

        out.append((prefix + ".weight", load, (out_features, in_features)))
    return out, problems

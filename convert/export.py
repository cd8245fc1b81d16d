"""Converted folder -> HF checkpoint folder (safetensors in the published naming, with config).

The mirror of `convert.py`: the stored params are checked against config.json first, then
restored one layer at a time (Orbax partial load), transposed back to torch's layout and
streamed into safetensors shards tensor by tensor; all of it in a temporary sibling that is
renamed to HF_DIR at the end. `transformers.Qwen2VLForConditionalGeneration.from_pretrained`
loads the result. With an adapter (PEFT's LoRA folder) each adapted kernel is written merged,
W + scale * A @ B, computed in float32 and rounded once to the written dtype.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from qwen2vl_jax import checkpoint
from qwen2vl_jax import interrupts
from qwen2vl_jax.convert.convert import OUTPUT_DTYPES, check_destination, group_of, staging
from qwen2vl_jax.hf_mapping import expected_hf_shape, jax_to_hf_name, to_hf
from qwen2vl_jax.jsonio import read_json
from qwen2vl_jax.lora.layer import A, B, SCALE
from qwen2vl_jax.lora.peft_format import load_adapter
from qwen2vl_jax.lora.tree import merged_kernel
from qwen2vl_jax.modules.qwen2vl import init_shapes
from qwen2vl_jax.safetensors_io import DTYPES, save_file_streaming
from qwen2vl_jax.errors import CheckpointError, InputError

DEFAULT_SHARD_BYTES = 5 * 10**9  # what transformers' save_pretrained uses


def parse_size(text: str | int, name: str = "max_shard_size") -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes; `name` is what the error calls the value
    (the CLI passes its flag)."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = str(text).strip().upper()
    num = s.rstrip("KMGIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in units or not 0 < value < float("inf"):  # nan fails too
        raise InputError(f"{name} {str(text)!r} is not a size (use e.g. 5GB, 500MB, 2GiB)")
    return int(value * units[unit])


def _hf_config(src: Path, dtype_name: str) -> dict:
    """The folder's own config.json, with its dtype field set to what the weights hold."""
    raw = read_json(src / "config.json", error=CheckpointError)
    keys = [k for k in ("torch_dtype", "dtype") if k in raw] or ["torch_dtype"]
    for k in keys:
        raw[k] = dtype_name
    return raw


def export_checkpoint(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    force: bool = False,
    max_shard_size: str | int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    adapter: str | os.PathLike | None = None,
) -> Path:
    """Writes the converted folder `source` as an HF checkpoint folder `out_dir`; returns it.

    dtype: 'bfloat16' or 'float32'; None keeps the stored dtype.
    max_shard_size: bytes per safetensors file (str like '5GB' accepted); more -> an index.
    adapter: a PEFT LoRA adapter folder merged into the weights (`lora.peft_format`).
    """
    src = Path(source).expanduser()
    out = Path(out_dir).expanduser()
    if not src.is_dir():
        raise InputError(f"no such folder: {source}")
    if not checkpoint.is_converted(src):
        raise CheckpointError(
            f"{src} is not a converted folder (no {checkpoint.MARKER}); qwen2vl-export reads what qwen2vl-convert writes"
        )
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise InputError(f"dtype must be one of {', '.join(OUTPUT_DTYPES)}, not {dtype!r}")
    shard_bytes = parse_size(max_shard_size)
    check_destination(out, [src], force, out_name="HF_DIR", source_name="MODEL_DIR")
    checkpoint.read_marker(src)
    config = checkpoint.read_config(src)
    scheme = checkpoint.read_scheme(src)
    if scheme is not None:
        raise InputError(f"{src} holds {scheme.method}-quantized params; qwen2vl-export writes float weights "
                         "(export the float model it was converted from)")
    stored = checkpoint.check_params(src, config)
    lora = {} if adapter is None else load_adapter(adapter, init_shapes(config))
    unknown = sorted({p.rpartition("/")[0] + "/kernel" for p in lora} - set(stored))
    if unknown:
        raise CheckpointError(f"the adapter sits on weights {src} does not hold as float kernels: {unknown[:3]}")

    v = config.vision
    conv_shape = (v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    # One entry per tensor, grouped by layer so each layer is restored once.
    entries = []  # (hf_name, np dtype, hf shape, jax path, transform)
    for path in sorted(stored, key=lambda p: (group_of(p), p)):
        shape, stored_dtype = stored[path]
        name, transform = jax_to_hf_name(path)
        out_dtype = np.dtype(DTYPES["BF16"] if dtype == "bfloat16" else np.float32) if dtype else stored_dtype
        entries.append((name, out_dtype, expected_hf_shape(transform, shape, conv_shape), path, transform))
    dtypes = {e[1].name for e in entries}
    dtype_name = dtypes.pop() if len(dtypes) == 1 else "float32"

    shards, size = [[]], 0
    for e in entries:
        nbytes = int(np.prod(e[2])) * e[1].itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    from tqdm import tqdm

    by_name = {e[0]: e for e in entries}
    cache: dict = {"group": None, "arrays": {}}

    def produce(hf_name: str) -> np.ndarray:
        interrupts.check()
        _, out_dtype, hf_shape, path, transform = by_name[hf_name]
        group = group_of(path)
        if cache["group"] != group:
            cache["arrays"] = {}  # drop the previous layer before restoring the next
            paths = [e[3] for e in entries if group_of(e[3]) == group]
            cache["arrays"] = checkpoint.load_numpy(src, paths)
            cache["group"] = group
        array = cache["arrays"].pop(path)
        head = path.rpartition("/")[0]
        if path.endswith("/kernel") and f"{head}/{A}" in lora:
            array = merged_kernel(array, *(lora[f"{head}/{k}"] for k in (A, B, SCALE)), dtype=out_dtype)
        array = to_hf(array, transform, hf_shape)
        bar.update(1)
        return array.astype(out_dtype, copy=False)

    with staging(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(_hf_config(src, dtype_name), indent=2) + "\n")
        checkpoint.copy_side_files(src, tmp, skip=("config.json",))
        weight_map, total = {}, 0
        with tqdm(total=len(entries), desc="exporting", unit="tensor", disable=not progress) as bar:
            for shard, fname in zip(shards, names):
                total += save_file_streaming(tmp / fname, [(e[0], e[1], e[2]) for e in shard], produce,
                                             metadata={"format": "pt"})
                weight_map.update({e[0]: fname for e in shard})
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out

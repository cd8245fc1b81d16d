"""Streaming access to HF safetensors checkpoints, with no torch.

A safetensors file is an 8-byte little-endian header size, a JSON header (name -> dtype, shape,
byte range) and the raw data. Tensors are memory-mapped and copied out one at a time, so
converting a checkpoint never holds more than one input tensor in memory.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from qwen2vl_jax.errors import CheckpointError, listing
from qwen2vl_jax.jsonio import parse_json, read_json

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def read_header(path: Path) -> tuple[dict, int]:
    """-> (header dict without __metadata__, byte offset where the data starts)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (too short)")
            (size,) = struct.unpack("<Q", raw)
            if size > 100_000_000:
                raise CheckpointError(f"{path}: not a safetensors file (header size {size})")
            text = f.read(size)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(text) != size:
        raise CheckpointError(f"{path}: not a safetensors file (the header runs past the end of the file)")
    header = parse_json(text, f"{path}: safetensors header", error=CheckpointError, expect=None)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (the header is not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + size


def load_tensor(path: Path, info: dict, data_start: int) -> np.ndarray:
    dtype = DTYPES.get(info["dtype"])
    if dtype is None:
        raise CheckpointError(f"{path}: unsupported tensor dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
        raise CheckpointError(f"{path}: tensor byte range does not match its shape {shape}")
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start + begin, shape=(end - begin,))
    return np.array(mm.view(dtype).reshape(shape))  # a private copy; the map is dropped


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF checkpoint folder (from the index when there is one)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, error=CheckpointError).get("weight_map")
        if weight_map is None:
            raise CheckpointError(f"{index}: malformed index (no weight_map)")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: malformed index (weight_map is not an object of tensor name -> file name)")
        files = sorted({folder / name for name in weight_map.values()})
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise CheckpointError(f"{folder}: the index names missing shard(s): {listing(absent)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no .safetensors files")
    return files


def list_tensors(folder: Path) -> list[tuple[str, Callable[[], np.ndarray], tuple[int, ...]]]:
    """(name, load, shape) for every tensor of the checkpoint; nothing is read until load()."""
    out = []
    for path in checkpoint_files(folder):
        header, start = read_header(path)
        for name, info in header.items():
            out.append((name, (lambda p=path, i=info, s=start: load_tensor(p, i, s)), tuple(info["shape"])))
    return out


def save_file(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Writes a safetensors file, streaming each tensor's bytes."""
    arrays = {name: np.ascontiguousarray(a) for name, a in tensors.items()}
    save_file_streaming(
        path, [(n, a.dtype, a.shape) for n, a in arrays.items()], arrays.__getitem__, metadata
    )


def save_file_streaming(
    path: Path,
    entries: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> int:
    """Writes a safetensors file whose tensors are made one at a time.

    entries: (name, dtype, shape) in file order; the header is written from these first, then
    `produce(name)` is called for each and its bytes appended, so only one tensor is held.
    Returns the bytes of tensor data written.
    """
    entries = list(entries)
    header: dict = {}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in entries:
            array = np.ascontiguousarray(produce(name))
            if array.dtype != np.dtype(dtype) or tuple(array.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {array.dtype}{tuple(array.shape)}, header says {dtype}{tuple(shape)}")
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
    return offset

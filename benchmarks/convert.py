"""Conversion at full 2B size: wall time and peak RSS of qwen2vl-convert (and qwen2vl-export).

Builds a random bf16 checkpoint with the exact names, shapes and two-shard split of the
published Qwen2-VL-2B (about 4.4 GB, written once to a temporary folder), converts it with the
CLI in a child process, exports it back, and prints one table. Peak RSS is the child's
ru_maxrss. Target: convert peak RSS <= 1.5x the checkpoint size.

    python benchmarks/convert.py [--workdir DIR] [--keep] [--skip-export]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "qwen2-vl-2b"


def hf_tensors(config) -> dict[str, tuple[tuple[int, ...], str]]:
    """Published HF name -> (shape, file) for the 2B, from our table and the 2B shapes."""
    from qwen2vl_jax.checkpoint import expected_shapes
    from qwen2vl_jax.hf_mapping import expected_hf_shape, jax_to_hf_name

    v = config.vision
    conv = (v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    out = {}
    for path, shape in expected_shapes(config).items():
        name, transform = jax_to_hf_name(path)
        out[name] = expected_hf_shape(transform, shape, conv)
    return out


def build_checkpoint(folder: Path) -> int:
    """Writes the random 2B checkpoint; returns its size in bytes (tensor data)."""
    import ml_dtypes

    from qwen2vl_jax.config import QWEN2_VL_2B, Qwen2VLConfig
    from qwen2vl_jax.safetensors_io import save_file_streaming

    folder.mkdir(parents=True)
    if ASSETS.exists():  # the published files: config, tokenizer, and the shard split of the index
        for p in ASSETS.iterdir():
            if p.name != "model.safetensors.index.json":
                shutil.copyfile(p, folder / p.name)
        config = Qwen2VLConfig.from_hf(folder)
        weight_map = json.loads((ASSETS / "model.safetensors.index.json").read_text())["weight_map"]
    else:
        config = QWEN2_VL_2B
        (folder / "config.json").write_text(json.dumps(config.to_hf()))
        weight_map = None
    shapes = hf_tensors(config)
    if weight_map is None:
        names = sorted(shapes)
        weight_map = {n: f"model-0000{1 + (i >= len(names) // 2)}-of-00002.safetensors" for i, n in enumerate(names)}
    assert set(weight_map) == set(shapes), sorted(set(weight_map) ^ set(shapes))[:5]

    # Values: slices of one random block (N(0, 0.02) in bf16), so building is fast but the
    # bytes look like weights (same compressibility).
    pool = (np.random.default_rng(0).standard_normal(1 << 26, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(1)

    def make(name):
        n = int(np.prod(shapes[name]))
        if n > pool.size:
            return np.tile(pool, -(-n // pool.size))[:n].reshape(shapes[name])
        start = int(rng.integers(0, pool.size - n + 1))
        return pool[start:start + n].reshape(shapes[name])

    total = 0
    for fname in sorted(set(weight_map.values())):
        names = sorted(n for n, f in weight_map.items() if f == fname)
        total += save_file_streaming(folder / fname, [(n, ml_dtypes.bfloat16, shapes[n]) for n in names], make,
                                     metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def run_child(args: list[str]) -> tuple[float, float]:
    """Runs a CLI in a child process -> (wall seconds, peak RSS bytes of that child)."""
    code = "import sys; from qwen2vl_jax.convert.cli import {0}; sys.exit({0}(sys.argv[1:]))"
    main = "convert_main" if args[0] == "convert" else "export_main"
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code.format(main), *args[1:], "--quiet"])
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{args[0]} failed with exit code {proc.returncode}")
    return wall, usage.ru_maxrss * 1024  # Linux reports KiB


def same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of `a` equals `b`'s byte for byte (read one at a time)."""
    from qwen2vl_jax.safetensors_io import list_tensors

    left = {name: (load, shape) for name, load, shape in list_tensors(a)}
    right = {name: (load, shape) for name, load, shape in list_tensors(b)}
    if set(left) != set(right):
        return False
    for name, (load, _) in left.items():
        x, y = load(), right[name][0]()
        if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x.view(np.uint16), y.view(np.uint16)):
            return False
    return True


def du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", help="where to put the ~12 GB of temporary files (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="do not delete the temporary files")
    ap.add_argument("--skip-export", action="store_true", help="only time the conversion")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="qwen2vl-convert-bench-", dir=args.workdir))
    try:
        hf, jx, back = work / "hf", work / "jax", work / "hf_back"
        t = time.perf_counter()
        size = build_checkpoint(hf)
        print(f"built random 2B bf16 checkpoint: {size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s",
              file=sys.stderr)
        rows = []
        wall, rss = run_child(["convert", str(hf), str(jx)])
        rows.append(("convert (bf16 -> bf16)", wall, rss, du(jx)))
        if not args.skip_export:
            wall, rss = run_child(["export", str(jx), str(back)])
            rows.append(("export (back to HF)", wall, rss, du(back)))
            exact = same_tensors(hf, back)
        print(f"\ncheckpoint: {size / 1e9:.2f} GB of bf16 tensors (Qwen2-VL-2B shapes, 2 shards); "
              f"{np.__name__} {np.__version__}, {sys.platform}")
        print(f"| {'step':24s} | {'wall s':>7s} | {'peak RSS GB':>11s} | {'RSS / ckpt':>10s} | {'output GB':>9s} |")
        print(f"|{'-' * 26}|{'-' * 9}|{'-' * 13}|{'-' * 12}|{'-' * 11}|")
        for name, wall, rss, out_bytes in rows:
            print(f"| {name:24s} | {wall:7.1f} | {rss / 1e9:11.2f} | {rss / size:9.2f}x | {out_bytes / 1e9:9.2f} |")
        if not args.skip_export:
            print(f"\nround trip HF -> JAX -> HF bit-exact on every tensor: {'yes' if exact else 'NO'}")
        ok = rows[0][2] <= 1.5 * size
        print(f"\ntarget convert peak RSS <= 1.5x checkpoint: {'met' if ok else 'MISSED'}")
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

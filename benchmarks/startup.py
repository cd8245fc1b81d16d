"""Start-up time of `qwen2vl-generate` with and without the persistent compile cache.

    python benchmarks/startup.py [--model DIR] [--image PATH] [--prompt TEXT] [--max-new-tokens N]
                                 [--rounds 2] [-- extra qwen2vl-generate flags, e.g. --mesh tensor=2]

Runs the command as a fresh process each time, on the same shapes: first with an empty cache
folder (everything compiles and is written), then alternately with that folder warm (the
programs load from disk) and with the cache off (`--no-compile-cache`, the peer: what every run
cost before the cache). Prints one table: the wall time of each run (process start to exit:
imports, loading, compiling or loading programs, generating) and the cache's files and size.
Default: the shipped demo model with its example image.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qwen2vl_jax.config import DEMO_DIR


def run_once(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"qwen2vl-generate failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, proc.stdout.strip()


def folder_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO_DIR))
    p.add_argument("--image", default=str(DEMO_DIR / "example.png"))
    p.add_argument("--prompt", default="What shape is this?")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="warm and cache-off runs, alternating (default: 2)")
    p.add_argument("extra", nargs="*", help="more qwen2vl-generate flags (after --)")
    args = p.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k not in ("QWEN2VL_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    base = [sys.executable, "-m", "qwen2vl_jax.cli", "--model", args.model, "--image", args.image,
            "--prompt", args.prompt, "--max-new-tokens", str(args.max_new_tokens), "--json", *args.extra]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "jax-cache"
        with_cache = base + ["--compile-cache", str(cache)]
        wall, answer = run_once(with_cache, env)
        rows.append(("empty cache (compiles, writes)", wall, *folder_size(cache)))
        for _ in range(args.rounds):
            wall, again = run_once(with_cache, env)
            assert again == answer, (again, answer)  # the cached programs give the same answer
            rows.append(("warm cache", wall, *folder_size(cache)))
            wall, again = run_once(base + ["--no-compile-cache"], env)
            assert again == answer, (again, answer)
            rows.append(("cache off (--no-compile-cache)", wall, 0, 0))
    warm = min(w for name, w, *_ in rows if name == "warm cache")
    off = min(w for name, w, *_ in rows if name.startswith("cache off"))
    print(f"qwen2vl-generate on {Path(args.model).name}, {args.max_new_tokens} new tokens, one process per run")
    print(f"{'run':34} {'wall_s':>7} {'cache files':>11} {'cache MB':>9}")
    for name, wall, files, size in rows:
        print(f"{name:34} {wall:7.2f} {files:11d} {size / 1e6:9.2f}")
    print(f"best warm {warm:.2f} s against best cache-off {off:.2f} s: {off / warm:.2f}x faster start")
    return 0


if __name__ == "__main__":
    sys.exit(main())

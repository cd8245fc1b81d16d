"""qwen2vl-serve against abusive requests: bounded work per request, and no starvation, one table.

    python benchmarks/abuse.py [--text-mb 20] [--clients 6] [--images 8] [--side 8192] [--timeout 10]

The server (the demo model) runs in its own process (`python -m qwen2vl_jax.serving.cli`) on a free
port, started here with --request-timeout TIMEOUT and an image pixel limit that admits SIDE x SIDE.
Cases:
  text body   one request whose message is TEXT_MB of plain words: how long until it is refused,
              and how much the server's resident memory grew (now, and at its peak) from before it
  images      CLIENTS clients at once, each sending IMAGES different SIDE x SIDE PNGs in one
              request; 2 s later a short text request. The text request's time, and the time at
              which the last image request ended (504 at the deadline, or 200), from its start
Figures are wall-clock seconds on this machine; the asked column is what the server must meet.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from common import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mb(pid: int) -> tuple[float, float]:
    """(resident, peak resident) of a process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def start_server(port: int, args) -> subprocess.Popen:
    import httpx

    argv = [sys.executable, "-m", "qwen2vl_jax.serving.cli", "--port", str(port), "--max-batch", "4",
            "--max-context", "1024", "--request-timeout", str(args.timeout), "--max-body-mb", "128",
            "--max-image-pixels", str(args.side * args.side)]
    proc = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.DEVNULL)
    while True:
        if proc.poll() is not None:
            sys.exit(f"abuse.py: the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def post(url: str, body: bytes, timeout: float = 300) -> tuple[int, float]:
    import httpx

    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=timeout,
                   headers={"Content-Type": "application/json"})
    return r.status_code, time.perf_counter() - t0


def pngs(side: int, n: int) -> list[bytes]:
    """n different PNGs of side x side (one picture; a text chunk of its own in each, so their
    bytes, and any cache key made from them, differ while decoding costs the same)."""
    from PIL import Image

    ramp = np.arange(side, dtype=np.uint16)
    shape = (side, side)
    pixels = np.stack([(ramp[:, None] + ramp[None, :]) % 256, np.broadcast_to((ramp[:, None] * 3) % 256, shape),
                       np.broadcast_to((ramp[None, :] * 5) % 256, shape)], -1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG", compress_level=1)
    base = out.getvalue()
    head, rest = base[:33], base[33:]  # the signature and IHDR, then the rest
    images = []
    for i in range(n):
        data = b"note\x00" + str(i).encode()
        chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
        images.append(head + chunk + rest)
    return images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text-mb", type=float, default=20.0)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--side", type=int, default=8192)
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(port, args)
    rows = []
    try:
        # ---- one huge text body
        words = "lorem ipsum dolor sit amet " * int(args.text_mb * 1e6 / 27)
        body = json.dumps({"messages": [{"role": "user", "content": words}]}).encode()
        del words
        before, peak_before = memory_mb(proc.pid)
        status, took = post(url, body)
        del body
        time.sleep(0.5)
        after, peak_after = memory_mb(proc.pid)
        rows.append((f"{args.text_mb:g} MB text body: refused", "< 15 s", f"{took:.2f} s (status {status})"))
        rows.append((f"{args.text_mb:g} MB text body: server RSS growth", "< 1 GB",
                     f"{after - before:+.0f} MB after, {peak_after - before:+.0f} MB at peak"))

        # ---- image-heavy clients and a text request among them
        images = pngs(args.side, args.clients * args.images)
        bodies = []
        for c in range(args.clients):
            parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(img).decode()}}
                     for img in images[c * args.images:(c + 1) * args.images]]
            bodies.append(json.dumps({"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "What is it?"}]}],
                                      "max_tokens": 4}).encode())
        del images
        text_body = json.dumps({"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4}).encode()
        with concurrent.futures.ThreadPoolExecutor(args.clients + 1) as pool:
            t0 = time.perf_counter()
            futures = [pool.submit(post, url, b) for b in bodies]
            time.sleep(2.0)
            text_status, text_took = pool.submit(post, url, text_body).result()
            results = [f.result() for f in futures]
        ends = [took for _, took in results]
        statuses = sorted({s for s, _ in results})
        mb = sum(len(b) for b in bodies) / len(bodies) / 1e6
        what = f"{args.clients} clients x {args.images} {args.side}x{args.side} images ({mb:.0f} MB each)"
        rows.append((f"text request sent 2 s into {what}", "< 15 s", f"{text_took:.2f} s (status {text_status})"))
        rows.append((f"image requests end ({what}, --request-timeout {args.timeout:g})", "< 15 s, 504 or 200",
                     f"last at {max(ends):.2f} s, first at {min(ends):.2f} s (status {', '.join(map(str, statuses))})"))
        time.sleep(1.0)
        rows.append(("server still answering afterwards", "200",
                     str(post(url, text_body)[0])))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

    widths = [max(len(r[i]) for r in rows + [("case", "asked", "measured")]) for i in range(3)]
    for r in [("case", "asked", "measured"), tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()

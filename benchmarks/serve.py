"""qwen2vl-serve under load: 1, 4 and 16 concurrent clients streaming chat completions, one table.

    python benchmarks/serve.py [--size demo|small|2b] [--clients 1,4,16] [--requests N]
        [--new-tokens 32] [--image 448 | --image 0] [--max-batch 16] [--max-context 512] [--dtype float32|bfloat16]
        [--turns 3] [--compare FLAG=ON,OFF [--rounds 2]] [--server-flags "..."]

--turns T: each request is a chat of T turns, each resending the history (and the first turn's
image) with a new question; TTFT is reported for the first turn and for the later ones.
--compare FLAG=ON,OFF (e.g. prefill-chunk=512,0 or prefix-cache-gb=1,0): two servers that
differ in that one qwen2vl-serve flag, the workload run on each in turn, --rounds times
(alternating, so a busy machine slows both alike), one table with a row per setting.

The server runs in its own process (`python -m qwen2vl_jax.serving.cli`), started here; the clients
are asyncio tasks in this process, each sending its next request as soon as the last one ends.
Every request carries a different random IMAGE x IMAGE PNG (so the vision cache never helps)
and a short question (with --image 0, a short text question alone), asks for NEW tokens with EOS ignored, and streams them.
  demo   the small model shipped with the package
  small  Qwen2-VL-2B's widths and vocabulary (the 7B-Instruct tokenizer and template from the
         reference assets), 4 decoder layers and 4 vision blocks, random weights
  2b     Qwen2-VL-2B's shapes, random bfloat16 weights
Columns: requests/s and output tokens/s over the level's wall time; time to first token and
time per output token after the first (per request), p50/p99; failed requests; the server's
resident memory after warm-up and at the end. The peer is the first row (x first row: output
tokens/s against the first level's, one client by default); with --size 2b, vLLM's CPU build on the same workload is
printed beside (figures measured with its CPU build on a 2-core machine).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import REPO, model_folder

# vLLM's CPU build, Qwen2-VL-2B shapes, 448x448 image per request, 32 tokens, on a 2-core CPU machine.
VLLM_2B = {1: {"tok_s": 1.55, "ttft_p50": 13.4}, 4: {"tok_s": 2.10}, 16: {"tok_s": 2.24, "ttft_p50": 167.0},
           "rss_gb": 15.0, "startup_s": 195.0}


# ------------------------------------------------------------------ the server process
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_gb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def start_server(args, folder: Path, port: int, extra: list[str] = ()) -> tuple[subprocess.Popen, float]:
    argv = [sys.executable, "-m", "qwen2vl_jax.serving.cli", "--model", str(folder), "--port", str(port),
            "--max-batch", str(args.max_batch), "--max-context", str(args.max_context),
            "--max-queue", "1024", "--request-timeout", "3600", "--vision-cache", "0", "--served-model-name", "bench",
            *args.server_flags.split(), *extra]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    if args.matmul:
        argv += ["--matmul", args.matmul]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO)
    import httpx

    while True:
        if proc.poll() is not None:
            sys.exit(f"serve.py: the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


# ------------------------------------------------------------------ the clients
def image_uri(size: int, seed: int) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


QUESTIONS = ("Describe this picture in detail.", "What colours stand out most?", "Summarise your answers in one line.")


async def one_request(client, url: str, args, seed: int) -> dict | list[dict]:
    if args.image:
        content = [{"type": "image_url", "image_url": {"url": image_uri(args.image, seed)}},
                   {"type": "text", "text": QUESTIONS[0]}]
    else:  # text only: a short question, different per request
        content = f"Write story number {seed} about a red square and a blue circle."
    messages = [{"role": "user", "content": content}]
    if args.turns <= 1:
        return await one_turn(client, url, args, messages)
    out = []
    for turn in range(args.turns):
        if turn:
            messages += [{"role": "assistant", "content": out[-1].get("text", "")},
                         {"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]}]
        out.append({**await one_turn(client, url, args, messages), "turn": turn})
        if not out[-1]["ok"]:
            break
    return out


async def one_turn(client, url: str, args, messages: list[dict]) -> dict:
    body = {"model": "bench", "max_tokens": args.new_tokens, "ignore_eos": True, "stream": True,
            "return_token_ids": True, "messages": messages}
    t0 = time.perf_counter()
    times, n, text = [], 0, []
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False}
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"ok": False}
                got = sum(len(c.get("token_ids") or []) for c in chunk["choices"])
                text += [c["delta"].get("content") or "" for c in chunk["choices"]]
                if got:
                    times.append(time.perf_counter())
                    n += got
    except Exception:  # noqa: BLE001 - a lost request is counted, not fatal
        return {"ok": False}
    if n != args.new_tokens:
        return {"ok": False}
    ttft = times[0] - t0
    tpot = (times[-1] - times[0]) / (n - 1) if n > 1 else float("nan")
    return {"ok": True, "ttft": ttft, "tpot": tpot, "tokens": n, "text": "".join(text)}


async def level(url: str, args, clients: int, requests: int, first_seed: int) -> dict:
    import httpx

    queue = list(range(first_seed, first_seed + requests))
    results = []

    async def worker(client):
        while queue:
            got = await one_request(client, url, args, queue.pop())
            results.extend(got if isinstance(got, list) else [got])

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return summary(results, clients, wall)


def summary(results: list[dict], clients: int, wall: float) -> dict:
    """One level's figures from its requests (chat turns: each turn a request)."""
    ok = [r for r in results if r["ok"]]
    later = [r for r in ok if r.get("turn", 0) > 0]

    def pct(key, q, rows=ok):
        return float(np.percentile([r[key] for r in rows], q)) if rows else float("nan")

    return {"clients": clients, "requests": len(results), "failed": len(results) - len(ok),
            "req_s": len(ok) / wall, "tok_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50": pct("ttft", 50), "ttft_p99": pct("ttft", 99),
            "tpot_p50": pct("tpot", 50), "tpot_p99": pct("tpot", 99),
            "first_ttft_p50": pct("ttft", 50, [r for r in ok if r.get("turn", 0) == 0]),
            "later_ttft_p50": pct("ttft", 50, later), "later_ttft_p99": pct("ttft", 99, later),
            "results": results, "wall": wall}


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["demo", "small", "2b"], default="demo")
    ap.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per level (default: 4 per client, at least 8)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--image", type=int, default=448, help="side of each request's image in pixels (0: text only)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--matmul", choices=["f32", "bf16"], default=None,
                    help="the server's --matmul: bf16 runs the vision tower and prefill with bf16 inputs")
    ap.add_argument("--turns", type=int, default=1, help="turns per chat, each resending the history (default 1)")
    ap.add_argument("--compare", default=None, metavar="FLAG=ON,OFF",
                    help="two servers differing in one qwen2vl-serve flag, measured alternately (one table)")
    ap.add_argument("--rounds", type=int, default=2, help="with --compare: runs of each setting, alternating")
    ap.add_argument("--server-flags", default="", help="more qwen2vl-serve flags for every server (one string)")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    if args.compare:
        return compare(args, levels)

    with tempfile.TemporaryDirectory() as tmp:
        if args.size == "demo":
            folder = model_folder(args.size, Path(tmp))
        else:  # in a child process: making 2B's weights would leave this one holding ~9 GB
            # `python -c` puts its working folder, this one, first on sys.path: common is importable.
            code = "import sys; from common import model_folder; model_folder(sys.argv[1], sys.argv[2])"
            made = subprocess.run([sys.executable, "-c", code, args.size, tmp], cwd=Path(__file__).resolve().parent)
            if made.returncode:
                return made.returncode
            folder = Path(tmp) / f"model-{args.size}"
        port = free_port()
        proc, startup = start_server(args, folder, port)
        url = f"http://127.0.0.1:{port}"
        try:
            # Warm-up: every prompt/feature bucket the workload touches, at the widest level.
            asyncio.run(level(url, args, max(levels), max(levels), 10**6))
            rss_warm = rss_gb(proc.pid)
            print_head(args, startup, rss_warm)
            base, seed = None, 0
            for clients in levels:  # each row as soon as it is measured
                n = args.requests or max(8, 4 * clients)
                row = asyncio.run(level(url, args, clients, n, seed))
                base = base or row
                print_row(args, row, base)
                seed += n
            rss_end = rss_gb(proc.pid)
            if base["clients"] == 1:
                # A request's vision tower and prefill run one request at a time (compute bound on
                # CPU): however many clients, the output cannot pass NEW tokens per TTFT of one.
                print(f"ceiling set by vision + prefill (one request at a time): {args.new_tokens} tokens / "
                      f"{base['ttft_p50']:.2f} s (1-client TTFT p50) = {args.new_tokens / base['ttft_p50']:.1f} tok/s, "
                      f"{args.new_tokens / base['ttft_p50'] / base['tok_s']:.1f}x the first row", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    print(f"server RSS {rss_warm:.2f} GB after warm-up, {rss_end:.2f} GB at the end "
          f"({100 * (rss_end / rss_warm - 1):+.1f}%)", flush=True)
    if args.size == "2b":
        print(f"vLLM CPU: about {VLLM_2B['rss_gb']:.0f} GB server memory, {VLLM_2B['startup_s']:.0f} s launch to healthy")
    return 0


def compare(args, levels: list[int]) -> int:
    """Two servers, one flag apart: each level run on each in turn, --rounds times; a row per
    (level, setting) over all its rounds."""
    flag, values = args.compare.split("=", 1)
    settings = values.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if args.size == "demo":
            folder = model_folder(args.size, Path(tmp))
        else:
            code = "import sys; from common import model_folder; model_folder(sys.argv[1], sys.argv[2])"
            made = subprocess.run([sys.executable, "-c", code, args.size, tmp], cwd=Path(__file__).resolve().parent)
            if made.returncode:
                return made.returncode
            folder = Path(tmp) / f"model-{args.size}"
        servers = []
        try:
            for value in settings:
                port = free_port()
                proc, _ = start_server(args, folder, port, [f"--{flag}", value])
                servers.append((value, proc, f"http://127.0.0.1:{port}"))
                asyncio.run(level(servers[-1][2], args, max(levels), max(levels), 10**6))  # warm-up
            what = f"{args.image}x{args.image} image" if args.image else "a text question"
            turns = f", chats of {args.turns} turns" if args.turns > 1 else ""
            print(f"\nqwen2vl-serve --{flag} {' vs '.join(settings)}, --size {args.size}, {what} per request{turns}, "
                  f"{args.new_tokens} tokens (EOS ignored), --max-batch {args.max_batch}, {args.rounds} rounds "
                  f"alternating {args.server_flags}")
            head = ("clients", f"--{flag}", "requests", "failed", "out tok/s", "TTFT p50 s", "TTFT p99 s",
                    "TPOT p50 ms", "TPOT p99 ms")
            if args.turns > 1:
                head += ("turn 1 TTFT p50 s", "turns 2+ TTFT p50 s", "turns 2+ TTFT p99 s")
            print("| " + " | ".join(head) + " |")
            print("|" + "---|" * len(head), flush=True)
            seed = 0
            for clients in levels:
                n = args.requests or max(8, 4 * clients)
                runs = {value: [] for value in settings}
                for _ in range(args.rounds):
                    for value, _, url in servers:  # the same requests on each
                        runs[value].append(asyncio.run(level(url, args, clients, n, seed)))
                    seed += n
                for value in settings:
                    r = summary([x for run in runs[value] for x in run["results"]], clients,
                                sum(run["wall"] for run in runs[value]))
                    cells = [clients, value, r["requests"], r["failed"], f"{r['tok_s']:.1f}", f"{r['ttft_p50']:.2f}",
                             f"{r['ttft_p99']:.2f}", f"{1e3 * r['tpot_p50']:.0f}", f"{1e3 * r['tpot_p99']:.0f}"]
                    if args.turns > 1:
                        cells += [f"{r['first_ttft_p50']:.2f}", f"{r['later_ttft_p50']:.2f}",
                                  f"{r['later_ttft_p99']:.2f}"]
                    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
        finally:
            for _, proc, _ in servers:
                proc.terminate()
                proc.wait(60)
    return 0


def print_head(args, startup: float, rss_warm: float) -> None:
    what = f"{args.image}x{args.image} image" if args.image else "a text question"
    print(f"\nqwen2vl-serve, --size {args.size}, {what} per request, {args.new_tokens} tokens "
          f"(EOS ignored), --max-batch {args.max_batch}; launch to healthy {startup:.0f} s; "
          f"server RSS {rss_warm:.2f} GB after warm-up")
    head = ("clients", "requests", "failed", "req/s", "out tok/s", "x first row",
            "TTFT p50 s", "TTFT p99 s", "TPOT p50 ms", "TPOT p99 ms")
    if args.size == "2b":
        head += ("vLLM tok/s", "vLLM TTFT p50 s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head), flush=True)


def print_row(args, r: dict, base: dict) -> None:
    cells = [r["clients"], r["requests"], r["failed"], f"{r['req_s']:.2f}", f"{r['tok_s']:.1f}",
             f"{r['tok_s'] / base['tok_s']:.1f}", f"{r['ttft_p50']:.2f}", f"{r['ttft_p99']:.2f}",
             f"{1e3 * r['tpot_p50']:.0f}", f"{1e3 * r['tpot_p99']:.0f}"]
    if args.size == "2b":
        ref = VLLM_2B.get(r["clients"], {})
        cells += [ref.get("tok_s", "-"), ref.get("ttft_p50", "-")]
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""qwen2vl-serve under load: 1, 4 and 16 concurrent clients streaming chat completions, one table.

    python benchmarks/serve.py [--size demo|small|2b] [--clients 1,4,16] [--requests N]
        [--new-tokens 32] [--image 448 | --image 0] [--max-batch 16] [--max-context 512] [--dtype float32|bfloat16]
        [--turns 3] [--schema on|both] [--compare FLAG=ON,OFF] [--peer vllm [--vllm-python PATH]] [--rounds 2]
        [--server-flags "..."]

--turns T: each request is a chat of T turns, each resending the history (and the first turn's
image) with a new question; TTFT is reported for the first turn and for the later ones.
--schema on: every request carries `response_format` {"type": "json_schema"} with a small
object schema (SCHEMA: an answer string and a confidence number); its reply may end before NEW
tokens (the grammar ends it with EOS once the object is complete, EOS ignored or not), and such
a reply counts as a success. --schema both: each round runs the workload with the schema and
without it on the same server(s), a row for each.
--compare FLAG=ON,OFF (e.g. prefill-chunk=512,0 or prefix-cache-gb=1,0): two servers that
differ in that one qwen2vl-serve flag, the workload run on each in turn, --rounds times
(alternating, so a busy machine slows both alike), one table with a row per setting.
--peer vllm: vLLM's OpenAI server beside ours, on the same model (our folder exported with
qwen2vl-export to an HF folder) and the same requests, in turn --rounds times, a row for each
server at each level. vLLM runs from its own Python (--vllm-python, default
$QWEN2VL_VLLM_PYTHON or /tmp/vllm_venv/bin/python: a virtual environment holding its CPU build,
made as docs/benchmarks.md says) with settings matching ours: --max-num-seqs = --max-batch,
--max-model-len = --max-context, --dtype as ours computes (--dtype; else bfloat16 with --matmul
bf16, float32 otherwise), prefix caching on or off as ours (on unless --server-flags sets
--prefix-cache-gb 0), one IMAGE x IMAGE image and no video per prompt (its encoder profiled at
that size), a 1 GiB KV cache, all cores for its threads (OMP_NUM_THREADS,
VLLM_CPU_OMP_THREADS_BIND=nobind, unless set). Its log goes to a file in the temporary folder,
named in the table's head.

The server runs in its own process (`python -m qwen2vl_jax.serving.cli`), started here; the clients
are asyncio tasks in this process, each sending its next request as soon as the last one ends.
Every request carries a different random IMAGE x IMAGE PNG (so the vision cache never helps)
and a short question (with --image 0, a short text question alone), asks for NEW tokens with EOS ignored, and streams them.
  demo   the small model shipped with the package
  small  Qwen2-VL-2B's widths and vocabulary (the 7B-Instruct tokenizer and template from the
         reference assets), 4 decoder layers and 4 vision blocks, random weights
  2b     Qwen2-VL-2B's shapes, random bfloat16 weights
Columns: requests/s and output tokens/s over the level's wall time; time to first token and
time per output token after the first (per request), p50/p99; the inter-token latency p99 (every
gap between two streamed tokens of a request, all requests pooled); failed requests; the server's
resident memory after warm-up and at the end. The peer is the first row (x first row: output
tokens/s against the first level's, one client by default; with --compare, --schema both or
--peer, against the first row of the same level).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, model_folder

VLLM_PYTHON = os.environ.get("QWEN2VL_VLLM_PYTHON", "/tmp/vllm_venv/bin/python")
VLLM_START_S = 1800  # launch to healthy, at most (its multimodal warm-up alone takes minutes on 2 cores)
# --schema: a small object, as a client asking for a structured answer would send.
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
          "required": ["answer", "confidence"], "additionalProperties": False}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}}


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


def tree_rss_gb(pid: int) -> float:
    """Resident memory of a process and all its descendants (vLLM's server, engine and worker)."""
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:  # the fields after the command's closing parenthesis: state, ppid, ...
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, grew = {pid}, True
    while grew:
        more = {p for p, pp in parents.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    total = 0.0
    for p in tree:
        try:
            total += rss_gb(p)
        except OSError:  # gone meanwhile
            pass
    return total


def make_folder(args, tmp: str) -> Path:
    """The --size model folder (made in a child process: 2B's weights would leave this one holding ~9 GB)."""
    if args.size == "demo":
        return model_folder(args.size, Path(tmp))
    # `python -c` puts its working folder, this one, first on sys.path: common is importable.
    code = "import sys; from common import model_folder; model_folder(sys.argv[1], sys.argv[2])"
    made = subprocess.run([sys.executable, "-c", code, args.size, tmp], check=False, cwd=Path(__file__).resolve().parent)
    if made.returncode:
        sys.exit(f"serve.py: making the --size {args.size} model folder failed (status {made.returncode})")
    return Path(tmp) / f"model-{args.size}"


def vllm_dtype(args) -> str:
    """The dtype vLLM computes in: ours is float32 on CPU unless --dtype says otherwise, and --matmul
    bf16 runs the large products with bf16 inputs."""
    return args.dtype or ("bfloat16" if args.matmul == "bf16" else "float32")


def start_vllm(args, folder: Path, tmp: str, port: int) -> tuple[subprocess.Popen, float, Path]:
    """vLLM's OpenAI server on an HF export of `folder`, in its own process group; the process,
    seconds from launch to healthy and its log file. Exits with one line when it cannot start."""
    import httpx

    python = Path(args.vllm_python)
    hf = Path(tmp) / "hf"
    if not hf.is_dir():
        code = "import sys; from qwen2vl_jax.convert.cli import export_main; sys.exit(export_main(sys.argv[1:]))"
        made = subprocess.run([sys.executable, "-c", code, str(folder), str(hf), "--quiet"], check=False, cwd=REPO,
                              stdout=subprocess.DEVNULL)
        if made.returncode:
            sys.exit(f"serve.py: --peer vllm: qwen2vl-export of the model folder failed (status {made.returncode})")
    caching = "--prefix-cache-gb 0" not in " ".join(args.server_flags.split())
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf), "--host", "127.0.0.1",
            "--port", str(port), "--served-model-name", "bench", "--max-num-seqs", str(args.max_batch),
            "--max-model-len", str(args.max_context), "--dtype", vllm_dtype(args),
            "--enable-prefix-caching" if caching else "--no-enable-prefix-caching",
            "--kv-cache-memory-bytes", str(1 << 30),
            # one image of the workload's size: vLLM profiles its encoder with the largest image
            # otherwise (16384 tokens, a vision tower over 65536 patches: an hour on 2 cores)
            "--limit-mm-per-prompt", json.dumps({"image": {"count": 1, "width": args.image, "height": args.image}
                                                 if args.image else 0, "video": 0})]
    env = {"OMP_NUM_THREADS": str(os.cpu_count()), "VLLM_CPU_OMP_THREADS_BIND": "nobind", **os.environ}
    log = Path(tempfile.gettempdir()) / f"serve-vllm-{port}.log"
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    while True:
        if proc.poll() is not None:
            lines = [x for x in log.read_text(errors="replace").splitlines() if "Error" in x or "error" in x]
            why = lines[-1].strip() if lines else "no error line"
            sys.exit(f"serve.py: --peer vllm: vLLM's server exited with status {proc.returncode} before it was "
                     f"healthy: {why[-300:]} (log: {log})")
        if time.perf_counter() - t0 > VLLM_START_S:
            stop(proc, group=True)
            sys.exit(f"serve.py: --peer vllm: vLLM's server was not healthy after {VLLM_START_S} s (log: {log})")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, time.perf_counter() - t0, log
        except httpx.HTTPError:
            pass
        time.sleep(1)


def stop(proc: subprocess.Popen, group: bool = False) -> None:
    """Ends a server started here; group: its whole process group (vLLM's engine and worker too)."""
    kill = os.killpg if group else os.kill
    try:
        kill(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except subprocess.TimeoutExpired:
        kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    except ProcessLookupError:  # gone already
        pass


# ------------------------------------------------------------------ the clients
def image_uri(size: int, seed: int) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


QUESTIONS = ("Describe this picture in detail.", "What colours stand out most?", "Summarise your answers in one line.")


async def one_request(client, url: str, args, seed: int, schema: bool = False) -> dict | list[dict]:
    if args.image:
        content = [{"type": "image_url", "image_url": {"url": image_uri(args.image, seed)}},
                   {"type": "text", "text": QUESTIONS[0]}]
    else:  # text only: a short question, different per request
        content = f"Write story number {seed} about a red square and a blue circle."
    messages = [{"role": "user", "content": content}]
    if args.turns <= 1:
        return await one_turn(client, url, args, messages, schema)
    out = []
    for turn in range(args.turns):
        if turn:
            messages += [{"role": "assistant", "content": out[-1].get("text", "")},
                         {"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]}]
        out.append({**await one_turn(client, url, args, messages, schema), "turn": turn})
        if not out[-1]["ok"]:
            break
    return out


async def one_turn(client, url: str, args, messages: list[dict], schema: bool = False) -> dict:
    """schema: the request carries RESPONSE_FORMAT, and a reply the grammar ended early (finish
    "stop") is a success."""
    body = {"model": "bench", "max_tokens": args.new_tokens, "ignore_eos": True, "stream": True,
            "return_token_ids": True, "messages": messages}
    if schema:
        body["response_format"] = RESPONSE_FORMAT
    t0 = time.perf_counter()
    times, n, text, finish = [], 0, [], None
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
                finish = next((c["finish_reason"] for c in chunk["choices"] if c.get("finish_reason")), finish)
                if got:
                    times.append(time.perf_counter())
                    n += got
    except Exception:  # noqa: BLE001 - a lost request is counted, not fatal
        return {"ok": False}
    if n != args.new_tokens and not (schema and finish == "stop" and n > 0):
        return {"ok": False}
    ttft = times[0] - t0
    tpot = (times[-1] - times[0]) / (n - 1) if n > 1 else float("nan")
    return {"ok": True, "ttft": ttft, "tpot": tpot, "tokens": n, "text": "".join(text), "gaps": np.diff(times).tolist()}


async def level(url: str, args, clients: int, requests: int, first_seed: int, schema: bool = False) -> dict:
    import httpx

    queue = list(range(first_seed, first_seed + requests))
    results = []

    async def worker(client):
        while queue:
            got = await one_request(client, url, args, queue.pop(), schema)
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

    gaps = [g for r in ok for g in r.get("gaps", ())]

    def pct(key, q, rows=ok):
        return float(np.percentile([r[key] for r in rows], q)) if rows else float("nan")

    return {"clients": clients, "requests": len(results), "failed": len(results) - len(ok),
            "req_s": len(ok) / wall, "tok_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50": pct("ttft", 50), "ttft_p99": pct("ttft", 99),
            "tpot_p50": pct("tpot", 50), "tpot_p99": pct("tpot", 99),
            "itl_p99": float(np.percentile(gaps, 99)) if gaps else float("nan"),
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
    ap.add_argument("--schema", choices=["on", "both"], default=None,
                    help="on: every request carries a JSON schema response_format; both: each round with and without")
    ap.add_argument("--compare", default=None, metavar="FLAG=ON,OFF",
                    help="two servers differing in one qwen2vl-serve flag, measured alternately (one table)")
    ap.add_argument("--peer", choices=["vllm"], default=None,
                    help="vLLM's OpenAI server beside ours on the same model and requests, measured alternately")
    ap.add_argument("--vllm-python", default=VLLM_PYTHON,
                    help="the Python of vLLM's virtual environment (default: $QWEN2VL_VLLM_PYTHON or %(default)s)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="with --compare, --peer or --schema both: runs of each, alternating")
    ap.add_argument("--server-flags", default="", help="more qwen2vl-serve flags for every server (one string)")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    if args.compare and args.peer:
        sys.exit("serve.py: --compare and --peer go one at a time")
    if args.peer and not Path(args.vllm_python).is_file():
        sys.exit(f"serve.py: --peer vllm needs vLLM's CPU build: no Python at {args.vllm_python} (make its virtual "
                 "environment as docs/benchmarks.md 'Against vLLM' says, or give --vllm-python)")
    if args.compare or args.peer or args.schema == "both":
        return side_by_side(args, levels)
    schema = args.schema == "on"

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(args, tmp)
        port = free_port()
        proc, startup = start_server(args, folder, port)
        url = f"http://127.0.0.1:{port}"
        try:
            # Warm-up: every prompt/feature bucket the workload touches, at the widest level.
            asyncio.run(level(url, args, max(levels), max(levels), 10**6, schema))
            rss_warm = rss_gb(proc.pid)
            print_head(args, startup, rss_warm)
            base, seed = None, 0
            for clients in levels:  # each row as soon as it is measured
                n = args.requests or max(8, 4 * clients)
                row = asyncio.run(level(url, args, clients, n, seed, schema))
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
            stop(proc)
    print(f"server RSS {rss_warm:.2f} GB after warm-up, {rss_end:.2f} GB at the end "
          f"({100 * (rss_end / rss_warm - 1):+.1f}%)", flush=True)
    return 0


def side_by_side(args, levels: list[int]) -> int:
    """Several servers or request kinds, each level run on each in turn, --rounds times; a row per
    (level, setting) over all its rounds. The settings: --compare's two servers (else ours alone),
    vLLM's beside with --peer, each with and without the schema with --schema both."""
    schemas = {"both": (False, True), "on": (True,)}.get(args.schema, (False,))
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(args, tmp)
        servers = []  # (label, process, url, group, launch to healthy s)
        notes = []
        try:
            if args.compare:
                flag, values = args.compare.split("=", 1)
                for value in values.split(","):
                    port = free_port()
                    proc, startup = start_server(args, folder, port, [f"--{flag}", value])
                    servers.append((value, proc, f"http://127.0.0.1:{port}", False, startup))
            else:
                port = free_port()
                proc, startup = start_server(args, folder, port)
                servers.append(("qwen2vl-serve", proc, f"http://127.0.0.1:{port}", False, startup))
            if args.peer:
                port = free_port()
                proc, startup, log = start_vllm(args, folder, tmp, port)
                servers.append(("vLLM", proc, f"http://127.0.0.1:{port}", True, startup))
                notes.append(f"vLLM --dtype {vllm_dtype(args)}, its log {log}")
            rss_warm = {}
            for label, proc, url, group, _ in servers:  # warm-up: the widest level of each kind of request
                for schema in schemas:  # (a grammar's masked step is its own program, compiled on first use)
                    asyncio.run(level(url, args, max(levels), max(levels), 10**6, schema))
                rss_warm[label] = tree_rss_gb(proc.pid)
            targets = [(label, url, schema) for label, _, url, _, _ in servers for schema in schemas]

            def name(label, schema):
                parts = [label] if len(servers) > 1 else []
                return ", ".join(parts + (["json_schema" if schema else "none"] if len(schemas) > 1 else []))

            column = " / ".join(([f"--{args.compare.split('=')[0]}"] if args.compare else ["server"] if args.peer else [])
                                + (["response_format"] if len(schemas) > 1 else []))
            what = f"{args.image}x{args.image} image" if args.image else "a text question"
            turns = f", chats of {args.turns} turns" if args.turns > 1 else ""
            schema_note = ", every request with a json_schema response_format" if args.schema == "on" else ""
            print(f"\n{' vs '.join(name(label, s) for label, _, s in targets)}, --size {args.size}, {what} per request"
                  f"{turns}{schema_note}, {args.new_tokens} tokens (EOS ignored), --max-batch {args.max_batch}, "
                  f"--max-context {args.max_context}, {args.rounds} rounds alternating {args.server_flags}")
            for label, proc, _, _, startup in servers:
                print(f"{label}: launch to healthy {startup:.0f} s, RSS {rss_warm[label]:.2f} GB after warm-up")
            for note in notes:
                print(note)
            head = ("clients", column, "requests", "failed", "out tok/s", "x first row", "TTFT p50 s", "TTFT p99 s",
                    "TPOT p50 ms", "TPOT p99 ms", "ITL p99 ms")
            if args.turns > 1:
                head += ("turn 1 TTFT p50 s", "turns 2+ TTFT p50 s", "turns 2+ TTFT p99 s")
            print("| " + " | ".join(head) + " |")
            print("|" + "---|" * len(head), flush=True)
            seed = 0
            for clients in levels:
                n = args.requests or max(8, 4 * clients)
                runs = {(label, schema): [] for label, _, schema in targets}
                for _ in range(args.rounds):
                    for label, url, schema in targets:  # the same requests on each
                        runs[label, schema].append(asyncio.run(level(url, args, clients, n, seed, schema)))
                    seed += n
                first = None
                for label, _, schema in targets:
                    got = runs[label, schema]
                    r = summary([x for run in got for x in run["results"]], clients, sum(run["wall"] for run in got))
                    first = first or r
                    cells = [clients, name(label, schema), r["requests"], r["failed"], f"{r['tok_s']:.1f}",
                             f"{r['tok_s'] / first['tok_s']:.2f}", f"{r['ttft_p50']:.2f}", f"{r['ttft_p99']:.2f}",
                             f"{1e3 * r['tpot_p50']:.0f}", f"{1e3 * r['tpot_p99']:.0f}", f"{1e3 * r['itl_p99']:.0f}"]
                    if args.turns > 1:
                        cells += [f"{r['first_ttft_p50']:.2f}", f"{r['later_ttft_p50']:.2f}",
                                  f"{r['later_ttft_p99']:.2f}"]
                    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
            for label, proc, _, _, _ in servers:
                print(f"{label}: RSS {tree_rss_gb(proc.pid):.2f} GB at the end")
        finally:
            for _, proc, _, group, _ in servers:
                stop(proc, group)
    return 0


def print_head(args, startup: float, rss_warm: float) -> None:
    what = f"{args.image}x{args.image} image" if args.image else "a text question"
    schema = ", a json_schema response_format" if args.schema == "on" else ""
    print(f"\nqwen2vl-serve, --size {args.size}, {what}{schema} per request, {args.new_tokens} tokens "
          f"(EOS ignored), --max-batch {args.max_batch}; launch to healthy {startup:.0f} s; "
          f"server RSS {rss_warm:.2f} GB after warm-up")
    head = ("clients", "requests", "failed", "req/s", "out tok/s", "x first row",
            "TTFT p50 s", "TTFT p99 s", "TPOT p50 ms", "TPOT p99 ms", "ITL p99 ms")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head), flush=True)


def print_row(args, r: dict, base: dict) -> None:
    cells = [r["clients"], r["requests"], r["failed"], f"{r['req_s']:.2f}", f"{r['tok_s']:.1f}",
             f"{r['tok_s'] / base['tok_s']:.1f}", f"{r['ttft_p50']:.2f}", f"{r['ttft_p99']:.2f}",
             f"{1e3 * r['tpot_p50']:.0f}", f"{1e3 * r['tpot_p99']:.0f}", f"{1e3 * r['itl_p99']:.0f}"]
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())

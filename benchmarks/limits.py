"""Each speed figure beside its ceiling on this device, one table.

    python benchmarks/limits.py [--sizes 2b,7b] [--weights float,int4] [--parts decode,ttft,batch,vit]
        [--batch 64 --context 1024] [--profile DIR]

The ceilings are measured in the same run, on the same device:
  copy     bytes read + written per second by a device-to-device copy of a large array;
  read     bytes read per second by a sum over it and a vector times it (the better of the
           two): the decode ceilings use the higher of copy and read;
  matmul   FLOP/s of one large square matmul in the compute dtype; on a GPU whose name is in
           common.PEAK_BF16 the datasheet's dense bf16 peak is printed beside it, and the
           shares of compute figures are of that peak.
The figures (random weights of each size's shapes, greedy, EOS ignored):
  decode b1    tokens/s of one row after an image and a prompt, against that bandwidth
               over the bytes one step reads (decoder weights, output head, the row's KV cache);
  first token  time to the first token of one IMAGE x IMAGE image and a 30-word prompt (the
               vision tower, prefill and the first draw), with the vision tower alone beside it;
  decode bB    output tokens/s of B rows with CONTEXT-token prompts, against that bandwidth
               over the weights plus all rows' KV caches per step (times B rows);
  vit          the vision tower on one VIT_IMAGE x VIT_IMAGE image, model FLOP/s against the
               matmul peak.
Parameter bytes on the device are printed for each weight format (int8 and int4 hold the
decoder's linear layers packed, as `qwen2vl-convert --quantize` stores them).

--levers measures the decode figures once per lever (plain, fused: q/k/v and gate/up as one
matmul each, stepsK: K decode steps per iteration of the decode loop; joined by +); the first
token and the vision tower use the plain model.

--profile DIR traces one decode loop (batch 1, the first size, format and lever) with
jax.profiler and prints the device's time per kernel per token beside the loop's wall time
per token, so the share the device sits idle between kernels shows.
"""

from __future__ import annotations

import argparse
import collections
import gc
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np

from common import PEAK_BF16, best_of, make_inputs, model_config, random_params, vit_flops
from qwen2vl_jax.params import param_bytes as tree_bytes  # arrays or shapes


# ------------------------------------------------------------------ ceilings
def copy_bandwidth(nbytes: int, repeat: int) -> float:
    """Bytes read + written per second by x * 2 over an array of nbytes (a fresh output buffer,
    so every byte is read once and written once)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    double = jax.jit(lambda a: a * 2)
    jax.block_until_ready(double(x))
    t = best_of(lambda: jax.block_until_ready(double(x)), repeat)
    return 2 * nbytes / t


def read_bandwidth(nbytes: int, dtype, repeat: int) -> float:
    """Bytes per second read from an array of about nbytes: the better of a sum over it and a
    vector times it as a [1536, N] matrix (what a batch-1 decode step does with each weight;
    on a CPU an elementwise copy may run on fewer cores than these)."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype)
    w = jnp.ones((1536, nbytes // (1536 * dtype.itemsize)), dtype)
    x = jnp.ones((1, 1536), dtype)
    best = 0.0
    for fn, args in ((lambda a, b: a @ b, (x, w)), (lambda a: jnp.sum(a, dtype=jnp.float32), (w,))):
        f = jax.jit(fn)
        jax.block_until_ready(f(*args))
        best = max(best, w.nbytes / best_of(lambda: jax.block_until_ready(f(*args)), repeat))
    return best


def matmul_peak(n: int, dtype, repeat: int) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(mm(a, a))
    return 2 * n**3 / best_of(lambda: jax.block_until_ready(mm(a, a)), repeat)


def spec_peak(kind: str) -> float | None:
    return next((p for k, p in PEAK_BF16.items() if k in kind), None)


# ------------------------------------------------------------------ bytes
def decode_weight_bytes(params: dict, config) -> int:
    """Bytes one decode step reads of the weights: the decoder (layers, final norm) and the
    output head (the embedding when tied); the embedding lookup's one row is left out."""
    text = {k: v for k, v in params["model"].items() if k != "embed_tokens"}
    head = params["model"]["embed_tokens"] if config.tie_word_embeddings else params["lm_head"]
    return tree_bytes(text) + tree_bytes(head)


def kv_bytes_per_slot(config, dtype) -> int:
    """Bytes of keys and values one cache slot of one row holds over all layers."""
    t = config.text
    return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * np.dtype(dtype).itemsize


def parse_lever(lever: str) -> tuple[bool, int]:
    """'plain', 'fused', 'stepsK' or several joined by '+' -> (fused, K); ValueError otherwise."""
    parts = set(lever.split("+")) - {"plain"}
    steps = [p[len("steps"):] for p in parts if p.startswith("steps")]
    if len(steps) > 1 or (steps and not (steps[0].isdigit() and int(steps[0]) >= 1)) or \
            parts - {"fused"} - {f"steps{k}" for k in steps}:
        raise ValueError(f"unknown lever {lever!r} (plain, fused, stepsK with K >= 1, or several joined by +)")
    return "fused" in parts, int(steps[0]) if steps else 1


# ------------------------------------------------------------------ figures
class Figures:
    """The figures of one (size, weight format), measured with one engine."""

    def __init__(self, args, size: str, weights: str):
        import jax
        import jax.numpy as jnp

        from qwen2vl_jax import xla_flags
        from qwen2vl_jax.api import Qwen2VL
        from qwen2vl_jax.engine import Engine

        self.args, self.size, self.weights = args, size, weights
        quantize = weights if weights in ("int8", "int4") else None
        if quantize and jax.default_backend() == "cpu":
            xla_flags.sequential_cpu_schedule()
        self.dtype = jnp.dtype(args.dtype)
        self.config = model_config(size)
        params = random_params(self.config, self.dtype, quantize)
        self.model = Qwen2VL(self.config, params, self.dtype)
        self.param_bytes = tree_bytes(self.model.params)
        self.step_weight_bytes = decode_weight_bytes(self.model.params, self.config)
        self.engine = Engine(self.model.module)
        self.levers = {}  # lever name -> (params, engine)
        fused = None  # one fused copy for every lever that asks for it
        for lever in args.levers.split(","):
            is_fused, steps = parse_lever(lever)
            if is_fused and fused is None:
                fused = Qwen2VL(self.config, params, self.dtype, fuse_projections=True).params
            self.levers[lever] = (fused if is_fused else self.model.params,  # plain: the engine above, compiled once
                                  Engine(self.model.module, steps_per_iteration=steps) if steps > 1 else self.engine)
        del params

    def request(self, inputs: dict, new_tokens: int):
        """(the model's inputs, a greedy GenerationConfig that ignores EOS)."""
        from qwen2vl_jax.sampling import GenerationConfig

        gconf = GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=())
        built = self.model.inputs(**inputs, max_new_tokens=new_tokens)
        return built, gconf

    def decode(self, inputs: dict, new_tokens: int, lever: str) -> tuple[float, int]:
        """(best decode tokens/s over all rows, cache slots per row) with one lever."""
        params, engine = self.levers[lever]
        built, gconf = self.request(inputs, new_tokens)
        engine.generate(params, built, gconf)  # compiles
        rates = [engine.generate(params, built, gconf).decode_tokens_per_s for _ in range(self.args.repeat)]
        return max(rates), engine.cache_slots(built, new_tokens)

    def encode_time(self, built) -> float:
        """Best time of the vision tower on `built`'s images (s)."""
        import jax

        run = lambda: jax.block_until_ready(self.engine.encode(self.model.params, built.vision))  # noqa: E731
        run()
        return best_of(run, self.args.repeat)

    def first_token(self, inputs: dict) -> tuple[float, float]:
        """(best time to the first token, best vision tower time) in seconds."""
        import jax

        built, gconf = self.request(inputs, 1)
        start = lambda: jax.block_until_ready(self.engine.start(self.model.params, built, gconf)[2])  # noqa: E731
        start()
        return best_of(start, self.args.repeat), self.encode_time(built)

    def vit(self, side: int) -> tuple[float, float]:
        """(best time, model FLOPs) of the vision tower on one side x side image."""
        inputs = make_inputs(side, prompt_words=4)
        return self.encode_time(self.request(inputs, 1)[0]), vit_flops(self.config, inputs["pixel_values"].shape[0])

    def profile(self, inputs: dict, out: Path, steps: int, lever: str) -> float:
        """Traces one decode loop of `steps` tokens (after its prefill, outside the trace) into
        out; -> its wall time per token (s)."""
        import jax

        params, engine = self.levers[lever]
        built, gconf = self.request(inputs, steps)
        engine.generate(params, built, gconf)  # compiles
        _, state, first = engine.start(params, built, gconf)
        jax.block_until_ready((state, first))
        with jax.profiler.trace(str(out), create_perfetto_trace=True):
            t0 = time.perf_counter()
            length = state.kv_valid.shape[1] - built.shape[1]
            state = jax.block_until_ready(engine.program("loop")(params, state, length, gconf.greedy))  # generate's loop alone
            wall = time.perf_counter() - t0
        return wall / (steps - 1)


# ------------------------------------------------------------------ the profile's table
def kernel_table(trace_dir: Path) -> tuple[str, list[tuple[str, int, float]]]:
    """The device's time per kernel from the newest perfetto trace under trace_dir:
    (where the events came from, [(name, calls, seconds)] summed over the trace, longest first).

    A GPU's kernels are the events of its device process's stream threads; on a CPU, XLA's
    thunks on the client's threads (events without '::' in their names)."""
    files = sorted(trace_dir.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"{trace_dir}: no perfetto_trace.json.gz")
    data = json.load(gzip.open(files[-1]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device = {p for p, n in procs.items() if n.startswith("/device:")}
    if device:
        on_device = [e for e in spans if e["pid"] in device]
        streams = {k for k, n in threads.items() if k[0] in device and "stream" in n.lower()}
        chosen = [e for e in on_device if (e["pid"], e.get("tid")) in streams] or on_device
        where = ", ".join(sorted({threads.get((e["pid"], e.get("tid")), "?") for e in chosen}))
        where = f"{', '.join(sorted(procs[p] for p in device))}: {where}"
    else:
        python = {k for k, n in threads.items() if n == "python"}
        chosen = [e for e in spans if (e["pid"], e.get("tid")) not in python and "::" not in e["name"]
                  and not e["name"].startswith("end: ") and not e["name"].startswith("$")]
        where = "host threads (XLA:CPU thunks)"
    total: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.Counter()
    for e in chosen:
        total[e["name"]] += e["dur"] * 1e-6  # trace times are microseconds
        calls[e["name"]] += 1
    rows = sorted(((n, calls[n], t) for n, t in total.items()), key=lambda r: -r[2])
    return where, rows


def print_profile(where: str, rows, steps: int, wall: float, top: int) -> None:
    busy = sum(r[2] for r in rows) / steps
    print(f"\nprofile: a decode loop of {steps} steps, {1e3 * wall:.3f} ms a step; kernels from {where}")
    print(f"  kernel time {1e3 * busy:.3f} ms a step ({100 * busy / wall:.0f}% of the wall time; "
          f"{sum(r[1] for r in rows) / steps:.0f} kernels a step)")
    print(f"  {'kernel':60s} {'calls/step':>10s} {'us/step':>9s} {'share':>6s}")
    for name, n, t in rows[:top]:
        print(f"  {name[:60]:60s} {n / steps:10.1f} {1e6 * t / steps:9.1f} {100 * t / steps / wall:5.1f}%")


# ------------------------------------------------------------------ driver
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None, help="comma list of 2b, 7b, small (default gpu: 2b,7b; cpu: small)")
    ap.add_argument("--weights", default=None,
                    help="comma list of float, int8, int4 (default gpu: float,int4; cpu: float)")
    ap.add_argument("--dtype", default=None, help="compute dtype (default gpu: bfloat16; cpu: float32)")
    ap.add_argument("--parts", default="decode,ttft,batch,vit", help="which figures (default %(default)s)")
    ap.add_argument("--image", type=int, default=448, help="image side for decode and first token")
    ap.add_argument("--vit-image", type=int, default=1344, help="image side for the vision tower figure")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens per decode run (default %(default)s)")
    ap.add_argument("--batch", type=int, default=64, help="rows of the batched decode (default %(default)s)")
    ap.add_argument("--context", type=int, default=1024, help="prompt tokens per row there (default %(default)s)")
    ap.add_argument("--copy-mib", type=int, default=None, help="array copied and read for the bandwidth (default gpu 2048, cpu 1024)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs, best kept (default %(default)s)")
    ap.add_argument("--levers", default="plain",
                    help="comma list of decode levers, each measured for the decode figures: plain, fused "
                         "(q/k/v and gate/up as one matmul each), stepsK (K decode steps per loop iteration), "
                         "or several joined by + (default %(default)s); the first is the one --profile traces")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR", help="trace decode steps into DIR")
    ap.add_argument("--profile-steps", type=int, default=8)
    ap.add_argument("--top", type=int, default=25, help="kernels listed by --profile")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    gpu = dev.platform != "cpu"
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    sizes = (args.sizes or ("2b,7b" if gpu else "small")).split(",")
    weights = (args.weights or ("float,int4" if gpu else "float")).split(",")
    parts = set(args.parts.split(","))
    levers = args.levers.split(",")
    bad = [f"unknown size {s!r} (2b, 7b, small)" for s in sizes if s not in ("2b", "7b", "small")]
    bad += [f"unknown weight format {w!r} (float, int8, int4)" for w in weights if w not in ("float", "int8", "int4")]
    bad += [f"unknown part {p!r} (decode, ttft, batch, vit)" for p in sorted(parts - {"decode", "ttft", "batch", "vit"})]
    for lever in levers:
        try:
            parse_lever(lever)
        except ValueError as e:
            bad.append(str(e))
    if bad:
        ap.error("; ".join(bad))

    kind = dev.device_kind
    copy_mib = args.copy_mib or (2048 if gpu else 1024)
    copy = copy_bandwidth(copy_mib * 2**20, max(args.repeat, 5))
    read = read_bandwidth(copy_mib * 2**20, args.dtype, max(args.repeat, 5))
    bw = max(copy, read)  # the decode ceilings' bandwidth
    mm = matmul_peak(8192 if gpu else 1024, jnp.dtype(args.dtype), max(args.repeat, 5))
    spec = spec_peak(kind) if gpu and args.dtype == "bfloat16" else None
    peak = spec or mm
    head = (f"{kind} ({dev.platform}, jax {jax.__version__}): copy {copy / 1e9:.0f} GB/s (read + write, {copy_mib} MiB), "
            f"read {read / 1e9:.0f} GB/s, {args.dtype} matmul {mm / 1e12:.1f} TFLOP/s"
            + (f", datasheet bf16 {spec / 1e12:.0f} TFLOP/s" if spec else ""))
    print(f"# {head}", file=sys.stderr, flush=True)
    head_row = ("figure", "measured", "ceiling", "share", "asked")
    rows: list[tuple[str, str, str, str, str]] = []

    def add(*row: str) -> None:
        rows.append(row)
        print(f"# {row}", file=sys.stderr, flush=True)

    def decode_row(f: Figures, label: str, inputs: dict, lever: str, asked: str) -> None:
        """Decode tokens/s of inputs' rows against bandwidth over a step's bytes (the weights
        and every row's KV cache), times the rows."""
        batch = len(inputs["input_ids"])
        rate, slots = f.decode(inputs, args.new_tokens, lever)
        step_bytes = f.step_weight_bytes + batch * slots * kv_bytes_per_slot(f.config, f.dtype)
        ceiling = batch * bw / step_bytes
        add(f"{label} (tok/s)", f"{rate:.1f}", f"{ceiling:.0f} ({step_bytes / 1e9:.2f} GB/step)",
            f"{100 * rate / ceiling:.0f}%", asked)

    prompt = make_inputs(args.image, prompt_words=30)
    for size in sizes:
        for w in weights:
            label = f"{size} {args.dtype if w == 'float' else w}"
            print(f"# {label}: making random weights ...", file=sys.stderr, flush=True)
            f = Figures(args, size, w)
            add(f"{label} params on device", f"{f.param_bytes / 1e9:.2f} GB",
                f"decode reads {f.step_weight_bytes / 1e9:.2f} GB/step", "", "")
            for lever in levers if "decode" in parts else ():
                decode_row(f, f"{label} decode b1 {lever}", prompt, lever, ">= 65%" if gpu else "")
            if "ttft" in parts:
                first, vit = f.first_token(prompt)
                add(f"{label} first token, {args.image}px + 30 words (ms)", f"{1e3 * first:.2f}",
                    f"vision tower {1e3 * vit:.2f}", "", "<= 6" if gpu and size == "2b" else "")
            ids = np.random.RandomState(1).randint(100, 150000, (args.batch, args.context))
            for lever in levers if "batch" in parts else ():
                decode_row(f, f"{label} decode b{args.batch} ctx {args.context} {lever}",
                           {"input_ids": ids, "attention_mask": np.ones_like(ids)}, lever,
                           ">= 15000" if gpu and size == "2b" and args.batch == 64 else "")
            if "vit" in parts:
                t, flops = f.vit(args.vit_image)
                add(f"{label} vision tower {args.vit_image}px (TFLOP/s)", f"{flops / t / 1e12:.1f}",
                    f"{peak / 1e12:.1f}" + (" datasheet" if spec else " matmul"), f"{100 * flops / t / peak:.0f}%",
                    ">= 40%" if gpu else "")
            if args.profile and size == sizes[0] and w == weights[0]:
                wall = f.profile(prompt, args.profile, args.profile_steps + 1, levers[0])
                where, table = kernel_table(args.profile)
                print_profile(where, table, args.profile_steps, wall, args.top)
            del f
            gc.collect()

    print(f"\n{head}; ceilings use {bw / 1e9:.0f} GB/s; random weights, greedy, {args.new_tokens} new tokens, "
          f"best of {args.repeat}")
    widths = [max(len(r[i]) for r in [head_row, *rows]) for i in range(5)]
    for r in [head_row, *rows]:
        print("  ".join(c.ljust(widths[i]) if i in (0, 2) else c.rjust(widths[i]) for i, c in enumerate(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

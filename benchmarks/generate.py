"""Generation speed: ours (JAX) against HF transformers on the same shapes, one table.

    python benchmarks/generate.py [--device cpu|gpu] [--size 2b|7b|small] [--new-tokens 32]
        [--image 448] [--variants ours-fp32,ours-int8,ours-int4,hf-fp32,hf-bf16] [--xla-flags "..."]

ours-int8 and ours-int4 hold the decoder's linear layers (and the output head, int8) packed as
`qwen2vl-convert --quantize` stores them (qwen2vl_jax.quant), random integers and scales,
computing in float32 on CPU (bfloat16 on a GPU) like ours-fp32 (ours-bf16).

The model has Qwen2-VL-2B's shapes with random weights (the compute does not depend on the
values), one image of IMAGE x IMAGE pixels (448 -> 1024 patches -> 256 image tokens) and a
short prompt, batch 1, greedy, NEW new tokens with EOS ignored. Columns:
  ViT      the vision tower + merger alone
  ViT+pre  vision tower + prefill of the whole prompt + the first token (HF: time to the
           first token of generate, read by a streamer that timestamps each token)
  decode   tokens/s for the remaining NEW-1 tokens (ours: the decode while_loop; HF: between
           the streamer's first and last token of the same generate call)
  stream   ours only: the same tokens streamed one step at a time, as qwen2vl-generate and
           chat() print them (the next step is queued before a token is read back)
  peak RSS the process's peak resident memory (each variant runs in its own process)
  compile  our first-call jit time for ViT+prefill and for the decode loop (not in the timings)
On a GPU also the peak device memory and the prefill's model FLOP/s against the chip's bf16
peak. Timings are the best of --repeat runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from common import IMAGE_TOKEN, PEAK_BF16, best_of, make_inputs, model_config, random_params, vit_flops


# ------------------------------------------------------------------ FLOPs and memory
def prefill_flops(config, n_tokens: int, n_patches: int, with_vit: bool = True) -> float:
    """Matmul FLOPs of the ViT over n_patches (`vit_flops`) and the decoder over n_tokens,
    attention included; the LM head counts once (only the last token)."""
    t = config.text
    vit = vit_flops(config, n_patches)
    d, hd = t.hidden_size, t.head_dim
    per_tok = 2 * d * (t.num_attention_heads + 2 * t.num_key_value_heads) * hd + 2 * t.num_attention_heads * hd * d
    per_tok += 3 * 2 * d * t.intermediate_size
    dec = t.num_hidden_layers * (n_tokens * per_tok + 2 * 2 * n_tokens * n_tokens * t.num_attention_heads * hd)
    return float((vit if with_vit else 0) + dec + 2 * d * t.vocab_size)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ------------------------------------------------------------------ ours
def run_ours(args, dtype_name: str, quantize: str | None = None, scan: bool = False) -> dict:
    import jax
    import jax.numpy as jnp

    from qwen2vl_jax import xla_flags
    from qwen2vl_jax.api import Qwen2VL
    from qwen2vl_jax.engine import Engine
    from qwen2vl_jax.sampling import GenerationConfig

    if quantize:  # before the first array, as the command-line tools do for a quantized folder
        xla_flags.sequential_cpu_schedule()
    config = model_config(args.size)
    dtype = jnp.dtype(dtype_name)
    params = random_params(config, dtype, quantize)
    model = Qwen2VL(config, params, dtype, scan_layers=scan)
    del params  # the model holds its own (stacked) copy with scan
    engine = Engine(model.module, loop_options=json.loads(args.loop_options) if args.loop_options else None)
    inputs = make_inputs(args.image)
    generation = GenerationConfig(max_new_tokens=args.new_tokens, eos_token_ids=())
    built = model.inputs(**inputs, max_new_tokens=generation.max_new_tokens)

    def vit():
        jax.block_until_ready(engine.encode(model.params, built.vision))

    def start():
        return jax.block_until_ready(engine.start(model.params, built, generation)[2])

    def loop():
        result = engine.generate(model.params, built, generation)
        assert result.tokens.shape[1] == args.new_tokens, result.tokens.shape
        return (args.new_tokens - 1) / (result.total_s - result.first_token_s)

    def stream():
        times = [time.perf_counter() for _ in engine.stream(model.params, built, generation)]
        assert len(times) == args.new_tokens, len(times)
        return (args.new_tokens - 1) / (times[-1] - times[0])

    t0 = time.perf_counter()
    start()
    compile_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    loop()
    compile_loop = time.perf_counter() - t0
    stream()  # compiles the single step

    t_vit = best_of(vit, args.repeat)
    t_pre = best_of(start, args.repeat)
    rates = [(loop(), stream()) for _ in range(args.repeat)]
    out = {"vit_s": t_vit, "prefill_s": t_pre, "decode_tok_s": max(r[0] for r in rates),
           "stream_tok_s": max(r[1] for r in rates),
           "compile_prefill_s": compile_prefill, "compile_loop_s": compile_loop,
           "prompt_tokens": int(inputs["input_ids"].shape[1]), "prompt_bucket": int(built.shape[1])}
    dev = jax.devices()[0]
    out["device_kind"] = dev.device_kind
    if dev.platform == "gpu":
        stats = dev.memory_stats() or {}
        out["peak_dev_gb"] = stats.get("peak_bytes_in_use", 0) / 2**30
    if args.big_prefill:
        # A larger text prefill (rows x tokens): the FLOP/s the decoder reaches when it is fed.
        rows, length = (int(x) for x in args.big_prefill.split("x"))
        big = {"input_ids": np.random.RandomState(1).randint(100, 150000, (rows, length)),
               "attention_mask": np.ones((rows, length), np.int64)}
        big_gc = GenerationConfig(max_new_tokens=1, eos_token_ids=())
        big_inputs = model.inputs(**big, max_new_tokens=1)
        big_start = lambda: jax.block_until_ready(engine.start(model.params, big_inputs, big_gc)[2])  # noqa: E731
        big_start()
        out["big_prefill_s"] = best_of(big_start, args.repeat)
        out["big_prefill_flops"] = rows * prefill_flops(config, length, 0, with_vit=False)
        out["big_prefill"] = args.big_prefill
    out["peak_rss_gb"] = peak_rss_gb()
    return out


# ------------------------------------------------------------------ HF transformers
def run_hf(args, dtype_name: str) -> dict:
    import torch
    from transformers import Qwen2VLConfig as HFConfig, Qwen2VLForConditionalGeneration

    config = model_config(args.size)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    device = "cuda" if args.device == "gpu" else "cpu"
    hf_cfg = HFConfig(**config.to_hf())
    torch.manual_seed(0)
    try:  # skip HF's random init: the weights are overwritten below
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            from contextlib import nullcontext as no_init_weights
    with no_init_weights(), torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(hf_cfg, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.fill_(1.0) if name.endswith("weight") else p.zero_()
            elif p.ndim == 1:
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    model.eval()
    inputs = make_inputs(args.image)
    t = {k: torch.tensor(v, device=device) for k, v in inputs.items()}
    t["pixel_values"] = t["pixel_values"].to(dtype)
    t["mm_token_type_ids"] = (t["input_ids"] == IMAGE_TOKEN).long()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def vit():
        with torch.no_grad():
            model.model.get_image_features(t["pixel_values"], t["image_grid_thw"])
        sync()

    class Clock:
        """A generate() streamer that timestamps every token as it is produced."""

        def __init__(self):
            self.times = []

        def put(self, value):
            sync()
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def gen(n):
        clock = Clock()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**t, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock)
        sync()
        assert out.shape[1] == t["input_ids"].shape[1] + n
        # times[0]: the prompt is handed over; times[1]: the first new token (ViT + prefill).
        return clock.times[1] - t0, (n - 1) / (clock.times[-1] - clock.times[1])

    gen(2)  # warm-up
    vit()
    t_vit = best_of(vit, args.repeat)
    runs = [gen(args.new_tokens) for _ in range(args.repeat)]
    out = {"vit_s": t_vit, "prefill_s": min(r[0] for r in runs), "decode_tok_s": max(r[1] for r in runs)}
    if device == "cuda":
        out["peak_dev_gb"] = torch.cuda.max_memory_allocated() / 2**30
    out["peak_rss_gb"] = peak_rss_gb()
    return out


# ------------------------------------------------------------------ driver
# Variant suffixes for ours: XLA CPU flags worth measuring (sched / nosched: XLA's
# concurrency-optimised CPU scheduler on / off; by default it is on for float models and off
# for quantized ones, as Qwen2VL.from_pretrained sets it), and xlaattn: our einsum attention
# instead of cuDNN's fused kernel on a GPU; bf16mm: products of 64 rows or more with bf16
# inputs (the vision tower, prefill).
FLAG_SETS = {"onednn": "--xla_cpu_use_onednn=true", "xnn": "--xla_cpu_use_xnnpack=true",
             "sched": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
             "nosched": "--xla_cpu_enable_concurrency_optimized_scheduler=false"}
ENV_SETS = {"xlaattn": {"QWEN2VL_ATTENTION": "xla"}, "bf16mm": {"QWEN2VL_MATMUL": "bf16"}}
SUFFIXES = set(FLAG_SETS) | set(ENV_SETS) | {"scan"}  # scan: the decoder's layers scanned (scan_layers)


def run_variant(args, variant: str) -> dict:
    impl, kind = variant.split("+")[0].split("-")
    scan = "scan" in variant.split("+")[1:]
    if kind in ("int8", "int4"):  # weight-only: the compute dtype of ours-fp32 (CPU) or ours-bf16
        return run_ours(args, "float32" if args.device == "cpu" else "bfloat16", quantize=kind, scan=scan)
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[kind]
    return run_ours(args, dtype, scan=scan) if impl == "ours" else run_hf(args, dtype)


def child_argv(args, variant: str) -> list[str]:
    return [sys.executable, __file__, "--only", variant, "--device", args.device, "--size", args.size,
            "--image", str(args.image), "--new-tokens", str(args.new_tokens), "--repeat", str(args.repeat),
            "--big-prefill", args.big_prefill or "", "--loop-options", args.loop_options or ""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--size", choices=["2b", "7b", "small"], default="2b")
    ap.add_argument("--image", type=int, default=448, help="image side in pixels (a multiple of 28)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per process (best is kept)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="run every variant's process this many times, round-robin, keeping each "
                         "variant's best (evens out a shared machine's load; default cpu 2, gpu 1)")
    ap.add_argument("--variants", default=None,
                    help="comma list of ours-fp32, ours-bf16, ours-int8, ours-int4, hf-fp32, hf-bf16; ours may take "
                         "+onednn, +xnn, +sched or +nosched (XLA CPU flags), +xlaattn (no cuDNN attention), +bf16mm (bf16 large products) or +scan (the decoder scanned) (default: cpu: ours-fp32,hf-fp32,hf-bf16; "
                         "gpu: ours-bf16,hf-bf16)")
    ap.add_argument("--xla-flags", default=None, help="XLA_FLAGS for our variants (e.g. --xla_cpu_use_onednn=true)")
    ap.add_argument("--big-prefill", default=None, metavar="ROWSxTOKENS",
                    help="also time a text-only prefill of this size for ours (default on GPU: 8x1024)")
    ap.add_argument("--loop-options", default=None, metavar="JSON",
                    help='XLA compiler options for our decode loop, e.g. \'{"xla_gpu_graph_min_graph_size": 1}\'')
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.big_prefill is None and args.device == "gpu":
        args.big_prefill = "8x1024"
    if args.only:  # child: one variant, one JSON line
        if args.device == "cpu":
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
        print("RESULT " + json.dumps(run_variant(args, args.only)), flush=True)
        return 0

    default = "ours-fp32,hf-fp32,hf-bf16" if args.device == "cpu" else "ours-bf16,hf-bf16"
    variants = (args.variants or default).split(",")
    unknown = [v for v in variants if set(v.split("+")[1:]) - SUFFIXES]
    if unknown:
        ap.error(f"unknown variant suffix in {', '.join(unknown)} (known: {', '.join(sorted(SUFFIXES))})")
    rounds = args.rounds or (2 if args.device == "cpu" else 1)
    results: dict[str, dict] = {}
    for r in range(rounds):
        for v in variants:
            env = dict(os.environ)
            flags = [args.xla_flags or ""] if v.startswith("ours") else []
            flags += [FLAG_SETS[f] for f in v.split("+")[1:] if f in FLAG_SETS]
            if v.startswith("ours"):
                env["XLA_FLAGS"] = " ".join(f for f in flags if f)
            for suffix in v.split("+")[1:]:
                env.update(ENV_SETS.get(suffix, {}))
            load = os.getloadavg()[0]
            print(f"# round {r + 1}/{rounds}: {v} (load {load:.1f}) ...", file=sys.stderr, flush=True)
            proc = subprocess.run(child_argv(args, v), capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"# {v} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            got = json.loads(lines[-1][len("RESULT "):])
            print(f"# {v}: {got}", file=sys.stderr, flush=True)
            results[v] = got if v not in results else best_result(results[v], got)
    print_table(args, results)
    return 0 if len(results) == len(variants) else 1


def best_result(a: dict, b: dict) -> dict:
    """Per field, the better of two runs (lower time, higher rate, higher peak memory)."""
    out = dict(a)
    for k, v in b.items():
        if not isinstance(v, (int, float)) or k not in a:
            continue
        if k.endswith("tok_s") or k.endswith("_gb"):
            out[k] = max(a[k], v)
        elif k.endswith("_s"):
            out[k] = min(a[k], v)
    return out


def print_table(args, results: dict) -> None:
    config = model_config(args.size)
    inputs = make_inputs(args.image)
    n_tok, n_patch = inputs["input_ids"].shape[1], inputs["pixel_values"].shape[0]
    flops = prefill_flops(config, n_tok, n_patch)
    device = "GPU" if args.device == "gpu" else f"CPU ({os.cpu_count()} cores)"
    print(f"\nQwen2-VL-{args.size} shapes, random weights, batch 1, {args.image}x{args.image} image "
          f"({n_patch} patches), {n_tok}-token prompt, {args.new_tokens} new tokens, {device}; "
          f"XLA_FLAGS={args.xla_flags or os.environ.get('XLA_FLAGS', '')!r}")
    head = (f"{'variant':17s} {'ViT s':>8s} {'ViT+pre s':>10s} {'decode tok/s':>13s} {'stream tok/s':>13s} "
            f"{'peak RSS GB':>12s}")
    gpu = args.device == "gpu"
    if gpu:
        head += f" {'peak dev GB':>12s} {'prefill TFLOP/s':>16s}"
    head += f" {'compile s':>10s}"
    print(head)
    for v, r in results.items():
        stream = f"{r['stream_tok_s']:13.2f}" if "stream_tok_s" in r else f"{'-':>13s}"
        line = (f"{v:17s} {r['vit_s']:8.3f} {r['prefill_s']:10.3f} {r['decode_tok_s']:13.2f} {stream} "
                f"{r['peak_rss_gb']:12.2f}")
        if gpu:
            line += f" {r.get('peak_dev_gb', 0):12.2f} {flops / r['prefill_s'] / 1e12:16.1f}"
        comp = f"{r['compile_prefill_s']:.0f}+{r['compile_loop_s']:.0f}" if "compile_loop_s" in r else "-"
        print(line + f" {comp:>10s}")
    ours = [v for v in results if v.startswith("ours")]
    base = next((v for v in ("ours-fp32", "ours-bf16") if v in results), None)
    for q in [v for v in ours if v.split("+")[0] in ("ours-int8", "ours-int4")] if base else []:
        a, b = results[q], results[base]
        print(f"{q} vs {base}: decode {a['decode_tok_s'] / b['decode_tok_s']:.2f}x the tokens/s, ViT+prefill "
              f"{100 * (a['prefill_s'] / b['prefill_s'] - 1):+.0f}% time, peak RSS {a['peak_rss_gb']:.2f} vs "
              f"{b['peak_rss_gb']:.2f} GB")
    for o in ours:
        for h in [v for v in results if v.startswith("hf")]:
            a, b = results[o], results[h]
            print(f"{o} vs {h}: ViT {b['vit_s'] / a['vit_s']:.2f}x faster, ViT+prefill "
                  f"{b['prefill_s'] / a['prefill_s']:.2f}x faster, decode {a['decode_tok_s'] / b['decode_tok_s']:.2f}x "
                  f"the tokens/s")
        r = results[o]
        print(f"{o}: streamed decode {r['stream_tok_s']:.2f} tokens/s = {100 * r['stream_tok_s'] / r['decode_tok_s']:.0f}% "
              f"of the while_loop's {r['decode_tok_s']:.2f}")
        kind = r.get("device_kind", "")
        peak = next((p for k, p in PEAK_BF16.items() if k in kind), None) if gpu else None
        share = lambda x: f" = {100 * x / peak:.0f}% of the {kind} bf16 peak" if peak else ""  # noqa: E731
        tf = flops / r["prefill_s"]
        line = f"{o}: ViT+prefill ({n_patch} patches + {n_tok} tokens) {tf / 1e12:.2f} TFLOP/s{share(tf)}"
        if "big_prefill_s" in r:
            big = r["big_prefill_flops"] / r["big_prefill_s"]
            line += f"; text prefill {r['big_prefill']} tokens {big / 1e12:.2f} TFLOP/s{share(big)}"
        print(line)


if __name__ == "__main__":
    sys.exit(main())

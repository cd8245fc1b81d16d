"""The server's decode step by context bucket: what reading only the live rows' cache slots saves.

    python benchmarks/slot_step.py [--size small|2b] [--rows 16] [--max-context 4096] [--steps 5]
                                   [--scan-layers]

Builds the decode slots the server runs (`serving.slots.Slots`, over the one engine) over random
weights (float32, one CPU device), times its warm-up (every row bucket x context bucket
compiled, and the prefill of every prompt bucket up to 64 tokens, as `qwen2vl-serve` does at
start-up), then one decode step of `--rows` rows attending
over each context bucket: the step a server takes while every live row holds at most that many
tokens. The peer is the last row, the whole `--max-context` cache, which is what every step read
before the context buckets existed. Each figure is the mean of `--steps` steps after one untimed.
  small  Qwen2-VL-2B's widths and vocabulary, 4 decoder layers (common.model_config, as benchmarks/generate.py)
  2b     Qwen2-VL-2B's shapes
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

from common import model_config  # the shapes generate.py and limits.py time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["small", "2b"], default="small")
    ap.add_argument("--rows", type=int, default=16, help="decode slots stepped together (the server's --max-batch)")
    ap.add_argument("--max-context", type=int, default=4096, help="cache slots per row (the server's --max-context)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per context bucket")
    ap.add_argument("--scan-layers", action="store_true", help="the decoder as one scanned layer")
    args = ap.parse_args(argv)

    from qwen2vl_jax import Qwen2VL
    from qwen2vl_jax.serving.scheduler import Batcher
    from qwen2vl_jax.serving.slots import Slots, short_prompt_lengths
    from qwen2vl_jax.modules.qwen2vl import init_params

    config = model_config(args.size)
    model = Qwen2VL(config, init_params(config, jax.random.PRNGKey(0)), "float32", scan_layers=args.scan_layers)
    slots = Slots(model.engine, max_batch=args.rows, max_context=args.max_context)
    t0 = time.perf_counter()
    Batcher(slots, model.params).warm_up()
    warm = time.perf_counter() - t0
    state = slots.init_state()
    rows = []
    for context in slots.context_buckets:
        state, tok = slots.step(model.params, state, args.rows, context)
        jax.block_until_ready(tok)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, tok = slots.step(model.params, state, args.rows, context)
        jax.block_until_ready(tok)
        rows.append((context, (time.perf_counter() - t0) / args.steps))
    full = rows[-1][1]
    print(f"Server decode step, --size {args.size}{' --scan-layers' if args.scan_layers else ''}, "
          f"{args.rows} rows, --max-context {args.max_context}, float32, {jax.devices()[0].platform}; "
          f"warm-up ({len(slots.row_buckets)} row x {len(slots.context_buckets)} context buckets, "
          f"{len(short_prompt_lengths(args.max_context))} prompt buckets) {warm:.1f} s")
    print("| context bucket (slots read) | step ms | tok/s at this many rows | x the whole cache |")
    print("|---|---|---|---|")
    for context, sec in rows:
        print(f"| {context} | {sec * 1e3:.1f} | {args.rows / sec:.1f} | {full / sec:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

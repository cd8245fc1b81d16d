"""`qwen2vl-train`: one of the paper's three stages on a JSONL dataset.

    qwen2vl-train --model DIR --data FILE.jsonl --stage 1|2|3 --steps N --out DIR

stage 1 trains the vision tower and merger (LLM frozen), stage 2 everything, stage 3 the LLM
(vision tower frozen). OUT becomes a converted folder that `qwen2vl-generate --model OUT`
loads; `--resume` continues a run in OUT exactly where its last checkpoint left it.
"""

from __future__ import annotations

import argparse
import sys

from qwen2vl_jax.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen2vl-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="model folder to start from (converted or HF)")
    p.add_argument("--data", required=True, help="JSONL, one conversation per line (paths relative to it)")
    p.add_argument("--stage", type=int, required=True, choices=(1, 2, 3))
    p.add_argument("--steps", type=int, required=True, help="total optimizer steps of the run")
    p.add_argument("--out", required=True, help="output folder (a converted model folder + train_state/)")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch")
    g.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the stage's)")
    g.add_argument("--warmup", type=float, default=None,
                   help="warmup steps, or a fraction of --steps when below 1 (default 0.05)")
    g.add_argument("--end-lr-ratio", type=float, default=None, help="cosine ends at lr * this (default 0.1)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW decay on matrices (default 0.1)")
    g.add_argument("--clip", type=float, default=None, help="global gradient-norm clip (default 1.0)")
    g.add_argument("--train", action="append", default=None, metavar="REGEX",
                   help="parameter paths to train, instead of the stage's (repeatable), e.g. '^visual/merger/'")
    g.add_argument("--labels", choices=("assistant", "caption"), default=None,
                   help="loss on assistant turns or on all caption text (default: caption for stage 1)")
    g.add_argument("--seed", type=int, default=0, help="data order")
    d = p.add_argument_group("data")
    d.add_argument("--max-length", type=int, default=4096, help="longest record, in tokens")
    d.add_argument("--skip-bad", action="store_true", help="skip bad records (listed) instead of stopping")
    r = p.add_argument_group("run")
    r.add_argument("--remat", action="store_true", help="rematerialise vision and decoder blocks")
    r.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="forward/backward dtype; params and optimizer state stay float32")
    r.add_argument("--mesh", default=None, help="data=D,fsdp=F,tensor=T (default: one device)")
    r.add_argument("--log-every", type=int, default=10)
    r.add_argument("--save-every", type=int, default=0, help="checkpoint interval in steps (0: at the end)")
    r.add_argument("--stop-at", type=int, default=None,
                   help="stop with a checkpoint at this step (e.g. a job's time limit); --resume continues")
    r.add_argument("--resume", action="store_true", help="continue the run in --out")
    r.add_argument("--no-progress", action="store_true", help="no progress bar; log lines only")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from qwen2vl_jax.sharding import maybe_initialize_distributed  # noqa: PLC0415
        from qwen2vl_jax.train.run import TrainOptions, fit  # noqa: PLC0415

        maybe_initialize_distributed()
        warmup = args.warmup
        if warmup is not None and warmup >= 1:
            warmup = int(warmup)
        result = fit(TrainOptions(
            model=args.model, data=args.data, stage=args.stage, steps=args.steps, out=args.out,
            batch_size=args.batch_size, accum=args.accum, learning_rate=args.lr, warmup_steps=warmup,
            end_lr_ratio=args.end_lr_ratio, weight_decay=args.weight_decay, clip_norm=args.clip,
            labels=args.labels, train=tuple(args.train) if args.train else None, max_length=args.max_length,
            seed=args.seed, remat=args.remat, compute_dtype=args.compute_dtype, mesh=args.mesh,
            log_every=args.log_every, save_every=args.save_every, stop_at=args.stop_at, resume=args.resume, skip_bad=args.skip_bad,
            progress=not args.no_progress,
        ))
    except InputError as e:
        print(f"qwen2vl-train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qwen2vl-train: interrupted; the last checkpoint in --out can be resumed", file=sys.stderr)
        return 130
    loss = "n/a" if result["loss"] is None else f"{result['loss']:.4f}"
    print(f"stage {args.stage}: {result['steps']} steps, final loss {loss}; model in {result['out']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

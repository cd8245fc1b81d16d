"""Trains one of the paper's three stages of Qwen2-VL on a JSONL dataset.

stages (each trains the parameters whose paths match its regexes; --train overrides them):
  1  the vision tower and merger, the LLM frozen; loss on all caption text; lr 2e-4
  2  every parameter; loss on the assistant turns; lr 5e-5
  3  the LLM (embeddings, decoder, lm_head), the vision tower and merger frozen; loss on the
     assistant turns; lr 1e-5

data: UTF-8 JSONL, one conversation per line in the chat-message format, e.g.
  {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/1.png"},
                                             {"type": "text", "text": "What shape is this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "circle"}]}]}
  (a bare list of messages is accepted too). Roles are system, user and assistant; content is
  a string or a list of text, image and video items; image and video paths are relative to
  the JSONL file, and a video is a file or a list of frame images. A record without an
  assistant turn is an image-text pair whose text is the target. Every record is checked
  before the first step: a bad one stops the run naming its line (--skip-bad drops it).

LoRA: --lora-rank R trains low-rank adapters (rank R, scaled by --lora-alpha / R) on the
  decoder's q/k/v/o and gate/up/down projections, or on the linear layers --lora-targets picks
  (a regex over parameter paths such as model/layers_3/self_attn/q_proj/kernel,
  visual/merger/mlp_0/kernel, visual/blocks_5/attn/qkv/kernel); the base weights stay frozen,
  float or packed (a --quantize'd folder: QLoRA). The stage still sets the labels; the learning
  rate defaults to 2e-4. --out gets adapter/ (PEFT's adapter_config.json and
  adapter_model.safetensors) instead of a model folder: `qwen2vl-generate --model BASE --adapter
  OUT/adapter`, or peft's PeftModel.from_pretrained in transformers.

output: --out becomes a converted model folder that `qwen2vl-generate --model OUT` loads and
  `qwen2vl-export` converts, plus train_state/ (checkpoints), train_log.jsonl, losses.csv and
  loss.png. A fresh run needs a new or empty --out (--force replaces what is there); a
  checkpoint is saved every --save-every steps and at the end, and --resume continues the
  run in --out from its latest checkpoint exactly.

multi-process: run the same command once per process (per host) with --coordinator,
  --num-processes and --process-id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID; a cluster manager JAX knows fills them in). Each process reads and
  preprocesses its share of every batch; process 0 prints and writes the logs and plot, and
  every process takes part in the checkpoints (--out must be a folder they all see).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qwen2vl_jax import distributed, shell

PROG = "qwen2vl-train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    q = p.add_argument_group("required")
    q.add_argument("--model", required=True, metavar="DIR", help="model folder to start from (converted or HF)")
    q.add_argument("--data", required=True, metavar="FILE",
                   help="JSONL, one conversation per line (format above; paths relative to it)")
    q.add_argument("--stage", type=int, required=True, choices=(1, 2, 3),
                   help="what trains: 1 the vision tower + merger (LLM frozen), 2 everything, 3 the LLM "
                        "(vision tower and merger frozen); sets the default --lr and --labels")
    q.add_argument("--steps", type=int, required=True, metavar="N", help="total optimizer steps of the run")
    q.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: a converted model folder + train_state/; new or empty unless "
                        "--resume or --force; never the --model folder")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=8, metavar="N", help="rows per micro-batch (default: 8)")
    g.add_argument("--accum", type=int, default=1, metavar="N",
                   help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate, > 0 (default: the stage's: 2e-4, 5e-5, 1e-5)")
    g.add_argument("--warmup", type=float, default=None, metavar="STEPS",
                   help="linear warmup: steps, or a fraction of --steps when below 1 (default: 0.05)")
    g.add_argument("--end-lr-ratio", type=float, default=None, metavar="RATIO",
                   help="the cosine decay ends at lr * this, 0 to 1 (default: 0.1)")
    g.add_argument("--weight-decay", type=float, default=None, metavar="WD",
                   help="AdamW decay on matrices, not biases or norms (default: 0.1)")
    g.add_argument("--clip", type=float, default=None, metavar="NORM",
                   help="global gradient-norm clip; 0: none (default: 1.0)")
    g.add_argument("--train", action="append", default=None, metavar="REGEX",
                   help="parameter paths to train instead of the stage's (repeatable), e.g. '^visual/merger/'")
    g.add_argument("--labels", choices=("assistant", "caption"), default=None,
                   help="loss on the assistant turns or on all caption text (default: caption for stage 1, "
                        "assistant for 2 and 3)")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="data order (default: 0)")
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora-rank", type=int, default=None, metavar="R",
                    help="train rank-R LoRA adapters instead of the weights (written to OUT/adapter)")
    lo.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                    help="the adapters' scale is A / R (default: 2 R)")
    lo.add_argument("--lora-dropout", type=float, default=0.0, metavar="P",
                    help="dropout on the adapters' input while training (default: 0)")
    lo.add_argument("--lora-targets", default=None, metavar="REGEX",
                    help="the linear layers to adapt, by parameter path (default: the decoder's "
                         "self_attn/[qkvo]_proj and mlp/(gate|up|down)_proj), e.g. "
                         "'^model/.*_proj/kernel$|^visual/merger/'")
    d = p.add_argument_group("data")
    d.add_argument("--max-length", type=int, default=4096, metavar="N",
                   help="longest record, in tokens; longer ones are bad records (default: 4096)")
    d.add_argument("--skip-bad", action="store_true", help="skip bad records (listed) instead of stopping")
    d.add_argument("--pack", action="store_true",
                   help="pack each step's records into as few rows as fit its length bucket (attention and "
                        "M-RoPE positions stay per record; --batch-size still counts records)")
    d.add_argument("--workers", type=int, default=0, metavar="N",
                   help="worker processes that read and preprocess records (Grain); 0: threads in the "
                        "training process (default: 0)")
    r = p.add_argument_group("run")
    r.add_argument("--remat", action="store_true", help="rematerialise vision and decoder blocks (less memory)")
    r.add_argument("--scan-layers", action="store_true",
                   help="run the decoder's layers as one scanned layer: compiling no longer grows with depth; "
                        "the checkpoints hold the layers stacked, the exported model HF's paths")
    r.add_argument("--loss-chunk", type=int, default=2048, metavar="TOKENS",
                   help="tokens whose vocabulary logits are made at once in the loss; lower it to save "
                        "memory on long batches (default: 2048)")
    r.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="forward/backward dtype; trained params and optimizer state stay float32, a LoRA run's "
                        "frozen base is held in this dtype (default: float32)")
    r.add_argument("--mesh", default=None, metavar="SPEC", help="data=D,fsdp=F,tensor=T (default: one device)")
    r.add_argument("--log-every", type=int, default=10, metavar="N",
                   help="log a line and a train_log.jsonl row every N steps (default: 10)")
    r.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="checkpoint every N steps; 0: only at the end, so an interrupted run keeps nothing "
                        "(default: 0)")
    r.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop with a checkpoint at this step (e.g. a job's time limit); --resume continues")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    r.add_argument("--force", action="store_true",
                   help="replace an existing non-empty --out (its old checkpoints and logs are removed when "
                        "training starts, its params at the first checkpoint)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar; log lines only")
    distributed.add_arguments(p)
    shell.add_version(p, PROG)
    return p


def _fit(args) -> dict:
    distributed.enable_compile_cache(args)
    distributed.initialize(args)
    from qwen2vl_jax.train.run import TrainOptions, fit  # noqa: PLC0415

    warmup = args.warmup
    if warmup is not None and warmup >= 1:
        warmup = int(warmup)
    return fit(TrainOptions(
        model=args.model, data=args.data, stage=args.stage, steps=args.steps, out=args.out,
        batch_size=args.batch_size, accum=args.accum, learning_rate=args.lr, warmup_steps=warmup,
        end_lr_ratio=args.end_lr_ratio, weight_decay=args.weight_decay, clip_norm=args.clip,
        labels=args.labels, train=tuple(args.train) if args.train else None, max_length=args.max_length,
        seed=args.seed, remat=args.remat, scan_layers=args.scan_layers, loss_chunk=args.loss_chunk,
        compute_dtype=args.compute_dtype,
        mesh=args.mesh,
        log_every=args.log_every, save_every=args.save_every, stop_at=args.stop_at, resume=args.resume,
        force=args.force, skip_bad=args.skip_bad, progress=not args.no_progress,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=args.lora_targets, pack=args.pack, workers=args.workers,
    ))


def _interrupted(e: KeyboardInterrupt) -> str:
    """What a Ctrl-C left: from fit it is run.Interrupted, which knows what was saved."""
    if not hasattr(e, "step"):
        return "interrupted before training started; nothing was written"
    if e.step is None:
        return ("interrupted before the first checkpoint; nothing was saved "
                "(--save-every N checkpoints during a run)")
    return f"interrupted; {e.out} holds the checkpoint of step {e.step}, which --resume continues from"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def go() -> None:
        result = _fit(args)
        if not distributed.is_leader():
            return
        loss = "n/a" if result["loss"] is None else f"{result['loss']:.4f}"
        what = "adapter in " + str(Path(result["out"]) / "adapter") if args.lora_rank else f"model in {result['out']}"
        print(f"stage {args.stage}: {result['steps']} steps, final loss {loss}; {what}", file=sys.stderr)

    # SIGTERM (a job's time limit) unwinds like Ctrl-C, so a failed start cleans up after itself.
    return shell.run(PROG, go, interrupted=_interrupted)


if __name__ == "__main__":
    sys.exit(main())

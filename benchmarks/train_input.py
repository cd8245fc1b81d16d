"""Training throughput of the input pipeline's choices: packed rows against unpacked ones, and
Grain worker processes against none, on the demo model and the synthetic dataset.

    python benchmarks/train_input.py [--model DIR] [--stage 2] [--images 96] [--videos 16]
                                     [--batch-size 8] [--steps 24] [--workers 0,2] [--pack off,on]

Writes the synthetic dataset (train/synthetic.py) into a temporary folder and trains the model
(default: the shipped demo model) on the stage's file, as `qwen2vl-train` does (loader.Loader ->
loop.Trainer). For each (rows, workers) the same --steps steps run twice from the start of the
data: the first pass compiles every shape they need, the second is timed after its first
step. Prints one table:
  steps/s, tokens/s   training steps and real (non-padding) tokens per second
  rows/step           rows the device computes per step (unpacked: --batch-size)
  slots/step          rows x length: the token slots computed per step
  padding             share of the row slots that hold no real token
  input steps/s       the input pipeline alone (read, preprocess, bucket, pack, batch), no training
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def run(loader, trainer, state, steps: int, train: bool):
    """Timed pass over `steps` steps from the start: (seconds after the first batch, steps timed,
    real tokens, rows, token slots, real slots, state)."""
    import jax

    from qwen2vl_jax.train.loader import Position

    stream = loader(Position())
    tokens = rows = slots = real = 0
    start = None
    metrics = None
    for k in range(steps):
        arrays, n, _ = next(stream)
        if train:
            state, metrics = trainer.step(state, arrays)
        if k == 0:  # the clock starts once the first step is done (the pipeline has started)
            if metrics is not None:
                jax.block_until_ready(metrics)
            start = time.perf_counter()
            continue
        tokens += n
        rows += arrays["input_ids"].shape[0] * arrays["input_ids"].shape[1]
        slots += arrays["input_ids"].size
        real += int((arrays["attention_mask"] != 0).sum())
    if metrics is not None:
        jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    stream.close()
    return seconds, steps - 1, tokens, rows, slots, real, state


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the shipped demo model)")
    p.add_argument("--stage", type=int, default=2, choices=(1, 2, 3), help="which synthetic file and stage")
    p.add_argument("--images", type=int, default=96, help="synthetic images (default: 96)")
    p.add_argument("--videos", type=int, default=16, help="synthetic videos (default: 16)")
    p.add_argument("--batch-size", type=int, default=8, help="records per step (default: 8)")
    p.add_argument("--steps", type=int, default=24, help="steps per pass (default: 24)")
    p.add_argument("--workers", default="0,2", help="Grain worker counts to compare (default: 0,2)")
    p.add_argument("--pack", default="off,on", help="rows: off (unpacked), on (packed) or both (default)")
    args = p.parse_args(argv)

    import jax

    from qwen2vl_jax import checkpoint as ck
    from qwen2vl_jax.config import DEMO_DIR
    from qwen2vl_jax.processing import Processor
    from qwen2vl_jax.train import loop, stages as st, synthetic
    from qwen2vl_jax.train.data import JsonlDataset
    from qwen2vl_jax.train.loader import Loader
    from qwen2vl_jax.train.run import load_model_params

    model = Path(args.model or DEMO_DIR)
    config = ck.read_config(model)
    processor = Processor.from_pretrained(model)
    stage = st.get_stage(args.stage)
    params = load_model_params(model, config)
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.write_dataset(tmp, 0, synthetic.Counts(images=args.images, videos=args.videos, eval_per_task=1))
        dataset = JsonlDataset(Path(tmp) / f"stage{args.stage}.jsonl", processor, labels=stage.labels)
        for pack in [x.strip() == "on" for x in args.pack.split(",")]:
            trainer = loop.Trainer(config, stage, 10 * args.steps)  # its compiled shapes serve every worker count
            for workers in [int(w) for w in args.workers.split(",")]:
                loader = Loader(dataset, config, args.batch_size, 1, seed=0, pack=pack, workers=workers)
                state = trainer.init_state(params)
                *_, state = run(loader, trainer, state, args.steps, train=True)  # compiles every shape
                seconds, n, tokens, rows, slots, real, state = run(loader, trainer, state, args.steps, train=True)
                in_seconds, *_ = run(loader, trainer, state, args.steps, train=False)
                rows_out.append(("packed" if pack else "unpacked", workers, n / seconds, tokens / seconds,
                                 rows / n, slots / n, 1 - real / slots, n / in_seconds))
                del state
    device = jax.devices()[0].device_kind
    print(f"\n{len(dataset)} records of stage{args.stage}.jsonl, {args.batch_size} per step, "
          f"{args.steps - 1} timed steps, {model.name}, {device}")
    print(f"{'rows':<9} {'workers':>7} {'steps/s':>8} {'tokens/s':>9} {'rows/step':>9} {'slots/step':>10} "
          f"{'padding':>8} {'input steps/s':>13}")
    for mode, workers, sps, tps, per, slots, pad, ips in rows_out:
        print(f"{mode:<9} {workers:>7} {sps:>8.2f} {tps:>9,.0f} {per:>9.2f} {slots:>10,.0f} {pad:>8.1%} {ips:>13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

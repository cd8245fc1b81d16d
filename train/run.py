"""One training run, start to finish: what `qwen2vl-train` and the demo script call.

    fit(TrainOptions(model=DIR, data=FILE, stage=3, steps=N, out=OUT))

reads the model folder (converted or HF), checks every data record up front, trains, and
writes OUT as a converted folder (config.json, tokenizer and processor files, params/) that
`qwen2vl-generate` loads and `qwen2vl-export` converts, plus:

    OUT/train_state/<step>/   Orbax: {step, params, opt_state} and the data position + options
    OUT/train_log.jsonl       one row per log interval (step, loss, lr, tokens/s, grad norm)
    OUT/losses.csv            every step's loss
    OUT/loss.png              the loss curve

`resume=True` restores the latest train_state and continues exactly where it stopped (same
params, optimizer state, learning-rate step and data position).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from qwen2vl_jax import checkpoint as ck
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.errors import InputError
from qwen2vl_jax.model import init_shapes, load_hf_params
from qwen2vl_jax.sharding import check_divisible, make_mesh, param_shardings
from qwen2vl_jax.train import loop, stages as st
from qwen2vl_jax.train.data import JsonlDataset, Loader, Position

STATE_DIR = "train_state"


@dataclasses.dataclass
class TrainOptions:
    model: str | Path
    data: str | Path
    stage: int
    steps: int
    out: str | Path
    batch_size: int = 8
    accum: int = 1
    learning_rate: float | None = None  # None: the stage's
    warmup_steps: int | float | None = None
    end_lr_ratio: float | None = None
    weight_decay: float | None = None
    clip_norm: float | None = None
    labels: str | None = None  # None: the stage's
    train: tuple[str, ...] | None = None  # None: the stage's parameter regexes
    max_length: int | None = 4096
    seed: int = 0
    remat: bool = False
    compute_dtype: str = "float32"
    mesh: str | None = None
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    stop_at: int | None = None  # stop (with a checkpoint) at this step; --resume goes on to `steps`
    resume: bool = False
    skip_bad: bool = False
    progress: bool = True

    def stage_spec(self) -> st.Stage:
        return st.get_stage(self.stage, learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
                            end_lr_ratio=self.end_lr_ratio, weight_decay=self.weight_decay,
                            clip_norm=self.clip_norm, labels=self.labels,
                            train=tuple(self.train) if self.train else None)


def _run_key(opts: TrainOptions, stage: st.Stage, records: int) -> dict:
    """What must not change between a run and its resumption."""
    key = {"stage": dataclasses.asdict(stage), "steps": opts.steps, "batch_size": opts.batch_size,
           "accum": opts.accum, "seed": opts.seed, "records": records, "data": str(Path(opts.data).resolve())}
    return json.loads(json.dumps(key))  # as it reads back from the checkpoint (tuples -> lists)


def load_model_params(folder: Path, config: Qwen2VLConfig, shardings=None) -> dict:
    """fp32 params from a converted folder (Orbax) or an HF folder (safetensors)."""
    if ck.is_converted(folder):
        return ck.load_params(folder, config, dtype=jnp.float32, shardings=shardings)
    if any(folder.glob("*.safetensors")):
        params = load_hf_params(folder, config, jnp.float32, host=True)
        if shardings is not None:
            params = jax.device_put(params, shardings)
        return params
    raise InputError(f"{folder}: no weights (neither a converted folder with params/ nor *.safetensors)")


def export(params, model_dir: Path, out: Path) -> None:
    """Writes OUT as a converted folder: side files from the source model, then params."""
    out.mkdir(parents=True, exist_ok=True)
    ck.copy_side_files(model_dir, out)
    ck.save_params(params, out, overwrite=True)


def fit(opts: TrainOptions, log: Callable[[str], None] | None = None) -> dict:
    """Runs one stage; returns {"loss": last logged loss, "steps", "out", "skipped"}."""
    log = log or (lambda s: print(s, file=sys.stderr))
    model_dir, out = Path(opts.model).resolve(), Path(opts.out).resolve()
    if not model_dir.is_dir():
        raise InputError(f"model folder {model_dir} does not exist")
    if opts.steps < 1:
        raise InputError(f"--steps must be at least 1, got {opts.steps}")
    if opts.batch_size < 1 or opts.accum < 1:
        raise InputError("--batch-size and --accum must be at least 1")
    state_dir = out / STATE_DIR
    if opts.resume and not state_dir.is_dir():
        raise InputError(f"--resume: {state_dir} holds no checkpoint to resume from")
    if not opts.resume and state_dir.is_dir() and any(state_dir.iterdir()):
        raise InputError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")

    config = Qwen2VLConfig.from_hf(model_dir)
    from qwen2vl_jax.processing import Processor  # noqa: PLC0415 - heavy, only when training

    processor = Processor.from_pretrained(model_dir)
    stage = opts.stage_spec()
    mesh = make_mesh(opts.mesh) if opts.mesh else None
    check_divisible(config, mesh)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(opts.compute_dtype)
    if dtype is None:
        raise InputError(f"--compute-dtype must be float32 or bfloat16, got {opts.compute_dtype!r}")

    dataset = JsonlDataset(opts.data, processor, labels=stage.labels, max_length=opts.max_length,
                           skip_bad=opts.skip_bad, progress=opts.progress)
    for p in dataset.skipped:
        log(f"skipped: {p}")
    key = _run_key(opts, stage, len(dataset))
    trainer = loop.Trainer(config, stage, opts.steps, mesh=mesh, remat=opts.remat, compute_dtype=dtype)
    ckpts = loop.Checkpoints(state_dir)
    try:
        if opts.resume:
            meta = ckpts.meta()
            changed = [k for k in key if meta.get("key", {}).get(k) != key[k]]
            if changed:
                raise InputError(f"--resume: the run in {out} used different {', '.join(changed)}; "
                                 "resume with the same options")
            state, meta = ckpts.restore(trainer.abstract_state(init_shapes(config)))
            position = Position(**meta["position"])
            log(f"resuming stage {opts.stage} at step {int(state.step)} (epoch {position.epoch}, batch {position.index})")
        else:
            shardings = param_shardings(init_shapes(config), mesh) if mesh is not None else None
            state = trainer.init_state(load_model_params(model_dir, config, shardings))
            position = Position()
        if int(state.step) >= opts.steps:
            log(f"already at step {int(state.step)} of {opts.steps}")
            return {"loss": None, "steps": int(state.step), "out": str(out), "skipped": dataset.skipped}

        n_train = sum(int(x.size) for x in jax.tree.leaves(st.split(state.params, trainer.trainable)[0]))
        n_all = sum(int(x.size) for x in jax.tree.leaves(state.params))
        log(f"stage {opts.stage} ({stage.name}): training {n_train:,} of {n_all:,} parameters on "
            f"{len(dataset)} records, {opts.steps} steps of {opts.batch_size}x{opts.accum}, lr {stage.learning_rate:g}")
        out.mkdir(parents=True, exist_ok=True)
        log_file, loss_file = out / "train_log.jsonl", out / "losses.csv"
        last = {}

        def on_log(row: loop.LogRow):
            last["loss"] = row.loss
            line = (f"step {row.step}/{opts.steps}  loss {row.loss:.4f}  lr {row.lr:.3e}  "
                    f"tok/s {row.tokens_per_s:,.0f}  grad_norm {row.grad_norm:.3f}")
            if opts.progress:
                from tqdm import tqdm  # noqa: PLC0415

                tqdm.write(line, file=sys.stderr)
            else:
                log(line)
            with log_file.open("a") as f:
                f.write(json.dumps(dataclasses.asdict(row)) + "\n")

        def on_save(s: loop.TrainState, pos: Position):
            ckpts.save(s, {"key": key, "position": dataclasses.asdict(pos)})
            export(s.params, model_dir, out)

        until = opts.steps if opts.stop_at is None else max(int(state.step), min(opts.stop_at, opts.steps))
        batches = Loader(dataset, config, opts.batch_size, opts.accum, opts.seed)(position)
        state, position, losses = loop.run_steps(
            trainer, state, batches, until, log_every=opts.log_every, on_log=on_log, on_save=on_save,
            save_every=opts.save_every, progress=opts.progress,
            on_losses=lambda pts: _append_losses(loss_file, pts))
        loop.plot_losses(_read_losses(loss_file), out / "loss.png", title=f"stage {opts.stage} ({stage.name}) loss")
        return {"loss": last.get("loss"), "steps": int(state.step), "out": str(out), "skipped": dataset.skipped}
    finally:
        ckpts.close()


def _append_losses(path: Path, points: list[tuple[int, float]]) -> None:
    with path.open("a") as f:
        f.writelines(f"{s},{v:.6f}\n" for s, v in points)


def _read_losses(path: Path) -> list[tuple[int, float]]:
    if not path.exists():
        return []
    pts = {}
    for line in path.read_text().splitlines():
        s, v = line.split(",")
        pts[int(s)] = float(v)  # a resumed run rewrites the steps after its checkpoint
    return sorted(pts.items())

"""One training run, start to finish: what `qwen2vl-train` and the demo script call.

    fit(TrainOptions(model=DIR, data=FILE, stage=3, steps=N, out=OUT))

reads the model folder (converted or HF), checks every data record up front, trains, and
writes OUT as a converted folder (config.json, tokenizer and processor files, params/) that
`qwen2vl-generate` loads and `qwen2vl-export` converts, plus:

    OUT/train_state/<step>/   Orbax: {step, params, opt_state} and the data position + options
    OUT/train_log.jsonl       one row per log interval (step, loss, lr, tokens/s, grad norm)
    OUT/losses.csv            every step's loss, under a `step,loss` header (written at each log
                              row and before each checkpoint)
    OUT/loss.png              the loss curve, redrawn at each checkpoint and when the run stops

With `lora_rank` the run trains LoRA adapters on the layers `lora_targets` picks (the decoder's
projections by default), the base weights frozen, float or packed (QLoRA on a `--quantize`d or
GPTQ/AWQ folder), and OUT gets OUT/adapter/ (PEFT's adapter_config.json +
adapter_model.safetensors, `lora.peft_format`) in place of a model folder: load it over the
same --model with `--adapter OUT/adapter`, or in transformers with peft's PeftModel.

Multi-process (`qwen2vl_jax.distributed`): every process runs `fit` with the same options; each
reads and preprocesses its share of every step's records (`loader.Loader`), all take part in the
Orbax saves (OUT must be a folder every process sees), and only process 0 prints, removes
and creates files, and writes the logs, losses and plot.

`resume=True` restores the latest train_state and continues exactly where it stopped (same
params, optimizer state, learning-rate step and data position); its logs read as one run's:
the rows and losses after the checkpoint are dropped and redone, the first row after it
averages the same steps as it would have without the stop, and loss.png covers every step.
A fresh run needs a new or empty OUT (`force=True` replaces what is there); it never trains
into its own --model, nor into a folder inside it, nor over a --model inside what OUT's run
replaces (train_state/, params/).

Nothing is left half-written: Ctrl-C (and SIGTERM) wait for a save in progress, params are
saved to a temporary sibling and swapped in by rename, so OUT holds the old or the new params
whole, and a fresh run that fails or is interrupted before its first checkpoint removes what
it created. Ctrl-C surfaces as `Interrupted`, which says which checkpoint (if any) `--resume`
continues from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from qwen2vl_jax import checkpoint as ck, distributed, interrupts
from qwen2vl_jax.checkpoint import load_hf_params
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.errors import InputError, refuse_inside
from qwen2vl_jax.jsonio import parse_json
from qwen2vl_jax.lora.peft_format import save_adapter
from qwen2vl_jax.lora.tree import DEFAULT_TARGETS, TRAINABLE, LoraSpec, attach, detach, init_adapter
from qwen2vl_jax.modules.qwen2vl import init_shapes
from qwen2vl_jax.params import flatten, stack_layers, unflatten, unstack_layers
from qwen2vl_jax.quant.format import is_quantized
from qwen2vl_jax.sharding import check_divisible, make_mesh, param_shardings
from qwen2vl_jax.train import loop, stages as st
from qwen2vl_jax.train.data import JsonlDataset
from qwen2vl_jax.train.loader import Loader, Position
from qwen2vl_jax.train.plot import plot_losses

STATE_DIR = "train_state"
ADAPTER_DIR = "adapter"  # a LoRA run's adapter, in PEFT's format
LORA_LR = 2e-4  # the default peak learning rate of LoRA runs (every stage)


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
    scan_layers: bool = False  # the decoder scanned (its state stacked; the exported params are HF-pathed)
    loss_chunk: int = loop.LOSS_CHUNK  # tokens whose vocabulary logits exist at once
    compute_dtype: str = "float32"
    mesh: str | None = None
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    stop_at: int | None = None  # stop (with a checkpoint) at this step; --resume goes on to `steps`
    resume: bool = False
    force: bool = False  # a fresh run may replace the model, checkpoints and logs in a non-empty `out`
    skip_bad: bool = False
    progress: bool = True
    lora_rank: int | None = None  # LoRA adapters of this rank instead of training the weights
    lora_alpha: float | None = None  # None: 2 * rank
    lora_dropout: float = 0.0
    lora_targets: str | None = None  # None: lora.tree.DEFAULT_TARGETS
    pack: bool = False  # several records per row (loader.Loader.assemble_packed); batch_size still counts records
    workers: int = 0  # Grain worker processes that read and preprocess records (0: threads in this process)

    def lora_spec(self) -> LoraSpec | None:
        if self.lora_rank is None:
            return None
        return LoraSpec(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets or DEFAULT_TARGETS)

    def stage_spec(self) -> st.Stage:
        train = tuple(self.train) if self.train else None
        lr = self.learning_rate
        if self.lora_rank is not None:  # the adapters and nothing else; adapters take a higher rate
            train, lr = (TRAINABLE,), LORA_LR if lr is None else lr
        return st.get_stage(self.stage, learning_rate=lr, warmup_steps=self.warmup_steps,
                            end_lr_ratio=self.end_lr_ratio, weight_decay=self.weight_decay,
                            clip_norm=self.clip_norm, labels=self.labels, train=train)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during `fit`. `step`: the latest checkpoint in `out` that `--resume` continues
    from, or None when nothing was saved (a fresh run then removes what it created)."""

    def __init__(self, out: Path, step: int | None):
        held = "no checkpoint" if step is None else f"the checkpoint of step {step}"
        super().__init__(f"interrupted; {out} holds {held}")
        self.out, self.step = out, step


def check_options(opts: TrainOptions) -> None:
    """Every numeric option and regex, before anything is read or written (InputError)."""
    ints = {"--steps": (opts.steps, 1), "--batch-size": (opts.batch_size, 1), "--accum": (opts.accum, 1),
            "--log-every": (opts.log_every, 1), "--save-every": (opts.save_every, 0), "--seed": (opts.seed, 0),
            "--stop-at": (opts.stop_at, 1), "--max-length": (opts.max_length, 1),
            "--loss-chunk": (opts.loss_chunk, 1), "--workers": (opts.workers, 0)}
    for flag, (value, low) in ints.items():
        if value is None and flag in ("--stop-at", "--max-length"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{flag} must be at least {low}, got {value}")

    def number(flag, value, ok, want):
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise InputError(f"{flag} must be {want}, got {value:g}")

    number("--lr", opts.learning_rate, lambda v: v > 0, "positive")
    number("--warmup", opts.warmup_steps, lambda v: v >= 0, "at least 0")
    number("--end-lr-ratio", opts.end_lr_ratio, lambda v: 0 <= v <= 1, "between 0 and 1")
    number("--weight-decay", opts.weight_decay, lambda v: v >= 0, "at least 0")
    number("--clip", opts.clip_norm, lambda v: v >= 0, "at least 0 (0: no clipping)")
    for pattern in opts.train or ():
        try:
            re.compile(pattern)
        except re.error as e:
            raise InputError(f"--train {pattern!r} is not a valid regex ({e})") from None
    if opts.compute_dtype not in ("float32", "bfloat16"):
        raise InputError(f"--compute-dtype must be float32 or bfloat16, got {opts.compute_dtype!r}")
    if opts.lora_rank is not None:
        if opts.train:
            raise InputError("--train picks weights to train in full; with --lora-rank the adapters train, "
                             "on the layers --lora-targets picks")
        opts.lora_spec().check()
    elif opts.lora_alpha is not None or opts.lora_dropout or opts.lora_targets is not None:
        raise InputError("--lora-alpha, --lora-dropout and --lora-targets need --lora-rank")
    opts.stage_spec()  # the stage number


def saved_steps(state_dir: Path) -> list[int]:
    """Finished checkpoints under `state_dir` (an interrupted save leaves none)."""
    if not state_dir.is_dir():
        return []
    import orbax.checkpoint as ocp  # noqa: PLC0415

    return sorted(ocp.utils.checkpoint_steps(state_dir))


def check_out(opts: TrainOptions, model_dir: Path, out: Path) -> int | None:
    """Refuses an --out that would clobber something; -> the checkpoint step to resume from."""
    refuse_inside(out, "--out", model_dir, "--model", what="the model it starts from")
    for name in (STATE_DIR, ck.PARAMS, STAGING, ADAPTER_DIR):  # what a run replaces or removes in --out
        if out / name == model_dir or out / name in model_dir.parents:
            raise InputError(f"--model {model_dir} is inside {out / name}, which training into --out {out} "
                             "writes over: choose another --out, or move the model")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    steps = saved_steps(out / STATE_DIR)
    if opts.resume:
        if not steps:
            raise InputError(f"--resume: {out} holds no checkpoint to resume from (a run saves one every "
                             "--save-every steps and at its end)")
        return steps[-1]
    if opts.force:
        return None
    if steps:
        raise InputError(f"{out} already holds a training run; pass --resume to continue it, --force to replace "
                         "it, or choose another --out")
    state_dir = out / STATE_DIR  # an empty one is what a run killed before its first save left
    if out.is_dir() and any(p != state_dir or not p.is_dir() or any(p.iterdir()) for p in out.iterdir()):
        raise InputError(f"--out {out} exists and is not empty (pass --force to replace it)")
    return None


# The --resume check names the flags behind the run key's fields (the key is stored as is).
KEY_FLAGS = {"steps": "--steps", "batch_size": "--batch-size", "accum": "--accum", "seed": "--seed",
             "data": "--data", "records": "the number of records in --data", "scan_layers": "--scan-layers",
             "lora": "--lora-rank/--lora-alpha/--lora-dropout/--lora-targets", "pack": "--pack"}
KEY_DEFAULTS = {"scan_layers": False, "lora": None, "pack": False}  # what a checkpoint written before the field existed meant
STAGE_FLAGS = {"train": "--train", "learning_rate": "--lr", "labels": "--labels", "warmup_steps": "--warmup",
               "end_lr_ratio": "--end-lr-ratio", "weight_decay": "--weight-decay", "clip_norm": "--clip"}


def resume_mismatch(saved: dict, key: dict) -> list[str]:
    """What differs between the run key a checkpoint holds and this run's, as the flags that
    set it: ["--lr (was 0.01, now 0.001)", ...]; [] when the run may resume."""

    def show(v):
        if isinstance(v, list):
            return " ".join(map(show, v)) or "none"
        return f"{v:g}" if isinstance(v, float) else str(v)

    def differs(flag, was, now):
        return [f"{flag} (was {show(was)}, now {show(now)})"] if was != now else []

    out = []
    was_stage, now_stage = saved.get("stage") or {}, key["stage"]
    if was_stage.get("name") != now_stage["name"]:
        number = {s.name: n for n, s in st.STAGES.items()}
        out += differs("--stage", number.get(was_stage.get("name"), was_stage.get("name")),
                       number.get(now_stage["name"], now_stage["name"]))
    else:
        for field, value in now_stage.items():
            out += differs(STAGE_FLAGS.get(field, field), was_stage.get(field), value)
    for field, value in key.items():
        if field != "stage":
            out += differs(KEY_FLAGS.get(field, field), saved.get(field, KEY_DEFAULTS.get(field)), value)
    return out


def _run_key(opts: TrainOptions, stage: st.Stage, records: int) -> dict:
    """What must not change between a run and its resumption."""
    key = {"stage": dataclasses.asdict(stage), "steps": opts.steps, "batch_size": opts.batch_size,
           "accum": opts.accum, "seed": opts.seed, "records": records, "data": str(Path(opts.data).resolve()),
           "scan_layers": opts.scan_layers,  # the checkpoints hold stacked layers: resume with the same decoder
           "lora": None if opts.lora_rank is None else dataclasses.asdict(opts.lora_spec()),
           "pack": opts.pack}  # packed runs draw their steps without grouping by length
    return json.loads(json.dumps(key))  # as it reads back from the checkpoint (tuples -> lists)


def load_model_params(folder: Path, config: Qwen2VLConfig, shardings=None, dtype=jnp.float32) -> dict:
    """Params in `dtype` (packed leaves as stored) from a converted folder (Orbax) or an HF
    folder (safetensors)."""
    if ck.is_converted(folder):
        return ck.load_params(folder, config, dtype=dtype, shardings=shardings)
    if any(folder.glob("*.safetensors")):
        params = load_hf_params(folder, config, dtype, host=True)
        if shardings is not None:
            params = jax.device_put(params, shardings)
        return params
    raise InputError(f"{folder}: no weights (neither a converted folder with params/ nor *.safetensors)")


def base_shapes(folder: Path, config: Qwen2VLConfig) -> dict:
    """The shapes of the weights a run starts from, as stored: a quantized folder's packed tree,
    else the config's (`init_shapes`)."""
    if ck.is_converted(folder):
        return ck.stored_tree(ck.check_params(folder, config))
    return init_shapes(config)


def state_params(opts: TrainOptions, base: dict, config: Qwen2VLConfig, adapter: dict | None = None) -> dict:
    """The params a run's state holds (arrays or shapes): the base, the run's adapter attached
    (`adapter`, or ShapeDtypeStructs of a fresh one), the decoder stacked with --scan-layers."""
    spec = opts.lora_spec()
    if spec is not None:
        if adapter is None:
            fresh = init_adapter(init_shapes(config), spec, opts.seed)
            adapter = {p: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for p, v in fresh.items()}
        base = attach(base, adapter)
    elif is_quantized(base):
        raise InputError("--model holds packed (quantized) weights, which train only through adapters: "
                         "pass --lora-rank (QLoRA), or train the float model")
    return stack_layers(base) if opts.scan_layers else base


def whole(x) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array as one host numpy array; collective when
    another process holds part of it."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def write_adapter(params: dict, out: Path, model_dir: Path, spec: LoraSpec, float_shapes: dict) -> None:
    """Writes the adapters of a LoRA run's params as OUT/adapter (PEFT's format), replaced
    whole by rename: a staging sibling first, the old folder swapped out after. Every process
    calls it (an adapter split over hosts is gathered collectively); process 0 writes."""
    _, adapter = detach(params)  # stacked or not: only the adapters are copied to the host
    # whole arrays, not one device's shard: the trainer splits adapters over fsdp (sharding.PARAM_AXES)
    host = {p: whole(x) for p, x in adapter.items()}
    if jax.process_index() != 0:
        return
    host = flatten(unstack_layers(unflatten(host)))
    staging, final = out / f".{ADAPTER_DIR}.tmp", out / ADAPTER_DIR
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_adapter(staging, host, float_shapes, dropout=spec.dropout, base_model=str(model_dir))
        old = out / f".{ADAPTER_DIR}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


STAGING = ".params.tmp"  # the same name on every host: Orbax saves collectively


def export(params, model_dir: Path, out: Path) -> None:
    """Writes OUT as a converted folder: side files from the source model, then params.

    Every piece replaces the old one by rename: the params are saved into OUT/.params.tmp and
    swapped with OUT/params (the marker last). The caller holds Ctrl-C off (`on_save` in `fit`),
    so an interrupt at any point leaves the old or the new params whole, never none."""
    main = jax.process_index() == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for src in ck.side_files(model_dir):
            _replace_file(src, out / src.name)
    staging = out / STAGING
    if main:
        shutil.rmtree(staging, ignore_errors=True)  # what a killed save left
    try:
        ck.save_params(params, staging, overwrite=True)
        distributed.barrier("qwen2vl_train_staged")  # every process is done writing the staging folder
        if main:
            if (out / ck.PARAMS).exists():
                os.replace(out / ck.PARAMS, staging / "old")
            os.replace(staging / ck.PARAMS, out / ck.PARAMS)
            os.replace(staging / ck.MARKER, out / ck.MARKER)
    finally:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        distributed.barrier("qwen2vl_train_export")


def _replace_file(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def fit(opts: TrainOptions, log: Callable[[str], None] | None = None) -> dict:
    """Runs one stage; returns {"loss": last logged loss, "steps", "out", "skipped"}.

    Raises InputError on bad options, data or --out before training starts, and `Interrupted`
    on Ctrl-C."""
    leader = distributed.is_leader()
    if not leader:
        log = lambda s: None  # noqa: E731 - process 0 speaks for the run
    log = log or (lambda s: print(s, file=sys.stderr))
    model_dir, out = Path(opts.model).resolve(), Path(opts.out).resolve()
    check_options(opts)
    if not model_dir.is_dir():
        raise InputError(f"--model {opts.model}: no such folder")
    if not Path(opts.data).is_file():
        raise InputError(f"--data {opts.data}: " + ("is a folder, not a JSONL file" if Path(opts.data).is_dir()
                                                    else "no such file"))
    saved = {"step": check_out(opts, model_dir, out)}  # the latest checkpoint in out
    distributed.barrier("qwen2vl_train_checked")  # every process checked --out before process 0 writes
    made: list[Path] = []  # what a fresh run created, removed if it fails before its first checkpoint
    try:
        return _fit(opts, log, model_dir, out, saved, made)
    except BaseException as e:
        if saved["step"] is None and leader:
            for path in reversed(made):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        if isinstance(e, Exception):
            try:
                interrupts.check()  # an error an interrupt caused (inside Orbax, say) is the interrupt
            except KeyboardInterrupt:
                raise Interrupted(out, saved["step"]) from None
        if isinstance(e, KeyboardInterrupt) and not isinstance(e, Interrupted):
            raise Interrupted(out, saved["step"]) from None
        raise


def _fit(opts: TrainOptions, log, model_dir: Path, out: Path, saved: dict, made: list[Path]) -> dict:
    leader = distributed.is_leader()
    new = [p for p in (out, *out.parents) if not p.exists()]  # the last is the top-most
    try:
        if leader:
            out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    finally:
        if new and new[-1].exists():
            made.append(new[-1])
    state_dir = out / STATE_DIR
    log_file, loss_file, plot_file = out / "train_log.jsonl", out / "losses.csv", out / "loss.png"

    config = ck.read_config(model_dir)
    from qwen2vl_jax.processing import Processor  # noqa: PLC0415 - heavy, only when training

    processor = Processor.from_pretrained(model_dir)
    stage = opts.stage_spec()
    mesh = make_mesh(opts.mesh) if opts.mesh else None
    check_divisible(config, mesh)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[opts.compute_dtype]

    dataset = JsonlDataset(opts.data, processor, labels=stage.labels, max_length=opts.max_length,
                           skip_bad=opts.skip_bad, progress=opts.progress and leader)
    for p in dataset.skipped:
        log(f"skipped: {p}")
    key = _run_key(opts, stage, len(dataset))
    trainer = loop.Trainer(config, stage, opts.steps, mesh=mesh, remat=opts.remat, compute_dtype=dtype,
                          loss_chunk=opts.loss_chunk, scan_layers=opts.scan_layers, seed=opts.seed)
    if not opts.resume and leader:  # a new run: the old one's checkpoints and log rows must not leak into it
        for path in (state_dir, log_file, loss_file, plot_file):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        made += [state_dir, log_file, loss_file, plot_file]
    distributed.barrier("qwen2vl_train_prepared")  # --out is ready before any process opens it
    ckpts = loop.Checkpoints(state_dir)
    try:
        if opts.resume:
            changed = resume_mismatch(ckpts.meta().get("key") or {}, key)
            if changed:
                raise InputError(f"--resume: the run in {out} was started with other settings: "
                                 f"{'; '.join(changed)}; resume with the same options")
            state, meta = ckpts.restore(trainer.abstract_state(state_params(opts, base_shapes(model_dir, config),
                                                                            config)))
            position = Position(**meta["position"])
            log(f"resuming stage {opts.stage} at step {int(state.step)} (epoch {position.epoch}, batch {position.index})")
            pending = []
            if leader:  # the logs are process 0's
                last_row = _drop_rows_after(int(state.step), log_file, loss_file)  # the dead continuation's
                # the steps since the last row: the first row after the resume averages them too
                pending = [(s, v) for s, v in _read_losses(loss_file) if s > last_row]
        else:
            shardings = param_shardings(base_shapes(model_dir, config), mesh) if mesh is not None else None
            spec = opts.lora_spec()
            # a LoRA run holds its frozen base in the compute dtype (loop.held_dtype): read it so
            loaded = load_model_params(model_dir, config, shardings, jnp.float32 if spec is None else dtype)
            adapter = None if spec is None else init_adapter(init_shapes(config), spec, opts.seed)
            state = trainer.init_state(state_params(opts, loaded, config, adapter))
            del loaded  # the state holds its own copy: free these before training
            position, pending = Position(), []
        title = f"stage {opts.stage} ({stage.name}) loss"

        def plot() -> None:  # the whole run's losses, resumed parts included
            if leader:
                plot_losses(_read_losses(loss_file), plot_file, title=title)

        if int(state.step) >= opts.steps:
            log(f"already at step {int(state.step)} of {opts.steps}")
            plot()
            return {"loss": None, "steps": int(state.step), "out": str(out), "skipped": dataset.skipped}

        n_train = sum(int(x.size) for x in jax.tree.leaves(st.split(state.params, trainer.trainable)[0]))
        n_all = sum(int(x.size) for x in jax.tree.leaves(state.params))
        log(f"stage {opts.stage} ({stage.name}): training {n_train:,} of {n_all:,} parameters on "
            f"{len(dataset)} records, {opts.steps} steps of {opts.batch_size}x{opts.accum}, lr {stage.learning_rate:g}")
        last = {}

        def on_log(row: loop.LogRow):
            last["loss"] = row.loss
            if not leader:
                return
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
            # Ctrl-C waits for the save: stopping Orbax halfway leaves its threads writing.
            with interrupts.deferred():
                ckpts.save(s, {"key": key, "position": dataclasses.asdict(pos)})
                saved["step"] = int(s.step)
                if opts.lora_rank is not None:
                    write_adapter(s.params, out, model_dir, opts.lora_spec(), init_shapes(config))
                else:
                    export(unstack_layers(s.params), model_dir, out)  # HF paths, whichever the decoder
                plot()  # up to date with every checkpoint, whatever stops the run later

        until = opts.steps if opts.stop_at is None else max(int(state.step), min(opts.stop_at, opts.steps))
        batches = Loader(dataset, config, opts.batch_size, opts.accum, opts.seed, pack=opts.pack,
                         workers=opts.workers)(position)
        try:
            state, position, losses = loop.run_steps(
                trainer, state, batches, until, log_every=opts.log_every, on_log=on_log, on_save=on_save,
                save_every=opts.save_every, progress=opts.progress and leader, pending=pending,
                on_losses=lambda pts: _append_losses(loss_file, pts) if leader else None)
        except KeyboardInterrupt:
            with interrupts.deferred(), contextlib.suppress(OSError):
                plot()  # the steps logged so far (a resume drops those after its checkpoint)
            raise
        finally:
            batches.close()  # the input pipeline's workers stop with the run
        plot()
        return {"loss": last.get("loss"), "steps": int(state.step), "out": str(out), "skipped": dataset.skipped}
    finally:
        ckpts.close()


def _drop_rows_after(step: int, log_file: Path, loss_file: Path) -> int:
    """Keeps the log rows up to `step` (a resumed run rewrites the ones after it); -> the step
    of the last row kept (0: none)."""
    last = 0
    if log_file.exists():
        def kept(row: str) -> int | None:
            try:
                s = parse_json(row, log_file.name)["step"]
                return s if isinstance(s, int) and s <= step else None
            except (InputError, KeyError, TypeError):  # a row cut short when the run was killed
                return None

        rows = [(r, kept(r)) for r in log_file.read_text().splitlines()]
        log_file.write_text("".join(r + "\n" for r, s in rows if s is not None))
        last = max([s for _, s in rows if s is not None], default=0)
    if loss_file.exists():
        _write_losses(loss_file, [(s, v) for s, v in _read_losses(loss_file) if s <= step])
    return last


LOSSES_HEADER = "step,loss"  # losses.csv's first line


def _append_losses(path: Path, points: list[tuple[int, float]]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a") as f:
        if new:
            f.write(LOSSES_HEADER + "\n")
        f.writelines(f"{s},{v:.6f}\n" for s, v in points)


def _write_losses(path: Path, points: list[tuple[int, float]]) -> None:
    path.write_text(LOSSES_HEADER + "\n" + "".join(f"{s},{v:.6f}\n" for s, v in points))


def _read_losses(path: Path) -> list[tuple[int, float]]:
    """(step, loss) from losses.csv, the header and any line cut short skipped."""
    if not path.exists():
        return []
    pts = {}
    for line in path.read_text().splitlines():
        try:
            s, v = line.split(",")
            pts[int(s)] = float(v)  # a resumed run rewrites the steps after its checkpoint
        except ValueError:  # the header, or a line cut short when a run was killed
            continue
    return sorted(pts.items())

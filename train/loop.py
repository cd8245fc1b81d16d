"""The optax train step and the host loop around it.

`Trainer` owns the jitted step: loss = mean cross-entropy over label positions (labels
shifted by one, -100 ignored; HF's ForCausalLMLoss), gradients of the trainable subtree only,
gradient accumulation over micro-batches (token-weighted, so A micro-batches give the same
update as one batch of all their rows), clipping + AdamW from `stages.make_optimizer`.

On a mesh the step runs sharded the same way inference does: parameters and optimizer state
by `sharding.param_shardings` (FSDP over the model dimension, tensor parallelism where the
rules ask for it), the batch over (data, fsdp). The vision tower runs on the batch's flat patch
layout, as in inference.

Options: `remat` rematerialises every vision and decoder block; `compute_dtype=bfloat16`
computes in bf16 while the params (master weights), gradients and optimizer state stay fp32;
`loss_chunk` is how many tokens' vocabulary logits exist at once (`chunked_token_loss`).

LoRA (qwen2vl_jax/lora) is the same step: the adapters are leaves of the params and the stage's
pattern names only them (`lora.tree.TRAINABLE`), so the base weights, float or packed, are frozen
leaves that get no gradient and no optimizer state. Floating leaves are held in float32; packed
integer leaves stay as stored. Adapter dropout draws its masks from the step number (`seed`), so
a resumed run draws the same ones.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.lora.layer import A as LORA_A, B as LORA_B, LEAVES as LORA_LEAVES
from qwen2vl_jax.modules.qwen2vl import Qwen2VLModule
from qwen2vl_jax.quant.format import RUNTIME_PARTS
from qwen2vl_jax.sharding import ShardingRules, head_by_vocab, named_sharding, param_shardings, shard, to_global, use_mesh
from qwen2vl_jax.train import stages as st
from qwen2vl_jax.train.data import IGNORE
from qwen2vl_jax.train.loader import Position


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32[]
    params: Any  # the whole tree, fp32 master weights
    opt_state: Any  # over the trainable subtree only

    def as_dict(self) -> dict:
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state}


# ----------------------------------------------------------------------------- loss
LOSS_CHUNK = 2048  # tokens (rows x positions) whose vocabulary logits exist at once in the loss


def _cross_entropy(logits, targets):
    """logits [..., V] (cast to f32), targets int[...] (-100 = ignore) -> (CE sum, count)."""
    logits = logits.astype(jnp.float32)
    valid = targets != IGNORE
    logz = jax.nn.logsumexp(logits, axis=-1)
    # The target's logit as a masked sum over the vocabulary (the other terms are exact zeros),
    # not a gather: with the vocabulary split over chips it stays a local sum plus one reduction.
    hit = jnp.arange(logits.shape[-1]) == jnp.where(valid, targets, 0)[..., None]
    picked = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    return jnp.sum(jnp.where(valid, logz - picked, 0.0)), jnp.sum(valid)


def chunked_token_loss(module: Qwen2VLModule, params, hidden, labels, chunk: int = LOSS_CHUNK):
    """(sum of CE over the shifted label positions, their count) for hidden [B, L, D] and
    labels int[B, L] (-100 = ignore; position t predicts labels[t + 1]), without ever holding
    all the logits [B, L, V]: the sequence is cut into pieces of max(1, chunk // B) positions
    (about `chunk` tokens), each piece's logits are made, reduced to its loss and dropped, and
    remade in the backward pass. With Qwen2-VL's 151,936-token vocabulary the f32 logits of a
    whole batch would otherwise dominate training memory (8 x 2048 tokens: 10 GB).

    On a mesh the pieces are vocabulary-parallel: the head is split by vocabulary over every
    chip (`sharding.head_by_vocab`), each piece's hidden states are gathered whole, and each chip
    makes its vocabulary slice of the piece's logits."""
    b, l, d = hidden.shape
    span = max(1, chunk // b)  # positions per piece
    targets = jnp.concatenate([labels[:, 1:], jnp.full((b, 1), IGNORE, labels.dtype)], axis=1)
    n = -(-l // span)
    hidden = jnp.pad(hidden, ((0, 0), (0, n * span - l), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, n * span - l)), constant_values=IGNORE)
    pieces = (hidden.reshape(b, n, span, d).swapaxes(0, 1), targets.reshape(b, n, span).swapaxes(0, 1))

    @jax.checkpoint
    def piece_loss(p, h, t):
        h = shard(h, None, None, None)  # [B, span, D], whole on every chip
        logits = shard(module.apply({"params": p}, h, method=Qwen2VLModule.lm_logits), None, None, "loss_vocab")
        return _cross_entropy(logits, t)

    head = head_by_vocab(params)

    def body(carry, piece):
        s, c = piece_loss(head, *piece)
        return (carry[0] + s, carry[1] + c), None

    (total, count), _ = jax.lax.scan(body, (jnp.float32(0), jnp.int32(0)), pieces)
    return total, count


def forward_hidden(module: Qwen2VLModule, params, batch: dict, rng=None):
    """One micro-batch (see data.collate) -> the final hidden states [B, L, D], through the
    module's own forward (the same vision layout and embedding merge as inference); rng: the
    key of the adapters' dropout (none: no dropout)."""
    return module.apply({"params": params}, batch["input_ids"], batch["positions"], batch["attention_mask"],
                        batch.get("vision"), method=Qwen2VLModule.hidden_states,
                        rngs=None if rng is None else {"dropout": rng})


def batch_loss(module: Qwen2VLModule, params, batch: dict, chunk: int = LOSS_CHUNK, rng=None):
    """-> (CE sum, label count) of one micro-batch."""
    hidden = forward_hidden(module, params, batch, rng)
    return chunked_token_loss(module, params, hidden, batch["labels"], chunk)


LORA_TRAINED = (f"/{LORA_A}", f"/{LORA_B}")


def held_dtype(path: str, x, trainable: frozenset[str], compute_dtype):
    """The dtype the state holds parameter `path` in. Trained floating leaves: float32 (master
    weights). A LoRA run's frozen base (the stage trains adapters): the compute dtype, the only
    one the forward reads it in (a bfloat16 run's 2B base: 4.4 GB, not 8.8), except the adapters'
    own leaves (scale, dropout rate) and a packed layer's scales and zeros: float32. Any other
    run's frozen leaves: float32 too (a full run exports them). Integers: as they are."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x.dtype
    lora = any(p.endswith(LORA_TRAINED) for p in trainable)
    if path in trainable or not lora or path.rpartition("/")[2] in LORA_LEAVES + RUNTIME_PARTS:
        return jnp.dtype(jnp.float32)
    return jnp.dtype(compute_dtype)


def _held(params, trainable: frozenset[str], compute_dtype, make):
    """`make(leaf, dtype)` over every leaf of `params` with its `held_dtype`."""
    def one(path, x):
        name = "/".join(str(k.key) for k in path)
        return make(x, held_dtype(name, x, trainable, compute_dtype))

    return jax.tree_util.tree_map_with_path(one, params)


def master_copy(x, dtype):
    """A parameter as the state holds it, in `dtype` (a copy: the step donates its state, and
    the caller keeps its arrays)."""
    return jnp.array(x, dtype, copy=True)


def master_shape(x, dtype):
    """`master_copy` on shapes."""
    return jax.ShapeDtypeStruct(x.shape, dtype)


# ----------------------------------------------------------------------------- trainer
class Trainer:
    """The jitted train step of one stage on one (optional) mesh.

    Trained params are fp32 master weights; `compute_dtype` is the forward/backward dtype, and
    the dtype a LoRA run holds its frozen base in (`held_dtype`)."""

    def __init__(self, config: Qwen2VLConfig, stage: st.Stage, total_steps: int, *, mesh=None,
                 rules: ShardingRules | None = None, remat: bool = False, compute_dtype=jnp.float32,
                 loss_chunk: int = LOSS_CHUNK, scan_layers: bool = False, seed: int = 0, backend: str | None = None):
        self.config = config
        self.seed = int(seed)  # the adapters' dropout masks: a key per step and micro-batch
        self.loss_chunk = loss_chunk
        self.stage = stage
        self.total_steps = int(total_steps)
        self.mesh = mesh
        # packed (QLoRA) bases gathered as stored, not as the floats they dequantize to
        self.rules = dataclasses.replace(rules or ShardingRules(), gather_packed=True)
        # scan_layers: the decoder scanned, its params (and so the state) stacked (params.stack_layers)
        # backend: the platform the step is built for (default: this one's), e.g. "tpu" to compile
        # a slice's program ahead of time on a CPU host
        self.module = Qwen2VLModule(config, jnp.dtype(compute_dtype), remat, scan_layers=scan_layers,
                                    **({} if backend is None else {"backend": backend}))
        self.optimizer = st.make_optimizer(stage, self.total_steps)
        self.schedule = st.schedule(stage, self.total_steps)
        self.trainable: frozenset[str] | None = None
        self._step = None
        self._grads = None

    # ---------------------------------------------------------------- state
    def init_state(self, params) -> TrainState:
        self.trainable = st.trainable_paths(params, self.stage)
        params = _held(params, self.trainable, self.module.dtype, master_copy)
        train, _ = st.split(params, self.trainable)
        if self.mesh is None:
            # Committed to the device like the states the step returns (the counters would not be),
            # so the second step does not compile the program again.
            return jax.device_put(TrainState(jnp.zeros((), jnp.int32), params, self.optimizer.init(train)),
                                  jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        shapes = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p,
                                                     self.optimizer.init(st.split(p, self.trainable)[0])), params)
        shardings = self.state_shardings(shapes)
        params = jax.device_put(params, shardings.params)
        init = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, self.optimizer.init(st.split(p, self.trainable)[0])),
                       out_shardings=shardings)
        return init(params)

    def abstract_state(self, params_shapes) -> TrainState:
        """ShapeDtypeStructs (with shardings on a mesh) of the state, for restoring."""
        self.trainable = st.trainable_paths(params_shapes, self.stage)
        params_shapes = _held(params_shapes, self.trainable, self.module.dtype, master_shape)
        shapes = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p,
                                                     self.optimizer.init(st.split(p, self.trainable)[0])),
                                params_shapes)
        if self.mesh is None:
            dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), shapes)
        shardings = self.state_shardings(shapes)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

    def state_shardings(self, shapes: TrainState) -> TrainState:
        """Params by the model's rules; each optimizer leaf like the parameter whose path it
        carries (Adam's mu/nu), scalars replicated."""
        pshard = param_shardings(shapes.params, self.mesh, self.rules)
        by_path = st.traverse_util.flatten_dict(pshard, sep="/")
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

        def leaf(path, x):
            keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
            for i in range(len(keys)):
                s = by_path.get("/".join(keys[i:]))
                if s is not None and len(s.spec) <= len(x.shape):
                    return s
            return replicated

        opt = jax.tree_util.tree_map_with_path(leaf, shapes.opt_state)
        return TrainState(replicated, pshard, opt)

    def place_batch(self, batch: dict) -> dict:
        """Host arrays (the whole global batch, on every host) -> global arrays on the mesh."""
        if self.mesh is None:
            return batch
        return jax.tree.map(to_global, batch, self.batch_shardings(batch))

    def batch_shardings(self, batch: dict):
        """[A, B, ...] arrays: the B axis over the rules' batch axes (positions: [A, 3, B, L]);
        the vision arrays ([A, patches or segments, ...], no batch axis) by the `patches` rule."""
        def one(path, x):
            names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
            if names[0] == "vision":
                axes = (None, "patches")
            else:
                axes = (None, None, "batch") if names[-1] == "positions" else (None, "batch")
            return named_sharding(self.mesh, self.rules, x.shape, *axes)

        return jax.tree_util.tree_map_with_path(one, batch)

    # ---------------------------------------------------------------- the step
    def loss_and_grads(self, params, batch: dict, step=None):
        """Mean loss and grads w.r.t. the trainable subtree for one step's arrays ([A, B, ...]);
        step: the optimizer step, whose key drives the adapters' dropout (None: no dropout)."""
        train, frozen = st.split(params, self.trainable)
        accum = jax.tree.leaves(batch)[0].shape[0]
        keys = (None if step is None else
                jax.random.split(jax.random.fold_in(jax.random.PRNGKey(self.seed), step), accum))

        def micro(carry, xs):
            grads, total, count = carry
            mb, key = xs
            (s, n), g = jax.value_and_grad(
                lambda tp: batch_loss(self.module, st.merge(tp, frozen), mb, self.loss_chunk, key),
                has_aux=True)(train)
            return (jax.tree.map(jnp.add, grads, g), total + s, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, train)
        (grads, total, count), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.int32(0)), (batch, keys))
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        return total / denom, jax.tree.map(lambda g: g / denom, grads), count

    def _train_step(self, state: TrainState, batch: dict):
        loss, grads, count = self.loss_and_grads(state.params, batch, state.step)
        train, frozen = st.split(state.params, self.trainable)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, train)
        train = optax.apply_updates(train, updates)
        metrics = {"loss": loss, "tokens": count, "grad_norm": optax.tree.norm(grads),
                   "lr": self.schedule(state.step)}
        return TrainState(state.step + 1, st.merge(train, frozen), opt_state), metrics

    def grads(self, params, batch: dict):
        """(mean loss, gradients of the trainable subtree) for one step's arrays, jitted on the
        trainer's mesh like `step` but without updating anything."""
        if self.trainable is None:
            self.trainable = st.trainable_paths(params, self.stage)
        if self._grads is None:
            def fn(p, b):
                with use_mesh(self.mesh, self.rules):
                    return self.loss_and_grads(p, b)[:2]

            self._grads = jax.jit(fn)
        return self._grads(params, self.place_batch(batch))

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One optimizer update from one step's arrays ([A, B, ...], host numpy)."""
        return self.step_function(state)(state, self.place_batch(batch))

    def step_function(self, state: TrainState):
        """The jitted update `(state, placed batch) -> (state, metrics)` that `step` runs, built
        once; `state` may be abstract (`abstract_state`), so `.lower(state, batch).compile()`
        compiles it ahead of time from shapes alone."""
        if self.trainable is None:
            raise RuntimeError("call init_state (or restore) before step")
        if self._step is None:
            if self.mesh is None:
                self._step = jax.jit(self._train_step, donate_argnums=0)
            else:
                shardings = self.state_shardings(jax.eval_shape(lambda s: s, state))

                @functools.partial(jax.jit, donate_argnums=0, out_shardings=(shardings, None))
                def sharded(s, b):
                    with use_mesh(self.mesh, self.rules):
                        return self._train_step(s, b)

                self._step = sharded
        return self._step


# ----------------------------------------------------------------------------- checkpoints
class Checkpoints:
    """Orbax checkpoints of {step, params, opt_state} plus the data position and run options
    (JSON) under `folder`, keeping the last `keep`."""

    def __init__(self, folder: str | Path, keep: int = 2):
        import orbax.checkpoint as ocp  # noqa: PLC0415

        self.ocp = ocp
        self.folder = Path(folder).resolve()
        self.manager = ocp.CheckpointManager(
            self.folder, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "meta"))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, meta: dict) -> None:
        step = int(state.step)
        self.manager.save(step, args=self.ocp.args.Composite(
            state=self.ocp.args.StandardSave(state.as_dict()), meta=self.ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def meta(self, step: int | None = None) -> dict:
        step = self.latest() if step is None else step
        out = self.manager.restore(step, args=self.ocp.args.Composite(meta=self.ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore(self, abstract: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        step = self.latest() if step is None else step
        out = self.manager.restore(step, args=self.ocp.args.Composite(
            state=self.ocp.args.StandardRestore(abstract.as_dict()), meta=self.ocp.args.JsonRestore()))
        s = out["state"]
        return TrainState(s["step"], s["params"], s["opt_state"]), dict(out["meta"])

    def close(self) -> None:
        self.manager.close()


# ----------------------------------------------------------------------------- host loop
@dataclasses.dataclass
class LogRow:
    step: int
    loss: float  # mean over the steps since the previous row
    lr: float
    tokens_per_s: float
    grad_norm: float


def run_steps(trainer: Trainer, state: TrainState, batches: Iterator[tuple[dict, int, Position]],
              until: int, *, log_every: int = 10, on_log: Callable[[LogRow], None] | None = None,
              on_save: Callable[[TrainState, Position], None] | None = None, save_every: int = 0,
              on_losses: Callable[[list[tuple[int, float]]], None] | None = None,
              pending: Sequence[tuple[int, float]] = (),
              progress: bool = False) -> tuple[TrainState, Position | None, list[tuple[int, float]]]:
    """Steps until state.step == until; returns (state, data position after it, [(step, loss)]).

    A row is logged every `log_every` steps and at `until`; its loss is the mean over the
    steps since the previous row. `pending`: the (step, loss) of steps before state.step that
    no row covers yet (a resumed run's, back to the last row before its checkpoint), so the
    first row averages the same steps as in a run that never stopped. `on_losses` gets every
    step's loss once: at its row, or before a checkpoint that comes first (so the losses
    file covers every step up to each checkpoint).

    Metrics stay on device between log points and saves, so the host never waits on a step
    it does not report."""
    start = int(state.step)
    bar = None
    if progress:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=until, initial=start, unit="step", dynamic_ncols=True)
    history: list[tuple[int, float]] = []
    earlier = [(int(s), float(v)) for s, v in pending if s <= start]  # in the first row's mean
    window: list[tuple[int, dict]] = []  # the steps since the last row, metrics on device
    reported = 0  # how many of window's losses on_losses already has
    window_tokens, window_start = 0, time.perf_counter()
    pos = None
    try:
        for step in range(start, until):
            arrays, tokens, pos = next(batches)
            state, metrics = trainer.step(state, arrays)
            window.append((step + 1, metrics))
            window_tokens += tokens
            if bar is not None:
                bar.update(1)
            last = step + 1 == until
            if (step + 1) % log_every == 0 or last:
                got = jax.device_get([m for _, m in window])
                elapsed = time.perf_counter() - window_start
                points = [(s, float(m["loss"])) for (s, _), m in zip(window, got)]
                history += points
                row = LogRow(step + 1, float(np.mean([v for _, v in earlier + points])), float(got[-1]["lr"]),
                             window_tokens / max(elapsed, 1e-9), float(got[-1]["grad_norm"]))
                if bar is not None:
                    bar.set_postfix(loss=f"{row.loss:.4f}", lr=f"{row.lr:.2e}", tok_s=f"{row.tokens_per_s:.0f}")
                if on_losses is not None and points[reported:]:
                    on_losses(points[reported:])
                if on_log is not None:
                    on_log(row)
                window, earlier, reported = [], [], 0
                window_tokens, window_start = 0, time.perf_counter()
            if on_save is not None and ((save_every and (step + 1) % save_every == 0) or last):
                if on_losses is not None and window[reported:]:  # the checkpoint's steps, before it
                    got = jax.device_get([m["loss"] for _, m in window[reported:]])
                    on_losses([(s, float(v)) for (s, _), v in zip(window[reported:], got)])
                    reported = len(window)
                on_save(state, pos)
    finally:
        if bar is not None:
            bar.close()
    return state, pos, history

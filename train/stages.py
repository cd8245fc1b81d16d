"""The paper's three training stages, as data: which parameters train, how fast, which labels.

    stage 1  the vision tower and merger on image-text pairs, the LLM frozen
    stage 2  every parameter, on broader multimodal data
    stage 3  the LLM on instruction data, the vision tower (and merger) frozen

A stage names the parameters it trains by regexes on their paths (`visual/blocks_3/attn/qkv/
kernel`, `model/layers_5/mlp/up_proj/kernel`, `lm_head/kernel`), as big_vision does. The
optimizer only ever sees the trainable subtree: frozen parameters get no gradient, no update
and no optimizer state, so they come out of a step bit-identical.

Learning rates follow Qwen-VL's recipe (2e-4, 5e-5, 1e-5 for pretraining, multi-task and
instruction tuning); override any field with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax
import optax
from flax import traverse_util

from qwen2vl_jax.errors import InputError
from qwen2vl_jax.params import layer_axes, layer_path, path_str


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    train: tuple[str, ...]  # regexes (re.search) on '/'-joined parameter paths
    learning_rate: float
    labels: str = "assistant"  # data.LABEL_MODES
    warmup_steps: int | float = 0.05  # an int, or a fraction of the run's steps
    end_lr_ratio: float = 0.1  # cosine decays to learning_rate * end_lr_ratio
    weight_decay: float = 0.1  # on matrices only (kernels, embeddings)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0

    def trains(self, path: str) -> bool:
        return any(re.search(p, path) for p in self.train)


STAGES: dict[int, Stage] = {
    1: Stage("vision", train=(r"^visual/",), learning_rate=2e-4, labels="caption"),
    2: Stage("full", train=(r".",), learning_rate=5e-5, labels="assistant"),
    3: Stage("llm", train=(r"^model/", r"^lm_head/"), learning_rate=1e-5, labels="assistant"),
}


def get_stage(stage: int | str | Stage, **overrides) -> Stage:
    if isinstance(stage, Stage):
        base = stage
    else:
        try:
            base = STAGES[int(stage)]
        except (KeyError, ValueError):
            raise InputError(f"stage must be 1, 2 or 3, got {stage!r}") from None
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(base, **overrides) if overrides else base


# ----------------------------------------------------------------------------- params
def _flat(params) -> dict[str, object]:
    return traverse_util.flatten_dict(params, sep="/")


def _trains(stage: Stage, path: str, leaf) -> bool:
    """Whether `stage` trains `path`; a stacked decoder path (params.stack_layers) is matched
    as each of its layers' HF paths, and must be trained in all of them or in none."""
    if not layer_axes(path):
        return stage.trains(path)
    picks = {stage.trains(layer_path(path, i)) for i in range(leaf.shape[0])}
    if len(picks) > 1:
        raise InputError(f"the patterns {list(stage.train)} train {layer_path(path, 0).split('/', 2)[2]} in some "
                         "decoder layers but not others; a scanned decoder trains a weight in all its layers or in none")
    return picks.pop()


def trainable_paths(params, stage: Stage) -> frozenset[str]:
    """The parameter paths `stage` trains; an error if it trains none."""
    paths = frozenset(p for p, leaf in _flat(params).items() if _trains(stage, p, leaf))
    if not paths:
        raise InputError(f"stage {stage.name!r} trains no parameter: no parameter path matches the patterns "
                         f"{list(stage.train)} (--train, or the stage's own); paths look like "
                         f"{next(iter(sorted(_flat(params))), 'model/...')!r}")
    return paths


def split(params, trainable: frozenset[str]) -> tuple[dict, dict]:
    """-> (trainable subtree, frozen subtree), both nested dicts of the same leaves."""
    flat = _flat(params)
    a = {k: v for k, v in flat.items() if k in trainable}
    b = {k: v for k, v in flat.items() if k not in trainable}
    return traverse_util.unflatten_dict(a, sep="/"), traverse_util.unflatten_dict(b, sep="/")


def merge(a: dict, b: dict) -> dict:
    """Inverse of `split`."""
    return traverse_util.unflatten_dict({**_flat(a), **_flat(b)}, sep="/")


# ----------------------------------------------------------------------------- optimizer
def schedule(stage: Stage, total_steps: int) -> Callable:
    """Linear warmup from 0, then cosine decay to learning_rate * end_lr_ratio at total_steps."""
    warmup = stage.warmup_steps
    warmup = int(round(warmup * total_steps)) if isinstance(warmup, float) else int(warmup)
    warmup = max(0, min(warmup, total_steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=stage.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=stage.learning_rate * stage.end_lr_ratio,
    )


def decay_mask(params):
    """Weight decay on matrices (kernels, embeddings), not on biases or norm scales (a
    scanned decoder's stacked leaves have one more axis, the layer's)."""
    def matrix(path, x):
        return x.ndim - layer_axes(path_str(path)) >= 2

    return jax.tree_util.tree_map_with_path(matrix, params)


def make_optimizer(stage: Stage, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with warmup + cosine. Applied to the trainable subtree
    only (see `split`); gradient accumulation happens inside the train step."""
    parts = []
    if stage.clip_norm:
        parts.append(optax.clip_by_global_norm(stage.clip_norm))
    parts.append(optax.adamw(schedule(stage, total_steps), b1=stage.b1, b2=stage.b2, eps=stage.eps,
                             weight_decay=stage.weight_decay, mask=decay_mask))
    return optax.chain(*parts)

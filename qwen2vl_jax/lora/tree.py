"""Adapters as parameter leaves: targets, fresh adapters, attaching, detaching and merging.

An adapter here is a flat dict {'model/layers_0/self_attn/q_proj/lora_a': ..., ...} over HF
paths (one `model/layers_{i}` per layer; `params.stack_layers` stacks the leaves with the
rest). Training and loading both go through `attach`, so a model holds its adapters the same
way whoever made them.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax.numpy as jnp
import numpy as np

from qwen2vl_jax.errors import InputError, listing
from qwen2vl_jax.hf_mapping import TABLE
from qwen2vl_jax.lora.layer import A, B, DROPOUT, LEAVES, SCALE
from qwen2vl_jax.params import flatten, unflatten

# The decoder's attention and MLP projections: what most LoRA recipes adapt.
DEFAULT_TARGETS = r"^model/layers_\d+/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel$"
# The stage pattern that trains the adapters and nothing else (stages.Stage.train).
TRAINABLE = rf"/({A}|{B})$"
# Weights an adapter may sit on: the torch Linear layers (a kernel [in, out]).
_LINEAR = [re.compile("^" + re.escape(jx).replace(re.escape("{i}"), r"\d+") + "$")
           for _, jx, transform in TABLE if transform == "linear"]


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """How to adapt a model: rank r, alpha (the term is scaled by alpha / r; None: 2 r), dropout
    on the adapter's input while training, and the regex (re.search) over kernel paths that
    picks the adapted linear layers."""

    rank: int
    alpha: float | None = None
    dropout: float = 0.0
    targets: str = DEFAULT_TARGETS

    @property
    def lora_alpha(self) -> float:
        return float(2 * self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank

    def check(self) -> None:
        """Every field, as the flags that set them (one InputError line)."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise InputError(f"--lora-rank must be at least 1, got {self.rank}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise InputError(f"--lora-alpha must be positive, got {self.alpha:g}")
        if not (math.isfinite(self.dropout) and 0 <= self.dropout < 1):
            raise InputError(f"--lora-dropout must be in [0, 1), got {self.dropout:g}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise InputError(f"--lora-targets {self.targets!r} is not a valid regex ({e})") from None


def is_linear(path: str) -> bool:
    """Whether `path` is the kernel of a linear layer (HF paths), which an adapter may sit on."""
    return any(p.match(path) for p in _LINEAR)


def target_kernels(float_shapes: dict, pattern: str) -> list[str]:
    """The kernel paths of the float tree (HF paths, e.g. `init_shapes(config)`) that `pattern`
    picks among the linear layers; an InputError naming some candidates when it picks none."""
    flat = flatten(float_shapes)
    linear = [p for p in flat if is_linear(p)]
    picked = [p for p in linear if re.search(pattern, p)]
    if not picked:
        raise InputError(f"--lora-targets {pattern!r} matches no linear layer; their paths look like "
                         f"{listing(sorted(linear), 3)}")
    return picked


def init_adapter(float_shapes: dict, spec: LoraSpec, seed: int = 0) -> dict:
    """A fresh adapter on the layers `spec.targets` picks, as PEFT initialises one: A uniform in
    +-1/sqrt(in) (torch's kaiming_uniform with a = sqrt(5)), B zero, so the adapted model starts
    as the base. float32 numpy leaves; lora_dropout leaves only when spec.dropout > 0."""
    spec.check()
    flat = flatten(float_shapes)
    rng = np.random.default_rng(seed)
    out = {}
    for path in target_kernels(float_shapes, spec.targets):
        head = path.rpartition("/")[0]
        n_in, n_out = flat[path].shape
        bound = 1.0 / math.sqrt(n_in)
        out[f"{head}/{A}"] = rng.uniform(-bound, bound, (n_in, spec.rank)).astype(np.float32)
        out[f"{head}/{B}"] = np.zeros((spec.rank, n_out), np.float32)
        out[f"{head}/{SCALE}"] = np.float32(spec.scale)
        if spec.dropout > 0:
            out[f"{head}/{DROPOUT}"] = np.float32(spec.dropout)
    return out


def heads(adapter: dict) -> list[str]:
    """The module paths an adapter sits on."""
    return sorted({p.rpartition("/")[0] for p in flatten(adapter) if p.endswith("/" + A)})


def attach(params: dict, adapter: dict) -> dict:
    """The params with the adapter's leaves beside each adapted module's weight (HF paths);
    a module the params lack, or one that already holds an adapter, is an InputError."""
    flat = flatten(params)
    modules = {p.rpartition("/")[0] for p in flat}
    adapter = flatten(adapter)
    lacking = sorted(h for h in heads(adapter) if h not in modules)
    if lacking:
        raise InputError(f"the adapter sits on {len(lacking)} module(s) the model lacks: {listing(lacking)}")
    taken = sorted(p for p in adapter if p in flat)
    if taken:
        raise InputError(f"the model already holds adapter leaves: {listing(taken)}")
    return unflatten({**flat, **adapter})


def detach(params: dict) -> tuple[dict, dict]:
    """-> (the base params, the flat adapter) of params holding one (stacked or not)."""
    base, adapter = {}, {}
    for path, leaf in flatten(params).items():
        (adapter if path.rpartition("/")[2] in LEAVES else base)[path] = leaf
    return unflatten(base), adapter


def merge(params: dict, adapter: dict) -> dict:
    """The params with each adapted kernel replaced by W + scale * A @ B (computed in float32,
    rounded once to the kernel's dtype); numpy stays numpy, jax arrays stay jax. A packed
    (quantized) weight cannot take the sum: an InputError naming them."""
    flat = flatten(params)
    adapter = flatten(adapter)
    packed = sorted(h for h in heads(adapter) if f"{h}/qweight" in flat)
    if packed:
        raise InputError(f"cannot merge an adapter into packed (quantized) weights ({listing(packed)}): "
                         "load it unmerged, or merge into the float model")
    missing = sorted(h for h in heads(adapter) if f"{h}/kernel" not in flat)
    if missing:
        raise InputError(f"the adapter sits on {len(missing)} module(s) the model lacks: {listing(missing)}")
    for head in heads(adapter):
        flat[f"{head}/kernel"] = merged_kernel(flat[f"{head}/kernel"], *(adapter[f"{head}/{k}"] for k in (A, B, SCALE)))
    return unflatten(flat)



def merged_kernel(w, a, b, scale, dtype=None):
    """W [I, O] + scale * A [I, r] @ B [r, O], summed in float32 and rounded once to `dtype`
    (default: W's); numpy in, numpy out (jax in, jax out)."""
    dtype = w.dtype if dtype is None else dtype
    if isinstance(w, np.ndarray):
        delta = (np.asarray(a, np.float32) @ np.asarray(b, np.float32)) * np.float32(scale)
        return (w.astype(np.float32) + delta).astype(dtype)
    delta = (jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32)) * jnp.float32(scale)
    return (w.astype(jnp.float32) + delta).astype(dtype)

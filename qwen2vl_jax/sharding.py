"""One sharding vocabulary for the whole model.

Modules name the axes of their activations with logical names (`shard(x, "batch", "seq",
"embed")`); a rules table maps logical names to mesh axes. Without an active mesh every call
here is a no-op, so the same code runs unsharded on one device.

Parameters get their logical axes from one regex table on their paths (`PARAM_AXES`), so
placing a checkpoint on a mesh is `place_params(params, mesh)`. A mesh axis that does not divide
a dimension is dropped for that array (it stays replicated there), except tensor parallelism
over attention heads and MLP width, which `check_divisible` refuses up front with one line.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qwen2vl_jax.errors import InputError, listing
from qwen2vl_jax.params import flatten, layer_axes, layer_path, path_str
from qwen2vl_jax.quant.format import float_leaf

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis (or axes, or None for replicated)."""

    batch: str | tuple[str, ...] | None = ("data", "fsdp")
    seq: str | tuple[str, ...] | None = None
    embed: str | tuple[str, ...] | None = None
    heads: str | tuple[str, ...] | None = "tensor"
    kv_heads: str | tuple[str, ...] | None = "tensor"
    head_dim: str | tuple[str, ...] | None = None
    mlp: str | tuple[str, ...] | None = "tensor"
    vocab: str | tuple[str, ...] | None = "tensor"
    patches: str | tuple[str, ...] | None = None
    # The training loss's vocabulary: its logits, and the output head while it makes them, are
    # split over every axis (`head_by_vocab`), so no chip ever holds the whole head.
    loss_vocab: str | tuple[str, ...] | None = ("data", "fsdp", "tensor")
    # FSDP training (the trainer sets it): a packed weight split over fsdp is gathered as stored
    # and dequantized whole on each chip (`gathered_packed`), not dequantized per shard and
    # gathered as floats (2 to 8 times the bytes: bf16 against int8 or int4).
    gather_packed: bool = False
    # Parameters: the "model" dimension of weights is split over fsdp.
    param_embed: str | tuple[str, ...] | None = "fsdp"

    def spec(self, *names: str | None) -> P:
        return P(*(None if n is None else getattr(self, n) for n in names))

    def spec_for(self, shape: tuple[int, ...], names: tuple[str | None, ...], mesh: Mesh) -> P:
        """Like `spec`, but a mesh axis that does not divide its dimension is dropped (and so
        is one already used by an earlier dimension): batch 1 on data=8 stays replicated."""
        out, used = [], set()
        for dim, name in zip(shape, names):
            axes = None if name is None else getattr(self, name)
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            kept = []
            for a in axes:
                size = mesh.shape[a]
                if a in used or size == 1:
                    continue
                if dim % (math.prod(mesh.shape[k] for k in kept) * size) == 0:
                    kept.append(a)
            used.update(kept)
            out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
        return P(*out)


_ACTIVE: contextvars.ContextVar[tuple[Mesh, ShardingRules] | None] = contextvars.ContextVar(
    "qwen2vl_mesh", default=None
)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: ShardingRules | None = None):
    """Makes `shard()` constrain activations to `mesh` inside the block (at trace time)."""
    token = _ACTIVE.set(None if mesh is None else (mesh, rules or ShardingRules()))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> tuple[Mesh, ShardingRules] | None:
    return _ACTIVE.get()


def shard(x: jax.Array, *names: str | None) -> jax.Array:
    """Constrains `x` to the logical axes `names`; does nothing without an active mesh."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, rules.spec_for(x.shape, names, mesh)))


def named_sharding(mesh: Mesh, rules: ShardingRules, shape: tuple[int, ...], *names: str | None) -> NamedSharding:
    """The NamedSharding for an array of `shape` with logical axes `names` (padded with None)."""
    names = tuple(names) + (None,) * (len(shape) - len(names))
    return NamedSharding(mesh, rules.spec_for(tuple(shape), names, mesh))


# ---------------------------------------------------------------- parameters
# Param path (HF-mirroring, '/'-joined) -> logical axes, first match wins. Dense kernels are
# [in, out]. Tensor parallelism splits the decoder's heads and MLP width and the vision MLP;
# the vision tower's fused qkv stays whole on the tensor axis (its output interleaves q, k and
# v, so a split would not follow heads) and is split over fsdp like every weight's model dim.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"model/embed_tokens/embedding$", ("vocab", "param_embed")),
    (r"lm_head/kernel$", ("param_embed", "vocab")),
    (r"self_attn/q_proj/kernel$", ("param_embed", "heads")),
    (r"self_attn/q_proj/bias$", ("heads",)),
    (r"self_attn/[kv]_proj/kernel$", ("param_embed", "kv_heads")),
    (r"self_attn/[kv]_proj/bias$", ("kv_heads",)),
    (r"self_attn/o_proj/kernel$", ("heads", "param_embed")),
    (r"mlp/(gate|up)_proj/kernel$", ("param_embed", "mlp")),
    (r"mlp/down_proj/kernel$", ("mlp", "param_embed")),
    # params.fuse_projections' concatenated outputs ([q|k|v], [gate|up]): split over fsdp only
    # (a tensor split would not follow heads or halves; Qwen2VL refuses fusing on a tensor axis).
    (r"(self_attn/qkv_proj|mlp/gate_up_proj)/kernel$", ("param_embed", None)),
    (r"visual/patch_embed/proj/kernel$", (None, "param_embed")),
    (r"attn/qkv/kernel$", ("param_embed", None)),
    (r"attn/proj/kernel$", (None, "param_embed")),
    (r"(mlp/fc1|merger/mlp_0)/kernel$", ("param_embed", "mlp")),
    (r"(mlp/fc1|merger/mlp_0)/bias$", ("mlp",)),
    (r"(mlp/fc2|merger/mlp_2)/kernel$", ("mlp", "param_embed")),
    # LoRA adapters (lora/): a [in, r] and b [r, out] split over fsdp by their long side, like
    # the model dimension of a weight (replicated, 72B's rank-16 adapters and their AdamW state
    # would take 2.3 GiB on every chip); the rank and the scalars stay whole.
    (r"/lora_a$", ("param_embed", None)),
    (r"/lora_b$", (None, "param_embed")),
    (r"/lora_(scale|dropout)$", (None,)),
    (r"(scale|bias)$", (None,)),  # norms and the remaining biases: small, replicated
    (r"/perm$", (None,)),  # a quantized layer's input permutation (quant/format.py)
)
_PARAM_RULES = [(re.compile(pattern), axes) for pattern, axes in PARAM_AXES]


def param_logical_axes(params) -> Any:
    """A tree like `params` whose leaves are tuples of logical axis names (one per dim).

    Every parameter must match a row of PARAM_AXES; the unmatched ones are listed together."""
    missing = []

    def axes_of(path, leaf):
        name = float_leaf(path_str(path))  # packed quantized leaves carry their float weight's axes
        # A scanned decoder's stacked layers (params.stack_layers): layer 0's rule, after a
        # replicated layer axis.
        lead = (None,) * layer_axes(name)
        axes = _axes_for(layer_path(name), len(leaf.shape) - len(lead), missing)
        return lead + axes

    out = jax.tree_util.tree_map_with_path(axes_of, params)
    if missing:
        raise ValueError(f"no sharding rule for {len(missing)} parameter(s): " + listing(missing))
    return out


def _axes_for(name: str, rank: int, missing: list) -> tuple[str | None, ...]:
    """The logical axes of one (unstacked) parameter of `rank` dims at HF-style path `name`;
    an unmatched path (or a rank its rule does not fit) is appended to `missing`."""
    for pattern, axes in _PARAM_RULES:
        if pattern.search(name):
            if len(axes) != rank and axes != (None,):
                missing.append(f"{name} (rank {rank} vs {axes})")
            return axes + (None,) * (rank - len(axes))
    missing.append(name)
    return (None,) * rank


def param_shardings(params, mesh: Mesh, rules: ShardingRules | None = None) -> Any:
    """NamedSharding for every parameter (works on arrays or ShapeDtypeStructs)."""
    rules = rules or ShardingRules()
    axes = param_logical_axes(params)
    return jax.tree_util.tree_map(
        lambda leaf, names: named_sharding(mesh, rules, leaf.shape, *names), params, axes,
        is_leaf=lambda x: hasattr(x, "shape"),
    )


def gathered_packed(leaves: dict, module_path: str) -> dict:
    """A packed layer's leaves (qweight, scales, zeros, perm), inside a traced step, constrained
    whole along the model dimension (the fsdp split undone, any tensor split kept) when the
    active rules ask for it (`gather_packed`); else, or without a mesh, as they are.
    module_path: the layer's module path (model/layers/mlp/up_proj; scanned or not), whose
    kernel's rule gives the axes. The dequantized float weight then exists only whole, inside
    the layer's product, and what crosses chips is the stored integers."""
    active = _ACTIVE.get()
    if active is None or not active[1].gather_packed:
        return leaves
    mesh, rules = active
    whole = dataclasses.replace(rules, param_embed=None)
    name = layer_path(f"{module_path}/kernel")
    out = {}
    for key, leaf in jax.lax.optimization_barrier(leaves).items():
        names = _axes_for(name, leaf.ndim, []) if key != "perm" else (None,)
        if "vocab" in names:  # the output head: laid out by `head_by_vocab` for the loss
            out[key] = leaf
            continue
        out[key] = jax.lax.with_sharding_constraint(leaf, NamedSharding(mesh, whole.spec_for(leaf.shape, names, mesh)))
    return out


def head_by_vocab(params) -> Any:
    """`params` with the output head's vocabulary-wide leaves (lm_head's kernel, or the tied
    embedding table; float or packed) constrained to the `loss_vocab` split and whole along the
    model dimension; every other leaf as it is. A no-op without an active mesh.

    This is the training loss's layout (vocabulary-parallel logits): each chip makes the logits
    of its slice of the vocabulary for a whole chunk of tokens from its own slice of the head.
    Under FSDP the head is otherwise gathered whole for every chunk, as the float weight a
    packed head dequantizes to (72B: 152064 x 8192, 4.6 GiB in float32) rather than as stored."""
    active = _ACTIVE.get()
    if active is None:
        return params
    mesh, rules = active
    loss_rules = dataclasses.replace(rules, param_embed=None, vocab=rules.loss_vocab)

    def one(leaf, names):
        if "vocab" not in names:
            return leaf
        spec = loss_rules.spec_for(leaf.shape, names, mesh)
        return jax.lax.with_sharding_constraint(leaf, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map(one, params, param_logical_axes(params), is_leaf=lambda x: hasattr(x, "shape"))


def check_groups(params, shardings) -> None:
    """Refuses (InputError, one line) a layout that splits a packed weight's input rows across
    a group: each shard's rows must hold whole groups. shardings: NamedShardings like `params`
    (`param_shardings`); None (no mesh) passes."""
    if shardings is None:
        return
    flat, layout = flatten(params), flatten(shardings)
    bad = []
    for path, scales in flat.items():
        head, _, leaf = path.rpartition("/")
        dim = layer_axes(path)  # a scanned decoder's layer axis comes first
        if leaf != "scales" or head.endswith("embed_tokens") or scales.shape[dim] == 1:
            continue
        sharding = layout[f"{head}/qweight"]
        split = sharding.spec[dim] if len(sharding.spec) > dim else None
        split = (split,) if isinstance(split, str) else tuple(split or ())
        ways = math.prod(sharding.mesh.shape[a] for a in split)
        if ways > 1 and scales.shape[dim] % ways:
            bad.append(f"{head} ({scales.shape[dim]} groups over {'*'.join(split)}={ways})")
    if bad:
        raise InputError(f"the mesh would cut the quantization groups of {len(bad)} weight(s): {listing(bad)}; "
                         "choose a mesh whose split of their input rows divides the group count")


def place_params(params, mesh: Mesh | None, rules: ShardingRules | None = None, shardings=None) -> Any:
    """Puts every parameter on `mesh` by the rules (a no-op without a mesh); `shardings`: the
    layout when the caller has computed it already (`param_shardings` of these params)."""
    if mesh is None:
        return params
    if shardings is None:
        shardings = param_shardings(params, mesh, rules)
    return jax.tree_util.tree_map(lambda x, s: to_global(x, s), params, shardings)


def to_global(x, sharding: NamedSharding) -> jax.Array:
    """A host array (the same on every process) -> a global array with `sharding`; works on
    multi-host meshes, where a plain device_put of numpy cannot address remote devices."""
    if isinstance(x, jax.Array) and x.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array):
        return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


# ---------------------------------------------------------------- the mesh
def parse_mesh(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """'data=2,fsdp=1,tensor=4' -> {'data': 2, 'fsdp': 1, 'tensor': 4}; axes left out are
    absent (make_mesh fills them). Raises InputError naming the bad part."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, value = part.partition("=")
            if not sep:
                raise InputError(f"--mesh part {part!r} is not axis=size (e.g. data=2,fsdp=1,tensor=4)")
            items.append((name.strip(), value.strip()))
    out: dict[str, int] = {}
    for name, value in items:
        if name not in MESH_AXES:
            raise InputError(f"unknown mesh axis {name!r}; the axes are {', '.join(MESH_AXES)}")
        if name in out:
            raise InputError(f"mesh axis {name!r} given twice")
        try:
            size = int(value)
        except (TypeError, ValueError):
            raise InputError(f"mesh axis {name}={value!r} is not a whole number") from None
        if size < 1:
            raise InputError(f"mesh axis {name}={size} must be at least 1")
        out[name] = size
    return out


def make_mesh(spec: str | Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all of them).

    Axes not given are 1, except `data`, which takes the devices the others leave over. The
    product must equal the device count; anything else is an InputError."""
    sizes = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    rest = sizes.get("fsdp", 1) * sizes.get("tensor", 1)
    if "data" not in sizes:
        if n % rest:
            raise InputError(f"mesh fsdp*tensor = {rest} does not divide the {n} available devices")
        sizes["data"] = n // rest
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    if math.prod(shape) != n:
        desc = ",".join(f"{a}={s}" for a, s in zip(MESH_AXES, shape))
        raise InputError(f"mesh {desc} needs {math.prod(shape)} devices but {n} are available")
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # unusual topologies: plain order
        grid = np.array(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def check_divisible(config, mesh: Mesh | None) -> None:
    """Refuses (InputError, one line) a tensor axis that does not divide the heads or widths."""
    if mesh is None:
        return
    t = mesh.shape["tensor"]
    if t == 1:
        return
    text, vision = config.text, config.vision
    dims = {
        "attention heads": text.num_attention_heads,
        "key/value heads": text.num_key_value_heads,
        "MLP width": text.intermediate_size,
        "vision MLP width": vision.mlp_dim,
        "merger width": vision.embed_dim * vision.merge_unit,
    }
    bad = [f"{n} {name}" for name, n in dims.items() if n % t]
    if bad:
        raise InputError(f"mesh tensor={t} does not divide the model's " + ", ".join(bad)
                         + "; choose a tensor size that divides them all")


"""Parameter trees as data: '/'-joined paths that mirror the HF names, and counting.

A parameter tree is a plain nested dict ({visual: {blocks_0: {attn: {qkv: {kernel: ...}}}}});
`flatten` and `unflatten` turn it into {'visual/blocks_0/attn/qkv/kernel': leaf} and back,
which is the form conversion tables, freezing regexes and checkpoint checks work on.
`stack_layers` and `unstack_layers` move between those HF paths and a scanned decoder's
stacked layers.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import numpy as np

from qwen2vl_jax.errors import InputError


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a/b/c': leaf} (anything with .items() and no .shape is a node)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict) or (hasattr(value, "items") and not hasattr(value, "shape")):
            out.update(flatten(dict(value), path))
        else:
            out[path] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    """{'a/b/c': leaf} -> nested dict."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


def path_str(path) -> str:
    """A jax.tree_util key path -> 'a/b/c'."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def count_params(tree) -> int:
    """The number of values in a tree of arrays or ShapeDtypeStructs."""
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def param_bytes(tree) -> int:
    """Bytes the leaves of a tree of arrays or ShapeDtypeStructs take (logical sizes; `device_bytes`
    gives each device's share of placed arrays)."""
    return int(sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(tree)))


def device_bytes(tree) -> dict:
    """{device: bytes of the array data it holds} for a tree of placed jax arrays."""
    out: dict = {}
    for x in jax.tree_util.tree_leaves(tree):
        for shard in getattr(x, "addressable_shards", ()):
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


# ---------------------------------------------------------------- stacked decoder layers
# A scanned decoder (`TextModel(scan_layers=True)`) keeps its layers as one tree with a leading
# layer axis under `model/layers/...`; everywhere else (conversion, export, checkpoints, the
# sharding and freezing regexes) the paths are HF's, one `model/layers_{i}/...` per layer.
_LAYER = re.compile(r"^model/layers_(\d+)/(.+)$")
STACKED_PREFIX = "model/layers/"


def is_stacked(tree) -> bool:
    """Whether a parameter tree holds its decoder layers stacked (`stack_layers`)."""
    model = tree.get("model", {}) if hasattr(tree, "get") else {}
    return "layers" in model


def _stack(leaves: list):
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype)
    if any(isinstance(x, jax.Array) for x in leaves):
        return jax.numpy.stack(leaves)
    return np.stack([np.asarray(x) for x in leaves])


def stack_layers(tree: dict) -> dict:
    """model/layers_{i}/X (i = 0..n-1) -> model/layers/X with a leading axis of n (arrays,
    numpy or ShapeDtypeStructs; a tree already stacked is returned as it is). Every layer must
    hold the same leaves (a scan runs one layer's program n times): else one InputError line
    naming the layer and a leaf it lacks or has extra."""
    if is_stacked(tree):
        return tree
    flat = flatten(tree)
    layers: dict[int, dict[str, Any]] = {}
    out = {}
    for path, leaf in flat.items():
        m = _LAYER.match(path)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = leaf
        else:
            out[path] = leaf
    if not layers:
        return tree
    n = len(layers)
    if sorted(layers) != list(range(n)):
        raise InputError(f"decoder layers {sorted(layers)} are not numbered 0..{n - 1}, so they cannot be scanned")
    names = sorted(layers[0])
    for i, layer in layers.items():
        if sorted(layer) != names:
            odd = sorted(set(names) ^ set(layer))
            raise InputError(f"decoder layer {i} does not hold the parameters layer 0 holds ({', '.join(odd[:3])}), "
                             "so the layers cannot be scanned; load without scan_layers / --scan-layers")
    for name in names:
        out[STACKED_PREFIX + name] = _stack([layers[i][name] for i in range(n)])
    return unflatten(out)


def unstack_layers(tree: dict) -> dict:
    """Inverse of `stack_layers`: model/layers/X [n, ...] -> model/layers_{i}/X (a tree not
    stacked is returned as it is)."""
    if not is_stacked(tree):
        return tree
    out = {}
    for path, leaf in flatten(tree).items():
        if not path.startswith(STACKED_PREFIX):
            out[path] = leaf
            continue
        name = path[len(STACKED_PREFIX):]
        for i in range(leaf.shape[0]):
            out[f"model/layers_{i}/{name}"] = (jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
                                               if isinstance(leaf, jax.ShapeDtypeStruct) else leaf[i])
    return unflatten(out)


def layer_axes(path: str) -> int:
    """The leading axes a leaf at `path` has before its HF shape: 1 (the layer axis) under a
    scanned decoder's stacked layers, else 0."""
    return int(path.startswith(STACKED_PREFIX))


def layer_path(path: str, i: int = 0) -> str:
    """A stacked path model/layers/X -> model/layers_{i}/X (others unchanged): what the
    HF-path regexes (sharding rules, training stages) are matched against."""
    return f"model/layers_{i}/{path[len(STACKED_PREFIX):]}" if path.startswith(STACKED_PREFIX) else path


# ---------------------------------------------------------------- fused projections
# A decoder layer's q, k and v projections read the same input, as do the MLP's gate and up:
# `fuse_projections` concatenates each set's outputs into one weight at load time, so a decode
# step runs one matmul for each set (the modules use the fused weight when the params hold it).
FUSED = {"self_attn/qkv_proj": ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"),
         "mlp/gate_up_proj": ("mlp/gate_proj", "mlp/up_proj")}


def _concat_outputs(parts: list):
    first = parts[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((*first.shape[:-1], sum(p.shape[-1] for p in parts)), first.dtype)
    if any(isinstance(x, jax.Array) for x in parts):
        return jax.numpy.concatenate(parts, axis=-1)
    return np.concatenate([np.asarray(x) for x in parts], axis=-1)


def fuse_projections(tree: dict) -> dict:
    """model/layers_{i}/self_attn/{q,k,v}_proj/X -> .../self_attn/qkv_proj/X and mlp/{gate,up}_proj/X
    -> mlp/gate_up_proj/X, each leaf concatenated along its last (output) axis: float kernels
    and biases, and packed quantized ones (quant/format.py: qweight, scales and zeros all end with the
    output axis). A set whose members hold different leaves, are packed differently, or read
    their inputs in different orders (act-order `perm`s) cannot share one matmul: one
    InputError line. Takes HF paths (fuse before `stack_layers`); a fused tree comes back as it is."""
    if is_stacked(tree):
        raise InputError("fuse the projections before stacking the decoder's layers")
    flat = flatten(tree)
    layers = sorted({m.group(1) for m in map(_LAYER.match, flat) if m}, key=int)
    for i in layers:
        for fused, members in FUSED.items():
            where = f"model/layers_{i}/{fused}"
            prefixes = [f"model/layers_{i}/{member}/" for member in members]
            leaves = [sorted(p[len(pre):] for p in flat if p.startswith(pre)) for pre in prefixes]
            if not any(leaves):
                continue
            if any(x != leaves[0] for x in leaves[1:]):
                raise InputError(f"{where}: {', '.join(members)} do not hold the same leaves, so they cannot be fused")
            if "qweight" in leaves[0] and any(np.ndim(flat[pre + "qweight"]) != 2 for pre in prefixes):
                raise InputError(f"{where}: the packed weights are in the CPU layout (quant.cpu.cpu_layout), whose last "
                                 "axis is not the outputs; fuse the stored form (as loaded, or quantize_params' output)")
            for leaf in leaves[0]:
                parts = [flat.pop(pre + leaf) for pre in prefixes]
                if leaf == "perm":
                    if any(not np.array_equal(np.asarray(parts[0]), np.asarray(x)) for x in parts[1:]):
                        raise InputError(f"{where}: {', '.join(members)} read their inputs in different orders "
                                         "(act-order), so they cannot share one matmul; load without fusing")
                    flat[f"{where}/perm"] = parts[0]
                    continue
                if len({(tuple(x.shape[:-1]), np.dtype(x.dtype)) for x in parts}) != 1:
                    raise InputError(f"{where}/{leaf}: {', '.join(members)} are packed differently "
                                     f"({', '.join(str(tuple(x.shape)) for x in parts)}), so they cannot be fused")
                flat[f"{where}/{leaf}"] = _concat_outputs(parts)
    return unflatten(flat)

"""Parameter trees as data: '/'-joined paths that mirror the HF names, and counting.

A parameter tree is a plain nested dict ({visual: {blocks_0: {attn: {qkv: {kernel: ...}}}}});
`flatten` and `unflatten` turn it into {'visual/blocks_0/attn/qkv/kernel': leaf} and back,
which is the form conversion tables, freezing regexes and checkpoint checks work on.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


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
    """Bytes the leaves of a tree of arrays or ShapeDtypeStructs take."""
    return int(sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(tree)))

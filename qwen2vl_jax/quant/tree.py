"""Whole parameter trees under a quantization scheme: the packed tree of a float one
(`quantize_params`, host numpy) and its shapes without computing it (`abstract`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax.params import flatten, unflatten
from qwen2vl_jax.quant.format import Scheme, kind_of
from qwen2vl_jax.quant.quantize import group_for, quantize_leaf


def abstract(shapes: dict, scheme: Scheme) -> dict:
    """A tree of float ShapeDtypeStructs (e.g. `init_shapes`) -> the packed tree's, without
    computing anything: what `quantize_params` would give (scales float32)."""
    out = {}
    for path, leaf in flatten(shapes).items():
        kind, head = kind_of(path, scheme), path.rpartition("/")[0]
        sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))  # noqa: E731
        if kind is None:
            out[path] = leaf
        elif kind == "embedding":
            v, d = leaf.shape
            out.update({f"{head}/qweight": sds((v, d), jnp.int8), f"{head}/scales": sds((v, 1), jnp.float32)})
        elif kind == "int8":
            i, o = leaf.shape
            out.update({f"{head}/qweight": sds((i, o), jnp.int8), f"{head}/scales": sds((1, o), jnp.float32)})
        else:
            i, o = leaf.shape
            groups = i // group_for(i, scheme.group_size)
            out.update({f"{head}/qweight": sds((i // 2, o), jnp.uint8), f"{head}/scales": sds((groups, o), jnp.float32),
                        f"{head}/zeros": sds((groups, o), jnp.uint8)})
    return unflatten(out)


def quantize_params(params: dict, scheme: Scheme) -> dict:
    """A float param tree -> the same tree with the scheme's weights packed (host numpy)."""
    out = {}
    for path, leaf in flatten(params).items():
        packed = quantize_leaf(path, np.asarray(leaf), scheme)
        if packed is None:
            out[path] = leaf
        else:
            head = path.rpartition("/")[0]
            out.update({f"{head}/{k}": v for k, v in packed.items()})
    return unflatten(out)

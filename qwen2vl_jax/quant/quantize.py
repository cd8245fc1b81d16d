"""Quantizing float weights offline (numpy only): what `qwen2vl-convert --quantize` runs on
each array, into the packed form of `format`."""

from __future__ import annotations

import math

import numpy as np

from qwen2vl_jax.errors import InputError
from qwen2vl_jax.quant.format import DEFAULT_GROUP, Scheme, kind_of, pack_int4

MIN_GROUPS = 4  # a dim too small for 4 groups of group_size (a tiny model's) gets 4 smaller ones
CLIP = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # range shrink factors int4 tries per group (least error wins)


def quantize_int8(w: np.ndarray, scale_dtype=np.float32) -> dict:
    """W [I, O] -> int8 per output channel, symmetric: scales [1, O] = max|W[:, c]| / 127."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=0, keepdims=True)
    scales = np.where(amax > 0, amax / 127.0, 1.0).astype(scale_dtype)
    q = np.clip(np.rint(w / scales.astype(np.float32)), -127, 127).astype(np.int8)
    return {"qweight": q, "scales": scales}


def group_for(in_features: int, group_size: int) -> int:
    """The group actually used for `in_features` rows: `group_size`, or smaller for a small
    dim (at least MIN_GROUPS groups: 128 rows of a tiny model get groups of 32), always a
    divisor of `in_features`."""
    if group_size == -1:
        return in_features
    return math.gcd(in_features, min(group_size, max(in_features // MIN_GROUPS, 1)))


def quantize_int4(w: np.ndarray, group_size: int = DEFAULT_GROUP, scale_dtype=np.float32) -> dict:
    """W [I, O] -> 4 bit with a scale and zero point per group of rows and output column:
    asymmetric, the 16 levels spanning each group's range shrunk by the factor of CLIP that
    gives the least squared error (a clipped outlier costs less than coarse steps for all)."""
    w = np.asarray(w, np.float32)
    in_f, out_f = w.shape
    if in_f % 2:
        raise InputError(f"int4 needs an even number of input features (a weight has {in_f})")
    g = group_for(in_f, group_size)
    rows = w.reshape(in_f // g, g, out_f)
    lo = np.minimum(rows.min(axis=1), 0.0)  # [G, O]; 0 stays representable
    hi = np.maximum(rows.max(axis=1), 0.0)
    best = None
    for shrink in CLIP:
        scales = np.where(hi > lo, (hi - lo) * shrink / 15.0, 1.0).astype(scale_dtype)
        s = scales.astype(np.float32)
        zeros = np.clip(np.rint(-lo * shrink / s), 0, 15).astype(np.uint8)
        z = zeros.astype(np.float32)[:, None]
        q = np.clip(np.rint(rows / s[:, None]) + z, 0, 15)
        err = (((q - z) * s[:, None] - rows) ** 2).sum(axis=1)  # [G, O]
        if best is None:
            best = [err, scales, zeros, q.astype(np.uint8)]
            continue
        better = err < best[0]
        best[0] = np.where(better, err, best[0])
        best[1] = np.where(better, scales, best[1])
        best[2] = np.where(better, zeros, best[2])
        best[3] = np.where(better[:, None], q.astype(np.uint8), best[3])
    _, scales, zeros, q = best
    return {"qweight": pack_int4(q.reshape(in_f, out_f)), "scales": scales, "zeros": zeros}


def quantize_embedding(table: np.ndarray, scale_dtype=np.float32) -> dict:
    """E [V, D] -> int8 qweight [V, D] with a scale per row, scales [V, 1]."""
    packed = quantize_int8(np.asarray(table, np.float32).T, scale_dtype)
    return {"qweight": np.ascontiguousarray(packed["qweight"].T), "scales": packed["scales"].T.copy()}


def quantize_leaf(path: str, w: np.ndarray, scheme: Scheme) -> dict | None:
    """The packed leaves for the float parameter at `path` under `scheme`, or None when the
    scheme leaves it float."""
    kind = kind_of(path, scheme)
    if kind == "embedding":
        return quantize_embedding(w)
    if kind == "int8":
        return quantize_int8(w)
    if kind == "int4":
        return quantize_int4(w, scheme.group_size)
    return None

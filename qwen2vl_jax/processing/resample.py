"""Frame resizing that reproduces torchvision's antialiased bicubic bit for bit, in numpy.

Two kernels, because the two official steps use two:
- `resize_frames`: torchvision v2's uint8 kernel (HF's Qwen2VLVideoProcessor), integer taps
  with torch's fixed-point rounding;
- `resize_frames_float`: `transforms.functional.resize(..., BICUBIC, antialias=True)` on uint8
  frames as qwen-vl-utils calls it, which runs torch's float32 kernel and rounds back; float32
  taps and fused multiply-adds in torch's order.
Both split the work over frames or rows with `parallel_map`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .image import parallel_map


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic with a = -0.5 (PIL's and torch's antialiased bicubic), in torch's order
    of operations."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _aa_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """torch's uint8 antialiased bicubic taps for one axis: first source index [out], int32
    weights [out, K] (zero past each row's taps) and their fixed-point precision.

    Weights are computed in float64 and normalised per row, then rounded to int16 at the
    largest precision for which the biggest weight still fits (torch's
    _compute_index_ranges_int16_weights)."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    k = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C casts truncate
    xsize = np.clip(np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin, 0, k)
    taps = np.arange(k)
    w = _keys_cubic((taps[None, :] + xmin[:, None] - center[:, None] + 0.5) * invscale)
    w = np.where(taps[None, :] < xsize[:, None], w, 0.0)
    total = np.zeros(out_size)
    for j in range(k):  # left-to-right sum, as the C++ loop adds
        total = total + w[:, j]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    wt_max = float(w.max()) if w.size else 0.0
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    v = w * (1 << precision)
    wi = np.where(v < 0, np.trunc(v - 0.5), np.trunc(v + 0.5)).astype(np.int32)
    return xmin, wi, precision


def _resample_rows(x: np.ndarray, out_size: int, chunk: int) -> np.ndarray:
    """uint8 [R, S, C] resampled along S -> [R, out_size, C] with torch's integer arithmetic:
    sum of int16 taps * pixels + half, shifted down by the precision, clamped to 0..255.

    Rows are processed `chunk` at a time (the int32 accumulator stays in cache) on the
    shared thread pool; every tap is one contiguous gather + multiply-add."""
    r, size, c = x.shape
    xmin, w, precision = _aa_weights(size, out_size)
    taps = [j for j in range(w.shape[1]) if w[:, j].any()]
    index = [np.minimum(xmin + j, size - 1) for j in taps]  # past-the-end taps weigh 0
    weight = [w[:, j][:, None] for j in taps]  # int32 [out, 1]
    out = np.empty((r, out_size, c), dtype=np.uint8)
    half = np.int32(1 << (precision - 1))

    def work(rows: slice) -> None:
        xs = x[rows]
        acc = np.full((xs.shape[0], out_size, c), half, dtype=np.int32)
        tmp = np.empty_like(acc)
        for idx, wj in zip(index, weight):
            np.multiply(np.take(xs, idx, axis=1), wj, out=tmp)
            acc += tmp
        acc >>= precision
        np.clip(acc, 0, 255, out=acc)
        out[rows] = acc

    parallel_map(work, [slice(i, min(i + chunk, r)) for i in range(0, r, chunk)])
    return out


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [T, H, W, C] -> [T, height, width, C], bit-identical to torchvision's
    `resize(..., BICUBIC, antialias=True)` on a uint8 tensor (torch's CPU kernel: width
    pass first, uint8 in between)."""
    t, h, w, c = frames.shape
    x = np.ascontiguousarray(frames)
    if w != width:
        rows = max(1, (1 << 18) // (width * c))  # ~1 MB of int32 accumulator per task
        x = _resample_rows(x.reshape(t * h, w, c), width, rows).reshape(t, h, width, c)
    if h != height:
        x = _resample_rows(x.reshape(t, h, width * c), height, 1).reshape(t, height, width, c)
    return x


# ----------------------------------------------------------------------------- float resize
#
# qwen-vl-utils resizes with torchvision.transforms.functional.resize on a uint8 tensor, which
# casts to float32, runs torch's CPU `_upsample_bicubic2d_aa` (width pass, then height pass,
# float32 in between), clamps to 0..255, rounds half to even and casts back. Torch's kernel as
# compiled for x86 (the AVX2 / AVX512 builds, which every x86-64 CPU of the last decade runs)
# contracts multiply-adds into FMAs, so three things are reproduced here:
# - the weights: Keys' cubic (a = -0.5) evaluated in float32 with fused multiply-adds, its
#   argument from float32 centres and a float64 `+ 0.5`, normalised per output by a float32
#   sum (HelperInterpBase::_compute_indices_min_size_weights_aa for scalar_t = float);
# - the sum over an output's taps: first tap t0 * w0, then taps 1..4*floor((n-1)/4) as a
#   float32 product added in order (the compiler's vectorised products), the last
#   (n-1) mod 4 taps as FMAs (its scalar remainder loop);
# - FMAs as float64 multiply-add rounded to float32, with the rare float32 tie that double
#   rounding gets wrong settled by the exact error of the float64 sum.
# Measured against torch 2.14.1: bit-identical floats and uint8 on AVX512 and AVX2;
# ATEN_CPU_CAPABILITY=default (no FMA) differs by 1 level on ~2e-5 of values.

_F32, _F64 = np.float32, np.float64
_TIE_MASK = np.uint64((1 << 29) - 1)  # float64 mantissa bits below float32 precision
_TIE = np.uint64(1 << 28)  # ... exactly half a float32 ulp: s lies on a rounding midpoint


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fma(a, b, c) = round32(a * b + c) with one rounding. a: float32 or uint8, b:
    float64 holding float32 values, c: float32; the product is exact in float64."""
    s = np.multiply(a, b, dtype=_F64)
    np.add(s, c, out=s)
    r = s.astype(_F32)
    tie = (s.view(np.uint64) & _TIE_MASK) == _TIE
    if tie.any():  # s rounded onto a float32 midpoint: round to the side the exact sum lies on
        p = np.broadcast_to(a, s.shape)[tie].astype(_F64) * np.broadcast_to(b, s.shape)[tie]
        cc = np.broadcast_to(c, s.shape)[tie].astype(_F64)
        st = s[tie]
        bb = st - p
        err = (p - (st - bb)) + (cc - bb)  # st + err == p + cc exactly (TwoSum)
        rt = r[tie]
        above = rt.astype(_F64) > st
        other = np.where(above, np.nextafter(rt, _F32(-np.inf)), np.nextafter(rt, _F32(np.inf)))
        r[tie] = np.where((above & (err < 0)) | (~above & (err > 0)), other, rt)
    return r


def _keys_cubic_f32(x: np.ndarray) -> np.ndarray:
    """Keys' cubic (a = -0.5) in float32 as torch's x86 build evaluates it: every `u * x + w`
    contracted into an FMA."""
    a = _F32(-0.5)
    x = np.abs(x).astype(_F32)
    x64 = x.astype(_F64)

    def fma_x(u, w):  # fma(u, x, w)
        return _fma32(np.broadcast_to(np.asarray(u, _F32), x.shape), x64, np.broadcast_to(np.asarray(w, _F32), x.shape))

    near = fma_x(fma_x(a + 2, -(a + 3)) * x, 1)  # ((a + 2) x - (a + 3)) x x + 1
    far = fma_x(fma_x(fma_x(a, -(5 * a)), 8 * a), -(4 * a))  # ((a x - 5a) x + 8a) x - 4a
    return np.where(x < 1, near, np.where(x < 2, far, _F32(0))).astype(_F32)


@dataclass(frozen=True)
class _FloatTaps:
    """One axis of torch's float32 antialiased bicubic, tap-major: source indices [k, lanes]
    (clamped; taps past a lane's `size` are skipped), weights [k, lanes] in float32 and
    float64, tap count [lanes], and `split` [lanes]: taps 1..split are multiply-then-add, the
    rest FMAs. A lane is an output index, or (width pass) an output column x channel."""

    index: np.ndarray
    w32: np.ndarray
    w64: np.ndarray
    size: np.ndarray
    split: np.ndarray

    def lanes(self, sl: slice) -> "_FloatTaps":
        return _FloatTaps(self.index[:, sl], self.w32[:, sl], self.w64[:, sl], self.size[sl], self.split[sl])


@lru_cache(maxsize=64)
def _float_taps(in_size: int, out_size: int, channels: int = 1) -> _FloatTaps:
    """The taps of resizing `in_size` to `out_size`; with channels > 1, one lane per output
    index x channel over a flattened [in_size * channels] source (channel fastest)."""
    scale = _F32(in_size) / _F32(out_size)  # area_pixel_compute_scale<float>
    support = _F32(2.0 * _F64(scale)) if scale >= 1 else _F32(2.0)
    k = int(math.ceil(float(support))) * 2 + 1
    invscale = _F32(1.0 / _F64(scale)) if scale >= 1 else _F32(1.0)
    center = (_F64(scale) * (np.arange(out_size) + 0.5)).astype(_F32)
    xmin = np.maximum(((center - support).astype(_F64) + 0.5).astype(np.int64), 0)  # C casts truncate
    xmax = np.minimum(((center + support).astype(_F64) + 0.5).astype(np.int64), in_size)
    size = np.clip(xmax - xmin, 0, k)
    taps = np.arange(k)
    arg = (((taps[None] + xmin[:, None]).astype(_F32) - center[:, None]).astype(_F64) + 0.5) * _F64(invscale)
    w = np.where(taps[None] < size[:, None], _keys_cubic_f32(arg.astype(_F32)), _F32(0))
    total = np.zeros(out_size, _F32)
    for j in range(k):  # left-to-right float32 sum, as the C++ loop adds
        total = (total + w[:, j]).astype(_F32)
    w = np.where(total[:, None] != 0, (w / np.where(total == 0, _F32(1), total)[:, None]).astype(_F32), w)
    index = np.minimum(xmin[:, None] + taps[None], in_size - 1)
    split = ((size - 1) // 4) * 4
    if channels > 1:
        index = (index[:, None, :] * channels + np.arange(channels)[None, :, None]).reshape(-1, k)
        w, size, split = (np.repeat(v, channels, axis=0) for v in (w, size, split))
    index, w = np.ascontiguousarray(index.T), np.ascontiguousarray(w.T)
    return _FloatTaps(index, w.astype(_F32), w.astype(_F64), size, split)


def _filter_f32(gather, taps: _FloatTaps, lanes_last: bool) -> np.ndarray:
    """sum_j src_j * w_j over each lane's taps, in torch's order and roundings. gather(idx)
    returns the taps' source values (uint8 or float32) with the lanes on the last axis
    (lanes_last) or the first; the result is float32 of that shape."""

    def weight(w: np.ndarray, sel, j: int) -> np.ndarray:
        return w[j, sel] if lanes_last else w[j, sel, None]

    acc = gather(taps.index[0]) * weight(taps.w32, slice(None), 0)
    for j in range(1, int(taps.size.max(initial=1))):
        plain = j <= taps.split
        fused = ~plain & (j < taps.size)
        for mask, is_fma in ((plain, False), (fused, True)):
            if not mask.any():
                continue
            sel = slice(None) if mask.all() else np.flatnonzero(mask)
            key = (Ellipsis, sel) if lanes_last else (sel, Ellipsis)
            src = gather(taps.index[j, sel])
            if is_fma:
                acc[key] = _fma32(src, weight(taps.w64, sel, j), acc[key])
            else:
                acc[key] += src * weight(taps.w32, sel, j)
    return acc


def resize_frames_float(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [T, H, W, C] -> [T, height, width, C], bit-identical to torchvision's
    `transforms.functional.resize(video, [height, width], BICUBIC, antialias=True)` on the
    uint8 tensor (qwen-vl-utils' resize: torch's float32 kernel, clamped and rounded back)."""
    t, h, w, c = frames.shape
    if (h, w) == (height, width):  # torchvision returns the input as it is
        return np.ascontiguousarray(frames)
    out = np.empty((t, height, width, c), dtype=np.uint8)
    rows = max(1, (1 << 15) // (width * c))  # ~256 KB of float64 per step: FMA temporaries stay in cache

    def frame(i: int) -> None:
        x = np.ascontiguousarray(frames[i]).reshape(h, w * c)
        if w != width:  # the width pass first, as torch; lanes are (column, channel)
            taps = _float_taps(w, width, c)
            y = np.empty((h, width * c), dtype=_F32)
            for r in range(0, h, rows):
                src = x[r : r + rows]
                y[r : r + rows] = _filter_f32(lambda idx, src=src: src[:, idx], taps, lanes_last=True)
            x = y
        if h != height:  # lanes are output rows
            taps = _float_taps(h, height)
            y = np.empty((height, width * c), dtype=_F32)
            for r in range(0, height, rows):
                y[r : r + rows] = _filter_f32(lambda idx, x=x: x[idx], taps.lanes(slice(r, r + rows)), lanes_last=False)
            x = y
        np.clip(x, 0, 255, out=x)
        out[i] = np.rint(x).reshape(height, width, c)

    parallel_map(frame, range(t))
    return out

"""Videos to patches.

Two steps, as in the official stack:
- `fetch_video` is qwen-vl-utils 0.0.14's step (what `process_vision_info` runs): decode a
  file with PyAV (or take a list of frames, each fetched as an image with twice the factor),
  sample frames at 2 fps (or `fps` / `nframes`), an even count within [4, 768], give each
  frame its share of the total pixel budget (capped by any max_pixels given), and resize with
  torchvision's `transforms.functional.resize(..., BICUBIC, antialias=True)` on the uint8
  frames, which runs torch's float32 kernel and rounds back: reproduced bit for bit in numpy
  by `resize_frames_float`.
- `VideoProcessor` is HF's Qwen2VLVideoProcessor: smart_resize with the processor's
  min/max pixels (a no-op on fetched videos) and torchvision v2's uint8 kernel
  (`resize_frames`), rescale + normalise, patchify with the last frame repeated to an even
  count.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..errors import InputError
from .image import (
    IMAGE_FACTOR,
    PatchProcessorSettings,
    as_uint8_hwc,
    check_size,
    default_pixels,
    fetch_image,
    load_image,
    option,
    parallel_map,
    patchify,
    smart_resize,
    source_label,
)

# qwen-vl-utils' video defaults (for factor 28; video_budget scales them with the factor).
VIDEO_MIN_TOKENS, VIDEO_MAX_TOKENS = 128, 768
VIDEO_MIN_PIXELS = VIDEO_MIN_TOKENS * 28 * 28
VIDEO_MAX_PIXELS = VIDEO_MAX_TOKENS * 28 * 28
MODEL_SEQ_LEN = 128000  # tokens; the MODEL_SEQ_LEN environment variable overrides it, as there
VIDEO_TOTAL_PIXELS = MODEL_SEQ_LEN * 28 * 28 * 0.9  # 90% of the context, a float as there
FRAME_FACTOR = 2
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768


# ----------------------------------------------------------------------------- resize


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


# ----------------------------------------------------------------------------- sampling


def round_by_factor(x: float, factor: int) -> int:
    return round(x / factor) * factor


def ceil_by_factor(x: float, factor: int) -> int:
    return math.ceil(x / factor) * factor


def floor_by_factor(x: float, factor: int) -> int:
    return math.floor(x / factor) * factor


def smart_nframes(ele: dict, total_frames: int, video_fps: float, name: str = "video") -> int:
    """How many frames to sample (qwen-vl-utils): `nframes` rounded to even, or the video's
    duration at `fps` (default 2) clamped to [min_frames=4, max_frames=768] and to the frame
    count, floored to even."""
    if "fps" in ele and "nframes" in ele:
        raise InputError(f"{name}: give either 'fps' or 'nframes', not both")
    if "nframes" in ele:
        nframes = round_by_factor(option(ele, "nframes", None, name), FRAME_FACTOR)
    else:
        fps = option(ele, "fps", FPS, name)
        min_frames = ceil_by_factor(option(ele, "min_frames", FPS_MIN_FRAMES, name), FRAME_FACTOR)
        max_frames = floor_by_factor(option(ele, "max_frames", min(FPS_MAX_FRAMES, total_frames), name), FRAME_FACTOR)
        nframes = total_frames / video_fps * fps
        nframes = min(min(max(nframes, min_frames), max_frames), total_frames)
        nframes = floor_by_factor(nframes, FRAME_FACTOR)
    if total_frames < FRAME_FACTOR:
        raise InputError(f"{name}: has {total_frames} frame(s); a video needs at least {FRAME_FACTOR}")
    if not (FRAME_FACTOR <= nframes <= total_frames):
        raise InputError(
            f"{name}: cannot sample {nframes} frames from {total_frames} "
            f"(need between {FRAME_FACTOR} and the frame count)"
        )
    return int(nframes)


def linspace_indices(start: int, end: int, n: int) -> np.ndarray:
    """torch.linspace(start, end, n).round().long(): float32, the first half counted up from
    start and the second half down from end, as torch's CPU kernel does."""
    s, e = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([start], dtype=np.int64)
    step = np.float32((e - s) / np.float32(n - 1))
    i = np.arange(n)
    up = s + step * i.astype(np.float32)
    down = e - step * (n - 1 - i).astype(np.float32)
    return np.round(np.where(i < n // 2, up, down)).astype(np.int64)


def frame_range(ele: dict, total_frames: int, video_fps: float, name: str) -> tuple[int, int]:
    """First and last frame inside [video_start, video_end] seconds (qwen-vl-utils)."""
    start_s, end_s = ele.get("video_start"), ele.get("video_end")
    if start_s is None and end_s is None:
        return 0, total_frames - 1
    for key, value in (("video_start", start_s), ("video_end", end_s)):
        if value is not None:
            option(ele, key, None, name, signed=True)
    duration = total_frames / video_fps
    first = math.ceil(max(0.0, min(float(start_s), duration)) * video_fps) if start_s is not None else 0
    last = total_frames - 1
    if end_s is not None:
        last = min(math.floor(max(0.0, min(float(end_s), duration)) * video_fps), total_frames - 1)
    if first >= last:
        raise InputError(f"{name}: video_start/video_end select no frames ({start_s}..{end_s} s)")
    return first, last


# ----------------------------------------------------------------------------- decoding


def _import_av():
    try:
        import av  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise InputError("decoding video files needs PyAV: pip install 'qwen2vl-jax[video]'") from None
    return av


def _open_video(av, path: str, label: str):
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"{label}: cannot be decoded (not a supported video file)") from e
    if not container.streams.video:
        container.close()
        raise InputError(f"{label}: has no video stream")
    return container


@dataclass(frozen=True)
class DecodedVideo:
    """Sampled frames of a video file: uint8 [n, H, W, 3], the source fps and frame count,
    the sampled frame indices [n] and the number of frames in the video_start/video_end range
    they were sampled from (qwen-vl-utils' total_num_frames)."""

    frames: np.ndarray
    fps: float
    total: int
    indices: np.ndarray
    count: int


def decode_video(path: str, ele: dict | None = None, label: str | None = None) -> DecodedVideo:
    """Decode a video file with PyAV and sample it as qwen-vl-utils does with decord or
    torchcodec: frame count and average fps from the stream, frames in [video_start,
    video_end], smart_nframes of them at torch.linspace(first, last, n).round() indices."""
    ele = ele or {}
    av = _import_av()
    label = label or source_label(path, "video")
    if not os.path.exists(path):
        raise InputError(f"{label}: file not found")
    if os.path.isdir(path):
        raise InputError(f"{label}: is a directory, not a video file")

    def opened():
        container = _open_video(av, path, label)
        return container, container.streams.video[0]

    # Pass 1: count frames from the demuxed packets (cheap, no decoding).
    container, stream = opened()
    try:
        fps = float(stream.average_rate or stream.guessed_rate or stream.base_rate or 0)
        total = sum(1 for p in container.demux(stream) if p.size)
    except av.error.FFmpegError as e:
        raise InputError(f"{label}: cannot be decoded (corrupt or unsupported)") from e
    finally:
        container.close()

    def decode(total: int) -> tuple[list[np.ndarray | None], int, np.ndarray, int]:
        if total < 1 or fps <= 0:
            raise InputError(f"{label}: has no decodable frames")
        first, last = frame_range(ele, total, fps, label)
        n = smart_nframes(ele, last - first + 1, fps, label)
        idx = linspace_indices(first, last, n)
        wanted: dict[int, list[int]] = {}
        for pos, i in enumerate(idx.tolist()):
            wanted.setdefault(i, []).append(pos)
        out: list[np.ndarray | None] = [None] * n
        container, stream = opened()
        stream.thread_type = "AUTO"
        decoded = 0
        try:
            for frame in container.decode(stream):
                if decoded in wanted:
                    rgb = frame.to_ndarray(format="rgb24")
                    for pos in wanted[decoded]:
                        out[pos] = rgb
                decoded += 1
                if decoded > idx[-1]:
                    break
        except av.error.FFmpegError as e:
            raise InputError(f"{label}: cannot be decoded (corrupt or unsupported)") from e
        finally:
            container.close()
        return out, decoded, idx, last - first + 1

    frames, decoded, idx, count = decode(total)
    if any(f is None for f in frames):
        # Fewer decodable frames than packets: sample again over what really decodes.
        total = decoded
        frames, decoded, idx, count = decode(total)
        if any(f is None for f in frames):
            raise InputError(f"{label}: frames could not be decoded")
    return DecodedVideo(np.stack(frames), fps, total, idx, count)


def read_video(path: str, ele: dict | None = None) -> tuple[np.ndarray, float, int]:
    """Decode a video file with PyAV and sample it as qwen-vl-utils does.

    Returns uint8 frames [nframes, H, W, 3], the source fps and the source frame count."""
    d = decode_video(path, ele)
    return d.frames, d.fps, d.total


def video_budget(ele: dict, nframes: int, factor: int = IMAGE_FACTOR, label: str | None = None) -> tuple[float, float]:
    """qwen-vl-utils' per-frame pixel budget (min_pixels, max_pixels) for `nframes` frames:
    max(min(768 blocks, total_pixels / nframes * 2), int(1.05 * min_pixels)), capped by the
    element's max_pixels when it gives one (a larger max_pixels does not raise the cap). The
    values stay floats, as there; MODEL_SEQ_LEN (environment) sets the default total."""
    block = factor * factor
    min_pixels = option(ele, "min_pixels", VIDEO_MIN_TOKENS * block, label)
    seq_len = int(float(os.environ.get("MODEL_SEQ_LEN", MODEL_SEQ_LEN)))
    total_pixels = option(ele, "total_pixels", seq_len * factor * factor * 0.9, label)
    max_pixels = max(min(VIDEO_MAX_TOKENS * block, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    if "max_pixels" in ele:
        max_pixels = min(option(ele, "max_pixels", None, label), max_pixels)
    return min_pixels, max_pixels


def fetch_video(
    ele: dict | Any,
    factor: int = IMAGE_FACTOR,
    return_video_sample_fps: bool = False,
    return_video_metadata: bool = False,
    name: str | None = None,
) -> Any:
    """qwen-vl-utils' fetch_video: {"video": path | file:// URI | list of frames, optional fps,
    nframes, min_frames, max_frames, video_start, video_end, min_pixels, max_pixels,
    total_pixels, resized_height + resized_width, and for frame lists sample_fps, raw_fps}
    -> uint8 frames [T, H, W, 3], T even, H and W multiples of `factor`.

    With return_video_metadata, (frames, {"fps", "frames_indices", "total_num_frames",
    "video_backend"}); with return_video_sample_fps, (that, the sampled frames' fps), as
    there. `name` ('video 2') names an in-memory video in errors."""
    frames, metadata, sample_fps = _fetch_video(ele, factor, name)
    out = (frames, metadata) if return_video_metadata else frames
    return (out, sample_fps) if return_video_sample_fps else out


def _fetch_video(ele: dict | Any, factor: int, name: str | None) -> tuple[np.ndarray, dict, float]:
    if not isinstance(ele, dict):
        ele = {"video": ele}
    if "video" not in ele:
        raise InputError(f"{name or 'video'} element has no 'video' source")
    src = ele["video"]
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        label = source_label(path, "video", name)
        if path.startswith("file://"):
            path = path[7:]
        if path.startswith(("http://", "https://")):
            raise InputError(f"{label}: URLs are not supported; download the file first")
        d = decode_video(path, ele, label)
        frames = d.frames
        metadata = {
            "fps": d.fps,
            "frames_indices": d.indices.tolist(),
            "total_num_frames": d.count,
            "video_backend": "pyav",
        }
        sample_fps = len(d.indices) / max(d.count, 1e-6) * d.fps
    else:
        # A list of frames: each fetched as an image with twice the factor (qwen-vl-utils
        # passes the video factor where fetch_image expects a patch size), then the video's
        # budget and resize below, as there.
        label = name or "video"
        if isinstance(src, np.ndarray) and src.ndim == 4:
            src = list(src)
        if not isinstance(src, (list, tuple)) or not src:
            raise InputError(f"{label}: must be a file path or a non-empty list of frames")
        info = {k: v for k, v in ele.items() if k not in ("type", "video")}
        images = parallel_map(
            lambda i: np.asarray(fetch_image({"image": src[i], **info}, 2 * factor, f"{label} frame {i + 1}")),
            range(len(src)),
        )
        sizes = sorted({f"{im.shape[1]}x{im.shape[0]}" for im in images})
        if len(sizes) != 1:
            raise InputError(f"{label}: frames must all have the same size, got {', '.join(sizes)} after resizing")
        n = ceil_by_factor(len(images), FRAME_FACTOR)
        images += [images[-1]] * (n - len(images))
        frames = np.stack(images)
        sample_fps = option(ele, "sample_fps", 2.0, label)
        raw_fps = option(ele, "raw_fps", sample_fps, label)
        metadata = {"fps": raw_fps, "frames_indices": list(range(n)), "total_num_frames": (n / sample_fps) * raw_fps}
    nframes, height, width = frames.shape[:3]
    min_pixels, max_pixels = video_budget(ele, nframes, factor, label)
    if "resized_height" in ele and "resized_width" in ele:
        rh = option(ele, "resized_height", None, label)
        rw = option(ele, "resized_width", None, label)
        th, tw = smart_resize(rh, rw, factor, *default_pixels(factor), label)
    else:
        th, tw = smart_resize(height, width, factor, min_pixels, max_pixels, label)
    return resize_frames_float(frames, th, tw), metadata, sample_fps


# ----------------------------------------------------------------------------- processor


def as_frames(video: Any, name: str | None = None) -> np.ndarray:
    """A video given as an array [T, H, W, C] / [T, C, H, W] or a list of frames (PIL,
    arrays, paths) -> uint8 RGB [T, H, W, 3] (HF's processor path). `name` ('video 2') names
    the video in errors."""
    label = name or "video"
    if isinstance(video, (list, tuple)):
        if not video:
            raise InputError(f"{label}: has no frames")
        frames = [np.asarray(load_image(f, f"{label} frame {i + 1}")) for i, f in enumerate(video)]
        if len({f.shape for f in frames}) != 1:
            raise InputError(f"{label}: frames must all have the same size")
        return np.stack(frames)
    try:
        a = np.asarray(video)
    except Exception:  # noqa: BLE001 - anything numpy cannot take is a bad input
        a = np.asarray(None)
    if a.ndim != 4:
        raise InputError(f"{label}: a video array must be [T, H, W, C], got shape {a.shape}")
    if a.dtype == np.uint8 and a.shape[-1] == 3:
        return np.ascontiguousarray(a)
    frames = [
        np.asarray(load_image(Image.fromarray(as_uint8_hwc(f, f"{label} frame {i + 1}")), f"{label} frame {i + 1}"))
        for i, f in enumerate(a)
    ]
    return np.stack(frames)


@dataclass(frozen=True)
class VideoProcessor(PatchProcessorSettings):
    """HF's Qwen2VLVideoProcessor in numpy; `from_config` reads preprocessor_config.json
    (or video_preprocessor_config.json)."""

    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 28 * 28 * 768
    _FUSED_LUT = True

    def prepare(
        self, video: Any, min_pixels: int | None = None, max_pixels: int | None = None, name: str | None = None
    ) -> np.ndarray:
        """One video (path, element dict, array or list of frames) to resized uint8 frames.
        `name` ('video 2') names an in-memory video in errors."""
        if isinstance(video, (str, os.PathLike, dict)):
            frames = fetch_video(video, self.factor, name=name)  # the qwen-vl-utils step
            label = source_label(video.get("video") if isinstance(video, dict) else video, "video", name)
        else:
            frames = as_frames(video, name)
            label = name or "video"
        _, h, w, _ = frames.shape
        check_size(h, w, "video", label)
        th, tw = smart_resize(
            h,
            w,
            self.factor,
            self.min_pixels if min_pixels is None else int(min_pixels),
            self.max_pixels if max_pixels is None else int(max_pixels),
        )
        return resize_frames(frames, th, tw)

    def patches(self, frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        if frames.shape[0] == 1:  # one frame: pad like a video, not tile like an image
            frames = np.repeat(frames, self.temporal_patch_size, axis=0)
        return patchify(frames, self._lut(), self.patch_size, self.merge_size, self.temporal_patch_size)

    def __call__(
        self, videos: Sequence[Any], min_pixels: int | None = None, max_pixels: int | None = None
    ) -> dict[str, np.ndarray]:
        """videos: a list of videos -> {"pixel_values_videos": float32 [N, 1176],
        "video_grid_thw": int64 [n, 3]}."""
        pv, grids = [], []
        for i, video in enumerate(videos):
            values, grid = self.patches(self.prepare(video, min_pixels, max_pixels, f"video {i + 1}"))
            pv.append(values)
            grids.append(grid)
        dim = 3 * self.temporal_patch_size * self.patch_size**2
        return {
            "pixel_values_videos": np.concatenate(pv, axis=0) if pv else np.zeros((0, dim), np.float32),
            "video_grid_thw": np.asarray(grids, dtype=np.int64).reshape(-1, 3),
        }

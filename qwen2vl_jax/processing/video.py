"""Videos to patches.

Two steps, as in the official stack:
- `fetch_video` is qwen-vl-utils' step: decode a file with PyAV (or take a list of frames),
  sample frames at 2 fps (or `fps` / `nframes`), an even count within [4, 768], give each
  frame its share of the total pixel budget, and resize (torchvision's antialiased bicubic
  on uint8, reproduced exactly in numpy by `resize_frames`).
- `VideoProcessor` is HF's Qwen2VLVideoProcessor: smart_resize with the processor's
  min/max pixels (a no-op on fetched videos), rescale + normalise, patchify with the last
  frame repeated to an even count.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..errors import InputError
from .image import (
    IMAGE_FACTOR,
    as_uint8_hwc,
    check_size,
    fetch_image,
    PatchProcessorSettings,
    load_image,
    parallel_map,
    patchify,
    smart_resize,
)

# qwen-vl-utils' video defaults.
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)  # 90% of a 128k-token context
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
        nframes = round_by_factor(float(ele["nframes"]), FRAME_FACTOR)
    else:
        fps = float(ele.get("fps", FPS))
        min_frames = ceil_by_factor(ele.get("min_frames", FPS_MIN_FRAMES), FRAME_FACTOR)
        max_frames = floor_by_factor(ele.get("max_frames", min(FPS_MAX_FRAMES, total_frames)), FRAME_FACTOR)
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


def _open_video(av, path: str, name: str):
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"video {name}: cannot be decoded (not a supported video file)") from e
    if not container.streams.video:
        container.close()
        raise InputError(f"video {name}: has no video stream")
    return container


def read_video(path: str, ele: dict | None = None) -> tuple[np.ndarray, float, int]:
    """Decode a video file with PyAV and sample it as qwen-vl-utils does.

    Returns uint8 frames [nframes, H, W, 3], the source fps and the source frame count."""
    ele = ele or {}
    av = _import_av()
    name = path if len(path) <= 80 else path[:60] + "..."
    if not os.path.exists(path):
        raise InputError(f"video {name}: file not found")
    if os.path.isdir(path):
        raise InputError(f"video {name}: is a directory, not a video file")

    def passes():
        container = _open_video(av, path, name)
        return container, container.streams.video[0]

    # Pass 1: count frames from the demuxed packets (cheap, no decoding).
    container, stream = passes()
    try:
        fps = float(stream.average_rate or stream.guessed_rate or stream.base_rate or 0)
        total = sum(1 for p in container.demux(stream) if p.size)
    except av.error.FFmpegError as e:
        raise InputError(f"video {name}: cannot be decoded (corrupt or unsupported)") from e
    finally:
        container.close()

    def decode(total: int) -> tuple[list[np.ndarray], int, np.ndarray]:
        if total < 1 or fps <= 0:
            raise InputError(f"video {name}: has no decodable frames")
        first, last = frame_range(ele, total, fps, f"video {name}")
        n = smart_nframes(ele, last - first + 1, fps, f"video {name}")
        idx = linspace_indices(first, last, n)
        wanted: dict[int, list[int]] = {}
        for pos, i in enumerate(idx.tolist()):
            wanted.setdefault(i, []).append(pos)
        out: list[np.ndarray | None] = [None] * n
        container, stream = passes()
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
            raise InputError(f"video {name}: cannot be decoded (corrupt or unsupported)") from e
        finally:
            container.close()
        return out, decoded, idx

    frames, decoded, idx = decode(total)
    if any(f is None for f in frames):
        # Fewer decodable frames than packets: sample again over what really decodes.
        total = decoded
        frames, decoded, idx = decode(total)
        if any(f is None for f in frames):
            raise InputError(f"video {name}: frames could not be decoded")
    return np.stack(frames), fps, total


def _frames_budget(ele: dict, nframes: int) -> tuple[int, int]:
    min_pixels = int(ele.get("min_pixels", VIDEO_MIN_PIXELS))
    total_pixels = ele.get("total_pixels", VIDEO_TOTAL_PIXELS)
    max_pixels = max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    max_pixels = ele.get("max_pixels", max_pixels)
    return min_pixels, int(max_pixels)


def fetch_video(ele: dict | Any, factor: int = IMAGE_FACTOR) -> np.ndarray:
    """qwen-vl-utils' fetch_video: {"video": path | file:// URI | list of frames, optional fps,
    nframes, min_frames, max_frames, video_start, video_end, min_pixels, max_pixels,
    total_pixels, resized_height + resized_width} -> uint8 frames [T, H, W, 3], T even,
    H and W multiples of 28."""
    if not isinstance(ele, dict):
        ele = {"video": ele}
    if "video" not in ele:
        raise InputError("video element has no 'video' source")
    src = ele["video"]
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if path.startswith("file://"):
            path = path[7:]
        if path.startswith(("http://", "https://")):
            raise InputError(f"video {path}: URLs are not supported; download the file first")
        frames, _, _ = read_video(path, ele)
        nframes, height, width = frames.shape[:3]
        check_size(height, width, "video")
        min_pixels, max_pixels = _frames_budget(ele, nframes)
        if "resized_height" in ele and "resized_width" in ele:
            th, tw = smart_resize(int(ele["resized_height"]), int(ele["resized_width"]), factor)
        else:
            th, tw = smart_resize(height, width, factor, min_pixels, max_pixels)
        return resize_frames(frames, th, tw)
    if isinstance(src, np.ndarray) and src.ndim == 4:
        src = list(src)
    if not isinstance(src, (list, tuple)) or not src:
        raise InputError("video must be a file path or a non-empty list of frames")
    info = {k: v for k, v in ele.items() if k not in ("type", "video")}
    images = [np.asarray(fetch_image({"image": f, **info}, factor)) for f in src]
    if len({im.shape for im in images}) != 1:
        raise InputError("video frames must all have the same size")
    n = ceil_by_factor(len(images), FRAME_FACTOR)
    images += [images[-1]] * (n - len(images))
    return np.stack(images)


# ----------------------------------------------------------------------------- processor


def as_frames(video: Any) -> np.ndarray:
    """A video given as an array [T, H, W, C] / [T, C, H, W] or a list of frames (PIL,
    arrays, paths) -> uint8 RGB [T, H, W, 3]."""
    if isinstance(video, (list, tuple)):
        if not video:
            raise InputError("video has no frames")
        frames = [np.asarray(load_image(f)) for f in video]
        if len({f.shape for f in frames}) != 1:
            raise InputError("video frames must all have the same size")
        return np.stack(frames)
    a = np.asarray(video)
    if a.ndim != 4:
        raise InputError(f"video array must be [T, H, W, C], got shape {a.shape}")
    if a.dtype == np.uint8 and a.shape[-1] == 3:
        return np.ascontiguousarray(a)
    frames = [np.asarray(load_image(Image.fromarray(as_uint8_hwc(f, "video frame")))) for f in a]
    return np.stack(frames)


@dataclass(frozen=True)
class VideoProcessor(PatchProcessorSettings):
    """HF's Qwen2VLVideoProcessor in numpy; `from_config` reads preprocessor_config.json
    (or video_preprocessor_config.json)."""

    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 28 * 28 * 768
    _FUSED_LUT = True

    def prepare(self, video: Any, min_pixels: int | None = None, max_pixels: int | None = None) -> np.ndarray:
        """One video (path, element dict, array or list of frames) to resized uint8 frames."""
        if isinstance(video, (str, os.PathLike, dict)):
            frames = fetch_video(video, self.factor)  # the qwen-vl-utils step
        else:
            frames = as_frames(video)
        _, h, w, _ = frames.shape
        check_size(h, w, "video")
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
        for video in videos:
            values, grid = self.patches(self.prepare(video, min_pixels, max_pixels))
            pv.append(values)
            grids.append(grid)
        dim = 3 * self.temporal_patch_size * self.patch_size**2
        return {
            "pixel_values_videos": np.concatenate(pv, axis=0) if pv else np.zeros((0, dim), np.float32),
            "video_grid_thw": np.asarray(grids, dtype=np.int64).reshape(-1, 3),
        }

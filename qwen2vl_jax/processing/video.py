"""Videos to patches.

Two steps, as in the official stack:
- `fetch_video` is qwen-vl-utils 0.0.14's step (what `process_vision_info` runs): decode a
  file with PyAV (or take a list of frames, each fetched as an image with twice the factor),
  sample frames at 2 fps (or `fps` / `nframes`), an even count within [4, 768], give each
  frame its share of the total pixel budget (capped by any max_pixels given), and resize with
  torchvision's `transforms.functional.resize(..., BICUBIC, antialias=True)` on the uint8
  frames, which runs torch's float32 kernel and rounds back: reproduced bit for bit in numpy
  by `resample.resize_frames_float`.
- `VideoProcessor` is HF's Qwen2VLVideoProcessor: smart_resize with the processor's
  min/max pixels (a no-op on fetched videos) and torchvision v2's uint8 kernel
  (`resample.resize_frames`), rescale + normalise, patchify with the last frame repeated to an even
  count.
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
from .resample import resize_frames, resize_frames_float

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

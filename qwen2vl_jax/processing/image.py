"""Images to patches: the paper's dynamic resolution.

Two steps, as in the official stack:
- `fetch_image` is qwen-vl-utils 0.0.14's step (what `process_vision_info` and
  `Processor.apply_chat_template(tokenize=True)` run): open -> its to_rgb (RGBA pasted on
  white, every other mode converted as PIL converts it) -> smart_resize with the element's
  min/max_pixels or resized_height/width -> PIL bicubic. Images of any size are accepted
  (tiny ones are scaled up), as there.
- `ImageProcessor` is HF's Qwen2VLImageProcessor: load (any transparency composited on white,
  a palette's transparent index or an RGB colour key included; sides under 28 pixels
  refused) -> smart_resize (sides multiples of 28, pixel count within [min_pixels,
  max_pixels], aspect ratio kept) -> PIL bicubic resize -> rescale 1/255 -> CLIP normalise ->
  14x14 patches, 2 temporal copies, in 2x2 merge order.

Rescale and normalise are a per-channel lookup table on the uint8 pixels (256 entries,
computed with HF's float32 arithmetic, so the values are bit-identical), applied after the
uint8 pixels are already in patch order: one gather per channel writes the final array.

Every error names its input: the file (`image cat.jpg: ...`), else its position in the call
or the conversation (`image 2`).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InputError

# qwen-vl-utils' image defaults (also the values in the published preprocessor_config.json).
IMAGE_FACTOR = 28
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 16384 * 28 * 28
MAX_RATIO = 200
MIN_SIDE = 28

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- sizes


def default_pixels(factor: int) -> tuple[int, int]:
    """qwen-vl-utils' image budget for a given factor: 4 to 16384 factor x factor blocks."""
    return 4 * factor * factor, 16384 * factor * factor


def _where(label: str | None) -> str:
    """' (image 2)' / ' (image /x/cat.png)' at the end of an error line; nothing when the label
    would only repeat the kind."""
    return f" ({label})" if label and label not in ("image", "video") else ""


def check_size(height: int, width: int, what: str = "image", label: str | None = None) -> None:
    """Raises InputError for a side under 28 pixels or an aspect ratio over 200 (HF's
    processor path). `label` names the input (a file, or 'image 2') at the end of the line."""
    if height < MIN_SIDE or width < MIN_SIDE:
        raise InputError(
            f"{what} {width}x{height} is too small: each side must be at least {MIN_SIDE} pixels"
            + _where(label)
        )
    check_ratio(height, width, what, label)


def check_ratio(height: float, width: float, what: str = "image", label: str | None = None) -> None:
    """Raises InputError for an aspect ratio over 200 (or a side that is not positive)."""
    if not (height > 0 and width > 0):
        raise InputError(f"{what} {width}x{height}: each side must be positive" + _where(label))
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise InputError(f"{what} {width}x{height}: aspect ratio {ratio:.1f} is over {MAX_RATIO}" + _where(label))


def smart_resize(
    height: float,
    width: float,
    factor: int = IMAGE_FACTOR,
    min_pixels: float = MIN_PIXELS,
    max_pixels: float = MAX_PIXELS,
    label: str | None = None,
) -> tuple[int, int]:
    """(height, width) with both sides multiples of `factor`, h*w in [min_pixels, max_pixels],
    aspect ratio kept as closely as possible (HF's and qwen-vl-utils' rule).

    Sizes and budgets may be floats (qwen-vl-utils passes a video's per-frame budget as one).
    One deliberate difference from qwen-vl-utils: a side scaled down below `factor` is kept at
    `factor` (HF's rule), where qwen-vl-utils rounds it to 0 and then fails."""
    check_ratio(height, width, "video" if label and label.startswith("video") else "image", label)
    if min_pixels > max_pixels:
        raise InputError(f"min_pixels {min_pixels} is larger than max_pixels {max_pixels}" + _where(label))
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return int(h_bar), int(w_bar)


def option(ele: dict, key: str, default: Any, label: str | None = None, signed: bool = False) -> Any:
    """A numeric option of a message element, as given (ints stay ints, floats floats);
    negative only when `signed` (video_start/video_end, which are clamped to the video)."""
    value = ele.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{key} must be a number, got {value!r}" + _where(label))
    if not math.isfinite(value) or (value < 0 and not signed):
        raise InputError(f"{key} must be a {'finite' if signed else 'non-negative'} number, got {value!r}" + _where(label))
    return value


def element_size(
    ele: dict, height: int, width: int, factor: int = IMAGE_FACTOR, label: str | None = None
) -> tuple[int, int]:
    """The size qwen-vl-utils' fetch_image resizes an image of `height` x `width` to:
    resized_height/width (both given) rounded by smart_resize with the default budget, else
    smart_resize with the element's min_pixels/max_pixels (defaults 4 and 16384 blocks of
    factor x factor). The values are used as given (no int conversion), as there."""
    lo, hi = default_pixels(factor)
    if "resized_height" in ele and "resized_width" in ele:
        rh = option(ele, "resized_height", None, label)
        rw = option(ele, "resized_width", None, label)
        return smart_resize(rh, rw, factor, lo, hi, label)
    return smart_resize(
        height, width, factor, option(ele, "min_pixels", lo, label), option(ele, "max_pixels", hi, label), label
    )


# ----------------------------------------------------------------------------- loading


def _describe(source: str) -> str:
    """A path or URL short enough for one line; the end (the file name) is kept."""
    return source if len(source) <= 80 else "..." + source[-70:]


def source_label(source: Any, kind: str = "image", name: str | None = None) -> str:
    """How errors name an input: `image PATH` for a file or URL, else `name` (the input's
    position, 'image 2') or just the kind."""
    if isinstance(source, (str, os.PathLike)):
        s = os.fspath(source)
        if not s.startswith("data:"):
            return f"{kind} {_describe(s)}"
        return f"{name} (data URI)" if name else f"{kind} (data URI)"
    return name or kind


def _open_bytes(data: bytes, label: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Images a little over PIL's pixel limit only warn; they are resized down anyway.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except Image.DecompressionBombError:
        raise InputError(f"{label}: too many pixels to decode safely (PIL's limit is "
                         f"{2 * Image.MAX_IMAGE_PIXELS} pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        kind = "not an image file" if isinstance(e, UnidentifiedImageError) else "corrupt or truncated"
        raise InputError(f"{label}: cannot be read ({kind})") from None
    return img


def _open_path(path: str, label: str) -> Image.Image:
    if not os.path.exists(path):
        raise InputError(f"{label}: file not found")
    if os.path.isdir(path):
        raise InputError(f"{label}: is a directory, not an image file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"{label}: cannot be read ({e.strerror})") from None
    return _open_bytes(data, label)


def open_image(source: Any, name: str | None = None) -> Image.Image:
    """A PIL image from what qwen-vl-utils accepts: a PIL image, a path, a `file://` or
    `data:image/...;base64,` URI, an http(s) URL, or (ours) bytes or a uint8 array ([H, W],
    [H, W, C] or [C, H, W] with C in 1, 3, 4). The image is not converted. `name` names an
    in-memory input in errors ('image 2')."""
    label = source_label(source, "image", name)
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, os.PathLike)):
        s = os.fspath(source)
        if s.startswith("data:"):
            if not s.startswith("data:image") or "base64," not in s:
                raise InputError(f"{label}: only base64 data:image URIs are supported")
            try:
                data = base64.b64decode(s.split("base64,", 1)[1], validate=False)
            except (binascii.Error, ValueError):
                raise InputError(f"{label}: invalid base64 data") from None
            return _open_bytes(data, label)
        if s.startswith(("http://", "https://")):
            try:
                with urllib.request.urlopen(s, timeout=30) as r:
                    data = r.read()
            except OSError as e:
                raise InputError(f"{label}: cannot be downloaded ({e})") from None
            return _open_bytes(data, label)
        if s.startswith("file://"):
            s = s[7:]
        return _open_path(s, label)
    if isinstance(source, (bytes, bytearray)):
        return _open_bytes(bytes(source), label)
    return Image.fromarray(as_uint8_hwc(source, label))


def as_uint8_hwc(array: Any, what: str) -> np.ndarray:
    """A uint8 [H, W, C] (C in 1, 3, 4) or [H, W] view of an array-like image."""
    try:
        a = np.asarray(array)
    except Exception:  # noqa: BLE001 - anything numpy cannot take is a bad input
        raise InputError(f"{what}: unsupported input type {type(array).__name__}") from None
    if a.dtype == object or a.ndim == 0:
        raise InputError(f"{what}: unsupported input type {type(array).__name__}")
    if a.ndim not in (2, 3):
        raise InputError(f"{what}: expected an image array [H, W] or [H, W, C], got shape {a.shape}")
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # [C, H, W]
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4):
        raise InputError(f"{what}: expected 1, 3 or 4 channels, got shape {a.shape}")
    if a.dtype != np.uint8:
        if a.dtype == bool or not np.issubdtype(a.dtype, np.number):
            raise InputError(f"{what}: expected uint8 pixel values, got dtype {a.dtype}")
        if a.size and (a.min() < 0 or a.max() > 255 or not np.all(np.equal(np.mod(a, 1), 0))):
            raise InputError(f"{what}: pixel values must be integers in 0..255 (dtype {a.dtype})")
        a = a.astype(np.uint8)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    return np.ascontiguousarray(a)


def _paste_on_white(rgba: Image.Image) -> Image.Image:
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def to_rgb(img: Image.Image, every_alpha: bool = True) -> Image.Image:
    """RGB, transparency composited on white.

    every_alpha=True is HF's convert_to_rgb (the processor path): an image with an alpha band
    (RGBA, LA, PA) or a `transparency` entry in its info goes through RGBA and is composited.
    The entry matters beyond palettes: PIL's P -> RGB conversion turns a transparent index
    into an RGB colour key that travels with the image (through resizes too), so an image
    that qwen-vl-utils has already converted still has its keyed pixels made white here.
    every_alpha=False is qwen-vl-utils' to_rgb exactly: only RGBA is composited; every other
    mode is converted by PIL, which drops an LA image's alpha and keeps a palette's
    transparent index only as that colour key."""
    if every_alpha and ("A" in img.getbands() or img.info.get("transparency") is not None):
        return _paste_on_white(img if img.mode == "RGBA" else img.convert("RGBA"))
    if img.mode == "RGBA":
        return _paste_on_white(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def _rgb(img: Image.Image, every_alpha: bool, label: str) -> Image.Image:
    try:
        return to_rgb(img, every_alpha)
    except (OSError, ValueError) as e:
        raise InputError(f"{label}: cannot be read ({e})") from None


def load_image(source: Any, name: str | None = None) -> Image.Image:
    """open_image + to_rgb + the size checks (HF's processor path): an RGB PIL image ready
    to resize."""
    label = source_label(source, "image", name)
    rgb = _rgb(open_image(source, name), True, label)
    w, h = rgb.size
    check_size(h, w, "image", label)
    return rgb


def image_source(ele: dict, label: str | None = None) -> Any:
    source = ele["image"] if "image" in ele else ele.get("image_url")
    if isinstance(source, dict):  # OpenAI style {"image_url": {"url": ...}}
        source = source.get("url")
    if source is None:
        raise InputError("image element has no 'image' or 'image_url' source" + _where(label))
    return source


def fetch_image(ele: dict | Any, factor: int = IMAGE_FACTOR, name: str | None = None, strict: bool = False) -> Image.Image:
    """qwen-vl-utils' fetch_image: a message element {"image" | "image_url": source, optional
    min_pixels, max_pixels, resized_height + resized_width} to a resized RGB PIL image.

    The one loader for images named in messages: process_vision_info and the processor's
    apply_chat_template(tokenize=True) both run it. As qwen-vl-utils 0.0.14: only RGBA is
    composited on white, images of any size are accepted (tiny ones scaled up to
    min_pixels), and the budget is 4 to 16384 blocks of `factor` x `factor` unless the
    element says otherwise. strict=True is for an element handed to the processor itself
    (`Processor(images=[{...}])`): HF's loading instead (every alpha composited, sides under
    28 pixels refused), then the element's size options. `name` names an in-memory input in
    errors ('image 2')."""
    if not isinstance(ele, dict):
        ele = {"image": ele}
    source = image_source(ele, name)
    label = source_label(source, "image", name)
    if strict:
        img = load_image(source, name)
    else:
        img = _rgb(open_image(source, name), False, label)
    h, w = element_size(ele, img.size[1], img.size[0], factor, label)
    if (w, h) != img.size:
        img = img.resize((w, h), Image.BICUBIC)
    return img


# ----------------------------------------------------------------------------- patches


@lru_cache(maxsize=None)
def _pool(pid: int) -> ThreadPoolExecutor:
    # numpy's take and PIL's resize release the GIL, so threads use every core. Keyed by
    # process id: a forked data-loader worker gets its own pool, not the parent's dead one.
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="qwen2vl-pre")


def parallel_map(fn, items: Sequence[Any]) -> list[Any]:
    """[fn(x) for x in items] on the shared thread pool (in order; the first error raises)."""
    if len(items) < 2 or (os.cpu_count() or 1) < 2:
        return [fn(x) for x in items]
    return list(_pool(os.getpid()).map(fn, items))


def normalize_lut(mean: Sequence[float], std: Sequence[float], fused: bool) -> np.ndarray:
    """[3, 256] float32: the normalised value of every uint8 level, per channel.

    fused=False is HF's PIL image processor (uint8 * (1/255) in float64, cast to float32,
    then (x - mean) / std in float32); fused=True is its torch video processor
    ((x - mean*255) / (std*255), all float32). Both are bit-identical to the reference."""
    levels = np.arange(256)
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    if fused:
        x = levels.astype(np.float32)[None, :]
        return ((x - m * np.float32(255.0)) / (s * np.float32(255.0))).astype(np.float32)
    x = (levels.astype(np.float64) * (1 / 255)).astype(np.float32)[None, :]
    return ((x - m) / s).astype(np.float32)


def patchify(
    frames: np.ndarray,
    lut: np.ndarray,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 frames [T, H, W, 3] to normalised patches [t*h*w, 3*tp*p*p] and (t, h, w),
    written into `out` when given (a float32 [t*h*w, 3*tp*p*p] slice of a batch buffer).

    A single frame (T=1, an image) is repeated temporal_patch_size times; otherwise the last
    frame is repeated until T is a multiple of temporal_patch_size (HF's video padding).
    Rows are in 2x2 merge order: (t, h/2, w/2, 2, 2); columns are (channel, tp, py, px).
    """
    t_in, height, width, c = frames.shape
    p, m, tp = patch_size, merge_size, temporal_patch_size
    if height % (p * m) or width % (p * m):
        raise ValueError(f"frame {height}x{width} is not a multiple of {p * m}")
    gh, gw = height // p, width // p
    repeat_image = t_in == 1
    if not repeat_image and t_in % tp:
        pad = np.repeat(frames[-1:], tp - t_in % tp, axis=0)
        frames = np.concatenate([frames, pad], axis=0)
    t_src = 1 if repeat_image else frames.shape[0]
    gt = 1 if repeat_image else t_src // tp
    tsub = 1 if repeat_image else tp
    # [gt, tp, gh/m, m, p, gw/m, m, p, C] -> [gt, gh/m, gw/m, m, m, C, tp, p, p], still uint8
    x = frames.reshape(gt, tsub, gh // m, m, p, gw // m, m, p, c)
    x = np.ascontiguousarray(x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7))
    n = gt * gh * gw
    x = x.reshape(n, c, tsub, p * p)
    if out is None:
        out = np.empty((n, c * tp * p * p), dtype=np.float32)
    result = out
    out = out.reshape(n, c, tp, p * p)

    def gather(rows: slice) -> None:
        for ch in range(c):
            # [rows, tsub, p*p]; an image (tsub=1) broadcasts over the tp copies
            out[rows, ch] = np.take(lut[ch], x[rows, ch])

    step = 4096  # rows per task: big images are split across the pool's threads
    parallel_map(gather, [slice(i, min(i + step, n)) for i in range(0, n, step)])
    return result, (gt, gh, gw)


# ----------------------------------------------------------------------------- processor


@dataclass(frozen=True)
class PatchProcessorSettings:
    """The preprocessor_config.json settings shared by the image and video processors."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    # Whether the normalisation table is fused (see normalize_lut); fixed per subclass.
    _FUSED_LUT = False

    @classmethod
    def from_config(cls, cfg: dict):
        size = cfg.get("size") or {}
        kw = {}
        min_p = cfg.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
        max_p = cfg.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
        if min_p is not None:
            kw["min_pixels"] = int(min_p)
        if max_p is not None:
            kw["max_pixels"] = int(max_p)
        for k in ("patch_size", "merge_size", "temporal_patch_size"):
            if k in cfg:
                kw[k] = int(cfg[k])
        for k in ("image_mean", "image_std"):
            if k in cfg:
                kw[k] = tuple(float(v) for v in cfg[k])
        return cls(**kw)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def _lut(self) -> np.ndarray:
        lut = getattr(self, "_lut_cache", None)
        if lut is None:
            lut = normalize_lut(self.image_mean, self.image_std, fused=self._FUSED_LUT)
            object.__setattr__(self, "_lut_cache", lut)
        return lut


@dataclass(frozen=True)
class ImageProcessor(PatchProcessorSettings):
    """HF's Qwen2VLImageProcessor (PIL backend) in numpy; `from_config` reads the keys of
    preprocessor_config.json."""

    def prepare(
        self, item: Any, min_pixels: int | None = None, max_pixels: int | None = None, name: str | None = None
    ) -> Image.Image:
        """One input (PIL, array, path/URI, or a qwen-vl-utils element dict) to the resized
        RGB image the patches are cut from. `name` ('image 2') names an in-memory input in
        errors."""
        if isinstance(item, dict):
            img = fetch_image(item, self.factor, name, strict=True)  # element options, HF's checks
        else:
            img = load_image(item, name)
        w, h = img.size
        th, tw = smart_resize(
            h,
            w,
            self.factor,
            self.min_pixels if min_pixels is None else int(min_pixels),
            self.max_pixels if max_pixels is None else int(max_pixels),
        )
        if (tw, th) != (w, h):
            img = img.resize((tw, th), Image.BICUBIC)
        return img

    def patches(self, img: Image.Image, out: np.ndarray | None = None) -> tuple[np.ndarray, tuple[int, int, int]]:
        frame = np.asarray(img)[None]  # [1, H, W, 3] uint8
        return patchify(frame, self._lut(), self.patch_size, self.merge_size, self.temporal_patch_size, out)

    def __call__(
        self, images: Any, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> dict[str, np.ndarray]:
        """images: one input or a list -> {"pixel_values": float32 [N, 1176],
        "image_grid_thw": int64 [n, 3]}."""
        items = images if isinstance(images, (list, tuple)) else [images]
        prepared = parallel_map(
            lambda i: self.prepare(items[i], min_pixels, max_pixels, f"image {i + 1}"), range(len(items))
        )
        counts = [(img.size[0] // self.patch_size) * (img.size[1] // self.patch_size) for img in prepared]
        dim = 3 * self.temporal_patch_size * self.patch_size**2
        pixel_values = np.empty((sum(counts), dim), dtype=np.float32)  # one buffer, no concatenate
        grids, start = [], 0
        for img, n in zip(prepared, counts):
            _, grid = self.patches(img, pixel_values[start : start + n])
            grids.append(grid)
            start += n
        return {"pixel_values": pixel_values, "image_grid_thw": np.asarray(grids, dtype=np.int64).reshape(-1, 3)}

"""Images and videos named by a request: data: URIs, files inside --media-dir, remote URLs when
allowed (serving.remote); each refused with the part of the request that named it, quoting at
most a short piece of what the client sent."""

from __future__ import annotations

import base64
import binascii
import io
import os
import time
import warnings
from pathlib import Path

from qwen2vl_jax.serving import remote
from qwen2vl_jax.serving.preprocess import Ticket
from qwen2vl_jax.serving.remote import shown
from qwen2vl_jax.serving.settings import ApiError, Settings

# Longer paths cannot name a file on Linux (PATH_MAX, NAME_MAX); checking the length first also
# keeps resolving a path cheap, whatever the client sent.
MAX_PATH_CHARS = 4096
MAX_NAME_CHARS = 255


# ---------------------------------------------------------------------------- media
def local_path(url: str, where: str, settings: Settings) -> Path:
    if settings.media_dir is None:
        raise ApiError(403, f"{where}: local files are refused (the server was started without --media-dir)", where)
    raw = url[len("file://"):] if url.startswith("file://") else url
    if len(raw) > MAX_PATH_CHARS or any(len(name) > MAX_NAME_CHARS for name in raw.split("/")):
        raise ApiError(400, f"{where}: the path is too long ({len(raw)} characters; at most {MAX_PATH_CHARS}, "
                            f"{MAX_NAME_CHARS} per name)", where)
    try:
        path = Path(raw).resolve()
    except (OSError, ValueError):  # a NUL byte, an unencodable character, a symlink loop
        raise ApiError(400, f"{where}: {shown(raw)} is not a usable path", where) from None
    root = settings.media_dir.resolve()
    if not path.is_relative_to(root):
        raise ApiError(403, f"{where}: {shown(raw)} is outside the media folder", where)
    try:
        is_file = path.is_file()
    except (OSError, ValueError):
        is_file = False
    if not is_file:
        raise ApiError(400, f"{where}: no such file {shown(raw)}", where)
    return path


def image_bytes(url: str, where: str, settings: Settings, ticket=None) -> bytes:
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
            raise ApiError(400, f"{where}: only base64 data:image/... URIs are supported", where)
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: the data URI is not valid base64", where) from None
    if url.startswith(("http://", "https://")):
        if not settings.allow_remote_media:
            raise ApiError(403, f"{where}: remote images are refused (the server was started without "
                                "--allow-remote-media)", where)
        if ticket is None:
            ticket = Ticket(time.perf_counter(), settings.request_timeout)
        return remote.fetch(url, where, settings, ticket)
    if url.startswith("file://") or url.startswith("/"):
        path = local_path(url, where, settings)
        try:
            size = os.path.getsize(path)
        except OSError:
            raise ApiError(400, f"{where}: cannot read {shown(url)}", where) from None
        if size > settings.max_body_bytes:
            raise ApiError(400, f"{where}: the file is over {settings.max_body_bytes} bytes", where)
        try:
            return path.read_bytes()
        except OSError:
            raise ApiError(400, f"{where}: cannot read {shown(url)}", where) from None
    raise ApiError(400, f"{where}: unsupported image URL (data:, file:// or http(s)://)", where)


def image_size(data: bytes, where: str, settings: Settings) -> tuple[int, int]:
    """(width, height) from the image's header, checked against --max-image-pixels before any
    pixel is decoded."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
    except Image.DecompressionBombError:  # over twice PIL's own limit: the header says too many pixels
        raise ApiError(400, f"{where}: the image has too many pixels (over the server's limit of "
                            f"{settings.max_image_pixels}, --max-image-pixels)", where) from None
    except Exception:  # noqa: BLE001 - anything PIL cannot open is an undecodable image
        raise ApiError(400, f"{where}: cannot be read (not an image file, or corrupt)", where) from None
    if w * h > settings.max_image_pixels:
        raise ApiError(400, f"{where}: the image is {w}x{h}, over the server's limit of {settings.max_image_pixels} "
                            "pixels (--max-image-pixels)", where)
    return w, h


def check_image_size(data: bytes, where: str, settings: Settings) -> None:
    image_size(data, where, settings)

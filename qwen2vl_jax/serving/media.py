"""Images and videos named by a request: data: URIs, files inside --media-dir, remote URLs when
allowed; each refused with the part of the request that named it."""

from __future__ import annotations

import base64
import binascii
import io
import urllib.request
from pathlib import Path

from qwen2vl_jax.serving.settings import ApiError, Settings


# ---------------------------------------------------------------------------- media
def local_path(url: str, where: str, settings: Settings) -> Path:
    if settings.media_dir is None:
        raise ApiError(403, f"{where}: local files are refused (the server was started without --media-dir)", where)
    raw = url[len("file://"):] if url.startswith("file://") else url
    path = Path(raw).resolve()
    root = settings.media_dir.resolve()
    if not path.is_relative_to(root):
        raise ApiError(403, f"{where}: {raw} is outside the media folder", where)
    if not path.is_file():
        raise ApiError(400, f"{where}: no such file {raw}", where)
    return path


def image_bytes(url: str, where: str, settings: Settings) -> bytes:
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
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                data = r.read(settings.max_body_bytes + 1)
        except OSError as e:
            raise ApiError(400, f"{where}: cannot download {url} ({e})", where) from None
        if len(data) > settings.max_body_bytes:
            raise ApiError(400, f"{where}: the image at {url} is over {settings.max_body_bytes} bytes", where)
        return data
    if url.startswith("file://") or url.startswith("/"):
        return local_path(url, where, settings).read_bytes()
    raise ApiError(400, f"{where}: unsupported image URL (data:, file:// or http(s)://)", where)


def check_image_size(data: bytes, where: str, settings: Settings) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Exception:  # noqa: BLE001 - anything PIL cannot open is an undecodable image
        raise ApiError(400, f"{where}: cannot be read (not an image file, or corrupt)", where) from None
    if w * h > settings.max_image_pixels:
        raise ApiError(400, f"{where}: the image is {w}x{h}, over the server's limit of {settings.max_image_pixels} "
                            "pixels (--max-image-pixels)", where)

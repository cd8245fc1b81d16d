"""What the server's flags set beyond the model and the batcher, and the error every bad request
gets (an OpenAI error object with a 4xx status)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

# ---------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class Settings:
    """What the flags set, beyond the model and the batcher."""

    model_name: str = "qwen2-vl"
    api_key: str | None = None
    media_dir: Path | None = None
    allow_remote_media: bool = False
    allow_private_media: bool = False  # remote fetches may reach loopback/private/link-local addresses
    allowed_media_domains: tuple[str, ...] = ()  # when given, the only hosts remote media may come from
    max_images: int = 8
    max_video_frames: int | None = None
    max_image_pixels: int = 64 * 1024 * 1024  # checked from the header, before decoding
    max_body_bytes: int = 64 * 1024 * 1024
    request_timeout: float = 600.0
    max_queue: int = 64
    preprocess_workers: int | None = None  # threads reading media; None: one per core
    default_max_tokens: int = 512
    # the HTTP surface (app.py); the library defaults leave it as open as a test server needs,
    # the command line narrows it (cli.py)
    model_aliases: tuple[str, ...] = ()  # more names a request's `model` may give
    read_timeout: float = 30.0  # seconds for a request's headers and body to arrive
    max_connections: int = 256  # open connections; more get 503
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed (CORS); "*": any; none: no browser
    allowed_hosts: tuple[str, ...] | None = None  # Host header values allowed; None: any
    access_log: bool = False  # one line per request on the `qwen2vl_jax.serving.access` logger


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, one-line message, the offending field."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
             413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
             504: "timeout_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

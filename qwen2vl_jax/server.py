"""`qwen2vl-serve`: the OpenAI chat API over continuous batching.

    qwen2vl-serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--mesh ...] [--max-batch 16]
        [--max-context N] [--min-pixels N] [--max-pixels N] [--max-video-frames N]
        [--max-images N] [--api-key KEY] [--media-dir DIR] [--allow-remote-media]
        [--coordinator ADDR:PORT --num-processes N --process-id I] [--compile-cache DIR | --no-compile-cache]

Endpoints: POST /v1/chat/completions (OpenAI's schema; images as image_url parts, videos as
video/video_url parts naming local files; `stream: true` gives server-sent events ending in
`data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus text).

Flow: the HTTP side (Starlette on uvicorn's event loop) checks the request, reads the media and
renders the prompt with the package's chat template and processor (in a worker thread), looks
each image up in the vision cache, and queues a `batching.Request`; one thread runs the
`batching.Batcher` (vision tower, prefill, one decode step for all slots) and hands tokens back
to the event loop, where they are detokenized, checked against stop strings and sent.

Past one host, run it once per process with the multi-process flags (`distributed`): process
0 serves HTTP and runs the batcher, the others replay its device calls (`batching.Lockstep`).

Every bad request gets an OpenAI error object `{"error": {"message", "type", "param", "code"}}`
with a 4xx status and touches no other request.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import hmac
import io
import json
import logging
import math
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from qwen2vl_jax import distributed, shell
from qwen2vl_jax.config import DEMO_DIR as DEFAULT_MODEL
from qwen2vl_jax.errors import InputError

PROG = "qwen2vl-serve"
log = logging.getLogger(__name__)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4  # stop strings per request, as OpenAI allows
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


# ---------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class Settings:
    """What the flags set, beyond the model and the batcher."""

    model_name: str = "qwen2-vl"
    api_key: str | None = None
    media_dir: Path | None = None
    allow_remote_media: bool = False
    max_images: int = 8
    max_video_frames: int | None = None
    max_image_pixels: int = 64 * 1024 * 1024  # checked from the header, before decoding
    max_body_bytes: int = 64 * 1024 * 1024
    request_timeout: float = 600.0
    max_queue: int = 64
    default_max_tokens: int = 512


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, one-line message, the offending field."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
             504: "timeout_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------- metrics
class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, x: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if x <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += x

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for b, c in zip((*self.buckets, math.inf), self.counts):
            total += c
            out.append(f'{name}_bucket{{le="{"+Inf" if b == math.inf else b}"}} {total}')
        return out + [f"{name}_sum {self.sum}", f"{name}_count {total}"]


class Metrics:
    """Counters and histograms for /metrics (updated from the event loop only)."""

    def __init__(self):
        self.requests: dict[int, int] = {}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.per_token = Histogram(TOKEN_BUCKETS)

    def render(self, batcher) -> str:
        p = "qwen2vl"
        lines = [f"# TYPE {p}_requests_total counter"]
        lines += [f'{p}_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
        cache = batcher.vision_cache
        for name, kind, value, doc in (
            ("prompt_tokens_total", "counter", self.prompt_tokens, "prompt tokens of admitted requests"),
            ("generation_tokens_total", "counter", self.generated_tokens, "tokens generated"),
            ("queue_depth", "gauge", batcher.queue_depth, "requests waiting for a slot"),
            ("active_slots", "gauge", batcher.active_slots, "slots decoding a request"),
            ("max_slots", "gauge", batcher.slots.max_batch, "decode slots"),
            ("decode_steps_total", "counter", batcher.steps, "decode steps run"),
            ("vision_cache_hits_total", "counter", cache.hits, "images whose features came from the cache"),
            ("vision_cache_misses_total", "counter", cache.misses, "images that went through the vision tower"),
            ("vision_cache_entries", "gauge", len(cache), "images in the vision cache"),
        ):
            lines += [f"# HELP {p}_{name} {doc}", f"# TYPE {p}_{name} {kind}", f"{p}_{name} {value}"]
        lines += [f"# TYPE {p}_time_to_first_token_seconds histogram", *self.ttft.lines(f"{p}_time_to_first_token_seconds")]
        lines += [f"# TYPE {p}_time_per_output_token_seconds histogram",
                  *self.per_token.lines(f"{p}_time_per_output_token_seconds")]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- the request body
@dataclasses.dataclass
class Parsed:
    """A checked chat request."""

    messages: list[dict]  # HF messages; image parts hold bytes, video parts a local path
    max_tokens: int | None
    settings: dict  # temperature, top_p, top_k, repetition_penalty, seed (None: the model's default)
    stop: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool
    return_token_ids: bool


def _number(body: dict, name: str, kind=float, lo=None, hi=None):
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f" between {lo} and {hi}" if hi is not None else f" >= {lo}" if lo is not None else ""
        raise ApiError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}{rng} (got {value!r})", name)
    return kind(value)


def parse_body(body: Any, settings: Settings) -> Parsed:
    """The JSON body -> Parsed (media not read yet); ApiError names the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    n = body.get("n")
    if n not in (None, 1):
        raise ApiError(400, "only n=1 is supported", "n")
    max_tokens = _number(body, "max_completion_tokens", int, 1)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int, 1)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    values = {
        "temperature": _number(body, "temperature", float, 0, 100),
        "top_p": _number(body, "top_p", float, 0, 1),
        "top_k": _number(body, "top_k", int, -1, 2**31 - 1),
        "repetition_penalty": _number(body, "repetition_penalty", float, 1e-6, 100),
        "seed": _number(body, "seed", int, 0, 2**32 - 1),
    }
    if values["top_k"] == -1:  # vLLM's spelling of "off"
        values["top_k"] = 0
    if values["top_p"] == 0:
        raise ApiError(400, "'top_p' must be in (0, 1]", "top_p")
    return Parsed(
        messages=[_message(m, i, settings) for i, m in enumerate(messages)],
        max_tokens=max_tokens, settings=values, stop=stop, stream=stream,
        include_usage=bool(options.get("include_usage", False)), ignore_eos=bool(body.get("ignore_eos", False)),
        return_token_ids=bool(body.get("return_token_ids", False)),
    )


def _message(m: Any, i: int, settings: Settings) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise ApiError(400, f"{where} must be an object with 'role' and 'content'", where)
    role = m.get("role")
    if role not in ROLES:
        raise ApiError(400, f"{where}.role {role!r} is not one of {', '.join(ROLES)}", f"{where}.role")
    content = m.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, str):
        return {"role": ROLES[role], "content": content}
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of content parts", f"{where}.content")
    return {"role": ROLES[role], "content": [_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]}


def _url(value: Any, where: str) -> str:
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{where} has no URL", where)
    return value


def _part(p: Any, where: str) -> dict:
    if not isinstance(p, dict) or not isinstance(p.get("type"), str):
        raise ApiError(400, f"{where} must be an object with a 'type'", where)
    kind = p["type"]
    if kind == "text":
        if not isinstance(p.get("text"), str):
            raise ApiError(400, f"{where}.text must be a string", f"{where}.text")
        return {"type": "text", "text": p["text"]}
    if kind in ("image_url", "image"):
        return {"type": "image", "url": _url(p.get(kind), f"{where}.{kind}"), "where": where}
    if kind in ("video_url", "video"):
        return {"type": "video", "url": _url(p.get(kind), f"{where}.{kind}"), "where": where}
    raise ApiError(400, f"{where}: content part type {kind!r} is not supported (text, image_url, video_url)",
                   f"{where}.type")


# ---------------------------------------------------------------------------- media
def _local_path(url: str, where: str, settings: Settings) -> Path:
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


def _image_bytes(url: str, where: str, settings: Settings) -> bytes:
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
        return _local_path(url, where, settings).read_bytes()
    raise ApiError(400, f"{where}: unsupported image URL (data:, file:// or http(s)://)", where)


def _check_image_size(data: bytes, where: str, settings: Settings) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Exception:  # noqa: BLE001 - anything PIL cannot open is an undecodable image
        raise ApiError(400, f"{where}: cannot be read (not an image file, or corrupt)", where) from None
    if w * h > settings.max_image_pixels:
        raise ApiError(400, f"{where}: the image is {w}x{h}, over the server's limit of {settings.max_image_pixels} "
                            "pixels (--max-image-pixels)", where)


# ---------------------------------------------------------------------------- the service
class Service:
    """The model, processor and batcher behind the app, and the host-side work per request."""

    def __init__(self, model, processor, batcher, settings: Settings):
        self.model, self.processor, self.batcher, self.settings = model, processor, batcher, settings
        self.metrics = Metrics()
        self.created = int(time.time())
        eos = list(model.generation_config.eos_token_ids)
        im_end = processor.tokenizer.token_to_id("<|im_end|>")
        self.eos_ids = tuple(dict.fromkeys([*eos, im_end]))

    def prepare(self, parsed: Parsed):
        """Reads the media, renders and tokenizes the prompt -> (input_ids, images, videos).
        Runs in a worker thread."""
        from qwen2vl_jax.batching import VisionInput

        proc, settings = self.processor, self.settings
        parts = [p for m in parsed.messages if isinstance(m["content"], list) for p in m["content"]]
        n_images = sum(p["type"] == "image" for p in parts)
        if n_images > settings.max_images:
            raise ApiError(400, f"{n_images} images are over the server's limit of {settings.max_images} per request "
                                "(--max-images)", "messages")
        hf_messages, images, videos = [], [], []
        ip = proc.image_processor
        for m in parsed.messages:
            if isinstance(m["content"], str):
                hf_messages.append(m)
                continue
            content = []
            for p in m["content"]:
                if p["type"] == "text":
                    content.append(p)
                elif p["type"] == "image":
                    data = _image_bytes(p["url"], p["where"], settings)
                    _check_image_size(data, p["where"], settings)
                    key = f"{hashlib.sha256(data).hexdigest()}|{ip.min_pixels}|{ip.max_pixels}|{ip.factor}"
                    hit = self.batcher.vision_cache.get(key)
                    if hit is not None:
                        images.append(VisionInput(None, hit[0], key, hit[1]))
                    else:
                        out = self._vision(lambda: ip([{"image": data}]), p["where"])
                        images.append(VisionInput(out["pixel_values"], out["image_grid_thw"], key))
                    content.append({"type": "image", "image": "data"})
                else:
                    path = _local_path(p["url"], p["where"], settings)
                    ele = {"video": str(path)}
                    if settings.max_video_frames:
                        ele["max_frames"] = settings.max_video_frames
                    out = self._vision(lambda: proc.video_processor([ele]), p["where"])
                    videos.append(VisionInput(out["pixel_values_videos"], out["video_grid_thw"]))
                    content.append({"type": "video", "video": str(path)})
            hf_messages.append({"role": m["role"], "content": content})
        try:
            text = proc.apply_chat_template(hf_messages, add_generation_prompt=True)
            merge = ip.merge_size ** 2
            counts = [np.asarray([int(np.prod(v.grid_thw)) // merge for v in items], np.int64)
                      for items in (images, videos)]
            ids = proc._expand(proc.tokenizer.encode_batch([text]), *counts)[0]
        except InputError as e:
            raise ApiError(400, str(e), "messages") from None
        return ids.astype(np.int32), images, videos

    @staticmethod
    def _vision(fn, where: str):
        try:
            return fn()
        except InputError as e:
            raise ApiError(400, f"{where}: {e}", where) from None

    def generation_config(self, parsed: Parsed, prompt_tokens: int):
        room = self.batcher.slots.max_context - prompt_tokens
        max_tokens = parsed.max_tokens
        if max_tokens is None:
            if room < 1:
                raise ApiError(400, f"the prompt ({prompt_tokens} tokens) fills the context of "
                                    f"{self.batcher.slots.max_context} tokens", "messages")
            max_tokens = min(self.settings.default_max_tokens, room)
        elif max_tokens > room:
            raise ApiError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is over the "
                                f"context of {self.batcher.slots.max_context} tokens", "max_tokens")
        try:
            return self.model.generation_settings(max_new_tokens=max_tokens, eos_token_ids=self.eos_ids,
                                                  **parsed.settings)
        except InputError as e:
            raise ApiError(400, str(e)) from None


# ---------------------------------------------------------------------------- the app
def create_app(service: Service):
    """The Starlette app; its lifespan starts and stops the batcher."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request as HttpRequest
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    settings, metrics = service.settings, service.metrics

    def error_response(e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    def check_key(request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not token:
            raise ApiError(401, "missing API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")
        if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    async def read_body(request) -> Any:
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body ({declared} bytes) is over the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None

    async def models(request):
        check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": settings.model_name, "object": "model", "created": service.created, "owned_by": "qwen2vl-jax",
             "max_model_len": service.batcher.slots.max_context}]})

    async def health(request):
        return JSONResponse({"status": "ok", "active_slots": service.batcher.active_slots,
                             "queue_depth": service.batcher.queue_depth})

    async def metrics_endpoint(request):
        return PlainTextResponse(metrics.render(service.batcher), media_type="text/plain; version=0.0.4")

    async def chat_completions(request: HttpRequest):
        check_key(request)
        parsed = parse_body(await read_body(request), settings)
        arrived = time.perf_counter()
        ids, images, videos = await asyncio.to_thread(service.prepare, parsed)
        gc = service.generation_config(parsed, len(ids))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event) -> None:  # from the batcher's thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
                loop.call_soon_threadsafe(events.put_nowait, event)

        from qwen2vl_jax.batching import QueueFull, Request

        job = Request(ids, images, videos, gc, emit, ignore_eos=parsed.ignore_eos)
        try:
            service.batcher.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", code="queue_full") from None
        metrics.prompt_tokens += len(ids)
        reply = _Reply(service, parsed, job, events, arrived, len(ids))
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        if parsed.stream:
            return StreamingResponse(reply.sse(watcher), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return JSONResponse(await reply.whole())
        finally:
            watcher.cancel()
            job.cancel()

    async def on_api_error(request, exc: ApiError):
        return error_response(exc)

    async def on_input_error(request, exc: InputError):
        return error_response(ApiError(400, str(exc)))

    async def on_http_error(request, exc: HTTPException):
        status = exc.status_code
        return error_response(ApiError(status, str(exc.detail) if exc.detail else "not found"))

    async def on_error(request, exc: Exception):
        log.exception("unexpected error")
        return JSONResponse({"error": {"message": f"internal error: {type(exc).__name__}: {exc}",
                                       "type": "server_error", "param": None, "code": None}}, status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        try:
            yield
        finally:
            service.batcher.close()

    app = Starlette(
        routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                Route("/v1/models", models, methods=["GET"]),
                Route("/health", health, methods=["GET"]),
                Route("/metrics", metrics_endpoint, methods=["GET"])],
        exception_handlers={ApiError: on_api_error, InputError: on_input_error, HTTPException: on_http_error, Exception: on_error},
        lifespan=lifespan,
    )
    return _CountStatus(app, metrics)


class _CountStatus:
    """ASGI wrapper counting the status of every chat completion in the metrics."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status = int(message["status"])
                self.metrics.requests[status] = self.metrics.requests.get(status, 0) + 1
            await send(message)

        return await self.app(scope, receive, counting_send)


async def _watch_disconnect(request, job) -> None:
    """Cancels the job when the client goes away (uvicorn answers receive() with
    http.disconnect once the body is read and the connection closes)."""
    with contextlib.suppress(Exception):
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return


class _Reply:
    """Turns a job's events into the reply: text with stop strings applied, usage, timings."""

    def __init__(self, service: Service, parsed: Parsed, job, events: asyncio.Queue, arrived: float, prompt_tokens: int):
        self.service, self.parsed, self.job, self.events = service, parsed, job, events
        self.arrived, self.prompt_tokens = arrived, prompt_tokens
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.ids: list[int] = []  # every generated token, the EOS included
        self.text_ids: list[int] = []  # the tokens that make the text
        self.text = ""
        self.sent = 0  # characters of self.text already streamed
        self.finish: str | None = None
        self.last = None
        self.deadline = arrived + service.settings.request_timeout
        self.streamed_ids = 0  # tokens already streamed (return_token_ids)

    # ------------------------------------------------------------ events
    async def _next(self):
        remaining = self.deadline - time.perf_counter()
        try:
            return await asyncio.wait_for(self.events.get(), max(remaining, 0.001))
        except asyncio.TimeoutError:
            self.job.cancel()
            raise ApiError(504, f"the request took longer than the server's limit of "
                                f"{self.service.settings.request_timeout:g} s (--request-timeout)",
                           code="timeout") from None

    def _take(self, event) -> None:
        """Applies one event: a token (text, stop strings) and/or the end."""
        metrics = self.service.metrics
        now = time.perf_counter()
        if event.finish == "error":
            raise ApiError(400, event.message or "the request failed")
        if event.finish == "cancelled":
            raise ApiError(499, "the request was cancelled")
        if event.token is not None:
            if self.last is None:
                metrics.ttft.observe(now - self.arrived)
            else:
                metrics.per_token.observe(now - self.last)
            self.last = now
            metrics.generated_tokens += 1
            self.ids.append(event.token)
            if event.finish != "stop":  # an EOS ends the text without being part of it
                self.text_ids.append(event.token)
                self.text = self.service.processor.decode(self.text_ids, skip_special_tokens=True)
                if self._apply_stop():
                    return
        if event.finish is not None:
            self.finish = event.finish

    def _apply_stop(self) -> bool:
        for s in self.parsed.stop:
            at = self.text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.text = self.text[:at]
                self.finish = "stop"
                self.job.cancel()
                return True
        return False

    def _ready_text(self) -> str:
        """New text safe to send: all of it once finished, else what cannot still turn out to
        be the start of a stop string or an incomplete character."""
        end = len(self.text)
        if self.finish is None:
            if self.text.endswith("\ufffd"):
                end = len(self.text.rstrip("\ufffd"))
            if self.parsed.stop:
                end = min(end, len(self.text) - max(len(s) for s in self.parsed.stop) + 1)
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out

    def usage(self) -> dict:
        n = len(self.ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    # ------------------------------------------------------------ whole replies
    async def whole(self) -> dict:
        while self.finish is None:
            self._take(await self._next())
        choice = {"index": 0, "message": {"role": "assistant", "content": self.text},
                  "finish_reason": self.finish, "logprobs": None}
        if self.parsed.return_token_ids:
            choice["token_ids"] = list(self.ids)
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.service.settings.model_name, "choices": [choice], "usage": self.usage()}

    # ------------------------------------------------------------ streams
    def _chunk(self, delta: dict, finish: str | None = None, token_ids: list[int] | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.service.settings.model_name, "choices": [choice]}
        if self.parsed.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def sse(self, watcher):
        want_ids = self.parsed.return_token_ids
        try:
            yield self._chunk({"role": "assistant", "content": ""}, token_ids=[] if want_ids else None)
            while self.finish is None:
                try:
                    self._take(await self._next())
                except ApiError as e:
                    if e.status == 499:  # the client is gone: nothing to send to
                        return
                    yield f"data: {json.dumps(e.body())}\n\n"
                    break
                new_ids = self.ids[self.streamed_ids:] if want_ids else None
                self.streamed_ids = len(self.ids)
                text = self._ready_text()
                if text or new_ids:
                    yield self._chunk({"content": text}, token_ids=new_ids)
            if self.finish is not None:
                yield self._chunk({}, self.finish)
                if self.parsed.include_usage:
                    body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                            "model": self.service.settings.model_name, "choices": [], "usage": self.usage()}
                    yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            self.job.cancel()


# ---------------------------------------------------------------------------- building it
def build_service(model, processor, *, max_batch: int = 16, max_context: int | None = None,
                  settings: Settings | None = None, vision_cache_entries: int = 256, warm_up: bool = True) -> Service:
    """A Service over a loaded model: its SlotEngine and Batcher (not started), warmed up."""
    from qwen2vl_jax.batching import Batcher, SlotEngine, VisionCache

    settings = settings or Settings()
    slots = SlotEngine(model.engine, max_batch=max_batch, max_context=max_context)
    batcher = Batcher(slots, model.params, max_queue=settings.max_queue,
                      vision_cache=VisionCache(max_entries=vision_cache_entries))
    if warm_up:
        batcher.warm_up()
    return Service(model, processor, batcher, settings)


class ServerThread:
    """uvicorn serving `app` on an already bound localhost socket, in a background thread
    (tests, benchmarks, notebooks): `with ServerThread(app) as url: ...`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


# ---------------------------------------------------------------------------- the command line
def build_parser() -> argparse.ArgumentParser:
    have_default = (DEFAULT_MODEL / "config.json").is_file()
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Serve Qwen2-VL (JAX) over the OpenAI chat API, with continuous batching.",
        epilog="Endpoints: POST /v1/chat/completions, GET /v1/models, /health, /metrics. Images come as "
               "image_url parts (base64 data: URIs; file:// inside --media-dir; http(s) with "
               "--allow-remote-media), videos as video_url parts naming files inside --media-dir.")
    p.add_argument("--model", required=not have_default, default=str(DEFAULT_MODEL) if have_default else None,
                   help="a model folder (converted by qwen2vl-convert, or an HF checkpoint with tokenizer files)"
                        + ("; default: the small demo model shipped with the package" if have_default else ""))
    p.add_argument("--served-model-name", default=None, help="the model id the API reports (default: the folder name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--mesh", default=None, metavar="data=D,fsdp=F,tensor=T",
                   help="shard over a device mesh (axes left out are 1; data takes the rest)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
    p.add_argument("--matmul", choices=["f32", "bf16"], default=None,
                   help="products of 64 rows or more (vision tower, prefill): f32, or bf16 inputs with f32 "
                        "accumulation, about 2x faster on CPUs with bf16 dot instructions "
                        "(default: $QWEN2VL_MATMUL, else f32)")
    p.add_argument("--scan-layers", action="store_true",
                   help="run the decoder's layers as one scanned layer: compiling no longer grows with depth "
                        "(72B compiles about as fast as 2B), for large models on accelerators")
    p.add_argument("--max-batch", type=int, default=16, help="decode slots: requests decoded together (default 16)")
    p.add_argument("--max-context", type=int, default=None,
                   help="cache slots per request: prompt + generated tokens (default: the model's context, at most 4096)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get 429 (default 64)")
    p.add_argument("--min-pixels", type=int, default=None, help="resize smaller images up to this many pixels")
    p.add_argument("--max-pixels", type=int, default=None, help="resize larger images down to this many pixels")
    p.add_argument("--max-image-pixels", type=int, default=Settings.max_image_pixels,
                   help="refuse images larger than this before decoding them (default %(default)s)")
    p.add_argument("--max-video-frames", type=int, default=None, help="sample at most this many frames per video")
    p.add_argument("--max-images", type=int, default=8, help="images allowed in one request (default 8)")
    p.add_argument("--max-tokens", type=int, default=Settings.default_max_tokens,
                   help="max_tokens when a request gives none (default %(default)s, capped by the context)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take (default 600)")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body in MiB (default 64)")
    p.add_argument("--vision-cache", type=int, default=256, help="images whose features are cached (default 256; 0: off)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    p.add_argument("--media-dir", default=None, help="folder that file:// images and videos may come from")
    p.add_argument("--allow-remote-media", action="store_true", help="let image_url parts fetch http(s) URLs")
    distributed.add_arguments(p)
    return p


def _check_args(args) -> None:
    if not Path(args.model).is_dir():
        raise InputError(f"--model {args.model}: no such folder")
    if args.media_dir is not None and not Path(args.media_dir).is_dir():
        raise InputError(f"--media-dir {args.media_dir}: no such folder")
    for flag, value, lo in (("--port", args.port, 0), ("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                            ("--max-images", args.max_images, 0), ("--max-tokens", args.max_tokens, 1),
                            ("--max-image-pixels", args.max_image_pixels, 1), ("--vision-cache", args.vision_cache, 0)):
        if value < lo:
            raise InputError(f"{flag} must be at least {lo} (got {value})")
    if args.port > 65535:
        raise InputError(f"--port must be at most 65535 (got {args.port})")
    if not args.request_timeout > 0 or not args.max_body_mb > 0:
        raise InputError("--request-timeout and --max-body-mb must be positive")
    if args.max_video_frames is not None and args.max_video_frames < 2:
        raise InputError(f"--max-video-frames must be at least 2 (got {args.max_video_frames})")


def _run(args) -> int:
    shell.quiet_libraries()
    _check_args(args)
    distributed.enable_compile_cache(args)
    multi = distributed.initialize(args)
    from qwen2vl_jax.sharding import make_mesh

    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise InputError("serving needs starlette and uvicorn: pip install 'qwen2vl-jax[serve]'") from None

    from qwen2vl_jax.api import Qwen2VL
    from qwen2vl_jax.processing import Processor

    t0 = time.perf_counter()
    mesh = make_mesh(args.mesh) if args.mesh else None
    processor = Processor.from_pretrained(args.model, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    model = Qwen2VL.from_pretrained(args.model, dtype=args.dtype, mesh=mesh, matmul=args.matmul,
                                    scan_layers=args.scan_layers)
    name = args.served_model_name or Path(args.model).resolve().name
    settings = Settings(model_name=name, api_key=args.api_key,
                        media_dir=Path(args.media_dir).resolve() if args.media_dir else None,
                        allow_remote_media=args.allow_remote_media, max_images=args.max_images,
                        max_video_frames=args.max_video_frames, max_image_pixels=args.max_image_pixels,
                        max_body_bytes=int(args.max_body_mb * 1024 * 1024), request_timeout=args.request_timeout,
                        max_queue=args.max_queue, default_max_tokens=args.max_tokens)
    service = build_service(model, processor, max_batch=args.max_batch, max_context=args.max_context,
                            settings=settings, vision_cache_entries=args.vision_cache)
    if multi:
        from qwen2vl_jax.batching import Lockstep

        if not distributed.is_leader():  # replay process 0's device calls until it stops
            import jax

            print(f"{PROG}: process {jax.process_index()} ready, following process 0", file=sys.stderr, flush=True)
            service.batcher.slots.follow(model.params)
            return 0
        service.batcher.slots.lockstep = Lockstep()
    print(f"{PROG}: {name} ready in {time.perf_counter() - t0:.1f} s: {args.max_batch} slots of "
          f"{service.batcher.slots.max_context} tokens, http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    server = _server_class()(uvicorn.Config(create_app(service), host=args.host, port=args.port, log_level="warning"))
    server.run()
    if not server.started:
        raise InputError(f"cannot listen on {args.host}:{args.port} (in use, or not an address of this machine)")
    print(f"{PROG}: stopped", file=sys.stderr, flush=True)
    return 0


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, stopped by Ctrl-C or SIGTERM as a normal end: uvicorn shuts down
        gracefully and would then raise the signal again, which the shell would report as an
        interruption after the shutdown already happened."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                getattr(self, "_captured_signals", []).clear()

    return Server


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return shell.run(PROG, lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())

"""The Starlette app over a `Service`, the service built over a loaded model, and a thread that
serves the app on a local socket (tests, benchmarks, notebooks)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from typing import Any

from qwen2vl_jax.errors import InputError
from qwen2vl_jax.serving.metrics import Metrics
from qwen2vl_jax.serving.prompts import Service
from qwen2vl_jax.serving.schema import parse_body
from qwen2vl_jax.serving.settings import ApiError, Settings
from qwen2vl_jax.serving.stream import Reply, watch_disconnect

log = logging.getLogger(__name__)


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
             "max_model_len": service.max_context}]})

    async def health(request):
        alive = batcher_alive(service.batcher)
        return JSONResponse({"status": "ok" if alive else "the batcher thread has stopped",
                             "active_slots": service.batcher.active_slots,
                             "queue_depth": service.batcher.queue_depth,
                             "preprocessing": service.preprocessor.pending}, status_code=200 if alive else 503)

    async def metrics_endpoint(request):
        return PlainTextResponse(metrics.render(service.batcher), media_type="text/plain; version=0.0.4")

    async def chat_completions(request: HttpRequest):
        arrived = time.perf_counter()  # the deadline counts from here: reading, preprocessing, generating
        check_key(request)
        parsed = parse_body(await read_body(request), settings)
        ids, images, videos = await service.preprocess(parsed, arrived, gone=client_gone(request))
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
        reply = Reply(service, parsed, job, events, arrived, len(ids))
        watcher = asyncio.create_task(watch_disconnect(request, job))
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
            service.preprocessor.close()
            service.batcher.close()

    app = Starlette(
        routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                Route("/v1/models", models, methods=["GET"]),
                Route("/health", health, methods=["GET"]),
                Route("/metrics", metrics_endpoint, methods=["GET"])],
        exception_handlers={ApiError: on_api_error, InputError: on_input_error, HTTPException: on_http_error, Exception: on_error},
        lifespan=lifespan,
    )
    return CountStatus(app, metrics)


def client_gone(request):
    """A coroutine function that returns when the client disconnects (uvicorn answers receive()
    with http.disconnect once the body is read and the connection closes)."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait


def batcher_alive(batcher) -> bool:
    """Whether the batcher's thread runs (or has not been started yet)."""
    alive = getattr(batcher, "alive", None)
    if alive is not None:
        return bool(alive)
    thread = getattr(batcher, "_thread", None)
    return thread is None or thread.is_alive()


class CountStatus:
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

# ---------------------------------------------------------------------------- building it
def build_service(model, processor, *, max_batch: int = 16, max_context: int | None = None,
                  settings: Settings | None = None, vision_cache_entries: int = 256, warm_up: bool = True,
                  warm_up_vision: bool = True, progress=None) -> Service:
    """A Service over a loaded model: its SlotEngine and Batcher (not started), warmed up
    (`progress`: called with a line per warm-up stage, e.g. print)."""
    from qwen2vl_jax.batching import Batcher, SlotEngine, VisionCache

    settings = settings or Settings()
    slots = SlotEngine(model.engine, max_batch=max_batch, max_context=max_context)
    batcher = Batcher(slots, model.params, max_queue=settings.max_queue,
                      vision_cache=VisionCache(max_entries=vision_cache_entries))
    if warm_up:
        from qwen2vl_jax.serving.warmup import warm_up as warm

        warm(batcher, processor, progress=progress, vision=warm_up_vision)
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

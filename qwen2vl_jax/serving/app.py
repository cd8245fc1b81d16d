"""The Starlette app over a `Service`, the service built over a loaded model, and a thread that
serves the app on a local socket (tests, benchmarks, notebooks)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import logging
import threading
import time
from typing import Any

from qwen2vl_jax.errors import InputError
from qwen2vl_jax.serving import page
from qwen2vl_jax.serving.metrics import Metrics
from qwen2vl_jax.serving.prompts import Service
from qwen2vl_jax.serving.schema import check_model, load_json, parse_body, parse_completion_body, quote
from qwen2vl_jax.serving.settings import ApiError, Settings
from qwen2vl_jax.serving.stream import Reply, watch_disconnect

log = logging.getLogger(__name__)
access_log = logging.getLogger("qwen2vl_jax.serving.access")


# ---------------------------------------------------------------------------- the app
def create_app(service: Service):
    """The Starlette app; its lifespan starts and stops the batcher."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request as HttpRequest
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    settings, metrics = service.settings, service.metrics

    def error_response(e: ApiError, headers=None):
        return api_error_response(e, headers)

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
        return load_json(b"".join(chunks))

    async def models(request):
        check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": service.created, "owned_by": "qwen2vl-jax",
             "max_model_len": service.max_context} for name in (settings.model_name, *settings.model_aliases)]})

    async def health(request):
        alive = batcher_alive(service.batcher)
        return JSONResponse({"status": "ok" if alive else "the batcher thread has stopped",
                             "active_slots": service.batcher.active_slots,
                             "queue_depth": service.batcher.queue_depth,
                             "preprocessing": service.preprocessor.pending}, status_code=200 if alive else 503)

    async def metrics_endpoint(request):
        return PlainTextResponse(metrics.render(service.batcher), media_type="text/plain; version=0.0.4")

    async def chat_completions(request: HttpRequest):
        return await complete(request, parse_body)

    async def completions(request: HttpRequest):
        vocab = service.model.config.text.vocab_size
        return await complete(request, lambda body, settings: parse_completion_body(body, settings, vocab))

    async def complete(request: HttpRequest, parse):
        arrived = time.perf_counter()  # the deadline counts from here: reading, preprocessing, generating
        check_key(request)
        body = await read_body(request)
        if isinstance(body, dict):
            check_model(body, settings)  # an unknown model is a 404 before any 400 about the fields
        parsed = parse(body, settings)
        ids, images, videos, sizes = await service.preprocess(parsed, arrived, gone=client_gone(request))
        generation = service.generation_config(parsed, len(ids))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event) -> None:  # from the batcher's thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
                loop.call_soon_threadsafe(events.put_nowait, event)

        from qwen2vl_jax.serving.scheduler import QueueFull, Request

        grammar = service.grammar(parsed)
        # a grammar ends its rows on EOS once complete, ignore_eos or not
        job = Request(ids, images, videos, generation, emit, ignore_eos=parsed.ignore_eos and grammar is None,
                      choices=parsed.n, top_logprobs=parsed.top_logprobs, grammar=grammar)
        try:
            service.batcher.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", code="queue_full") from None
        metrics.prompt_tokens += len(ids)
        reply = Reply(service, parsed, job, events, arrived, len(ids), image_sizes=sizes,
                      tool_parser=service.tool_parser(parsed))
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
        message = {404: f"no such endpoint: {quote(request.url.path)}",
                   405: f"{quote(request.method)} is not allowed on {quote(request.url.path)}"}.get(status)
        return error_response(ApiError(status, message or str(exc.detail)), exc.headers)

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
                Route("/v1/completions", completions, methods=["POST"]),
                Route("/v1/models", models, methods=["GET"]),
                Route("/health", health, methods=["GET"]),
                Route("/metrics", metrics_endpoint, methods=["GET"]),
                *page.routes()],  # the chat page at /
        # No handler for Exception: Starlette gives that one to its outermost middleware, which
        # re-raises after answering and so ends the connection; CatchAll answers and returns.
        exception_handlers={ApiError: on_api_error, InputError: on_input_error, HTTPException: on_http_error},
        middleware=[Middleware(CatchAll)],
        lifespan=lifespan,
    )
    if settings.allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        app = CORSMiddleware(app, allow_origins=list(settings.allowed_origins), allow_methods=["GET", "POST"],
                             allow_headers=["authorization", "content-type"])
    app = CountStatus(Guard(app, settings), metrics)
    app = AccessLog(app) if settings.access_log else app
    app.settings = settings  # for ServerThread's connection limits
    return app


def api_error_response(e: ApiError, headers=None):
    """The error object as a response. Its JSON is ASCII: a message quoting what a client sent
    stays encodable even when that held a lone surrogate."""
    from starlette.responses import Response

    return Response(json.dumps(e.body()), status_code=e.status, headers=headers, media_type="application/json")


# ---------------------------------------------------------------------------- ASGI wrappers
class CatchAll:
    """Inside Starlette's middleware: a fault in the server (an exception no handler maps to an
    ApiError) becomes a 500 with a generic message, the details going to the log, and the call
    returns normally so that the connection is kept. A client that left is not an error."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        from starlette.requests import ClientDisconnect

        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            return
        except Exception:
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            if not started:  # else the reply is cut short: uvicorn closes the connection
                await api_error_response(ApiError(500, "internal error"))(scope, receive, send)


class Guard:
    """What a request must carry before anything reads it: a Host this server answers to
    (a web page that rebinds its own name to 127.0.0.1 still sends that name), no Origin
    unless --allowed-origins lists it or it is this server's own chat page under a Host check
    (a browser sends Origin on every cross-site POST, and on its own page's POSTs), and a
    JSON content type on POST (a page may send text/plain without asking the server first)."""

    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings
        hosts = settings.allowed_hosts
        self.hosts = None if hosts is None or "*" in hosts else {_host_name(h) for h in hosts}
        self.origins = None if "*" in settings.allowed_origins else set(settings.allowed_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            error = self.check(scope)
            if error is not None:
                return await api_error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)

    def check(self, scope) -> ApiError | None:
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        if self.hosts is not None and _host_name(headers.get("host", "")) not in self.hosts:
            return ApiError(400, f"the Host header {quote(headers.get('host', ''))} is not a name of this server "
                                 "(--allowed-hosts)", code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and self.origins is not None and origin not in self.origins \
                and not (self.hosts is not None and _same_origin(origin, headers.get("host", ""))):
            return ApiError(403, f"requests from the web page {quote(origin)} are refused (--allowed-origins lists "
                                 "the pages allowed)", code="origin_not_allowed")
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return ApiError(415, f"the request body must be sent as 'Content-Type: application/json' "
                                     f"(got {quote(kind) if kind else 'none'})", code="unsupported_media_type")
        return None


def _same_origin(origin: str, host: str) -> bool:
    """Whether a browser's Origin is this server's own page (the chat page at /): its host and
    port are the Host the request was sent to. Trusted only when the Host check is on: a page
    that rebinds its own name to this server is same-origin with itself too."""
    scheme, sep, rest = origin.partition("://")
    return bool(sep) and scheme in ("http", "https") and bool(host) and rest.lower() == host.strip().lower()


def _host_name(host: str) -> str:
    """'Example.com:8000' -> 'example.com', '[::1]:8000' and '[::1]' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class AccessLog:
    """One line per request on the access logger: client, method, path, status, milliseconds
    (until the last byte of the reply, streams included)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), None

        async def logging_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, logging_send)
        finally:
            client = scope.get("client")
            access_log.info('%s "%s %s" %s %.1f ms', f"{client[0]}:{client[1]}" if client else "-",
                            scope["method"], scope["path"], status or "-", (time.perf_counter() - start) * 1e3)


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
        if scope["type"] != "http" or scope["path"] not in ("/v1/chat/completions", "/v1/completions"):
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
                  warm_up_vision: bool = True, warm_up_grammar: bool = False, progress=None,
                  prefill_chunk: int = 0, prefix_cache_gb: float = 0.0) -> Service:
    """A Service over a loaded model: its decode slots and Batcher (not started), warmed up
    (`progress`: called with a line per warm-up stage, e.g. print). warm_up_grammar: also compile
    the programs structured output runs and build the grammar engine (beside the compiles), so the
    first request with a response_format or forced tool call waits for neither; it needs
    llguidance and is skipped without it. prefill_chunk: prompt tokens written per iteration
    between decode steps (0: whole prompts); prefix_cache_gb: memory for reused prompt prefixes
    (0: off)."""
    from qwen2vl_jax.serving.prefix_cache import BLOCK, PrefixCache
    from qwen2vl_jax.serving.scheduler import Batcher, VisionCache
    from qwen2vl_jax.serving.slots import Slots

    settings = settings or Settings()
    slots = Slots(model.engine, max_batch=max_batch, max_context=max_context)
    prefix_cache = None
    if prefix_cache_gb > 0:  # its pool is made a segment (a row's worth of blocks) at a time, as prompts fill it
        prefix_cache = PrefixCache(int(prefix_cache_gb * 2**30), slots.block_nbytes(BLOCK),
                                   segment=max(1, slots.max_context // BLOCK))
    batcher = Batcher(slots, model.params, max_queue=settings.max_queue,
                      vision_cache=VisionCache(max_entries=vision_cache_entries), prefill_chunk=prefill_chunk,
                      prefix_cache=prefix_cache)
    service = Service(model, processor, batcher, settings)
    if warm_up:
        from qwen2vl_jax.serving import grammar
        from qwen2vl_jax.serving.warmup import warm_up as warm

        engine = None
        if warm_up_grammar and grammar.llguidance is not None:  # built on a thread while the programs compile
            engine = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qwen2vl-grammar")
            built = engine.submit(service.grammars)
        words = grammar.mask_words(model.config.text.vocab_size) if engine is not None else 0
        warm(batcher, processor, progress=progress, vision=warm_up_vision, mask_words=words)
        if engine is not None:
            built.result()
            engine.shutdown()
    return service


class ServerThread:
    """uvicorn serving `app` on an already bound localhost socket, in a background thread
    (tests, benchmarks, notebooks): `with ServerThread(app) as url: ...`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        from qwen2vl_jax.serving.connections import bind, uvicorn_config

        self.sock = bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        settings = getattr(app, "settings", None) or Settings()
        self.server = uvicorn.Server(uvicorn_config(app, settings, timeout_graceful_shutdown=5))
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

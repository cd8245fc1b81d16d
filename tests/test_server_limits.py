"""qwen2vl-serve's bounded work per request (serving.prompts, .preprocess, .media, .remote, .warmup).

One real server on a free localhost port over the demo model (small context, no warm-up), driven
with httpx. Settings that a case needs (a short deadline, remote media) are swapped on the service
for that case. Remote media go to an HTTP server on 127.0.0.1 standing for the inside of the
network; host names are made to resolve where a case needs through a patched socket.getaddrinfo,
and a "public" address is routed to that local server through a patched socket.create_connection.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.server
import io
import socket
import struct
import threading
import time
import types
import zlib

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

MAX_CONTEXT = 256
PUBLIC = "93.184.216.34"  # a global address the tests route to the local server


# ---------------------------------------------------------------------------- helpers
def png(h: int, w: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(out, "PNG")
    return out.getvalue()


def png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels (no pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_msg(*urls: str, text: str = "What is it?") -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                         {"type": "text", "text": text}]}]


@dataclasses.dataclass
class Served:
    url: str
    service: object

    def post(self, body, timeout: float = 60):
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=timeout)

    @contextlib.contextmanager
    def settings(self, **changes):
        old = self.service.settings
        self.service.settings = dataclasses.replace(old, **changes)
        try:
            yield
        finally:
            self.service.settings = old


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from qwen2vl_jax import Qwen2VL
    from qwen2vl_jax.config import DEMO_DIR
    from qwen2vl_jax.processing import Processor
    from qwen2vl_jax.serving.app import ServerThread, build_service, create_app
    from qwen2vl_jax.serving.settings import Settings

    if not (DEMO_DIR / "config.json").is_file():
        pytest.skip("the demo model is not shipped in this checkout")
    media = tmp_path_factory.mktemp("media")
    settings = Settings(media_dir=media, max_images=4, max_body_bytes=3 << 20, preprocess_workers=1,
                        request_timeout=60)
    service = build_service(Qwen2VL.from_pretrained(DEMO_DIR, dtype="float32"), Processor.from_pretrained(DEMO_DIR),
                            max_batch=2, max_context=MAX_CONTEXT, settings=settings, warm_up=False)
    server = ServerThread(create_app(service))
    url = server.__enter__()
    served = Served(url, service)
    # compiles what a short text and a small image request run, once for the module
    assert served.post({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).status_code == 200
    yield served
    server.__exit__(None, None, None)


class Origin(http.server.BaseHTTPRequestHandler):
    """The local server behind the remote-media cases."""

    image = b""

    def do_GET(self):  # noqa: N802 - http.server's name
        path = self.path
        if path == "/img.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.image)))
            self.end_headers()
            self.wfile.write(self.image)
        elif path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", path.split("?to=", 1)[1])
            self.end_headers()
        elif path == "/slow":
            self.send_response(200)
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
        else:
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b"secret")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def origin():
    Origin.image = png(56, 56)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture
def dns(monkeypatch):
    """Names -> addresses for getaddrinfo, and PUBLIC routed to 127.0.0.1."""
    names: dict[str, str] = {}
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.create_connection

    def getaddrinfo(host, port, *args, **kw):
        if host in names:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (names[host], port))]
        return real_getaddrinfo(host, port, *args, **kw)

    def create_connection(address, *args, **kw):
        host, port = address
        return real_connect(("127.0.0.1" if host == PUBLIC else host, port), *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    return names


# ---------------------------------------------------------------------------- the prompt's size
def test_huge_text_is_refused_from_its_size(served, monkeypatch):
    tok = served.service.processor.tokenizer
    longest = []
    real_encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text: (longest.append(len(text)), real_encode(text))[1])
    t0 = time.perf_counter()
    r = served.post({"messages": [{"role": "user", "content": "lorem ipsum " * 170_000}]})  # 2 MB
    assert r.status_code == 400 and "characters" in r.json()["error"]["message"]
    assert time.perf_counter() - t0 < 5
    assert not longest  # refused before any tokenizing
    # under the character bound but over the context: counted in pieces (small ones here, for
    # the demo's small context), stopping once over the room
    from qwen2vl_jax.serving import prompts

    monkeypatch.setattr(prompts, "COUNT_CHARS", 256)
    text = "a b " * (served.service.max_chars // 4 - 10)
    r = served.post({"messages": [{"role": "user", "content": text}]})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"], r.text
    assert longest and max(longest) <= 256 and sum(longest) < len(text) // 2
    r = served.post({"messages": [{"role": "user", "content": "hi"}] * (MAX_CONTEXT + 1)})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]


def test_text_requests_pass_image_work_and_queue_counts_preprocessing(served, monkeypatch):
    service = served.service
    release, started, stopped = threading.Event(), threading.Event(), threading.Event()
    stopped_at = []

    def slow_image(data, ticket, *budget):  # stands for a long decode: waits until released or stopped
        started.set()
        while not release.is_set():
            if ticket.stopped:
                stopped_at.append(time.perf_counter())
                stopped.set()
                ticket.check()
            time.sleep(0.01)
        return type(service)._image(service, data, ticket, *budget)

    monkeypatch.setattr(service, "_image", slow_image)
    monkeypatch.setattr(service.preprocessor, "max_queue", 2)
    body = {"messages": image_msg(uri(png(56, 56))), "max_tokens": 1}
    t0 = time.perf_counter()
    with served.settings(request_timeout=2.0), concurrent_posts(served, [body, body]) as pending:
        assert started.wait(10)
        time.sleep(0.2)  # the second image request is now waiting for the one media thread
        r = served.post(body)  # a third: the queue (2) is full of requests still preprocessing
        assert r.status_code == 429, r.text
        service.preprocessor.max_queue = 3
        t1 = time.perf_counter()
        r = served.post({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        assert r.status_code == 200, r.text  # the text lane is free while the media thread is taken
        assert time.perf_counter() - t1 < 1.5
        results = [f.result() for f in pending]
    # both image requests ended at their deadline, and the running one stopped its work there
    assert [s for s, _ in results] == [504, 504], results
    assert all(took < 3 for _, took in results), results
    # the worker thread may see the stop a moment after the client got its 504: wait for it to
    # look, then check when it stopped
    assert stopped.wait(5) and stopped_at[0] - t0 < 3
    release.set()


@contextlib.contextmanager
def concurrent_posts(served, bodies):
    import concurrent.futures

    def post(body):
        t0 = time.perf_counter()
        r = served.post(body)
        return r.status_code, time.perf_counter() - t0

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        yield [pool.submit(post, b) for b in bodies]


def test_deadline_stops_real_image_work(served):
    big = png(3000, 3000)
    body = {"messages": image_msg(*[uri(big)] * 4), "max_tokens": 1}
    body = {"messages": image_msg(*[uri(big)] * 8), "max_tokens": 1}
    with served.settings(request_timeout=0.5, max_image_pixels=3000 * 3000, max_images=8):
        t0 = time.perf_counter()
        r = served.post(body)
        took = time.perf_counter() - t0
    assert r.status_code == 504 and "--request-timeout" in r.json()["error"]["message"]
    assert took < 3
    end = time.monotonic() + 10  # the abandoned work lets go of its place soon after
    while served.service.preprocessor.pending and time.monotonic() < end:
        time.sleep(0.05)
    assert served.service.preprocessor.pending == 0


def test_disconnect_stops_preprocessing(served, monkeypatch):
    service = served.service
    seen = []

    def slow_image(data, ticket, *budget):
        while not ticket.stopped:
            time.sleep(0.01)
        seen.append((time.perf_counter(), ticket.error().status))
        ticket.check()

    monkeypatch.setattr(service, "_image", slow_image)
    body = {"messages": image_msg(uri(png(56, 56))), "max_tokens": 1}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=1.0)
    left = time.perf_counter()
    end = time.monotonic() + 5
    while not seen and time.monotonic() < end:
        time.sleep(0.02)
    assert seen and seen[0][1] == 499 and seen[0][0] - left < 1.0


# ---------------------------------------------------------------------------- media
def test_paths_and_quotes_are_bounded(served):
    t0 = time.perf_counter()
    path = str(served.service.settings.media_dir) + "/a" * 150_000
    r = served.post({"messages": image_msg("file://" + path)})
    assert r.status_code == 400 and "too long" in r.json()["error"]["message"]
    assert time.perf_counter() - t0 < 2 and len(r.text) < 400
    r = served.post({"messages": image_msg("file:///etc/" + "x" * 5000)})
    assert r.status_code in (400, 403) and len(r.text) < 400
    r = served.post({"messages": image_msg("file:///etc/passwd\x00x")})
    assert r.status_code in (400, 403), r.text
    r = served.post({"messages": image_msg("data:image/png;base64," + "!" * 100_000)})
    assert r.status_code == 400 and len(r.text) < 400


def test_decompression_bomb_is_too_large_and_videos_count(served):
    r = served.post({"messages": image_msg(uri(png_header(50000, 50000)))})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "too many pixels" in message and "corrupt" not in message
    video = {"type": "video_url", "video_url": {"url": "file:///nowhere.mp4"}}
    parts = [{"type": "image_url", "image_url": {"url": uri(png(56, 56))}}] * 4 + [video]
    r = served.post({"messages": [{"role": "user", "content": parts}]})
    assert r.status_code == 400 and "videos" in r.json()["error"]["message"], r.text


def test_remote_media_stays_off_the_inside(served, origin, dns):
    base = f"http://127.0.0.1:{origin}"
    dns["inside.example"] = "127.0.0.1"
    dns["public.example"] = PUBLIC
    dns["images.example"] = PUBLIC

    def ask(url, **changes):
        with served.settings(allow_remote_media=True, **changes):
            return served.post({"messages": image_msg(url), "max_tokens": 1}, timeout=60)

    for url in (f"{base}/img.png", f"http://inside.example:{origin}/img.png", f"http://[::ffff:127.0.0.1]:{origin}/x",
                f"http://public.example:{origin}/redirect?to={base}/img.png"):
        r = ask(url)
        assert r.status_code == 403 and "--allow-private-media" in r.json()["error"]["message"], (url, r.text)
    # a public address is fetched, through the address that was checked
    assert ask(f"http://public.example:{origin}/img.png").status_code == 200
    assert ask(f"http://inside.example:{origin}/img.png", allow_private_media=True).status_code == 200
    # why a fetch failed stays in the log
    for url in (f"http://public.example:{origin}/secret", f"http://public.example:{free_port()}/img.png"):
        r = ask(url)
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and message == f"messages[0].content[0]: the image at {url} could not be downloaded", r.text
    # the allow-list, on the first hop and on redirects
    domains = ("images.example",)
    r = ask(f"http://public.example:{origin}/img.png", allowed_media_domains=domains)
    assert r.status_code == 403 and "--allowed-media-domains" in r.json()["error"]["message"]
    r = ask(f"http://images.example:{origin}/redirect?to=http://public.example:{origin}/img.png",
            allowed_media_domains=domains)
    assert r.status_code == 403
    assert ask(f"http://images.example:{origin}/img.png", allowed_media_domains=domains).status_code == 200
    # a slow server cannot hold the request past its deadline
    t0 = time.perf_counter()
    r = ask(f"http://public.example:{origin}/slow", request_timeout=1.0)
    assert r.status_code == 504 and time.perf_counter() - t0 < 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- health, packaging, warm-up
def test_health_says_when_the_batcher_is_gone(served, monkeypatch):
    assert httpx.get(f"{served.url}/health").status_code == 200
    monkeypatch.setattr(served.service.batcher, "alive", False, raising=False)
    r = httpx.get(f"{served.url}/health")
    assert r.status_code == 503 and r.json()["status"] != "ok"


def test_serve_extra_installs_pyav():
    import tomllib
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert any(dep.split(">")[0].split("=")[0].strip() == "av"
               for dep in meta["project"]["optional-dependencies"]["serve"])


def test_warm_up_tells_what_it_compiles(served):
    from qwen2vl_jax.serving.warmup import vision_buckets, warm_up

    processor = served.service.processor
    assert vision_buckets(processor, 4) == [16]  # the demo's pixel budget fits one bucket
    batcher = served.service.batcher
    calls = []
    stand_in = types.SimpleNamespace(slots=batcher.slots, params=batcher.params,
                                     warm_up=lambda mask_words=0: calls.append("batcher"))  # its own test covers it
    lines = []
    warm_up(stand_in, processor, progress=lines.append)
    assert calls == ["batcher"]
    assert any("decode step" in line for line in lines)
    assert any("vision tower 1/1" in line and "patches" in line for line in lines)

"""qwen2vl-serve against careless and hostile clients, over real sockets.

One server over the demo model (one slot, a short context, no warm-up: the single prompt the
tests generate for compiles once, in the background, while the connection tests run), with a
read timeout of half a second and a cap of a few connections so the slow-client cases are
quick. Every bad input must get a 4xx error object and leave the server answering; where the
case is about the connection, the next request goes over the same socket.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import threading
import time

import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

READ_TIMEOUT = 0.5
MAX_CONNECTIONS = 6
NAME, ALIAS = "hardened", "alias"
ALLOWED_ORIGIN = "https://ok.example"
PROMPT = [{"role": "user", "content": "Hi."}]  # the one prompt generated for (one compile)


# ---------------------------------------------------------------------------- the server
class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def server():
    from qwen2vl_jax import Qwen2VL
    from qwen2vl_jax.config import DEMO_DIR
    from qwen2vl_jax.processing import Processor
    from qwen2vl_jax.serving.app import ServerThread, build_service, create_app
    from qwen2vl_jax.serving.settings import Settings

    if not (DEMO_DIR / "config.json").is_file():
        pytest.skip("the demo model is not shipped in this checkout")
    settings = Settings(model_name=NAME, model_aliases=(ALIAS,), max_body_bytes=1 << 20, read_timeout=READ_TIMEOUT,
                        max_connections=MAX_CONNECTIONS, allowed_origins=(ALLOWED_ORIGIN,),
                        allowed_hosts=("127.0.0.1", "localhost"), access_log=True)
    model = Qwen2VL.from_pretrained(DEMO_DIR, dtype="float32")
    service = build_service(model, Processor.from_pretrained(DEMO_DIR), max_batch=1, max_context=64,
                            settings=settings, warm_up=False)
    records = Records()
    access = logging.getLogger("qwen2vl_jax.serving.access")
    access.addHandler(records)
    access.setLevel(logging.INFO)
    thread = ServerThread(create_app(service))
    url = thread.__enter__()
    # The first generation compiles for a while: start it now, the connection tests need none.
    warm = {}
    warmer = threading.Thread(target=lambda: warm.setdefault("r", chat(url)), daemon=True)
    warmer.start()
    yield Server(url, service, records, warmer, warm)
    thread.__exit__(None, None, None)
    access.removeHandler(records)


class Server:
    def __init__(self, url, service, records, warmer, warm):
        self.url, self.service, self.records, self.warmer, self.warm = url, service, records, warmer, warm
        self.port = int(url.rsplit(":", 1)[1])

    def ready(self) -> None:
        """Waits for the first generation (the compile) to be done."""
        self.warmer.join(300)
        assert self.warm["r"].status_code == 200, self.warm["r"].text

    def connection(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.connect()
        return conn


def chat(url: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"model": NAME, "messages": PROMPT, "max_tokens": 1, **extra},
                      timeout=300)


def request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict, dict]:
    """One request on `conn` -> (status, headers, JSON body)."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(data) if data else {}


def kept(conn: http.client.HTTPConnection, generate: bool = False) -> None:
    """The connection is still open and answers a normal request (a whole generation when
    `generate`) over the same socket."""
    sock = conn.sock
    assert sock is not None, "the server closed the connection"
    if generate:
        status, _, body = request(conn, "POST", "/v1/chat/completions",
                                  json.dumps({"model": NAME, "messages": PROMPT, "max_tokens": 1}).encode())
        assert status == 200 and body["choices"][0]["message"]["content"] is not None, body
    else:
        status, _, body = request(conn, "GET", "/v1/models")
        assert status == 200 and [m["id"] for m in body["data"]] == [NAME, ALIAS], body
    assert conn.sock is sock, "the request went over a new connection"


def error(status: int, body: dict, want: int, param: str | None = None) -> dict:
    assert status == want, (status, body)
    e = body["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"], e
    if param is not None:
        assert e["param"] == param, e
    return e


def raw(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_until_closed(sock: socket.socket, limit: float = 5.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes -> (bytes, seconds it took to close)."""
    start, out = time.perf_counter(), b""
    sock.settimeout(limit)
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            out += chunk
    return out, time.perf_counter() - start


# ---------------------------------------------------------------------------- slow clients
def test_half_sent_headers_get_408_and_are_closed(server):
    sock = raw(server.port)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
    out, took = read_until_closed(sock)
    assert out.startswith(b"HTTP/1.1 408 ") and b"--read-timeout" in out, out
    assert took < READ_TIMEOUT + 0.5, took
    kept(server.connection())


def test_silent_connection_is_closed_without_a_reply(server):
    sock = raw(server.port)
    out, took = read_until_closed(sock)
    assert out == b"" and took < READ_TIMEOUT + 0.5, (out, took)


def test_trickled_body_gets_408_at_the_deadline(server):
    """The deadline is for the whole request: bytes arriving keep nothing alive."""
    body = json.dumps({"model": "no such model", "messages": PROMPT}).encode()
    sock = raw(server.port)
    start = time.perf_counter()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body))
    for byte in body[:8]:  # a byte every 50 ms, up to just before the deadline
        sock.sendall(bytes([byte]))
        time.sleep(0.05)
    out, _ = read_until_closed(sock)
    took = time.perf_counter() - start
    assert out.startswith(b"HTTP/1.1 408 "), out
    assert READ_TIMEOUT - 0.05 < took < READ_TIMEOUT + 0.6, took


def test_slow_but_whole_request_is_answered(server):
    body = json.dumps({"model": "no such model", "messages": PROMPT}).encode()
    sock = raw(server.port)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body))
    time.sleep(READ_TIMEOUT / 3)
    sock.sendall(body)
    sock.settimeout(5)
    assert sock.recv(65536).startswith(b"HTTP/1.1 404 ")
    # Kept alive past the read timeout: the deadline is per request, not per connection.
    time.sleep(READ_TIMEOUT + 0.2)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    sock.close()


def test_connections_over_the_cap_get_503(server):
    server.ready()  # the warm-up's connection is closed: only this test's are open
    time.sleep(0.1)  # the server has seen the earlier tests' connections close
    held = []  # keep-alive connections after a reply: they stay open for uvicorn's 5 s
    try:
        for _ in range(MAX_CONNECTIONS):  # the last one under the cap is answered
            conn = server.connection()
            status, _, body = request(conn, "GET", "/health")
            assert status == 200 and body["status"] == "ok", body
            held.append(conn)
        over = raw(server.port)
        over.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        out, took = read_until_closed(over)
        assert out.startswith(b"HTTP/1.1 503 ") and b"--max-connections" in out and took < 1, (out, took)
        kept(held[0])  # those under the cap are still served
    finally:
        for conn in held:
            conn.close()
    time.sleep(0.1)  # the server sees the closes
    kept(server.connection())


# ---------------------------------------------------------------------------- bad input
def test_bad_bodies_are_4xx_and_the_connection_is_kept(server):
    conn = server.connection()
    ok = {"model": NAME, "messages": PROMPT}
    cases = [
        ("not JSON", b'{"messages": [', 400, None),
        ("JSON nested 100,000 deep", b"[" * 100_000, 400, None),
        ("nested 100,000 deep inside a message", b'{"messages": ' + b"[" * 100_000, 400, None),
        ("a 300,000-digit number", b'{"messages": [], "max_tokens": ' + b"9" * 300_000 + b"}", 400, None),
        ("a lone surrogate", json.dumps({**ok, "messages": [{"role": "user", "content": "\ud800"}]}).encode(), 400,
         "messages[0].content"),
        ("a lone surrogate in a part", json.dumps({**ok, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "a\udfffb"}]}]}).encode(), 400, "messages[0].content[0].text"),
        ("a lone surrogate in a stop string", json.dumps({**ok, "stop": ["\ud83d"]}).encode(), 400, "stop[0]"),
        ("a lone surrogate in a field name", json.dumps({**ok, "\ud800": 1}).encode(), 400, None),
        ("not UTF-8", b'{"messages": "\xff\xfe"}', 400, None),
        ("not an object", b"[1, 2]", 400, None),
    ]
    for what, body, status, param in cases:
        got, _, reply = request(conn, "POST", "/v1/chat/completions", body)
        e = error(got, reply, status, param)
        assert len(e["message"]) < 400, (what, e)
        kept(conn)
    # A body over the limit is refused from its declared length, the connection kept.
    got, _, reply = request(conn, "POST", "/v1/chat/completions", b" " * (2 << 20))
    error(got, reply, 413)
    kept(conn)


def test_a_server_fault_is_a_generic_500_and_the_connection_is_kept(server, monkeypatch, caplog):
    from qwen2vl_jax.serving import app

    server.ready()

    def broken(*args, **kw):
        raise RuntimeError("secret detail of the fault")

    conn = server.connection()
    monkeypatch.setattr(app, "parse_body", broken)
    with caplog.at_level(logging.ERROR, logger="qwen2vl_jax.serving"):
        status, _, body = request(conn, "POST", "/v1/chat/completions", json.dumps({"messages": PROMPT}).encode())
    monkeypatch.undo()
    e = error(status, body, 500)
    assert e["message"] == "internal error" and e["type"] == "server_error", e
    assert "secret detail" in caplog.text  # the details go to the log
    kept(conn, generate=True)
    # The surrogate case on a connection that then generates.
    status, _, body = request(conn, "POST", "/v1/chat/completions",
                              json.dumps({"messages": [{"role": "user", "content": "x\ud800"}]}).encode())
    error(status, body, 400, "messages[0].content")
    kept(conn, generate=True)


def test_unknown_path_and_method(server):
    conn = server.connection()
    status, headers, body = request(conn, "GET", "/v1/chat/completions")
    e = error(status, body, 405)
    assert e["type"] == "invalid_request_error" and "POST" in headers.get("allow", ""), (e, headers)
    kept(conn)
    status, _, body = request(conn, "GET", "/v1/nothing")
    assert error(status, body, 404)["type"] == "not_found_error"
    kept(conn)


# ---------------------------------------------------------------------------- cross-site
def test_only_json_bodies(server):
    conn = server.connection()
    body = json.dumps({"model": NAME, "messages": PROMPT}).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": kind} if kind else {}
        conn.putrequest("POST", "/v1/chat/completions")
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        error(r.status, json.loads(r.read()), 415)
        kept(conn)
    # application/json with a charset is JSON: past the content check (here to the model check).
    status, _, reply = request(conn, "POST", "/v1/chat/completions", json.dumps({"model": "x"}).encode(),
                               {"Content-Type": "application/json; charset=utf-8"})
    error(status, reply, 404)


def test_origins(server):
    conn = server.connection()
    status, headers, body = request(conn, "GET", "/v1/models")
    assert status == 200 and not any(h.startswith("access-control-") for h in headers), headers
    for origin in ("https://evil.example", "null", "http://localhost:3000"):
        status, headers, body = request(conn, "POST", "/v1/chat/completions",
                                        json.dumps({"model": NAME, "messages": PROMPT}).encode(), {"Origin": origin})
        assert error(status, body, 403)["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in headers
        kept(conn)
    status, headers, _ = request(conn, "GET", "/v1/models", headers={"Origin": ALLOWED_ORIGIN})
    assert status == 200 and headers["access-control-allow-origin"] == ALLOWED_ORIGIN, headers
    r = httpx.options(f"{server.url}/v1/chat/completions", headers={
        "Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert r.status_code == 200 and "POST" in r.headers["access-control-allow-methods"], r.headers


def test_no_cors_without_allowed_origins(server):
    """A second server over the same service, with the default settings' empty origin list."""
    import copy
    import dataclasses

    from qwen2vl_jax.serving.app import create_app
    from qwen2vl_jax.serving.connections import bind, uvicorn_config

    settings = dataclasses.replace(server.service.settings, allowed_origins=())
    plain = copy.copy(server.service)
    plain.settings = settings
    sock = bind("127.0.0.1", 0)
    other = uvicorn.Server(uvicorn_config(create_app(plain), settings, lifespan="off"))
    thread = threading.Thread(target=other.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not other.started:
            time.sleep(0.01)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        r = httpx.get(f"{url}/v1/models", headers={"Origin": ALLOWED_ORIGIN})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers, r.headers
        r = httpx.options(f"{url}/v1/chat/completions", headers={
            "Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
        r = httpx.get(f"{url}/v1/models")
        assert r.status_code == 200 and not any(h.startswith("access-control-") for h in r.headers)
    finally:
        other.should_exit = True
        thread.join(10)
        sock.close()


def test_host_header(server):
    conn = server.connection()
    for host in ("evil.example", "evil.example:%d" % server.port, "127.0.0.2"):
        conn.putrequest("GET", "/v1/models", skip_host=True)
        conn.putheader("Host", host)
        conn.endheaders()
        r = conn.getresponse()
        assert error(r.status, json.loads(r.read()), 400)["code"] == "host_not_allowed"
        kept(conn)
    for host in ("localhost", "localhost:%d" % server.port, "LOCALHOST"):
        assert httpx.get(f"{server.url}/health", headers={"Host": host}).status_code == 200


def test_default_allowed_hosts():
    from qwen2vl_jax.serving.cli import build_parser, network_settings

    def hosts(*argv):
        return network_settings(build_parser().parse_args(["--model", ".", *argv]))["allowed_hosts"]

    assert set(hosts()) == {"localhost", "127.0.0.1", "::1"}
    assert "127.0.0.5" in hosts("--host", "127.0.0.5")
    assert hosts("--host", "0.0.0.0") is None and hosts("--host", "::") is None
    assert hosts("--allowed-hosts", "a.example, b.example") == ("a.example", "b.example")


# ---------------------------------------------------------------------------- strict fields
def test_fields(server):
    conn = server.connection()

    def post(**fields):
        body = {"model": NAME, "messages": PROMPT, **fields}
        return request(conn, "POST", "/v1/chat/completions", json.dumps(body).encode())

    # fields not implemented, and bad values of the implemented ones (logprobs, tools, n, ...
    # have their own tests in test_server_features)
    refused = {
        "logprobs": "yes", "top_logprobs": 2, "tools": "f",
        "tool_choice": "required", "response_format": "json", "presence_penalty": 0.5,
        "frequency_penalty": "x", "functions": [{"name": "f"}], "logit_bias": {"1": 5}, "parallel_tool_calls": "yes",
        "n": 0, "best_of": 2, "guided_json": {}, "no_such_field": 1,
        "stream": "yes", "ignore_eos": "true", "return_token_ids": 1, "max_tokens": True, "temperature": "1",
    }
    for name, value in refused.items():
        status, _, body = post(**{name: value})
        error(status, body, 400, name)
    for value in (True, 0, 17, 1.5, "1"):
        error(*post(n=value)[::2], 400, "n")
    error(*post(stream=True, stream_options={"include_usage": "no"})[::2], 400, "stream_options.include_usage")
    error(*post(stream=True, stream_options={"continuous_usage_stats": True})[::2], 400, "stream_options")
    error(*post(messages=[{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}])[::2], 400,
          "messages[0].tool_calls")
    kept(conn)
    # The values that ask for nothing, the bookkeeping fields, an alias or no model at all pass
    # the field checks: max_tokens 0 is then the first complaint (no generation needed).
    neutral = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False, "tools": [],
               "tool_choice": "none", "response_format": {"type": "text"}, "logit_bias": {}, "best_of": 1,
               "parallel_tool_calls": True, "user": "u", "metadata": {"k": "v"}, "store": False, "seed": None,
               "stream": False, "stream_options": {"include_usage": False}, "ignore_eos": False}
    for fields in (neutral, {"model": ALIAS}, {"model": None}):
        status, _, body = post(**fields, max_tokens=0)
        error(status, body, 400, "max_tokens")
    body = {"messages": PROMPT, "max_tokens": 0}
    error(*request(conn, "POST", "/v1/chat/completions", json.dumps(body).encode())[::2], 400, "max_tokens")
    # An unknown model is a 404, as OpenAI and vLLM answer it; a model that is not a string a 400.
    status, _, body = post(model="gpt-4o")
    e = error(status, body, 404, "model")
    assert e["code"] == "model_not_found" and NAME in e["message"], e
    error(*post(model=["x"])[::2], 400, "model")
    status, _, body = post(model="m" * 100_000)
    assert len(error(status, body, 404)["message"]) < 400  # what the client sent is quoted short
    kept(conn)


# ---------------------------------------------------------------------------- the access log
def test_access_log(server):
    httpx.get(f"{server.url}/health?probe=1")
    sock = raw(server.port)
    sock.sendall(b"GET /health HTTP/1.1\r\n")  # a read timeout
    read_until_closed(sock)
    deadline = time.monotonic() + 5
    while not any('"GET /health" 200' in line for line in server.records.lines) and time.monotonic() < deadline:
        time.sleep(0.01)
    line = next(line for line in server.records.lines if '"GET /health" 200' in line)
    assert line.startswith("127.0.0.1:") and line.endswith(" ms"), line
    assert any('"- -" 408' in line for line in server.records.lines)  # the read timeouts are logged too


# ---------------------------------------------------------------------------- start-up
def test_port_in_use_fails_first_with_one_line(capsys):
    from qwen2vl_jax.serving import cli

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        start = time.perf_counter()
        status = cli.main(["--port", str(port)])
        took = time.perf_counter() - start
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert status == 1, err
    assert err.count("\n") == 1 and "--port" in err and "--host" in err and f"127.0.0.1:{port}" in err, err
    assert took < 5, took  # before the model loads (seconds) and warms up (a minute)


def test_bad_start_up_flags_name_themselves(capsys):
    from qwen2vl_jax.serving import cli

    assert cli.main(["--max-context", "100000", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-context" in err, err
    assert cli.main(["--read-timeout", "0"]) == 2 and "--read-timeout" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.startswith("qwen2vl-serve ")

"""The connection level under the app: the listening socket, bound before the model loads, and
uvicorn's h11 protocol with two limits uvicorn lacks.

uvicorn closes a connection that sits idle after a reply (`timeout_keep_alive`), but nothing
closes one that has sent part of a request: its keep-alive timer is cancelled by the first byte,
and no timer runs on a new connection at all. A client that sends half its headers, or trickles
a body one byte at a time, holds a descriptor for ever; a thousand of them use up the process's
descriptors and every new connection fails, /health included. `limit_concurrency` does not help:
it answers 503 only once a request's headers are complete, so it never sees those connections.

`protocol_class` gives each connection a read deadline: from its first byte (or its opening)
the whole request, headers and body, must arrive within `read_timeout` seconds, else the
server answers 408 (when part of a request came) and closes. Connections past
`max_connections` get a 503 to their first request, and a short deadline, so each one costs
a descriptor for a second at most.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import time

from qwen2vl_jax.serving.settings import ApiError, Settings

log = logging.getLogger("qwen2vl_jax.serving")
access_log = logging.getLogger("qwen2vl_jax.serving.access")
OVER_CAPACITY_READ_TIMEOUT = 1.0  # seconds a connection past max_connections has for its request


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not listening yet: uvicorn listens once the app is ready,
    so clients are refused, not left hanging, while the model loads). OSError as the OS gives
    it when the port is taken or the address is not this machine's."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        # Lets a restarted server take its port while the old connections are in TIME_WAIT (a
        # port another process listens on still fails to bind).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def uvicorn_config(app, settings: Settings, **kw):
    """uvicorn's Config for `app` under `settings`: the guarded h11 protocol, uvicorn's own
    logging kept to warnings (the access log is the app's, `AccessLog`)."""
    import uvicorn

    kw.setdefault("log_level", "warning")
    return uvicorn.Config(app, http=protocol_class(settings.read_timeout, settings.max_connections,
                                                   settings.access_log),
                          access_log=False, timeout_keep_alive=5, **kw)


def _raw_response(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 reply that closes the connection, for the protocol to write itself when
    no request has been parsed (h11 will not send a response before one)."""
    body = json.dumps(ApiError(status, message).body()).encode()
    phrase = {408: "Request Timeout", 503: "Service Unavailable"}[status]
    return (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


def protocol_class(read_timeout: float, max_connections: int, log_access: bool = False):
    """uvicorn's h11 protocol with a read deadline per request and a cap on open connections
    (see the module doc)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    over_capacity_message = (f"the server has too many open connections (over {max_connections}, "
                             "--max-connections); retry later")

    async def over_capacity(scope, receive, send):
        body = json.dumps(ApiError(503, over_capacity_message, code="too_many_connections").body()).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    warned = [-math.inf]  # when the last over-capacity warning was logged

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.read_timer: asyncio.TimerHandle | None = None
            self.read_started = time.perf_counter()
            self.over_capacity = len(self.connections) > max_connections
            if self.over_capacity:
                self.app = over_capacity  # uvicorn runs self.app for each request
                now = time.monotonic()
                if now - warned[0] > 10:  # a flood of connections is one line per 10 s, not one each
                    warned[0] = now
                    log.warning("%d open connections: over --max-connections %d", len(self.connections),
                                max_connections)
            self._arm(OVER_CAPACITY_READ_TIMEOUT if self.over_capacity else read_timeout, data=False)

        def data_received(self, data: bytes) -> None:
            if self.read_timer is None:  # the first byte of a request after a reply
                self._arm(OVER_CAPACITY_READ_TIMEOUT if self.over_capacity else read_timeout, data=True)
            self.read_data = True
            super().data_received(data)
            state = self.conn.their_state
            # Disarmed once the request is in (DONE), or the connection ends, or it is back
            # between requests with nothing of the next one buffered (a reply sent before its
            # body was read, the rest of the body then read and dropped).
            if state not in (h11.IDLE, h11.SEND_BODY) or state is h11.IDLE and not self.conn.trailing_data[0]:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, seconds: float, data: bool) -> None:
            self._disarm()
            self.read_data, self.read_started = data, time.perf_counter()
            self.read_timer = self.loop.call_later(seconds, self._read_timed_out)

        def _disarm(self) -> None:
            if self.read_timer is not None:
                self.read_timer.cancel()
                self.read_timer = None

        def _read_timed_out(self) -> None:
            self.read_timer = None
            if self.transport.is_closing():
                return
            # A reply can be written only while none has started for this request: h11's state
            # says so (IDLE: headers not complete; SEND_RESPONSE: the app is still reading).
            if self.read_data and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                seconds = time.perf_counter() - self.read_started
                self.transport.write(_raw_response(408, f"the request was not received within {seconds:.3g} s "
                                                        "(--read-timeout)"))
                if log_access:
                    client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
                    access_log.info('%s "- -" 408 %.1f ms (read timeout)', client, seconds * 1e3)
            # The app, if it is waiting for the body, is told the client is gone (connection_lost).
            self.transport.close()

    return GuardedH11Protocol

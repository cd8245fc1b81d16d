"""Remote images (http/https URLs, with --allow-remote-media) fetched under the request's deadline
and kept off the server's own network.

Each hop of a fetch (the URL, then every redirect) is checked before anything is sent: its host
must be on --allowed-media-domains when that list is given, and every address the name resolves to
must be a public one (not loopback, private, link-local, shared, multicast or reserved) unless
--allow-private-media is given. The connection then goes to the address that was checked, not to
a second lookup of the name, so a name that answers differently the second time cannot slip past.
The whole fetch (DNS aside) is bounded by the request's deadline: a stopped request closes the
socket, however slowly the other side sends. Why a fetch failed stays in the server's log; the
client only learns that it failed."""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import ssl
import urllib.parse

from qwen2vl_jax.serving.settings import ApiError, Settings

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
CHUNK = 1 << 16
QUOTE_CHARS = 100  # the most of a client's string an error message repeats


def shown(text: str, limit: int = QUOTE_CHARS) -> str:
    """`text` as an error message may quote it: whole when short, else its start and end with the
    length (a path's end is its file name)."""
    if len(text) <= limit:
        return text
    tail = limit // 3
    return f"{text[:limit - tail - 3]}...{text[-tail:]} ({len(text)} characters)"


def public_address(address: str) -> bool:
    """Whether a fetch may connect to `address` without --allow-private-media."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # a scope id ('fe80::1%eth0') is not part of it
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1 reaches 127.0.0.1
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to an address resolved and checked beforehand; the Host header and
    the TLS certificate check still use the URL's host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float, tls: bool):
        super().__init__(host, port, timeout=timeout)
        self.address, self.tls = address, tls
        self.default_port = 443 if tls else 80  # no ':443' in the Host header of an https URL

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        if self.tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        self.sock = sock


def _interrupt(conn: http.client.HTTPConnection) -> None:
    """Wakes a read blocked on the connection in another thread (closing the socket alone does
    not)."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _failed(where: str, url: str, why: str) -> ApiError:
    log.warning("%s: fetching %s failed: %s", where, shown(url, 300), why)
    return ApiError(400, f"{where}: the image at {shown(url)} could not be downloaded", where)


def _checked_address(host: str, port: int, url: str, where: str, settings: Settings) -> str:
    domains = settings.allowed_media_domains
    if domains and host.lower().rstrip(".") not in domains:
        raise ApiError(403, f"{where}: remote media may only come from {', '.join(domains)} "
                            f"(--allowed-media-domains), not {shown(host)}", where)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise _failed(where, url, f"cannot resolve {host}: {e}") from None
    addresses = [info[4][0] for info in infos]
    if not addresses:
        raise _failed(where, url, f"{host} has no address")
    if not settings.allow_private_media:
        inside = [a for a in addresses if not public_address(a)]
        if inside:
            log.warning("%s: refused %s: %s resolves to %s", where, shown(url, 300), host, ", ".join(inside))
            raise ApiError(403, f"{where}: the host of {shown(url)} is not a public address (remote media may "
                                "not reach loopback, private, link-local or reserved addresses; "
                                "--allow-private-media allows them)", where)
    return addresses[0]


def fetch(url: str, where: str, settings: Settings, ticket) -> bytes:
    """The body of `url` (at most max_body_bytes), each redirect checked as the first hop."""
    limit = settings.max_body_bytes
    for _ in range(MAX_REDIRECTS + 1):
        ticket.check()
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError:
            raise ApiError(400, f"{where}: {shown(url)} is not a valid URL", where) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ApiError(400, f"{where}: {shown(url)} is not an http(s) URL", where)
        tls = parts.scheme == "https"
        host, port = parts.hostname, port or (443 if tls else 80)
        address = _checked_address(host, port, url, where, settings)
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        conn = _PinnedConnection(host, port, address, timeout=max(ticket.remaining(), 0.001), tls=tls)
        forget = ticket.on_stop(lambda: _interrupt(conn))
        try:
            conn.request("GET", target, headers={"User-Agent": "qwen2vl-serve", "Accept": "image/*",
                                                 "Accept-Encoding": "identity"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location:
                    raise _failed(where, url, f"redirect {resp.status} without a Location")
                url = urllib.parse.urljoin(url, location)
                continue
            if resp.status != 200:
                raise _failed(where, url, f"HTTP {resp.status} {resp.reason}")
            declared = resp.getheader("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise ApiError(400, f"{where}: the image at {shown(url)} is over {limit} bytes", where)
            chunks, size = [], 0
            while True:
                ticket.check()
                if conn.sock is not None:
                    conn.sock.settimeout(max(ticket.remaining(), 0.001))
                chunk = resp.read1(CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise ApiError(400, f"{where}: the image at {shown(url)} is over {limit} bytes", where)
                chunks.append(chunk)
            return b"".join(chunks)
        except (OSError, http.client.HTTPException, ValueError) as e:
            ticket.check()  # the request's end closed the socket: report that, not a failed fetch
            raise _failed(where, url, f"{type(e).__name__}: {e}") from None
        finally:
            forget()
            conn.close()
    raise _failed(where, url, f"more than {MAX_REDIRECTS} redirects")

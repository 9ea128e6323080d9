"""Protocol upgrades (WebSocket and any ``Upgrade``): a byte tunnel to next-hop.

An upgrade request gets its own upstream connection, never a pooled one:
after a 101 the connection no longer speaks HTTP. The tunnel runs inside
the request's greenlet, so Gunicorn's graceful shutdown waits for it (up to
the graceful timeout) like any in-flight request; the worker's idle-closer
(``proxy.worker``) only touches connections waiting for their next request,
never one inside a request, so it does not cut tunnels.

Life of a tunnel:

1. The request goes to next-hop with ``Connection: Upgrade`` and its
   ``Upgrade`` header (the one exception to hop-by-hop stripping).
2. An answer other than 101 is relayed as an ordinary response and the
   dedicated connection is closed afterwards.
3. On 101 the proxy writes the 101 head to the client itself, then copies
   bytes both ways until either side closes (or resets), then closes the
   other; or until no byte moved either way for ``[tunnel] idle_timeout``.
4. One access line when it ends: status 101, ``tunnel_bytes_up``,
   ``tunnel_bytes_down``, ``time_taken_s`` and ``tunnel_end`` (why it ended:
   ``client_closed``, ``upstream_closed``, ``idle_timeout``, ``shutdown``
   when the worker cut it at the end of the graceful timeout, or ``error``).
"""

from __future__ import annotations

import http.client
import re
import socket
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import gevent
from gunicorn.workers.base_async import ALREADY_HANDLED

from .headers import (
    HeaderList,
    checked_response_headers,
    connection_tokens,
    downstream_response_headers,
    upstream_request_headers,
)
from .logs import error_log
from .upstream import BLOCK_SIZE, UpstreamError, upstream_target

if TYPE_CHECKING:
    from .app import Exchange, Proxy, StartResponse

__all__ = ["ALREADY_HANDLED", "is_upgrade", "tunnel"]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FOLD = re.compile(r"\r?\n[ \t]*")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def is_upgrade(environ: dict) -> bool:
    """An HTTP/1.1 request asking to switch protocols (RFC 9110 section 7.8;
    an HTTP/1.0 request's Upgrade is ignored). An offer of ``h2c`` is never
    tunnelled (it goes on as an ordinary request, without Upgrade): HTTP/2
    straight to next-hop would carry any number of further requests past
    every rule here ("h2c smuggling"), and RFC 9113 retired that upgrade."""
    upgrade = environ.get("HTTP_UPGRADE", "")
    return (
        bool(upgrade.strip())
        and "h2c" not in connection_tokens(upgrade)
        and environ.get("SERVER_PROTOCOL") == "HTTP/1.1"
        and "upgrade" in connection_tokens(environ.get("HTTP_CONNECTION"))
    )


class _Unbuffered:
    """Makes http.client read the response head byte by byte, so that no
    tunnel byte sent right after the 101 is left in a read buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def makefile(self, mode: str):
        return self._sock.makefile(mode, buffering=0)


def _upgrade_headers(environ: dict, request_id: str, proxy: Proxy, chunked: bool) -> HeaderList:
    """The client's headers for next-hop, keeping Upgrade and exactly one
    ``Connection: Upgrade`` (the client's own Connection header may list
    other hop-by-hop tokens, such as keep-alive, that must not go on)."""
    headers = upstream_request_headers(environ, request_id, keep_upgrade=True)
    headers = HeaderList((name, value) for name, value in headers.items() if name.lower() != "connection")
    headers.append(("Connection", "Upgrade"))
    if chunked:
        headers.append(("Transfer-Encoding", "chunked"))
    if proxy.config.request_headers:
        headers = HeaderList(proxy.config.request_headers.apply(headers))
    return headers


def _client_unreader(environ: dict):
    """Gunicorn's read buffer for the client connection: bytes the client
    sent right behind the upgrade request (pipelined) wait there."""
    reader = getattr(environ.get("wsgi.input"), "reader", None)
    unreader = getattr(reader, "unreader", None) or getattr(getattr(reader, "req", None), "unreader", None)
    return unreader if callable(getattr(unreader, "take_buffered", None)) else None


def _send_body(environ: dict, server: socket.socket, chunked: bool) -> None:
    body = environ["wsgi.input"]
    if chunked:
        while chunk := body.read(BLOCK_SIZE):
            server.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        server.sendall(b"0\r\n\r\n")
        return
    length = int(environ.get("CONTENT_LENGTH") or 0)
    while length > 0:
        chunk = body.read(min(BLOCK_SIZE, length))
        if not chunk:
            break
        length -= len(chunk)
        server.sendall(chunk)


def _read_response(server: socket.socket, method: str) -> http.client.HTTPResponse:
    """The final answer's head (interim 1xx answers other than 101 skipped)."""
    while True:
        response = http.client.HTTPResponse(_Unbuffered(server), method=method)  # type: ignore[arg-type]
        response.begin()
        if response.status == 101 or not 100 <= response.status < 200:
            return response
        response.close()


def _clean_101_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Header lines safe to write raw: valid names, unfolded values."""
    out = []
    for name, value in headers:
        value = _FOLD.sub(" ", value).strip(" \t")
        if _TOKEN.fullmatch(name) and not _BAD_VALUE.search(value):
            out.append((name, value))
    return out


def tunnel(proxy: Proxy, environ: dict, start_response: StartResponse, exchange: Exchange) -> Iterable[bytes]:
    """Forward an upgrade request; on 101, splice the two sockets together."""
    upstream = proxy.upstream
    method = environ["REQUEST_METHOD"]
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    headers = _upgrade_headers(environ, exchange.request_id, proxy, chunked)
    head = [f"{method} {upstream_target(environ['RAW_URI'])} HTTP/1.1\r\n"]
    head.extend(f"{name}: {value}\r\n" for name, value in headers.items())
    head.append("\r\n")
    started = time.perf_counter()
    # A dedicated connection: never taken from, nor returned to, the pool.
    try:
        server = socket.create_connection((upstream.host, upstream.port), timeout=upstream.connect_timeout)
    except socket.gaierror as exc:
        return proxy.upstream_failed(environ, start_response, UpstreamError(502, f"cannot resolve next-hop: {exc}"))
    except TimeoutError:
        return proxy.upstream_failed(environ, start_response, UpstreamError(504, "connect to next-hop timed out"))
    except OSError as exc:
        return proxy.upstream_failed(
            environ, start_response, UpstreamError(502, f"cannot connect to next-hop: {exc!r}")
        )
    exchange.connect_s = time.perf_counter() - started
    try:
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server.settimeout(upstream.read_timeout)
        server.sendall("".join(head).encode("latin-1"))
        _send_body(environ, server, chunked)
        response = _read_response(server, method)
    except TimeoutError:
        server.close()
        return proxy.upstream_failed(
            environ, start_response, UpstreamError(504, "next-hop did not answer the upgrade in time")
        )
    except (OSError, http.client.HTTPException) as exc:
        server.close()
        return proxy.upstream_failed(
            environ, start_response, UpstreamError(502, f"upgrade to next-hop failed: {exc!r}")
        )
    exchange.first_byte_s = time.perf_counter() - started
    exchange.upstream_status = response.status
    if response.status != 101:
        return _refused(proxy, environ, start_response, exchange, response, server)
    headers_out = downstream_response_headers(response.getheaders(), response.getheader("Connection"))
    if proxy.config.response_headers:
        headers_out = proxy.config.response_headers.apply(headers_out)
    # The head was read unbuffered: nothing of the tunnel is in this file.
    response.close()
    return _run_tunnel(proxy, environ, exchange, response, server, headers_out)


def _refused(
    proxy: Proxy,
    environ: dict,
    start_response: StartResponse,
    exchange: Exchange,
    response: http.client.HTTPResponse,
    server: socket.socket,
) -> Iterable[bytes]:
    """next-hop declined the upgrade: relay its answer as an ordinary response
    (framing checked as for any response: ambiguous framing is a 502)."""
    # The head was read byte by byte; the body can be read buffered.
    unbuffered, response.fp = response.fp, server.makefile("rb")
    unbuffered.close()
    status = response.status
    if status in proxy.config.error_pages:
        response.close()
        server.close()
        exchange.upstream_end = time.perf_counter()
        return proxy.error_page(start_response, status, response.getheader("Retry-After"))
    try:
        headers_out = checked_response_headers(response.getheaders(), response.getheader("Connection"))
        if proxy.config.response_headers:
            headers_out = proxy.config.response_headers.apply(headers_out)
        start_response(f"{status} {response.reason or http.client.responses.get(status, '')}", headers_out)
    except (ValueError, TypeError) as exc:
        response.close()
        server.close()
        return proxy.upstream_failed(
            environ, start_response, UpstreamError(502, f"unusable response head from next-hop: {exc}")
        )
    return _RefusalBody(response, server, exchange, environ)


class _RefusalBody:
    """The body of a refused upgrade; closes the dedicated connection when
    done (a class, not a generator, so close() works even if never iterated)."""

    def __init__(
        self, response: http.client.HTTPResponse, server: socket.socket, exchange: Exchange, environ: dict
    ) -> None:
        self._response = response
        self._server = server
        self._exchange = exchange
        self._environ = environ

    def __iter__(self) -> Iterator[bytes]:
        try:
            while chunk := self._response.read1(BLOCK_SIZE):
                yield chunk
        except (OSError, http.client.HTTPException) as exc:
            self._exchange.outcome = "upstream_error"
            error_log.error(
                "%s %s: next-hop failed mid-response to a refused upgrade, closing client connection: %r",
                self._environ["REQUEST_METHOD"],
                self._environ["RAW_URI"],
                exc,
                extra={"request_id": self._exchange.request_id},
            )
            try:
                self._environ["gunicorn.socket"].shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._exchange.upstream_end = time.perf_counter()
        self._response.close()
        self._server.close()


def _run_tunnel(
    proxy: Proxy,
    environ: dict,
    exchange: Exchange,
    response: http.client.HTTPResponse,
    server: socket.socket,
    headers_out: list[tuple[str, str]],
) -> object:
    """Send the 101 to the client, then splice until the tunnel ends."""
    client: socket.socket = environ["gunicorn.socket"]
    upgrade = response.getheader("Upgrade") or environ["HTTP_UPGRADE"]
    reason = response.reason if response.reason and not _BAD_VALUE.search(response.reason) else "Switching Protocols"
    head = [f"HTTP/1.1 101 {reason}\r\n", "Connection: Upgrade\r\n", f"Upgrade: {_FOLD.sub(' ', upgrade)}\r\n"]
    head.extend(f"{name}: {value}\r\n" for name, value in _clean_101_headers(headers_out))
    head.append("\r\n")
    head_bytes = "".join(head).encode("latin-1", "replace")
    exchange.status = 101
    exchange.header_bytes = len(head_bytes)
    counts = [0, 0]
    end = "error"
    try:
        server.settimeout(None)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.sendall(head_bytes)
        # Whatever the client pipelined behind the request belongs to the
        # new protocol; it sits in Gunicorn's read buffer, not the socket.
        unreader = _client_unreader(environ)
        early = unreader.take_buffered() if unreader is not None else b""
        if early:
            server.sendall(early)
            counts[0] += len(early)
        end = _splice(client, server, proxy.config.tunnel_idle_timeout, counts)
    except OSError:
        end = "client_closed"  # the 101 (or the early bytes) could not be written
    except Exception:
        exchange.outcome = "error"
        error_log.exception("tunnel %s failed", environ.get("RAW_URI"), extra={"request_id": exchange.request_id})
    except BaseException:
        # GreenletExit: the worker's graceful timeout ran out (or it is
        # being killed). The access line is still owed; write it here, as
        # the exception skips the app's own logging.
        end = "shutdown"
        _finish(exchange, client, server, counts, end)
        exchange.log()
        raise
    _finish(exchange, client, server, counts, end)
    return ALREADY_HANDLED


def _finish(exchange: Exchange, client: socket.socket, server: socket.socket, counts: list[int], end: str) -> None:
    exchange.upstream_end = time.perf_counter()
    exchange.tunnel_bytes_up = counts[0]
    exchange.body_bytes = counts[1]
    exchange.tunnel_end = end
    server.close()
    # Gunicorn closes the descriptor when this request returns; shutting it
    # down here also ends its wait for a next request on it at once.
    try:
        client.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _splice(client: socket.socket, server: socket.socket, idle_timeout: float, counts: list[int]) -> str:
    """Copy bytes both ways until one side closes or no byte has moved
    either way for ``idle_timeout`` seconds.

    ``counts`` receives the bytes sent upstream and downstream as they go.
    Returns why the tunnel ended.
    """
    last_activity = [time.monotonic()]

    def pump(src: socket.socket, dst: socket.socket, index: int) -> None:
        recv = src.recv
        send = dst.send
        while True:
            try:
                data = recv(BLOCK_SIZE)
            except OSError:  # reset
                return
            if not data:
                return
            now = last_activity[0] = time.monotonic()
            view = memoryview(data)
            try:
                while view:
                    sent = send(view)
                    view = view[sent:]
                    counts[index] += sent
                    # A slow reader is not an idle one while bytes move.
                    now = time.monotonic()
                    if now > last_activity[0]:
                        last_activity[0] = now
            except OSError:
                return

    upward = gevent.spawn(pump, client, server, 0)
    downward = gevent.spawn(pump, server, client, 1)
    try:
        while True:
            remaining = last_activity[0] + idle_timeout - time.monotonic()
            if remaining <= 0:
                error_log.info("tunnel closed after %gs idle", idle_timeout)
                return "idle_timeout"
            gevent.wait([upward, downward], timeout=remaining, count=1)
            if upward.ready():
                return "client_closed"
            if downward.ready():
                return "upstream_closed"
    finally:
        gevent.killall([upward, downward], block=True, timeout=1)

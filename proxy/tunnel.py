"""Protocol upgrades (WebSocket and any ``Upgrade``): a byte tunnel to next-hop.

An upgrade request gets its own upstream connection, never a pooled one:
after a 101 the connection no longer speaks HTTP. The tunnel runs inside
the request's greenlet, so Gunicorn's graceful shutdown waits for it (up to
the graceful timeout) like any in-flight request.
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import gevent
from gunicorn.workers.base_async import ALREADY_HANDLED

from .headers import HeaderList, connection_tokens, downstream_response_headers, upstream_request_headers
from .logs import error_log
from .upstream import BLOCK_SIZE, UpstreamError, upstream_target

if TYPE_CHECKING:
    from .app import Exchange, Proxy, StartResponse


def is_upgrade(environ: dict) -> bool:
    return "HTTP_UPGRADE" in environ and "upgrade" in connection_tokens(environ.get("HTTP_CONNECTION"))


class _Unbuffered:
    """Makes http.client read the response head byte by byte, so that no
    tunnel byte sent right after the 101 is left in a read buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def makefile(self, mode: str):
        return self._sock.makefile(mode, buffering=0)


def tunnel(proxy: Proxy, environ: dict, start_response: StartResponse, exchange: Exchange) -> Iterable[bytes]:
    """Forward an upgrade request; on 101, splice the two sockets together."""
    upstream = proxy.upstream
    method = environ["REQUEST_METHOD"]
    headers = upstream_request_headers(environ, exchange.request_id, keep_upgrade=True)
    if proxy.config.request_headers:
        headers = HeaderList(proxy.config.request_headers.apply(headers))
    head = [f"{method} {upstream_target(environ['RAW_URI'])} HTTP/1.1\r\n"]
    head.extend(f"{name}: {value}\r\n" for name, value in headers)
    head.append("\r\n")
    started = time.perf_counter()
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
        server.settimeout(upstream.read_timeout)
        server.sendall("".join(head).encode("latin-1"))
        length = int(environ.get("CONTENT_LENGTH") or 0)
        while length > 0:
            chunk = environ["wsgi.input"].read(min(BLOCK_SIZE, length))
            if not chunk:
                break
            length -= len(chunk)
            server.sendall(chunk)
        response = http.client.HTTPResponse(_Unbuffered(server), method=method)  # type: ignore[arg-type]
        response.begin()
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
    headers_out = downstream_response_headers(response.getheaders(), response.getheader("Connection"))
    if proxy.config.response_headers:
        headers_out = proxy.config.response_headers.apply(headers_out)
    if response.status != 101:
        start_response(f"{response.status} {response.reason}", headers_out)
        return _relay_refusal(response, server)

    upgrade = response.getheader("Upgrade", environ["HTTP_UPGRADE"])
    client: socket.socket = environ["gunicorn.socket"]
    head = [
        f"HTTP/1.1 101 {response.reason or 'Switching Protocols'}\r\n",
        "Connection: Upgrade\r\n",
        f"Upgrade: {upgrade}\r\n",
    ]
    head.extend(f"{name}: {value}\r\n" for name, value in headers_out)
    head.append("\r\n")
    exchange.status = 101
    try:
        client.sendall("".join(head).encode("latin-1"))
        up, down = _splice(client, server, proxy.config.tunnel_idle_timeout)
    finally:
        exchange.upstream_end = time.perf_counter()
        server.close()
        try:
            client.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    exchange.tunnel_bytes_up = up
    exchange.body_bytes = down
    return ALREADY_HANDLED


def _relay_refusal(response: http.client.HTTPResponse, server: socket.socket) -> Iterable[bytes]:
    """next-hop declined the upgrade: relay its answer as an ordinary response."""
    try:
        while chunk := response.read1(BLOCK_SIZE):
            yield chunk
    finally:
        response.close()
        server.close()


def _splice(client: socket.socket, server: socket.socket, idle_timeout: float) -> tuple[int, int]:
    """Copy bytes both ways until one side closes or both stay idle too long.

    Returns the bytes sent upstream and downstream.
    """
    last_activity = [time.monotonic()]
    counts = [0, 0]

    def pump(src: socket.socket, dst: socket.socket, index: int) -> None:
        src.settimeout(min(idle_timeout, 60.0))
        while True:
            try:
                data = src.recv(BLOCK_SIZE)
            except TimeoutError:
                if time.monotonic() - last_activity[0] >= idle_timeout:
                    return
                continue
            except OSError:
                return
            if not data:
                return
            try:
                dst.sendall(data)
            except OSError:
                return
            counts[index] += len(data)
            last_activity[0] = time.monotonic()

    upward = gevent.spawn(pump, client, server, 0)
    downward = gevent.spawn(pump, server, client, 1)
    try:
        gevent.wait([upward, downward], count=1)
    finally:
        gevent.killall([upward, downward], block=True, timeout=1)
    if time.monotonic() - last_activity[0] >= idle_timeout:
        error_log.info("tunnel closed after %gs idle", idle_timeout)
    return counts[0], counts[1]

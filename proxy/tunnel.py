"""Protocol upgrades (WebSocket and any ``Upgrade``): a byte tunnel to next-hop.

An upgrade request gets its own upstream connection, never a pooled one:
after a 101 the connection no longer speaks HTTP. The tunnel runs inside
the request's greenlet, so Gunicorn's graceful shutdown waits for it (up to
the graceful timeout) like any in-flight request; the worker's idle-closer
(``proxy.worker``) only touches connections waiting for their next request,
never one inside a request, so it does not cut tunnels.

Life of a tunnel:

1. The request goes to next-hop with ``Connection: Upgrade`` and its
   ``Upgrade`` header (the one exception to hop-by-hop stripping), through
   the same upstream client as any request (``Upstream.send``, with
   ``upgrade``), so connect, send and failures (502/504) are handled alike.
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

import socket
import time
from collections.abc import Iterable, Mapping
from typing import Any, Final, Protocol, cast

import gevent
from gunicorn.workers import base_async

from . import internals, metrics
from .headers import Header
from .logs import error_log
from .sockets import BLOCK_SIZE
from .upstream import Response

__all__ = ["ALREADY_HANDLED", "TunnelRecord", "tunnel"]

#: Gunicorn's marker for "the app wrote the response to the socket itself";
#: only its identity counts.
ALREADY_HANDLED: Final[object] = base_async.ALREADY_HANDLED

#: Seconds the two halves of a closing tunnel get to stop.
SPLICE_STOP_WAIT = 1.0


class TunnelRecord(Protocol):
    """What a tunnel notes in the request's access record (``access.AccessRecord``)."""

    request_id: str
    status: int
    header_bytes: int
    body_bytes: int
    outcome: str
    upstream_end: float | None
    tunnel_bytes_up: int | None
    tunnel_end: str | None

    def log(self) -> None: ...


def tunnel(
    environ: Mapping[str, Any],
    record: TunnelRecord,
    response: Response,
    headers_out: list[Header],
    idle_timeout: float,
) -> Iterable[bytes]:
    """Send next-hop's 101 (``response``, on a dedicated connection) to the
    client, then splice the two sockets until the tunnel ends. Returns
    Gunicorn's ALREADY_HANDLED: the response was written here."""
    client: socket.socket = environ["gunicorn.socket"]
    server = response.sock
    # The reader let no control character or line break into these.
    upgrade = response.head.header("Upgrade") or environ["HTTP_UPGRADE"]
    head = [
        f"HTTP/1.1 101 {response.head.reason or 'Switching Protocols'}\r\n",
        "Connection: Upgrade\r\n",
        f"Upgrade: {upgrade}\r\n",
    ]
    head.extend(f"{name}: {value}\r\n" for name, value in headers_out)
    head.append("\r\n")
    head_bytes = "".join(head).encode("latin-1", "replace")
    record.status = 101
    record.header_bytes = len(head_bytes)
    metrics.tunnel_opened()
    counts = [0, 0]
    end = "error"
    try:
        server.settimeout(None)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The tunnel's first bytes from next-hop may have arrived with the 101.
        first = response.buffered()
        client.sendall(head_bytes + first)
        counts[1] += len(first)
        # Whatever the client pipelined behind the request belongs to the
        # new protocol; it sits in Gunicorn's read buffer, not the socket.
        early = internals.client_read_ahead(environ)
        if early:
            server.sendall(early)
            counts[0] += len(early)
        end = _splice(client, server, idle_timeout, counts)
    except OSError:
        end = "client_closed"  # the 101 (or the early bytes) could not be written
    except Exception:
        record.outcome = "error"
        error_log.exception("tunnel %s failed", environ.get("RAW_URI"), extra={"request_id": record.request_id})
    except BaseException:
        # GreenletExit: the worker's graceful timeout ran out (or it is
        # being killed). The access line is still owed; write it here, as
        # the exception skips the app's own logging.
        end = "shutdown"
        _finish(record, client, response, counts, end)
        record.log()
        raise
    _finish(record, client, response, counts, end)
    return cast("Iterable[bytes]", ALREADY_HANDLED)


def _finish(record: TunnelRecord, client: socket.socket, response: Response, counts: list[int], end: str) -> None:
    metrics.tunnel_closed()
    record.upstream_end = time.perf_counter()
    record.tunnel_bytes_up = counts[0]
    record.body_bytes = counts[1]
    record.tunnel_end = end
    response.release()  # a dedicated connection: closed
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
        gevent.killall([upward, downward], block=True, timeout=SPLICE_STOP_WAIT)

"""The connection layer to next-hop: sockets, the worker's urllib3 pool, the
one retry, and what each failure means for the client.

One ``Upstream`` per worker, created after fork (from the app factory) and
shared by every greenlet of the worker. urllib3's PoolManager owns the
connections: it opens them (name resolution, connect timeout, socket
options), keeps idle ones, and drops dead ones before reuse. The proxy
frames each exchange on the socket itself: it writes the request, and
reads the answer with ``proxy.http1``'s reader, for two reasons:

- strictness: http.client, which urllib3 reads answers with, is lenient
  where a proxy must not be (bare CR, unparsable lines, interim answers).
- cost: urllib3's ``urlopen`` and http.client's email-based header parser
  took a third of the CPU time of a small proxied request.

Ordinary requests and upgrades (``proxy.tunnel``) take the same path; an
upgrade gets a dedicated connection, never a pooled one, as after a 101 it
no longer speaks HTTP. ``failure`` alone says which status and log reason
each failure gets.

Nothing is retried, with one exception: an idempotent request whose pooled
connection next-hop had closed while it sat idle is retried once on a new
one, before any request body byte has been read (see ``may_retry``).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

from urllib3 import HTTPConnectionPool, PoolManager
from urllib3.connection import HTTPConnection
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import Timeout

from . import internals, metrics, splice
from .headers import Header, sendable_head
from .http1 import Head, NoAnswer, ResponseError, ResponseReader, Signal, parse_head
from .request_body import RequestBody
from .sockets import BLOCK_SIZE, send_all

__all__ = [
    "IDEMPOTENT_METHODS",
    "BodyCut",
    "PooledConnection",
    "Response",
    "ResponseError",
    "SPLICE_MIN_BYTES",
    "Timing",
    "Upstream",
    "UpstreamError",
    "failure",
    "may_retry",
    "parse_head",
    "request_head",
    "send_request",
]


class UpstreamError(Exception):
    """The request could not be answered by next-hop; ``status`` is what the
    client gets and ``reason`` what the error log says. ``kind`` says how
    next-hop failed (``proxy.metrics.FAILURE_KINDS``); None when the request
    itself could not be sent (next-hop is not to blame)."""

    def __init__(self, status: int, reason: str, kind: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.kind = kind


# -- the request ------------------------------------------------------------------------


def request_head(method: str, target: str, headers: list[Header], chunked: bool) -> bytes:
    """The request line and field lines (plus ``Transfer-Encoding: chunked``
    for a chunked body); UpstreamError (500) for a head that would make
    next-hop read a different request (see ``headers.sendable_head``)."""
    if chunked:
        headers = [*headers, ("Transfer-Encoding", "chunked")]
    head = "".join([method, " ", target, " HTTP/1.1\r\n", *[f"{n}: {v}\r\n" for n, v in headers], "\r\n"])
    try:
        data = head.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise UpstreamError(500, f"request header not encodable as latin-1: {exc}") from None
    if not sendable_head(method, target, headers, data):
        raise UpstreamError(500, "invalid request line or header for next-hop (set by middleware?)")
    return data


def send_request(sock: socket.socket, head: bytes, body: RequestBody | None, chunked: bool) -> None:
    """Send the request: ``head`` (``request_head``) with the body's first
    bytes, one send and one segment for a small request (next-hop reads it
    whole at once); the body chunk-framed if ``chunked``, one of known
    length by splice(2) where it can."""
    if body is None:
        send_all(sock, head)
        return
    if not chunked and body.splice_to(sock, head):
        return
    for chunk in body:
        send_all(sock, head + (b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk))
        head = b""
    if chunked:
        send_all(sock, head + b"0\r\n\r\n")


# -- the answer -------------------------------------------------------------------------


#: The least rest of a response body worth splicing: below one block, copying
#: it (a recv and a send) takes fewer system calls than a pipe does.
SPLICE_MIN_BYTES = BLOCK_SIZE


class BodyCut(Exception):
    """next-hop's body broke off while it was spliced (``Response.splice_to``);
    ``cause`` is what ``read1`` would have raised: the reader's ResponseError
    (next-hop closed early) or the socket's OSError (``socket.timeout`` past
    the read timeout included)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(repr(cause))
        self.cause = cause


class Response:
    """next-hop's answer: the head parsed, the body still on the socket.

    Read the body with ``read1`` until it returns ``b""`` (or, for a
    Content-Length body, send it on with ``splice_to``), then call
    ``release``, which pools the connection only if the reader says the
    answer ended exactly and the connection may carry another request.
    """

    __slots__ = ("head", "sock", "_reader", "_conn", "_upstream", "_dedicated")

    def __init__(
        self,
        head: Head,
        reader: ResponseReader,
        conn: HTTPConnection,
        upstream: Upstream,
        dedicated: bool,
    ) -> None:
        self.head = head
        self.sock = conn.sock
        self._reader = reader
        self._conn: HTTPConnection | None = conn
        self._upstream = upstream
        self._dedicated = dedicated

    @property
    def status(self) -> int:
        return self.head.status

    def buffered(self) -> bytes:
        """Take the bytes read past the head and not yet returned (after a
        101, the first bytes of the new protocol)."""
        return self._reader.take_buffered()

    def read1(self) -> bytes:
        """The next body bytes, at most one socket read; ``b""`` at the end.

        Raises ResponseError, or OSError, if the body breaks off or its
        framing is invalid.
        """
        reader = self._reader
        while True:
            event = reader.next_event()
            if isinstance(event, bytes):
                return event
            if event is not Signal.NEED_DATA:  # END: the head was taken before
                return b""
            reader.feed(self.sock.recv(BLOCK_SIZE))

    def splice_length(self) -> int:
        """How many body bytes ``splice_to`` would move past the reader: the
        rest of a Content-Length body beyond the bytes already received; 0
        for any other body (chunked, delimited by the close, none), when less
        than ``SPLICE_MIN_BYTES`` of it is left, or where splice(2) is missing."""
        left = self._reader.unfed_body()
        return left if left >= SPLICE_MIN_BYTES and splice.AVAILABLE else 0

    def splice_to(self, sock: socket.socket, head: bytes = b"") -> Iterator[int]:
        """Send ``head`` (the client's response head), then the body to
        ``sock``: the bytes already received, then the rest of the
        Content-Length body straight from next-hop's socket by splice(2)
        (``proxy.splice.move``, next-hop's side waiting at most the read
        timeout at a time). Yields how many body bytes reached ``sock`` at
        each step. Once all of it went through, the reader counts the body as
        read, so ``release`` pools the connection as if it had been read with
        ``read1``.

        The head leaves with the first body bytes, as the worker's response
        sends it: at once with those already received, else corked ahead of
        the first spliced ones. next-hop failing raises BodyCut; ``sock``
        failing raises its OSError. Either way the reader is left mid-body,
        and the connection is not pooled.
        """
        reader = self._reader
        left = self.splice_length()
        if not left:
            raise ValueError("no body left for splice(2)")
        held = reader.next_event()  # the body bytes received with the head, if any
        if isinstance(held, bytes):
            yield from _body_part(splice.send(sock, head + held), len(head))
            head = b""
        try:
            yield from _body_part(splice.move(self.sock, sock, left, head), len(head))
        except splice.SourceError as exc:
            if exc.cause is not None:
                raise BodyCut(exc.cause) from exc
            reader.feed(b"")  # next-hop closed early: what that means is the reader's to say
            try:
                reader.next_event()
            except ResponseError as cut:
                raise BodyCut(cut) from exc
            raise AssertionError("the reader took a body cut short for a whole one") from exc
        reader.bypass(left)

    def release(self) -> None:
        """Give the connection back: to the pool if it can carry another
        request, else closed. Idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._upstream.check_in(conn, self._dedicated, self._reader.reusable)


def _body_part(sent: Iterator[int], head: int) -> Iterator[int]:
    """The counts of bytes sent, less the first ``head`` bytes: the body's."""
    for n in sent:
        if head:
            part = min(head, n)
            head -= part
            n -= part
        if n:
            yield n


def _read_head(sock: socket.socket, reader: ResponseReader) -> Head:
    """Receive until the reader has the final answer's head."""
    while True:
        event = reader.next_event()
        if isinstance(event, Head):
            return event
        reader.feed(sock.recv(BLOCK_SIZE))


# -- connections ------------------------------------------------------------------------


class PooledConnection(HTTPConnection):
    @property
    def is_connected(self) -> bool:
        """Whether this pooled connection can carry the next request.

        urllib3 asks before every reuse and answers with a poll(), which
        gevent turns into a watcher and a hub switch: a fifth of a small
        request's cost. One non-blocking peek on the OS socket tells the
        same: nothing to read means alive; end-of-stream (next-hop closed it)
        or unsolicited bytes (a stray body) mean it must not be reused.
        """
        sock = self.sock
        if sock is None:
            return False
        raw = internals.raw_socket(sock)  # under gevent, the OS socket is wrapped
        try:
            raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False


class _Pool(HTTPConnectionPool):
    ConnectionCls = PooledConnection


@dataclass(frozen=True, slots=True)
class Timing:
    connect_s: float
    first_byte_s: float


#: Failures that mean a pooled connection was dead before this request used it.
_STALE = (NoAnswer, ConnectionResetError, BrokenPipeError)
#: RFC 9110 section 9.2.2: what may be sent again without asking the client.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def may_retry(method: str, exc: BaseException, reused: bool, body: RequestBody | None) -> bool:
    """Whether a failed first attempt goes again on a new connection: only
    when the pooled connection was already dead (next-hop closed it while
    idle, and the peek before reuse missed it by a hair), the method is
    idempotent (a proxy must not repeat a POST on its own: next-hop may have
    acted on it before the connection went), and no body byte has been
    taken from the client (it could not be sent again)."""
    return (
        reused and isinstance(exc, _STALE) and method in IDEMPOTENT_METHODS and not (body is not None and body.started)
    )


class Upstream:
    """Sends requests to next-hop through the worker's PoolManager."""

    def __init__(
        self,
        host: str,
        port: int,
        connect_timeout: float,
        read_timeout: float,
        maxsize: int,
    ) -> None:
        self.manager = PoolManager(
            num_pools=2,
            maxsize=maxsize,
            block=False,
            retries=False,
            timeout=Timeout(connect=connect_timeout, read=read_timeout),
        )
        self.manager.pool_classes_by_scheme = {"http": _Pool, "https": _Pool}
        self.pool: HTTPConnectionPool = self.manager.connection_from_host(host, port, scheme="http")
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout

    def check_out(self, dedicated: bool) -> HTTPConnection:
        """A connection for one request: an idle pooled one (or a new one in
        its place), or, if ``dedicated``, a new one that never joins the pool."""
        if dedicated:
            return HTTPConnection(self.host, self.port, timeout=self.connect_timeout)
        return internals.take_pooled(self.pool)  # the pool's ConnectionCls

    def check_in(self, conn: HTTPConnection, dedicated: bool, reuse: bool) -> None:
        """Return a connection taken with ``check_out``: pooled again if
        ``reuse``, else closed (freeing its pool slot for a new one)."""
        if reuse and not dedicated:
            internals.return_pooled(self.pool, conn)
            return
        conn.close()
        if not dedicated:
            internals.return_pooled(self.pool, None)

    def send(
        self,
        method: str,
        target: str,
        headers: list[Header],
        body: RequestBody | None,
        chunked: bool,
        upgrade: bool = False,
    ) -> tuple[Response, Timing]:
        """Send one request; return the answer with its head read.

        ``upgrade``: the request asks to switch protocols; it goes on a
        dedicated connection and a 101 is a valid answer. Raises
        UpstreamError with the status the client should get; errors reading
        the client's body (ClientBodyError and the like) pass through.
        """
        data = request_head(method, target, headers, chunked)
        start = time.perf_counter()
        for attempt in (1, 2):
            conn = self.check_out(upgrade)
            reused = conn.sock is not None
            connect_s = 0.0
            phase = "connect"
            try:
                sock = conn.sock
                if not reused:
                    began = time.perf_counter()
                    conn.connect()
                    connect_s = time.perf_counter() - began
                    sock = conn.sock
                    # Kept while pooled: nothing else sets a pooled socket's timeout.
                    sock.settimeout(self.read_timeout)
                metrics.upstream_connection(reused)
                phase = "send"
                send_request(sock, data, body, chunked)
                phase = "answer"
                reader = ResponseReader(method, upgrade)
                head = _read_head(sock, reader)
            except BaseException as exc:
                self.check_in(conn, upgrade, reuse=False)
                if attempt == 1 and may_retry(method, exc, reused, body):
                    continue
                mapped = failure(exc, phase, self.read_timeout)
                if mapped is exc:
                    raise
                raise mapped from exc
            return Response(head, reader, conn, self, upgrade), Timing(connect_s, time.perf_counter() - start)
        raise AssertionError("unreachable")


def failure(exc: BaseException, phase: str, read_timeout: float) -> BaseException:
    """What a failed exchange means for the client: an UpstreamError with the
    status and the reason to log; anything else (the client's own body
    failing, the greenlet being killed) goes on as it is. ``phase`` is
    ``connect``, ``send`` or ``answer``."""
    if isinstance(exc, NameResolutionError):
        return UpstreamError(502, f"cannot resolve next-hop: {exc.conn.host}", "unresolvable")
    if isinstance(exc, NewConnectionError):
        refused = isinstance(exc.__cause__, ConnectionRefusedError)
        return UpstreamError(502, f"cannot connect to next-hop: {exc}", "refused" if refused else "other")
    if isinstance(exc, ConnectTimeoutError):
        return UpstreamError(504, "connect to next-hop timed out", "timeout")
    if isinstance(exc, TimeoutError):
        if phase == "send":
            return UpstreamError(504, f"next-hop took no request body for {read_timeout:g}s", "timeout")
        return UpstreamError(504, f"next-hop sent no response within {read_timeout:g}s", "timeout")
    if isinstance(exc, _STALE):
        return UpstreamError(502, f"next-hop closed the connection before answering: {exc!r}", "reset")
    if isinstance(exc, ResponseError):
        return UpstreamError(502, f"invalid response from next-hop: {exc}", "invalid_answer")
    if isinstance(exc, OSError):
        return UpstreamError(502, f"connection to next-hop failed: {exc!r}", "other")
    return exc

"""The upstream client: HTTP/1.1 to next-hop over the worker's urllib3 pool.

One ``Upstream`` per worker, created after fork (from the app factory) and
shared by every greenlet of the worker. urllib3's PoolManager owns the
connections: it opens them (name resolution, connect timeout, socket
options), keeps idle ones, and drops dead ones before reuse. The proxy
frames each exchange on the pooled socket itself, for two reasons:

- strictness: a proxy and its next hop must agree byte for byte on where
  each answer ends (RFC 9112 section 6.3), or one client's request can be
  answered with another's response. http.client, which urllib3 reads
  answers with, is lenient where a proxy must not be (bare CR, unparsable
  lines, interim answers); ``parse_head`` refuses every such head.
- cost: urllib3's ``urlopen`` and http.client's email-based header parser
  took a third of the CPU time of a small proxied request.

Nothing is retried, with one exception: a pooled connection next-hop closed
while it sat idle is retried once on a new one, before any request body
byte has been read (see ``Upstream.send``).
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from urllib3 import HTTPConnectionPool, PoolManager
from urllib3.connection import HTTPConnection
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import Timeout

from .headers import Header, connection_tokens
from .sockets import BLOCK_SIZE, send_all

#: Longest response head accepted from next-hop (nginx refuses more than 8 KiB).
MAX_HEAD_BYTES = 64 * 1024
#: Most field lines accepted in a response head or in trailers.
MAX_FIELDS = 100


def upstream_target(raw_uri: str) -> str:
    """The request target for next-hop, byte for byte; absolute-form
    (``http://host/path``) is reduced to its path and query."""
    if raw_uri.startswith("/") or raw_uri == "*":
        return raw_uri
    scheme, sep, rest = raw_uri.partition("://")
    if sep and scheme.isalpha():
        slash = rest.find("/")
        query = rest.find("?")
        if slash == -1 or (query != -1 and query < slash):
            return "/" + rest[query:] if query != -1 else "/"
        return rest[slash:]
    return raw_uri


class UpstreamError(Exception):
    """The request could not be answered by next-hop; ``status`` is what the
    client gets and ``reason`` what the error log says."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ClientBodyError(Exception):
    """Reading the client's request body failed (bad chunked framing, or the
    client went away); the request cannot be completed."""


class ResponseError(Exception):
    """next-hop's answer breaks HTTP/1.1 framing; it is never relayed as it is."""


class _NoAnswer(ConnectionError):
    """next-hop closed the connection before sending a byte of its answer."""


# -- request -------------------------------------------------------------------------

_TOKENS = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+)*")


def request_head(method: str, target: str, headers: list[Header], chunked: bool) -> bytes:
    """The request line and field lines (plus ``Transfer-Encoding: chunked``
    for a chunked body), refusing anything that would make next-hop read a
    different request than the one meant: the fields come from the WSGI
    environ, which user middleware may have changed."""
    if chunked:
        headers = [*headers, ("Transfer-Encoding", "chunked")]
    head = "".join([method, " ", target, " HTTP/1.1\r\n", *[f"{n}: {v}\r\n" for n, v in headers], "\r\n"])
    try:
        data = head.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise UpstreamError(500, f"request header not encodable as latin-1: {exc}") from None
    lines = len(headers) + 2
    if (
        data.count(b"\n") != lines
        or data.count(b"\r") != lines
        or b"\0" in data
        or " " in target
        or not _TOKENS.fullmatch("\n".join([method, *[n for n, _ in headers]]))
    ):
        raise UpstreamError(500, "invalid request line or header for next-hop (set by middleware?)")
    return data


class RequestBody:
    """The client's body as an iterator, remembering whether reading began."""

    __slots__ = ("_input", "_remaining", "started", "bytes_read")

    def __init__(self, wsgi_input, length: int | None) -> None:
        self._input = wsgi_input
        self._remaining = length
        self.started = False
        self.bytes_read = 0

    def __iter__(self) -> Iterator[bytes]:
        self.started = True
        read = self._input.read
        remaining = self._remaining
        while remaining is None or remaining > 0:
            try:
                chunk = read(BLOCK_SIZE if remaining is None else min(BLOCK_SIZE, remaining))
            except Exception as exc:
                raise ClientBodyError(f"reading the request body failed: {exc!r}") from exc
            if not chunk:
                if remaining:
                    # next-hop was promised ``Content-Length`` bytes: ending
                    # short would let it take the start of the next request
                    # on a pooled connection for the rest of this body.
                    raise ClientBodyError(f"the client closed its body {remaining} bytes short of its Content-Length")
                break
            self.bytes_read += len(chunk)
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk


class BodyTooLarge(Exception):
    """The client's body passed ``upstream.max_body_bytes``."""


class LimitedBody(RequestBody):
    """A chunked request body that stops at the configured limit."""

    __slots__ = ("_limit",)

    def __init__(self, wsgi_input, limit: int) -> None:
        super().__init__(wsgi_input, None)
        self._limit = limit

    def __iter__(self) -> Iterator[bytes]:
        # Never ask for more than one byte past the limit: a read blocks until
        # it has all it asked for, and a client pausing after crossing the
        # limit must get its 413 now, not when it sends more.
        self.started = True
        read = self._input.read
        limit = self._limit
        while True:
            try:
                chunk = read(min(BLOCK_SIZE, limit - self.bytes_read + 1))
            except Exception as exc:
                raise ClientBodyError(f"reading the request body failed: {exc!r}") from exc
            if not chunk:
                return
            self.bytes_read += len(chunk)
            if self.bytes_read > limit:
                raise BodyTooLarge()
            yield chunk


def request_body(environ: dict, limit: int | None) -> tuple[RequestBody | None, bool]:
    """The client's body to forward, if any, and whether it is chunked.

    A Content-Length over ``limit`` was refused before this point (without
    reading the body); a chunked body is stopped when it crosses it.
    """
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        if limit is None:
            return RequestBody(environ["wsgi.input"], None), True
        return LimitedBody(environ["wsgi.input"], limit), True
    length = environ.get("CONTENT_LENGTH")
    if length and length != "0":
        return RequestBody(environ["wsgi.input"], int(length)), False
    return None, False


def send_body(sock: socket.socket, body: Iterable[bytes], chunked: bool) -> None:
    """Stream a request body to next-hop, chunk-framed if ``chunked``."""
    if not chunked:
        for chunk in body:
            send_all(sock, chunk)
        return
    for chunk in body:
        send_all(sock, b"%x\r\n%s\r\n" % (len(chunk), chunk))
    send_all(sock, b"0\r\n\r\n")


# -- response head -----------------------------------------------------------------------

#: The end of a head: a line end, then an empty line (bare LF line ends are
#: accepted, RFC 9112 section 2.2).
_HEAD_END = re.compile(rb"\n\r?\n")
#: A control character other than HTAB, CR and LF (RFC 9110 section 5.5).
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_STATUS_LINE = re.compile(r"HTTP/1\.([0-9]) ([0-9]{3})(?: (.*))?")
#: Field lines: a token, a colon straight after it, the value (any line end
#: is CRLF or LF: bare CRs were refused before). ``_FIELD_LINES`` checks the
#: whole block; ``_FIELD_LINE`` takes each name and value (whitespace before
#: the value skipped, after it still there).
_FIELD_LINES = re.compile(r"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n]*\r?\n)*")
_FIELD_LINE = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\r\n]*)\r?\n")
#: obs-fold: a line end followed by whitespace continues the value (RFC 9112
#: section 5.2: replaced by a space).
_OBS_FOLD = re.compile(r"\r?\n[ \t]+")


@dataclass(slots=True)
class Head:
    """A parsed response head, with its framing settled (RFC 9112 section 6.3)."""

    status: int
    reason: str
    #: The fields in order, obs-folds joined, and at most one Content-Length,
    #: in canonical form (``5, 5`` is 5).
    headers: list[Header]
    connection: str | None
    #: The body's Content-Length, if it has one.
    length: int | None
    chunked: bool
    #: Whether the connection may carry another request (HTTP/1.1, no ``close``).
    keep_alive: bool

    def header(self, name: str) -> str | None:
        """The first value of a field (names are case-insensitive)."""
        name = name.lower()
        return next((value for n, value in self.headers if n.lower() == name), None)


def parse_head(data: bytes) -> Head:
    """Parse one response head (the bytes up to, not including, its empty line).

    Raises ResponseError for any head that could be read two ways: a bare
    CR or control character, a line that is not a field, Transfer-Encoding
    other than a lone ``chunked``, Transfer-Encoding with Content-Length, or
    a Content-Length that is not one decimal number (``5, 7``, ``-5``, ``5x``).
    """
    if _CONTROL.search(data) or data.count(b"\r") != data.count(b"\r\n"):
        raise ResponseError(f"control character or bare CR in the response head: {data[:100]!r}")
    status, _, block = data.decode("latin-1").partition("\n")
    status_line = _STATUS_LINE.fullmatch(status.removesuffix("\r"))
    if status_line is None or status_line[2][0] == "0":  # no status below 100
        raise ResponseError(f"invalid status line: {status[:100]!r}")
    if block[:1] in (" ", "\t"):
        raise ResponseError("response head starts with a continuation line")
    if block and not block.endswith("\n"):
        block += "\n"
    if not _FIELD_LINES.fullmatch(block):
        block = _OBS_FOLD.sub(" ", block)
        if not _FIELD_LINES.fullmatch(block):
            line = next(line for line in block.splitlines() if not _FIELD_LINES.fullmatch(line + "\n"))
            raise ResponseError(f"invalid field line in the response head: {line[:100]!r}")
    fields = _FIELD_LINE.findall(block)
    if len(fields) > MAX_FIELDS:
        raise ResponseError(f"more than {MAX_FIELDS} fields in the response head")

    headers: list[Header] = []
    length = None
    codings: list[str] = []
    connection = None
    for name, value in fields:
        value = value.rstrip(" \t")
        lower = name.lower()
        if lower == "content-length":
            for part in value.split(","):
                part = part.strip(" \t")
                if not (part.isascii() and part.isdigit()) or (length is not None and int(part) != length):
                    raise ResponseError(f"invalid Content-Length {value!r}")
                length = int(part)
            continue
        if lower == "transfer-encoding":
            codings.extend(coding.strip(" \t").lower() for coding in value.split(","))
        elif lower == "connection":
            connection = value if connection is None else f"{connection}, {value}"
        headers.append((name, value))
    if codings and (codings != ["chunked"] or length is not None):
        raise ResponseError(f"ambiguous framing: Transfer-Encoding {codings}, Content-Length {length}")
    if length is not None:
        headers.append(("Content-Length", str(length)))
    keep_alive = status_line[1] == "1" and "close" not in connection_tokens(connection)
    return Head(
        status=int(status_line[2]),
        reason=status_line[3] or "",
        headers=headers,
        connection=connection,
        length=length,
        chunked=bool(codings),
        keep_alive=keep_alive,
    )


def _read_head(sock: socket.socket, buffered: bytes) -> tuple[bytes, bytes]:
    """Read until one head is complete: (the head, the bytes after it)."""
    data = buffered
    searched = 0
    while True:
        end = _HEAD_END.search(data, searched, MAX_HEAD_BYTES)
        if end is not None:
            return data[: end.start() + 1], data[end.end() :]
        if len(data) >= MAX_HEAD_BYTES:
            raise ResponseError(f"response head longer than {MAX_HEAD_BYTES} bytes")
        searched = max(len(data) - 2, 0)
        more = sock.recv(BLOCK_SIZE)
        if not more:
            if data:
                raise ResponseError("next-hop closed the connection in the middle of the response head")
            raise _NoAnswer("next-hop closed the connection before answering")
        data += more


# -- response body -----------------------------------------------------------------------

#: A chunk-size line, with any chunk extensions (RFC 9112 section 7.1.1).
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?")

_NO_BODY, _LENGTH, _CHUNKED, _UNTIL_CLOSE = range(4)


class Response:
    """next-hop's answer: the head parsed, the body still on the socket.

    Read the body with ``read1`` until it returns ``b""``, then call
    ``release``, which pools the connection only if the answer was read to
    its exact end and the connection may carry another request.
    """

    __slots__ = ("head", "sock", "_buffer", "_mode", "_left", "_chunk_open", "_done", "_reusable", "_conn", "_pool")

    def __init__(self, head: Head, sock: socket.socket, buffered: bytes, method: str) -> None:
        self.head = head
        self.sock = sock
        self._buffer = buffered
        self._left = 0
        self._chunk_open = False
        self._conn: HTTPConnection | None = None
        self._pool: HTTPConnectionPool | None = None
        status = head.status
        if method == "HEAD" or status in (204, 304) or status < 200:
            # No body, whatever the head says; and a body sent anyway may
            # arrive after the connection went back to the pool, to be read
            # as the answer to the next request on it: never pool these.
            self._mode, self._done, self._reusable = _NO_BODY, True, False
        elif head.chunked:
            self._mode, self._done, self._reusable = _CHUNKED, False, head.keep_alive
        elif head.length is not None:
            self._mode, self._done, self._reusable = _LENGTH, head.length == 0, head.keep_alive
            self._left = head.length
        else:
            self._mode, self._done, self._reusable = _UNTIL_CLOSE, False, False

    @property
    def status(self) -> int:
        return self.head.status

    def buffered(self) -> bytes:
        """Take the bytes read past the head and not yet returned (after a
        101, the first bytes of the new protocol)."""
        data, self._buffer = self._buffer, b""
        return data

    def read1(self, size: int = BLOCK_SIZE) -> bytes:
        """Up to ``size`` body bytes, at most one socket read; ``b""`` at the end.

        Raises ResponseError, or OSError, if the body breaks off or its
        framing is invalid.
        """
        if self._done:
            return b""
        mode = self._mode
        if mode == _LENGTH:
            data = self._take(min(size, self._left))
            self._left -= len(data)
            self._done = self._left == 0
            return data
        if mode == _CHUNKED:
            return self._read_chunked(size)
        data = self._take(size, eof_ok=True)
        self._done = not data
        return data

    def _take(self, size: int, eof_ok: bool = False) -> bytes:
        buffered = self._buffer
        if buffered:
            data, self._buffer = buffered[:size], buffered[size:]
            return data
        data = self.sock.recv(size)
        if not data and not eof_ok:
            raise ResponseError("next-hop closed the connection before the end of the body")
        return data

    def _read_chunked(self, size: int) -> bytes:
        if not self._left:
            if self._chunk_open and self._line(2) != b"":
                raise ResponseError("chunk data not followed by CRLF")
            line = self._line(1024)
            match = _CHUNK_SIZE.fullmatch(line)
            if match is None:
                raise ResponseError(f"invalid chunk-size line {line[:100]!r}")
            self._left = int(match[1], 16)
            self._chunk_open = True
            if not self._left:
                for _ in range(MAX_FIELDS + 1):  # trailer fields, dropped
                    if not self._line(MAX_HEAD_BYTES):
                        self._done = True
                        return b""
                raise ResponseError(f"more than {MAX_FIELDS} trailer fields")
        data = self._take(min(size, self._left))
        self._left -= len(data)
        return data

    def _line(self, limit: int) -> bytes:
        """One line of chunked framing, without its line end."""
        buffered = self._buffer
        while True:
            end = buffered.find(b"\n", 0, limit + 1)
            if end != -1:
                line, self._buffer = buffered[:end], buffered[end + 1 :]
                return line[:-1] if line.endswith(b"\r") else line
            if len(buffered) > limit:
                raise ResponseError("chunked framing line too long")
            more = self.sock.recv(BLOCK_SIZE)
            if not more:
                raise ResponseError("next-hop closed the connection inside the chunked framing")
            buffered += more

    def release(self) -> None:
        """Return the connection to its pool if the answer ended exactly and
        the connection may carry another request; close it otherwise."""
        conn, self._conn = self._conn, None
        if conn is None:
            if self._pool is None:
                self.sock.close()  # a dedicated connection
            return
        if self._done and self._reusable and not self._buffer:
            self._pool._put_conn(conn)
        else:
            conn.close()
            self._pool._put_conn(None)  # a free slot for a new connection


def read_response(sock: socket.socket, method: str, upgrade: bool = False) -> Response:
    """Read the final answer's head (interim 1xx answers skipped; 101 only
    if the request asked for an upgrade) and return it, body unread."""
    head, rest = _read_head(sock, b"")
    while True:
        parsed = parse_head(head)
        if parsed.status == 101 and not upgrade:
            raise ResponseError("101 Switching Protocols to a request that asked for no upgrade")
        if parsed.status == 101 or not 100 <= parsed.status < 200:
            return Response(parsed, sock, rest, method)
        # 100 Continue, 102, 103 Early Hints: taking one for the final
        # answer would pair the next answer on the connection with this request.
        head, rest = _read_head(sock, rest)


# -- the pool -------------------------------------------------------------------------


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
        raw = getattr(sock, "_sock", sock)  # under gevent, the OS socket is wrapped
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

    def send(
        self,
        method: str,
        target: str,
        headers: list[Header],
        body: RequestBody | None,
        chunked: bool,
    ) -> tuple[Response, Timing]:
        """Send one request; return the answer with its head read.

        Raises UpstreamError with the status the client should get; errors
        reading the client's body (ClientBodyError and the like) pass through.
        """
        data = request_head(method, target, headers, chunked)
        pool = self.pool
        start = time.perf_counter()
        for attempt in (1, 2):
            conn = pool._get_conn()
            reused = conn.sock is not None
            connect_s = 0.0
            phase = "connect"
            try:
                if not reused:
                    began = time.perf_counter()
                    conn.connect()
                    connect_s = time.perf_counter() - began
                sock = conn.sock
                sock.settimeout(self.read_timeout)
                phase = "send"
                send_all(sock, data)
                if body is not None:
                    send_body(sock, body, chunked)
                phase = "answer"
                response = read_response(sock, method)
            except BaseException as exc:
                conn.close()
                pool._put_conn(None)
                stale = isinstance(exc, (_NoAnswer, ConnectionResetError, BrokenPipeError))
                if stale and reused and attempt == 1 and not (body is not None and body.started):
                    continue
                failure = _failure(exc, phase, self.read_timeout)
                if failure is exc:
                    raise
                raise failure from exc
            response._conn, response._pool = conn, pool
            return response, Timing(connect_s, time.perf_counter() - start)
        raise AssertionError("unreachable")


def _failure(exc: BaseException, phase: str, read_timeout: float) -> BaseException:
    """What a failed exchange means for the client: an UpstreamError with the
    status and the reason to log; anything else (the client's own body
    failing, the greenlet being killed) goes on as it is."""
    if isinstance(exc, NameResolutionError):
        return UpstreamError(502, f"cannot resolve next-hop: {exc.conn.host}")
    if isinstance(exc, NewConnectionError):
        return UpstreamError(502, f"cannot connect to next-hop: {exc}")
    if isinstance(exc, ConnectTimeoutError):
        return UpstreamError(504, "connect to next-hop timed out")
    if isinstance(exc, TimeoutError):
        if phase == "send":
            return UpstreamError(504, f"next-hop took no request body for {read_timeout:g}s")
        return UpstreamError(504, f"next-hop sent no response within {read_timeout:g}s")
    if isinstance(exc, (_NoAnswer, ConnectionResetError, BrokenPipeError)):
        return UpstreamError(502, f"next-hop closed the connection before answering: {exc!r}")
    if isinstance(exc, ResponseError):
        return UpstreamError(502, f"invalid response from next-hop: {exc}")
    if isinstance(exc, OSError):
        return UpstreamError(502, f"connection to next-hop failed: {exc!r}")
    return exc

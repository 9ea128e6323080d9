"""The upstream client: one urllib3 pool to next-hop per worker.

Created after fork (from the app factory), shared by every greenlet of the
worker. Retries and redirects are off: a streamed body cannot be replayed
and a proxy relays redirects. The one exception is a pooled connection the
origin closed while it sat idle, which is retried once before any request
body byte has been read (see ``send``).
"""

from __future__ import annotations

import http.client
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

from urllib3 import HTTPConnectionPool, PoolManager
from urllib3.connection import HTTPConnection
from urllib3.exceptions import (
    ConnectTimeoutError,
    InvalidHeader,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.response import BaseHTTPResponse
from urllib3.util import SKIP_HEADER, Timeout

from .headers import HeaderList

#: Bytes read from a socket at a time, in both directions.
BLOCK_SIZE = 64 * 1024

#: Headers urllib3 would invent when the client did not send them; a
#: ``SKIP_HEADER`` value tells it not to, and is never sent itself.
_NO_INVENTED_HEADERS = (
    ("Host", SKIP_HEADER),
    ("User-Agent", SKIP_HEADER),
    ("Accept-Encoding", SKIP_HEADER),
)

#: The socket errors that mean "the pooled connection was already dead".
_STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


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
    """next-hop could not give an answer; ``status`` is what the client gets."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ClientBodyError(Exception):
    """Reading the client's request body failed (bad chunked framing, or the
    client went away); the request cannot be completed."""


class _HeadReader:
    """The socket file of one response, checking the lines of its head.

    http.client hands the head to the email parser, which takes a bare CR for
    a line break (one field becomes two) and silently ends the head at a line
    it cannot parse. RFC 9112 sections 2.2 and 5.1 make both errors; here
    they fail the response (502) instead. Body reads pass straight through.
    """

    __slots__ = ("_fp", "checking", "_status_line")

    def __init__(self, fp) -> None:
        self._fp = fp
        self.checking = True
        self._status_line = True

    def readline(self, limit: int = -1) -> bytes:
        line = self._fp.readline(limit)
        if not self.checking:
            return line
        content = line[:-2] if line.endswith(b"\r\n") else line.rstrip(b"\n")
        if _CONTROL.search(content):
            raise http.client.HTTPException(f"control character (bare CR, NUL...) in the response head: {line[:100]!r}")
        if not content:
            self._status_line = True  # the end of one head (an interim one may follow)
        elif self._status_line:
            self._status_line = False
        elif content[:1] not in (b" ", b"\t") and not _FIELD_NAME.match(content):
            raise http.client.HTTPException(f"invalid field line in the response head: {line[:100]!r}")
        return line

    def __getattr__(self, name: str):
        return getattr(self._fp, name)


#: A field line starts with a token and a colon, no whitespace between.
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:")
#: No control character but HTAB anywhere in a head (RFC 9110 section 5.5).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class _StrictResponse(http.client.HTTPResponse):
    """http.client's response, without the leniencies that would let next-hop
    and the client disagree about where an answer ends.

    - An interim 1xx answer other than 100 (102, 103 Early Hints) is skipped
      like 100; http.client would take it for the final answer, and the
      client would then pair the next answer on its connection with this
      request.
    - 101 is refused: pooled requests never ask to switch protocols (an
      upgrade goes through ``proxy.tunnel`` on its own connection).
    - The head's lines are checked (``_HeadReader``).
    """

    def __init__(self, sock, *args, **kwargs) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp = _HeadReader(self.fp)

    def _read_status(self):
        while True:
            version, status, reason = super()._read_status()
            if status == 101:
                raise http.client.HTTPException("101 Switching Protocols to a request that asked for no upgrade")
            if status == http.client.CONTINUE or not 100 <= status < 200:
                return version, status, reason
            http.client._read_headers(self.fp)  # type: ignore[attr-defined]

    def begin(self) -> None:
        fp = self.fp
        super().begin()
        fp.checking = False


class TimedConnection(HTTPConnection):
    """Records how long the TCP connect took, for the access log; reads
    answers strictly (``_StrictResponse``); sends the request body with the
    read timeout (urllib3 would keep the connect timeout while sending, so a
    next-hop slow to take a large upload would fail after a few seconds)."""

    response_class = _StrictResponse
    connect_s = 0.0

    def __init__(self, *args, send_timeout: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.send_timeout = send_timeout

    def connect(self) -> None:
        start = time.perf_counter()
        super().connect()
        self.connect_s = time.perf_counter() - start

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

    def endheaders(self, message_body=None, *, encode_chunked: bool = False) -> None:
        super().endheaders(message_body, encode_chunked=encode_chunked)
        if self.send_timeout is not None and self.sock is not None:
            self.sock.settimeout(self.send_timeout)


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


@dataclass(frozen=True)
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
        self.pool.conn_kw["send_timeout"] = read_timeout  # passed to each TimedConnection
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout

    def send(
        self,
        method: str,
        target: str,
        headers: HeaderList,
        body: RequestBody | None,
        chunked: bool,
    ) -> tuple[BaseHTTPResponse, Timing]:
        """Send one request; return the response with its head read.

        Raises UpstreamError with the status the client should get.
        """
        headers.extend(_NO_INVENTED_HEADERS)
        start = time.perf_counter()
        for attempt in (1, 2):
            try:
                response = self.pool.urlopen(
                    method,
                    target if target.startswith("/") else "/",
                    target=target,
                    body=body,
                    headers=headers,
                    chunked=chunked,
                    retries=False,
                    redirect=False,
                    assert_same_host=False,
                    preload_content=False,
                    decode_content=False,
                    release_conn=False,
                )
            except ProtocolError as exc:
                cause = exc.args[1] if len(exc.args) > 1 else exc
                if attempt == 1 and isinstance(cause, _STALE_CONNECTION) and not (body and body.started):
                    continue
                if isinstance(cause, _STALE_CONNECTION):
                    raise UpstreamError(502, f"next-hop closed the connection before answering: {cause!r}") from exc
                if isinstance(cause, TimeoutError):
                    raise UpstreamError(504, f"next-hop took no request body for {self.read_timeout:g}s") from exc
                raise UpstreamError(502, f"invalid response from next-hop: {cause!r}") from exc
            except NameResolutionError as exc:
                raise UpstreamError(502, f"cannot resolve next-hop: {exc.conn.host}") from exc
            except NewConnectionError as exc:
                raise UpstreamError(502, f"cannot connect to next-hop: {exc}") from exc
            except ConnectTimeoutError as exc:
                raise UpstreamError(504, "connect to next-hop timed out") from exc
            except ReadTimeoutError as exc:
                raise UpstreamError(504, f"next-hop sent no response within {self.read_timeout:g}s") from exc
            except (http.client.HTTPException, OSError) as exc:
                raise UpstreamError(502, f"invalid response from next-hop: {exc!r}") from exc
            except InvalidHeader as exc:  # e.g. Content-Length: 5, 7
                raise UpstreamError(502, f"invalid response from next-hop: {exc}") from exc
            first_byte_s = time.perf_counter() - start
            conn = response.connection
            connect_s = 0.0
            if conn is not None:
                connect_s, conn.connect_s = conn.connect_s, 0.0
            return response, Timing(connect_s, first_byte_s)
        raise AssertionError("unreachable")


class _Pool(HTTPConnectionPool):
    """urllib3's pool, sending the request target exactly as given.

    ``urlopen`` re-encodes targets (``%7e`` becomes ``%7E``, fragments are
    dropped); a proxy must not, so the raw target travels alongside as the
    ``target`` keyword and replaces the normalised one at the last step.
    """

    ConnectionCls = TimedConnection

    def _make_request(self, conn, method, url, *args, target: str | None = None, **kwargs):
        return super()._make_request(conn, method, target or url, *args, **kwargs)

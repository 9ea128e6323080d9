"""A raw-socket origin for the hostile-input tests.

Unlike ``origin.Origin`` it trusts nothing it receives: every byte of every
connection is recorded as it arrived (``RawOrigin.streams``), and each
request is parsed with a *strict* RFC 9112 reader that notes anything a
lenient server could read differently (``Request.problems``): bare LF or CR,
obs-fold, whitespace before a colon, control bytes, duplicate or non-numeric
Content-Length, Content-Length together with Transfer-Encoding, any transfer
coding other than a lone ``chunked``, malformed chunk-size lines, and any
head h11 (a second, independent reader) refuses. A proxy
that forwards an ambiguous request shows up as a problem; a proxy that turns
one client request into two shows up as two ``Request`` records.

Answers are scripted per path (``RawOrigin.on``): raw bytes sent exactly as
given (malformed responses included), then keep the connection, close it,
reset it or stall. Unscripted paths get a small valid 200 whose body names
the request (``ok <method> <target> conn=<n> req=<i>``), so a client that
receives an answer meant for another request can tell.

Threads are daemons, every socket read has a timeout, and ``stop()`` closes
every socket it opened.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import h11

TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
FIELD_VALUE = re.compile(rb"[\t \x21-\x7e\x80-\xff]*")
TARGET = re.compile(rb"[\x21-\x7e]+")
VERSION = re.compile(rb"HTTP/1\.[01]")
CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})((?:[ \t]*;[^\r\n]*)?)")

MAX_HEAD = 256 * 1024
READ_TIMEOUT = 30.0


class Malformed(Exception):
    """The stream cannot be read as HTTP/1.1 any further."""


@dataclass
class Request:
    conn: int
    index: int  # position on its connection, from 0
    raw_head: bytes  # request line and fields, CRLFs included, up to the blank line
    method: bytes = b""
    target: bytes = b""
    version: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    framing: str = "none"  # "none", "length" or "chunked"
    length: int | None = 0
    body: bytes = b""
    raw_body: bytes = b""  # the body as framed on the wire (chunk lines included)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    complete: bool = False  # the whole body arrived, as framed

    def all(self, name: str) -> list[bytes]:
        key = name.lower().encode()
        return [v for k, v in self.headers if k.lower() == key]

    def header(self, name: str) -> bytes | None:
        values = self.all(name)
        return b", ".join(values) if values else None

    @property
    def path(self) -> str:
        return self.target.split(b"?", 1)[0].decode("latin-1")


@dataclass
class Reply:
    """A scripted answer: ``data`` sent as is, then ``after`` happens.

    ``after``: ``keep`` (read the next request), ``close`` (FIN), ``reset``
    (RST), ``stall`` (never send anything else, hold the socket until the
    origin stops or ``stall_s`` passes). ``delay_s`` waits before sending;
    ``parts`` splits ``data`` into that many writes 50 ms apart.
    """

    data: bytes = b""
    after: str = "keep"
    delay_s: float = 0.0
    parts: int = 1
    stall_s: float = 60.0
    early: bool = False  # answer as soon as the head is read, then read the body


Action = Reply | bytes | Callable[["RawOrigin", socket.socket, Request], Reply | bytes | None]


def ok_reply(request: Request, extra: bytes = b"") -> bytes:
    body = b"ok %s %s conn=%d req=%d\n" % (request.method, request.target, request.conn, request.index)
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


class RawOrigin:
    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.requests: list[Request] = []
        self.streams: dict[int, bytearray] = {}  # connection number -> every byte received
        self.peers: dict[int, tuple[str, int]] = {}  # connection number -> peer address
        self.closed: set[int] = set()  # connections that ended
        self.errors: dict[int, str] = {}  # connection number -> why reading stopped
        self.connections = 0
        self.script: dict[str, Action] = {}
        self.release = threading.Event()  # set to end every "hold" at once
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._stop = threading.Event()

    # -- life cycle --------------------------------------------------------------

    def start(self) -> RawOrigin:
        self._listener = socket.create_server((self.host, 0), backlog=1024)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name="raw-origin-accept").start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.release.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self) -> RawOrigin:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.streams.clear()
            self.errors.clear()
            self.closed.clear()
            self.peers.clear()
            self.script.clear()
            self.release.clear()

    def on(self, path: str, action: Action) -> None:
        """Answer requests whose path (target before ``?``) is ``path`` with ``action``."""
        self.script[path] = action

    # -- what was received ----------------------------------------------------------

    def received(self, path_prefix: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path.startswith(path_prefix)]

    def all_bytes(self) -> bytes:
        with self._lock:
            return b"".join(bytes(s) for s in self.streams.values())

    def wait_requests(self, count: int, timeout: float = 10.0) -> list[Request]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.requests) >= count:
                    return list(self.requests)
            time.sleep(0.01)
        raise AssertionError(f"origin got {len(self.requests)} requests, expected {count}")

    # -- serving --------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
                self.streams[number] = bytearray()
                self.peers[number] = peer
                self._sockets.add(conn)
            threading.Thread(target=self._serve, args=(conn, number), daemon=True, name=f"raw-origin-{number}").start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(READ_TIMEOUT)
        reader = _Reader(conn, self, number)
        index = 0
        try:
            while not self._stop.is_set():
                request = read_head(reader, number, index)
                if request is None:
                    return
                index += 1
                action = self._action(conn, request)
                if action.early:
                    keep = self._send(conn, action)
                try:
                    read_body(reader, request)
                finally:  # recorded even when its body cannot be read
                    with self._lock:
                        self.requests.append(request)
                if not action.early:
                    keep = self._send(conn, self._action(conn, request, resolve=True))
                if not keep:
                    return
        except (Malformed, OSError) as exc:
            with self._lock:
                self.errors[number] = repr(exc)
        finally:
            with self._lock:
                self.closed.add(number)
                self._sockets.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def _action(self, conn: socket.socket, request: Request, resolve: bool = False) -> Reply:
        """The scripted answer; callables run only once the body is read (``resolve``)."""
        action = self.script.get(request.path)
        if action is None and request.path.startswith("/hold"):
            action = _hold
        if callable(action):
            if not resolve:
                return Reply()
            action = action(self, conn, request)
        if action is None:
            action = ok_reply(request)
        if isinstance(action, bytes):
            action = Reply(action)
        return action

    def _send(self, conn: socket.socket, action: Reply) -> bool:
        if action.delay_s:
            time.sleep(action.delay_s)
        data = action.data
        step = max(1, -(-len(data) // action.parts)) if data else 1
        for i in range(0, len(data), step):
            conn.sendall(data[i : i + step])
            if action.parts > 1:
                time.sleep(0.05)
        if action.after == "keep":
            return True
        if action.after == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif action.after == "stall":
            self._stop.wait(action.stall_s)
        return False


def _hold(origin: RawOrigin, conn: socket.socket, request: Request) -> bytes:
    """``/hold...``: answer only once ``origin.release`` is set (at most 60 s)."""
    origin.release.wait(60)
    return ok_reply(request)


# -- the strict reader ------------------------------------------------------------------


class _Reader:
    """Buffered reads from a socket; every byte is recorded in ``origin.streams``."""

    def __init__(self, sock: socket.socket, origin: RawOrigin, number: int) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.origin = origin
        self.number = number

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        with self.origin._lock:
            self.origin.streams.setdefault(self.number, bytearray()).extend(data)
        self.buf.extend(data)
        return True

    def until(self, terminator: bytes, limit: int) -> bytes | None:
        """Bytes up to and including ``terminator``; None on a clean EOF before any byte."""
        start = 0
        while True:
            idx = self.buf.find(terminator, start)
            if idx >= 0:
                end = idx + len(terminator)
                out = bytes(self.buf[:end])
                del self.buf[:end]
                return out
            if len(self.buf) > limit:
                raise Malformed(f"no {terminator!r} within {limit} bytes")
            start = max(0, len(self.buf) - len(terminator) + 1)
            if not self._fill():
                if self.buf:
                    raise Malformed(f"EOF inside a message: {bytes(self.buf[:80])!r}")
                return None

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise Malformed(f"EOF after {len(self.buf)} of {n} body bytes")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


def parse_head(raw: bytes, request: Request) -> None:
    """Strictly parse a request head (everything before the blank line)."""
    problems = request.problems
    if b"\r\n" not in raw + b"\r\n":
        problems.append("no CRLF")
    for bad, what in ((b"\x00", "NUL"),):
        if bad in raw:
            problems.append(f"{what} in head")
    lines = raw.split(b"\r\n")
    for line in lines:
        if b"\n" in line:
            problems.append(f"bare LF in {line[:60]!r}")
        if b"\r" in line:
            problems.append(f"bare CR in {line[:60]!r}")
    request_line, *field_lines = lines
    parts = request_line.split(b" ")
    if len(parts) != 3:
        problems.append(f"request line {request_line[:80]!r}")
        parts = (parts + [b"", b"", b""])[:3]
    request.method, request.target, request.version = parts
    if not TOKEN.fullmatch(request.method):
        problems.append(f"method {request.method!r}")
    if not TARGET.fullmatch(request.target):
        problems.append(f"target {request.target!r}")
    if not VERSION.fullmatch(request.version):
        problems.append(f"version {request.version!r}")
    for line in field_lines:
        if line[:1] in (b" ", b"\t"):
            problems.append(f"obs-fold {line[:60]!r}")
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            problems.append(f"field line without colon {line[:60]!r}")
            continue
        if not TOKEN.fullmatch(name):
            problems.append(f"field name {name[:60]!r}")
        if not FIELD_VALUE.fullmatch(value):
            problems.append(f"field value of {name[:60]!r}: {value[:60]!r}")
        request.headers.append((name, value.strip(b" \t")))


def framing_of(request: Request) -> tuple[str, int | None]:
    """The framing RFC 9112 section 6.3 gives the request, noting every ambiguity."""
    problems = request.problems
    lengths = request.all("Content-Length")
    codings = [c.strip(b" \t").lower() for v in request.all("Transfer-Encoding") for c in v.split(b",")]
    if len(lengths) > 1:
        problems.append(f"{len(lengths)} Content-Length fields: {lengths!r}")
    if lengths and codings:
        problems.append("Content-Length with Transfer-Encoding")
    if codings and codings != [b"chunked"]:
        problems.append(f"Transfer-Encoding {codings!r}")
    if codings:
        if request.version != b"HTTP/1.1":
            problems.append("Transfer-Encoding on HTTP/1.0")
        return ("chunked", None) if codings[-1] == b"chunked" else ("close", None)
    if lengths:
        if not re.fullmatch(rb"[0-9]+", lengths[0]):
            problems.append(f"Content-Length {lengths[0]!r}")
            return "unreadable", None
        if lengths[0] != b"0" and lengths[0].startswith(b"0"):
            problems.append(f"Content-Length with leading zero {lengths[0]!r}")
        return "length", int(lengths[0])
    return "none", 0


def read_head(reader: _Reader, conn: int, index: int) -> Request | None:
    head = reader.until(b"\r\n\r\n", MAX_HEAD)
    if head is None:
        return None
    request = Request(conn, index, head)
    leading = head
    if leading.startswith(b"\r\n"):
        request.problems.append("empty line before the request line")
        leading = leading.lstrip(b"\r\n")
    parse_head(leading[:-4], request)
    request.framing, request.length = framing_of(request)
    refusal = h11_refusal(leading)
    if refusal:
        request.problems.append(f"h11 refuses the head: {refusal}")
    return request


def h11_refusal(head: bytes) -> str | None:
    """Why h11, read as a second opinion independent of the strict reader
    above, refuses this request head (ending in its blank line); None if it
    reads it. The strict reader stays: it names each problem and reads on
    past one, so a request smuggled behind it shows up as its own record."""
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    parser.receive_data(head)
    try:
        event = parser.next_event()
    except h11.RemoteProtocolError as exc:
        return str(exc)
    return None if isinstance(event, h11.Request) else f"no request: {event!r}"


def read_body(reader: _Reader, request: Request) -> None:
    if request.framing == "length":
        request.body = request.raw_body = reader.exactly(request.length)
    elif request.framing == "chunked":
        _read_chunked(reader, request)
    elif request.framing in ("close", "unreadable"):
        raise Malformed(f"request body framing: {request.framing}")
    request.complete = True


def _read_chunked(reader: _Reader, request: Request) -> None:
    raw, body = bytearray(), bytearray()
    while True:
        line = reader.until(b"\r\n", 8192)
        if line is None:
            raise Malformed("EOF before chunk-size line")
        raw += line
        match = CHUNK_LINE.fullmatch(line[:-2])
        if not match:
            request.problems.append(f"chunk-size line {line[:60]!r}")
            raise Malformed("bad chunk-size line")
        if match.group(2):
            request.problems.append(f"chunk extension {match.group(2)[:60]!r}")
        size = int(match.group(1), 16)
        if size == 0:
            break
        data = reader.exactly(size + 2)
        raw += data
        if data[-2:] != b"\r\n":
            request.problems.append("chunk data not followed by CRLF")
            raise Malformed("chunk without CRLF")
        body += data[:-2]
    while True:  # trailer section
        line = reader.until(b"\r\n", 8192)
        if line is None:
            raise Malformed("EOF in trailer section")
        raw += line
        if line == b"\r\n":
            break
        name, _, value = line[:-2].partition(b":")
        request.trailers.append((name, value.strip(b" \t")))
    request.body, request.raw_body = bytes(body), bytes(raw)


def parse_response(data: bytes, head_request: bool = False) -> tuple[int, bytes, bytes, int] | None:
    """The first response in ``data`` as (status, head, body, bytes used),
    or None while it is incomplete. Strict: CRLF line ends, one framing
    (Content-Length or chunked, or none for a bodiless status or a HEAD),
    a head with both framings or a repeated one raises ``Malformed``.
    A response with neither runs to the end of ``data`` (close-delimited):
    it is returned only once the caller says the stream ended, so here it
    counts as incomplete.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) > MAX_HEAD:
            raise Malformed("response head too long")
        return None
    head, pos = data[:end], end + 4
    status_line, *lines = head.split(b"\r\n")
    match = re.fullmatch(rb"HTTP/1\.[01] ([0-9]{3})(?: [\t \x21-\x7e\x80-\xff]*)?", status_line)
    if not match:
        raise Malformed(f"status line {status_line[:120]!r}")
    status = int(match.group(1))
    fields: dict[bytes, bytes] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not TOKEN.fullmatch(name) or not FIELD_VALUE.fullmatch(value):
            raise Malformed(f"response field line {line[:120]!r}")
        key = name.lower()
        if key in fields and key in (b"content-length", b"transfer-encoding"):
            raise Malformed(f"repeated {name!r} in a response")
        fields[key] = value.strip(b" \t")
    if b"content-length" in fields and b"transfer-encoding" in fields:
        raise Malformed("response with Content-Length and Transfer-Encoding")
    if head_request or status in (204, 304) or 100 <= status < 200:
        return status, head, b"", pos
    coding = fields.get(b"transfer-encoding")
    if coding is not None:
        if coding.lower() != b"chunked":
            raise Malformed(f"response Transfer-Encoding {coding!r}")
        body = bytearray()
        while True:
            line_end = data.find(b"\r\n", pos)
            if line_end < 0:
                return None
            match = CHUNK_LINE.fullmatch(data[pos:line_end])
            if not match:
                raise Malformed(f"response chunk-size line {data[pos:line_end][:60]!r}")
            size = int(match.group(1), 16)
            pos = line_end + 2
            if size == 0:
                while True:  # trailer section
                    line_end = data.find(b"\r\n", pos)
                    if line_end < 0:
                        return None
                    empty = line_end == pos
                    pos = line_end + 2
                    if empty:
                        return status, head, bytes(body), pos
            if len(data) < pos + size + 2:
                return None
            if data[pos + size : pos + size + 2] != b"\r\n":
                raise Malformed("response chunk not followed by CRLF")
            body += data[pos : pos + size]
            pos += size + 2
    length = fields.get(b"content-length")
    if length is not None:
        if not re.fullmatch(rb"[0-9]+", length):
            raise Malformed(f"response Content-Length {length!r}")
        if len(data) < pos + int(length):
            return None
        return status, head, data[pos : pos + int(length)], pos + int(length)
    return None  # close-delimited


def split_responses(data: bytes, closed: bool = True, head_requests: tuple[int, ...] = ()) -> list[Response]:
    """Every response in ``data``; ``head_requests`` lists the positions of
    responses to HEAD requests. If ``closed`` (the stream ended there) a last
    close-delimited or incomplete response is included with ``complete``
    false; otherwise an incomplete one raises ``Malformed``."""
    out: list[Response] = []
    pos = 0
    while pos < len(data):
        parsed = parse_response(data[pos:], head_request=len(out) in head_requests)
        if parsed is None:
            if not closed:
                raise Malformed(f"incomplete response: {data[pos : pos + 120]!r}")
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:
                raise Malformed(f"incomplete response head: {data[pos : pos + 120]!r}")
            head = data[pos:end]
            out.append(Response(int(head[9:12]), head, data[end + 4 :], False))
            break
        status, head, body, used = parsed
        out.append(Response(status, head, body, True))
        pos += used
    return out


@dataclass
class Response:
    status: int
    head: bytes
    body: bytes
    complete: bool

    def header(self, name: str) -> bytes | None:
        key = name.lower().encode() + b":"
        for line in self.head.split(b"\r\n")[1:]:
            if line.lower().startswith(key):
                return line[len(key) :].strip(b" \t")
        return None

"""A scriptable HTTP/1.1 origin for the tests, on raw sockets in threads.

It records exactly what it receives (raw head bytes, header fields in their
original case and order, body size and hash, per-connection request counts)
and misbehaves on request: stall, reset, truncate, close a kept-alive
connection as it is reused. Requests are read with h11 (``RequestReader``),
not by hand, so the oracle shares no parsing with the proxy under test; the
answers are written as raw bytes, broken ones included. Paths:

- ``/bytes/N``            N bytes, Content-Length framing
- ``/chunked/N``          N bytes, chunked framing
- ``/slow/N/SECONDS``     N bytes, sent in 10 parts over SECONDS
- ``/stall``              never answers
- ``/truncate/N``         announces N bytes, sends half, then closes
- ``/reset/N``            announces N bytes, sends half, then resets
- ``/status/CODE``        empty answer with that status
- ``/cookies``            several Set-Cookie and Vary headers
- ``/server``             custom Server and Date headers
- ``/redirect``           302 with a Location
- ``/hop``                hop-by-hop headers that must not reach the client
- ``/drop-next``          answers, then closes the connection without
                          answering the next request on it
- ``/cache/...?QUERY``     the caching tests' block (see ``_cache_answer``)
- anything else           200 with a small body

Every answer carries ``X-Origin-Conn`` (connection number) and the request's
body length and SHA-256 as ``X-Body-Length``/``X-Body-Sha256``.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field

import h11

__all__ = ["PATTERN", "Origin", "Received", "RequestReader", "pattern_bytes"]

PATTERN = bytes(range(256)) * 4096  # 1 MiB
MAX_HEAD = 1 << 20  # h11's bound on a request head; the proxy's own limits are far lower


def pattern_bytes(n: int) -> bytes:
    """The first ``n`` bytes of the repeating pattern the origin serves."""
    full, rest = divmod(n, len(PATTERN))
    return PATTERN * full + PATTERN[:rest]


class RequestReader:
    """Requests off one socket, read by h11, with each head's bytes as they arrived.

    A fresh server-side ``h11.Connection`` reads each request: the origins
    write their answers as raw bytes (some deliberately broken), so h11
    never sees a response and could not move on to the next request itself.
    Bytes read past a request (the next pipelined one, or what follows an
    Upgrade) are carried over in ``pending``.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = b""
        self.eof = False
        self._parser = h11.Connection(h11.SERVER)

    def _feed(self) -> bytes:
        """One read from the socket into the parser; b"" at the end of the stream."""
        data = b"" if self.eof else self.sock.recv(65536)
        self.eof = not data
        self._parser.receive_data(data)
        return data

    def head(self) -> tuple[h11.Request, bytes] | None:
        """The next request and its raw head (no leading empty lines, no final
        CRLFs); None on a clean end of stream. Raises ``h11.RemoteProtocolError``
        on anything h11 refuses, a stream cut mid-head included."""
        fed = self.pending
        while True:  # RFC 9112 section 2.2: empty lines before a request line are ignored
            while fed[:1] == b"\n" or fed[:2] == b"\r\n":
                fed = fed[1:] if fed[:1] == b"\n" else fed[2:]
            if fed:
                break
            fed = b"" if self.eof else self.sock.recv(65536)
            if not fed:
                self.eof = True
                return None
        self._parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._parser.receive_data(fed)
        while True:
            event = self._parser.next_event()
            if isinstance(event, h11.Request):
                used = len(fed) - len(self._parser.trailing_data[0])
                return event, fed[:used].rstrip(b"\r\n")
            if event is h11.NEED_DATA:
                fed += self._feed()
            else:
                raise h11.RemoteProtocolError(f"unexpected {event!r} before a request")

    def body(self) -> Iterator[bytes]:
        """The current request's body, as h11 de-frames it; raises
        ``h11.RemoteProtocolError`` if the stream ends before it does."""
        while True:
            event = self._parser.next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.pending = self._parser.trailing_data[0]
                return
            elif event is h11.NEED_DATA:
                self._feed()
            else:
                raise h11.RemoteProtocolError(f"unexpected {event!r} in a request body")


@dataclass
class Received:
    conn: int
    method: str
    target: str
    head: bytes
    headers: list[tuple[str, str]]
    body_length: int = 0
    body_sha256: str = ""

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class Origin:
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[Received] = field(default_factory=list)
    connections: int = 0
    open_connections: int = 0
    closed_events: list[int] = field(default_factory=list)
    #: Requests per ``/cache/...`` path (query excluded), for the caching tests.
    cache_counts: dict[str, int] = field(default_factory=dict)
    #: ``/cache/...`` paths answering with this status (empty body) instead.
    cache_errors: dict[str, int] = field(default_factory=dict)
    #: Events ``hold=head|body`` answers wait for (see ``hold``).
    holds: dict[str, threading.Event] = field(default_factory=dict)

    def start(self) -> Origin:
        self._listener = socket.create_server((self.host, 0), backlog=512)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.connections = 0
            self.closed_events.clear()

    def last(self) -> Received:
        return self.requests[-1]

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self.open_connections += 1
                number = self.connections
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        reader = RequestReader(conn)
        drop_next = False
        try:
            while True:
                parsed = reader.head()
                if parsed is None:
                    return
                request, head = parsed
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw_items()]
                received = Received(
                    number, request.method.decode("latin-1"), request.target.decode("latin-1"), head, headers
                )
                digest = hashlib.sha256()
                for data in reader.body():
                    digest.update(data)
                    received.body_length += len(data)
                received.body_sha256 = digest.hexdigest()
                with self._lock:
                    self.requests.append(received)
                if drop_next:
                    return
                keep = self._answer(conn, received)
                if received.target == "/drop-next":
                    drop_next = True
                if not keep or (received.header("Connection") or "").lower() == "close":
                    return
        except (OSError, h11.RemoteProtocolError):  # the peer went away mid-request, or sent no HTTP/1.1
            return
        finally:
            with self._lock:
                self.open_connections -= 1
                self.closed_events.append(number)
            try:
                conn.close()
            except OSError:
                pass

    def _answer(self, conn: socket.socket, req: Received) -> bool:
        parts = req.target.split("?")[0].strip("/").split("/")
        kind = parts[0]
        common = [
            ("X-Origin-Conn", str(req.conn)),
            ("X-Body-Length", str(req.body_length)),
            ("X-Body-Sha256", req.body_sha256),
        ]
        head_only = req.method == "HEAD"

        def send_head(status: str, headers: list[tuple[str, str]]) -> None:
            lines = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in headers + common]
            conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

        if kind == "cache":
            return self._cache_answer(conn, req, send_head)
        if kind == "bytes":
            n = int(parts[1])
            send_head("200 OK", [("Content-Length", str(n)), ("Content-Type", "application/octet-stream")])
            if not head_only:
                self._send_pattern(conn, n)
        elif kind == "chunked":
            n = int(parts[1])
            send_head("200 OK", [("Transfer-Encoding", "chunked")])
            sent = 0
            while sent < n:
                piece = pattern_bytes(min(65536, n - sent))
                conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
            conn.sendall(b"0\r\n\r\n")
        elif kind == "slow":
            n, seconds = int(parts[1]), float(parts[2])
            send_head("200 OK", [("Content-Length", str(n))])
            data = pattern_bytes(n)
            step = max(1, n // 10)
            for i in range(0, n, step):
                conn.sendall(data[i : i + step])
                time.sleep(seconds / 10)  # the stimulus: an origin slow to send its body
        elif kind == "stall":
            time.sleep(3600)  # the stimulus: an origin that never answers
            return False
        elif kind in ("truncate", "reset"):
            n = int(parts[1])
            send_head("200 OK", [("Content-Length", str(n))])
            conn.sendall(pattern_bytes(n // 2))
            time.sleep(0.2)  # the stimulus: the failure comes mid-body, after a pause, not with the head
            if kind == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        elif kind == "status":
            send_head(f"{parts[1]} Status", [] if parts[1] in ("204", "304") else [("Content-Length", "0")])
        elif kind == "cookies":
            body = b"cookies"
            send_head(
                "200 OK",
                [
                    ("Set-Cookie", "a=1; Path=/"),
                    ("Vary", "Accept-Encoding"),
                    ("Set-Cookie", "b=2; HttpOnly"),
                    ("Vary", "Origin"),
                    ("Set-Cookie", "c=3"),
                    ("Content-Length", str(len(body))),
                ],
            )
            conn.sendall(body)
        elif kind == "server":
            send_head(
                "200 OK",
                [("Server", "origin-test/1.0"), ("Date", "Mon, 01 Jan 2024 00:00:00 GMT"), ("Content-Length", "0")],
            )
        elif kind == "hop":
            send_head(
                "200 OK",
                [
                    ("Connection", "X-Secret"),
                    ("X-Secret", "1"),
                    ("Keep-Alive", "timeout=5"),
                    ("Proxy-Authenticate", "Basic"),
                    ("Proxy-Connection", "keep-alive"),
                    ("Trailer", "X-T"),
                    ("Upgrade", "h2c"),
                    ("X-Kept", "yes"),
                    ("Content-Length", "0"),
                ],
            )
        elif kind == "redirect":
            send_head("302 Found", [("Location", "/elsewhere"), ("Content-Length", "0")])
        else:
            body = b"hello from origin\n"
            send_head(
                "200 OK",
                [
                    ("Content-Length", str(len(body))),
                    ("Content-Type", "text/plain"),
                    ("ETag", '"v1"'),
                    ("Content-Encoding", "identity"),
                ],
            )
            if not head_only:
                conn.sendall(body)
        return True

    # -- the caching tests' block -------------------------------------------------------

    def cache_count(self, path: str) -> int:
        with self._lock:
            return self.cache_counts.get(path, 0)

    def hold(self, path: str) -> threading.Event:
        """The event ``hold=...`` answers for ``path`` wait for (set it to let them go)."""
        with self._lock:
            return self.holds.setdefault(path, threading.Event())

    def _cache_answer(self, conn: socket.socket, req: Received, send_head) -> bool:
        """``/cache/ANY?h=Name:Value&...``: answer with those headers. Other
        parameters: ``status=CODE``; ``size=N`` (N pattern bytes, else the body
        is ``PATH #COUNT``); ``chunked=1``; ``truncate=1`` (half the body, then
        close); ``etag=TAG`` (the ETag, and 304 to a matching If-None-Match);
        ``vary_echo=NAME`` (the body names that request header's value);
        ``age_first=N`` (``Age: N`` on the first answer only);
        ``hold=head`` (wait for ``hold(path)`` before answering) or
        ``hold=body`` (send the head and half the body, then wait). A path in
        ``cache_errors`` answers that status instead."""
        path, _, query = req.target.partition("?")
        params = urllib.parse.parse_qsl(query, keep_blank_values=True)
        with self._lock:
            count = self.cache_counts[path] = self.cache_counts.get(path, 0) + 1
            error = self.cache_errors.get(path)
        if error is not None:
            send_head(f"{error} Error", [("Content-Length", "0")])
            return True
        headers = [tuple(v.split(":", 1)) for k, v in params if k == "h"]
        options = {k: v for k, v in params if k != "h"}
        etag = options.get("etag")
        if etag:
            headers.append(("ETag", etag))
            if req.header("If-None-Match") == etag:
                send_head("304 Not Modified", headers + [("X-Count", str(count))])
                return True
        if "size" in options:
            body = pattern_bytes(int(options["size"]))
        elif "vary_echo" in options:
            body = f"{options['vary_echo']}={req.header(options['vary_echo'])}".encode()
        else:
            body = f"{path} #{count}".encode()
        headers.append(("X-Count", str(count)))
        if options.get("age_first") and count == 1:
            headers.append(("Age", options["age_first"]))  # stored already stale; its refresh is not
        status = options.get("status", "200") + " Answer"
        hold = options.get("hold")
        if hold == "head":
            self.hold(path).wait(60)  # the stimulus: a fill whose answer has not come yet
        if req.method == "HEAD":
            send_head(status, headers + [("Content-Length", str(len(body)))])
            return True
        if options.get("chunked"):
            send_head(status, headers + [("Transfer-Encoding", "chunked")])
            for i in range(0, len(body), 65536):
                piece = body[i : i + 65536]
                conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            if options.get("truncate"):
                return False
            conn.sendall(b"0\r\n\r\n")
            return True
        send_head(status, headers + [("Content-Length", str(len(body)))])
        if hold == "body":
            conn.sendall(body[: len(body) // 2])
            self.hold(path).wait(60)  # the stimulus: a fill still streaming
            if options.get("truncate"):
                return False
            conn.sendall(body[len(body) // 2 :])
            return True
        if options.get("truncate"):
            conn.sendall(body[: len(body) // 2])
            time.sleep(0.1)
            return False
        conn.sendall(body)
        return True

    @staticmethod
    def _send_pattern(conn: socket.socket, n: int) -> None:
        view = memoryview(PATTERN)
        while n > 0:
            piece = min(n, len(PATTERN))
            conn.sendall(view[:piece])
            n -= piece

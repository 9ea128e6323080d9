"""The Gunicorn worker: Gunicorn's gevent worker with proxy-specific changes.

1. The origin's ``Server`` and ``Date`` headers reach the client instead of
   Gunicorn's own (a proxy should not rewrite who answered, or when).
2. An app response carrying ``Connection: close`` really closes the client
   connection (Gunicorn otherwise drops the header and keeps the connection,
   which, after a refused body, would mean reading that body to the end).
3. Graceful shutdown closes idle keep-alive connections after a short grace
   instead of waiting for their keep-alive timeout, so a SIGTERM or reload
   finishes as soon as in-flight requests do. A connection that is in use
   gets ``Connection: close`` on its next response (Gunicorn's own logic).
4. Logging (see ``proxy.logs``): a request Gunicorn rejects itself (400,
   414, 431...) without calling the app still gets its access line; output
   that bypasses logging becomes error-log records (``proxy.capture``); a
   worker that missed the master's SIGUSR1 while booting reopens rotated
   log files on its own.
5. Fairness and speed: each request yields to the event loop once before
   it is handled; workers spread connections through ``proxy.balance``;
   the response head leaves with the first body bytes; a body the app hands
   over as a ``proxy.sendfile.Region`` (a cache hit, next-hop's
   Content-Length body) is sent without passing through Python; request
   bodies are read 64 KiB ahead, not 1 MiB; what was loaded before serving
   is frozen out of the cyclic garbage collector; Gunicorn's settings are
   read through a snapshot (``SettingsSnapshot``); the app's response fields
   get Gunicorn's checks in one pass that also decides what is sent.

Gunicorn's and gevent's private parts are reached through ``proxy.internals``
only, which checks them before anything here relies on them.
"""

from __future__ import annotations

import email.utils
import gc
import os
import socket
import time
from types import TracebackType
from typing import Any, Protocol

import gevent
from gunicorn.workers.ggevent import GeventWorker

from . import balance, capture, internals
from .access import record_rejected
from .headers import connection_tokens, request_fields, response_field_role
from .logs import access_logged, error_log, log_files_moved, serving
from .sendfile import Region
from .sockets import BLOCK_SIZE, send_all

__all__ = [
    "FAIR_YIELD_S",
    "SHUTDOWN_IDLE_GRACE",
    "BalancedServer",
    "ProxyResponse",
    "ProxyWorker",
    "SettingsSnapshot",
    "log_rejected",
]

#: After shutdown starts, a keep-alive connection idle this long is closed.
SHUTDOWN_IDLE_GRACE = 1.0
#: What is still running this long before the master's graceful deadline is
#: cut (so it ends through its own cleanup and logs), at the latest
#: SHUTDOWN_CUT_MIN after shutdown started; SHUTDOWN_CUT_WAIT is how long the
#: cut requests get to finish their cleanup.
SHUTDOWN_CUT_MARGIN = 1.0
SHUTDOWN_CUT_MIN = 0.5
SHUTDOWN_CUT_WAIT = 0.5
#: How often the shutdown watcher looks at the connections.
SHUTDOWN_POLL_S = 0.25

#: Each request first sleeps this long, which puts it behind the work the
#: event loop already has ready. gevent reads without yielding when data is
#: waiting, so a connection whose next request (and next-hop's answer) kept
#: arriving in time could be served request after request while the others
#: waited (measured: p99 300 ms instead of 25 ms under wrk). A zero sleep
#: would not do: it can resume before the loop polls for I/O again.
FAIR_YIELD_S = 0.000001


class ProxyResponse(internals.GunicornResponse):
    """Gunicorn's HTTP/1 response, keeping the origin's Server and Date, and
    sending the head with the first body bytes."""

    origin_server = False
    origin_date = False
    #: Gunicorn's ``sendfile`` setting, read once by the worker (every
    #: ``can_sendfile`` walks Gunicorn's settings table); off, no answer goes
    #: zero-copy (``sendfile``).
    sendfile_on = True
    #: The response head, held back to leave with the first body bytes.
    _head: bytes | None = None

    def process_headers(self, headers: list[tuple[str, str]]) -> None:
        """Gunicorn's checks of the app's fields, with its patterns and its
        errors, and what the client gets of each (``response_field_role``),
        in one pass. A name's check and role, and a value's check, are
        worked out once a process (Gunicorn's own pass, then a second to put
        back Server and Date, cost 5.4 µs in-process for a hit's 8 fields; this one 1 µs)."""
        roles = _field_roles
        checked = _checked_values
        sent = self.headers
        for name, value in headers:
            role = roles.get(name)
            if role is None:
                role = _field_role(name)
            if value not in checked:
                _check_value(name, value)
            value = value.strip(" \t")
            if role == "send":
                sent.append((name, value))
            elif role == "length":
                self.response_length = int(value)
                sent.append((name, value))
            elif role == "connection":
                if value.lower() == "upgrade":
                    self.upgrade = True
                elif "close" in connection_tokens(value):
                    self.must_close = True
            elif role == "upgrade":
                if value.lower() == "websocket":
                    sent.append((name, value))
            elif role == "server":
                self.origin_server = True
                sent.append((name, value))
            elif role == "date":
                self.origin_date = True
                sent.append((name, value))

    def default_headers(self) -> list[str]:
        if self.upgrade:
            connection = "upgrade"
        elif self.should_close():
            connection = "close"
        else:
            connection = "keep-alive"
        major, minor = self.req.version
        headers = [f"HTTP/{major}.{minor} {self.status}\r\n"]
        if not self.origin_server:
            headers.append(f"Server: {self.version}\r\n")
        if not self.origin_date:
            headers.append(f"Date: {_http_date()}\r\n")
        headers.append(f"Connection: {connection}\r\n")
        if self.chunked:
            headers.append("Transfer-Encoding: chunked\r\n")
        return headers

    def send_headers(self) -> None:
        """Hold the head back when the body's length is known: it leaves with
        the first body bytes, one send (and one TCP segment) instead of two.
        Bodies of unknown length (streams, server-sent events) get their
        head at once, since their first bytes may be a long time coming."""
        if self.headers_sent:
            return
        lines = self.default_headers()
        lines += [f"{name}: {value}\r\n" for name, value in self.headers]
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        self.headers_sent = True
        if self.response_length:
            self._head = head
        else:
            send_all(self.sock, head)

    def emit_body(self, data: bytes) -> None:
        if self.chunked:
            data = b"%X\r\n%s\r\n" % (len(data), data)
        head = self._head
        if head is not None:
            self._head = None
            data = head + data
        send_all(self.sock, data)

    def sendfile(self, respiter: object) -> bool:
        """A body the response sends itself (a ``proxy.sendfile.Region`` in
        the WSGI file wrapper: a stored body by sendfile(2), next-hop's by
        splice(2)), the held-back head corked ahead of it. False (anything
        else, or Gunicorn's ``sendfile`` setting off: no answer goes
        zero-copy): Gunicorn iterates the wrapper, which reads the region in
        blocks."""
        region = getattr(respiter, "filelike", None)
        if (
            not isinstance(region, Region)
            or not self.sendfile_on
            or self.chunked
            or self.req.method == "HEAD"
            or self.response_length != region.length
        ):
            return False
        self.send_headers()
        head, self._head = self._head, None
        region.send(self.sock, head or b"")
        self.sent += region.done
        return True

    def close(self) -> None:
        self.send_headers()
        head = self._head
        if head is not None:  # no body after all (HEAD, or the app sent none)
            self._head = None
            send_all(self.sock, head)
        super().close()


#: Response field name -> its role (``response_field_role``), for names
#: that passed Gunicorn's check; emptied when it reaches ``_FIELD_MEMO_SIZE``.
_field_roles: dict[str, str] = {}
#: Response field values that passed Gunicorn's check (the same ones come
#: again and again: types, cache policies, validators), up to
#: ``_CHECKED_VALUE_CHARS`` long; emptied when full.
_checked_values: set[str] = set()
_CHECKED_VALUE_CHARS = 256
_FIELD_MEMO_SIZE = 4096


def _field_role(name: object) -> str:
    """Check a response field name as Gunicorn does, and remember its role."""
    if not isinstance(name, str):
        raise TypeError(f"{name!r} is not a string")
    if not internals.RESPONSE_FIELD_NAME.fullmatch(name):
        raise internals.InvalidResponseHeaderName(repr(name))
    if len(_field_roles) >= _FIELD_MEMO_SIZE:
        _field_roles.clear()
    role = _field_roles[name] = response_field_role(name.lower(), internals.GUNICORN_HOP_BY_HOP)
    return role


def _check_value(name: str, value: object) -> None:
    """Check a response field value as Gunicorn does, and remember it."""
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    if not internals.RESPONSE_FIELD_VALUE.fullmatch(value):
        raise internals.InvalidResponseHeader(repr(name))  # the name only: the value may be secret
    if len(value) <= _CHECKED_VALUE_CHARS:
        if len(_checked_values) >= _FIELD_MEMO_SIZE:
            _checked_values.clear()
        _checked_values.add(value)


_date = (0, "")


def _http_date() -> str:
    """The Date value for answers whose origin sent none, made once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, email.utils.formatdate(now, usegmt=True))
    return _date[1]


class BalancedServer(internals.AcceptServer):
    """gevent's accept loop, pausing while this worker holds more than its
    share of connections (see ``proxy.balance``)."""

    share = balance.Share(None)
    _paused_since: float | None = None

    def accept_ready(self) -> None:
        if not self.share.over():
            self._paused_since = None
        else:
            now = time.monotonic()
            if self._paused_since is None:
                self._paused_since = now
            if now - self._paused_since < balance.MAX_PAUSE_S:
                self.pause_accepting(balance.PAUSE_S)
                return
        super().accept_ready()

    # Counted as the connection is accepted and closed, not when its greenlet
    # runs: in a burst several accepts come before any handler starts.
    def do_handle(self, *args: object) -> None:
        self.share.opened()
        super().do_handle(*args)

    def do_close(self, *args: object) -> None:
        self.share.closed()
        super().do_close(*args)


class _IdleWait:
    """Gunicorn's keep-alive wait, recorded so shutdown can cut it short;
    one per connection, its timer restarted for each wait."""

    __slots__ = ("_worker", "_timeout")

    def __init__(self, worker: ProxyWorker) -> None:
        self._worker = worker
        self._timeout = gevent.Timeout(worker.cfg.keepalive, False)

    def __enter__(self) -> None:
        self._worker.idle[gevent.getcurrent()] = time.monotonic()
        self._timeout.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self._worker.idle.pop(gevent.getcurrent(), None)
        self._timeout.cancel()
        return exc is self._timeout  # the keep-alive timeout: end the connection quietly

    def close(self) -> None:
        self._timeout.close()


class _CountingSocket:
    """The client socket as Gunicorn's error answer sees it: notes what is sent."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.head = b""
        self.sent = 0
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def sendall(self, data: bytes | bytearray | memoryview, *args: int) -> None:
        if not self.head:
            self.head = bytes(data[:1024])
        try:
            self._sock.sendall(data, *args)
        except OSError:
            self.failed = True
            raise
        self.sent += len(data)


def log_rejected(
    req: object, addr: tuple[str, int] | None, exc: BaseException, sock: _CountingSocket, started: tuple[float, float]
) -> None:
    """The access line of a request Gunicorn rejected before the app saw it."""
    record = record_rejected(req, (addr or ("",))[0], str(exc), sock.head, sock.sent, sock.failed, started)
    record.log()


class _Request(Protocol):
    """What the worker reads of a request Gunicorn parsed."""

    headers: list[tuple[str, str]]


class SettingsSnapshot:
    """Gunicorn's settings as a worker reads them: each looked up once.

    Every ``cfg.name`` on Gunicorn's ``Config`` walks its settings table
    (``__getattr__``, then the setting's ``get``), and a request reads
    dozens of them: parsing, the environ, the response, the hooks
    (measured: 11% of a proxied 1 KiB request's CPU). A worker's settings
    never change (a reload forks new workers), so the first read of each is
    kept as a plain attribute, which later reads find without any call.
    """

    def __init__(self, cfg: Any) -> None:
        self._cfg = cfg

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._cfg, name)
        setattr(self, name, value)
        return value


class ProxyWorker(GeventWorker):  # type: ignore[misc]  # Gunicorn ships no types: its class is Any
    """Gunicorn's gevent worker, adapted for a reverse proxy (see module doc)."""

    #: Gunicorn's ``Config``, then (once serving) a ``SettingsSnapshot`` of it.
    cfg: Any

    def init_process(self) -> None:
        # What the master checked before forking, checked again where it is used.
        internals.check(internals.BEFORE_PATCHING)
        internals.use_response_class(ProxyResponse)
        ProxyResponse.sendfile_on = self.cfg.sendfile is not False
        internals.use_server_class(BalancedServer)
        # Request bodies are read 64 KiB at a time; Gunicorn's reader asks the
        # socket for up to 1 MiB ahead and then copies what is left of it on
        # every read (measured: half the CPU of a 1 MiB upload).
        internals.set_body_read_size(BLOCK_SIZE)
        self.share = BalancedServer.share = balance.Share(getattr(self, "balance_slot", None))
        self.clients: dict[gevent.Greenlet, socket.socket] = {}
        self.waits: dict[gevent.Greenlet, _IdleWait] = {}
        self.idle: dict[gevent.Greenlet, float] = {}
        capture.install()
        # Gunicorn mounts the app under $SCRIPT_NAME, looked up in os.environ
        # on every request: a request outside it would be a 500, and a
        # missing key costs a KeyError each time. A proxy forwards the target
        # as it came, mounted nowhere.
        os.environ["SCRIPT_NAME"] = ""
        super().init_process()

    def load_wsgi(self) -> None:
        # gevent has patched this process by now: urllib3 may be imported.
        internals.check(internals.AFTER_PATCHING)
        super().load_wsgi()

    def init_signals(self) -> None:
        super().init_signals()
        # A SIGUSR1 (reopen the log files) that the master sent between this
        # worker's fork and now was lost: reopen them if they were rotated.
        if log_files_moved():
            self.log.reopen_files()

    def timeout_ctx(self) -> _IdleWait:
        wait = self.waits.get(gevent.getcurrent())
        return wait if wait is not None else _IdleWait(self)

    def handle(self, listener: socket.socket, client: socket.socket, addr: tuple[str, int]) -> None:
        current = gevent.getcurrent()
        self.clients[current] = client
        wait = self.waits[current] = _IdleWait(self)
        try:
            super().handle(listener, client, addr)
        finally:
            wait.close()
            self.clients.pop(current, None)
            self.waits.pop(current, None)
            self.idle.pop(current, None)

    def handle_request(self, listener_name: str, req: _Request, sock: socket.socket, addr: tuple[str, int]) -> bool:
        gevent.sleep(FAIR_YIELD_S)
        access_logged.set(False)
        # The app gets the environ, whose repeated fields Gunicorn joined:
        # the field lines as they came go along (see proxy.headers).
        request_fields.set(req.headers)
        try:
            handled: bool = super().handle_request(listener_name, req, sock, addr)
        finally:
            request_fields.set(None)
        # Not on an exception: handle_error must still see this request's line.
        access_logged.set(False)  # what fails next on this connection is a new request
        return handled

    def handle_error(
        self, req: object | None, client: socket.socket, addr: tuple[str, int] | None, exc: BaseException
    ) -> None:
        """Gunicorn answers what it cannot parse (400, 414, 431, 501...) itself,
        without calling the app: write those requests' access lines here."""
        if access_logged.get():  # the app logged this request already
            super().handle_error(req, client, addr, exc)
            return
        started = (time.time(), time.perf_counter())
        counting = _CountingSocket(client)
        try:
            super().handle_error(req, counting, addr, exc)
        finally:
            try:
                log_rejected(req if req is not None else getattr(exc, "req", None), addr, exc, counting, started)
            except Exception:
                error_log.exception("cannot write the access line of a request Gunicorn rejected")

    def run(self) -> None:
        self.cfg = SettingsSnapshot(self.cfg)
        # Everything loaded so far (Gunicorn, gevent, urllib3, the app) lives
        # as long as the worker: out of the cyclic collector's way, its full
        # collections no longer walk it (measured: +8% requests/s, p99 -15%).
        gc.freeze()
        serving()
        gevent.spawn(self._close_idle_on_shutdown)
        super().run()

    def _close_idle_on_shutdown(self) -> None:
        """Once shutdown starts: close idle keep-alive connections after a
        short grace, and just before the master's graceful deadline cut what
        is still running (long downloads, tunnels) so that each one ends
        through its own cleanup and writes its access line."""
        while self.alive:
            gevent.sleep(SHUTDOWN_POLL_S)
        self.share.leave()
        stopping_since = time.monotonic()
        deadline = stopping_since + max(self.cfg.graceful_timeout - SHUTDOWN_CUT_MARGIN, SHUTDOWN_CUT_MIN)
        while time.monotonic() < deadline:
            now = time.monotonic()
            for greenlet, since in list(self.idle.items()):
                if now - max(since, stopping_since) >= SHUTDOWN_IDLE_GRACE:
                    self.idle.pop(greenlet, None)
                    client = self.clients.get(greenlet)
                    if client is not None:
                        _wake_with_eof(client)
            gevent.sleep(SHUTDOWN_POLL_S)
        gevent.killall(list(self.clients), block=True, timeout=SHUTDOWN_CUT_WAIT)


def _wake_with_eof(client: socket.socket) -> None:
    """Shut an idle connection down under the greenlet waiting on it,
    unless a request has just arrived on it (that one is served, with
    ``Connection: close``).

    gevent's own ``shutdown`` raises EBADF in the waiting greenlet (which
    Gunicorn logs as an error with a traceback); shutting down the OS socket
    underneath makes the wait end with a plain end-of-stream instead.
    """
    raw = internals.raw_socket(client)
    try:
        if raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
            return
    except BlockingIOError:
        pass
    except OSError:
        return
    try:
        raw.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass

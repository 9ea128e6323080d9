"""The one door to private parts of Gunicorn, gevent, urllib3 and prometheus_client.

The proxy leans on a few names these libraries do not promise to keep: it
rebinds classes Gunicorn looks up at call time, overrides private methods,
and reaches under gevent's and urllib3's wrappers for speed. A rename in a
new release would not fail loudly: an override of a method nobody calls any
more is a silent no-op, and the proxy would quietly lose a behaviour.

So every such name is declared once in ``PIECES`` (library, where, what
shape it must have) and ``check`` verifies them all at start-up, in the
master before it forks and again in each worker; a mismatch stops start-up
with the library, its installed version and each missing or changed piece.
The rest of the proxy uses only the functions and classes below, never the
private names themselves. ``requirements.txt`` bounds these libraries to the
minor versions this declaration was checked against.
"""

from __future__ import annotations

import importlib
import inspect
import io
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from gevent import socket as gevent_socket
from gevent.hub import Hub
from gevent.server import StreamServer
from gunicorn import util as _util
from gunicorn.glogging import Logger as _GunicornLogger
from gunicorn.http import body as _body
from gunicorn.http import errors as _errors
from gunicorn.http import unreader as _unreader
from gunicorn.http import wsgi as _wsgi
from gunicorn.workers import ggevent as _ggevent

if TYPE_CHECKING:
    from collections.abc import Sequence

    from prometheus_client import Histogram
    from urllib3 import HTTPConnectionPool
    from urllib3.connection import HTTPConnection

__all__ = [
    "AFTER_PATCHING",
    "BEFORE_PATCHING",
    "PIECES",
    "AcceptServer",
    "Attribute",
    "Class",
    "GUNICORN_HOP_BY_HOP",
    "GunicornResponse",
    "InstanceAttribute",
    "InternalsError",
    "InvalidResponseHeader",
    "InvalidResponseHeaderName",
    "Method",
    "Piece",
    "add_histogram_counts",
    "QuietAccessLogger",
    "RESPONSE_FIELD_NAME",
    "RESPONSE_FIELD_VALUE",
    "check",
    "client_read_ahead",
    "raw_socket",
    "return_pooled",
    "route_hub_errors",
    "set_body_read_size",
    "take_length_body",
    "TakenBody",
    "take_pooled",
    "use_response_class",
    "use_server_class",
]


# -- shapes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Class:
    """A class (something the proxy subclasses or rebinds)."""

    def problem(self, owner: object, name: str) -> str | None:
        value = getattr(owner, name)
        return None if isinstance(value, type) else f"is {type(value).__name__}, not a class"


@dataclass(frozen=True)
class Method:
    """A function or method that must accept ``params`` positional arguments
    (``self`` included), the way the library or the proxy calls it."""

    params: int

    def problem(self, owner: object, name: str) -> str | None:
        value = inspect.getattr_static(owner, name)
        if isinstance(value, staticmethod | classmethod):
            value = value.__func__
        if not callable(value):
            return f"is {type(value).__name__}, not callable"
        try:
            inspect.signature(value).bind(*range(self.params))
        except TypeError:
            return f"no longer takes {self.params} arguments: {inspect.signature(value)}"
        except ValueError:  # no signature to read (a C function): callable is all we can say
            return None
        return None


@dataclass(frozen=True)
class Attribute:
    """A class or module attribute (a value, a property)."""

    def problem(self, owner: object, name: str) -> str | None:
        return None


@dataclass(frozen=True)
class InstanceAttribute:
    """An attribute each instance gets in ``__init__`` (of the class or a
    base), or in the method named by ``set_in``: checked on the code, so that
    nothing is built (a gevent server would create the event loop in the
    master)."""

    set_in: str = "__init__"

    def problem(self, owner: object, name: str) -> str | None:
        return None


Shape = Class | Method | Attribute | InstanceAttribute


@dataclass(frozen=True)
class Piece:
    """One private name the proxy depends on, and why."""

    library: str  #: distribution name, for its version
    module: str
    name: str  #: dotted, inside ``module``
    shape: Shape
    why: str

    def problem(self) -> str | None:
        """What is wrong with this piece in the installed library, or None."""
        try:
            owner: Any = importlib.import_module(self.module)
        except ImportError as exc:
            return f"module {self.module} cannot be imported ({exc})"
        *path, last = self.name.split(".")
        for part in path:
            owner = getattr(owner, part, _MISSING)
            if owner is _MISSING:
                return f"{self.module}.{self.name} is missing ({part})"
        if isinstance(self.shape, InstanceAttribute):
            if not _set_in(owner, last, self.shape.set_in):
                return f"{self.module}.{self.name} is no longer set by {owner.__name__}.{self.shape.set_in}"
            return None
        if not hasattr(owner, last):
            return f"{self.module}.{self.name} is missing"
        wrong = self.shape.problem(owner, last)
        return f"{self.module}.{self.name} {wrong}" if wrong else None


_MISSING = object()


def _set_in(cls: type, name: str, method: str) -> bool:
    for klass in cls.__mro__:
        init = klass.__dict__.get(method)
        code = getattr(init, "__code__", None)
        if code is not None and name in code.co_names:
            return True
    return False


PIECES: tuple[Piece, ...] = (
    # Gunicorn: the response class and the accept loop, rebound at worker start.
    Piece("gunicorn", "gunicorn.http.wsgi", "Response", Class(), "rebound to the proxy's response"),
    Piece("gunicorn", "gunicorn.http.wsgi", "create", Method(5), "looks Response up at call time"),
    Piece("gunicorn", "gunicorn.http.wsgi", "Response._emit_body", Method(2), "head leaves with the first bytes"),
    Piece("gunicorn", "gunicorn.http.wsgi", "Response.process_headers", Method(2), "keeps Server and Date"),
    Piece("gunicorn", "gunicorn.http.wsgi", "HEADER_VALUE_RE", Attribute(), "its header checks, in one pass"),
    Piece("gunicorn", "gunicorn.http.wsgi", "TOKEN_RE", Attribute(), "its header checks, in one pass"),
    Piece("gunicorn", "gunicorn.http.errors", "InvalidResponseHeader", Class(), "its header checks, in one pass"),
    Piece("gunicorn", "gunicorn.http.errors", "InvalidResponseHeaderName", Class(), "its header checks, in one pass"),
    Piece("gunicorn", "gunicorn.util", "hop_headers", Attribute(), "its header checks, in one pass"),
    Piece("gunicorn", "gunicorn.http.wsgi", "Response.default_headers", Method(1), "keeps Server and Date"),
    Piece("gunicorn", "gunicorn.http.wsgi", "Response.send_headers", Method(1), "head held back"),
    Piece("gunicorn", "gunicorn.http.wsgi", "Response.should_close", Method(1), "Connection: close"),
    Piece("gunicorn", "gunicorn.http.wsgi", "Response.close", Method(1), "a held-back head is sent"),
    Piece("gunicorn", "gunicorn.http.wsgi", "Response.sendfile", Method(2), "cache hits by sendfile(2)"),
    Piece("gunicorn", "gunicorn.http.wsgi", "Response.write_file", Method(2), "calls sendfile, else iterates"),
    Piece("gunicorn", "gunicorn.http.wsgi", "Response.can_sendfile", Method(1), "the sendfile setting"),
    *(
        Piece("gunicorn", "gunicorn.http.wsgi", f"Response.{name}", InstanceAttribute(), "read by the proxy response")
        for name in ("req", "sock", "version", "status", "chunked", "must_close", "headers", "headers_sent", "sent")
    ),
    Piece("gunicorn", "gunicorn.http.wsgi", "Response.response_length", InstanceAttribute(), "head held back"),
    Piece("gunicorn", "gunicorn.http.wsgi", "Response.upgrade", InstanceAttribute(), "Connection: upgrade"),
    Piece("gunicorn", "gunicorn.workers.ggevent", "StreamServer", Class(), "rebound to the balanced accept loop"),
    Piece("gunicorn", "gunicorn.http.unreader", "SocketUnreader.max_body_chunk", Attribute(), "64 KiB body reads"),
    # Gunicorn: the read-ahead a tunnel hands to next-hop.
    Piece("gunicorn", "gunicorn.http.unreader", "Unreader.take_buffered", Method(1), "pipelined tunnel bytes"),
    Piece("gunicorn", "gunicorn.http.body", "Body.reader", InstanceAttribute(), "pipelined tunnel bytes"),
    Piece("gunicorn", "gunicorn.http.body", "LengthReader.unreader", InstanceAttribute(), "pipelined tunnel bytes"),
    Piece("gunicorn", "gunicorn.http.body", "EOFReader.unreader", InstanceAttribute(), "pipelined tunnel bytes"),
    Piece("gunicorn", "gunicorn.http.body", "ChunkedReader.req", InstanceAttribute(), "pipelined tunnel bytes"),
    Piece("gunicorn", "gunicorn.http.message", "Message.unreader", InstanceAttribute(), "pipelined tunnel bytes"),
    # Gunicorn: a Content-Length body taken over by splice(2).
    Piece("gunicorn", "gunicorn.http.body", "Body", Class(), "bodies by splice"),
    Piece("gunicorn", "gunicorn.http.body", "Body.buf", InstanceAttribute(), "bodies by splice"),
    Piece("gunicorn", "gunicorn.http.body", "LengthReader", Class(), "bodies by splice"),
    Piece("gunicorn", "gunicorn.http.body", "LengthReader.length", InstanceAttribute(), "bodies by splice"),
    Piece("gunicorn", "gunicorn.http.unreader", "SocketUnreader", Class(), "bodies by splice"),
    Piece("gunicorn", "gunicorn.http.unreader", "SocketUnreader.sock", InstanceAttribute(), "bodies by splice"),
    Piece("gunicorn", "gunicorn.http.unreader", "Unreader.unread", Method(2), "bodies by splice"),
    # Gunicorn: the worker and logger methods the proxy overrides.
    Piece("gunicorn", "gunicorn.glogging", "Logger._compute_access_log_enabled", Method(1), "no Gunicorn access log"),
    Piece("gunicorn", "gunicorn.glogging", "Logger.setup", Method(2), "the console kept for fatal errors"),
    Piece("gunicorn", "gunicorn.workers.ggevent", "GeventWorker.init_process", Method(1), "worker set-up"),
    Piece("gunicorn", "gunicorn.workers.ggevent", "GeventWorker.init_signals", Method(1), "missed SIGUSR1"),
    Piece("gunicorn", "gunicorn.workers.ggevent", "GeventWorker.timeout_ctx", Method(1), "cut idle waits"),
    Piece("gunicorn", "gunicorn.workers.ggevent", "GeventWorker.handle", Method(4), "tracks connections"),
    Piece("gunicorn", "gunicorn.workers.ggevent", "GeventWorker.handle_request", Method(5), "fair yield"),
    Piece("gunicorn", "gunicorn.workers.ggevent", "GeventWorker.handle_error", Method(5), "rejected requests"),
    Piece("gunicorn", "gunicorn.workers.ggevent", "GeventWorker.run", Method(1), "gc.freeze, idle closer"),
    Piece("gunicorn", "gunicorn.workers.ggevent", "GeventWorker.load_wsgi", Method(1), "urllib3 checked"),
    # gevent: the accept loop's pause, the raw socket, the hub's error printing.
    Piece("gevent", "gevent.server", "StreamServer._do_read", Method(1), "accepting paused while over share"),
    Piece("gevent", "gevent.server", "StreamServer.do_handle", Method(3), "connections counted"),
    Piece("gevent", "gevent.server", "StreamServer.do_close", Method(3), "connections counted"),
    Piece("gevent", "gevent.server", "StreamServer.stop_accepting", Method(1), "accepting paused"),
    Piece("gevent", "gevent.server", "StreamServer._start_accepting_if_started", Method(1), "accepting resumed"),
    Piece("gevent", "gevent.server", "StreamServer._timer", InstanceAttribute(), "the pause's timer"),
    Piece("gevent", "gevent.server", "StreamServer.loop", InstanceAttribute(), "the pause's timer"),
    Piece("gevent", "gevent.socket", "socket._sock", InstanceAttribute(), "non-blocking peeks on the OS socket"),
    Piece("gevent", "gevent.hub", "Hub.print_exception", Method(5), "greenlet failures become records"),
    Piece("gevent", "gevent.hub", "Hub._normalize_exception", Method(4), "greenlet failures become records"),
    # urllib3: the pool, used without its request machinery.
    Piece("urllib3", "urllib3.connectionpool", "HTTPConnectionPool._get_conn", Method(1), "pooled connections"),
    Piece("urllib3", "urllib3.connectionpool", "HTTPConnectionPool._put_conn", Method(2), "pooled connections"),
    Piece("urllib3", "urllib3.connectionpool", "HTTPConnectionPool.ConnectionCls", Attribute(), "the peeking check"),
    Piece("urllib3", "urllib3.connection", "HTTPConnection.is_connected", Attribute(), "the peeking check"),
    Piece("urllib3", "urllib3.poolmanager", "PoolManager.pool_classes_by_scheme", InstanceAttribute(), "the pool"),
    # prometheus_client: a worker's histogram counts written once per flush.
    Piece(
        "prometheus_client",
        "prometheus_client.metrics",
        "Histogram._buckets",
        InstanceAttribute("_metric_init"),
        "batched histogram writes",
    ),
    Piece(
        "prometheus_client",
        "prometheus_client.metrics",
        "Histogram._sum",
        InstanceAttribute("_metric_init"),
        "batched histogram writes",
    ),
)


#: Libraries checked in the master before it forks, and in each worker before
#: anything is rebound.
BEFORE_PATCHING = ("gunicorn", "gevent")
#: Libraries checked in each worker once gevent has patched it, before the app
#: loads: urllib3 keeps direct references to ``ssl``'s names, so importing it
#: earlier (in the master) would leave them unpatched in every worker.
AFTER_PATCHING = ("urllib3", "prometheus_client")


class InternalsError(RuntimeError):
    """An installed library lacks, or has changed, a piece the proxy uses."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(
            "the installed libraries do not match what the proxy was built for (see requirements.txt): "
            + "; ".join(problems)
        )
        self.problems = problems


def _version(library: str) -> str:
    try:
        return version(library)
    except PackageNotFoundError:
        return "(version unknown)"


def check(libraries: tuple[str, ...], pieces: tuple[Piece, ...] = PIECES) -> None:
    """Raise InternalsError naming every missing or changed piece of these
    libraries, each with its library's installed version; return quietly if
    all are there."""
    problems = []
    for piece in pieces:
        if piece.library not in libraries:
            continue
        wrong = piece.problem()
        if wrong is not None:
            problems.append(f"{piece.library} {_version(piece.library)}: {wrong} (needed for: {piece.why})")
    if problems:
        raise InternalsError(problems)


# -- Gunicorn ------------------------------------------------------------------------------


class GunicornResponse(_wsgi.Response):  # type: ignore[misc]
    """Gunicorn's HTTP/1 response. A subclass overrides ``emit_body`` (one
    write of body bytes, framing included) instead of the private method
    Gunicorn calls, which is bound to it here, once, with no extra call."""

    # Set by Gunicorn's ``__init__`` (declared in PIECES), typed for subclasses.
    req: Any
    sock: socket.socket
    version: str
    status: str | None
    chunked: bool
    must_close: bool
    headers: list[tuple[str, str]]
    headers_sent: bool
    response_length: int | None
    upgrade: bool

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "emit_body" in cls.__dict__:
            cls._emit_body = cls.__dict__["emit_body"]

    def emit_body(self, data: bytes) -> None:
        super()._emit_body(data)


#: Gunicorn's rules for the app's response fields (``Response.process_headers``),
#: for the proxy's response, which applies them in its own single pass.
RESPONSE_FIELD_NAME: re.Pattern[str] = _wsgi.TOKEN_RE
RESPONSE_FIELD_VALUE: re.Pattern[str] = _wsgi.HEADER_VALUE_RE
InvalidResponseHeader: type[Exception] = _errors.InvalidResponseHeader
InvalidResponseHeaderName: type[Exception] = _errors.InvalidResponseHeaderName
GUNICORN_HOP_BY_HOP: frozenset[str] = frozenset(_util.hop_headers)


def use_response_class(cls: type[GunicornResponse]) -> None:
    """Make Gunicorn build every HTTP/1 response of this process with ``cls``."""
    _wsgi.Response = cls


def use_server_class(cls: type[StreamServer]) -> None:
    """Make Gunicorn's gevent worker accept through ``cls``."""
    _ggevent.StreamServer = cls


def set_body_read_size(size: int) -> None:
    """The most Gunicorn asks the client socket for at once when reading a body."""
    _unreader.SocketUnreader.max_body_chunk = size


def client_read_ahead(environ: Mapping[str, Any]) -> bytes:
    """Take what Gunicorn has read from the client past the request (pipelined
    bytes, which after an upgrade belong to the new protocol), without
    waiting for more; ``b""`` when ``wsgi.input`` is not Gunicorn's (a
    middleware replaced it)."""
    reader = getattr(environ.get("wsgi.input"), "reader", None)
    source = getattr(reader, "unreader", None) or getattr(getattr(reader, "req", None), "unreader", None)
    if isinstance(source, _unreader.Unreader):
        return bytes(source.take_buffered())
    return b""


@dataclass(frozen=True, slots=True)
class TakenBody:
    """A Content-Length body taken over from Gunicorn (``take_length_body``)."""

    held: bytes  #: the start of the body, already read by Gunicorn
    remaining: int  #: bytes of the body still on the socket
    sock: socket.socket  #: the client's socket


def take_length_body(wsgi_input: object) -> TakenBody | None:
    """Take over what is left of a Content-Length body from Gunicorn's
    ``wsgi.input``: the bytes Gunicorn already holds of it and the socket
    the rest is on. Gunicorn then counts the body as read (and does not
    drain it after the response); bytes it read past the body (a pipelined
    request) stay with it. None when the input is not Gunicorn's
    length-delimited body on a socket (chunked, or a middleware's)."""
    if not isinstance(wsgi_input, _body.Body):
        return None
    reader = wsgi_input.reader
    if not isinstance(reader, _body.LengthReader) or not isinstance(reader.unreader, _unreader.SocketUnreader):
        return None
    unreader = reader.unreader
    held = wsgi_input.buf.getvalue()
    wsgi_input.buf = io.BytesIO()
    remaining = reader.length
    buffered = unreader.take_buffered()
    if len(buffered) > remaining:
        unreader.unread(buffered[remaining:])
        buffered = buffered[:remaining]
    reader.length = 0
    return TakenBody(held + buffered, remaining - len(buffered), unreader.sock)


class QuietAccessLogger(_GunicornLogger):  # type: ignore[misc]
    """Gunicorn's logger with its own access log off for good: the proxy
    writes its access records itself, and Gunicorn would otherwise build its
    unused access atoms for every request."""

    def _compute_access_log_enabled(self) -> bool:
        return False


# -- gevent --------------------------------------------------------------------------------


class AcceptServer(StreamServer):  # type: ignore[misc]
    """gevent's accept loop. A subclass overrides ``accept_ready`` (called when
    the listener has connections waiting; ``super().accept_ready()``
    accepts them) and may ``pause_accepting``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "accept_ready" in cls.__dict__:
            cls._do_read = cls.__dict__["accept_ready"]

    def accept_ready(self) -> None:
        StreamServer._do_read(self)

    def pause_accepting(self, seconds: float) -> None:
        """Stop accepting; start again after ``seconds`` (unless stopped meanwhile)."""
        self.stop_accepting()
        self._timer = self.loop.timer(seconds)
        self._timer.start(self._start_accepting_if_started)


def raw_socket(sock: socket.socket) -> socket.socket:
    """The OS socket under a gevent socket (a plain socket is returned as is):
    a non-blocking call on it neither registers a watcher nor switches to
    the hub, and a ``shutdown`` on it wakes a greenlet waiting on the
    wrapper with a plain end-of-stream."""
    if isinstance(sock, gevent_socket.socket):
        raw: socket.socket = sock._sock
        return raw
    return sock


def route_hub_errors(report: Callable[[object, type[BaseException], BaseException | None, Any], None]) -> None:
    """Have gevent's hub call ``report(context, type, value, traceback)``
    instead of printing a greenlet's failure to stderr."""

    def print_exception(hub: Hub, context: object, t: Any, v: Any, tb: Any) -> None:
        t, v, tb = hub._normalize_exception(t, v, tb)
        report(context, t, v, tb)

    Hub.print_exception = print_exception


# -- urllib3 -------------------------------------------------------------------------------


def take_pooled(pool: HTTPConnectionPool) -> HTTPConnection:
    """A connection from the pool (idle and connected, or new and unconnected)."""
    return pool._get_conn()  # type: ignore[return-value]


def return_pooled(pool: HTTPConnectionPool, conn: HTTPConnection | None) -> None:
    """Give ``conn`` back to the pool; ``None`` (after closing a connection
    that must not be reused) frees its slot for a new one."""
    pool._put_conn(conn)


# -- prometheus_client ---------------------------------------------------------------------


def add_histogram_counts(histogram: Histogram, counts: Sequence[int], total: float) -> None:
    """Add observations counted per bucket to a histogram: each bucket's
    count and the sum written once (prometheus_client takes one observation
    at a time, a file write for its bucket and one for its sum each time)."""
    if not any(counts):
        return
    for value, count in zip(histogram._buckets, counts, strict=True):
        if count:
            value.inc(count)
    histogram._sum.inc(total)

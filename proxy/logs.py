"""Logging: JSON or LTSV records, to files or to stdout/stderr.

Two streams, as the platform contract has them: the access log (one record
per request, logger ``proxy.access``) and everything else (Gunicorn's own
messages and the proxy's errors, loggers ``gunicorn.error`` and ``proxy``).
File handlers are ``FileHandler``s so that Gunicorn's SIGUSR1 handling
(``reopen_files``) reopens them in the master and in every worker.

Every record is one line, whatever its values hold: JSON escapes control
characters (and, with ``ensure_ascii``, everything outside ASCII); LTSV
escapes the same set (see ``ltsv_escape``). Output that would bypass logging
in a worker (``print``, Python warnings, exceptions printed by gevent's hub,
uncaught exceptions in threads) is routed into the error log as records too
(see ``capture_stray_output``).
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import sys
import threading
import time
import traceback
from contextvars import ContextVar
from typing import Any

from gunicorn.glogging import Logger as GunicornLogger
from pythonjsonlogger.json import JsonFormatter

from .settings import Settings

access_log = logging.getLogger("proxy.access")
error_log = logging.getLogger("proxy")

#: Whether the request being handled in this greenlet has its access line
#: (set by the app's access record, read by the worker's error handling, so
#: a request Gunicorn rejects itself gets a line too, and none gets two).
access_logged: ContextVar[bool] = ContextVar("proxy_access_logged", default=False)


#: This process's id, kept current across fork: os.getpid() is a system
#: call, and every access record carries the id.
pid = os.getpid()


def _forked() -> None:
    global pid
    pid = os.getpid()


os.register_at_fork(after_in_child=_forked)

_second = (-1, "")


def write_access(fields: dict[str, Any]) -> None:
    """One access record, through the access logger's handlers and formatters
    like any record, minus the Logger's per-call work (level, filter and
    handler walks) and the handler lock: it is written from the greenlets of
    one thread, and a write never yields to another greenlet mid-record.
    Callers check ``access_log.isEnabledFor(logging.INFO)`` first, so that
    nothing is built when the access log is off."""
    record = logging.LogRecord(access_log.name, logging.INFO, "", 0, fields, None, None)
    for handler in access_log.handlers:
        handler.emit(record)


def iso_time(epoch: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. ``2026-11-21T05:10:34.123Z``
    (the part up to the second is formatted once a second)."""
    global _second
    whole = int(epoch)
    if _second[0] != whole:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{int(epoch % 1 * 1000):03d}Z"


def _message(record: logging.LogRecord) -> str:
    """``record.getMessage()``, or a description of why it cannot be built
    (a bad format string must not lose the record, nor print a traceback
    outside the log)."""
    try:
        return record.getMessage()
    except Exception as exc:  # any formatting failure
        return f"{record.msg!r} % {record.args!r} (message formatting failed: {exc!r})"


class _Timestamped:
    """Puts ``time`` (ISO 8601 UTC, ms), ``level`` and ``logger`` on diagnostics."""

    def base_fields(self, record: logging.LogRecord) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "time": iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "pid": pid,
            "message": _message(record),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            fields["request_id"] = request_id
        if record.exc_info:
            fields["traceback"] = "".join(traceback.format_exception(*record.exc_info))
        if record.stack_info:
            fields["stack"] = record.stack_info
        return fields


class JsonErrorFormatter(_Timestamped, JsonFormatter):
    """Diagnostics as one JSON object a line; tracebacks stay inside the record."""

    def format(self, record: logging.LogRecord) -> str:
        return self.jsonify_log_record(self.base_fields(record))


class JsonAccessFormatter(JsonFormatter):
    """The access record (a dict passed as the message) as one JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        return self.jsonify_log_record(record.msg)


# LTSV: the escapes below, then every other character outside printable ASCII
# as \xNN, \uNNNN or \UNNNNNNNN (``backslashreplace``). Header values reach
# us latin-1 decoded, one character per byte, so \xNN is the byte received.
_LTSV_ESCAPES = {i: f"\\x{i:02x}" for i in range(32)}
_LTSV_ESCAPES.update({ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r", ord("\\"): "\\\\", 127: "\\x7f"})


def ltsv_escape(value: str) -> str:
    """The value as printable ASCII: it can neither end the line nor start a
    forged field, and the original can be recovered exactly."""
    if value.isascii() and value.isprintable() and "\\" not in value:
        return value
    return value.translate(_LTSV_ESCAPES).encode("ascii", "backslashreplace").decode("ascii")


def ltsv(fields: dict[str, Any]) -> str:
    """Labelled tab-separated values; ``None`` is ``-``, floats have 6 decimals."""
    parts = []
    for key, value in fields.items():
        if value is None:
            value = "-"
        elif isinstance(value, float):
            value = f"{value:.6f}"
        else:
            value = ltsv_escape(str(value))
        parts.append(f"{key}:{value}")
    return "\t".join(parts)


class LtsvErrorFormatter(_Timestamped, logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return ltsv(self.base_fields(record))


class LtsvAccessFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return ltsv(record.msg)  # type: ignore[arg-type]


class SharedStreamHandler(logging.StreamHandler):
    """A handler for stdout or stderr, which every process of the proxy shares.

    A pipe keeps one write of at most PIPE_BUF (4096) bytes whole; a longer
    one is interleaved with other processes' writes whenever the pipe is
    full (measured: most 20 KB records torn with a slow reader). So each
    record is written with one ``write(2)`` under an exclusive ``flock`` on
    ``lock_file``, which each process opens for itself (a lock taken through
    a descriptor inherited across fork would be shared, not exclusive).
    Without a usable lock file, records are still written one call each.
    """

    def __init__(self, stream=None, lock_file: str | None = None) -> None:
        super().__init__(stream)
        self.lock_file = lock_file
        self._lock_fd = -1
        self._lock_pid = 0

    def _lock(self) -> int:
        if self._lock_pid != pid:
            if self._lock_fd >= 0:  # inherited from the parent: not ours to lock with
                os.close(self._lock_fd)
            self._lock_pid, self._lock_fd = pid, -1
            if self.lock_file:
                try:
                    self._lock_fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                except OSError:
                    pass
        return self._lock_fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + self.terminator).encode("utf-8", "backslashreplace")
            fd = self.stream.fileno()
            lock = self._lock()
            if lock >= 0:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                except OSError:  # a file system without locks: write unlocked from now on
                    os.close(lock)
                    self.lock_file, self._lock_fd, lock = None, -1, -1
            try:
                _write_all(fd, data)
            finally:
                if lock >= 0:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


class RecordFileHandler(logging.FileHandler):
    """A FileHandler (Gunicorn reopens those on SIGUSR1) that writes each
    record with one write(2) on the O_APPEND descriptor: no buffer to flush,
    and every line lands whole even with several processes appending."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self.stream is None:
                self.stream = self._open()
            _write_all(
                self.stream.fileno(), (self.format(record) + self.terminator).encode("utf-8", "backslashreplace")
            )
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class ProxyGunicornLogger(GunicornLogger):
    """Gunicorn's logger minus its access log: the proxy writes its own
    access records (``proxy.access``), and Gunicorn would otherwise build
    its unused access atoms for every request."""

    def _compute_access_log_enabled(self) -> bool:
        return False


def logging_config(settings: Settings) -> dict[str, Any]:
    """The ``logconfig_dict`` Gunicorn applies in the master (workers inherit it).

    Stream handlers write to the process's original ``sys.__stdout__`` and
    ``sys.__stderr__``: in workers ``sys.stdout``/``sys.stderr`` are replaced
    by streams that log (see ``capture_stray_output``).
    """
    # Python warnings become records of the ``py.warnings`` logger (root's
    # handler: the error log), in the master and, inherited, in the workers.
    logging.captureWarnings(True)
    # Record attributes no formatter here uses, and which cost per record:
    # the caller's frame, the thread name (a dummy thread object per greenlet
    # under gevent), the process id (a system call; ``pid`` above has it).
    # See "Optimization" in the logging HOWTO.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False
    kind = "Json" if settings.log_format == "json" else "Ltsv"
    if settings.log_target == "file":
        access_handler = {"class": "proxy.logs.RecordFileHandler", "filename": str(settings.access_log)}
        error_handler = {"class": "proxy.logs.RecordFileHandler", "filename": str(settings.error_log)}
    else:
        lock_file = str(settings.run_dir / "stdio.lock")
        access_handler = {"class": "proxy.logs.SharedStreamHandler", "stream": "ext://sys.__stdout__"}
        error_handler = {"class": "proxy.logs.SharedStreamHandler", "stream": "ext://sys.__stderr__"}
        access_handler["lock_file"] = error_handler["lock_file"] = lock_file
    access_handler["formatter"] = "access"
    error_handler["formatter"] = "error"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "access": {"()": f"proxy.logs.{kind}AccessFormatter"},
            "error": {"()": f"proxy.logs.{kind}ErrorFormatter"},
        },
        "handlers": {
            "access": access_handler,
            "error": error_handler,
        },
        "root": {"level": "WARNING", "handlers": ["error"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["error"], "propagate": False},
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
            "proxy": {"level": "INFO", "handlers": ["error"], "propagate": False},
            "proxy.access": {
                "level": "INFO" if settings.access_log_enabled else "CRITICAL",
                "handlers": ["access"],
                "propagate": False,
            },
        },
    }


# -- output that bypasses logging -------------------------------------------------


class LoggingStream(io.TextIOBase):
    """A text stream whose every line becomes one record of ``logger``.

    Installed as ``sys.stdout``/``sys.stderr`` in workers: ``print()`` in a
    user's middleware, ``wsgi.errors`` writes and anything else printed then
    end up in the error log as records, never as raw text in a log file or
    in the access stream on stdout. ``fileno()`` is still the real
    descriptor, which Gunicorn's ``reopen_files`` points at the new error log.
    """

    def __init__(self, logger: logging.Logger, level: int, fd: int, encoding: str = "utf-8") -> None:
        super().__init__()
        self._logger = logger
        self._level = level
        self._fd = fd
        self._encoding = encoding
        self._pending = ""
        self._busy = threading.local()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._encoding

    @property
    def errors(self) -> str:  # type: ignore[override]
        return "backslashreplace"

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if getattr(self._busy, "active", False):
            # Logging itself failed and is reporting it here: do not loop.
            os.write(self._fd, text.encode(self._encoding, "backslashreplace"))
            return len(text)
        data = self._pending + text
        lines = data.split("\n")
        self._pending = lines.pop()
        if len(self._pending) > 65536:  # no newline coming: do not grow forever
            lines.append(self._pending)
            self._pending = ""
        for line in lines:
            self._emit(line)
        return len(text)

    def flush(self) -> None:
        if self._pending:
            line, self._pending = self._pending, ""
            self._emit(line)

    def _emit(self, line: str) -> None:
        line = line.rstrip("\r")
        if not line:
            return
        self._busy.active = True
        try:
            self._logger.log(self._level, "%s", line)
        finally:
            self._busy.active = False


def _log_uncaught(exc_type, exc, tb, where: str = "uncaught exception") -> None:
    error_log.error("%s: %s", where, getattr(exc_type, "__name__", exc_type), exc_info=(exc_type, exc, tb))


def _threading_excepthook(args) -> None:
    if args.exc_type is SystemExit:
        return
    thread = args.thread.name if args.thread is not None else "?"
    _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback, f"uncaught exception in thread {thread}")


def _unraisablehook(unraisable) -> None:
    where = unraisable.err_msg or "exception ignored"
    if unraisable.object is not None:
        try:
            where = f"{where} in {unraisable.object!r}"
        except Exception:  # a broken __repr__
            pass
    exc = unraisable.exc_value
    _log_uncaught(unraisable.exc_type, exc, unraisable.exc_traceback, where)


def _hub_print_exception(hub, context, t, v, tb) -> None:
    """gevent's ``Hub.print_exception``, as one error record with the traceback."""
    t, v, tb = hub._normalize_exception(t, v, tb)
    if context is not None and not isinstance(context, str):
        try:
            context = hub.format_context(context)
        except Exception:  # a broken __repr__
            context = repr(context)
    logging.getLogger("gevent.hub").error(
        "%s failed with %s", context or "the event loop", getattr(t, "__name__", "exception"), exc_info=(t, v, tb)
    )


def capture_stray_output() -> None:
    """Route output that bypasses logging into the error log, as records.

    Called in each worker at start-up: ``sys.stdout`` (INFO, logger
    ``proxy.stdout``) and ``sys.stderr`` (ERROR, logger ``proxy.stderr``)
    become ``LoggingStream``s; uncaught exceptions (main thread, other
    threads, "exception ignored" ones) and greenlets that die with an
    exception (which gevent's hub would print to stderr) are logged with
    their traceback inside the record.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    if not isinstance(sys.stdout, LoggingStream):
        sys.stdout = LoggingStream(logging.getLogger("proxy.stdout"), logging.INFO, 1)
    if not isinstance(sys.stderr, LoggingStream):
        sys.stderr = LoggingStream(logging.getLogger("proxy.stderr"), logging.ERROR, 2)
    sys.excepthook = _log_uncaught
    threading.excepthook = _threading_excepthook
    sys.unraisablehook = _unraisablehook
    logging.captureWarnings(True)
    try:
        from gevent.hub import Hub
    except ImportError:  # pragma: no cover - gevent is a dependency
        return
    Hub.print_exception = _hub_print_exception


def log_files_moved() -> bool:
    """Whether a file this process logs to is no longer the one at its path
    (rotated away, or deleted): then it must reopen its files."""
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, logging.FileHandler) and handler.stream is not None:
                try:
                    open_file = os.fstat(handler.stream.fileno())
                    at_path = os.stat(handler.baseFilename)
                except (OSError, ValueError):
                    return True
                if (open_file.st_dev, open_file.st_ino) != (at_path.st_dev, at_path.st_ino):
                    return True
    return False

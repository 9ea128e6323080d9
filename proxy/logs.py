"""Logging: JSON or LTSV records, on stdout/stderr or in files.

Two streams, as the platform contract has them: the access log (one record
per request, logger ``proxy.access``) and everything else (Gunicorn's own
messages and the proxy's errors, loggers ``gunicorn.error`` and ``proxy``).
The stdout target (the newer platform, the default) writes access records
to stdout and the rest to stderr; the file target (the older platform, which
runs logrotate.sh) writes them to ``access.log`` and ``error.log`` through
``FileHandler``s, so that Gunicorn's SIGUSR1 handling (``reopen_files``)
reopens them in the master and in every worker. With the file target, the
master's errors (and a worker's before it serves) are copied to the stderr
the proxy was started with: a proxy that cannot start says why where the
container runtime looks, not only in a file inside the container.

Every record is one line of printable ASCII, whatever its values hold: JSON
escapes control characters and everything outside ASCII (see
``JsonLines``); LTSV escapes the same set (see ``ltsv_escape``). Output that bypasses logging is
turned into records by ``proxy.capture``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import traceback
from contextvars import ContextVar
from typing import Any, TextIO

from pythonjsonlogger.orjson import OrjsonFormatter

from . import metrics
from .internals import QuietAccessLogger
from .settings import Settings

__all__ = [
    "ConsoleCopyHandler",
    "JsonAccessFormatter",
    "JsonErrorFormatter",
    "LtsvAccessFormatter",
    "LtsvErrorFormatter",
    "ProxyGunicornLogger",
    "RecordFileHandler",
    "SharedStreamHandler",
    "access_log",
    "access_logged",
    "error_log",
    "iso_time",
    "log_files_moved",
    "logging_config",
    "ltsv",
    "ltsv_escape",
    "pid",
    "serving",
    "track_pid",
    "write_access",
]

access_log = logging.getLogger("proxy.access")
error_log = logging.getLogger("proxy")

#: Whether the request being handled in this greenlet has its access line
#: (set by the app's access record, read by the worker's error handling, so
#: a request Gunicorn rejects itself gets a line too, and none gets two).
access_logged: ContextVar[bool] = ContextVar("proxy_access_logged", default=False)


#: This process's id, kept current across fork by ``track_pid``:
#: os.getpid() is a system call, and every access record carries the id.
pid = 0
_tracking_pid = False


def _forked() -> None:
    global pid
    pid = os.getpid()


def track_pid() -> None:
    """Set ``pid``, and keep it current in every process forked from here on
    (called by the logger set-up in the master; safe to call again)."""
    global _tracking_pid
    _forked()
    if not _tracking_pid:
        os.register_at_fork(after_in_child=_forked)
        _tracking_pid = True


_second = (-1, "")


def write_access(fields: dict[str, Any]) -> None:
    """One access record, through the access logger's handlers and formatters
    like any record, minus the Logger's per-call work (level, filter and
    handler walks) and the handler lock: it is written from the greenlets of
    one thread, and a write never yields to another greenlet mid-record.
    Callers check ``access_log.isEnabledFor(logging.INFO)`` first, so that
    nothing is built when the access log is off."""
    record = logging.LogRecord.__new__(logging.LogRecord)
    record.__dict__.update(_ACCESS_RECORD)
    record.msg = fields
    record.created = created = time.time()
    record.msecs = int(created % 1 * 1000)
    record.relativeCreated = _ACCESS_RECORD["relativeCreated"] + (created - _ACCESS_RECORD["created"]) * 1000
    for handler in access_log.handlers:
        handler.emit(record)


#: What every access ``LogRecord`` holds but its message and time, made once:
#: ``LogRecord()`` works each of these out per record (the caller's file
#: split three ways, thread and process names): measured in-process, 1.6
#: of the access line's 8 µs.
_ACCESS_RECORD = vars(logging.LogRecord("proxy.access", logging.INFO, "", 0, None, None, None)) | {
    "process": None,
    "thread": None,
    "threadName": None,
    "processName": None,
}


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


class JsonLines(OrjsonFormatter):
    """python-json-logger's orjson formatter, its lines kept ASCII.

    orjson writes a record in a fifth of the time the json module takes
    (measured: 12 µs less CPU per proxied 1 KiB request, 5%), but it writes
    characters outside ASCII as they are, and some of them (U+0085, U+2028)
    end a line for many readers. A record holding one (rare: header values
    arrive latin-1 decoded, one character per byte) is written again by the
    json module with ``ensure_ascii``, as every record was before.
    """

    def jsonify_log_record(self, log_data: Any) -> str:
        text = super().jsonify_log_record(log_data)
        if text.isascii():
            return text
        return json.dumps(log_data, default=self.json_default, ensure_ascii=True)


class JsonErrorFormatter(_Timestamped, JsonLines):
    """Diagnostics as one JSON object a line; tracebacks stay inside the record."""

    def format(self, record: logging.LogRecord) -> str:
        return self.jsonify_log_record(self.base_fields(record))


class JsonAccessFormatter(JsonLines):
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


class SharedStreamHandler(logging.StreamHandler[TextIO]):
    """A handler for stdout or stderr, which every process of the proxy shares.

    A pipe keeps one write of at most PIPE_BUF (4096) bytes whole; a longer
    one is interleaved with other processes' writes whenever the pipe is
    full (measured: most 20 KB records torn with a slow reader). So each
    record is written with one ``write(2)`` under an exclusive ``flock`` on
    ``lock_file``, which each process opens for itself (a lock taken through
    a descriptor inherited across fork would be shared, not exclusive).
    Without a usable lock file, records are still written one call each.
    """

    def __init__(self, stream: TextIO | None = None, lock_file: str | None = None) -> None:
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


#: A copy of the descriptor 2 the process was started with, taken before
#: Gunicorn's ``capture_output`` points 2 at ``error.log`` (file target).
_console_fd = -1
#: Whether this process still copies its errors to ``_console_fd``: the
#: master always, a worker until it serves (``serving``).
_starting = True


def _keep_console() -> None:
    global _console_fd
    if _console_fd < 0:
        try:
            _console_fd = os.dup(2)
        except OSError:  # started with descriptor 2 closed: nowhere to copy to
            pass


def serving() -> None:
    """This worker has started serving: its errors are ordinary run-time
    diagnostics from now on, for the error log only."""
    global _starting
    _starting = False


class ConsoleCopyHandler(logging.Handler):
    """File target: a copy of each record on the stderr the proxy was started
    with, in the master and in a worker that has not started serving (an
    invalid configuration, a port that cannot be bound, a worker that
    cannot boot). One write(2) a record, as the other handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        if not _starting or _console_fd < 0:
            return
        try:
            _write_all(_console_fd, (self.format(record) + "\n").encode("utf-8", "backslashreplace"))
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def _lean_records() -> None:
    """Record attributes no formatter here uses, and which cost per record:
    the caller's frame, the thread name (a dummy thread object per greenlet
    under gevent), the process id (a system call; ``pid`` has it). See
    "Optimization" in the logging HOWTO."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False


class ProxyGunicornLogger(QuietAccessLogger):
    """Gunicorn's logger minus its access log (the proxy writes its own,
    ``proxy.access``), set up with the proxy's process-wide logging state."""

    def setup(self, cfg: Any) -> None:
        track_pid()
        _keep_console()
        _lean_records()
        # Python warnings become records of the ``py.warnings`` logger (root's
        # handler: the error log), in the master and, inherited, in the workers.
        logging.captureWarnings(True)
        super().setup(cfg)

    def reopen_files(self) -> None:
        super().reopen_files()
        metrics.log_reopened()


def logging_config(settings: Settings) -> dict[str, Any]:
    """The ``logconfig_dict`` Gunicorn applies in the master (workers inherit it).

    Stream handlers write to the process's original ``sys.__stdout__`` and
    ``sys.__stderr__``: in workers ``sys.stdout``/``sys.stderr`` are replaced
    by streams that log (see ``proxy.capture``).
    """
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
    handlers: dict[str, dict[str, str]] = {"access": access_handler, "error": error_handler}
    error_handlers = ["error"]
    if settings.log_target == "file":
        handlers["console"] = {"class": "proxy.logs.ConsoleCopyHandler", "level": "ERROR", "formatter": "error"}
        error_handlers.append("console")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "access": {"()": f"proxy.logs.{kind}AccessFormatter"},
            "error": {"()": f"proxy.logs.{kind}ErrorFormatter"},
        },
        "handlers": handlers,
        "root": {"level": "WARNING", "handlers": error_handlers},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": error_handlers, "propagate": False},
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
            "proxy": {"level": "INFO", "handlers": error_handlers, "propagate": False},
            "proxy.access": {
                "level": "INFO" if settings.access_log_enabled else "CRITICAL",
                "handlers": ["access"],
                "propagate": False,
            },
        },
    }


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

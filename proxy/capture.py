"""Output that bypasses logging, captured as error-log records.

A worker runs code the proxy does not control (the user's middleware,
libraries, gevent's hub): ``print()``, writes to ``wsgi.errors``, Python
warnings, uncaught exceptions in threads and greenlets. Left alone, these
reach descriptors 1 and 2 as raw text: a raw line in ``error.log``, or worse,
in the access stream on stdout. ``install`` (called once in each worker at
start-up) turns each of them into a record of the error log instead. The
formats and handlers those records go through are ``proxy.logs``'.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
from types import TracebackType

from . import internals
from .logs import error_log

__all__ = ["LoggingStream", "install"]


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


def _log_uncaught(
    exc_type: type[BaseException],
    exc: BaseException | None,
    tb: TracebackType | None,
    where: str = "uncaught exception",
) -> None:
    error_log.error("%s: %s", where, getattr(exc_type, "__name__", exc_type), exc_info=(exc_type, exc, tb))  # type: ignore[arg-type]


def _threading_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    thread = args.thread.name if args.thread is not None else "?"
    _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback, f"uncaught exception in thread {thread}")


def _unraisablehook(unraisable: sys.UnraisableHookArgs) -> None:
    where = unraisable.err_msg or "exception ignored"
    if unraisable.object is not None:
        try:
            where = f"{where} in {unraisable.object!r}"
        except Exception:  # a broken __repr__
            pass
    _log_uncaught(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback, where)


def _log_hub_error(context: object, t: type[BaseException], v: BaseException | None, tb: TracebackType | None) -> None:
    """A greenlet (or loop callback) failure gevent's hub would print: one
    error record with the traceback."""
    if context is not None and not isinstance(context, str):
        try:
            context = repr(context)
        except Exception:  # a broken __repr__
            context = object.__repr__(context)
    logging.getLogger("gevent.hub").error(
        "%s failed with %s",
        context or "the event loop",
        getattr(t, "__name__", "exception"),
        exc_info=(t, v, tb),  # type: ignore[arg-type]
    )


def install() -> None:
    """Route output that bypasses logging into the error log, as records.

    ``sys.stdout`` (INFO, logger ``proxy.stdout``) and ``sys.stderr``
    (ERROR, logger ``proxy.stderr``) become ``LoggingStream``s; uncaught
    exceptions (main thread, other threads, "exception ignored" ones),
    Python warnings and greenlets that die with an exception are logged
    with their traceback inside the record.
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
    internals.route_hub_errors(_log_hub_error)

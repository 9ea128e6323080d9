"""The user's extension point: ``middleware = "module:factory"``.

The module is a ``.py`` file in the configuration directory; ``factory(app)``
returns a WSGI app wrapping the proxy. An exception it raises fails only
that request (500, traceback in the error log), never the worker.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .access import StartResponse
from .logs import error_log

__all__ = ["ExtensionError", "WSGIApp", "check", "failed", "load_factory", "wrap"]

#: A WSGI application, the proxy's or the user's middleware around it.
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_500_BODY = b"Internal Server Error\n"
_500_HEADERS = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(_500_BODY)))]


class ExtensionError(Exception):
    """The middleware module could not be loaded or its factory failed."""


def _describe(exc: BaseException, module_path: Path) -> str:
    """``line N: ExcType: message``, N being the deepest line of the user's
    file the exception went through (or the syntax error's line)."""
    line = None
    if isinstance(exc, SyntaxError) and exc.filename and Path(exc.filename) == module_path:
        line = exc.lineno
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename) == module_path:
            line = frame.lineno
    what = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return f"line {line}: {what}" if line else what


def load_factory(module_path: Path, factory: str) -> Callable[[WSGIApp], WSGIApp]:
    """Import the user's module by file path and return its factory.

    Bytecode is not written: the configuration directory is read-only to us.
    """
    sys.dont_write_bytecode = True
    name = f"proxy_user_{module_path.stem}"
    spec = importlib.util.spec_from_file_location(name, module_path)
    if spec is None or spec.loader is None:
        raise ExtensionError(f"{module_path.name}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered while it runs, as a normal import would (dataclasses,
    # pickling and typing look modules up by name).
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # a user's module may even call sys.exit()
        sys.modules.pop(name, None)
        raise ExtensionError(f"{module_path.name}: import failed: {_describe(exc, module_path)}") from exc
    func: Callable[[WSGIApp], WSGIApp] | None = getattr(module, factory, None)
    if not callable(func):
        raise ExtensionError(f"{module_path.name}: no callable named {factory!r}")
    return func


def wrap(app: WSGIApp, module_path: Path, factory: str) -> WSGIApp:
    """Build ``factory(app)`` and guard it so its failures stay per-request."""
    try:
        user_app = load_factory(module_path, factory)(app)
    except ExtensionError:
        raise
    except BaseException as exc:
        raise ExtensionError(f"{module_path.name}: {factory}(app) failed: {_describe(exc, module_path)}") from exc
    if not callable(user_app):
        raise ExtensionError(f"{module_path.name}: {factory}(app) did not return a WSGI app (a callable)")
    label = f"{module_path.stem}:{factory}"

    def guarded(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        result = None
        try:
            result = user_app(environ, start_response)
            if result is not None and result is _already_handled():  # a finished tunnel
                return result
            # The first chunk is where a generator-style middleware runs its
            # code; taking it here keeps its exceptions a clean 500 too.
            iterator = iter(result)
            try:
                first = next(iterator)
            except StopIteration:
                first = None
        except (Exception, SystemExit):
            failed(environ, start_response, label)
            _close_quietly(result)
            return [_500_BODY]
        return _Resumed(first, iterator, result)

    return guarded


def _already_handled() -> object | None:
    """Gunicorn's marker for "the app wrote to the socket itself" (tunnels).
    Looked up, not imported: importing Gunicorn's worker module would cost
    validate.sh a tenth of a second, and workers have it loaded already."""
    return getattr(sys.modules.get("gunicorn.workers.base_async"), "ALREADY_HANDLED", None)


def failed(environ: dict[str, Any], start_response: StartResponse, label: str) -> None:
    """Log the middleware's exception with its traceback and start a 500
    (replacing any response the middleware may have started)."""
    exchange = environ.get("proxy.exchange")
    if exchange is not None:
        exchange.outcome = "error"
    error_log.exception(
        "middleware %s raised on %s %s; answering 500",
        label,
        environ.get("REQUEST_METHOD"),
        environ.get("RAW_URI"),
        extra={"request_id": getattr(exchange, "request_id", None)},
    )
    start_response("500 Internal Server Error", list(_500_HEADERS), sys.exc_info())


def _close_quietly(result: object) -> None:
    """Close a body the failed middleware had obtained (it may hold an
    upstream connection)."""
    close = getattr(result, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            pass


class _Resumed:
    """The middleware's response body, its first chunk already taken."""

    __slots__ = ("_first", "_iterator", "_result")

    def __init__(self, first: bytes | None, iterator: Iterator[bytes], result: Iterable[bytes]) -> None:
        self._first = first
        self._iterator = iterator
        self._result = result

    def __iter__(self) -> Iterator[bytes]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        yield from self._iterator

    def close(self) -> None:
        close = getattr(self._result, "close", None)
        if close is not None:
            close()


def check(module_path: Path, factory: str) -> str | None:
    """What ``validate.sh`` does: import the module and build ``factory(app)``
    around a stand-in app, with anything it prints swallowed (a valid
    configuration makes validate.sh print nothing). Returns the reason it
    cannot be used, or None."""

    def stand_in(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response("204 No Content", [])
        return []

    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            wrap(stand_in, module_path, factory)
    except ExtensionError as exc:
        return str(exc)
    return None

"""The user's extension point: ``middleware = "module:factory"``.

The module is a ``.py`` file in the configuration directory; ``factory(app)``
returns a WSGI app wrapping the proxy. An exception it raises fails only
that request (500, traceback in the error log), never the worker.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from .logs import error_log

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


class ExtensionError(Exception):
    """The middleware module could not be loaded or its factory failed."""


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
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # a user's module may even call sys.exit()
        raise ExtensionError(f"{module_path.name}: import failed: {exc!r}") from exc
    func = getattr(module, factory, None)
    if not callable(func):
        raise ExtensionError(f"{module_path.name}: no callable named {factory!r}")
    return func


def wrap(app: WSGIApp, module_path: Path, factory: str) -> WSGIApp:
    """Build ``factory(app)`` and guard it so its failures stay per-request."""
    try:
        user_app = load_factory(module_path, factory)(app)
    except ExtensionError:
        raise
    except Exception as exc:
        raise ExtensionError(f"{module_path.name}: {factory}(app) failed: {exc!r}") from exc
    if not callable(user_app):
        raise ExtensionError(f"{module_path.name}: {factory}(app) did not return a WSGI app")

    def guarded(environ: dict, start_response: Callable) -> Iterable[bytes]:
        try:
            return user_app(environ, start_response)
        except Exception:
            error_log.exception("middleware %s:%s raised; answering 500", module_path.stem, factory)
            start_response(
                "500 Internal Server Error",
                [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", "22")],
                sys.exc_info(),
            )
            return [b"Internal Server Error\n"]

    return guarded

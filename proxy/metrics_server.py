"""The Prometheus endpoint: ``GET /metrics`` on ``127.0.0.1:$PROXY_METRICS_PORT``.

Served by a thread of the Gunicorn master, not by the workers: a scrape adds
up every process's metric files (``proxy.metrics``), and the workers only
ever write theirs, so a flood of scrapes costs them nothing but CPU time,
and the thread runs at the lowest priority (nice 19, per thread on Linux)
so that the workers get the CPU first. One scrape at a time; a client gets
``CLIENT_TIMEOUT_S`` to send its request. Loopback only: the platform
allows ports other than the public listener on loopback only.

A thread rather than a process of its own: nothing to supervise or to
reap (the master's ``waitpid(-1)`` would take a child's exit status), and
it shows up neither as a worker nor as a holder of rotated log files.

With the cache on, a scrape also reads the cache's counters from its index
(``cache_store.read_stats``: one read-only query per scrape, the totals
every worker last flushed there), so the workers' cache path writes no
metric file of its own.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from . import cache_store

__all__ = ["CACHE_COUNTERS", "CLIENT_TIMEOUT_S", "RETRY_S", "CacheDir", "endpoint", "serve", "snapshot", "stop"]

#: Seconds a scraper has to send its request, and to read the answer.
CLIENT_TIMEOUT_S = 10.0
#: Seconds between attempts to listen when the port is taken.
RETRY_S = 5.0

_log = logging.getLogger(__name__)

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
#: The cache directory while the active configuration enables the cache, else None.
CacheDir = Callable[[], Path | None]

#: ``cache_store.COUNTERS`` name -> help text of its ``proxy_cache_<name>_total``.
CACHE_COUNTERS = {
    "hits": "Requests answered from a stored entry (fresh, or stale when allowed).",
    "misses": "Cacheable requests that found no usable entry and went to next-hop.",
    "revalidated": "Stale entries next-hop confirmed with a 304 (served from the cache).",
    "stale": "Hits served stale (stale-while-revalidate, stale-if-error); also counted in hits.",
    "collapsed": "Requests fed from another request's fill in flight instead of asking next-hop.",
    "evictions": "Entries removed to stay under max_size or max_variants.",
    "purges": "Purges applied (purge and purge-key messages), however many entries each removed.",
    "bans": "Bans recorded (ban messages), however many entries each removed.",
}
#: Held while the metrics thread is inside SQLite: a fork (the master
#: forking a worker) waits for it, so no child starts with an SQLite lock held.
_sqlite_lock = threading.Lock()


class _CacheCollector:
    """The cache's counters and gauges, read from its index at each scrape."""

    def __init__(self, cache_dir: CacheDir) -> None:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.cache_dir = cache_dir
        self.counter = CounterMetricFamily
        self.gauge = GaugeMetricFamily

    def collect(self) -> Iterator[Any]:
        directory = self.cache_dir()
        if directory is None:
            return
        try:
            with _sqlite_lock:
                stats = cache_store.read_stats(directory)
        except Exception as exc:  # the other metrics are still scraped
            _log.warning("metrics endpoint: cannot read the cache's counters from %s: %s", directory, exc)
            return
        for name, help_text in CACHE_COUNTERS.items():
            yield self.counter(f"proxy_cache_{name}", help_text, value=stats[name])
        yield self.gauge("proxy_cache_entries", "Entries stored (every variant counts).", value=stats["entries"])
        yield self.gauge("proxy_cache_stored_bytes", "Bytes of the stored entry files.", value=stats["bytes_stored"])


def _registry(directory: Path, cache_dir: CacheDir | None = None) -> Any:
    # Imported only when used: prometheus_client picks its (multiprocess)
    # mode when first imported, after proxy.metrics.prepare has set it up.
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    if cache_dir is not None:
        registry.register(_CacheCollector(cache_dir))
    return registry


def snapshot(directory: Path, cache_dir: CacheDir | None = None) -> bytes:
    """Every process's metrics, in the text format a scrape gets; empty when
    there are none (metrics off, or no proxy has run)."""
    from prometheus_client import generate_latest

    if not directory.is_dir():
        return b""
    return generate_latest(_registry(directory, cache_dir))


def endpoint(directory: Path, cache_dir: CacheDir | None = None) -> WSGIApp:
    """The WSGI app: ``GET``/``HEAD /metrics`` answer, other paths 404, other methods 405.
    ``cache_dir`` says, at each scrape, where the enabled cache is (None: no cache metrics)."""
    from prometheus_client import make_wsgi_app

    metrics_app = make_wsgi_app(_registry(directory, cache_dir))

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"404 Not Found: the metrics are at /metrics\n"]
        if method not in ("GET", "HEAD"):
            start_response(
                "405 Method Not Allowed", [("Content-Type", "text/plain; charset=utf-8"), ("Allow", "GET, HEAD")]
            )
            return [b"405 Method Not Allowed\n"]
        if method == "HEAD":
            metrics_app({**environ, "REQUEST_METHOD": "GET"}, start_response)
            return []
        body: Iterable[bytes] = metrics_app(environ, start_response)
        return body

    return app


class _Handler(WSGIRequestHandler):
    timeout = CLIENT_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged: they come every few seconds."""


class _Server(WSGIServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        _log.exception("metrics endpoint: error answering %s", client_address)


_server: _Server | None = None
_stopping = threading.Event()
_thread: threading.Thread | None = None
#: How listening failed last (each failure is logged once, not every RETRY_S).
_last_failure = [""]


def serve(port: int, directory: Path, cache_dir: CacheDir | None = None) -> None:
    """Serve the endpoint from a thread of this process (the master) until ``stop``.

    Everything that imports modules or binds happens here, in the calling
    thread: the master forks workers while the thread runs, and a child
    forked while another thread holds a module's import lock would hang on
    its first import of that module. Likewise a fork waits while the thread
    reads the cache's index (``_sqlite_lock``).
    """
    global _thread
    if _thread is not None:
        return
    _stopping.clear()
    os.register_at_fork(
        before=_sqlite_lock.acquire, after_in_parent=_sqlite_lock.release, after_in_child=_close_in_child
    )
    app = endpoint(directory, cache_dir)
    server = _listen(port, app, "")
    _thread = threading.Thread(target=_run, args=(port, app, server), name="metrics-endpoint", daemon=True)
    _thread.start()


def _listen(port: int, app: WSGIApp, failure: str) -> _Server | None:
    """The listening server, or None (logged, unless it failed the same way last time)."""
    global _server
    try:
        _server = make_server("127.0.0.1", port, app, server_class=_Server, handler_class=_Handler)
    except OSError as exc:
        if str(exc) != failure:
            _log.error("metrics endpoint: cannot listen on 127.0.0.1:%d (%s), retrying every %gs", port, exc, RETRY_S)
        _last_failure[0] = str(exc)
        return None
    _log.info("metrics endpoint: http://127.0.0.1:%d/metrics", port)
    return _server


def stop() -> None:
    """Stop serving and close the port (the master is exiting)."""
    global _thread
    _stopping.set()
    server = _server
    if server is not None:
        server.shutdown()
    if _thread is not None:
        _thread.join(timeout=CLIENT_TIMEOUT_S)
        _thread = None


def _close_in_child() -> None:
    """A forked worker must not keep the listening socket open (the port would
    stay taken after the master closed it); its copy of the fork lock is released."""
    _sqlite_lock.release()
    if _server is not None:
        _server.socket.close()


def _run(port: int, app: WSGIApp, server: _Server | None) -> None:
    global _server
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    while not _stopping.is_set():
        if server is None:
            if _stopping.wait(RETRY_S):
                break
            server = _listen(port, app, _last_failure[0])
            continue
        try:
            server.serve_forever(poll_interval=0.5)
        except Exception:
            _log.exception("metrics endpoint failed, serving again")
        else:
            break
        finally:
            _server = None
            server.server_close()
        _last_failure[0] = ""
        server = _listen(port, app, "")

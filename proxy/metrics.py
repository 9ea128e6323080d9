"""What the proxy counts for Prometheus (every metric: docs/metrics.md).

prometheus_client in multiprocess mode: each process writes its values to
its own mmap'd files in ``Settings.metrics_dir`` and a scrape adds up the
files (``proxy.metrics_server``). A worker that exits leaves its counter
files behind, so counters never go backwards across worker restarts and
reloads; its live gauges are removed (``worker_exited``).

Hot path: writing one value to its file costs about 3 µs (a lock and a
struct written into the mmap) and a request touches eight values, 5% of a
small proxied request. So each worker adds its requests up in plain Python
objects (``observe``: under 3 µs) and writes the sums every
``FLUSH_INTERVAL_S`` and when it exits: a scrape is at most that stale, and
a worker killed with SIGKILL loses at most that last interval.

Master (gunicorn.conf.py): ``prepare`` at start-up, ``reloaded``,
``worker_exited``. Worker: ``start_worker``, ``flush`` at exit; the request
path calls ``observe``, ``upstream_connection``, ``upstream_failure``,
``tunnel_opened`` and ``tunnel_closed``. Everything is a no-op while metrics
are off (``PROXY_METRICS_PORT=off``) and outside the processes that prepared them.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import shutil
import time
import tomllib
from bisect import bisect_left
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import gevent

from . import internals

if TYPE_CHECKING:
    from .settings import Settings

__all__ = [
    "DURATION_BUCKETS",
    "FAILURE_KINDS",
    "FLUSH_INTERVAL_S",
    "METHODS",
    "OUTCOMES",
    "Observed",
    "flush",
    "log_reopened",
    "observe",
    "prepare",
    "reloaded",
    "start_worker",
    "tunnel_closed",
    "tunnel_opened",
    "upstream_connection",
    "upstream_failure",
    "worker_exited",
]

#: Longest time a worker's counts wait before they reach its metric files.
FLUSH_INTERVAL_S = 1.0
#: Method classes; any other method counts as ``other``.
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")
#: Request outcomes: the access record's, plus ``rejected`` (see ``_outcome``).
OUTCOMES = ("ok", "client_abort", "client_error", "upstream_error", "rejected", "error")
#: How next-hop failed (``proxy.upstream.UpstreamError.kind``).
FAILURE_KINDS = ("refused", "unresolvable", "timeout", "reset", "invalid_answer", "other")
#: Upper bounds (seconds) of the request duration and time-to-first-byte buckets.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_METHOD_CLASS = {method: method for method in METHODS}
#: Status code -> class label; ``none`` when no response was sent.
_STATUS_CLASS = tuple(f"{code // 100}xx" if code >= 100 else "none" for code in range(600))


class _Body(Protocol):
    @property
    def bytes_read(self) -> int: ...


class Observed(Protocol):
    """What ``observe`` reads of a finished request (the access record)."""

    @property
    def environ(self) -> Mapping[str, Any]: ...
    @property
    def status(self) -> int: ...
    @property
    def outcome(self) -> str: ...
    @property
    def start_perf(self) -> float: ...
    @property
    def upstream_status(self) -> int | None: ...
    @property
    def first_byte_s(self) -> float | None: ...
    @property
    def request_body(self) -> _Body | None: ...
    @property
    def body_bytes(self) -> int: ...
    @property
    def tunnel_bytes_up(self) -> int | None: ...


class _Metrics:
    """The metric objects, created in the master before it forks the workers."""

    def __init__(self) -> None:
        # Imported only now: prometheus_client picks multiprocess mode when it
        # is first imported, from PROMETHEUS_MULTIPROC_DIR, which prepare() sets.
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter(
            "proxy_requests",
            "Requests by method class, status class (none: no response sent) and outcome.",
            ("method", "status", "outcome"),
            registry=None,
        )
        self.duration = Histogram(
            "proxy_request_duration_seconds",
            "Time from the request head to the end of the response (tunnels excluded).",
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self.first_byte = Histogram(
            "proxy_upstream_first_byte_seconds",
            "Time from sending the request to next-hop to having its answer's head.",
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self.request_bytes = Counter("proxy_request_body_bytes", "Request body bytes read from clients.", registry=None)
        self.response_bytes = Counter(
            "proxy_response_body_bytes", "Response body bytes sent to clients (tunnels excluded).", registry=None
        )
        self.upstream_connections = Counter(
            "proxy_upstream_connections",
            "Pooled connections to next-hop a request went out on: opened for it, or reused.",
            ("state",),
            registry=None,
        )
        self.upstream_failures = Counter(
            "proxy_upstream_failures",
            "Requests next-hop could not answer (502/504), by kind of failure.",
            ("kind",),
            registry=None,
        )
        self.tunnel_bytes = Counter(
            "proxy_tunnel_bytes",
            "Bytes moved through finished tunnels (up: to next-hop).",
            ("direction",),
            registry=None,
        )
        self.reloads = Counter(
            "proxy_reloads",
            "Configuration reloads: ok, or refused (invalid, previous kept).",
            ("result",),
            registry=None,
        )
        self.log_reopens = Counter(
            "proxy_log_reopens", "Log files reopened (SIGUSR1, reload), by process.", ("process",), registry=None
        )
        self.worker_restarts = Counter(
            "proxy_worker_restarts",
            "Worker processes that exited (killed, crashed, or retired by a reload).",
            registry=None,
        )
        self.config_generation = Gauge(
            "proxy_config_generation",
            "Configurations applied since start: 1, plus one per successful reload.",
            multiprocess_mode="max",
            registry=None,
        )
        self.build_info = Gauge(
            "proxy_build_info",
            "Always 1; the labels say what runs.",
            ("version", "python", "gunicorn", "gevent", "urllib3"),
            multiprocess_mode="max",
            registry=None,
        )
        # The cache's counters are not here: the scrape reads them from the
        # cache's index (proxy.metrics_server._CacheCollector).
        for state in ("opened", "reused"):
            self.upstream_connections.labels(state)
        for kind in FAILURE_KINDS:
            self.upstream_failures.labels(kind)
        for direction in ("up", "down"):
            self.tunnel_bytes.labels(direction)
        for result in ("ok", "refused"):
            self.reloads.labels(result)


class _Pending:
    """One worker's counts since its last flush."""

    __slots__ = (
        "requests",
        "duration",
        "duration_sum",
        "first_byte",
        "first_byte_sum",
        "request_bytes",
        "response_bytes",
        "tunnel_up",
        "tunnel_down",
        "opened",
        "reused",
        "failures",
    )

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.duration = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.first_byte = [0] * (len(DURATION_BUCKETS) + 1)
        self.first_byte_sum = 0.0
        self.request_bytes = 0
        self.response_bytes = 0
        self.tunnel_up = 0
        self.tunnel_down = 0
        self.opened = 0
        self.reused = 0
        self.failures: dict[str, int] = {}


class _Worker:
    """A worker's live gauges and where their values come from."""

    def __init__(self, open_connections: Callable[[], int]) -> None:
        from prometheus_client import Gauge

        self.open_connections = open_connections
        self.connections = Gauge(
            "proxy_client_connections",
            "Open client connections, per worker.",
            multiprocess_mode="liveall",
            registry=None,
        )
        self.tunnels = Gauge("proxy_tunnels", "Open tunnels, per worker.", multiprocess_mode="liveall", registry=None)


#: A child of the ``proxy`` logger (the error log); proxy.logs imports this module.
_log = logging.getLogger(__name__)
_metrics: _Metrics | None = None
_worker: _Worker | None = None
_pending: _Pending | None = None
_open_tunnels = 0
_directory: Path | None = None


# -- master ----------------------------------------------------------------------------


def prepare(settings: Settings) -> None:
    """At start-up, in the master, before any worker is forked: empty the
    metrics directory (a previous run's files would add to this one's) and,
    with metrics on, create the metrics there."""
    global _metrics, _directory
    directory = settings.metrics_dir
    shutil.rmtree(directory, ignore_errors=True)
    if settings.metrics_port is None:
        return
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    _directory = directory
    _metrics = _Metrics()
    _metrics.build_info.labels(*_versions()).set(1)
    _metrics.config_generation.set(1)


def _versions() -> tuple[str, str, str, str, str]:
    """This proxy's version (pyproject.toml, when it is beside the package) and its runtime's."""
    try:
        project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        project = "unknown"
    packages = [importlib.metadata.version(name) for name in ("gunicorn", "gevent", "urllib3")]
    return project, platform.python_version(), packages[0], packages[1], packages[2]


def reloaded(ok: bool) -> None:
    """A reload applied the new configuration (ok), or refused it."""
    if _metrics is not None:
        _metrics.reloads.labels("ok" if ok else "refused").inc()
        if ok:
            _metrics.config_generation.inc()


def worker_exited(pid: int) -> None:
    """The master reaped a worker: count it and drop its live gauges."""
    if _metrics is not None and _directory is not None:
        from prometheus_client import multiprocess

        _metrics.worker_restarts.inc()
        multiprocess.mark_process_dead(pid, str(_directory))  # type: ignore[no-untyped-call]


def log_reopened() -> None:
    """This process reopened its log files."""
    if _metrics is not None:
        _metrics.log_reopens.labels("master" if _worker is None else "worker").inc()


# -- worker ----------------------------------------------------------------------------


def start_worker(open_connections: Callable[[], int]) -> None:
    """In a worker about to serve: count its requests, flush them every
    FLUSH_INTERVAL_S. ``open_connections`` tells its open client connections."""
    global _worker, _pending
    if _metrics is None:
        return
    _worker = _Worker(open_connections)
    _pending = _Pending()
    gevent.spawn(_flush_forever)


def _flush_forever() -> None:
    while True:
        gevent.sleep(FLUSH_INTERVAL_S)
        try:
            flush()
        except Exception:
            _log.exception("cannot write this worker's metrics")


def flush() -> None:
    """Write the worker's counts since the last flush to its metric files."""
    global _pending
    pending, metrics, worker = _pending, _metrics, _worker
    if pending is None or metrics is None or worker is None:
        return
    _pending = _Pending()
    for (method, status, outcome), count in pending.requests.items():
        metrics.requests.labels(method, status, outcome).inc(count)
    internals.add_histogram_counts(metrics.duration, pending.duration, pending.duration_sum)
    internals.add_histogram_counts(metrics.first_byte, pending.first_byte, pending.first_byte_sum)
    for counter, amount in (
        (metrics.request_bytes, pending.request_bytes),
        (metrics.response_bytes, pending.response_bytes),
        (metrics.tunnel_bytes.labels("up"), pending.tunnel_up),
        (metrics.tunnel_bytes.labels("down"), pending.tunnel_down),
        (metrics.upstream_connections.labels("opened"), pending.opened),
        (metrics.upstream_connections.labels("reused"), pending.reused),
    ):
        if amount:
            counter.inc(amount)
    for kind, count in pending.failures.items():
        metrics.upstream_failures.labels(kind).inc(count)
    worker.connections.set(worker.open_connections())
    worker.tunnels.set(_open_tunnels)


def _outcome(exchange: Observed) -> str:
    """The access record's outcome; ``rejected`` for an error the proxy
    answered itself without asking next-hop (access rules, body limit,
    CONNECT, an unsupported coding, the user's middleware)."""
    outcome = exchange.outcome
    if outcome == "ok" and exchange.status >= 400 and exchange.upstream_status is None:
        return "rejected"
    return outcome


def observe(exchange: Observed) -> None:
    """Count one finished request (from its access record)."""
    pending = _pending
    if pending is None:
        return
    status = exchange.status
    key = (
        _METHOD_CLASS.get(exchange.environ.get("REQUEST_METHOD", ""), "other"),
        _STATUS_CLASS[status] if status < 600 else "none",
        _outcome(exchange),
    )
    requests = pending.requests
    requests[key] = requests.get(key, 0) + 1
    body = exchange.request_body
    if body is not None:
        pending.request_bytes += body.bytes_read
    tunnel_up = exchange.tunnel_bytes_up
    if tunnel_up is not None:  # a tunnel: its duration is how long it stayed open
        pending.tunnel_up += tunnel_up
        pending.tunnel_down += exchange.body_bytes
        return
    pending.response_bytes += exchange.body_bytes
    elapsed = time.perf_counter() - exchange.start_perf
    pending.duration[bisect_left(DURATION_BUCKETS, elapsed)] += 1
    pending.duration_sum += elapsed
    first_byte = exchange.first_byte_s
    if first_byte is not None:
        pending.first_byte[bisect_left(DURATION_BUCKETS, first_byte)] += 1
        pending.first_byte_sum += first_byte


def upstream_connection(reused: bool) -> None:
    """A request goes out on a pooled connection, reused or just opened."""
    pending = _pending
    if pending is not None:
        if reused:
            pending.reused += 1
        else:
            pending.opened += 1


def upstream_failure(kind: str | None) -> None:
    """next-hop failed this way (None: the request could not be sent, not next-hop's failure)."""
    pending = _pending
    if pending is not None and kind is not None:
        pending.failures[kind] = pending.failures.get(kind, 0) + 1


def tunnel_opened() -> None:
    global _open_tunnels
    _open_tunnels += 1


def tunnel_closed() -> None:
    global _open_tunnels
    _open_tunnels -= 1

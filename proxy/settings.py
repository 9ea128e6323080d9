"""Process settings read from the environment.

These are the deployment's knobs (where to listen, where next-hop is, where
logs and the pidfile go, the process-level timeouts). They are fixed for the
life of the Gunicorn master; the user's per-site configuration lives in
``proxy.toml`` (see ``config``). ``VARIABLES`` declares each variable once
(``proxy.setting``): ``from_environ`` and the README's Environment table
(``proxy.config_docs``) both come from it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .setting import Boolean, Directory, Integer, Invalid, Kind, OneOf, Seconds

__all__ = [
    "BACKLOG",
    "VARIABLES",
    "WORKER_CONNECTIONS",
    "Settings",
    "SettingsError",
    "Variable",
    "from_environ",
]

#: Concurrent client connections per worker (each one is a greenlet); the
#: worker's upstream pool is sized for as many.
WORKER_CONNECTIONS = 10_000
#: Connections the kernel queues on the listening socket while no worker
#: accepts (during a reload, new workers booting).
BACKLOG = 4096


class SettingsError(ValueError):
    """An environment variable has a value the proxy cannot use."""


class _NextHop(Kind[tuple[str, int]]):
    """``host:port`` (``[v6]:port`` for IPv6 literals); port defaults to 80."""

    text = "`host:port`"

    def from_text(self, text: str) -> tuple[str, int]:
        host, port = text, "80"
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            if rest.startswith(":"):
                port = rest[1:]
            elif rest:
                raise Invalid("expected [address]:port")
        elif text.count(":") == 1:
            host, port = text.split(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise Invalid("expected host:port")
        return host, int(port)


class _PortOrOff(Kind["int | None"]):
    """A TCP port, or ``off`` (None)."""

    text = "port or `off`"

    def from_text(self, text: str) -> int | None:
        if text.lower() == "off":
            return None
        return Integer(1, 65535).from_text(text)


@dataclass(frozen=True)
class Variable:
    """One environment variable; unset or blank means ``default``."""

    name: str
    #: The ``Settings`` field it fills.
    field: str
    kind: Kind[Any]
    #: As it would be written in the environment (a callable: computed).
    default: str | Callable[[], str]
    #: Markdown for the README's Environment table.
    doc: str
    default_text: str | None = None
    #: For durations: a few words naming it in the README's Timeouts table.
    summary: str = ""

    def shown_default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        return f"`{self.default}`" if isinstance(self.default, str) else ""

    def read(self, env: Mapping[str, str]) -> Any:
        raw = env.get(self.name, "").strip()
        if not raw:
            raw = self.default if isinstance(self.default, str) else self.default()
        try:
            return self.kind.from_text(raw)
        except Invalid as exc:
            raise SettingsError(f"{self.name}={raw!r}: {exc.reason}") from None


def _cpus() -> str:
    return str(len(os.sched_getaffinity(0)))


VARIABLES: tuple[Variable, ...] = (
    Variable("PORT", "port", Integer(1, 65535), "80", "listen port, all interfaces"),
    Variable("NEXT_HOP", "next_hop", _NextHop(), "next-hop:80", "upstream `host:port` (`[v6]:port` for IPv6 literals)"),
    Variable("WEB_CONCURRENCY", "workers", Integer(1, 256), _cpus, "worker processes", default_text="number of CPUs"),
    Variable(
        "PROXY_CONFIG_DIR",
        "config_dir",
        Directory(),
        "/opt/proxy_config",
        "the user's configuration (`proxy.toml`), read-only",
    ),
    Variable("PROXY_LOG_DIR", "log_dir", Directory(), "/var/log/proxy", "log files (file target), created at start-up"),
    Variable("PROXY_RUN_DIR", "run_dir", Directory(), "/run/proxy", "the master writes its pid to `gunicorn.pid` here"),
    Variable(
        "PROXY_CACHE_DIR",
        "cache_dir",
        Directory(),
        "/var/cache/proxy",
        "the shared cache's index and entry files (only with `[cache] enabled`), created at start-up",
    ),
    Variable(
        "PROXY_LOG_TARGET",
        "log_target",
        OneOf(("stdout", "file")),
        "stdout",
        "`stdout`: access lines on stdout, the rest on stderr (newer platform); `file`: `access.log` + "
        "`error.log` in `PROXY_LOG_DIR` (older platform)",
    ),
    Variable("PROXY_LOG_FORMAT", "log_format", OneOf(("json", "ltsv")), "json", "`json` or `ltsv`"),
    Variable(
        "PROXY_ACCESS_LOG",
        "access_log_enabled",
        Boolean(),
        "on",
        "`off` drops access lines (for measuring the cost of logging)",
    ),
    Variable(
        "PROXY_METRICS_PORT",
        "metrics_port",
        _PortOrOff(),
        "9000",
        "the Prometheus endpoint's port, on 127.0.0.1 only ([docs/metrics.md](docs/metrics.md)); `off`: no "
        "endpoint, nothing counted",
    ),
    Variable(
        "PROXY_KEEPALIVE_TIMEOUT",
        "keepalive_timeout",
        Seconds(1, 3600, whole=True),
        "75",
        "seconds an idle client connection is kept open, and the time a client has to send a complete request "
        "head; longer than the 60 s most load balancers and proxies use upstream, so the previous hop closes "
        "first and never sends a request onto a connection we are closing",
        summary="client keep-alive idle, and time to send a request head",
    ),
    Variable(
        "PROXY_GRACEFUL_TIMEOUT",
        "graceful_timeout",
        Seconds(1, 3600, whole=True),
        "30",
        "seconds in-flight requests get to finish on SIGTERM or reload",
        summary="graceful shutdown / reload",
    ),
    Variable(
        "PROXY_WORKER_TIMEOUT",
        "worker_timeout",
        Seconds(1, 3600, whole=True),
        "30",
        "the master kills a worker that stops heart-beating this long (gevent workers heart-beat from their "
        "own greenlet, so long requests are fine)",
        summary="silent worker killed by the master",
    ),
)


@dataclass(frozen=True)
class Settings:
    port: int
    next_hop: tuple[str, int]
    workers: int
    config_dir: Path
    log_dir: Path
    run_dir: Path
    cache_dir: Path
    log_target: str
    log_format: str
    access_log_enabled: bool
    #: Loopback port of the Prometheus endpoint; None: metrics are off.
    metrics_port: int | None
    keepalive_timeout: int
    graceful_timeout: int
    worker_timeout: int

    @property
    def next_hop_host(self) -> str:
        return self.next_hop[0]

    @property
    def next_hop_port(self) -> int:
        return self.next_hop[1]

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "gunicorn.pid"

    @property
    def metrics_dir(self) -> Path:
        """The workers' metric files (prometheus_client's multiprocess directory)."""
        return self.run_dir / "metrics"

    @property
    def access_log(self) -> Path:
        return self.log_dir / "access.log"

    @property
    def error_log(self) -> Path:
        return self.log_dir / "error.log"


def from_environ(env: Mapping[str, str] = os.environ) -> Settings:
    """Read every variable once; raise SettingsError naming the bad one."""
    settings = Settings(**{v.field: v.read(env) for v in VARIABLES})
    if settings.metrics_port == settings.port:
        raise SettingsError(f"PROXY_METRICS_PORT={settings.metrics_port}: the same port as PORT")
    return settings

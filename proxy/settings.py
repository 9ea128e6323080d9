"""Process settings read from the environment.

These are the deployment's knobs (where to listen, where next-hop is, where
logs and the pidfile go). They are fixed for the life of the Gunicorn master;
the user's per-site configuration lives in ``proxy.toml`` (see ``config``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

#: Seconds an idle client connection is kept open, and the time a client has
#: to send a complete request head. Longer than the 60 s most load balancers
#: and proxies use upstream, so the previous hop closes first and never sends
#: a request onto a connection we are closing.
KEEPALIVE_TIMEOUT = 75
#: Seconds in-flight requests get to finish on SIGTERM or reload.
GRACEFUL_TIMEOUT = 30
#: Concurrent client connections per worker (each one is a greenlet).
WORKER_CONNECTIONS = 10_000

LOG_TARGETS = ("file", "stdout")
LOG_FORMATS = ("json", "ltsv")


class SettingsError(ValueError):
    """An environment variable has a value the proxy cannot use."""


@dataclass(frozen=True)
class Settings:
    port: int
    next_hop_host: str
    next_hop_port: int
    workers: int
    config_dir: Path
    log_dir: Path
    run_dir: Path
    cache_dir: Path
    log_target: str
    log_format: str
    access_log_enabled: bool

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "gunicorn.pid"

    @property
    def access_log(self) -> Path:
        return self.log_dir / "access.log"

    @property
    def error_log(self) -> Path:
        return self.log_dir / "error.log"


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: not an integer") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}={raw!r}: must be between {low} and {high}")
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    value = env.get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise SettingsError(f"{name}={value!r}: must be one of {', '.join(choices)}")
    return value


def parse_next_hop(raw: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6 literals); port defaults to 80."""
    host, port = raw, "80"
    if raw.startswith("["):
        host, _, rest = raw[1:].partition("]")
        if rest.startswith(":"):
            port = rest[1:]
        elif rest:
            raise SettingsError(f"NEXT_HOP={raw!r}: expected [address]:port")
    elif raw.count(":") == 1:
        host, port = raw.split(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"NEXT_HOP={raw!r}: expected host:port")
    return host, int(port)


def from_environ(env: Mapping[str, str] = os.environ) -> Settings:
    """Read every variable once; raise SettingsError naming the bad one."""
    host, port = parse_next_hop(env.get("NEXT_HOP", "").strip() or "next-hop:80")
    return Settings(
        port=_int(env, "PORT", 80, 1, 65535),
        next_hop_host=host,
        next_hop_port=port,
        workers=_int(env, "WEB_CONCURRENCY", len(os.sched_getaffinity(0)), 1, 256),
        config_dir=Path(env.get("PROXY_CONFIG_DIR") or "/opt/proxy_config"),
        log_dir=Path(env.get("PROXY_LOG_DIR") or "/var/log/proxy"),
        run_dir=Path(env.get("PROXY_RUN_DIR") or "/run/proxy"),
        cache_dir=Path(env.get("PROXY_CACHE_DIR") or "/var/cache/proxy"),
        log_target=_choice(env, "PROXY_LOG_TARGET", LOG_TARGETS),
        log_format=_choice(env, "PROXY_LOG_FORMAT", LOG_FORMATS),
        access_log_enabled=_choice(env, "PROXY_ACCESS_LOG", ("on", "off")) == "on",
    )

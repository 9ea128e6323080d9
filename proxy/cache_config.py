"""The ``[cache]`` table of ``proxy.toml``: its declarations and typed values.

Declared with the same ``Setting`` table as every other key
(``proxy.setting``), so parsing, validation, defaults and
docs/configuration.md all come from the declarations below.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .setting import Boolean, Bytes, Integer, Seconds, Setting, Strings, Table

__all__ = ["TABLE", "CacheConfig"]

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool
    max_size: int
    max_object_size: int
    max_variants: int
    bypass_paths: tuple[str, ...]
    lock_timeout: float
    stale_if_error: float


def _sizes(config: CacheConfig) -> Iterator[tuple[str, str]]:
    if config.max_object_size > config.max_size:
        yield "max_object_size", f"must not exceed max_size ({config.max_size})"


TABLE = Table(
    "cache",
    CacheConfig,
    (
        Setting(
            "enabled",
            Boolean(),
            False,
            "Cache answers to GET (and serve HEAD from them) in the shared cache in `PROXY_CACHE_DIR`. "
            "Absent or false: no cache layer at all, every request goes to next-hop.",
        ),
        Setting(
            "max_size",
            Bytes(MiB, 1 << 50),
            GiB,
            "Bytes of entry files kept; when a new entry would pass it, the least recently used entries are "
            "evicted first.",
            default_text="1 GiB",
        ),
        Setting(
            "max_object_size",
            Bytes(1, 1 << 50),
            64 * MiB,
            "Largest body stored (by its Content-Length, or as it streams); a larger answer passes through "
            "uncached. At most `max_size`.",
            default_text="64 MiB",
        ),
        Setting(
            "max_variants",
            Integer(1, 256),
            16,
            "Variants (`Vary`) kept per URL; past it the least recently used variant goes first.",
        ),
        Setting(
            "bypass_paths",
            Strings("path prefixes, each starting with `/`", lambda path: path.startswith("/")),
            (),
            "Requests whose path starts with one of these are never looked up nor stored (plain string "
            "prefixes of the raw request path, case-sensitive).",
        ),
        Setting(
            "lock_timeout",
            Seconds(0.5, 3600),
            5.0,
            "Longest a request for a URL being fetched by another request (in any worker) waits for that fill "
            "to make progress (its answer's head, then body bytes) before going to next-hop itself.",
            summary="cache: waiting on another request's fill",
        ),
        Setting(
            "stale_if_error",
            Seconds(0, 2**31, whole=True),
            0,
            "Default `stale-if-error` window (RFC 5861) for stored responses that name none: seconds past "
            "expiry during which a stale entry is served when next-hop refuses, times out or answers 5xx. "
            "0: only responses that say `stale-if-error` get one.",
            summary="cache: default stale-if-error window",
        ),
    ),
    doc="The shared HTTP cache (RFC 9111): see [cache.md](cache.md) for what is stored and for how long.",
    after="""\
```toml
[cache]
enabled = true
max_size = 10_737_418_240   # 10 GiB
bypass_paths = ["/api/"]
```""",
    validate=_sizes,
)

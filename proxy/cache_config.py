"""The ``[cache]`` table of ``proxy.toml``: declared keys, parsed once.

Every key is declared in ``KEYS`` (name, type, default, bounds, doc) so the
settings table can take them over as they are; ``parse`` checks a table
against the declarations and returns a frozen ``CacheConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["KEYS", "CacheConfig", "Checker", "Key", "parse"]

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class Key:
    name: str
    type: type
    default: Any
    low: int | None
    high: int | None
    doc: str


KEYS: tuple[Key, ...] = (
    Key("enabled", bool, False, None, None, "Cache responses to GET. Absent or false: no cache layer at all."),
    Key("max_size", int, GiB, MiB, 1 << 50, "Bytes of entry files kept; least recently used entries go first."),
    Key("max_object_size", int, 64 * MiB, 1, 1 << 50, "Largest body stored; a larger one passes through."),
    Key("max_variants", int, 16, 1, 256, "Variants (Vary) kept per URL; the least recently used one goes first."),
    Key("bypass_paths", list, [], None, None, 'Path prefixes (starting with "/") never cached.'),
)


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = False
    max_size: int = GiB
    max_object_size: int = 64 * MiB
    max_variants: int = 16
    bypass_paths: tuple[str, ...] = ()


class Checker(Protocol):
    """What ``proxy.config`` offers to record problems (its ``_Checker``)."""

    def problem(self, key: str, reason: str) -> None: ...

    def table(self, data: dict[str, Any], key: str, known: set[str]) -> dict[str, Any]: ...


def _check(check: Checker, key: Key, value: Any) -> Any:
    where = f"cache.{key.name}"
    if key.type is bool:
        if not isinstance(value, bool):
            check.problem(where, f"must be true or false, got {value!r}")
            return key.default
        return value
    if key.type is int:
        if isinstance(value, bool) or not isinstance(value, int) or not key.low <= value <= key.high:  # type: ignore[operator]
            check.problem(where, f"must be a whole number from {key.low} to {key.high}, got {value!r}")
            return key.default
        return value
    if not isinstance(value, list) or not all(isinstance(p, str) and p.startswith("/") for p in value):
        check.problem(where, 'must be a list of path prefixes starting with "/"')
        return key.default
    return tuple(value)


def parse(check: Checker, data: dict[str, Any]) -> CacheConfig:
    """The ``[cache]`` table of the parsed TOML; problems go to ``check``."""
    table = check.table(data, "cache", {key.name for key in KEYS})
    values = {key.name: _check(check, key, table.get(key.name, key.default)) for key in KEYS}
    if values["max_object_size"] > values["max_size"]:
        check.problem("cache.max_object_size", f"must not exceed max_size ({values['max_size']})")
        values["max_object_size"] = min(values["max_size"], CacheConfig.max_object_size)
    if isinstance(values["bypass_paths"], list):
        values["bypass_paths"] = tuple(values["bypass_paths"])
    return CacheConfig(**values)

"""Declared settings: one ``Setting`` per option, and the kinds of value it takes.

The user's ``proxy.toml`` (``proxy.config``) and the environment
(``proxy.settings``) are both tables of declarations; parsing, validation,
defaults and the generated documentation (``proxy.config_docs``) all come
from the tables, so adding an option is one declaration and nothing else.

A kind turns a raw value into the typed one or raises ``Invalid`` with the
reason: ``convert`` takes a TOML value (already typed by the TOML parser),
``from_text`` an environment string. Kinds whose value holds several parts
(header rules, address lists, error pages) report each bad part themselves
through the ``Problems`` they are given, so every problem is listed at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Generic, Protocol, TypeGuard, TypeVar

__all__ = [
    "Boolean",
    "Bytes",
    "Directory",
    "Integer",
    "Invalid",
    "Kind",
    "OneOf",
    "Problems",
    "Seconds",
    "Setting",
    "Strings",
    "Table",
    "toml_literal",
]

T = TypeVar("T")


class Invalid(ValueError):
    """A raw value the kind cannot take; ``reason`` says why, for the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Problems(Protocol):
    """Where a kind records a problem with one part of a compound value."""

    def problem(self, key: str, reason: str) -> None: ...


class Kind(Generic[T]):
    """How one option's values are written, checked and documented."""

    @property
    def text(self) -> str:
        """The accepted values, as the documentation describes them (a
        class attribute in kinds whose text is fixed)."""
        return ""

    def convert(self, value: object) -> T:
        """A TOML value to the typed value, or ``Invalid``."""
        raise Invalid("cannot be set in proxy.toml")

    def from_toml(self, value: object, problems: Problems, key: str) -> T:
        """Compound kinds override this to report several problems at once."""
        return self.convert(value)

    def from_text(self, text: str) -> T:
        """An environment variable's (stripped, non-empty) text, or ``Invalid``."""
        raise Invalid("cannot be set from the environment")

    def show(self, value: T) -> str:
        """A default value as the user would write it."""
        return toml_literal(value)


def toml_literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple | list | frozenset):
        return "[" + ", ".join(toml_literal(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else "{ ... }"
    return str(value)


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Seconds(Kind[float]):
    """A duration in seconds, within bounds (a fraction unless ``whole``)."""

    low: float
    high: float
    whole: bool = False

    @property
    def text(self) -> str:
        what = "whole number of seconds" if self.whole else "number of seconds"
        return f"{what}, {self.low:g} to {self.high:g}"

    def _check(self, value: float, shown: object) -> float:
        if not self.low <= value <= self.high or (self.whole and not float(value).is_integer()):
            what = "a whole number" if self.whole else "a number"
            raise Invalid(f"must be {what} from {self.low:g} to {self.high:g}, got {shown!r}")
        return int(value) if self.whole else float(value)

    def convert(self, value: object) -> float:
        if not _number(value):
            what = "a whole number" if self.whole else "a number"
            raise Invalid(f"must be {what} from {self.low:g} to {self.high:g}, got {value!r}")
        return self._check(value, value)

    def from_text(self, text: str) -> float:
        try:
            value = int(text) if self.whole else float(text)
        except ValueError:
            raise Invalid("not a whole number of seconds" if self.whole else "not a number of seconds") from None
        return self._check(value, text)


@dataclass(frozen=True)
class Integer(Kind[int]):
    """A whole number within bounds."""

    low: int
    high: int

    @property
    def text(self) -> str:
        return f"whole number, {self.low} to {self.high}"

    def convert(self, value: object) -> int:
        if type(value) is not int or not self.low <= value <= self.high:
            raise Invalid(f"must be a whole number from {self.low} to {self.high}, got {value!r}")
        return value

    def from_text(self, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise Invalid("not an integer") from None
        if not self.low <= value <= self.high:
            raise Invalid(f"must be between {self.low} and {self.high}")
        return value

    def show(self, value: int) -> str:
        return str(value)


@dataclass(frozen=True)
class Bytes(Kind[int]):
    """A size in bytes, ``low`` or more, at most ``high`` if given
    (TOML's ``10_485_760`` reads well)."""

    low: int = 0
    high: int | None = None

    @property
    def text(self) -> str:
        if self.high is None:
            return f"whole number of bytes, {self.low} or more"
        return f"whole number of bytes, {self.low} to {self.high}"

    def convert(self, value: object) -> int:
        if type(value) is not int or value < self.low or (self.high is not None and value > self.high):
            if self.high is None:
                raise Invalid(f"must be a whole number of bytes ({self.low} or more), got {value!r}")
            raise Invalid(f"must be a whole number of bytes from {self.low} to {self.high}, got {value!r}")
        return value


@dataclass(frozen=True)
class Boolean(Kind[bool]):
    """``true``/``false`` in TOML, ``on``/``off`` in the environment."""

    text = "boolean"

    def convert(self, value: object) -> bool:
        if not isinstance(value, bool):
            raise Invalid(f"must be true or false, got {value!r}")
        return value

    def from_text(self, text: str) -> bool:
        value = text.lower()
        if value not in ("on", "off"):
            raise Invalid("must be on or off")
        return value == "on"


@dataclass(frozen=True)
class OneOf(Kind[Any]):
    """One of a few values, of the same type as the values listed
    (strings compare case-insensitively from the environment)."""

    values: tuple[Any, ...]

    @property
    def text(self) -> str:
        return self._alternatives(f"`{toml_literal(v)}`" for v in self.values)

    @staticmethod
    def _alternatives(shown: Iterable[str]) -> str:
        items = list(shown)
        return ", ".join(items[:-1]) + " or " + items[-1] if len(items) > 1 else items[0]

    def convert(self, value: object) -> Any:
        if not any(type(value) is type(v) and value == v for v in self.values):
            raise Invalid(f"must be {self._alternatives(map(str, self.values))}, got {value!r}")
        return value

    def from_text(self, text: str) -> Any:
        return self.convert(text.lower())


@dataclass(frozen=True)
class Strings(Kind[tuple[str, ...]]):
    """A list of strings, each accepted by ``accepts`` (``what`` names them)."""

    what: str
    accepts: Callable[[str], bool] = bool

    @property
    def text(self) -> str:
        return f"list of {self.what}"

    def convert(self, value: object) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and self.accepts(v) for v in value):
            raise Invalid(f"must be a list of {self.what}")
        return tuple(value)


@dataclass(frozen=True)
class Directory(Kind[Path]):
    """A directory path (environment only)."""

    text = "directory path"

    def from_text(self, text: str) -> Path:
        return Path(text)

    def show(self, value: Path) -> str:
        return str(value)


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One option: its name, kind, default and documentation."""

    name: str
    kind: Kind[T]
    default: T
    #: Markdown for the generated documentation.
    doc: str
    #: The documented default, when it is not a value (``no limit``).
    default_text: str | None = None
    #: For durations: a few words naming it in the README's Timeouts table.
    summary: str = ""

    def shown_default(self) -> str:
        return self.default_text if self.default_text is not None else f"`{self.kind.show(self.default)}`"


@dataclass(frozen=True)
class Table:
    """A TOML table: its settings, and the frozen dataclass holding their values.

    The dataclass's fields are the settings' names, in the same order
    (checked here): ``[upstream] connect_timeout`` is
    ``config.upstream.connect_timeout``.
    """

    name: str
    cls: type
    settings: tuple[Setting[Any], ...]
    #: Markdown before the table of keys, and after it (explanations, an example).
    doc: str = ""
    after: str = ""
    #: Documented in one section with the table declared before it.
    shares_section: bool = False
    #: Rules between the table's keys: given the table's values, yields
    #: ``(key, reason)`` for each problem (keys relative to the table).
    validate: Callable[[Any], Iterable[tuple[str, str]]] | None = None

    def __post_init__(self) -> None:
        names = [f.name for f in fields(self.cls) if f.init]
        if names != [s.name for s in self.settings]:
            raise TypeError(f"[{self.name}]: {self.cls.__name__} fields {names} do not match its settings")

    def defaults(self) -> Any:
        return self.cls(**{s.name: s.default for s in self.settings})

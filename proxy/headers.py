"""Header rules: what crosses the proxy in each direction, and how it changes.

RFC 9110 section 7.6.1: hop-by-hop fields describe one connection and must
not be forwarded, and neither may any field a ``Connection`` header names.
Everything else passes in order with every repeated value kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
    }
)

#: Not hop-by-hop, but never forwarded upstream: the proxy has already
#: answered ``Expect: 100-continue`` itself before reading the body.
_NOT_FORWARDED_UPSTREAM = HOP_BY_HOP | {"expect"}

Header = tuple[str, str]


class HeaderList(list):
    """An ordered list of ``(name, value)`` pairs that urllib3 accepts as headers.

    urllib3 iterates a headers mapping's names, calls ``items()``, and merges
    its (empty) proxy headers with ``copy()`` and ``update()``; a list keeps
    repeated fields and their order, which a dict cannot.
    """

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        return (name for name, _ in list.__iter__(self))

    def items(self) -> Iterator[Header]:
        return list.__iter__(self)

    def copy(self) -> HeaderList:
        return HeaderList(list.__iter__(self))

    def update(self, other: Mapping[str, str]) -> None:
        self.extend(other.items())


@dataclass(frozen=True)
class HeaderRules:
    """User edits applied to one direction: remove, then set, then append."""

    remove: frozenset[str] = frozenset()
    set: tuple[Header, ...] = ()
    append: tuple[Header, ...] = ()
    _replaced: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = self.remove | {name.lower() for name, _ in self.set}
        object.__setattr__(self, "_replaced", frozenset(names))

    def __bool__(self) -> bool:
        return bool(self.remove or self.set or self.append)

    def apply(self, headers: list[Header]) -> list[Header]:
        if not self:
            return headers
        replaced = self._replaced
        out = [h for h in headers if h[0].lower() not in replaced]
        out.extend(self.set)
        out.extend(self.append)
        return out


def connection_tokens(value: str | None) -> frozenset[str]:
    """The field names a ``Connection`` header lists (they are hop-by-hop too)."""
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


_environ_names: dict[str, str] = {}


def _environ_name(key: str) -> str:
    """``HTTP_X_FORWARDED_FOR`` -> ``X-Forwarded-For``, memoised for the hot path."""
    name = _environ_names.get(key)
    if name is None:
        name = "-".join(part.capitalize() for part in key[5:].split("_"))
        if len(_environ_names) < 4096:
            _environ_names[key] = name
    return name


def upstream_request_headers(
    environ: Mapping[str, object],
    request_id: str,
    keep_upgrade: bool = False,
) -> HeaderList:
    """Headers for next-hop, built from the WSGI environ.

    Built from the environ (not the raw request) so that user middleware can
    add or change headers the WSGI way. Gunicorn joins repeated request
    fields with commas, which RFC 9110 section 5.3 makes equivalent.
    """
    drop = _NOT_FORWARDED_UPSTREAM | connection_tokens(environ.get("HTTP_CONNECTION"))  # type: ignore[arg-type]
    if keep_upgrade:
        drop = drop - {"connection", "upgrade"}
    out = HeaderList()
    xff = None
    has_request_id = False
    for key, value in environ.items():
        if not key.startswith("HTTP_"):
            continue
        name = _environ_name(key)
        lower = name.lower()
        if lower in drop:
            continue
        if lower == "x-forwarded-for":
            xff = value
            continue
        if lower == "x-request-id":
            has_request_id = True
        out.append((name, value))
    if keep_upgrade:
        out.append(("Connection", "Upgrade"))
    if "CONTENT_TYPE" in environ:
        out.append(("Content-Type", environ["CONTENT_TYPE"]))
    if "CONTENT_LENGTH" in environ:
        out.append(("Content-Length", environ["CONTENT_LENGTH"]))
    remote = environ.get("REMOTE_ADDR", "")
    out.append(("X-Forwarded-For", f"{xff}, {remote}" if xff else remote))
    if not has_request_id:
        out.append(("X-Request-Id", request_id))
    return out


def downstream_response_headers(headers: Iterable[Header], connection: str | None) -> list[Header]:
    """Headers for the client: the origin's, minus hop-by-hop ones."""
    drop = HOP_BY_HOP | connection_tokens(connection)
    return [(name, value) for name, value in headers if name.lower() not in drop]

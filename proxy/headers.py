"""Header rules: what crosses the proxy in each direction, and how it changes.

RFC 9110 section 7.6.1: hop-by-hop fields describe one connection and must
not be forwarded, and neither may any field a ``Connection`` header names.
Everything else passes in order with every repeated value kept.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
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
#: answered ``Expect: 100-continue`` itself before reading the body; and the
#: body's length and type come from ``CONTENT_LENGTH``/``CONTENT_TYPE`` only,
#: never also from an ``HTTP_CONTENT_LENGTH`` a middleware may have set
#: (that would send two Content-Length fields).
_NOT_FORWARDED_UPSTREAM = HOP_BY_HOP | {"expect", "content-length", "content-type"}

#: End-to-end fields the platform relies on (set at the edge, see the
#: contract): a ``Connection`` header naming one of them is ignored for it,
#: so a client cannot have the proxy strip them (RFC 9110 section 7.6.1:
#: a sender must not list an end-to-end field as a connection option).
_NEVER_CONNECTION_OPTIONS = frozenset({"host", "x-forwarded-for", "x-forwarded-proto", "true-client-ip"})

Header = tuple[str, str]


@dataclass(frozen=True)
class HeaderRules:
    """User edits applied to one direction: remove, then set, then append."""

    remove: frozenset[str] = frozenset()
    set: tuple[Header, ...] = ()
    append: tuple[Header, ...] = ()
    _replaced: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Field names are case-insensitive, whoever built the rules.
        names = {name.lower() for name in self.remove} | {name.lower() for name, _ in self.set}
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
) -> list[Header]:
    """Headers for next-hop, built from the WSGI environ.

    Built from the environ (not the raw request) so that user middleware can
    add or change headers the WSGI way. Gunicorn joins repeated request
    fields with commas, which RFC 9110 section 5.3 makes equivalent.
    """
    options = connection_tokens(environ.get("HTTP_CONNECTION")) - _NEVER_CONNECTION_OPTIONS  # type: ignore[arg-type]
    drop = _NOT_FORWARDED_UPSTREAM | options
    if keep_upgrade:
        # Upgrade goes on; the client's Connection does not (its other
        # options are hop-by-hop): exactly one ``Connection: Upgrade`` below.
        drop = drop - {"upgrade"}
    out: list[Header] = []
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
        length = environ["CONTENT_LENGTH"]
        # Canonical decimal (``007`` is 7): no next hop can misread it.
        out.append(("Content-Length", str(int(length)) if length.isascii() and length.isdigit() else length))
    remote = environ.get("REMOTE_ADDR", "")
    out.append(("X-Forwarded-For", f"{xff}, {remote}" if xff else remote))
    if not has_request_id:
        out.append(("X-Request-Id", request_id))
    return out


# -- the request line next-hop gets -------------------------------------------------------

#: Tokens (RFC 9110 section 5.6.2), one a line: the method and field names.
_TOKENS = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+)*")


def upstream_target(raw_uri: str) -> str:
    """The request target for next-hop, byte for byte; absolute-form
    (``http://host/path``) is reduced to its path and query."""
    if raw_uri.startswith("/") or raw_uri == "*":
        return raw_uri
    scheme, sep, rest = raw_uri.partition("://")
    if sep and scheme.isalpha():
        slash = rest.find("/")
        query = rest.find("?")
        if slash == -1 or (query != -1 and query < slash):
            return "/" + rest[query:] if query != -1 else "/"
        return rest[slash:]
    return raw_uri


def sendable_head(method: str, target: str, headers: list[Header], head: bytes) -> bool:
    """Whether ``head``, the request line and field lines written from these,
    reads as exactly them: a token for the method and each name, no space in
    the target, and no CR, LF or NUL anywhere but the line ends. The fields
    come from the WSGI environ, which user middleware may have changed; a
    head failing this would make next-hop read a different request."""
    lines = len(headers) + 2
    return (
        head.count(b"\n") == lines
        and head.count(b"\r") == lines
        and b"\0" not in head
        and " " not in target
        and _TOKENS.fullmatch("\n".join([method, *[n for n, _ in headers]])) is not None
    )


@functools.lru_cache(maxsize=64)
def _not_forwarded_downstream(connection: str | None) -> frozenset[str]:
    # Origins send the same few Connection values (``keep-alive``): parsed once.
    return HOP_BY_HOP | connection_tokens(connection)


def downstream_response_headers(headers: Iterable[Header], connection: str | None) -> list[Header]:
    """Headers for the client: the origin's, minus hop-by-hop ones."""
    drop = _not_forwarded_downstream(connection)
    return [(name, value) for name, value in headers if name.lower() not in drop]

"""Header rules: what crosses the proxy in each direction, and how it changes.

RFC 9110 section 7.6.1: hop-by-hop fields describe one connection and must
not be forwarded, and neither may any field a ``Connection`` header names.
Everything else passes in order with every repeated value kept: repeated
request fields as the separate lines they came in (Gunicorn's environ joins
them with commas; see ``note_request_fields``).

Also here: which transfer codings a request may carry, which upgrades are
tunnelled, the host an absolute-form request is for, and which of the app's
response fields Gunicorn would drop that the client must still get.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "HOP_BY_HOP",
    "Header",
    "RELAYED",
    "HeaderRules",
    "InvalidHost",
    "absolute_form_host",
    "connection_tokens",
    "downstream_response_headers",
    "forwardable_transfer_coding",
    "is_upgrade",
    "note_request_fields",
    "request_fields",
    "response_field_role",
    "sendable_head",
    "transfer_codings",
    "upgrade_request_headers",
    "upstream_request_headers",
    "upstream_target",
]

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


#: Environ key, set when the answer is next-hop's, relayed or stored (a cache
#: hit), not one the proxy makes itself: only then do ``[response_headers]`` apply.
RELAYED = "proxy.relayed"


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


def transfer_codings(value: str) -> list[str]:
    """The codings a ``Transfer-Encoding`` value lists, in order, lowercased."""
    return [coding.strip(" \t").lower() for coding in value.split(",")]


def forwardable_transfer_coding(value: str | None) -> bool:
    """Whether a request's ``Transfer-Encoding`` (None: absent) is one the
    proxy can forward: none, or exactly ``chunked`` (``identity`` aside).
    Gunicorn accepts ``gzip, chunked`` and hands over the still-coded
    bytes; forwarded as plain chunked they would change meaning."""
    return value is None or [c for c in transfer_codings(value) if c != "identity"] == ["chunked"]


def is_upgrade(environ: Mapping[str, Any]) -> bool:
    """An HTTP/1.1 request asking to switch protocols (RFC 9110 section 7.8;
    an HTTP/1.0 request's Upgrade is ignored). An offer of ``h2c`` is never
    tunnelled (it goes on as an ordinary request, without Upgrade): HTTP/2
    straight to next-hop would carry any number of further requests past
    every rule here ("h2c smuggling"), and RFC 9113 retired that upgrade."""
    upgrade = environ.get("HTTP_UPGRADE", "")
    return (
        bool(upgrade.strip())
        and "h2c" not in connection_tokens(upgrade)
        and environ.get("SERVER_PROTOCOL") == "HTTP/1.1"
        and "upgrade" in connection_tokens(environ.get("HTTP_CONNECTION"))
    )


def upgrade_request_headers(environ: Mapping[str, Any], request_id: str) -> list[Header]:
    """The client's headers for next-hop, keeping Upgrade and exactly one
    ``Connection: Upgrade`` (the client's own Connection header may list
    other hop-by-hop tokens, such as keep-alive, that must not go on)."""
    headers = upstream_request_headers(environ, request_id, keep_upgrade=True)
    headers = [(name, value) for name, value in headers if name.lower() != "connection"]
    headers.append(("Connection", "Upgrade"))
    return headers


class InvalidHost(ValueError):
    """The request names no host it can be forwarded for (answered with 400)."""


#: Where the authority of an absolute-form target ends (RFC 3986 section 3.2).
_AUTHORITY_END = re.compile(r"[/?#]")


def absolute_form_host(raw_uri: str, host: str | None) -> str | None:
    """The Host every rule here and next-hop must see for an absolute-form
    request (``GET http://example.com/x``): the target's authority, without
    userinfo (RFC 9112 section 3.2.2; next-hop gets origin-form, so only
    Host can carry it). None for the other forms: Host stays as sent.

    Raises InvalidHost when the client's ``Host`` field is empty or only
    whitespace (it must be identical to the authority, so it is not a
    field a client can leave blank and still mean the target's host), or
    when the target's host is empty (RFC 9110 section 4.2.1)."""
    if raw_uri.startswith("/"):
        return None
    _, sep, rest = raw_uri.partition("://")
    if not sep:
        return None
    authority = _AUTHORITY_END.split(rest, maxsplit=1)[0].rpartition("@")[2]
    if host is not None and not host.strip(" \t"):
        raise InvalidHost(f"absolute-form target {raw_uri!r} with an empty Host field")
    if not authority or authority.startswith(":"):
        raise InvalidHost(f"absolute-form target {raw_uri!r} names no host")
    return authority


#: The field lines of the request this greenlet is handling, as Gunicorn
#: parsed them (``req.headers``: uppercased names, in order). Set by the
#: worker, which has them, for the app, which gets only the environ.
request_fields: ContextVar[Sequence[tuple[str, str]] | None] = ContextVar("proxy_request_fields", default=None)

#: Environ key: ``{environ key: (values in order, the environ value they made)}``
#: for every request field that came in more than one line.
_REPEATED = "proxy.repeated_fields"


def note_request_fields(environ: MutableMapping[str, Any], fields: Sequence[tuple[str, str]] | None) -> None:
    """Keep the lines of every repeated request field, so that each reaches
    next-hop as it came (``upstream_request_headers``).

    Gunicorn's environ joins repeated fields with commas. That is what RFC
    9110 section 5.3 allows for list fields, but not for ``Cookie`` (two
    lines, as an HTTP/2 hop in front may send, would read as one cookie
    ``a`` worth ``1,b=2``): the environ's ``HTTP_COOKIE`` becomes the lines
    joined with ``; `` (RFC 9113 section 8.2.3), which is what middleware
    reading it needs. Nothing is done when no name repeats (the usual case).
    """
    if not fields or len(dict(fields)) == len(fields):
        return
    seen: set[str] = set()
    again: set[str] = set()
    for name, _ in fields:
        (again if name in seen else seen).add(name)
    repeated: dict[str, tuple[tuple[str, ...], str]] = {}
    for name in again:
        key = "HTTP_" + name.replace("-", "_")
        if key not in environ:  # CONTENT-TYPE and CONTENT-LENGTH are not HTTP_ keys
            continue
        lines = tuple(value for other, value in fields if other == name)
        if key == "HTTP_COOKIE" and environ[key] == ",".join(lines):
            environ[key] = "; ".join(lines)
        repeated[key] = (lines, environ[key])
    environ[_REPEATED] = repeated


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
    environ: Mapping[str, Any],
    request_id: str,
    keep_upgrade: bool = False,
) -> list[Header]:
    """Headers for next-hop, built from the WSGI environ.

    Built from the environ (not the raw request) so that user middleware can
    add or change headers the WSGI way. A field that came in several lines
    goes on as those lines, in order, unless its environ value was changed
    (then that value wins, as one line); ``X-Forwarded-For`` is always one
    line, the client's address appended to what came.
    """
    options = connection_tokens(environ.get("HTTP_CONNECTION")) - _NEVER_CONNECTION_OPTIONS
    drop = _NOT_FORWARDED_UPSTREAM | options
    if keep_upgrade:
        # Upgrade goes on; the client's Connection does not (its other
        # options are hop-by-hop): exactly one ``Connection: Upgrade`` below.
        drop = drop - {"upgrade"}
    out: list[Header] = []
    xff = None
    has_request_id = False
    repeated: dict[str, tuple[tuple[str, ...], str]] | None = environ.get(_REPEATED)
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
        if repeated and key in repeated:
            lines, made = repeated[key]
            if value == made:
                out.extend((name, line) for line in lines)
                continue
        out.append((name, value))
    if keep_upgrade:
        out.append(("Connection", "Upgrade"))
    if "CONTENT_TYPE" in environ:
        out.append(("Content-Type", environ["CONTENT_TYPE"]))
    if "CONTENT_LENGTH" in environ:
        length = environ["CONTENT_LENGTH"]
        # Canonical decimal (``007`` is 7): no next hop can misread it.
        out.append(("Content-Length", str(int(length)) if length.isascii() and length.isdigit() else length))
    if "HTTP_HOST" not in environ:
        # An HTTP/1.0 client may send none, but next-hop gets HTTP/1.1,
        # which requires one: empty when the target names no authority
        # (RFC 9112 section 3.2).
        out.append(("Host", ""))
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


def response_field_role(lower: str, server_hop_by_hop: frozenset[str]) -> str:
    """What the server's response does with a field of the app's answer (by
    its lower-case name), given the fields Gunicorn treats as hop-by-hop:

    - ``length`` (Content-Length): the body's length, sent;
    - ``connection``: not sent; ``close`` in it closes the client connection
      (Gunicorn drops it and would keep the connection, which, after a
      refused body, would mean reading that body to its end), ``upgrade``
      marks a protocol switch;
    - ``upgrade``: sent for ``websocket`` only (Gunicorn's rule);
    - ``server``, ``date``: sent. Gunicorn counts them hop-by-hop and would
      send its own, but a proxy does not rewrite who answered, or when;
    - ``drop``: Gunicorn's other hop-by-hop fields, not sent;
    - ``send``: every other field."""
    if lower == "content-length":
        return "length"
    if lower in ("connection", "upgrade", "server", "date"):
        return lower
    return "drop" if lower in server_hop_by_hop else "send"

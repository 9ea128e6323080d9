"""RFC 9111 semantics for a shared cache, as pure functions (no I/O).

Everything the cache layer decides (may this be stored, is that fresh, what
Age to send, which variant matches, what Cache-Status says) is a function of
headers and clocks here, so it is tested without sockets.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .headers import HOP_BY_HOP, Header

__all__ = [
    "CACHE_NAME",
    "CONSUMED_FIELDS",
    "MAX_SURROGATE_KEYS",
    "MAX_SURROGATE_KEY_BYTES",
    "MAX_VARY_NAMES",
    "MAX_VARIANT_BYTES",
    "Header",
    "RequestControl",
    "ResponseControl",
    "Stored",
    "cache_status",
    "directives",
    "entity_tag_matches",
    "freshness_lifetime",
    "header",
    "http_date",
    "initial_age",
    "is_unsafe",
    "not_modified",
    "not_storable",
    "refreshed_headers",
    "request_control",
    "serves_stale_on_error",
    "response_control",
    "sent_headers",
    "stored_headers",
    "surrogate_keys",
    "usable",
    "variant",
    "vary_names",
]


#: The name this cache gives itself in ``Cache-Status`` (RFC 9211).
CACHE_NAME = "edge-proxy"
#: A response varying on more fields than this is not stored (bounded index rows).
MAX_VARY_NAMES = 16
#: Longest normalised request-header selection kept for one variant.
MAX_VARIANT_BYTES = 4096

#: Response fields meant for this cache, not sent downstream on answers to
#: GET/HEAD through it: ``CDN-Cache-Control`` (RFC 9213, consumed here) and
#: ``Surrogate-Key`` (the tags ``purge-key`` removes by; stored or not, as
#: CDNs strip it at the edge).
CONSUMED_FIELDS = frozenset({"cdn-cache-control", "surrogate-key"})
#: A response naming more surrogate keys than this, or a key longer than
#: ``MAX_SURROGATE_KEY_BYTES``, is not stored (bounded tag rows; a key
#: dropped silently would make a later purge-key miss the object).
MAX_SURROGATE_KEYS = 256
MAX_SURROGATE_KEY_BYTES = 1024

#: Final statuses this cache understands and stores given explicit freshness
#: (RFC 9111 section 3). 206 waits for range support; 304 refreshes instead.
_STORABLE_STATUSES = frozenset({200, 203, 204, 300, 301, 302, 307, 308, 404, 405, 410, 414, 501})
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
#: Never stored: recomputed on every answer (Age, Content-Length), or
#: describing the answer that brought them (next-hop's Cache-Status).
_NOT_STORED = HOP_BY_HOP | {"age", "content-length", "cache-status"}
#: Not updated from a 304 (RFC 9111 section 3.2).
_NOT_REFRESHED = _NOT_STORED | {"content-encoding", "content-type", "content-range"}
#: What a 304 answer to a client conditional carries (RFC 9110 section 15.4.5).
_NOT_MODIFIED_FIELDS = frozenset(
    {"cache-control", "content-location", "date", "etag", "expires", "vary", "last-modified"}
)
_DIRECTIVE = re.compile(r'\s*([^\s=,]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^\s,]*))?\s*(?:,|$)')


def header(headers: Iterable[Header], name: str) -> str | None:
    """The field's value, repeated lines joined with commas (RFC 9110 section 5.3)."""
    values = [v for n, v in headers if n.lower() == name]
    return ", ".join(values) if values else None


def directives(value: str | None) -> dict[str, str | None]:
    """``Cache-Control``-style directives: lower-case names, unquoted values.
    A repeated directive keeps its first value."""
    out: dict[str, str | None] = {}
    if not value:
        return out
    for match in _DIRECTIVE.finditer(value):
        name, raw = match.group(1).lower(), match.group(2)
        if raw is not None and raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        out.setdefault(name, raw)
    return out


def _seconds(value: str | None) -> float | None:
    """delta-seconds; an invalid value is None (ignored), a huge one is capped."""
    if value is None or not value.isdigit():
        return None
    return float(min(int(value), 2**31))


def http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed.timestamp() if parsed.tzinfo is not None else None


def is_unsafe(method: str) -> bool:
    """Methods whose non-error answers invalidate stored entries (RFC 9111 section 4.4)."""
    return method not in _SAFE_METHODS


@dataclass(frozen=True, slots=True)
class RequestControl:
    max_age: float | None = None
    min_fresh: float | None = None
    #: ``math.inf`` for ``max-stale`` without a value.
    max_stale: float | None = None
    no_cache: bool = False
    no_store: bool = False
    only_if_cached: bool = False


#: What a request without Cache-Control asks (most of them).
_NO_REQUEST_CONTROL = RequestControl()


def request_control(cache_control: str | None) -> RequestControl:
    if cache_control is None:
        return _NO_REQUEST_CONTROL
    d = directives(cache_control)
    if not d:
        return _NO_REQUEST_CONTROL
    max_stale: float | None = None
    if "max-stale" in d:
        max_stale = math.inf if d["max-stale"] is None else _seconds(d["max-stale"])
    return RequestControl(
        max_age=_seconds(d.get("max-age")),
        min_fresh=_seconds(d.get("min-fresh")),
        max_stale=max_stale,
        no_cache="no-cache" in d,
        no_store="no-store" in d,
        only_if_cached="only-if-cached" in d,
    )


@dataclass(frozen=True, slots=True)
class ResponseControl:
    no_store: bool = False
    private: bool = False
    no_cache: bool = False
    public: bool = False
    must_revalidate: bool = False
    s_maxage: float | None = None
    max_age: float | None = None
    #: The directives came from ``CDN-Cache-Control`` (RFC 9213).
    from_cdn: bool = False
    #: RFC 5861 windows, seconds past expiry; None when the response names none.
    stale_while_revalidate: float | None = None
    stale_if_error: float | None = None


def response_control(headers: Iterable[Header]) -> ResponseControl:
    """This cache's directives: ``CDN-Cache-Control`` when present (RFC 9213
    section 2.1: then ``Cache-Control`` is ignored by this cache), else
    ``Cache-Control``."""
    headers = list(headers)
    cdn = header(headers, "cdn-cache-control")
    d = directives(cdn if cdn is not None else header(headers, "cache-control"))
    s_maxage = _seconds(d.get("s-maxage"))
    return ResponseControl(
        no_store="no-store" in d,
        private="private" in d,
        no_cache="no-cache" in d,
        public="public" in d,
        # s-maxage implies proxy-revalidate for a shared cache (section 5.2.2.10).
        must_revalidate="must-revalidate" in d or "proxy-revalidate" in d or s_maxage is not None,
        s_maxage=s_maxage,
        max_age=_seconds(d.get("max-age")),
        from_cdn=cdn is not None,
        stale_while_revalidate=_seconds(d.get("stale-while-revalidate")),
        stale_if_error=_seconds(d.get("stale-if-error")),
    )


def freshness_lifetime(control: ResponseControl, headers: Iterable[Header]) -> float | None:
    """Explicit lifetime (section 4.2.1): s-maxage, max-age, then Expires - Date.
    None when the response gives none (no heuristic freshness, see docs/cache.md)."""
    if control.s_maxage is not None:
        return control.s_maxage
    if control.max_age is not None:
        return control.max_age
    headers = list(headers)
    expires = header(headers, "expires")
    if expires is None or control.from_cdn:
        return None
    when = http_date(expires)
    date = http_date(header(headers, "date"))
    if when is None or date is None:
        return 0.0  # an invalid Expires means already expired (section 5.3)
    return max(0.0, when - date)


def initial_age(headers: Iterable[Header], request_time: float, response_time: float) -> float:
    """``corrected_initial_age`` of section 4.2.3, Age from next-hop included."""
    headers = list(headers)
    date = http_date(header(headers, "date"))
    apparent = max(0.0, response_time - date) if date is not None else 0.0
    age = _seconds((header(headers, "age") or "").split(",")[0].strip()) or 0.0
    return max(apparent, age + max(0.0, response_time - request_time))


def vary_names(headers: Iterable[Header]) -> tuple[str, ...] | None:
    """The request fields the response varies on, lower-case and sorted;
    None for ``Vary: *`` (never matches, so never stored) or too many."""
    value = header(headers, "vary")
    if value is None:
        return ()
    names = sorted({n.strip().lower() for n in value.split(",") if n.strip()})
    if "*" in names or len(names) > MAX_VARY_NAMES:
        return None
    return tuple(names)


def variant(names: Sequence[str], request_header: Callable[[str], str | None]) -> str | None:
    """The request's selecting values for ``names`` normalised as section 4.1
    allows: list elements trimmed of surrounding whitespace, lines combined;
    values keep their case (its meaning depends on the field). None if too long."""
    if not names:
        return "[]"  # no Vary: what json.dumps([]) says, without the call on every hit
    selected: list[list[str] | None] = []
    for name in names:
        value = request_header(name)
        selected.append(None if value is None else [e.strip(" \t") for e in value.split(",")])
    text = json.dumps(selected, separators=(",", ":"))
    return text if len(text) <= MAX_VARIANT_BYTES else None


def stored_headers(headers: Iterable[Header]) -> tuple[Header, ...]:
    return tuple((n, v) for n, v in headers if n.lower() not in _NOT_STORED)


def not_storable(
    method: str,
    status: int,
    headers: list[Header],
    request: RequestControl,
    authorized: bool,
) -> str | None:
    """Why this response to this request is not stored (a Cache-Status
    ``detail`` token), or None when it may be."""
    if method != "GET":
        return "method"
    if request.no_store:
        return "request-no-store"
    if status not in _STORABLE_STATUSES:
        return "status"
    control = response_control(headers)
    if control.no_store:
        return "no-store"
    if control.private:
        return "private"
    if authorized and not (control.public or control.must_revalidate):
        return "authorization"  # section 3.5
    if any(n.lower() == "set-cookie" for n, _ in headers):
        return "set-cookie"
    if vary_names(headers) is None:
        return "vary"
    if surrogate_keys(header(headers, "surrogate-key")) is None:
        return "surrogate-key"
    if freshness_lifetime(control, headers) is None:
        return "no-freshness"
    return None


@dataclass(frozen=True, slots=True)
class Stored:
    """The stored response's metadata (the index row holds it as JSON)."""

    status: int
    reason: str
    headers: tuple[Header, ...]
    response_time: float
    initial_age: float
    lifetime: float
    no_cache: bool
    must_revalidate: bool
    stale_while_revalidate: float | None = None
    stale_if_error: float | None = None
    #: ``headers`` without ``CONSUMED_FIELDS``: what every answer from the entry sends.
    sent: tuple[Header, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sent", tuple(h for h in self.headers if h[0].lower() not in CONSUMED_FIELDS))

    @classmethod
    def make(cls, status: int, reason: str, headers: list[Header], request_time: float, response_time: float) -> Stored:
        control = response_control(headers)
        return cls(
            status=status,
            reason=reason,
            headers=stored_headers(headers),
            response_time=response_time,
            initial_age=initial_age(headers, request_time, response_time),
            lifetime=freshness_lifetime(control, headers) or 0.0,
            no_cache=control.no_cache,
            must_revalidate=control.must_revalidate,
            stale_while_revalidate=control.stale_while_revalidate,
            stale_if_error=control.stale_if_error,
        )

    def age(self, now: float) -> float:
        return self.initial_age + max(0.0, now - self.response_time)

    def ttl(self, now: float) -> float:
        return self.lifetime - self.age(now)

    def header(self, name: str) -> str | None:
        return header(self.headers, name)

    @property
    def validators(self) -> list[Header]:
        """Conditional request fields to revalidate this entry with."""
        out = []
        etag = self.header("etag")
        if etag is not None:
            out.append(("If-None-Match", etag))
        modified = self.header("last-modified")
        if modified is not None:
            out.append(("If-Modified-Since", modified))
        return out

    def refreshed(self, status_headers: list[Header], request_time: float, response_time: float) -> Stored:
        """After a 304 (section 4.3.4): headers updated, age and lifetime anew."""
        headers = refreshed_headers(self.headers, status_headers)
        fresh = Stored.make(self.status, self.reason, list(headers), request_time, response_time)
        return replace(fresh, headers=headers)

    def to_json(self) -> str:
        return json.dumps(
            [
                self.status,
                self.reason,
                self.headers,
                self.response_time,
                self.initial_age,
                self.lifetime,
                self.no_cache,
                self.must_revalidate,
                self.stale_while_revalidate,
                self.stale_if_error,
            ],
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Stored:
        data: list[Any] = json.loads(text)
        status, reason, headers, response_time, initial, lifetime, no_cache, must_revalidate = data[:8]
        swr, sie = (data[8:10] + [None, None])[:2]  # rows stored before RFC 5861 support have neither
        return cls(
            int(status),
            str(reason),
            tuple((str(n), str(v)) for n, v in headers),
            float(response_time),
            float(initial),
            float(lifetime),
            bool(no_cache),
            bool(must_revalidate),
            None if swr is None else float(swr),
            None if sie is None else float(sie),
        )


def refreshed_headers(stored: Iterable[Header], update: Iterable[Header]) -> tuple[Header, ...]:
    """Stored headers with every field the 304 carries replaced by its values."""
    new = [(n, v) for n, v in update if n.lower() not in _NOT_REFRESHED]
    replaced = {n.lower() for n, _ in new}
    return tuple([(n, v) for n, v in stored if n.lower() not in replaced] + new)


def usable(stored: Stored, request: RequestControl, now: float) -> str:
    """``fresh``, ``stale-ok`` (stale but the request allows it),
    ``stale-revalidate`` (stale inside the response's stale-while-revalidate
    window: served, refreshed in the background) or ``validate`` (must go to
    next-hop first)."""
    if request.no_cache or stored.no_cache:
        return "validate"
    age = stored.age(now)
    if request.max_age is not None and age > request.max_age:
        return "validate"
    left = stored.lifetime - age
    if request.min_fresh is not None and left < request.min_fresh:
        return "validate"
    if left > 0:
        return "fresh"
    if request.max_stale is not None and not stored.must_revalidate and -left <= request.max_stale:
        return "stale-ok"
    window = stored.stale_while_revalidate
    if window is not None and not stored.must_revalidate and -left <= window:
        return "stale-revalidate"  # RFC 5861 section 3; must-revalidate forbids it (RFC 9111 5.2.2.2)
    return "validate"


def serves_stale_on_error(stored: Stored, request: RequestControl, now: float, default_window: float) -> bool:
    """Whether this stale entry may stand in for next-hop's failure or 5xx
    (RFC 5861 section 4): inside the response's ``stale-if-error`` window, or
    the configured default when it names none; never when ``no-cache``
    (request or response), ``must-revalidate``/``proxy-revalidate`` or
    ``s-maxage`` forbid serving it stale."""
    if request.no_cache or stored.no_cache or stored.must_revalidate:
        return False
    window = stored.stale_if_error if stored.stale_if_error is not None else default_window
    return window > 0 and -stored.ttl(now) <= window


def entity_tag_matches(condition: str, etag: str | None) -> bool:
    """``If-None-Match`` weak comparison (RFC 9110 section 13.1.2)."""
    if condition.strip() == "*":
        return etag is not None
    if etag is None:
        return False
    want = etag.strip().removeprefix("W/")
    return any(t.strip().removeprefix("W/") == want for t in condition.split(","))


def not_modified(stored: Stored, if_none_match: str | None, if_modified_since: str | None) -> bool:
    """Whether a client's conditional GET is answered 304 from this entry."""
    if if_none_match is not None:
        return entity_tag_matches(if_none_match, stored.header("etag"))
    since = http_date(if_modified_since)
    if since is None:
        return False
    modified = http_date(stored.header("last-modified") or stored.header("date"))
    return modified is not None and modified <= since


def sent_headers(stored: Stored, now: float, body_length: int, not_modified_only: bool) -> list[Header]:
    """Headers for an answer from the cache (Age and Content-Length computed;
    ``CONSUMED_FIELDS`` not sent on)."""
    if not_modified_only:
        out = [(n, v) for n, v in stored.headers if n.lower() in _NOT_MODIFIED_FIELDS]
    else:
        out = [*stored.sent, ("Content-Length", str(body_length))]
    out.append(("Age", str(int(stored.age(now)))))
    return out


def cache_status(
    *,
    hit: bool = False,
    fwd: str | None = None,
    fwd_status: int | None = None,
    stored: bool = False,
    ttl: float | None = None,
    detail: str | None = None,
) -> str:
    """One RFC 9211 Cache-Status member for this cache."""
    parts = [CACHE_NAME]
    if hit:
        parts.append("hit")
    if fwd is not None:
        parts.append(f"fwd={fwd}")
    if fwd_status is not None:
        parts.append(f"fwd-status={fwd_status}")
    if stored:
        parts.append("stored")
    if ttl is not None:
        parts.append(f"ttl={round(ttl)}")
    if detail is not None:
        parts.append(f"detail={detail}")
    return "; ".join(parts)


def surrogate_keys(value: str | None) -> tuple[str, ...] | None:
    """The tags of a ``Surrogate-Key`` value (space-separated, repeats
    dropped); None when there are too many or one is too long."""
    if not value:
        return ()
    keys = tuple(dict.fromkeys(value.split()))
    if len(keys) > MAX_SURROGATE_KEYS or any(len(k) > MAX_SURROGATE_KEY_BYTES for k in keys):
        return None
    return keys

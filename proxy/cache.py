"""The cache layer: a WSGI app wrapped around ``Proxy.forward``.

It sees the request's environ and next-hop's answer (status, headers, body
iterator) through WSGI only. Per request it decides one of: bypass, hit,
revalidate, or miss; the rules are in ``cache_policy``, the storage in
``cache_store``. A miss streams to the client while ``Fill`` writes the
body to a temp file; the entry is published only once the body is known
complete (length, framing, no next-hop error).

Requests that must go to next-hop first claim the URL's fill row: one
request per machine fetches, the others wait for its answer and follow its
temp file (``cache_collapse``). A stale entry inside stale-while-revalidate
is served and refreshed once, in a background greenlet holding the claim;
inside stale-if-error it stands in for next-hop's failure.
"""

from __future__ import annotations

import io
import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import gevent

from . import cache_policy as policy
from . import ranges
from .access import AccessRecord, StartResponse
from .cache_collapse import FollowBody, Watches, wait_for_head
from .cache_config import CacheConfig
from .cache_store import Claim, Entry, Fill, FillRow, Key, Store
from .extension import WSGIApp
from .headers import RELAYED, Header, is_upgrade, upstream_target
from .sendfile import FileRegion
from .sockets import BLOCK_SIZE

__all__ = ["CacheLayer"]


log = logging.getLogger("proxy")

_CONDITIONALS = ("HTTP_IF_NONE_MATCH", "HTTP_IF_MODIFIED_SINCE", "HTTP_IF_MATCH", "HTTP_IF_UNMODIFIED_SINCE")
#: The counters (``cache_store.COUNTERS``) each access-line ``cache_status`` adds to.
_COUNTED: dict[str | None, tuple[str, ...]] = {
    "HIT": ("hits",),
    "STALE": ("hits", "stale"),
    "MISS": ("misses",),
    "EXPIRED": ("misses",),
    "REVALIDATED": ("revalidated",),
    "COLLAPSED": ("collapsed",),
}
#: A fill's progress is written to its row at most this often.
BEAT_S = 0.25
#: Times a request re-does its lookup after a fill it waited for ended
#: (stored, refreshed, or its row taken over) before going to next-hop itself.
_ROUNDS = 3
#: Not the client's: left out of a background revalidation's request.
_CLIENT_ONLY = (
    *_CONDITIONALS,
    "HTTP_CACHE_CONTROL",
    "HTTP_PRAGMA",
    "HTTP_RANGE",
    "HTTP_IF_RANGE",
    "HTTP_X_REQUEST_ID",
    "CONTENT_LENGTH",
    "HTTP_TRANSFER_ENCODING",
)


def _environ_key(name: str) -> str:
    return "HTTP_" + name.upper().replace("-", "_")


class _Answer:
    """What the wrapped app answered, captured instead of sent."""

    __slots__ = ("status", "headers")

    def __init__(self) -> None:
        self.status = ""
        self.headers: list[Header] = []

    def start_response(self, status: str, headers: list[Header], exc_info: object = None) -> Callable[[bytes], None]:
        self.status = status
        self.headers = list(headers)
        return self._write

    @staticmethod
    def _write(data: bytes) -> None:
        raise RuntimeError("the cache layer does not support the WSGI write() callable")

    @property
    def code(self) -> int:
        return int(self.status[:3])


class CacheLayer:
    """The shared cache for one worker process."""

    def __init__(self, app: WSGIApp, config: CacheConfig, store: Store) -> None:
        self.app = app
        self.config = config
        self.store = store
        self.watches = Watches()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        body = self._dispatch(environ, start_response)
        for name in _COUNTED.get(environ["proxy.exchange"].cache_status, ()):
            self.store.count(name)
        return body

    def _dispatch(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        target = upstream_target(environ["RAW_URI"])
        if is_upgrade(environ) or target.startswith(self.config.bypass_paths or "\0"):
            return self._pass(environ, start_response, "BYPASS", policy.cache_status(fwd="bypass"))
        scheme = "https" if environ.get("HTTP_X_FORWARDED_PROTO", "").strip().lower() == "https" else "http"
        key = Key.make(scheme, environ.get("HTTP_HOST", ""), target)
        if method not in ("GET", "HEAD"):
            if policy.is_unsafe(method):
                return self._unsafe(environ, start_response, key)
            return self._pass(environ, start_response, "BYPASS", policy.cache_status(fwd="method"))
        if key is None:
            return self._pass(environ, start_response, "BYPASS", policy.cache_status(fwd="bypass", detail="key"))
        request = policy.request_control(environ.get("HTTP_CACHE_CONTROL"))
        return self._serve(environ, start_response, key, request, _ROUNDS)

    def _serve(
        self,
        environ: dict[str, Any],
        start_response: StartResponse,
        key: Key,
        request: policy.RequestControl,
        rounds: int,
    ) -> Iterable[bytes]:
        exchange = environ["proxy.exchange"]
        found = self.store.lookup(key, lambda name: environ.get(_environ_key(name)))
        entry, body = found.entry, None
        if entry is not None:
            body = self.store.open(entry)
            if body is None:
                entry = None
        now = time.time()
        if entry is not None and body is not None:
            verdict = policy.usable(entry.stored, request, now)
            if verdict != "validate":
                exchange.cache_status = "HIT" if verdict == "fresh" else "STALE"
                self.store.touch(entry, now)
                detail = None
                if verdict == "stale-revalidate":
                    detail = "stale-while-revalidate"
                    self._refresh_in_background(environ, key)
                member = policy.cache_status(hit=True, ttl=entry.stored.ttl(now), detail=detail)
                return self._hit(environ, start_response, entry, body, member)
            if request.only_if_cached:
                body.close()
                return self._only_if_cached(environ, start_response)
        elif request.only_if_cached:
            return self._only_if_cached(environ, start_response)
        claim = None
        if self._collapsible(environ, request) and rounds > 0:
            claim = self.store.claim(key, self.config.lock_timeout)
            if not claim.leader:
                assert claim.current is not None
                followed = self._wait(environ, start_response, key, claim.current)
                if isinstance(followed, _Again):
                    if body is not None:
                        body.close()
                    return self._serve(environ, start_response, key, request, rounds - 1)
                if followed is not None:
                    if body is not None:
                        body.close()
                    return followed
                claim = None
        try:
            if entry is not None and body is not None:
                if entry.stored.validators:
                    return self._revalidate(environ, start_response, key, entry, body, request, claim)
                fwd = "request" if request.no_cache else "stale"
                return self._miss(environ, start_response, key, request, fwd, "EXPIRED", claim, (entry, body))
            return self._miss(environ, start_response, key, request, found.miss or "uri-miss", "MISS", claim)
        except BaseException:
            if claim is not None:
                claim.end("released")
            raise

    # -- collapsed misses -----------------------------------------------------------

    @staticmethod
    def _collapsible(environ: dict[str, Any], request: policy.RequestControl) -> bool:
        """GETs that may share one fill: not those that must reach next-hop
        themselves (no-cache) or whose answer is not stored (no-store)."""
        return environ["REQUEST_METHOD"] == "GET" and not request.no_cache and not request.no_store

    def _wait(
        self, environ: dict[str, Any], start_response: StartResponse, key: Key, row: FillRow
    ) -> Iterable[bytes] | _Again | None:
        """Be fed from the fill in flight: its body as it grows, ``_AGAIN``
        (look up again: it ended, stored or refreshed), or None (go to
        next-hop: it stalled, stores nothing, or is another variant)."""
        if row.state == "pending":
            waited = wait_for_head(self.store, self.watches, key.url, row.token, self.config.lock_timeout)
            if waited is None:
                return None
            if waited.token != row.token:
                return _AGAIN
            row = waited
        if row.state != "streaming":
            return _AGAIN if row.state in ("done", "refreshed") else None
        assert row.vary is not None and row.meta is not None and row.temp is not None and row.body_offset is not None
        selected = policy.variant(json.loads(row.vary), lambda name: environ.get(_environ_key(name)))
        if selected != row.variant:
            return None
        try:
            file: BinaryIO = (self.store.directory / "tmp" / row.temp).open("rb")
        except FileNotFoundError:
            return _AGAIN  # published (or abandoned) meanwhile
        file.seek(row.body_offset)
        stored = policy.Stored.from_json(row.meta)
        now = time.time()
        environ["proxy.exchange"].cache_status = "COLLAPSED"
        environ[RELAYED] = True
        conditional = policy.not_modified(
            stored, environ.get("HTTP_IF_NONE_MATCH"), environ.get("HTTP_IF_MODIFIED_SINCE")
        )
        headers = policy.sent_headers(stored, now, row.length or 0, conditional)
        if row.length is None:
            headers = [(n, v) for n, v in headers if n != "Content-Length"]
        headers.append(("Cache-Status", policy.cache_status(hit=True, ttl=stored.ttl(now), detail="collapsed")))
        if conditional:
            file.close()
            start_response("304 Not Modified", headers)
            return []
        start_response(f"{stored.status} {stored.reason}", headers)
        return FollowBody(file, row.length, row.pid, self.watches, row.temp, environ)

    # -- stale-while-revalidate ----------------------------------------------------------

    def _refresh_in_background(self, environ: dict[str, Any], key: Key) -> None:
        """Refresh a stale entry once for the machine: only the request that
        claims the URL's fill starts it; the others are served stale meanwhile."""
        try:
            claim = self.store.claim(key, self.config.lock_timeout)
        except Exception as exc:  # the stale answer goes on
            self.store.trouble.report("index", "cache: index unusable, no background revalidation: %s", exc)
            return
        if not claim.leader:
            return
        background = {k: v for k, v in environ.items() if k not in _CLIENT_ONLY}
        background["wsgi.input"] = io.BytesIO()
        background["gunicorn.socket"] = _NoClient()
        background["proxy.exchange"] = AccessRecord(background)
        gevent.spawn(self._refresh, background, key, claim)

    def _refresh(self, environ: dict[str, Any], key: Key, claim: Claim) -> None:
        request = policy.RequestControl()
        try:
            found = self.store.lookup(key, lambda name: environ.get(_environ_key(name)))
            entry = found.entry
            if entry is not None and policy.usable(entry.stored, request, time.time()) == "fresh":
                claim.end("refreshed")  # another refresh ended between our lookup and our claim
                return
            file = self.store.open(entry) if entry is not None else None
            if entry is not None and file is not None and entry.stored.validators:
                body = self._revalidate(environ, _discard, key, entry, file, request, claim)
            else:
                if file is not None:
                    file.close()
                body = self._miss(environ, _discard, key, request, "stale", "EXPIRED", claim)
            if environ["proxy.exchange"].cache_status == "REVALIDATED":
                _close(body)  # refreshed by a 304: nobody to send the stored body to
            else:
                _drain(body)
            log.info("cache: %s revalidated in the background (%s)", key.url, environ["proxy.exchange"].cache_status)
        except Exception:
            log.exception("cache: background revalidation of %s failed", key.url)
        finally:
            claim.end("released")  # no-op when the fill ended it

    # -- answers from the cache -----------------------------------------------------

    def _hit(
        self,
        environ: dict[str, Any],
        start_response: StartResponse,
        entry: Entry,
        body: BinaryIO,
        status_member: str,
        extra_status: list[str] | None = None,
    ) -> Iterable[bytes]:
        """The stored response: whole, a 304 to a matching conditional, or
        the ranges asked for (206, 416). Bodies go by sendfile(2), or from
        memory (``Store.open``'s small ones) with the head."""
        environ[RELAYED] = True
        stored = entry.stored
        now = time.time()
        members = [("Cache-Status", member) for member in [*(extra_status or []), status_member]]
        if policy.not_modified(stored, environ.get("HTTP_IF_NONE_MATCH"), environ.get("HTTP_IF_MODIFIED_SINCE")):
            body.close()
            start_response("304 Not Modified", [*policy.sent_headers(stored, now, 0, True), *members])
            return []
        size = entry.body_size
        wanted = self._ranges(environ, stored, size)
        if wanted is None:
            headers = policy.sent_headers(stored, now, size, False)
            start_response(f"{stored.status} {stored.reason}", [*headers, *members])
            if environ["REQUEST_METHOD"] == "HEAD":
                body.close()
                return []
            return _file_body(environ, body, 0, size)
        if isinstance(wanted, str):  # ranges.UNSATISFIABLE
            body.close()
            start_response(
                "416 Range Not Satisfiable",
                [("Content-Range", f"bytes */{size}"), ("Content-Length", "0"), *members],
            )
            return []
        if len(wanted) == 1:
            (part,) = wanted
            headers = policy.sent_headers(stored, now, part.length, False)
            headers.append(("Content-Range", part.content_range(size)))
            start_response("206 Partial Content", [*headers, *members])
            return _file_body(environ, body, part.first, part.length)
        boundary = f"{random.getrandbits(96):024x}"
        heads = ranges.multipart_heads(wanted, size, stored.header("content-type"), boundary)
        length = sum(len(h) for h in heads) + sum(r.length for r in wanted)
        headers = [(n, v) for n, v in policy.sent_headers(stored, now, length, False) if n.lower() != "content-type"]
        headers.append(("Content-Type", f"multipart/byteranges; boundary={boundary}"))
        start_response("206 Partial Content", [*headers, *members])
        return _Parts(body, wanted, heads)

    @staticmethod
    def _ranges(environ: dict[str, Any], stored: policy.Stored, size: int) -> list[ranges.ByteRange] | str | None:
        """What a ``Range`` asks of this entry (see ``proxy.ranges``); None for
        the whole body: no Range, not GET, not a 200, or ``If-Range`` failed."""
        value = environ.get("HTTP_RANGE")
        if value is None or environ["REQUEST_METHOD"] != "GET" or stored.status != 200:
            return None
        if not ranges.if_range_holds(
            environ.get("HTTP_IF_RANGE"), stored.header("etag"), stored.header("last-modified"), stored.header("date")
        ):
            return None
        return ranges.parse(value, size)

    def _only_if_cached(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        environ["proxy.exchange"].cache_status = "MISS"
        body = b"504 Gateway Timeout: not in cache (only-if-cached)\n"
        start_response(
            "504 Gateway Timeout",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("Cache-Status", policy.cache_status(fwd="miss", detail="only-if-cached")),
            ],
        )
        return [body]

    # -- answers from next-hop ---------------------------------------------------------

    def _pass(
        self, environ: dict[str, Any], start_response: StartResponse, access: str, member: str
    ) -> Iterable[bytes]:
        environ["proxy.exchange"].cache_status = access
        answer = _Answer()
        body = self.app(environ, answer.start_response)
        start_response(answer.status, [*answer.headers, ("Cache-Status", member)])
        return body

    def _unsafe(self, environ: dict[str, Any], start_response: StartResponse, key: Key | None) -> Iterable[bytes]:
        """Forward; a non-error answer invalidates the target and the
        same-host Location and Content-Location (RFC 9111 section 4.4)."""
        exchange = environ["proxy.exchange"]
        exchange.cache_status = "BYPASS"
        answer = _Answer()
        body = self.app(environ, answer.start_response)
        if key is not None and exchange.upstream_status == answer.code and answer.code < 400:
            targets = {key.target}
            for name in ("location", "content-location"):
                value = policy.header(answer.headers, name)
                if value:
                    parts = urlsplit(value.strip())
                    if parts.netloc and parts.netloc.lower() != key.host:
                        continue
                    path = parts.path if parts.path.startswith("/") else None
                    if path is not None:
                        targets.add(path + (f"?{parts.query}" if parts.query else ""))
            try:
                for target in targets:
                    self.store.invalidate(key.host, target)
            except Exception as exc:  # the answer goes on; the log says what was not invalidated
                self.store.trouble.report("index", "cache: invalidation of %s failed: %s", key.url, exc)
        start_response(answer.status, [*answer.headers, ("Cache-Status", policy.cache_status(fwd="method"))])
        return body

    def _revalidate(
        self,
        environ: dict[str, Any],
        start_response: StartResponse,
        key: Key,
        entry: Entry,
        file: BinaryIO,
        request: policy.RequestControl,
        claim: Claim | None,
    ) -> Iterable[bytes]:
        """Ask next-hop whether the stored entry is still good (a conditional GET)."""
        client = {name: environ.pop(name) for name in _CONDITIONALS if name in environ}
        for name, value in entry.stored.validators:
            environ[_environ_key(name)] = value
        fwd = "request" if request.no_cache else "stale"
        request_time = time.time()
        answer = _Answer()
        body = self.app(environ, answer.start_response)
        exchange = environ["proxy.exchange"]
        environ.update(client)
        for name in ("HTTP_IF_NONE_MATCH", "HTTP_IF_MODIFIED_SINCE"):
            if name not in client:
                environ.pop(name, None)
        if answer.code == 304 and exchange.upstream_status == 304:
            _drain(body)
            stored = entry.stored.refreshed(answer.headers, request_time, time.time())
            self.store.refresh(entry, stored)
            if claim is not None:
                claim.end("refreshed")
            exchange.cache_status = "REVALIDATED"
            refreshed = Entry(entry.id, key, entry.file, entry.body_size, stored, entry.used)
            upstream = [v for n, v in answer.headers if n.lower() == "cache-status"]
            member = policy.cache_status(fwd=fwd, fwd_status=304, ttl=stored.ttl(time.time()))
            return self._hit(environ, start_response, refreshed, file, member, upstream)
        stale = self._stale_if_error(environ, start_response, entry, file, request, answer, body, fwd, claim)
        if stale is not None:
            return stale
        file.close()
        return self._fill(environ, start_response, key, request, answer, body, fwd, "EXPIRED", request_time, claim)

    def _miss(
        self,
        environ: dict[str, Any],
        start_response: StartResponse,
        key: Key,
        request: policy.RequestControl,
        fwd: str,
        access: str,
        claim: Claim | None,
        stale: tuple[Entry, BinaryIO] | None = None,
    ) -> Iterable[bytes]:
        request_time = time.time()
        answer = _Answer()
        try:
            body = self.app(environ, answer.start_response)
        except BaseException:
            if stale is not None:
                stale[1].close()
            raise
        if stale is not None:
            entry, file = stale
            served = self._stale_if_error(environ, start_response, entry, file, request, answer, body, fwd, claim)
            if served is not None:
                return served
            file.close()
        return self._fill(environ, start_response, key, request, answer, body, fwd, access, request_time, claim)

    def _stale_if_error(
        self,
        environ: dict[str, Any],
        start_response: StartResponse,
        entry: Entry,
        file: BinaryIO,
        request: policy.RequestControl,
        answer: _Answer,
        body: Iterable[bytes],
        fwd: str,
        claim: Claim | None,
    ) -> Iterable[bytes] | None:
        """The stale entry in place of next-hop's failure or 5xx (the proxy's
        own 502/504 included), when RFC 5861 stale-if-error allows it."""
        now = time.time()
        if answer.code < 500 or not policy.serves_stale_on_error(
            entry.stored, request, now, self.config.stale_if_error
        ):
            return None
        close = getattr(body, "close", None)
        if close is not None:
            close()
        if claim is not None:
            claim.end("released")
        exchange = environ["proxy.exchange"]
        exchange.cache_status = "STALE"
        exchange.outcome = "ok"
        fwd_status = answer.code if exchange.upstream_status == answer.code else None
        member = policy.cache_status(fwd=fwd, fwd_status=fwd_status, ttl=entry.stored.ttl(now), detail="stale-if-error")
        return self._hit(environ, start_response, entry, file, member)

    def _fill(
        self,
        environ: dict[str, Any],
        start_response: StartResponse,
        key: Key,
        request: policy.RequestControl,
        answer: _Answer,
        body: Iterable[bytes],
        fwd: str,
        access: str,
        request_time: float,
        claim: Claim | None,
    ) -> Iterable[bytes]:
        """Send next-hop's answer on, storing it on the way when it qualifies."""
        exchange = environ["proxy.exchange"]
        exchange.cache_status = access
        status, headers = answer.code, answer.headers
        reason = self._not_storable(environ, answer, request)
        fill: Fill | None = None
        length: int | None = None
        if reason is None:
            now = time.time()
            stored = policy.Stored.make(status, answer.status[4:], headers, request_time, now)
            names = policy.vary_names(headers) or ()
            selected = policy.variant(names, lambda name: environ.get(_environ_key(name)))
            declared = policy.header(headers, "content-length")
            length = int(declared) if declared and declared.isdigit() else None
            if selected is None:
                reason = "vary"
            elif length is not None and length > self.config.max_object_size:
                reason = "size"
            else:
                fill = self.store.begin_fill(key, names, selected, stored)
                reason = None if fill is not None else "storage"
        out = [(n, v) for n, v in headers if n.lower() not in policy.CONSUMED_FIELDS]
        if fill is not None:
            member = policy.cache_status(fwd=fwd, stored=True, ttl=fill.stored.ttl(time.time()))
        else:
            member = policy.cache_status(fwd=fwd, detail=reason)
        out.append(("Cache-Status", member))
        if claim is not None:
            if fill is None:
                claim.end("released")  # waiters go to next-hop themselves
            else:
                claim.streaming(fill, length)
        start_response(answer.status, out)
        if fill is None:
            return body
        return _FillBody(body, fill, length, exchange, claim)

    def _not_storable(self, environ: dict[str, Any], answer: _Answer, request: policy.RequestControl) -> str | None:
        exchange = environ["proxy.exchange"]
        if exchange.upstream_status != answer.code or exchange.outcome != "ok":
            return "proxy-answer"  # the proxy's own 502/504 or an error page
        if not environ.get("proxy.body_framed"):
            return "framing"  # a body delimited by the connection's close cannot be verified
        return policy.not_storable(
            environ["REQUEST_METHOD"], answer.code, answer.headers, request, "HTTP_AUTHORIZATION" in environ
        )


class _Again:
    """``_wait``'s answer: look the URL up again."""


_AGAIN = _Again()


class _NoClient:
    """The client socket of a background revalidation: there is none to cut."""

    @staticmethod
    def shutdown(how: int) -> None:
        return None


def _discard(status: str, headers: list[Header], exc_info: object = None) -> Callable[[bytes], None]:
    """start_response of a background revalidation: nobody to answer."""
    return _Answer._write


def _drain(body: Iterable[bytes]) -> None:
    """Read and drop a body (a 304 has none), then release it."""
    try:
        for _ in body:
            pass
    finally:
        _close(body)


def _close(body: Iterable[bytes]) -> None:
    close = getattr(body, "close", None)
    if close is not None:
        close()


def _file_body(environ: dict[str, Any], file: BinaryIO, skip: int, length: int) -> Iterable[bytes]:
    """``length`` bytes of the entry's body from ``skip``: kept in memory,
    as one block; else in the server's file wrapper (WSGI), which the worker
    sends with sendfile(2)."""
    body = _stored_bytes(file, skip, length)
    if isinstance(body, list):
        return body
    wrapper = environ.get("wsgi.file_wrapper")
    return wrapper(body, BLOCK_SIZE) if wrapper is not None else body


def _stored_bytes(file: BinaryIO, skip: int, length: int) -> list[bytes] | FileRegion:
    """``length`` bytes of what ``Store.open`` gave, from ``skip`` bytes into the body."""
    if isinstance(file, io.BytesIO):  # a small body, kept in memory
        start = file.tell() + skip
        return [file.getvalue()[start : start + length]]
    return FileRegion(file, file.tell() + skip, length)


class _Parts:
    """A ``multipart/byteranges`` body: each part's head, then its bytes from the file."""

    __slots__ = ("_file", "_ranges", "_heads")

    def __init__(self, file: BinaryIO, wanted: list[ranges.ByteRange], heads: list[bytes]) -> None:
        self._file = file
        self._ranges = wanted
        self._heads = heads

    def __iter__(self) -> Iterator[bytes]:
        for part, head in zip(self._ranges, self._heads, strict=False):
            yield head
            # A file cut under us raises: never a short body passed off as whole.
            yield from _stored_bytes(self._file, part.first, part.length)
        yield self._heads[-1]

    def close(self) -> None:
        self._file.close()


class _FillBody:
    """Passes next-hop's body on while the fill writes it; publishes only a
    body known complete: the declared length reached (published before the
    last block goes out, so the entry is visible once the client has it), or
    the upstream body ended without error."""

    __slots__ = ("_body", "_fill", "_length", "_exchange", "_claim")

    def __init__(
        self, body: Iterable[bytes], fill: Fill, length: int | None, exchange: AccessRecord, claim: Claim | None
    ) -> None:
        self._body = body
        self._fill = fill
        self._length = length
        self._exchange = exchange
        self._claim = claim
        # Abandoned before the client's connection is cut, not after: a
        # client quick to ask again must not follow this failed fill.
        exchange.before_cut = fill.abandon

    def __iter__(self) -> Iterator[bytes]:
        fill, length, exchange, claim = self._fill, self._length, self._exchange, self._claim
        for block in self._body:
            if fill.active:
                fill.write(block)
                if claim is not None:
                    claim.beat(BEAT_S)
                if length is not None and fill.written >= length:
                    if fill.written == length and exchange.outcome == "ok":
                        fill.finish()
                    else:
                        fill.abandon()
            yield block
        if fill.active:
            if exchange.outcome == "ok" and (length is None or fill.written == length):
                fill.finish()
            else:
                fill.abandon()

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._fill.abandon()
            if self._claim is not None:
                self._claim.end("done")

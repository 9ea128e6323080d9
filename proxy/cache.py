"""The cache layer: a WSGI app wrapped around ``Proxy.forward``.

It sees the request's environ and next-hop's answer (status, headers, body
iterator) through WSGI only. Per request it decides one of: bypass, hit,
revalidate, or miss; the rules are in ``cache_policy``, the storage in
``cache_store``. A miss streams to the client while ``Fill`` writes the
body to a temp file; the entry is published only once the body is known
complete (length, framing, no next-hop error).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from . import cache_policy as policy
from .access import AccessRecord, StartResponse
from .cache_config import CacheConfig
from .cache_store import Entry, Fill, Key, Store, iter_file
from .extension import WSGIApp
from .headers import Header, is_upgrade, upstream_target
from .sockets import BLOCK_SIZE

__all__ = ["CacheLayer"]


_CONDITIONALS = ("HTTP_IF_NONE_MATCH", "HTTP_IF_MODIFIED_SINCE", "HTTP_IF_MATCH", "HTTP_IF_UNMODIFIED_SINCE")


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

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        exchange = environ["proxy.exchange"]
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
                member = policy.cache_status(hit=True, ttl=entry.stored.ttl(now))
                return self._hit(environ, start_response, entry, body, member)
            if request.only_if_cached:
                body.close()
                return self._only_if_cached(environ, start_response)
            if entry.stored.validators:
                return self._revalidate(environ, start_response, key, entry, body, request)
            body.close()
            fwd = "request" if request.no_cache else "stale"
            return self._miss(environ, start_response, key, request, fwd, "EXPIRED")
        if request.only_if_cached:
            return self._only_if_cached(environ, start_response)
        return self._miss(environ, start_response, key, request, found.miss or "uri-miss", "MISS")

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
        stored = entry.stored
        now = time.time()
        conditional = policy.not_modified(
            stored, environ.get("HTTP_IF_NONE_MATCH"), environ.get("HTTP_IF_MODIFIED_SINCE")
        )
        headers = policy.sent_headers(stored, now, entry.body_size, conditional)
        headers.extend(("Cache-Status", member) for member in [*(extra_status or []), status_member])
        if conditional:
            body.close()
            start_response("304 Not Modified", headers)
            return []
        start_response(f"{stored.status} {stored.reason}", headers)
        if environ["REQUEST_METHOD"] == "HEAD":
            body.close()
            return []
        return _HitBody(body, entry.body_size, environ)

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
            exchange.cache_status = "REVALIDATED"
            refreshed = Entry(entry.id, key, entry.file, entry.body_size, stored, entry.used)
            upstream = [v for n, v in answer.headers if n.lower() == "cache-status"]
            member = policy.cache_status(fwd=fwd, fwd_status=304, ttl=stored.ttl(time.time()))
            return self._hit(environ, start_response, refreshed, file, member, upstream)
        file.close()
        return self._fill(environ, start_response, key, request, answer, body, fwd, "EXPIRED", request_time)

    def _miss(
        self,
        environ: dict[str, Any],
        start_response: StartResponse,
        key: Key,
        request: policy.RequestControl,
        fwd: str,
        access: str,
    ) -> Iterable[bytes]:
        request_time = time.time()
        answer = _Answer()
        body = self.app(environ, answer.start_response)
        return self._fill(environ, start_response, key, request, answer, body, fwd, access, request_time)

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
        out = [(n, v) for n, v in headers if n.lower() != "cdn-cache-control"]
        if fill is not None:
            member = policy.cache_status(fwd=fwd, stored=True, ttl=fill.stored.ttl(time.time()))
        else:
            member = policy.cache_status(fwd=fwd, detail=reason)
        out.append(("Cache-Status", member))
        start_response(answer.status, out)
        if fill is None:
            return body
        return _FillBody(body, fill, length, exchange)

    def _not_storable(self, environ: dict[str, Any], answer: _Answer, request: policy.RequestControl) -> str | None:
        exchange = environ["proxy.exchange"]
        if exchange.upstream_status != answer.code or exchange.outcome != "ok":
            return "proxy-answer"  # the proxy's own 502/504 or an error page
        if not environ.get("proxy.body_framed"):
            return "framing"  # a body delimited by the connection's close cannot be verified
        return policy.not_storable(
            environ["REQUEST_METHOD"], answer.code, answer.headers, request, "HTTP_AUTHORIZATION" in environ
        )


def _drain(body: Iterable[bytes]) -> None:
    """Read and drop a body (a 304 has none), then release it."""
    try:
        for _ in body:
            pass
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()


class _HitBody:
    """Streams a stored body from its file, in blocks."""

    __slots__ = ("_file", "_length", "_environ")

    def __init__(self, file: BinaryIO, length: int, environ: dict[str, Any]) -> None:
        self._file = file
        self._length = length
        self._environ = environ

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        for block in iter_file(self._file, self._length, BLOCK_SIZE):
            sent += len(block)
            yield block
        if sent != self._length:  # the file was cut under us: never pass a short body off as complete
            environ = self._environ
            environ["proxy.exchange"].outcome = "error"
            try:
                environ["gunicorn.socket"].shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._file.close()


class _FillBody:
    """Passes next-hop's body on while the fill writes it; publishes only a
    body known complete: the declared length reached (published before the
    last block goes out, so the entry is visible once the client has it), or
    the upstream body ended without error."""

    __slots__ = ("_body", "_fill", "_length", "_exchange")

    def __init__(self, body: Iterable[bytes], fill: Fill, length: int | None, exchange: AccessRecord) -> None:
        self._body = body
        self._fill = fill
        self._length = length
        self._exchange = exchange

    def __iter__(self) -> Iterator[bytes]:
        fill, length, exchange = self._fill, self._length, self._exchange
        for block in self._body:
            if fill.active:
                fill.write(block)
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

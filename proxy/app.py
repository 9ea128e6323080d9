"""The WSGI app: platform rules, the user's middleware, then next-hop.

Request path, outermost first:

1. ``Proxy.__call__`` starts the access record and guarantees one access
   line per request, whatever happens below.
2. Platform rules: CONNECT is refused, the health check goes straight to
   next-hop, then the user's HTTPS redirect, access control, body limit.
3. The user's middleware, if configured (``extension``).
4. The user's ``[response_headers]`` rules (``_ResponseRules``), on what
   next-hop or the cache answered.
5. The cache layer, if enabled (``proxy.cache``).
6. ``Proxy.forward``: stream the request to next-hop and the answer back.

On the way back, ``Proxy.__call__`` sees what the layers above ``forward``
made of the body. next-hop's own relay (``_Relay``), untouched, with a
Content-Length body still to come, goes to the server as a ``Region``
(``_Spliced``), which the worker's response splices from next-hop's socket
to the client's (``proxy.splice``); anything else is iterated by the server
block by block, as the layer that made it iterates next-hop's body (the
cache storing it, a middleware reading it).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from . import config as config_module
from . import metrics
from . import settings as settings_module
from .access import AccessRecord, StartResponse
from .cache import CacheLayer
from .cache_store import Store
from .config import HEALTHZ_PATH, ProxyConfig
from .extension import ExtensionError, WSGIApp, wrap
from .headers import (
    RELAYED,
    Header,
    HeaderRules,
    InvalidHost,
    absolute_form_host,
    downstream_response_headers,
    forwardable_transfer_coding,
    is_upgrade,
    note_request_fields,
    request_fields,
    upgrade_request_headers,
    upstream_request_headers,
    upstream_target,
)
from .logs import error_log
from .request_body import BodyTooLarge, ClientBodyError, request_body
from .sendfile import Region
from .sockets import BLOCK_SIZE
from .tunnel import ALREADY_HANDLED, tunnel
from .upstream import BodyCut, Response, ResponseError, Upstream, UpstreamError

__all__ = ["LINGER_SECONDS", "Proxy", "create_app", "respond"]

_REASONS = {code: http.client.responses.get(code, "") for code in range(100, 600)}


class _Logged:
    """Passes the response body through, writing the access line on close()."""

    __slots__ = ("_body", "_exchange", "_done")

    def __init__(self, body: Iterable[bytes], exchange: AccessRecord) -> None:
        self._body = body
        self._exchange = exchange
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        exchange = self._exchange
        try:
            for chunk in self._body:
                exchange.body_bytes += len(chunk)
                yield chunk
        except Exception:
            if exchange.outcome == "ok":  # the body failed, not the client
                exchange.outcome = "error"
            raise
        self._done = True

    def close(self) -> None:
        exchange = self._exchange
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            if not self._done and exchange.outcome == "ok":
                exchange.outcome = "client_abort"
            exchange.log()


def _logged_region(body: Any, exchange: AccessRecord) -> Iterable[bytes]:
    """A body the server's response can send itself (a ``Region``: a cache
    hit's file, next-hop's spliced body), in the WSGI file wrapper the server
    knows it by; the access line is written on close with what was sent."""
    region: Region = body.filelike

    def close() -> None:
        try:
            region.close()
        finally:
            exchange.body_bytes = region.done
            if exchange.outcome == "ok" and region.done < region.length:
                exchange.outcome = "error" if region.failed else "client_abort"
            exchange.log()

    body.close = close
    wrapped: Iterable[bytes] = body
    return wrapped


#: Longest time a connection closed after a 413 keeps discarding the body
#: the client is still sending (see ``_LingeringClose``).
LINGER_SECONDS = 5.0


class _LingeringClose:
    """After the response, half-close and discard input until the client closes.

    A 413 is sent while the client may still be sending its body. Closing a
    socket with unread input makes the kernel send RST, and a client still
    writing then gets "connection reset" instead of the 413 (RFC 9112
    section 9.6). So once the response is written (the server calls
    ``close()`` after its last write) the proxy sends FIN and reads and
    drops what still arrives, until the client closes or LINGER_SECONDS pass.
    Nothing read here is parsed or forwarded.
    """

    __slots__ = ("_body", "_sock")

    def __init__(self, body: _Logged, sock: socket.socket) -> None:
        self._body = body
        self._sock = sock

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        self._body.close()  # the access line first: lingering is not the request's time
        sock = self._sock
        deadline = time.monotonic() + LINGER_SECONDS
        try:
            sock.shutdown(socket.SHUT_WR)
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                if not sock.recv(BLOCK_SIZE):
                    break
        except OSError:
            pass


def respond(
    start_response: StartResponse,
    status: int,
    body: bytes = b"",
    headers: list[Header] | None = None,
    content_type: str = "text/plain; charset=utf-8",
    close: bool = False,
) -> list[bytes]:
    """A response made by the proxy itself."""
    if not body and status >= 400:
        body = f"{status} {_REASONS[status]}\n".encode()
    out = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    if headers:
        out.extend(headers)
    if close:
        out.append(("Connection", "close"))
    start_response(f"{status} {_REASONS[status]}", out)
    return [body]


class _ResponseRules:
    """The user's ``[response_headers]`` rules, applied above the cache layer
    to what the client gets: a hit carries today's rules, not those in force
    when it was stored. Only answers marked ``RELAYED``: the proxy's own
    (error pages, only-if-cached 504) stay as the proxy made them."""

    __slots__ = ("_app", "_rules")

    def __init__(self, app: WSGIApp, rules: HeaderRules) -> None:
        self._app = app
        self._rules = rules

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        rules = self._rules

        def start(status: str, headers: list[Header], exc_info: Any = None) -> Callable[[bytes], object]:
            if environ.get(RELAYED):
                headers = rules.apply(headers)
            return start_response(status, headers, exc_info)

        return self._app(environ, start)


def _with_rules(app: WSGIApp, rules: HeaderRules) -> WSGIApp:
    return _ResponseRules(app, rules) if rules else app


def _client_ip(environ: dict[str, Any]) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(environ.get("HTTP_TRUE_CLIENT_IP", "").strip())
    except ValueError:
        return None
    # ::ffff:192.0.2.1 is the IPv4 client 192.0.2.1 seen through an IPv6 socket.
    return ip.ipv4_mapped or ip if ip.version == 6 else ip


class Proxy:
    """The WSGI application Gunicorn runs in each worker."""

    def __init__(self, config: ProxyConfig, upstream: Upstream, cache_dir: Path | None = None) -> None:
        self.config = config
        self.upstream = upstream
        inner: WSGIApp = self.forward
        if config.cache.enabled and cache_dir is not None:
            inner = CacheLayer(self.forward, config.cache, Store(cache_dir, config.cache))
        inner = _with_rules(inner, config.response_headers)
        #: The health check's way: straight to next-hop, the response rules on its answer.
        self.health_check = _with_rules(self.forward, config.response_headers)
        self.user_app: WSGIApp = inner
        if config.middleware is not None:
            module, factory = config.middleware
            try:
                self.user_app = wrap(inner, module, factory)
            except ExtensionError as exc:
                error_log.error("middleware not loaded, answering 500 except to the health check: %s", exc)
                self.user_app = self._broken_middleware

    # -- 1. the access record -------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        exchange = AccessRecord(environ)
        environ["proxy.exchange"] = exchange
        note_request_fields(environ, request_fields.get())
        # Gunicorn's wsgi.errors writes raw text into the error log file; in
        # workers sys.stderr makes each line a record (proxy.capture.LoggingStream).
        environ["wsgi.errors"] = sys.stderr
        noting = exchange.start_response(start_response)
        try:
            body = self.route(environ, noting)
        except Exception:
            exchange.outcome = "error"
            error_log.exception(
                "unexpected error handling %s %s", environ.get("REQUEST_METHOD"), environ.get("RAW_URI")
            )
            body = respond(noting, 500, close=True)
        if body is ALREADY_HANDLED:  # a finished tunnel: the socket is closed
            exchange.log()
            return body
        wrapper = environ.get("wsgi.file_wrapper")
        if wrapper:
            if isinstance(body, _Relay):  # next-hop's body, nothing above read it
                spliced = body.spliced()
                if spliced is not None:
                    return _logged_region(wrapper(spliced, BLOCK_SIZE), exchange)
            elif isinstance(body, wrapper) and isinstance(getattr(body, "filelike", None), Region):
                return _logged_region(body, exchange)
        if environ.get("proxy.linger"):
            return _LingeringClose(_Logged(body, exchange), environ["gunicorn.socket"])
        return _Logged(body, exchange)

    # -- 2. platform and user rules ---------------------------------------------

    def route(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] == "CONNECT":
            return respond(start_response, 405, headers=[("Allow", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")])
        if not forwardable_transfer_coding(environ.get("HTTP_TRANSFER_ENCODING")):
            return respond(start_response, 501, close=True)
        raw_uri = environ["RAW_URI"]
        try:
            host = absolute_form_host(raw_uri, environ.get("HTTP_HOST"))
        except InvalidHost as exc:
            return self.refused(environ, start_response, exc)
        if host is not None:  # every rule here, and next-hop, see the target's host
            environ["HTTP_HOST"] = host
        if raw_uri.startswith(HEALTHZ_PATH) and raw_uri[len(HEALTHZ_PATH) : len(HEALTHZ_PATH) + 1] in ("", "?"):
            return self.health_check(environ, start_response)
        config = self.config
        if config.https_redirect.enabled and environ.get("HTTP_X_FORWARDED_PROTO", "").lower() != "https":
            target = upstream_target(raw_uri)
            if not target.startswith(config.https_redirect.exempt_paths or "\0"):
                host = environ.get("HTTP_HOST", "")
                if host:
                    return respond(
                        start_response, config.https_redirect.status, headers=[("Location", f"https://{host}{target}")]
                    )
        access = config.access_control
        if access.allow or access.deny:
            ip = _client_ip(environ)
            if (ip is not None and any(ip in net for net in access.deny)) or (
                access.allow and (ip is None or not any(ip in net for net in access.allow))
            ):
                return respond(start_response, 403)
        limit = config.upstream.max_body_bytes
        if limit is not None and environ.get("CONTENT_LENGTH") and int(environ["CONTENT_LENGTH"]) > limit:
            return self.too_large(environ, start_response)
        return self.user_app(environ, start_response)

    def refused(self, environ: dict[str, Any], start_response: StartResponse, exc: Exception) -> list[bytes]:
        """400 and close for a request no rule lets through; the reason goes
        to the access line (``error``), as for the requests Gunicorn refuses."""
        record: AccessRecord = environ["proxy.exchange"]
        record.outcome = "client_error"
        record.error = str(exc)
        return respond(start_response, 400, close=True)

    def too_large(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        """413 and close, without reading the rest of the body (see _LingeringClose)."""
        environ["proxy.linger"] = True
        return respond(start_response, 413, close=True)

    def _broken_middleware(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        environ["proxy.exchange"].outcome = "error"
        return respond(start_response, 500)

    # -- 4. next-hop --------------------------------------------------------------

    def forward(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        exchange: AccessRecord = environ["proxy.exchange"]
        config = self.config
        upgrade = is_upgrade(environ)
        if upgrade:
            headers = upgrade_request_headers(environ, exchange.request_id)
        else:
            headers = upstream_request_headers(environ, exchange.request_id)
        if config.request_headers:
            headers = config.request_headers.apply(headers)
        body, chunked = request_body(environ, config.upstream.max_body_bytes)
        exchange.request_body = body
        try:
            response, timing = self.upstream.send(
                environ["REQUEST_METHOD"], upstream_target(environ["RAW_URI"]), headers, body, chunked, upgrade
            )
        except (BodyTooLarge, ClientBodyError) as exc:
            return self.body_failed(environ, start_response, exc)
        except UpstreamError as exc:
            return self.upstream_failed(environ, start_response, exc, close=body is not None and body.unfinished)
        exchange.connect_s = timing.connect_s
        exchange.first_byte_s = timing.first_byte_s
        return self.answer(environ, start_response, response)

    def answer(self, environ: dict[str, Any], start_response: StartResponse, response: Response) -> Iterable[bytes]:
        """Relay next-hop's answer, or the configured error page in its
        place; after a 101 (only an upgrade request can get one), the tunnel."""
        exchange: AccessRecord = environ["proxy.exchange"]
        head = response.head
        status = exchange.upstream_status = head.status
        if status in self.config.error_pages:
            response.release()
            exchange.upstream_end = time.perf_counter()
            return self.error_page(start_response, status, head.header("Retry-After"))
        environ["proxy.body_framed"] = head.chunked or head.length is not None  # the cache verifies these
        environ[RELAYED] = True
        out = downstream_response_headers(head.headers, head.connection)
        if status == 101:  # the tunnel writes its head itself, below _ResponseRules
            if self.config.response_headers:
                out = self.config.response_headers.apply(out)
            return tunnel(environ, exchange, response, out, self.config.tunnel.idle_timeout)
        start_response(f"{status} {head.reason or _REASONS.get(status, '')}", out)
        return _Relay(response, exchange, environ)

    def body_failed(self, environ: dict[str, Any], start_response: StartResponse, exc: Exception) -> list[bytes]:
        """The client's body could not be forwarded: 413 past the limit, else 400."""
        if isinstance(exc, BodyTooLarge):
            return self.too_large(environ, start_response)
        exchange: AccessRecord = environ["proxy.exchange"]
        exchange.outcome = "client_error"
        error_log.warning(
            "%s %s -> 400: %s",
            environ["REQUEST_METHOD"],
            environ["RAW_URI"],
            exc,
            extra={"request_id": exchange.request_id},
        )
        return respond(start_response, 400, close=True)

    def upstream_failed(
        self, environ: dict[str, Any], start_response: StartResponse, exc: UpstreamError, close: bool = False
    ) -> list[bytes]:
        """The 502/504 (or its error page); ``close``: the connection cannot
        carry another request (the client's body did not all get through)."""
        exchange: AccessRecord = environ["proxy.exchange"]
        exchange.outcome = "upstream_error"
        exchange.upstream_end = time.perf_counter()
        metrics.upstream_failure(exc.kind)
        error_log.error(
            "%s %s -> %d: %s",
            environ["REQUEST_METHOD"],
            environ["RAW_URI"],
            exc.status,
            exc.reason,
            extra={"request_id": exchange.request_id},
        )
        return self.error_page(start_response, exc.status, close=close)

    def error_page(
        self, start_response: StartResponse, status: int, retry_after: str | None = None, close: bool = False
    ) -> list[bytes]:
        headers = [("Retry-After", retry_after)] if retry_after else None
        page = self.config.error_pages.get(status)
        if page is None:
            return respond(start_response, status, headers=headers, close=close)
        return respond(start_response, status, page.body, headers, page.content_type, close)


class _Relay:
    """Streams next-hop's body to the client as it arrives.

    If next-hop fails mid-body the client connection is shut down, so the
    client sees a truncated transfer, never a short body passed off as
    complete. ``close`` releases the upstream connection (pooled only if the
    body was read to its exact end), even if the body was never iterated.
    """

    __slots__ = ("_response", "_exchange", "_environ")

    def __init__(self, response: Response, exchange: AccessRecord, environ: dict[str, Any]) -> None:
        self._response = response
        self._exchange = exchange
        self._environ = environ

    def __iter__(self) -> Iterator[bytes]:
        read1 = self._response.read1
        try:
            while chunk := read1():
                yield chunk
        except _BODY_FAILED as exc:
            self.cut(exc, self._exchange.body_bytes)

    def spliced(self) -> _Spliced | None:
        """The body as a region for the server's response to splice from
        next-hop's socket to the client's, when it has a Content-Length and
        bytes of it are still to come (``Response.splice_length``); None for
        any other body, which is iterated."""
        length = self._response.head.length
        if length is None or not self._response.splice_length():
            return None
        return _Spliced(self, self._response, length)

    def cut(self, exc: Exception, sent: int) -> None:
        """next-hop failed after ``sent`` body bytes: cut the client off."""
        self._exchange.cut_short(f"next-hop failed mid-response ({exc!r})", sent)

    def close(self) -> None:
        self._exchange.upstream_end = time.perf_counter()
        self._response.release()


#: What reading next-hop's body raises when it breaks off (``Response.read1``).
_BODY_FAILED = (ResponseError, OSError)


class _Spliced(Region):
    """A relayed Content-Length body the worker's response sends itself:
    next-hop's socket -> pipe -> client's socket (``Response.splice_to``),
    with the same failure semantics as ``_Relay``'s blocks. With Gunicorn's
    ``sendfile`` setting off the server reads it in blocks instead, as the
    relay would yield them."""

    __slots__ = ("_relay", "_response")

    def __init__(self, relay: _Relay, response: Response, length: int) -> None:
        super().__init__(length)
        self._relay = relay
        self._response = response

    def send(self, sock: socket.socket, head: bytes) -> None:
        try:
            for moved in self._response.splice_to(sock, head):
                self.done += moved
        except BodyCut as exc:  # the client's side failing raises on (client_abort)
            self.failed = True
            self._relay.cut(exc.cause, self.done)

    def read(self, size: int = -1) -> bytes:
        if self.failed:
            return b""
        try:
            data = self._response.read1()
        except _BODY_FAILED as exc:
            self.failed = True
            self._relay.cut(exc, self.done)
            return b""
        self.done += len(data)
        return data

    def close(self) -> None:
        self._relay.close()


def create_app() -> Proxy:
    """Gunicorn's app factory: runs in each worker after fork.

    The configuration was parsed and validated by the master (see
    gunicorn.conf.py), so workers of one generation all share it.
    """
    settings = settings_module.from_environ()
    config = config_module.active or config_module.load(settings.config_dir)
    upstream = Upstream(
        settings.next_hop_host,
        settings.next_hop_port,
        connect_timeout=config.upstream.connect_timeout,
        read_timeout=config.upstream.read_timeout,
        maxsize=settings_module.WORKER_CONNECTIONS,
    )
    return Proxy(config, upstream, settings.cache_dir)

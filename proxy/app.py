"""The WSGI app: platform rules, the user's middleware, then next-hop.

Request path, outermost first:

1. ``Proxy.__call__`` starts the access record and guarantees one access
   line per request, whatever happens below.
2. Platform rules: CONNECT is refused, the health check goes straight to
   next-hop, then the user's HTTPS redirect, access control, body limit.
3. The user's middleware, if configured (``extension``).
4. ``Proxy.forward``: stream the request to next-hop and the answer back.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import random
import re
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from . import config as config_module
from . import logs
from . import settings as settings_module
from .cache import CacheLayer
from .cache_store import Store
from .config import HEALTHZ_PATH, ProxyConfig
from .extension import ExtensionError, WSGIApp, wrap
from .headers import downstream_response_headers, upstream_request_headers
from .logs import access_log, access_logged, error_log, iso_time, write_access
from .tunnel import ALREADY_HANDLED, is_upgrade, tunnel
from .upstream import (
    BLOCK_SIZE,
    BodyTooLarge,
    ClientBodyError,
    RequestBody,
    Response,
    ResponseError,
    Upstream,
    UpstreamError,
    request_body,
    upstream_target,
)

StartResponse = Callable[..., Callable[[bytes], object]]

_REASONS = {code: http.client.responses.get(code, "") for code in range(100, 600)}


class Exchange:
    """What the access line says about one request; filled in as it goes."""

    __slots__ = (
        "environ",
        "start",
        "start_perf",
        "request_id",
        "status",
        "content_type",
        "header_bytes",
        "body_bytes",
        "request_body",
        "upstream_status",
        "connect_s",
        "first_byte_s",
        "upstream_end",
        "outcome",
        "tunnel_bytes_up",
        "tunnel_end",
        "error",
        "cache_status",
    )

    def __init__(self, environ: dict) -> None:
        self.environ = environ
        self.start = time.time()
        self.start_perf = time.perf_counter()
        request_id = environ.get("HTTP_X_REQUEST_ID")
        if not request_id:
            request_id = f"{random.getrandbits(128):032x}"  # unique, not secret: no system call
            if "HTTP_X_REQUEST_ID" in environ:  # sent empty: forward the id we log instead
                environ["HTTP_X_REQUEST_ID"] = request_id
        self.request_id = request_id
        self.status = 0
        self.content_type = None
        self.header_bytes = 0
        self.body_bytes = 0
        self.request_body: RequestBody | None = None
        self.upstream_status: int | None = None
        self.connect_s: float | None = None
        self.first_byte_s: float | None = None
        self.upstream_end: float | None = None
        #: ``ok``, ``client_abort``, ``client_error``, ``upstream_error`` or ``error``.
        self.outcome = "ok"
        self.tunnel_bytes_up: int | None = None
        #: Why a 101 tunnel ended (see ``proxy.tunnel``).
        self.tunnel_end: str | None = None
        #: Why Gunicorn rejected the request (set by ``proxy.worker.log_rejected``).
        self.error: str | None = None
        #: What the cache did (``proxy.cache``); None without a cache.
        self.cache_status: str | None = None

    def start_response(self, start_response: StartResponse) -> StartResponse:
        """Wrap the server's start_response to note status and headers."""

        def noting(status: str, headers: list, exc_info=None):
            self.status = int(status[:3])
            size = len(status) + 11
            for name, value in headers:
                size += len(name) + len(value) + 4
                if name.lower() == "content-type":
                    self.content_type = value
            self.header_bytes = size
            return start_response(status, headers, exc_info)

        return noting

    def log(self) -> None:
        """Write the access line (building it only when access logging is on).

        Then let go of the environ: it holds this record, and the cycle would
        keep the whole request (environ, body reader, socket objects) alive
        until the cyclic collector ran, instead of freeing it right here.
        """
        access_logged.set(True)
        try:
            if access_log.isEnabledFor(logging.INFO):
                write_access(self.fields())
        finally:
            self.environ = {}

    def fields(self) -> dict:
        env = self.environ
        now = time.perf_counter()
        method = env.get("REQUEST_METHOD", "")
        target = env.get("RAW_URI", "")
        protocol = env.get("SERVER_PROTOCOL", "")
        body = self.request_body
        end = self.upstream_end
        return {
            "time": iso_time(self.start),
            "time_taken_s": round(now - self.start_perf, 6),
            "request": env.get("proxy.request_line") or (f"{method} {target} {protocol}" if method else ""),
            "status": self.status,
            "bytes": self.header_bytes + self.body_bytes if self.status else 0,
            "response_body_bytes": self.body_bytes,
            "content_type": self.content_type,
            "hostname": env.get("HTTP_HOST"),
            "referrer": env.get("HTTP_REFERER"),
            "useragent": env.get("HTTP_USER_AGENT"),
            "http_x_forwarded_proto": env.get("HTTP_X_FORWARDED_PROTO"),
            "upstream_status": self.upstream_status,
            "section_io_id": env.get("HTTP_SECTION_IO_ID"),
            "method": method,
            "target": target,
            "protocol": protocol,
            "remote_addr": env.get("REMOTE_ADDR"),
            "true_client_ip": env.get("HTTP_TRUE_CLIENT_IP"),
            "x_forwarded_for": env.get("HTTP_X_FORWARDED_FOR"),
            "request_body_bytes": body.bytes_read if body else 0,
            "upstream_connect_s": None if self.connect_s is None else round(self.connect_s, 6),
            "upstream_first_byte_s": None if self.first_byte_s is None else round(self.first_byte_s, 6),
            "upstream_total_s": None if end is None else round(end - self.start_perf, 6),
            "request_id": self.request_id,
            "worker_pid": logs.pid,
            "outcome": self.outcome,
            "cache_status": self.cache_status,
            **(
                {
                    "tunnel_bytes_up": self.tunnel_bytes_up,
                    "tunnel_bytes_down": self.body_bytes,
                    "tunnel_end": self.tunnel_end,
                }
                if self.tunnel_bytes_up is not None
                else {}
            ),
            **({"error": self.error} if self.error is not None else {}),
        }


class _Logged:
    """Passes the response body through, writing the access line on close()."""

    __slots__ = ("_body", "_exchange", "_done")

    def __init__(self, body: Iterable[bytes], exchange: Exchange) -> None:
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
    headers: list | None = None,
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


def _codings(value: str) -> list[str]:
    return [coding.strip(" \t").lower() for coding in value.split(",")]


def _client_ip(environ: dict):
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
        self.user_app: WSGIApp = inner
        if config.middleware is not None:
            module, factory = config.middleware
            try:
                self.user_app = wrap(inner, module, factory)
            except ExtensionError as exc:
                error_log.error("middleware not loaded, answering 500 except to the health check: %s", exc)
                self.user_app = self._broken_middleware

    # -- 1. the access record -------------------------------------------------

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        exchange = Exchange(environ)
        environ["proxy.exchange"] = exchange
        # Gunicorn's wsgi.errors writes raw text into the error log file; in
        # workers sys.stderr makes each line a record (proxy.logs.LoggingStream).
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
        if environ.get("proxy.linger"):
            return _LingeringClose(_Logged(body, exchange), environ["gunicorn.socket"])
        return _Logged(body, exchange)

    # -- 2. platform and user rules ---------------------------------------------

    def route(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] == "CONNECT":
            return respond(start_response, 405, headers=[("Allow", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")])
        codings = environ.get("HTTP_TRANSFER_ENCODING")
        if codings is not None and [c for c in _codings(codings) if c != "identity"] != ["chunked"]:
            # Gunicorn accepts ``gzip, chunked`` and passes the gzip-coded
            # bytes on; forwarded as plain chunked they would change meaning.
            return respond(start_response, 501, close=True)
        raw_uri = environ["RAW_URI"]
        scheme, sep, rest = raw_uri.partition("://")
        if sep and not raw_uri.startswith("/"):
            # absolute-form: the target's authority is the request's host
            # (RFC 9112 section 3.2.2), so Host must say the same to every
            # rule here and to next-hop, which gets origin-form.
            environ["HTTP_HOST"] = re.match(r"[^/?#]*", rest)[0].rpartition("@")[2]
        if raw_uri.startswith(HEALTHZ_PATH) and raw_uri[len(HEALTHZ_PATH) : len(HEALTHZ_PATH) + 1] in ("", "?"):
            return self.forward(environ, start_response)
        config = self.config
        if config.https_redirect and environ.get("HTTP_X_FORWARDED_PROTO", "").lower() != "https":
            target = upstream_target(raw_uri)
            if not target.startswith(config.redirect_exempt or "\0"):
                host = environ.get("HTTP_HOST", "")
                if host:
                    return respond(
                        start_response, config.https_redirect, headers=[("Location", f"https://{host}{target}")]
                    )
        if config.allow or config.deny:
            ip = _client_ip(environ)
            if (ip is not None and any(ip in net for net in config.deny)) or (
                config.allow and (ip is None or not any(ip in net for net in config.allow))
            ):
                return respond(start_response, 403)
        limit = config.max_body_bytes
        if limit is not None and environ.get("CONTENT_LENGTH") and int(environ["CONTENT_LENGTH"]) > limit:
            return self.too_large(environ, start_response)
        return self.user_app(environ, start_response)

    def too_large(self, environ: dict, start_response: StartResponse) -> list[bytes]:
        """413 and close, without reading the rest of the body (see _LingeringClose)."""
        environ["proxy.linger"] = True
        return respond(start_response, 413, close=True)

    def _broken_middleware(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        environ["proxy.exchange"].outcome = "error"
        return respond(start_response, 500)

    # -- 4. next-hop --------------------------------------------------------------

    def forward(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        exchange: Exchange = environ["proxy.exchange"]
        config = self.config
        if is_upgrade(environ):
            return tunnel(self, environ, start_response, exchange)
        headers = upstream_request_headers(environ, exchange.request_id)
        if config.request_headers:
            headers = config.request_headers.apply(headers)
        body, chunked = request_body(environ, config.max_body_bytes)
        exchange.request_body = body
        try:
            response, timing = self.upstream.send(
                environ["REQUEST_METHOD"], upstream_target(environ["RAW_URI"]), headers, body, chunked
            )
        except (BodyTooLarge, ClientBodyError) as exc:
            return self.body_failed(environ, start_response, exc)
        except UpstreamError as exc:
            return self.upstream_failed(environ, start_response, exc)
        exchange.connect_s = timing.connect_s
        exchange.first_byte_s = timing.first_byte_s
        return self.answer(environ, start_response, response)

    def answer(self, environ: dict, start_response: StartResponse, response: Response) -> Iterable[bytes]:
        """Relay next-hop's answer, or the configured error page in its place."""
        exchange: Exchange = environ["proxy.exchange"]
        head = response.head
        status = exchange.upstream_status = head.status
        if status in self.config.error_pages:
            response.release()
            exchange.upstream_end = time.perf_counter()
            return self.error_page(start_response, status, head.header("Retry-After"))
        environ["proxy.body_framed"] = head.chunked or head.length is not None  # the cache verifies these
        out = downstream_response_headers(head.headers, head.connection)
        if self.config.response_headers:
            out = self.config.response_headers.apply(out)
        start_response(f"{status} {head.reason or _REASONS.get(status, '')}", out)
        return _Relay(response, exchange, environ)

    def body_failed(self, environ: dict, start_response: StartResponse, exc: Exception) -> list[bytes]:
        """The client's body could not be forwarded: 413 past the limit, else 400."""
        if isinstance(exc, BodyTooLarge):
            return self.too_large(environ, start_response)
        exchange: Exchange = environ["proxy.exchange"]
        exchange.outcome = "client_error"
        error_log.warning(
            "%s %s -> 400: %s",
            environ["REQUEST_METHOD"],
            environ["RAW_URI"],
            exc,
            extra={"request_id": exchange.request_id},
        )
        return respond(start_response, 400, close=True)

    def upstream_failed(self, environ: dict, start_response: StartResponse, exc: UpstreamError) -> list[bytes]:
        exchange: Exchange = environ["proxy.exchange"]
        exchange.outcome = "upstream_error"
        exchange.upstream_end = time.perf_counter()
        error_log.error(
            "%s %s -> %d: %s",
            environ["REQUEST_METHOD"],
            environ["RAW_URI"],
            exc.status,
            exc.reason,
            extra={"request_id": exchange.request_id},
        )
        return self.error_page(start_response, exc.status)

    def error_page(self, start_response: StartResponse, status: int, retry_after: str | None = None) -> list[bytes]:
        headers = [("Retry-After", retry_after)] if retry_after else None
        page = self.config.error_pages.get(status)
        if page is None:
            return respond(start_response, status, headers=headers)
        return respond(start_response, status, page.body, headers, page.content_type)


class _Relay:
    """Streams next-hop's body to the client as it arrives.

    If next-hop fails mid-body the client connection is shut down, so the
    client sees a truncated transfer, never a short body passed off as
    complete. ``close`` releases the upstream connection (pooled only if the
    body was read to its exact end), even if the body was never iterated.
    """

    __slots__ = ("_response", "_exchange", "_environ")

    def __init__(self, response: Response, exchange: Exchange, environ: dict) -> None:
        self._response = response
        self._exchange = exchange
        self._environ = environ

    def __iter__(self) -> Iterator[bytes]:
        read1 = self._response.read1
        try:
            while chunk := read1(BLOCK_SIZE):
                yield chunk
        except (ResponseError, OSError) as exc:
            exchange = self._exchange
            environ = self._environ
            exchange.outcome = "upstream_error"
            error_log.error(
                "%s %s: next-hop failed mid-response after %d body bytes, closing client connection: %r",
                environ["REQUEST_METHOD"],
                environ["RAW_URI"],
                exchange.body_bytes,
                exc,
                extra={"request_id": exchange.request_id},
            )
            try:
                environ["gunicorn.socket"].shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._exchange.upstream_end = time.perf_counter()
        self._response.release()


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
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        maxsize=settings_module.WORKER_CONNECTIONS,
    )
    return Proxy(config, upstream, settings.cache_dir)

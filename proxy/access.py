"""The access record: what the access line says about one request.

One record per request, filled in as the request goes, whoever handled it:
the app (``proxy.app``, ``proxy.tunnel``) or Gunicorn refusing the request
before any app saw it (``proxy.worker``). Imported by the worker module,
which the Gunicorn master loads before gevent patches anything: this module
imports neither urllib3 nor the app.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from collections.abc import Callable, MutableMapping
from typing import Any, Protocol

from . import logs, metrics
from .logs import access_log, access_logged, error_log, iso_time, write_access

__all__ = ["AccessRecord", "BodyCount", "StartResponse", "record_rejected"]

#: The WSGI server's ``start_response``, as the app and its records wrap it.
StartResponse = Callable[..., Callable[[bytes], object]]


class BodyCount(Protocol):
    """What the record needs of the request body reader: how much was read."""

    @property
    def bytes_read(self) -> int: ...


class AccessRecord:
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
        "before_cut",
    )

    def __init__(self, environ: MutableMapping[str, Any]) -> None:
        self.environ = environ
        self.start = time.time()
        self.start_perf = time.perf_counter()
        request_id = environ.get("HTTP_X_REQUEST_ID")
        if not request_id:
            request_id = f"{random.getrandbits(128):032x}"  # unique, not secret: no system call
            if "HTTP_X_REQUEST_ID" in environ:  # sent empty: forward the id we log instead
                environ["HTTP_X_REQUEST_ID"] = request_id
        self.request_id: str = request_id
        self.status = 0
        self.content_type: str | None = None
        self.header_bytes = 0
        self.body_bytes = 0
        self.request_body: BodyCount | None = None
        self.upstream_status: int | None = None
        self.connect_s: float | None = None
        self.first_byte_s: float | None = None
        self.upstream_end: float | None = None
        #: ``ok``, ``client_abort``, ``client_error``, ``upstream_error`` or ``error``.
        self.outcome = "ok"
        self.tunnel_bytes_up: int | None = None
        #: Why a 101 tunnel ended (see ``proxy.tunnel``).
        self.tunnel_end: str | None = None
        #: Why the request was refused before it was forwarded (Gunicorn's
        #: parse error, or a rule of the app's that answered 400).
        self.error: str | None = None
        #: What the cache did (``proxy.cache``); None without a cache.
        self.cache_status: str | None = None
        #: Run by ``cut_short`` before the client sees the cut (the cache
        #: abandons its fill: no later request may follow a failed one).
        self.before_cut: Callable[[], None] | None = None

    def start_response(self, start_response: StartResponse) -> StartResponse:
        """Wrap the server's start_response to note status and headers."""

        def noting(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], object]:
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
            metrics.observe(self)
            if access_log.isEnabledFor(logging.INFO):
                write_access(self.fields())
        finally:
            self.environ = {}

    def cut_short(self, why: str, sent: int) -> None:
        """The body failed after its head was sent: shut the client
        connection down, so that the client sees a truncated transfer, never
        a short body passed off as complete, and say why in the error log."""
        environ = self.environ
        self.outcome = "upstream_error"
        error_log.error(
            "%s %s: %s after %d body bytes, closing client connection",
            environ.get("REQUEST_METHOD"),
            environ.get("RAW_URI"),
            why,
            sent,
            extra={"request_id": self.request_id},
        )
        if self.before_cut is not None:
            self.before_cut()
        try:
            environ["gunicorn.socket"].shutdown(socket.SHUT_RDWR)
        except (KeyError, OSError):
            pass

    def fields(self) -> dict[str, Any]:
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


def record_rejected(
    request: object,
    remote_addr: str,
    error: str,
    head: bytes,
    sent: int,
    send_failed: bool,
    started: tuple[float, float],
) -> AccessRecord:
    """The record of a request Gunicorn refused before any app saw it.

    ``request`` is what Gunicorn had parsed: a request (head complete or
    partial), the raw request line it could not parse (a string), or
    nothing. ``head`` is the start of what was sent back (Gunicorn's error
    answer), ``sent`` how many bytes of it left; status, content type and
    sizes are read from those, since Gunicorn reports none of them.
    """
    environ: dict[str, Any] = {"REMOTE_ADDR": remote_addr}
    if isinstance(request, str):
        environ["proxy.request_line"] = request
    elif request is not None:
        environ["REQUEST_METHOD"] = getattr(request, "method", None) or ""
        environ["RAW_URI"] = getattr(request, "uri", None) or ""
        version = getattr(request, "version", None)
        if version:
            environ["SERVER_PROTOCOL"] = f"HTTP/{version[0]}.{version[1]}"
        for name, value in getattr(request, "headers", None) or ():
            key = "HTTP_" + name.upper().replace("-", "_")
            environ[key] = f"{environ[key]},{value}" if key in environ else value
    record = AccessRecord(environ)
    record.start, record.start_perf = started
    if head[:5] == b"HTTP/" and head[9:12].isdigit():
        record.status = int(head[9:12])
        for line in head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-type":
                record.content_type = value.strip().decode("latin-1")
    if sent:
        header_end = head.find(b"\r\n\r\n")
        record.header_bytes = sent if header_end == -1 else header_end + 4
        record.body_bytes = sent - record.header_bytes
    record.outcome = "client_abort" if send_failed or not head else "client_error" if record.status < 500 else "error"
    record.error = error
    return record

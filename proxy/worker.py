"""The Gunicorn worker: Gunicorn's gevent worker with three proxy-specific changes.

1. The origin's ``Server`` and ``Date`` headers reach the client instead of
   Gunicorn's own (a proxy should not rewrite who answered, or when).
2. An app response carrying ``Connection: close`` really closes the client
   connection (Gunicorn otherwise drops the header and keeps the connection,
   which, after a refused body, would mean reading that body to the end).
3. Graceful shutdown closes idle keep-alive connections after a short grace
   instead of waiting for their keep-alive timeout, so a SIGTERM or reload
   finishes as soon as in-flight requests do. A connection that is in use
   gets ``Connection: close`` on its next response (Gunicorn's own logic).
"""

from __future__ import annotations

import socket
import time

import gevent
from gunicorn.http import wsgi
from gunicorn.workers.ggevent import GeventWorker

#: After shutdown starts, a keep-alive connection idle this long is closed.
SHUTDOWN_IDLE_GRACE = 1.0


class ProxyResponse(wsgi.Response):
    """Gunicorn's HTTP/1 response, keeping the origin's Server and Date."""

    origin_server = False
    origin_date = False

    def process_headers(self, headers: list[tuple[str, str]]) -> None:
        # Gunicorn validates every header, then drops Server and Date as if
        # they were hop-by-hop; put the origin's back.
        super().process_headers(headers)
        for name, value in headers:
            lower = name.lower()
            if lower == "server":
                self.origin_server = True
                self.headers.append((name, value.strip(" \t")))
            elif lower == "date":
                self.origin_date = True
                self.headers.append((name, value.strip(" \t")))
            elif lower == "connection" and value.strip().lower() == "close":
                self.must_close = True

    def default_headers(self) -> list[str]:
        headers = super().default_headers()
        if self.origin_server or self.origin_date:
            headers = [
                h
                for h in headers
                if not (self.origin_server and h.startswith("Server: ") or self.origin_date and h.startswith("Date: "))
            ]
        return headers


class _IdleWait:
    """Gunicorn's keep-alive wait, recorded so shutdown can cut it short."""

    __slots__ = ("_worker", "_timeout")

    def __init__(self, worker: ProxyWorker) -> None:
        self._worker = worker
        self._timeout = gevent.Timeout(worker.cfg.keepalive, False)

    def __enter__(self) -> None:
        self._worker.idle[gevent.getcurrent()] = time.monotonic()
        self._timeout.start()

    def __exit__(self, *exc_info) -> bool:
        self._worker.idle.pop(gevent.getcurrent(), None)
        return self._timeout.__exit__(*exc_info)


class ProxyWorker(GeventWorker):
    """Gunicorn's gevent worker, adapted for a reverse proxy (see module doc)."""

    def init_process(self) -> None:
        # Gunicorn builds responses through this module attribute.
        wsgi.Response = ProxyResponse
        self.clients: dict[gevent.Greenlet, socket.socket] = {}
        self.idle: dict[gevent.Greenlet, float] = {}
        super().init_process()

    def timeout_ctx(self) -> _IdleWait:
        return _IdleWait(self)

    def handle(self, listener, client, addr) -> None:
        current = gevent.getcurrent()
        self.clients[current] = client
        try:
            super().handle(listener, client, addr)
        finally:
            self.clients.pop(current, None)
            self.idle.pop(current, None)

    def run(self) -> None:
        gevent.spawn(self._close_idle_on_shutdown)
        super().run()

    def _close_idle_on_shutdown(self) -> None:
        while self.alive:
            gevent.sleep(0.25)
        stopping_since = time.monotonic()
        while True:
            now = time.monotonic()
            for greenlet, since in list(self.idle.items()):
                if now - max(since, stopping_since) >= SHUTDOWN_IDLE_GRACE:
                    client = self.clients.get(greenlet)
                    self.idle.pop(greenlet, None)
                    if client is not None:
                        try:
                            client.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
            gevent.sleep(0.25)

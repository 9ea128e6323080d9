#!/usr/bin/env python3
"""A tiny origin that counts its requests, for the cache stampede scenario.

``GET /count`` answers how many other requests arrived; ``GET /1k`` 1 KiB
(the readiness check, not counted); anything else 1 MiB after a short
delay, so that concurrent misses overlap the fill: the first answer with
``Cache-Control: max-age=1`` (stored, then left to expire), every later
one with ``max-age=3600``, so that the entry the stampede refreshes cannot
expire again while the stampede lasts (on a slow machine it can take more
than a second, and clients asking after that would count as new misses).
Usage: counting_origin.py PORT.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BODY = os.urandom(1024 * 1024)
DELAY_S = 0.3
_count = 0
_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        global _count
        if self.path in ("/count", "/1k"):
            body = str(_count).encode() if self.path == "/count" else BODY[:1024]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        with _lock:
            _count += 1
            first = _count == 1
        time.sleep(DELAY_S)
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.send_header("Cache-Control", "max-age=1" if first else "max-age=3600")
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


if __name__ == "__main__":
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()

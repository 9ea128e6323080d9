"""``make run``: the proxy in front of a small demo origin, on loopback.

A fresh machine has no next-hop, so this starts one (a stdlib HTTP server on
127.0.0.1:8081 serving a page and a few test paths) and runs the proxy
exactly as the image does, with ``gunicorn -c gunicorn.conf.py``, on
http://127.0.0.1:8080/ with logs on stdout/stderr. Any variable from the
README can still be set; these are only defaults.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

__all__ = ["ORIGIN_PORT", "DemoOrigin", "main"]

ROOT = Path(__file__).resolve().parent.parent
ORIGIN_PORT = 8081

PAGE = b"""<!doctype html><meta charset="utf-8"><title>edge proxy demo</title>
<h1>Served by the demo origin, through the proxy</h1>
<p>Try <a href="/headers">/headers</a> (what the origin received) or
<a href="/bytes/1048576">/bytes/1048576</a> (1 MiB, streamed).</p>
"""


class DemoOrigin(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "demo-origin/1.0"

    def do_GET(self) -> None:
        if self.path == "/headers":
            body = str(self.headers).encode()
            kind = "text/plain; charset=utf-8"
        elif self.path.startswith("/bytes/") and self.path[7:].isdigit():
            body = b"x" * min(int(self.path[7:]), 64 << 20)
            kind = "application/octet-stream"
        else:
            body, kind = PAGE, "text/html; charset=utf-8"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> int:
    origin = ThreadingHTTPServer(("127.0.0.1", ORIGIN_PORT), DemoOrigin)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    scratch = Path(tempfile.mkdtemp(prefix="edge-proxy-demo-"))
    env = {
        "PORT": "8080",
        "NEXT_HOP": f"127.0.0.1:{ORIGIN_PORT}",
        "PROXY_CONFIG_DIR": str(scratch / "proxy_config"),
        "PROXY_RUN_DIR": str(scratch / "run"),
        "PROXY_LOG_DIR": str(scratch / "log"),
        "PROXY_LOG_TARGET": "stdout",
        **os.environ,
    }
    print(
        f"demo origin on 127.0.0.1:{ORIGIN_PORT}; proxy on http://127.0.0.1:{env['PORT']}/ (Ctrl-C stops)",
        file=sys.stderr,
    )
    proxy = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"], cwd=ROOT, env=env)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: proxy.send_signal(signal.SIGTERM))
    return proxy.wait()


if __name__ == "__main__":
    sys.exit(main())

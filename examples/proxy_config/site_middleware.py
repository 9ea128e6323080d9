"""Example middleware: times each request and reports it to the browser.

Configured with ``middleware = "site_middleware:wrap"``: the proxy calls
``wrap(app)`` once per worker and sends every request (but the platform's
health check) through what it returns. ``app`` forwards to next-hop.
"""

import time


def wrap(app):
    def timed(environ, start_response):
        started = time.perf_counter()
        # Request headers for next-hop are read from the WSGI environ.
        environ["HTTP_X_EDGE_REQUEST_START"] = f"t={int(time.time() * 1_000_000)}"

        def start(status, headers, exc_info=None):
            took_ms = (time.perf_counter() - started) * 1000
            headers.append(("Server-Timing", f"edge;dur={took_ms:.1f}"))
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return timed

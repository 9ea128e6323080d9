"""The user's configuration (issue 4): proxy.toml, feature by feature.

Each feature's configuration goes through the platform's own path: written
to the configuration directory, checked by validate.sh (which must pass
silently), applied to the running proxy by update.sh, then exercised with
real requests against the real origin.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import threading
import time

import pytest
from conftest import ROOT, forwarded_before_marker, free_port, wait_for

HEALTHZ = "/.well-known/section-io/aee-hc/healthz"
EXAMPLE = ROOT / "examples" / "proxy_config"


def push(proxy, config: str, files: dict[str, str] | None = None) -> None:
    """What the platform does on a push: write the directory, validate.sh
    (silent success), update.sh (re-read and re-apply)."""
    for name, text in (files or {}).items():
        path = proxy.config_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (proxy.config_dir / "proxy.toml").write_text(config)
    result = proxy.hook("validate")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), result.stderr
    result = proxy.hook("update")
    assert result.returncode == 0, result.stderr


def configured(make_proxy, config: str, files: dict[str, str] | None = None, **kwargs):
    proxy = make_proxy(**kwargs)
    push(proxy, config, files)
    return proxy


def raw_response(port: int, data: bytes, timeout: float = 10) -> tuple[bytes, float]:
    """Send raw bytes; return everything until the proxy closes, and how long it took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - started


def errors_of(proxy) -> list[str]:
    result = proxy.hook("validate")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    return result.stderr.strip().splitlines()


# -- no configuration -----------------------------------------------------------------


def test_no_configuration_is_plain_pass_through(make_proxy, origin):
    proxy = make_proxy()
    assert list(proxy.config_dir.iterdir()) == []
    result = proxy.hook("validate")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    response, body = proxy.request("POST", "/x", body=b"z" * 100_000, headers={"True-Client-IP": "192.0.2.1"})
    assert response.status == 200 and body == b"hello from origin\n"
    assert origin.last().body_length == 100_000
    assert proxy.request("GET", "/status/503")[0].status == 503


# -- 1. upstream timeouts and body size -----------------------------------------------


def test_read_timeout(make_proxy):
    proxy = configured(make_proxy, "[upstream]\nread_timeout = 1.5\n")
    started = time.monotonic()
    response, _ = proxy.request("GET", "/stall", timeout=30)
    took = time.monotonic() - started
    assert response.status == 504
    assert 1.4 < took < 15, took
    assert "within 1.5s" in proxy.error_log()


def test_connect_timeout(make_proxy):
    """next-hop's accept queue is full, so the SYN goes unanswered."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(filler)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.3).close()
            pytest.skip("this kernel completes connections beyond a full accept queue")
        except TimeoutError:
            pass  # the premise holds: a SYN to this port goes unanswered
        proxy = make_proxy(env={"NEXT_HOP": f"127.0.0.1:{port}"})
        push(proxy, "[upstream]\nconnect_timeout = 0.5\nread_timeout = 30\n")
        started = time.monotonic()
        response, _ = proxy.request("GET", "/x", timeout=30)
        took = time.monotonic() - started
        assert response.status == 504
        assert took < 10, took
        assert "connect to next-hop timed out" in proxy.error_log()
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@pytest.fixture
def limited(make_proxy):
    return configured(make_proxy, "[upstream]\nmax_body_bytes = 1000\n")


def test_body_at_the_limit_passes(limited, origin):
    assert limited.request("POST", "/ok", body=b"a" * 1000)[0].status == 200
    assert origin.last().body_length == 1000
    conn = limited.connection()
    conn.request("POST", "/ok-chunked", body=iter([b"a" * 600, b"b" * 400]), encode_chunked=True)
    assert conn.getresponse().status == 200
    assert (origin.last().target, origin.last().body_length) == ("/ok-chunked", 1000)


def test_big_content_length_is_413_without_reading_the_body(limited, origin):
    origin.reset()
    head = b"POST /too-big HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n"
    raw, took = raw_response(limited.port, head + b"a" * 70_000)
    assert raw.startswith(b"HTTP/1.1 413 "), raw[:100]
    assert b"\r\nConnection: close\r\n" in raw
    assert took < 4, took  # answered at once, not after reading (or waiting for) 10 GB
    assert forwarded_before_marker(limited, origin) == []


def test_client_still_sending_a_big_body_gets_the_413_not_a_reset(limited, origin):
    """http.client sends the whole body before it reads the answer: the proxy
    half-closes and discards input (bounded) so the 413 survives."""
    origin.reset()
    for _ in range(3):
        conn = limited.connection(timeout=30)
        conn.request("POST", "/too-big", body=b"x" * (8 << 20))
        response = conn.getresponse()
        assert response.status == 413
        assert response.getheader("Connection") == "close"
        conn.close()
    assert forwarded_before_marker(limited, origin) == []


# The test origin's reader thread raises on the chunked body the proxy cuts off.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_chunked_body_over_the_limit_is_413(limited, origin):
    origin.reset()
    sent = []

    def parts():
        for i in range(2000):
            sent.append(i)
            yield b"c" * 1000

    conn = limited.connection(timeout=30)
    conn.request("POST", "/too-big-chunked", body=parts(), encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413
    assert response.read() == b"413 Request Entity Too Large\n"
    # The origin never got a complete request: the upstream exchange was cut.
    assert all(r.target != "/too-big-chunked" for r in forwarded_before_marker(limited, origin))
    raw, took = raw_response(
        limited.port,
        b"POST /raw-chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"400\r\n"
        + b"d" * 1024
        + b"\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 413 "), raw[:100]
    assert took < 4
    assert limited.request("GET", "/after")[0].status == 200
    access = [json.loads(line) for line in limited.access_log().splitlines()]
    assert [a["status"] for a in access if "too-big-chunked" in a["request"]] == [413]


# -- 2. header rules ------------------------------------------------------------------

HEADER_RULES = """
[request_headers]
remove = ["X-Drop-Me", "Cookie"]

[request_headers.set]
"X-Set" = "set-by-proxy"
"User-Agent" = "edge"

[request_headers.append]
"X-Multi" = "appended"

[response_headers]
remove = ["ETag", "x-origin-conn"]

[response_headers.set]
"X-Frame-Options" = "DENY"
"Content-Type" = "text/x-replaced"

[response_headers.append]
"Set-Cookie" = "edge=1"
"""


def test_header_rules(make_proxy, origin):
    proxy = configured(make_proxy, HEADER_RULES)
    response, body = proxy.request(
        "GET",
        "/headers",
        headers={"X-Drop-Me": "1", "Cookie": "a=b", "X-Set": "from-client", "X-Multi": "from-client"},
    )
    assert response.status == 200 and body == b"hello from origin\n"
    got = origin.last()
    assert got.header("X-Drop-Me") is None and got.header("Cookie") is None
    assert got.all("X-Set") == ["set-by-proxy"]
    assert got.all("User-Agent") == ["edge"]
    assert got.all("X-Multi") == ["from-client", "appended"]
    names = [name.lower() for name, _ in response.getheaders()]
    assert "etag" not in names and "x-origin-conn" not in names
    assert response.getheader("X-Frame-Options") == "DENY"
    assert [v for k, v in response.getheaders() if k.lower() == "content-type"] == ["text/x-replaced"]

    response, _ = proxy.request("GET", "/cookies")
    cookies = [v for k, v in response.getheaders() if k.lower() == "set-cookie"]
    assert cookies == ["a=1; Path=/", "b=2; HttpOnly", "c=3", "edge=1"]


# -- 3. HTTPS redirect ----------------------------------------------------------------


def test_https_redirect(make_proxy, origin):
    proxy = configured(
        make_proxy, '[https_redirect]\nenabled = true\nexempt_paths = ["/.well-known/acme-challenge/", "/open"]\n'
    )
    origin.reset()
    response, _ = proxy.request("GET", "/a/b?c=1&d=%20", headers={"Host": "shop.example"})
    assert response.status == 301
    assert response.getheader("Location") == "https://shop.example/a/b?c=1&d=%20"
    response, _ = proxy.request("GET", "/x", headers={"Host": "shop.example:8080", "X-Forwarded-Proto": "http"})
    assert (response.status, response.getheader("Location")) == (301, "https://shop.example:8080/x")
    assert origin.requests == []
    # Already HTTPS, exempt prefixes and the health check reach the origin.
    assert proxy.request("GET", "/x", headers={"X-Forwarded-Proto": "https"})[0].status == 200
    assert proxy.request("GET", "/.well-known/acme-challenge/token")[0].status == 200
    assert proxy.request("GET", "/open/sesame")[0].status == 200
    assert proxy.request("GET", f"{HEALTHZ}?ts=1")[0].status == 200
    assert [r.target for r in origin.requests] == [
        "/x",
        "/.well-known/acme-challenge/token",
        "/open/sesame",
        f"{HEALTHZ}?ts=1",
    ]
    # Off by default: an empty [https_redirect] table redirects nothing.
    push(proxy, "[https_redirect]\n")
    assert proxy.request("GET", "/x")[0].status == 200


def test_https_redirect_308_keeps_the_method(make_proxy, origin):
    proxy = configured(make_proxy, "[https_redirect]\nenabled = true\nstatus = 308\n")
    origin.reset()
    response, _ = proxy.request("POST", "/form", body=b"a=1", headers={"Host": "shop.example"})
    assert (response.status, response.getheader("Location")) == (308, "https://shop.example/form")
    assert forwarded_before_marker(proxy, origin, {"X-Forwarded-Proto": "https"}) == []


# -- 4. access control ----------------------------------------------------------------

ACCESS = """
[access_control]
allow = ["203.0.113.0/24", "2001:db8::/32", "198.51.100.7"]
deny = ["203.0.113.66", "2001:db8:bad::/48"]
"""


@pytest.fixture(scope="module")
def access_proxy(tmp_path_factory, origin):
    from conftest import Proxy

    proxy = Proxy(tmp_path_factory.mktemp("access"), origin).start()
    push(proxy, ACCESS)
    yield proxy
    proxy.stop()


@pytest.mark.parametrize(
    "client_ip, status",
    [
        ("203.0.113.5", 200),
        ("203.0.113.66", 403),  # deny wins over allow
        ("198.51.100.7", 200),
        ("198.51.100.8", 403),  # not in the allow list
        ("2001:db8::1", 200),
        ("2001:DB8:0:0:0:0:0:2", 200),
        ("2001:db8:bad::1", 403),
        ("2001:db9::1", 403),
        ("::ffff:203.0.113.5", 200),  # IPv4-mapped IPv6 is the IPv4 address
        ("::ffff:203.0.113.66", 403),
        (None, 403),  # an allow list admits only addresses it can check
        ("not-an-address", 403),
    ],
)
def test_access_control(access_proxy, client_ip, status):
    headers = {} if client_ip is None else {"True-Client-IP": client_ip}
    response, body = access_proxy.request("GET", "/private", headers=headers)
    assert response.status == status
    if status == 403:
        assert body == b"403 Forbidden\n"


def test_access_control_spares_the_health_check(access_proxy, origin):
    response, _ = access_proxy.request("GET", f"{HEALTHZ}?ts=9", headers={"True-Client-IP": "203.0.113.66"})
    assert response.status == 200
    assert origin.last().target == f"{HEALTHZ}?ts=9"


def test_deny_list_alone(make_proxy):
    proxy = configured(make_proxy, '[access_control]\ndeny = ["192.0.2.0/24", "::1"]\n')
    assert proxy.request("GET", "/", headers={"True-Client-IP": "192.0.2.200"})[0].status == 403
    assert proxy.request("GET", "/", headers={"True-Client-IP": "::1"})[0].status == 403
    assert proxy.request("GET", "/", headers={"True-Client-IP": "192.0.3.1"})[0].status == 200
    assert proxy.request("GET", "/")[0].status == 200  # no address: nothing to deny


# -- 5. error pages -------------------------------------------------------------------

PAGES = {
    "pages/502.html": "<h1>custom bad gateway</h1>\n",
    "503.txt": "custom: down for maintenance\n",
    "pages/504.html": "<h1>custom timeout</h1>\n",
}
PAGES_CONFIG = """
[upstream]
read_timeout = 1

[error_pages]
502 = "pages/502.html"
503 = "503.txt"
504 = "pages/504.html"
"""


def test_error_pages_replace_next_hops_and_the_proxys_own(make_proxy):
    proxy = configured(make_proxy, PAGES_CONFIG, PAGES)
    for path, status, body, kind in [
        ("/status/502", 502, PAGES["pages/502.html"], "text/html; charset=utf-8"),
        ("/status/503", 503, PAGES["503.txt"], "text/plain; charset=utf-8"),
        ("/stall", 504, PAGES["pages/504.html"], "text/html; charset=utf-8"),  # the proxy's own 504
    ]:
        response, got = proxy.request("GET", path, timeout=30)
        assert (response.status, got.decode(), response.getheader("Content-Type")) == (status, body, kind), path
    # Other statuses pass untouched; HEAD gets the head only.
    response, got = proxy.request("GET", "/status/500")
    assert (response.status, got) == (500, b"")
    response, got = proxy.request("HEAD", "/status/503")
    assert (response.status, got) == (503, b"")
    # The keep-alive connection survives a replaced page.
    conn = proxy.connection()
    for _ in range(3):
        conn.request("GET", "/status/503")
        assert conn.getresponse().read().decode() == PAGES["503.txt"]


def test_error_page_for_an_unreachable_next_hop(make_proxy):
    proxy = make_proxy(env={"NEXT_HOP": f"127.0.0.1:{free_port()}"})
    push(proxy, PAGES_CONFIG, PAGES)
    response, body = proxy.request("GET", "/x")
    assert (response.status, body.decode()) == (502, PAGES["pages/502.html"])


def test_error_pages_are_reread_on_update(make_proxy):
    proxy = configured(make_proxy, '[error_pages]\n503 = "503.txt"\n', {"503.txt": "first\n"})
    assert proxy.request("GET", "/status/503")[1] == b"first\n"
    push(proxy, '[error_pages]\n503 = "503.txt"\n', {"503.txt": "second\n"})
    assert proxy.request("GET", "/status/503")[1] == b"second\n"


# -- 6. middleware --------------------------------------------------------------------

MIDDLEWARE = """
def factory(app):
    def middleware(environ, start_response):
        path = environ["RAW_URI"]
        if path.startswith("/boom"):
            raise RuntimeError("boom from middleware")
        if path.startswith("/gen-boom"):
            return exploding(start_response)
        if path.startswith("/exit"):
            raise SystemExit(3)
        if path == "/local":
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
            return [b"local"]
        environ["HTTP_X_FROM_MIDDLEWARE"] = "yes"

        def start(status, headers, exc_info=None):
            return start_response(status, headers + [("X-Middleware", "1")], exc_info)

        return app(environ, start)

    return middleware


def exploding(start_response):
    start_response("200 OK", [("Content-Length", "2")])
    raise ValueError("boom while iterating")
    yield b"no"
"""


def test_middleware_wraps_the_proxy(make_proxy, origin):
    proxy = configured(make_proxy, 'middleware = "mw:factory"\n', {"mw.py": MIDDLEWARE})
    response, body = proxy.request("GET", "/through")
    assert (response.status, body, response.getheader("X-Middleware")) == (200, b"hello from origin\n", "1")
    assert origin.last().header("X-From-Middleware") == "yes"
    origin.reset()
    response, body = proxy.request("GET", "/local")
    assert (response.status, body) == (200, b"local")
    assert forwarded_before_marker(proxy, origin) == []
    assert not list(proxy.config_dir.rglob("__pycache__"))


UNSENDABLE = """
def factory(app):
    def middleware(environ, start_response):
        kind = environ["RAW_URI"].rsplit("/", 1)[1]
        if kind == "crlf":
            environ["HTTP_X_EVIL"] = "a\\r\\nX-Injected: 1"
        elif kind == "lf":
            environ["HTTP_X_EVIL"] = "a\\nX-Injected: 1"
        elif kind == "nul":
            environ["HTTP_X_EVIL"] = "a\\x00b"
        elif kind == "name":
            environ["HTTP_X_EVIL:_INJECTED"] = "1"
        elif kind == "unicode":
            environ["HTTP_X_EVIL"] = "\\u2603"
        elif kind == "target":
            environ["RAW_URI"] = "/a HTTP/1.1\\r\\nX-Injected: 1\\r\\n\\r\\nGET /b"
        return app(environ, start_response)

    return middleware
"""


@pytest.mark.parametrize("kind", ["crlf", "lf", "nul", "name", "unicode", "target"])
def test_a_request_middleware_made_unsendable_is_a_500_and_never_sent(make_proxy, origin, kind):
    proxy = configured(make_proxy, 'middleware = "mw:factory"\n', {"mw.py": UNSENDABLE})
    origin.reset()
    response, _ = proxy.request("GET", f"/evil/{kind}")
    assert response.status == 500
    assert forwarded_before_marker(proxy, origin) == []
    assert "invalid request line or header for next-hop" in proxy.error_log() or "latin-1" in proxy.error_log()
    assert proxy.request("GET", "/fine/ok")[0].status == 200


BAD_RESPONSE_FIELD = """
def factory(app):
    def middleware(environ, start_response):
        kind = environ["RAW_URI"].rsplit("/", 1)[1]

        def start(status, headers, exc_info=None):
            if kind == "crlf":
                headers = [*headers, ("X-Evil", "a\\r\\nX-Injected: 1")]
            elif kind == "name":
                headers = [*headers, ("X-Evil: 1\\r\\nX-Injected", "1")]
            elif kind == "space":
                headers = [*headers, ("X Evil", "1")]
            elif kind == "bytes":
                headers = [*headers, ("X-Evil", b"1")]
            elif kind == "length":
                headers = [(n, v) for n, v in headers if n.lower() != "content-length"] + [("Content-Length", "x")]
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return middleware
"""


@pytest.mark.parametrize("kind", ["crlf", "name", "space", "bytes", "length"])
def test_a_response_field_gunicorn_would_refuse_is_a_500_and_never_sent(make_proxy, kind):
    """The worker's response checks the app's fields in its own pass, with
    Gunicorn's patterns: what Gunicorn refuses never reaches the client."""
    proxy = configured(make_proxy, 'middleware = "mw:factory"\n', {"mw.py": BAD_RESPONSE_FIELD})
    conn = proxy.connection()
    conn.request("GET", f"/evil/{kind}")
    response = conn.getresponse()
    response.read()
    assert response.status == 500
    assert response.getheader("X-Injected") is None and response.getheader("X-Evil") is None
    conn.close()
    assert proxy.request("GET", "/fine/ok")[0].status == 200


def test_middleware_exception_is_a_500_for_that_request_only(make_proxy):
    proxy = configured(make_proxy, 'middleware = "mw:factory"\n', {"mw.py": MIDDLEWARE})
    workers = proxy.workers()
    conn = proxy.connection()
    for path in ("/boom", "/gen-boom", "/exit", "/through"):
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        expected = 200 if path == "/through" else 500
        assert response.status == expected, (path, body)
    assert proxy.workers() == workers, "a worker died"
    errors = [json.loads(line) for line in proxy.error_log().splitlines() if line.startswith("{")]
    raised = [e for e in errors if "middleware mw:factory raised" in e["message"]]
    assert len(raised) == 3, errors
    assert "RuntimeError: boom from middleware" in raised[0]["traceback"]
    assert "mw.py" in raised[0]["traceback"]
    assert "ValueError: boom while iterating" in raised[1]["traceback"]
    assert "SystemExit: 3" in raised[2]["traceback"]
    access = [json.loads(line) for line in proxy.access_log().splitlines()]
    assert [(a["status"], a["outcome"]) for a in access if "/boom" in a["request"]] == [(500, "error")]


def test_middleware_broken_at_run_time_spares_the_health_check(make_proxy, origin):
    """Validated, then broken on disk before the workers import it (the master
    does not import user code): every request is a 500, the health check is
    not, and the proxy stays up."""
    proxy = make_proxy(
        start=False, config='middleware = "mw:factory"\n', files={"mw.py": "raise ImportError('gone')\n"}
    )
    proxy.start()
    assert proxy.request("GET", "/x")[0].status == 500
    assert proxy.request("GET", f"{HEALTHZ}?ts=2")[0].status == 200
    assert "middleware not loaded" in proxy.error_log()
    assert proxy.process.poll() is None


# -- the health check is never the user's -----------------------------------------------


def test_health_check_bypasses_every_user_rule(make_proxy, origin):
    raising = (
        "def factory(app):\n"
        "    def broken(environ, start_response):\n"
        "        raise RuntimeError('no')\n"
        "    return broken\n"
    )
    config = """
middleware = "broken:factory"
[https_redirect]
enabled = true
[access_control]
deny = ["0.0.0.0/0", "::/0"]
"""
    proxy = configured(make_proxy, config, {"broken.py": raising})
    origin.reset()
    for target in (HEALTHZ, f"{HEALTHZ}?ts=1700000000"):
        response, body = proxy.request("GET", target, headers={"True-Client-IP": "192.0.2.1"})
        assert (response.status, body) == (200, b"hello from origin\n"), target
    assert [r.target for r in origin.requests] == [HEALTHZ, f"{HEALTHZ}?ts=1700000000"]
    # Everything else meets the rules, in order: redirect, then deny, then the middleware.
    assert proxy.request("GET", f"{HEALTHZ}x", headers={"True-Client-IP": "192.0.2.1"})[0].status == 301
    assert proxy.request("GET", "/", headers={"X-Forwarded-Proto": "https", "True-Client-IP": "::1"})[0].status == 403
    assert len(origin.requests) == 2


# -- the example --------------------------------------------------------------------------


def test_example_configuration_validates_and_works(make_proxy, origin):
    proxy = make_proxy(start=False)
    shutil.rmtree(proxy.config_dir)
    shutil.copytree(EXAMPLE, proxy.config_dir)
    result = proxy.hook("validate")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    proxy.start()
    response, _ = proxy.request("GET", "/page", headers={"X-Forwarded-Proto": "https", "X-Debug": "1"})
    assert response.status == 200
    assert response.getheader("Strict-Transport-Security").startswith("max-age=")
    assert response.getheader("Server-Timing").startswith("edge;dur=")
    got = origin.last()
    assert got.header("X-Edge-Proxy") == "1" and got.header("X-Debug") is None
    assert got.header("X-Edge-Request-Start").startswith("t=")
    assert proxy.request("GET", "/page")[0].status == 308
    assert (
        proxy.request("GET", "/", headers={"X-Forwarded-Proto": "https", "True-Client-IP": "192.0.2.9"})[0].status
        == 403
    )
    response, body = proxy.request("GET", "/status/503", headers={"X-Forwarded-Proto": "https"})
    assert response.status == 503 and b"<!-- error page 503 -->" in body
    assert not list(proxy.config_dir.rglob("__pycache__"))


@pytest.mark.parametrize("target", ["file", "stdout"])
def test_invalid_configuration_at_start_refuses_to_start(make_proxy, target):
    proxy = make_proxy(start=False, config="[upstream]\nread_timeout = 0\n", env={"PROXY_LOG_TARGET": target})
    proxy.start(wait=False)
    assert proxy.process.wait(30) != 0
    # Gunicorn's capture_output sends the master's stderr to the error log file.
    said = proxy.stderr() if target == "stdout" else proxy.error_log()
    assert "invalid configuration" in said and "proxy.toml:2: upstream.read_timeout" in said


# -- validation: every kind of error, through validate.sh ----------------------------------

BAD_MODULES = {
    "syntax.py": "def factory(app):\n    return app\ndef broken(:\n",
    "missing_dep.py": "import no_such_package_here\n",
    "no_factory.py": "x = 1\n",
    "factory_raises.py": "def factory(app):\n    raise KeyError('nope')\n",
    "not_callable.py": "def factory(app):\n    return 42\n",
    "exits.py": "import sys\nsys.exit(2)\n",
}


@pytest.mark.parametrize(
    "config, expected",
    [
        # unknown keys, at every level
        ("colour = 'blue'\n", ["proxy.toml:1: colour: unknown key"]),
        ("[upstream]\nretries = 3\n", ["proxy.toml:2: upstream.retries: unknown key"]),
        ("[error_pages]\n404 = 'x.html'\n", ["proxy.toml:2: error_pages.404: unknown key"]),
        ("[request_headers]\nrename = {}\n", ["proxy.toml:2: request_headers.rename: unknown key"]),
        # wrong types and values
        ("upstream = 5\n", ["proxy.toml:1: upstream: must be a table"]),
        ("[upstream]\nread_timeout = '5'\n", ["proxy.toml:2: upstream.read_timeout: must be a number"]),
        ("[upstream]\nconnect_timeout = 0\n", ["proxy.toml:2: upstream.connect_timeout: must be a number from"]),
        ("[upstream]\nmax_body_bytes = -1\n", ["proxy.toml:2: upstream.max_body_bytes: must be a whole number"]),
        ("[upstream]\nmax_body_bytes = 1.5\n", ["upstream.max_body_bytes: must be a whole number"]),
        ("[https_redirect]\nenabled = 'yes'\n", ["proxy.toml:2: https_redirect.enabled: must be true or false"]),
        ("[https_redirect]\nstatus = 302\n", ["proxy.toml:2: https_redirect.status: must be 301 or 308"]),
        ("[https_redirect]\nstatus = 301.0\n", ["https_redirect.status: must be 301 or 308"]),
        ("[https_redirect]\nexempt_paths = ['api']\n", ["https_redirect.exempt_paths: must be a list of path"]),
        ("[tunnel]\nidle_timeout = true\n", ["proxy.toml:2: tunnel.idle_timeout: must be a number"]),
        # bad addresses
        ("[access_control]\nallow = ['10.0.0.0/33']\n", ["proxy.toml:2: access_control.allow: '10.0.0.0/33'"]),
        ("[access_control]\ndeny = ['2001:db8::/129']\n", ["access_control.deny: '2001:db8::/129' is not"]),
        ("[access_control]\ndeny = ['example.com']\n", ["access_control.deny: 'example.com' is not"]),
        ("[access_control]\ndeny = [167772160]\n", ["access_control.deny: 167772160 is not"]),
        ("[access_control]\nallow = '10.0.0.0/8'\n", ["access_control.allow: must be a list"]),
        # header rules
        (
            '[request_headers.set]\n"Bad Header" = "x"\n',
            ["request_headers.set.Bad Header: 'Bad Header' is not a valid"],
        ),
        ('[response_headers.set]\n"Content-Length" = "0"\n', ["Content-Length is managed by the proxy"]),
        ('[request_headers]\nremove = ["Transfer-Encoding"]\n', ["Transfer-Encoding is managed by the proxy"]),
        ('[response_headers.append]\n"Connection" = "close"\n', ["Connection is managed by the proxy"]),
        ('[response_headers.set]\n"X-A" = "a\\nb"\n', ["response_headers.set.X-A: value must be a string"]),
        ('[response_headers.set]\n"X-A" = 1\n', ["response_headers.set.X-A: value must be a string"]),
        ("[request_headers]\nremove = 'X-A'\n", ["request_headers.remove: must be a list"]),
        ("[request_headers]\nset = ['X-A']\n", ["request_headers.set: must be a table"]),
        # error pages
        ("[error_pages]\n502 = 'missing.html'\n", ["proxy.toml:2: error_pages.502: cannot read 'missing.html'"]),
        ("[error_pages]\n503 = '../outside.html'\n", ["error_pages.503: '../outside.html' is outside"]),
        ("[error_pages]\n504 = 'adir'\n", ["error_pages.504: cannot read 'adir'"]),
        ("[error_pages]\n504 = 5\n", ["error_pages.504: must be a file name"]),
        # middleware
        ("middleware = 'no-colon'\n", ['proxy.toml:1: middleware: must be "module:factory"']),
        ("middleware = 'absent:factory'\n", ["middleware: module file absent.py not found"]),
        ("middleware = 'syntax:factory'\n", ["middleware: syntax.py: import failed: line 3: SyntaxError"]),
        ("middleware = 'missing_dep:f'\n", ["import failed: line 1: ModuleNotFoundError: No module named"]),
        ("middleware = 'no_factory:factory'\n", ["no_factory.py: no callable named 'factory'"]),
        ("middleware = 'factory_raises:factory'\n", ["factory(app) failed: line 2: KeyError: 'nope'"]),
        ("middleware = 'not_callable:factory'\n", ["factory(app) did not return a WSGI app"]),
        ("middleware = 'exits:factory'\n", ["exits.py: import failed: line 2: SystemExit: 2"]),
        # the file itself
        ("[upstream\nread_timeout = 1\n", ["proxy.toml:1: TOML syntax"]),
        ("a = 1\na = 2\n", ["proxy.toml:2: TOML syntax"]),
    ],
)
def test_validation_error(make_proxy, config, expected):
    proxy = make_proxy(start=False, files=BAD_MODULES, config=config)
    (proxy.config_dir / "adir").mkdir()
    (proxy.tmp / "outside.html").write_text("secret")
    lines = errors_of(proxy)
    assert len(lines) == len(expected), lines
    for line, want in zip(lines, expected, strict=True):
        assert line.startswith(str(proxy.config_dir)), line
        assert want in line, (want, line)
    assert not list(proxy.config_dir.rglob("__pycache__"))


def test_validation_error_not_utf8_and_unreadable(make_proxy):
    proxy = make_proxy(start=False)
    (proxy.config_dir / "proxy.toml").write_bytes(b"[upstream]\nread_timeout = 1 # \xff\n")
    assert "not UTF-8" in errors_of(proxy)[0]
    (proxy.config_dir / "proxy.toml").unlink()
    (proxy.config_dir / "proxy.toml").mkdir()
    assert "proxy.toml: cannot read" in errors_of(proxy)[0]


def test_validation_reports_every_problem_including_the_middleware(make_proxy):
    config = """\
middleware = "syntax:factory"

[upstream]
read_timeout = "soon"

[access_control]
deny = ["1.2.3.4/40", "::g"]

[response_headers.set]
"X-Ok" = "fine"
"Bad Name" = "x"
"""
    proxy = make_proxy(start=False, config=config, files=BAD_MODULES)
    lines = errors_of(proxy)
    toml = f"{proxy.config_dir}/proxy.toml"
    assert sorted(lines) == sorted(
        [
            f"{toml}:1: middleware: syntax.py: import failed: line 3: SyntaxError: invalid syntax",
            f"{toml}:4: upstream.read_timeout: must be a number from 0.001 to 86400, got 'soon'",
            f"{toml}:7: access_control.deny: '1.2.3.4/40' is not an IPv4/IPv6 address or CIDR range (as a string)",
            f"{toml}:7: access_control.deny: '::g' is not an IPv4/IPv6 address or CIDR range (as a string)",
            f"{toml}:11: response_headers.set.Bad Name: 'Bad Name' is not a valid header name",
        ]
    ), lines


def test_line_numbers_with_inline_tables_fall_back_to_the_enclosing_key(make_proxy):
    proxy = make_proxy(start=False, config='# comment\n[response_headers]\nset = { "X-A" = 1 }\n')
    [line] = errors_of(proxy)
    assert line.startswith(f"{proxy.config_dir}/proxy.toml:3: response_headers.set.X-A: "), line


# -- bounded load for the body limit, so a 413 never kills a worker ---------------------------


def test_many_413s_in_parallel_keep_the_proxy_serving(limited, origin):
    failures = []

    def client(n: int) -> None:
        for _ in range(5):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", limited.port, timeout=30)
                conn.request("POST", "/too-big", body=b"q" * (1 << 20))
                response = conn.getresponse()
                if response.status != 413:
                    failures.append(response.status)
                conn.close()
            except Exception as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    assert limited.request("GET", "/after")[0].status == 200
    wait_for(lambda: limited.workers(), what="workers")


def test_upgrade_tunnel_through_the_middleware_and_header_rules(make_proxy):
    """A WebSocket-style tunnel still works when a middleware wraps the proxy
    (the tunnel's "already handled" answer passes through it untouched), and
    request header rules reach the upgrade request."""
    from ws_origin import RawUpgradeOrigin

    upgrade_origin = RawUpgradeOrigin().start()
    try:
        proxy = make_proxy(origin_server=upgrade_origin)
        push(
            proxy,
            'middleware = "mw:factory"\n[request_headers.set]\n"X-Rule" = "up"\n',
            {"mw.py": MIDDLEWARE},
        )
        workers = proxy.workers()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(1)
                assert chunk, head
                head += chunk
            assert head.startswith(b"HTTP/1.1 101 "), head
            for i in range(3):
                sock.sendall(b"ping %d" % i)
                assert sock.recv(100) == b"ping %d" % i
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(100):
                pass
        assert proxy.request("GET", "/after")[0].status == 200
        assert proxy.workers() == workers
        assert "middleware mw:factory raised" not in proxy.error_log()
    finally:
        upgrade_origin.stop()


# -- the declarations: pure, no sockets --------------------------------------------------------


def test_docs_are_generated_from_the_declarations():
    """docs/configuration.md and the README's Environment and Timeouts tables
    are what ``python -m proxy.config_docs --write`` makes of the tables."""
    from proxy import config_docs

    assert (ROOT / "docs" / "configuration.md").read_text() == config_docs.configuration_md()
    readme = (ROOT / "README.md").read_text()
    assert config_docs.update_readme(readme) == readme
    for table in (config_docs.environment_table(), config_docs.timeouts_table()):
        assert table in readme
    assert config_docs.main(["--check"]) == 0


def test_every_declared_timeout_is_documented_with_its_value():
    from proxy import config, config_docs, settings
    from proxy.setting import Seconds, Table

    timeouts = config_docs.timeouts_table()
    for entry in config.SCHEMA:
        for setting in entry.settings if isinstance(entry, Table) else (entry,):
            if isinstance(setting.kind, Seconds):
                assert setting.summary, setting.name
                assert f"| {setting.summary} | {setting.default:g} s | `[{entry.name}] {setting.name}`" in timeouts
    for variable in settings.VARIABLES:
        if isinstance(variable.kind, Seconds):
            assert f"| {variable.summary} | {variable.default} s | `{variable.name}` |" in timeouts
    for module, name, _ in config_docs.FIXED_TIMEOUTS:
        assert f"`{name}` in `{module.replace('.', '/')}.py`" in timeouts


def test_no_timeout_is_a_bare_number_outside_its_declaration():
    """gunicorn.conf.py takes every Gunicorn timeout from the settings."""
    import re

    conf = (ROOT / "gunicorn.conf.py").read_text()
    for name in ("keepalive", "graceful_timeout", "timeout", "backlog", "worker_connections"):
        [line] = re.findall(rf"^{name} = (.*)$", conf, re.M)
        assert not re.search(r"\d", line), (name, line)


def test_typed_config_mirrors_the_schema(tmp_path):
    """One field per TOML key, named as the key; an empty directory gives
    the declared defaults."""
    from dataclasses import fields

    from proxy import config, settings
    from proxy.setting import Table

    assert [f.name for f in fields(config.ProxyConfig)] == [entry.name for entry in config.SCHEMA]
    for entry in config.SCHEMA:
        if isinstance(entry, Table):
            assert [f.name for f in fields(entry.cls) if f.init] == [s.name for s in entry.settings]
    assert [f.name for f in fields(settings.Settings)] == [v.field for v in settings.VARIABLES]
    loaded = config.load(tmp_path)
    assert loaded == config.defaults()
    assert (loaded.upstream.connect_timeout, loaded.upstream.read_timeout) == (5.0, 60.0)
    assert loaded.upstream.max_body_bytes is None and loaded.tunnel.idle_timeout == 3600.0
    assert (loaded.https_redirect.enabled, loaded.https_redirect.status) == (False, 301)
    (tmp_path / "proxy.toml").write_text(
        "[upstream]\nconnect_timeout = 2\nmax_body_bytes = 10_485_760\n[tunnel]\nidle_timeout = 0.5\n"
        '[https_redirect]\nenabled = true\nstatus = 308\nexempt_paths = ["/a"]\n'
        '[access_control]\ndeny = ["10.0.0.0/8"]\n[response_headers]\nremove = ["X-A"]\n'
    )
    loaded = config.load(tmp_path)
    assert loaded.upstream == config.Upstream(connect_timeout=2.0, read_timeout=60.0, max_body_bytes=10_485_760)
    assert loaded.tunnel.idle_timeout == 0.5
    assert loaded.https_redirect == config.HttpsRedirect(enabled=True, status=308, exempt_paths=("/a",))
    assert [str(n) for n in loaded.access_control.deny] == ["10.0.0.0/8"]
    assert loaded.response_headers.remove == frozenset({"x-a"})


def test_environment_settings():
    from pathlib import Path

    from proxy.settings import SettingsError, from_environ

    default = from_environ({})
    assert (default.port, default.next_hop_host, default.next_hop_port) == (80, "next-hop", 80)
    assert default.log_target == "stdout"  # the newer platform's default
    assert (default.log_format, default.access_log_enabled) == ("json", True)
    assert (default.keepalive_timeout, default.graceful_timeout, default.worker_timeout) == (75, 30, 30)
    assert default.config_dir == Path("/opt/proxy_config") and default.workers >= 1
    got = from_environ(
        {
            "PORT": " 8080 ",
            "NEXT_HOP": "[::1]:81",
            "PROXY_LOG_TARGET": "FILE",
            "PROXY_ACCESS_LOG": "off",
            "PROXY_GRACEFUL_TIMEOUT": "5",
            "PROXY_LOG_DIR": "",
        }
    )
    assert (got.port, got.next_hop, got.log_target, got.access_log_enabled) == (8080, ("::1", 81), "file", False)
    assert got.graceful_timeout == 5 and got.log_dir == Path("/var/log/proxy")
    for env, message in [
        ({"PORT": "x"}, "PORT='x': not an integer"),
        ({"PORT": "0"}, "PORT='0': must be between 1 and 65535"),
        ({"NEXT_HOP": "host:"}, "NEXT_HOP='host:': expected host:port"),
        ({"NEXT_HOP": "[::1]x"}, "NEXT_HOP='[::1]x': expected [address]:port"),
        ({"PROXY_LOG_TARGET": "syslog"}, "PROXY_LOG_TARGET='syslog': must be stdout or file"),
        ({"PROXY_ACCESS_LOG": "yes"}, "PROXY_ACCESS_LOG='yes': must be on or off"),
        ({"PROXY_KEEPALIVE_TIMEOUT": "1.5"}, "PROXY_KEEPALIVE_TIMEOUT='1.5': not a whole number of seconds"),
        ({"PROXY_WORKER_TIMEOUT": "0"}, "PROXY_WORKER_TIMEOUT='0': must be a whole number from 1 to 3600"),
    ]:
        with pytest.raises(SettingsError) as raised:
            from_environ(env)
        assert str(raised.value).startswith(message), (env, str(raised.value))


@pytest.mark.parametrize(
    "kind, value, expected",
    [
        ("seconds", 2, 2.0),
        ("seconds", 0.5, 0.5),
        ("seconds", True, "must be a number from 0.001 to 60, got True"),
        ("seconds", 61, "must be a number from 0.001 to 60, got 61"),
        ("bytes", 1 << 30, 1 << 30),
        ("bytes", 1.0, "must be a whole number of bytes (0 or more), got 1.0"),
        ("bytes", False, "must be a whole number of bytes (0 or more), got False"),
        ("boolean", True, True),
        ("boolean", 1, "must be true or false, got 1"),
        ("strings", ["a", "b"], ("a", "b")),
        ("strings", ["a", 1], "must be a list of names"),
        ("strings", "a", "must be a list of names"),
    ],
)
def test_value_kinds(kind, value, expected):
    """The kinds a later table (a cache: enabled, max_size, windows, bypass
    lists) is declared with."""
    from proxy.setting import Boolean, Bytes, Invalid, Seconds, Strings

    kinds = {"seconds": Seconds(0.001, 60), "bytes": Bytes(), "boolean": Boolean(), "strings": Strings("names")}
    if isinstance(expected, str):
        with pytest.raises(Invalid) as raised:
            kinds[kind].convert(value)
        assert raised.value.reason == expected
    else:
        got = kinds[kind].convert(value)
        assert got == expected and type(got) is type(expected)

"""Header rules (proxy.headers): pure rules first, then through the real proxy.

The through-the-proxy tests talk raw bytes to a real Gunicorn master with
gevent workers, and next-hop is ``raw_origin.RawOrigin``, which records the
field lines exactly as they arrive, so "two lines, in order" is an
assertion on the bytes next-hop got.
"""

from __future__ import annotations

import json
import socket

import pytest
from conftest import Proxy, raw_exchange, wait_for
from gunicorn.http.errors import InvalidResponseHeader, InvalidResponseHeaderName
from raw_origin import RawOrigin

from proxy.headers import (
    InvalidHost,
    absolute_form_host,
    forwardable_transfer_coding,
    is_upgrade,
    note_request_fields,
    response_field_role,
    transfer_codings,
    upstream_request_headers,
)
from proxy.worker import ProxyResponse

# == pure rules =======================================================================


def _environ(fields: list[tuple[str, str]], **extra: str) -> dict:
    """The environ Gunicorn makes of these field lines (repeated ones joined with commas)."""
    environ: dict = {"REQUEST_METHOD": "GET", "RAW_URI": "/", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "10.0.0.2"}
    for name, value in fields:
        key = "HTTP_" + name.replace("-", "_")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    environ.update(extra)
    return environ


def _forwarded(fields: list[tuple[str, str]], change=None) -> list[tuple[str, str]]:
    environ = _environ(fields)
    note_request_fields(environ, fields)
    if change:
        change(environ)
    return upstream_request_headers(environ, "rid")


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (None, True),
        ("chunked", True),
        ("CHUNKED", True),
        ("identity, chunked", True),
        (" chunked\t", True),
        ("gzip, chunked", False),
        ("chunked, chunked", False),
        ("identity", False),
        ("", False),
        ("xchunked", False),
    ],
)
def test_only_a_lone_chunked_transfer_coding_is_forwardable(value, ok):
    assert forwardable_transfer_coding(value) is ok


def test_transfer_codings_are_listed_in_order_lowercased():
    assert transfer_codings("GZip , \tChunked") == ["gzip", "chunked"]


@pytest.mark.parametrize(
    ("target", "host", "expected"),
    [
        ("/p", "example.test", None),
        ("*", "example.test", None),
        ("/a://b", "example.test", None),
        ("http://evil.test/p?q=1", "example.test", "evil.test"),
        ("http://evil.test:8080?q", None, "evil.test:8080"),
        ("http://user:pw@evil.test/p", "example.test", "evil.test"),
        ("https://evil.test#f", "evil.test", "evil.test"),
    ],
)
def test_absolute_form_host_is_the_targets_authority(target, host, expected):
    assert absolute_form_host(target, host) == expected


@pytest.mark.parametrize(
    ("target", "host"),
    [
        ("http://example.com/x", ""),
        ("http://example.com/x", "   "),
        ("http://example.com/x", " \t "),
        ("http:///x", "example.com"),
        ("http://user@/x", "example.com"),
        ("http://:80/x", "example.com"),
    ],
)
def test_absolute_form_with_an_empty_host_is_invalid(target, host):
    with pytest.raises(InvalidHost):
        absolute_form_host(target, host)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "keep-alive, Upgrade"}, True),
        ({"HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "keep-alive"}, False),
        ({"HTTP_UPGRADE": " ", "HTTP_CONNECTION": "upgrade"}, False),
        ({"HTTP_UPGRADE": "h2c", "HTTP_CONNECTION": "upgrade"}, False),
        ({"HTTP_UPGRADE": "websocket, H2C", "HTTP_CONNECTION": "upgrade"}, False),
        ({"HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "upgrade", "SERVER_PROTOCOL": "HTTP/1.0"}, False),
    ],
)
def test_upgrade_is_an_http_1_1_request_naming_it_in_connection(environ, expected):
    assert is_upgrade({"SERVER_PROTOCOL": "HTTP/1.1", **environ}) is expected


@pytest.mark.parametrize(
    "name,role",
    [
        ("content-length", "length"),
        ("connection", "connection"),
        ("upgrade", "upgrade"),
        ("server", "server"),
        ("date", "date"),
        ("keep-alive", "drop"),
        ("transfer-encoding", "drop"),
        ("x-a", "send"),
        ("content-type", "send"),
    ],
)
def test_each_response_field_has_one_role(name, role):
    hop_by_hop = frozenset({"connection", "upgrade", "server", "date", "keep-alive", "transfer-encoding"})
    assert response_field_role(name, hop_by_hop) == role


def _processed(fields):
    response = ProxyResponse(None, None, None)  # no request, socket or settings: the pass does no I/O
    response.process_headers(fields)
    return response


@pytest.mark.parametrize("again", [False, True], ids=["first-time", "names-and-values-remembered"])
def test_the_response_keeps_origin_server_and_date_and_sees_connection_close(again):
    date = "Sun, 06 Nov 1994 08:49:37 GMT"
    fields = [
        ("Server", " origin/1 "),
        ("X-A", "1 "),
        ("date", date + "\t"),
        ("Connection", "a, Close"),
        ("Keep-Alive", "timeout=5"),
        ("Content-Length", "3"),
    ]
    if again:
        _processed(fields)
    response = _processed(fields)
    assert response.headers == [("Server", "origin/1"), ("X-A", "1"), ("date", date), ("Content-Length", "3")]
    assert (response.origin_server, response.origin_date, response.must_close) == (True, True, True)
    assert (response.response_length, response.upgrade) == (3, False)
    plain = _processed([("Connection", "keep-alive")])
    assert (plain.headers, plain.origin_server, plain.origin_date, plain.must_close) == ([], False, False, False)
    switching = _processed([("Connection", "Upgrade"), ("Upgrade", "websocket")])
    assert (switching.headers, switching.upgrade) == ([("Upgrade", "websocket")], True)
    assert _processed([("Upgrade", "h2c")]).headers == []


@pytest.mark.parametrize(
    "remembered,field,error",
    [
        (("X-A", "1"), ("X-A", "1\r\nX-B: 2"), InvalidResponseHeader),
        (("X-A", "1"), ("X-A", "\x00"), InvalidResponseHeader),
        (("X-A", "1"), ("X A", "1"), InvalidResponseHeaderName),
        (("X-A", "1"), ("X-A:", "1"), InvalidResponseHeaderName),
        (("X-A", "1"), ("X-A", b"1"), TypeError),
        (("X-A", "1"), (b"X-A", "1"), TypeError),
        (("Content-Length", "1"), ("Content-Length", "x"), ValueError),
    ],
)
def test_the_response_refuses_what_gunicorn_refuses_next_to_fields_it_remembers(remembered, field, error):
    """A good field's name and value are remembered; a bad one sharing its
    name or its value (as text) is still refused, with Gunicorn's error."""
    _processed([remembered])
    with pytest.raises(error):
        _processed([remembered, field])


def test_fields_that_do_not_repeat_are_forwarded_from_the_environ_as_before():
    fields = [("HOST", "example.test"), ("COOKIE", "a=1; b=2"), ("X-CUSTOM", "x")]
    environ = _environ(fields)
    before = upstream_request_headers(dict(environ), "rid")
    note_request_fields(environ, fields)
    assert "proxy.repeated_fields" not in environ
    assert upstream_request_headers(environ, "rid") == before


def test_repeated_fields_are_forwarded_as_their_lines_in_order():
    fields = [("COOKIE", "a=1"), ("X-CUSTOM", "1"), ("COOKIE", "b=2"), ("X-CUSTOM", "2, 3"), ("COOKIE", "c=3")]
    out = _forwarded(fields)
    assert [v for n, v in out if n == "Cookie"] == ["a=1", "b=2", "c=3"]
    assert [v for n, v in out if n == "X-Custom"] == ["1", "2, 3"]


def test_repeated_cookie_lines_are_joined_with_semicolons_in_the_environ():
    fields = [("COOKIE", "a=1"), ("COOKIE", "b=2"), ("ACCEPT", "a/b"), ("ACCEPT", "c/d")]
    environ = _environ(fields)
    note_request_fields(environ, fields)
    assert environ["HTTP_COOKIE"] == "a=1; b=2"
    assert environ["HTTP_ACCEPT"] == "a/b,c/d"  # a list field: the comma join is equivalent


def test_a_field_changed_in_the_environ_goes_on_as_changed():
    fields = [("COOKIE", "a=1"), ("COOKIE", "b=2"), ("X-CUSTOM", "1"), ("X-CUSTOM", "2")]

    def change(environ):
        environ["HTTP_COOKIE"] += "; mw=1"
        environ["HTTP_X_CUSTOM"] = "mw"

    out = _forwarded(fields, change)
    assert [v for n, v in out if n == "Cookie"] == ["a=1; b=2; mw=1"]
    assert [v for n, v in out if n == "X-Custom"] == ["mw"]


def test_a_removed_repeated_field_is_not_forwarded():
    out = _forwarded([("X-CUSTOM", "1"), ("X-CUSTOM", "2")], lambda environ: environ.pop("HTTP_X_CUSTOM"))
    assert [n for n, _ in out if n == "X-Custom"] == []


def test_repeated_hop_by_hop_and_forwarded_for_keep_their_rules():
    fields = [
        ("CONNECTION", "keep-alive"),
        ("CONNECTION", "X-Private"),
        ("X-PRIVATE", "p"),
        ("X-PRIVATE", "q"),
        ("X-FORWARDED-FOR", "192.0.2.1"),
        ("X-FORWARDED-FOR", "192.0.2.2"),
        ("TE", "trailers"),
        ("TE", "gzip"),
    ]
    out = _forwarded(fields)
    names = [n.lower() for n, _ in out]
    assert "connection" not in names and "x-private" not in names and "te" not in names
    assert [v for n, v in out if n == "X-Forwarded-For"] == ["192.0.2.1,192.0.2.2, 10.0.0.2"]
    assert ("X-Request-Id", "rid") in out


# == through the real proxy ===========================================================

MIDDLEWARE = """
def factory(app):
    def middleware(environ, start_response):
        path = environ["RAW_URI"]
        if path.startswith("/mw/"):
            environ["HTTP_X_SEEN_COOKIE"] = environ.get("HTTP_COOKIE", "")
        if path == "/mw/append-cookie":
            environ["HTTP_COOKIE"] = environ["HTTP_COOKIE"] + "; mw=1"
        elif path == "/mw/set-cookie":
            environ["HTTP_COOKIE"] = "mw=1"
        elif path == "/mw/custom":
            environ["HTTP_X_CUSTOM"] = "from-mw"
        return app(environ, start_response)

    return middleware
"""


@pytest.fixture(scope="module")
def raw_origin():
    origin = RawOrigin().start()
    yield origin
    origin.stop()


@pytest.fixture(scope="module")
def rules_proxy(tmp_path_factory, raw_origin):
    proxy = Proxy(
        tmp_path_factory.mktemp("rules"),
        raw_origin,
        config='middleware = "mw:factory"\n',
        files={"mw.py": MIDDLEWARE},
    ).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def origin(raw_origin):
    raw_origin.reset()
    return raw_origin


@pytest.fixture
def port(rules_proxy):
    return rules_proxy.port


def _get(port: int, target: bytes, fields: bytes) -> bytes:
    return raw_exchange(port, b"GET " + target + b" HTTP/1.1\r\nConnection: close\r\n" + fields + b"\r\n")


def _one_request(origin: RawOrigin, path: str):
    [request] = wait_for(lambda: origin.received(path), timeout=10, what=f"{path} at next-hop")
    return request


@pytest.mark.parametrize("host", [b"", b" ", b"   \t "], ids=["empty", "space", "whitespace"])
def test_absolute_form_with_an_empty_host_field_is_400_and_never_forwarded(rules_proxy, port, origin, host):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET http://example.com/refused HTTP/1.1\r\nHost:" + host + b"\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):  # the proxy closes after the 400
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert b"Connection: close" in answer
    # Positive signal: a request sent afterwards, on a fresh connection, is
    # the first thing next-hop gets; nothing of the refused one came before.
    after = _get(port, b"/after", b"Host: example.test\r\n")
    assert after.startswith(b"HTTP/1.1 200 ")
    assert _one_request(origin, "/after").target == b"/after"
    assert [r.path for r in origin.received()] == ["/after"]
    assert b"refused" not in origin.all_bytes() and b"example.com" not in origin.all_bytes()

    def refused_line():
        lines = [json.loads(line) for line in rules_proxy.access_log().splitlines()]
        return [line for line in lines if line.get("target") == "http://example.com/refused"]

    [line] = wait_for(refused_line, what="the refused request's access line")[-1:]
    assert (line["status"], line["outcome"]) == (400, "client_error")
    assert "empty Host" in line["error"]


def test_absolute_form_with_a_host_is_still_forwarded_with_the_targets_host(port, origin):
    answer = _get(port, b"http://example.com/abs?q=1", b"Host: other.test\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    request = _one_request(origin, "/abs")
    assert (request.target, request.all("Host")) == (b"/abs?q=1", [b"example.com"])


def test_two_cookie_lines_reach_next_hop_as_two_lines_in_order(port, origin):
    answer = _get(port, b"/cookies", b"Host: example.test\r\nCookie: a=1\r\nX-Other: o\r\nCookie: b=2\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    request = _one_request(origin, "/cookies")
    assert request.all("Cookie") == [b"a=1", b"b=2"]
    assert request.all("X-Other") == [b"o"]
    assert request.problems == []


def test_two_custom_lines_reach_next_hop_as_two_lines_in_order(port, origin):
    answer = _get(port, b"/custom", b"Host: example.test\r\nX-Custom: 1\r\nX-Custom: 2, 3\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert _one_request(origin, "/custom").all("X-Custom") == [b"1", b"2, 3"]


def test_middleware_reads_repeated_cookies_joined_with_semicolons(port, origin):
    """Untouched by the middleware, the lines go on as they came; what the
    middleware read was one ``Cookie`` value any cookie parser reads right."""
    _get(port, b"/mw/read", b"Host: example.test\r\nCookie: a=1\r\nCookie: b=2\r\n")
    request = _one_request(origin, "/mw/read")
    assert request.all("X-Seen-Cookie") == [b"a=1; b=2"]
    assert request.all("Cookie") == [b"a=1", b"b=2"]


@pytest.mark.parametrize(
    ("path", "cookie"),
    [("/mw/append-cookie", b"a=1; b=2; mw=1"), ("/mw/set-cookie", b"mw=1")],
)
def test_a_middleware_that_sets_the_cookie_wins(port, origin, path, cookie):
    _get(port, path.encode(), b"Host: example.test\r\nCookie: a=1\r\nCookie: b=2\r\n")
    assert _one_request(origin, path).all("Cookie") == [cookie]


def test_a_middleware_that_sets_a_repeated_field_wins(port, origin):
    _get(port, b"/mw/custom", b"Host: example.test\r\nX-Custom: 1\r\nX-Custom: 2\r\nCookie: a=1\r\nCookie: b=2\r\n")
    request = _one_request(origin, "/mw/custom")
    assert request.all("X-Custom") == [b"from-mw"]
    assert request.all("Cookie") == [b"a=1", b"b=2"]


def test_a_request_without_host_reaches_next_hop_with_an_empty_one(port, origin):
    """next-hop always gets HTTP/1.1, which requires Host (RFC 9112 section 3.2)."""
    answer = raw_exchange(port, b"GET /nohost HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 200 "), answer[:100]
    request = _one_request(origin, "/nohost")
    assert request.all("Host") == [b""]
    assert request.problems == []

"""Logs (issue 3): access and error records, JSON or LTSV, files or stdout,
rotation through hooks/logrotate.sh and SIGUSR1 with no lost or torn line.

Everything is real: Gunicorn master and gevent workers, the test origin,
sockets on 127.0.0.1, the real ``logrotate`` program run by the real hook
script, real signals. Access lines are written when a response ends, which
can be just after the client has it, so tests wait for the lines they expect.
"""

from __future__ import annotations

import calendar
import gzip
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT, free_port, raw_exchange, wait_for

from proxy.logs import JsonAccessFormatter, ltsv, ltsv_escape

FORMATS = ["json", "ltsv"]

ACCESS_FIELDS = {
    # the platform's
    "time",
    "time_taken_s",
    "request",
    "status",
    "bytes",
    "response_body_bytes",
    "content_type",
    "hostname",
    "referrer",
    "useragent",
    "http_x_forwarded_proto",
    "upstream_status",
    "section_io_id",
    # ours
    "method",
    "target",
    "protocol",
    "remote_addr",
    "true_client_ip",
    "x_forwarded_for",
    "request_body_bytes",
    "upstream_connect_s",
    "upstream_first_byte_s",
    "upstream_total_s",
    "request_id",
    "worker_pid",
    "outcome",
    "cache_status",
}
ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
LOGROTATE = shutil.which("logrotate") or shutil.which("logrotate", path="/usr/sbin:/sbin")
needs_logrotate = pytest.mark.skipif(LOGROTATE is None, reason="logrotate is not installed")


# -- reading records -------------------------------------------------------------------


def ltsv_unescape(value: str) -> str:
    return value.encode("ascii").decode("unicode_escape")


def parse_line(line: str, fmt: str) -> dict:
    """One record; LTSV values are unescaped strings, ``-`` is None."""
    assert line, "empty line"
    if fmt == "json":
        record = json.loads(line)
        assert isinstance(record, dict), line
        return record
    assert line.isascii() and line.replace("\t", "").isprintable(), f"LTSV line is not printable ASCII: {line!r}"
    record: dict = {}
    for part in line.split("\t"):
        label, sep, value = part.partition(":")
        assert sep and re.fullmatch(r"[a-z_]+", label) and label not in record, f"bad LTSV field {part!r} in {line!r}"
        record[label] = None if value == "-" else ltsv_unescape(value)
    return record


def parse_text(text: str, fmt: str) -> list[dict]:
    """Every line of a log stream; the stream must end with a complete line."""
    if not text:
        return []
    assert text.endswith("\n"), f"torn last line: {text[-200:]!r}"
    return [parse_line(line, fmt) for line in text[:-1].split("\n")]


def read_file(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8")


def access_records(proxy, fmt: str = "json") -> list[dict]:
    text = proxy.stdout() if proxy.env["PROXY_LOG_TARGET"] == "stdout" else proxy.access_log()
    return parse_text(text, fmt)


def error_records(proxy, fmt: str = "json") -> list[dict]:
    text = proxy.stderr() if proxy.env["PROXY_LOG_TARGET"] == "stdout" else proxy.error_log()
    return parse_text(text, fmt)


def wait_records(read, count: int, what: str = "access lines") -> list[dict]:
    """Wait until ``read()`` returns at least ``count`` records, then return them."""
    wait_for(lambda: len(read()) >= count, what=f"{count} {what}")
    return read()


def s(value) -> str | None:
    """A field as text, the same way in both formats."""
    return None if value is None else str(value)


def fds_on(pids: list[int], path: Path) -> list[tuple[int, str]]:
    """Descriptors of these processes that refer to ``path``'s inode."""
    st = path.stat()
    found = []
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (target.st_dev, target.st_ino) == (st.st_dev, st.st_ino):
                found.append((pid, fd))
    return found


def has_own_signal_handlers(pid: int) -> bool:
    """Whether a worker has replaced the handlers it inherited from the master
    (it no longer catches SIGUSR2): a SIGUSR1 sent before that is lost."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            caught = int(line.split()[1], 16)
            return not caught & 1 << (signal.SIGUSR2 - 1) and bool(caught & 1 << (signal.SIGUSR1 - 1))
    return False


def wait_workers_booted(proxy, count: int) -> None:
    wait_for(
        lambda: len(proxy.workers()) == count and all(map(has_own_signal_handlers, proxy.workers())),
        what=f"{count} booted workers",
    )


# -- 1. the access record ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_access_record_has_every_field(make_proxy, origin, fmt):
    proxy = make_proxy(env={"PROXY_LOG_FORMAT": fmt})
    body = b"b" * 1234
    response, _ = proxy.request(
        "POST",
        "/fields/a?b=c",
        body=body,
        headers={
            "Host": "shop.example",
            "Referer": "https://shop.example/from",
            "User-Agent": "test-agent/1.0",
            "X-Forwarded-Proto": "https",
            "True-Client-IP": "203.0.113.7",
            "X-Forwarded-For": "203.0.113.7, 10.1.2.3",
            "section-io-id": "sid-123",
            "X-Request-Id": "client-chosen-id",
            "Content-Type": "application/x-test",
        },
    )
    assert response.status == 200
    [record] = wait_records(lambda: access_records(proxy, fmt), 1)
    assert set(record) == ACCESS_FIELDS
    assert ISO_MS.fullmatch(record["time"])
    assert abs(time.time() - calendar.timegm(time.strptime(record["time"][:19], "%Y-%m-%dT%H:%M:%S"))) < 60  # UTC
    assert s(record["request"]) == "POST /fields/a?b=c HTTP/1.1"
    assert s(record["status"]) == "200"
    assert s(record["upstream_status"]) == "200"
    assert s(record["response_body_bytes"]) == "18"
    assert int(record["bytes"]) > 18
    assert record["content_type"] == "text/plain"
    assert record["hostname"] == "shop.example"
    assert record["referrer"] == "https://shop.example/from"
    assert record["useragent"] == "test-agent/1.0"
    assert record["http_x_forwarded_proto"] == "https"
    assert record["section_io_id"] == "sid-123"
    assert record["method"] == "POST"
    assert record["target"] == "/fields/a?b=c"
    assert record["protocol"] == "HTTP/1.1"
    assert record["remote_addr"] == "127.0.0.1"
    assert record["true_client_ip"] == "203.0.113.7"
    assert record["x_forwarded_for"] == "203.0.113.7, 10.1.2.3"
    assert s(record["request_body_bytes"]) == "1234"
    assert record["request_id"] == "client-chosen-id"
    assert int(record["worker_pid"]) in proxy.workers()
    assert record["outcome"] == "ok"
    connect, first_byte, total, taken = (
        float(record[k]) for k in ("upstream_connect_s", "upstream_first_byte_s", "upstream_total_s", "time_taken_s")
    )
    assert 0 <= connect <= first_byte <= total <= taken
    received = origin.last()
    assert received.target == "/fields/a?b=c"
    assert received.header("X-Request-Id") == "client-chosen-id"


def test_generated_request_ids_are_forwarded_and_logged(shared_proxy, origin):
    before = len(access_records(shared_proxy))
    forwarded = []
    conn = shared_proxy.connection()
    for i in range(5):
        conn.request("GET", f"/rid/{i}")
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        forwarded.append(origin.last().header("X-Request-Id"))
    conn.close()
    records = wait_records(lambda: access_records(shared_proxy), before + 5)[before:]
    assert [r["target"] for r in records] == [f"/rid/{i}" for i in range(5)]
    assert [r["request_id"] for r in records] == forwarded
    assert len(set(forwarded)) == 5
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in forwarded)


def test_an_empty_request_id_is_replaced_by_the_logged_one(shared_proxy, origin):
    before = len(access_records(shared_proxy))
    raw = raw_exchange(
        shared_proxy.port, b"GET /empty-id HTTP/1.1\r\nHost: x\r\nX-Request-Id:\r\nConnection: close\r\n\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 200")
    assert origin.last().target == "/empty-id"
    forwarded = origin.last().all("X-Request-Id")
    [record] = wait_records(lambda: access_records(shared_proxy), before + 1)[before:]
    assert forwarded == [record["request_id"]] and re.fullmatch(r"[0-9a-f]{32}", record["request_id"])


def test_one_line_per_request_on_a_keepalive_connection(shared_proxy):
    before = len(access_records(shared_proxy))
    conn = shared_proxy.connection()
    for i in range(40):
        conn.request("GET", f"/ka/{i}", headers={"X-Request-Id": f"ka-{i}"})
        conn.getresponse().read()
    conn.close()
    # A marker request bounds "nothing more": its line comes after any extra line of the 40.
    assert shared_proxy.request("GET", "/ka/end", headers={"X-Request-Id": "ka-end"})[0].status == 200
    records = wait_records(lambda: access_records(shared_proxy), before + 41)[before:]
    assert [r["request_id"] for r in records] == [f"ka-{i}" for i in range(40)] + ["ka-end"]


# The origin's own thread fails on the malformed chunked body the proxy relayed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_failed_requests_get_exactly_one_line_each(make_proxy):
    proxy = make_proxy(config="[upstream]\nread_timeout = 1\nmax_body_bytes = 1000\n")
    port = proxy.port
    expect: list[tuple[str, dict]] = []  # (how to find the line, what it must say)

    # next-hop silent: 504
    assert proxy.request("GET", "/stall", headers={"X-Request-Id": "f-504"})[0].status == 504
    expect.append(("f-504", {"status": "504", "outcome": "upstream_error", "upstream_status": None}))
    # next-hop fails mid-body: the client sees a truncated 200
    raw_exchange(port, b"GET /truncate/200000 HTTP/1.1\r\nHost: x\r\nX-Request-Id: f-trunc\r\n\r\n")
    expect.append(("f-trunc", {"status": "200", "outcome": "upstream_error", "upstream_status": "200"}))
    # the client goes away mid-response
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /bytes/100000000 HTTP/1.1\r\nHost: x\r\nX-Request-Id: f-abort\r\n\r\n")
        assert sock.recv(65536)
    expect.append(("f-abort", {"status": "200", "outcome": "client_abort"}))
    # refused by the proxy's own rules
    assert proxy.request("CONNECT", "x:443", headers={"X-Request-Id": "f-405"})[0].status == 405
    expect.append(("f-405", {"status": "405"}))
    big = raw_exchange(
        port, b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nX-Request-Id: f-413\r\n\r\n" + b"x" * 5000
    )
    assert big.startswith(b"HTTP/1.1 413")
    expect.append(("f-413", {"status": "413"}))
    # a malformed chunked body: the app's 400
    bad_chunk = raw_exchange(
        port,
        b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nX-Request-Id: f-chunk\r\n\r\n"
        b"zz\r\nab\r\n0\r\n\r\n",
    )
    assert bad_chunk.startswith(b"HTTP/1.1 400"), bad_chunk[:100]
    expect.append(("f-chunk", {"status": "400"}))

    # rejected by Gunicorn's parser before the app runs
    rejected = {
        "bad-line": (b"GET /a\x7fb HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
        "bad-name": (b"GET /n HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n", "400"),
        "bad-value": (b"GET /v HTTP/1.1\r\nHost: x\r\nX-V: a\x01b\r\n\r\n", "400"),
        "bad-length": (b"POST /cl HTTP/1.1\r\nHost: cl.example\r\nContent-Length: 1x\r\n\r\n", "400"),
        "too-long": (b"GET /" + b"l" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "414"),
        "too-many": (b"GET /m HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n", "431"),
        "bad-version": (b"GET /ver HTTP/9.9\r\nHost: x\r\n\r\n", "400"),
    }
    for data, status in rejected.values():
        assert raw_exchange(port, data).startswith(b"HTTP/1.1 " + status.encode())
    # ... also as the second request of a kept-alive connection
    keepalive = raw_exchange(
        port,
        b"GET /first HTTP/1.1\r\nHost: x\r\nX-Request-Id: f-first\r\n\r\nGET /second HTTP/1.1\r\nBad Name: v\r\n\r\n",
    )
    assert keepalive.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 400" in keepalive
    expect.append(("f-first", {"status": "200", "outcome": "ok"}))

    total = len(expect) + len(rejected) + 1
    wait_records(lambda: access_records(proxy), total)
    # and no more than that: a marker request's line comes after any extra one
    assert proxy.request("GET", "/marker", headers={"X-Request-Id": "f-marker"})[0].status == 200
    records = wait_records(lambda: access_records(proxy), total + 1)
    assert records[-1]["request_id"] == "f-marker", records[-1]
    records = records[:-1]
    assert len(records) == total, [(r["request"], r["status"]) for r in records]
    by_id = Counter(r["request_id"] for r in records)
    for request_id, fields in expect:
        assert by_id[request_id] == 1, request_id
        [record] = [r for r in records if r["request_id"] == request_id]
        for key, value in fields.items():
            assert s(record[key]) == value, (request_id, key, record)
    parser_rejected = [r for r in records if "error" in r]
    assert sorted(s(r["status"]) for r in parser_rejected) == sorted(["400"] * 6 + ["414", "431"])
    for record in parser_rejected:
        assert record["outcome"] == "client_error"
        assert record["remote_addr"] == "127.0.0.1"
        assert int(record["bytes"]) > int(record["response_body_bytes"]) > 0
        assert record["content_type"] == "text/html"
        assert int(record["worker_pid"]) in proxy.workers()
        assert ISO_MS.fullmatch(record["time"])
    assert any(r["request"] == "GET /a\x7fb HTTP/1.1" for r in parser_rejected)
    # What Gunicorn had parsed of a request with a bad header is logged.
    [bad_length] = [r for r in parser_rejected if r["target"] == "/cl"]
    assert (bad_length["method"], bad_length["hostname"]) == ("POST", "cl.example")


def test_refused_next_hop_gets_one_line(make_proxy):
    proxy = make_proxy(env={"NEXT_HOP": f"127.0.0.1:{free_port()}"})
    assert proxy.request("GET", "/down", headers={"X-Request-Id": "f-502"})[0].status == 502
    [record] = wait_records(lambda: access_records(proxy), 1)
    assert (s(record["status"]), record["outcome"], record["request_id"]) == ("502", "upstream_error", "f-502")
    assert record["upstream_status"] is None and record["upstream_first_byte_s"] is None
    [error] = [e for e in error_records(proxy) if e["level"] == "ERROR"]
    assert error["logger"] == "proxy" and error["request_id"] == "f-502"


HOSTILE_UA = b'ua" , "status": 999, "x": "\tstatus:999\\t\\n \\ \x85\x80\x9b\xc3\xa9\xff end'
HOSTILE_REFERER = b'r\t"~\xa0\\x41'
HOSTILE_TARGET = b'/p"q\\r?x="y"&status=999'


@pytest.mark.parametrize("fmt", FORMATS)
def test_hostile_values_cannot_break_a_line_or_forge_a_field(make_proxy, fmt):
    proxy = make_proxy(env={"PROXY_LOG_FORMAT": fmt})
    head = (
        b"GET " + HOSTILE_TARGET + b" HTTP/1.1\r\nHost: h\xffst\r\nUser-Agent: " + HOSTILE_UA + b"\r\n"
        b"Referer: " + HOSTILE_REFERER + b'\r\nX-Request-Id: id"\t\xfe\r\nConnection: close\r\n\r\n'
    )
    assert raw_exchange(proxy.port, head).startswith(b"HTTP/1.1 200")
    # and one Gunicorn rejects, whose error message carries the bytes too
    raw_exchange(proxy.port, b'GET /x HTTP/1.1\r\nHost: x\r\nX-Bad\xff\t"name: v\r\n\r\n')
    records = wait_records(lambda: access_records(proxy, fmt), 2)
    assert len(proxy.access_log().splitlines()) == 2
    record = records[0]
    assert s(record["status"]) == "200"
    assert record["target"] == HOSTILE_TARGET.decode("latin-1")
    assert record["useragent"] == HOSTILE_UA.decode("latin-1")
    assert record["referrer"] == HOSTILE_REFERER.decode("latin-1")
    assert record["hostname"] == "h\xffst"
    assert record["request_id"] == 'id"\t\xfe'
    assert set(record) == ACCESS_FIELDS
    assert s(records[1]["status"]) == "400" and "X-Bad" in records[1]["error"]
    # the error log too: Gunicorn's warning about the bad header name
    errors = parse_text(proxy.error_log(), fmt)
    assert any("X-Bad\xff" in e["message"] for e in errors if e["level"] == "WARNING")


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        'quote " tab \t newline \n cr \r nul \x00 esc \x1b del \x7f',
        "\\ \\t \\n \\x41",
        "\x85\u2028\u2029\xff",
        "é😀",
    ],
)
def test_both_formatters_keep_any_value_on_one_line(value):
    """The formatters on their own, with characters no HTTP parser lets through."""
    line = ltsv({"a": value, "b": "next"})
    assert line.isascii() and line.replace("\t", "").isprintable() and line.count("\t") == 1
    assert parse_line(line, "ltsv") == {"a": value, "b": "next"}
    assert ltsv_unescape(ltsv_escape(value)) == value
    record = logging.LogRecord("proxy.access", logging.INFO, __file__, 1, {"a": value, "b": "next"}, None, None)
    text = JsonAccessFormatter().format(record)
    assert len(text.splitlines()) == 1 and text.isascii()
    assert json.loads(text) == {"a": value, "b": "next"}


def test_access_log_off_writes_no_access_lines(make_proxy):
    proxy = make_proxy(env={"PROXY_ACCESS_LOG": "off"})
    for i in range(5):
        assert proxy.request("GET", f"/off/{i}")[0].status == 200
    assert raw_exchange(proxy.port, b"GET /a b HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400")
    # The 400's error record is logged after every earlier access line would have been.
    wait_for(lambda: any(e["logger"] == "gunicorn.error" for e in error_records(proxy)), what="the 400's error record")
    assert proxy.access_log() == ""


# -- 2. the error log ---------------------------------------------------------------------

MIDDLEWARE = """
import sys
import threading
import warnings

import gevent


def factory(app):
    def middleware(environ, start_response):
        path = environ["PATH_INFO"]
        if path == "/raise":
            raise ZeroDivisionError("boom from middleware")
        if path == "/stray":
            print("printed line one\\nprinted line two")
            sys.stderr.write("stderr text without a newline")
            sys.stderr.flush()
            environ["wsgi.errors"].write("wsgi.errors text\\n")
            warnings.warn("a python warning from middleware")
            gevent.spawn(lambda: 1 / 0).join()
            thread = threading.Thread(target=lambda: {}["missing key in a thread"])
            thread.start()
            thread.join()
        return app(environ, start_response)

    return middleware
"""


@pytest.mark.parametrize("fmt", FORMATS)
def test_gunicorn_and_proxy_errors_are_structured(make_proxy, fmt):
    proxy = make_proxy(env={"PROXY_LOG_FORMAT": fmt}, config='middleware = "mw:factory"\n', files={"mw.py": MIDDLEWARE})
    assert proxy.request("GET", "/raise")[0].status == 500
    assert raw_exchange(proxy.port, b"GET /a b HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400")
    wait_for(lambda: "boom from middleware" in proxy.error_log(), what="the middleware's error")
    records = error_records(proxy, fmt)
    assert len(records) == len(proxy.error_log().splitlines())
    for record in records:
        assert {"time", "level", "logger", "pid", "message"} <= set(record), record
        assert ISO_MS.fullmatch(record["time"])
    started = [r for r in records if r["logger"] == "gunicorn.error" and r["message"].startswith("Starting gunicorn")]
    assert started and started[0]["level"] == "INFO"
    assert any(r["logger"] == "gunicorn.error" and r["level"] == "WARNING" for r in records)  # the bad request
    [failure] = [r for r in records if "boom from middleware" in r.get("traceback", "")]
    assert failure["level"] == "ERROR" and failure["logger"] == "proxy"
    assert failure["traceback"].startswith("Traceback (most recent call last):")
    assert "ZeroDivisionError: boom from middleware" in failure["traceback"]
    assert failure["request_id"]
    assert [r for r in access_records(proxy, fmt) if r["request_id"] == failure["request_id"]][0]["outcome"] == "error"


@pytest.mark.parametrize("target", ["file", "stdout"])
def test_output_that_bypasses_logging_becomes_records(make_proxy, target):
    """print(), stderr, wsgi.errors, warnings, a greenlet or thread dying with an
    exception: in file mode all of it would land raw in error.log (Gunicorn's
    capture_output points descriptors 1 and 2 there), in stdout mode print()
    would land in the access stream."""
    proxy = make_proxy(
        env={"PROXY_LOG_TARGET": target}, config='middleware = "mw:factory"\n', files={"mw.py": MIDDLEWARE}
    )
    assert proxy.request("GET", "/stray")[0].status == 200
    wait_records(lambda: access_records(proxy), 1)

    def error_text() -> str:
        return proxy.stderr() if target == "stdout" else proxy.error_log()

    wait_for(lambda: "missing key in a thread" in error_text(), what="the thread's exception")
    wait_for(lambda: error_text().endswith("\n"), what="the last error record written whole")
    records = error_records(proxy)  # every line parses
    error_text = error_text()
    assert len(records) == len(error_text.splitlines())
    by_message = {r["message"]: r for r in records}
    assert by_message["printed line one"]["logger"] == "proxy.stdout"
    assert by_message["printed line two"]["level"] == "INFO"
    assert by_message["stderr text without a newline"]["logger"] == "proxy.stderr"
    assert by_message["wsgi.errors text"]["level"] == "ERROR"
    [warning] = [r for r in records if r["logger"] == "py.warnings"]
    assert "a python warning from middleware" in warning["message"] and warning["level"] == "WARNING"
    [hub] = [r for r in records if r["logger"] == "gevent.hub"]
    assert "ZeroDivisionError" in hub["traceback"] and hub["level"] == "ERROR"
    [thread] = [r for r in records if "missing key in a thread" in r.get("traceback", "")]
    assert thread["level"] == "ERROR" and thread["traceback"].startswith("Traceback")
    # the access stream holds access records only
    assert [r["target"] for r in access_records(proxy)] == ["/stray"]
    if target == "file":
        assert proxy.stdout() == "" and proxy.stderr() == ""


def test_stdout_target_writes_no_files(make_proxy, tmp_path):
    log_dir = tmp_path / "never" / "log"
    proxy = make_proxy(env={"PROXY_LOG_TARGET": "stdout", "PROXY_LOG_DIR": str(log_dir)})
    assert proxy.request("GET", "/out", headers={"X-Request-Id": "to-stdout"})[0].status == 200
    [record] = wait_records(lambda: access_records(proxy), 1)
    assert record["request_id"] == "to-stdout"
    errors = error_records(proxy)
    assert any(r["message"].startswith("Starting gunicorn") for r in errors)
    assert not log_dir.exists() and not (tmp_path / "never").exists()
    result = proxy.hook("logrotate")
    assert (result.returncode, result.stderr) == (0, "")
    assert not (tmp_path / "never").exists()


def test_the_default_target_is_stdout_with_no_files(make_proxy):
    """The newer platform's default, with no PROXY_LOG_TARGET at all: access
    records on stdout, diagnostics on stderr, nothing in PROXY_LOG_DIR."""
    proxy = make_proxy(start=False)
    del proxy.env["PROXY_LOG_TARGET"]
    proxy.start()
    assert proxy.request("GET", "/by-default", headers={"X-Request-Id": "default-target"})[0].status == 200
    wait_for(lambda: "default-target" in proxy.stdout(), what="the access line on stdout")
    [record] = parse_text(proxy.stdout(), "json")
    assert record["target"] == "/by-default" and record["status"] == 200
    assert any(r["message"].startswith("Starting gunicorn") for r in parse_text(proxy.stderr(), "json"))
    assert not proxy.log_dir.exists()


@pytest.mark.parametrize("target", ["file", "stdout"])
def test_a_fatal_start_up_error_reaches_stderr_whatever_the_target(make_proxy, target):
    """A configuration the master cannot read (here proxy.toml is a directory:
    tests run as root, which reads any file whatever its mode). With the file
    target, Gunicorn points descriptor 2 at error.log; the reason must still
    reach the stderr the proxy was started with (what ``podman logs`` shows),
    as well as the error log."""
    proxy = make_proxy(start=False, env={"PROXY_LOG_TARGET": target})
    (proxy.config_dir / "proxy.toml").mkdir()
    proxy.start(wait=False)
    assert proxy.process.wait(30) != 0
    reason = "proxy.toml: cannot read: Is a directory"
    [on_stderr] = [r for r in parse_text(proxy.stderr(), "json") if r["level"] == "ERROR"]
    assert "invalid configuration, not starting" in on_stderr["message"] and reason in on_stderr["message"]
    assert proxy.stdout() == ""
    if target == "file":
        assert reason in proxy.error_log()
    else:
        assert not proxy.log_dir.exists()


def test_a_workers_errors_stop_reaching_stderr_once_it_serves(make_proxy):
    """With the file target only start-up errors are copied to stderr: an
    error while serving (next-hop unreachable) stays in error.log."""
    proxy = make_proxy(env={"NEXT_HOP": f"127.0.0.1:{free_port()}"})
    assert proxy.request("GET", "/unreachable")[0].status == 502
    wait_for(lambda: "cannot connect to next-hop" in proxy.error_log(), what="the 502's error record")
    assert proxy.stderr() == ""


def test_stdout_records_stay_whole_through_a_full_pipe(make_proxy):
    """In a container stdout is a pipe, shared by every worker. Records far
    over PIPE_BUF (4096 bytes) from two workers, while the reader lags so the
    pipe is full: each must still arrive whole."""
    proxy = make_proxy(env={"PROXY_LOG_TARGET": "stdout", "WEB_CONCURRENCY": "2"}, start=False)
    proxy.process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
        cwd=ROOT,
        env=proxy.env,
        stdout=subprocess.PIPE,
        stderr=proxy.stderr_path.open("wb"),
    )
    received = bytearray()

    def slow_reader() -> None:
        fd = proxy.process.stdout.fileno()
        while chunk := os.read(fd, 3000):
            received.extend(chunk)
            time.sleep(0.002)  # the stimulus: a consumer slower than the proxy writes

    reader = threading.Thread(target=slow_reader, daemon=True)
    reader.start()
    proxy.wait_ready()
    wait_workers_booted(proxy, 2)
    failures = []

    def client(n: int) -> None:
        # A new connection each time: both workers get requests, so both write.
        try:
            for i in range(60):
                headers = {"User-Agent": "u" * 8000, "Referer": "r" * 8000, "X-Request-Id": f"pipe-{n}-{i}"}
                conn = proxy.connection(timeout=30)
                conn.request("GET", "/" + "t" * (3000 + n * 500), headers=headers)
                conn.getresponse().read()
                conn.close()
        except Exception as exc:
            failures.append(repr(exc))

    clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(120)
    assert not failures, failures
    assert proxy.stop() == 0
    reader.join(30)
    records = parse_text(received.decode(), "json")
    assert sorted(r["request_id"] for r in records) == sorted(f"pipe-{n}-{i}" for n in range(4) for i in range(60))
    assert all(len(r["useragent"]) == 8000 for r in records)
    assert len({r["worker_pid"] for r in records}) == 2


def test_file_target_creates_the_log_directory(make_proxy, tmp_path):
    log_dir = tmp_path / "a" / "b" / "log"
    proxy = make_proxy(env={"PROXY_LOG_DIR": str(log_dir)})
    assert proxy.request("GET", "/f")[0].status == 200
    wait_for(lambda: (log_dir / "access.log").exists() and (log_dir / "access.log").read_text(), what="access.log")
    assert json.loads((log_dir / "access.log").read_text())["target"] == "/f"
    assert "Starting gunicorn" in (log_dir / "error.log").read_text()
    assert proxy.stdout() == "" and proxy.stderr() == ""


# -- 3. logrotate.sh ------------------------------------------------------------------------


def _tree(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())} if directory.exists() else {}


@needs_logrotate
def test_logrotate_rotates_and_every_process_reopens(make_proxy):
    proxy = make_proxy(env={"WEB_CONCURRENCY": "2"})
    wait_for(lambda: len(proxy.workers()) == 2, what="two workers")
    assert proxy.request("GET", "/before", headers={"X-Request-Id": "before"})[0].status == 200
    wait_records(lambda: access_records(proxy), 1)
    log_dir = proxy.log_dir
    # The platform may run hooks without the sbin directories on PATH.
    result = proxy.hook("logrotate", env={"PATH": "/usr/bin:/bin"})
    assert (result.returncode, result.stderr) == (0, "")
    assert [r["request_id"] for r in parse_text(read_file(log_dir / "access.log.1"), "json")] == ["before"]
    assert "Starting gunicorn" in read_file(log_dir / "error.log.1")
    assert (log_dir / "logrotate.state").exists()
    # When the hook returns, no process has a rotated file open any more.
    processes = [proxy.pid, *proxy.workers()]
    assert fds_on(processes, log_dir / "access.log.1") == []
    assert fds_on(processes, log_dir / "error.log.1") == []
    assert {pid for pid, _ in fds_on(processes, log_dir / "access.log")} == set(processes)
    # master's descriptors 1 and 2 (capture_output) follow error.log
    assert {fd for pid, fd in fds_on([proxy.pid], log_dir / "error.log")} >= {"1", "2"}
    assert proxy.request("GET", "/after", headers={"X-Request-Id": "after"})[0].status == 200
    wait_records(lambda: access_records(proxy), 1)
    assert [r["request_id"] for r in access_records(proxy)] == ["after"]
    # Second rotation: the first rotated file is compressed (delaycompress).
    result = proxy.hook("logrotate")
    assert result.returncode == 0, result.stderr
    assert [r["request_id"] for r in parse_text(read_file(log_dir / "access.log.2.gz"), "json")] == ["before"]
    assert [r["request_id"] for r in parse_text(read_file(log_dir / "access.log.1"), "json")] == ["after"]
    assert proxy.request("GET", "/later")[0].status == 200
    wait_records(lambda: access_records(proxy), 1)


@needs_logrotate
def test_logrotate_keeps_24_compressed_files(make_proxy):
    proxy = make_proxy()
    conn = proxy.connection()
    for i in range(26):
        conn.request("GET", f"/r/{i}", headers={"X-Request-Id": f"r{i}"})
        conn.getresponse().read()
        wait_for(lambda: proxy.access_log(), what="a line to rotate")  # notifempty
        result = proxy.hook("logrotate")
        assert result.returncode == 0, result.stderr
    conn.close()
    names = {p.name for p in proxy.log_dir.iterdir() if p.name.startswith("access.log")}
    assert names == {"access.log", "access.log.1"} | {f"access.log.{n}.gz" for n in range(2, 25)}
    for n in range(1, 25):
        path = proxy.log_dir / (f"access.log.{n}" if n == 1 else f"access.log.{n}.gz")
        assert [r["request_id"] for r in parse_text(read_file(path), "json")] == [f"r{26 - n}"]
    rendered = (proxy.log_dir / "logrotate.conf").read_text()
    directives = {line.split()[0] for line in rendered.splitlines() if line.startswith("    ")}
    assert {"hourly", "rotate", "compress", "delaycompress", "create"} <= directives
    assert "copytruncate" not in directives and "    rotate 24" in rendered
    assert str(proxy.log_dir) in (proxy.log_dir / "logrotate.state").read_text()


@needs_logrotate
def test_logrotate_before_the_proxy_runs_changes_nothing(make_proxy):
    proxy = make_proxy(start=False)
    result = proxy.hook("logrotate")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert not proxy.log_dir.exists()
    proxy.log_dir.mkdir()
    result = proxy.hook("logrotate")
    assert (result.returncode, result.stderr) == (0, "")
    assert _tree(proxy.log_dir) == {}


@needs_logrotate
def test_logrotate_in_stdout_mode_changes_nothing(make_proxy):
    proxy = make_proxy(env={"PROXY_LOG_TARGET": "stdout"})
    # even with files left by an earlier file-target run
    proxy.log_dir.mkdir()
    (proxy.log_dir / "access.log").write_text('{"old": 1}\n')
    before = _tree(proxy.log_dir)
    result = proxy.hook("logrotate")
    assert (result.returncode, result.stderr) == (0, "")
    assert _tree(proxy.log_dir) == before


@needs_logrotate
def test_logrotate_without_pidfile_fails_and_changes_nothing(make_proxy):
    proxy = make_proxy()
    assert proxy.request("GET", "/x")[0].status == 200
    wait_records(lambda: access_records(proxy), 1)
    proxy.stop()  # Gunicorn removes its pidfile on exit
    assert not proxy.pidfile.exists()
    before = _tree(proxy.log_dir)
    result = proxy.hook("logrotate")
    assert result.returncode != 0
    assert str(proxy.pidfile) in result.stderr and "not running" in result.stderr
    assert "Traceback" not in result.stderr
    assert _tree(proxy.log_dir) == before


@needs_logrotate
@pytest.mark.parametrize("content", ["stale", "garbage"])
def test_logrotate_with_a_stale_pidfile_fails_and_changes_nothing(make_proxy, content):
    proxy = make_proxy()
    wait_for(lambda: proxy.error_log(), what="error.log")
    proxy.stop()
    if content == "stale":
        gone = subprocess.Popen(["true"])
        gone.wait()
        proxy.pidfile.write_text(f"{gone.pid}\n")
    else:
        proxy.pidfile.write_text("not a pid\n")
    before = _tree(proxy.log_dir)
    result = proxy.hook("logrotate")
    assert result.returncode != 0
    assert ("stale" if content == "stale" else "not a pid") in result.stderr
    assert "Traceback" not in result.stderr
    assert _tree(proxy.log_dir) == before


@needs_logrotate
def test_logrotate_failure_is_reported(make_proxy):
    """logrotate refuses a world-writable log directory; the hook says so."""
    proxy = make_proxy()
    wait_for(lambda: proxy.error_log(), what="error.log")
    os.chmod(proxy.log_dir, 0o777)
    try:
        result = proxy.hook("logrotate")
    finally:
        os.chmod(proxy.log_dir, 0o755)
    assert result.returncode != 0
    assert "logrotate failed" in result.stderr and "insecure permissions" in result.stderr
    assert not (proxy.log_dir / "error.log.1").exists()


# -- 4. nothing lost, nothing torn -------------------------------------------------------------

CLIENTS = 4
ROTATIONS = 5
REQUESTS_BETWEEN_ROTATIONS = 150
MAX_REQUESTS_PER_CLIENT = 3000


@pytest.mark.slow
@needs_logrotate
@pytest.mark.parametrize("fmt", FORMATS)
def test_no_line_lost_or_torn_across_rotations(make_proxy, fmt):
    proxy = make_proxy(env={"PROXY_LOG_FORMAT": fmt, "WEB_CONCURRENCY": "2"})
    wait_workers_booted(proxy, 2)
    run = uuid.uuid4().hex[:8]
    sent: list[list[str]] = [[] for _ in range(CLIENTS)]
    failures: list[str] = []
    stop = threading.Event()
    deadline = time.monotonic() + 120

    def client(n: int) -> None:
        conn = proxy.connection()
        try:
            for i in range(MAX_REQUESTS_PER_CLIENT):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                if i and i % 50 == 0:  # a new connection now and then: both workers serve
                    conn.close()
                    conn = proxy.connection()
                request_id = f"{run}-{n}-{i}"
                sent[n].append(request_id)
                path = f"/bytes/{100 + i % 7 * 5000}" if i % 3 else f"/load/{request_id}"
                conn.request("GET", path, headers={"X-Request-Id": request_id})
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    failures.append(f"{request_id}: {response.status}")
        except Exception as exc:
            failures.append(f"client {n}: {exc!r}")
        finally:
            conn.close()

    def total() -> int:
        return sum(len(ids) for ids in sent)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    rotated_sizes = []
    try:
        for k in range(1, ROTATIONS + 1):
            goal = k * REQUESTS_BETWEEN_ROTATIONS
            wait_for(lambda goal=goal: total() >= goal or failures, timeout=60, what="load")
            assert not failures, failures
            result = proxy.hook("logrotate")
            assert result.returncode == 0, result.stderr
            rotated_sizes.append((proxy.log_dir / "access.log.1").stat().st_size)
        wait_for(lambda: total() >= (ROTATIONS + 1) * REQUESTS_BETWEEN_ROTATIONS or failures, timeout=60)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not failures, failures
    assert proxy.stop() == 0  # graceful: every in-flight request's line is written

    log_dir = proxy.log_dir
    access_files = [log_dir / "access.log", log_dir / "access.log.1"] + [
        log_dir / f"access.log.{n}.gz" for n in range(2, ROTATIONS + 1)
    ]
    assert {p.name for p in log_dir.glob("access.log*")} == {p.name for p in access_files}
    seen: Counter = Counter()
    for path in access_files:
        for record in parse_text(read_file(path), fmt):  # every line parses
            assert set(record) == ACCESS_FIELDS, record
            assert s(record["status"]) == "200"
            seen[record["request_id"]] += 1
    expected = [request_id for ids in sent for request_id in ids]
    assert len(expected) >= (ROTATIONS + 1) * REQUESTS_BETWEEN_ROTATIONS
    missing = set(expected) - set(seen)
    extra = set(seen) - set(expected)
    doubled = [rid for rid, count in seen.items() if count > 1]
    assert not missing and not extra and not doubled, (len(missing), len(extra), doubled[:5])
    # Once logrotate.sh returned, nothing more was written to the rotated file:
    # the file rotated by rotation k is access.log.(ROTATIONS + 1 - k) now.
    for k, size in enumerate(rotated_sizes, start=1):
        n = ROTATIONS + 1 - k
        path = log_dir / (f"access.log.{n}.gz" if n > 1 else "access.log.1")
        assert len(read_file(path).encode()) == size, (k, path.name)
    for path in log_dir.glob("error.log*"):
        parse_text(read_file(path), fmt)


# -- 5. SIGUSR1 by hand ---------------------------------------------------------------------


def test_sigusr1_reopens_files_moved_away(make_proxy):
    """What logrotate.sh relies on, without logrotate: rename, SIGUSR1, new
    files, in the master and (signalled by the master) in every worker."""
    proxy = make_proxy(env={"WEB_CONCURRENCY": "2"})
    wait_workers_booted(proxy, 2)
    assert proxy.request("GET", "/one")[0].status == 200
    wait_records(lambda: access_records(proxy), 1)
    access, moved = proxy.log_dir / "access.log", proxy.log_dir / "moved.log"
    access.rename(moved)
    proxy.signal(signal.SIGUSR1)
    processes = [proxy.pid, *proxy.workers()]
    wait_for(lambda: access.exists() and not fds_on(processes, moved), what="every process to reopen")
    assert proxy.request("GET", "/two")[0].status == 200
    wait_records(lambda: access_records(proxy), 1)
    assert [r["target"] for r in access_records(proxy)] == ["/two"]
    assert [r["target"] for r in parse_text(moved.read_text(), "json")] == ["/one"]

"""Protocol upgrades tunnelled to next-hop (issue 5): WebSocket and any Upgrade.

Real Gunicorn, a real ``websockets`` origin (``ws_origin.WsOrigin``) or a
raw-socket Upgrade origin (``ws_origin.RawUpgradeOrigin``), real clients
through the proxy on 127.0.0.1. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import Proxy, free_port, wait_for
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect
from ws_origin import GREETING, RawUpgradeOrigin, WsOrigin

HERE = Path(__file__).resolve().parent


# -- helpers ---------------------------------------------------------------------------


def ws_connect(proxy: Proxy, path: str, request_id: str | None = None, **kwargs):
    """A sync websockets client to ``path`` through the proxy."""
    headers = {"X-Request-Id": request_id} if request_id else None
    return connect(
        f"ws://127.0.0.1:{proxy.port}{path}",
        proxy=None,
        additional_headers=headers,
        open_timeout=10,
        close_timeout=5,
        ping_interval=None,
        max_size=None,
        **kwargs,
    )


def access_lines(proxy: Proxy) -> list[dict]:
    return [json.loads(line) for line in proxy.access_log().splitlines() if line.strip()]


def access_line(proxy: Proxy, request_id: str, timeout: float = 10) -> dict:
    """The one access line of ``request_id``, waiting for it to be written."""
    lines = wait_for(
        lambda: [line for line in access_lines(proxy) if line["request_id"] == request_id],
        timeout=timeout,
        what=f"access line of {request_id}",
    )
    # A second line for the same request would be written before a marker
    # request's line, or, once the proxy is gone, before it exited.
    marker = uuid.uuid4().hex
    try:
        proxy.request("GET", "/.marker", headers={"X-Request-Id": marker})
    except OSError:  # shutting down: its listener is closed
        proxy.process.wait(30)
    else:
        wait_for(lambda: any(line["request_id"] == marker for line in access_lines(proxy)), what="the marker's line")
    lines = [line for line in access_lines(proxy) if line["request_id"] == request_id]
    assert len(lines) == 1, lines
    return lines[0]


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read a response head; return it and any bytes that came after it."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        assert data, f"connection closed inside the response head: {buffer!r}"
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest


def recv_exactly(sock: socket.socket, n: int, initial: bytes = b"") -> bytes:
    data = initial
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"connection closed after {len(data)} of {n} bytes"
        data += chunk
    assert len(data) == n, f"got {len(data) - n} bytes too many"
    return data


def head_headers(head: bytes) -> dict[str, str]:
    out = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        out[name.strip().lower()] = value.strip()
    return out


def raw_upgrade(port: int, path: str, extra_headers: str = "", pipelined: bytes = b"", protocol: str = "foo"):
    """Open a raw ``Upgrade: <protocol>`` request; return (socket, head, bytes after the head)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: tunnel.example\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n"
        f"{extra_headers}\r\n".encode()
        + pipelined
    )
    head, rest = read_head(sock)
    return sock, head, rest


def wait_closed(sock: socket.socket, timeout: float = 10) -> float:
    """Read until the proxy closes the socket; return how long that took."""
    started = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return False
    except OSError:
        return True


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws_origin():
    server = WsOrigin().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def raw_origin():
    server = RawUpgradeOrigin().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ws_proxy(tmp_path_factory, ws_origin):
    proxy = Proxy(tmp_path_factory.mktemp("ws"), ws_origin).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def raw_proxy(tmp_path_factory, raw_origin):
    proxy = Proxy(tmp_path_factory.mktemp("raw"), raw_origin).start()
    yield proxy
    proxy.stop()


# -- 1. WebSocket traffic ------------------------------------------------------------------


def test_text_and_binary_messages(ws_proxy):
    with ws_connect(ws_proxy, "/echo") as ws:
        for message in ["hello", "héllo wörld ✓", "", "x" * 70000]:
            ws.send(message)
            assert ws.recv(timeout=10) == message
        for message in [b"\x00\x01\xff", bytes(range(256)) * 10, b""]:
            ws.send(message)
            assert ws.recv(timeout=10) == message


def test_one_mib_messages(ws_proxy):
    binary = os.urandom(1 << 20)
    text = "Ω" * (1 << 19)  # 1 MiB of UTF-8
    with ws_connect(ws_proxy, "/echo") as ws:
        ws.send(binary)
        assert ws.recv(timeout=30) == binary
        ws.send(text)
        assert ws.recv(timeout=30) == text


def test_ping_pong_both_ways(ws_proxy, ws_origin):
    with ws_connect(ws_proxy, "/server-ping") as ws:
        # The origin pinged us; our client answered; the pong reached the
        # origin (it says so only then).
        assert ws.recv(timeout=10) == "pong received"
        for payload in (b"", b"client-ping"):
            pong = ws.ping(payload)
            assert pong.wait(10), "no pong through the tunnel"


def _closed_at_origin(ws_origin: WsOrigin, path: str) -> list[tuple[str, int | None, str | None]]:
    """How the origin saw ``path``'s WebSocket end (paths are made unique per
    test: a previous test's handler may still be finishing)."""
    return wait_for(
        lambda: [entry for entry in ws_origin.closed if entry[0] == path], timeout=10, what="origin to see the close"
    )


def test_close_handshake_initiated_by_the_client(ws_proxy, ws_origin):
    request_id = uuid.uuid4().hex
    path = f"/echo?id={request_id}"
    with ws_connect(ws_proxy, path, request_id) as ws:
        ws.send("last words")
        assert ws.recv(timeout=10) == "last words"
        started = time.monotonic()
        ws.close(1000, "done")
        # The origin's closing frame and its TCP close came back through the
        # tunnel: nothing waited for close_timeout (5 s).
        assert time.monotonic() - started < 3
        assert ws.close_code == 1000 and ws.close_reason == "done"
    assert _closed_at_origin(ws_origin, path) == [(path, 1000, "done")]
    line = access_line(ws_proxy, request_id)
    assert line["status"] == 101
    assert line["tunnel_end"] in ("upstream_closed", "client_closed")


def test_close_handshake_initiated_by_the_origin(ws_proxy, ws_origin):
    request_id = uuid.uuid4().hex
    path = f"/server-close?id={request_id}"
    with ws_connect(ws_proxy, path, request_id) as ws:
        assert ws.recv(timeout=10) == "closing soon"
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert time.monotonic() - started < 3
        assert ws.close_code == 4000 and ws.close_reason == "bye"
    assert _closed_at_origin(ws_origin, path) == [(path, 4000, "bye")]
    assert access_line(ws_proxy, request_id)["tunnel_end"] == "upstream_closed"


# -- 2. what reaches the origin, on which connection -----------------------------------------


def test_upgrade_request_reaches_the_origin_with_upgrade_headers(ws_proxy, ws_origin):
    path = f"/echo?room={uuid.uuid4().hex}"
    with ws_connect(ws_proxy, path) as ws:
        ws.send("hi")
        assert ws.recv(timeout=10) == "hi"
    [handshake] = [h for h in ws_origin.handshakes if h.path == path]
    assert handshake.all("Connection") == ["Upgrade"]
    assert handshake.all("Upgrade") == ["websocket"]
    assert handshake.header("Sec-WebSocket-Version") == "13"
    assert handshake.header("Sec-WebSocket-Key")
    assert handshake.header("X-Forwarded-For") == "127.0.0.1"
    assert handshake.header("X-Request-Id")


def test_client_connection_tokens_are_not_forwarded(raw_proxy, raw_origin):
    raw_origin.reset()
    sock, head, _ = raw_upgrade(
        raw_proxy.port,
        "/echo",
        extra_headers="Connection: keep-alive, X-Private\r\nX-Private: secret\r\nKeep-Alive: timeout=5\r\n",
    )
    with sock:
        assert head.startswith(b"HTTP/1.1 101 ")
    [(_, request)] = raw_origin.requests
    lines = [line.lower() for line in request.split("\r\n")[1:]]
    assert [line for line in lines if line.startswith("connection:")] == ["connection: upgrade"]
    assert "upgrade: foo" in lines
    assert not [line for line in lines if line.startswith(("x-private", "keep-alive"))]


def test_tunnel_gets_a_dedicated_upstream_connection_never_the_pooled_one(make_proxy):
    origin = RawUpgradeOrigin().start()
    try:
        proxy = make_proxy(origin_server=origin)
        response, body = proxy.request("GET", "/before")
        assert response.status == 200 and response.getheader("X-Origin-Conn") == "1"
        sock, head, _ = raw_upgrade(proxy.port, "/echo")
        with sock:
            assert head.startswith(b"HTTP/1.1 101 ")
            assert head_headers(head)["x-origin-conn"] == "2", "the upgrade went on the pooled connection"
            # While the tunnel is open, plain requests still use the pooled one.
            response, _ = proxy.request("GET", "/during")
            assert response.getheader("X-Origin-Conn") == "1"
            sock.sendall(b"ping")
            assert recv_exactly(sock, 4) == b"ping"
        # The tunnel's connection was not returned to the pool.
        for path in ("/after1", "/after2"):
            response, _ = proxy.request("GET", path)
            assert response.getheader("X-Origin-Conn") == "1"
        assert origin.connections == 2
        assert [number for number, _ in origin.requests] == [1, 2, 1, 1, 1]
    finally:
        origin.stop()


# -- 3. refusals and failures ---------------------------------------------------------------


def test_origin_refusing_the_upgrade_is_relayed_with_its_body(ws_proxy, ws_origin):
    with pytest.raises(InvalidStatus) as refused_upgrade, ws_connect(ws_proxy, "/refuse"):
        pass
    response = refused_upgrade.value.response
    assert response.status_code == 400
    assert response.body == b"upgrade refused by origin\n"
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert "Upgrade" not in response.headers


def test_refused_upgrade_keeps_the_client_connection_usable(raw_proxy, raw_origin):
    conn = raw_proxy.connection()
    conn.request("GET", "/refuse", headers={"Connection": "Upgrade", "Upgrade": "foo"})
    response = conn.getresponse()
    assert response.status == 400
    assert response.read() == b"no upgrade here\n"
    conn.request("GET", "/next")
    response = conn.getresponse()
    assert response.status == 200 and response.read() == b"plain\n"
    conn.close()


def test_unreachable_next_hop_answers_502(make_proxy):
    proxy = make_proxy(env={"NEXT_HOP": f"127.0.0.1:{free_port()}"})
    with pytest.raises(InvalidStatus) as failed, ws_connect(proxy, "/echo"):
        pass
    assert failed.value.response.status_code == 502


def test_origin_vanishing_mid_tunnel_closes_the_client_promptly(make_proxy):
    process = subprocess.Popen(
        [sys.executable, str(HERE / "ws_origin.py")], stdout=subprocess.PIPE, cwd=HERE, text=True
    )
    try:
        port = int(process.stdout.readline())

        class Vanishing:
            address = f"127.0.0.1:{port}"

        proxy = make_proxy(origin_server=Vanishing())
        request_id = uuid.uuid4().hex
        with ws_connect(proxy, "/echo", request_id) as ws:
            ws.send("are you there")
            assert ws.recv(timeout=10) == "are you there"
            process.kill()
            process.wait(10)
            started = time.monotonic()
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
            assert time.monotonic() - started < 5
        line = access_line(proxy, request_id)
        assert line["status"] == 101 and line["tunnel_end"] == "upstream_closed"
        # The worker carries on.
        assert proxy.workers() and proxy.request("GET", "/x")[0].status == 502
    finally:
        process.kill()
        process.wait(10)


# -- 4. idle timeout -------------------------------------------------------------------------


def test_idle_tunnel_is_closed_and_a_busy_one_stays_open(make_proxy, ws_origin):
    proxy = make_proxy(origin_server=ws_origin, config="[tunnel]\nidle_timeout = 2\n")
    idle_id, busy_id = uuid.uuid4().hex, uuid.uuid4().hex
    with ws_connect(proxy, "/echo", idle_id) as idle, ws_connect(proxy, "/echo", busy_id) as busy:
        idle.send("once")
        assert idle.recv(timeout=10) == "once"
        quiet_since = time.monotonic()
        closed_after: list[float] = []

        def watch_idle() -> None:
            try:
                idle.recv(timeout=20)
            except (ConnectionClosed, TimeoutError):
                pass
            closed_after.append(time.monotonic() - quiet_since)

        watcher = threading.Thread(target=watch_idle)
        watcher.start()
        # The busy tunnel moves a message every 0.2 s for 5 s: more than
        # twice the idle timeout.
        while time.monotonic() - quiet_since < 5:
            busy.send("tick")
            assert busy.recv(timeout=10) == "tick"
            time.sleep(0.2)  # the stimulus: a busy tunnel's traffic
        watcher.join(20)
        assert closed_after and 1.5 <= closed_after[0] < 5, closed_after
        with pytest.raises(ConnectionClosed):
            idle.send("too late")
            idle.recv(timeout=5)
        busy.send("still here")
        assert busy.recv(timeout=10) == "still here"
    assert access_line(proxy, idle_id)["tunnel_end"] == "idle_timeout"
    assert access_line(proxy, busy_id)["tunnel_end"] != "idle_timeout"


# -- 5. many tunnels at once ------------------------------------------------------------------


@pytest.mark.slow
def test_200_concurrent_tunnels_through_one_worker(make_proxy):
    origin = WsOrigin().start()
    try:
        proxy = make_proxy(origin_server=origin, env={"WEB_CONCURRENCY": "1"})
        assert len(proxy.workers()) == 1
        count = 200

        async def scenario() -> list[bool]:
            all_open = asyncio.Event()
            opened = 0

            async def one(i: int) -> bool:
                nonlocal opened
                async with async_connect(
                    f"ws://127.0.0.1:{proxy.port}/echo",
                    proxy=None,
                    open_timeout=30,
                    close_timeout=10,
                    ping_interval=None,
                ) as ws:
                    opened += 1
                    if opened == count:
                        all_open.set()
                    await asyncio.wait_for(all_open.wait(), 60)
                    ok = True
                    for n in range(3):
                        message = f"tunnel {i} message {n}"
                        await ws.send(message)
                        ok = ok and await asyncio.wait_for(ws.recv(), 30) == message
                    payload = os.urandom(10000)
                    await ws.send(payload)
                    return ok and await asyncio.wait_for(ws.recv(), 30) == payload

            return await asyncio.gather(*(one(i) for i in range(count)))

        results = asyncio.run(asyncio.wait_for(scenario(), 120))
        assert results == [True] * count
        assert origin.peak_active == count, "the tunnels were not all open at once"
        assert origin.connections == count
        assert len(proxy.workers()) == 1
        lines = wait_for(
            lambda: (ls := [line for line in access_lines(proxy) if line["status"] == 101]) and len(ls) == count and ls,
            timeout=30,
            what="200 access lines",
        )
        assert len({line["worker_pid"] for line in lines}) == 1
        assert all(line["tunnel_bytes_up"] > 10000 and line["tunnel_bytes_down"] > 10000 for line in lines)
    finally:
        origin.stop()


# -- 6. shutdown and reload ----------------------------------------------------------------------


def _chat(ws, seconds: float) -> int:
    """Exchange a message every 0.25 s for ``seconds``; return how many."""
    sent = 0
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        ws.send(f"message {sent}")
        assert ws.recv(timeout=10) == f"message {sent}"
        sent += 1
        time.sleep(0.25)  # the stimulus: a conversation that goes on
    return sent


def test_tunnel_open_at_sigterm_keeps_working_until_it_ends(make_proxy, ws_origin):
    proxy = make_proxy(origin_server=ws_origin)
    request_id = uuid.uuid4().hex
    # An idle keep-alive client connection as well: the worker's idle-closer
    # closes that one quickly, and must not take the tunnel with it.
    idle = proxy.connection()
    idle.request("GET", "/warm")
    idle.getresponse().read()
    with ws_connect(proxy, "/echo", request_id) as ws:
        ws.send("before")
        assert ws.recv(timeout=10) == "before"
        proxy.signal(signal.SIGTERM)
        wait_for(lambda: refused(proxy.port), timeout=10, what="listener to close")
        assert _chat(ws, 4) >= 8  # well past SHUTDOWN_IDLE_GRACE
        closed_at = time.monotonic()
    # The tunnel ended by itself: the worker, then the master, exit at once.
    assert proxy.process.wait(20) == 0
    assert time.monotonic() - closed_at < 10
    line = access_line(proxy, request_id)
    assert line["status"] == 101 and line["tunnel_end"] in ("upstream_closed", "client_closed")
    assert line["time_taken_s"] >= 4


def _seconds_until_cut(ws, signalled: float) -> float:
    """Keep talking on a tunnel until the proxy cuts it; seconds since ``signalled``."""
    with pytest.raises(ConnectionClosed):
        while time.monotonic() - signalled < 20:
            ws.send("anyone?")
            ws.recv(timeout=10)
            time.sleep(0.25)  # the stimulus: a client that keeps talking until it is cut
    return time.monotonic() - signalled


def test_tunnel_is_cut_when_the_graceful_timeout_runs_out(make_proxy, ws_origin):
    proxy = make_proxy(origin_server=ws_origin, env={"GUNICORN_CMD_ARGS": "--graceful-timeout 3"})
    with ws_connect(proxy, "/echo") as ws:
        ws.send("before")
        assert ws.recv(timeout=10) == "before"
        proxy.signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert _chat(ws, 1.5) >= 3
        cut_after = _seconds_until_cut(ws, signalled)
    # The worker cuts one second before the 3 s deadline, so that the tunnel
    # ends through its own cleanup rather than the master's SIGKILL.
    assert 1.5 <= cut_after < 10, cut_after
    assert proxy.process.wait(20) == 0


def test_tunnel_survives_a_reload(make_proxy, ws_origin):
    proxy = make_proxy(origin_server=ws_origin)
    [old_worker] = proxy.workers()
    with ws_connect(proxy, "/echo") as ws:
        ws.send("before")
        assert ws.recv(timeout=10) == "before"
        proxy.signal(signal.SIGHUP)
        wait_for(lambda: [w for w in proxy.workers() if w != old_worker], timeout=20, what="new worker")
        # New tunnels go to the new worker while the old one keeps this one.
        with ws_connect(proxy, "/echo") as fresh:
            fresh.send("new")
            assert fresh.recv(timeout=10) == "new"
        assert _chat(ws, 2) >= 4
        assert old_worker in proxy.workers()
    wait_for(lambda: old_worker not in proxy.workers(), timeout=15, what="old worker to exit")
    assert proxy.process.poll() is None


# -- 7. the access line --------------------------------------------------------------------------


def test_access_line_counts_bytes_each_way_and_duration(raw_proxy):
    request_id = uuid.uuid4().hex
    sock, head, rest = raw_upgrade(raw_proxy.port, "/echo", extra_headers=f"X-Request-Id: {request_id}\r\n")
    with sock:
        assert head.startswith(b"HTTP/1.1 101 ") and rest == b""
        up = os.urandom(1000)
        sock.sendall(up[:400])
        assert recv_exactly(sock, 400) == up[:400]
        time.sleep(0.5)  # the stimulus: a tunnel that lasts, for the duration field
        sock.sendall(up[400:])
        assert recv_exactly(sock, 600) == up[400:]
    line = access_line(raw_proxy, request_id)
    assert line["status"] == 101
    assert line["upstream_status"] == 101
    assert line["request"] == "GET /echo HTTP/1.1"
    assert line["tunnel_bytes_up"] == 1000
    assert line["tunnel_bytes_down"] == 1000
    assert line["response_body_bytes"] == 1000
    assert line["bytes"] == 1000 + len(head) + 4
    assert line["tunnel_end"] == "client_closed"
    assert line["outcome"] == "ok"
    assert 0.5 <= line["time_taken_s"] < 10
    assert line["upstream_connect_s"] is not None


def test_access_line_of_a_websocket(ws_proxy):
    request_id = uuid.uuid4().hex
    with ws_connect(ws_proxy, "/echo", request_id, compression=None) as ws:
        ws.send(b"x" * 5000)
        assert len(ws.recv(timeout=10)) == 5000
    line = access_line(ws_proxy, request_id)
    assert line["status"] == 101
    # 5000 bytes plus framing (a client frame is masked) and the close frames.
    assert 5000 < line["tunnel_bytes_up"] < 5100
    assert 5000 < line["tunnel_bytes_down"] < 5100
    assert line["time_taken_s"] > 0


# -- 8. CONNECT, and an Upgrade that is not WebSocket ------------------------------------------------


@pytest.mark.parametrize("target", ["example.com:443", "127.0.0.1:80"])
def test_connect_is_refused_with_405(raw_proxy, raw_origin, target):
    raw_origin.reset()
    with socket.create_connection(("127.0.0.1", raw_proxy.port), timeout=10) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head, _ = read_head(sock)
    assert head.startswith(b"HTTP/1.1 405 "), head
    assert "CONNECT" not in head_headers(head)["allow"]
    assert raw_origin.requests == []


def test_any_upgrade_protocol_is_tunnelled_both_ways(raw_proxy, raw_origin):
    raw_origin.reset()
    request_id = uuid.uuid4().hex
    early = b"sent right behind the request head\n"
    sock, head, rest = raw_upgrade(
        raw_proxy.port, "/greet", extra_headers=f"X-Request-Id: {request_id}\r\n", pipelined=early, protocol="foo/2"
    )
    with sock:
        assert head.startswith(b"HTTP/1.1 101 ")
        headers = head_headers(head)
        assert headers["upgrade"] == "foo/2"
        assert headers["connection"] == "Upgrade"
        assert headers["x-origin-conn"]
        # The origin's first bytes came in the same write as its 101, and the
        # client's pipelined bytes came with the request: neither was lost.
        assert recv_exactly(sock, len(GREETING) + len(early), rest) == GREETING + early
        for size in (1, 100, 65536, 256 * 1024 + 3):
            data = os.urandom(size)
            sock.sendall(data)
            assert recv_exactly(sock, size) == data
        # Client half-close ends the tunnel; the proxy closes our side too.
        sock.shutdown(socket.SHUT_WR)
        assert wait_closed(sock) < 5
    line = access_line(raw_proxy, request_id)
    total = len(early) + 1 + 100 + 65536 + 256 * 1024 + 3
    assert line["tunnel_bytes_up"] == total
    assert line["tunnel_bytes_down"] == total + len(GREETING)


def test_http10_upgrade_is_an_ordinary_request(raw_proxy, raw_origin):
    raw_origin.reset()
    with socket.create_connection(("127.0.0.1", raw_proxy.port), timeout=10) as sock:
        sock.sendall(b"GET /old HTTP/1.0\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n")
        head, _ = read_head(sock)
    assert head.startswith(b"HTTP/1.0 200 ") or head.startswith(b"HTTP/1.1 200 "), head
    [(_, request)] = raw_origin.requests
    assert "upgrade" not in request.lower().split("\r\n", 1)[1]


def test_plain_request_with_upgrade_header_but_no_connection_token_is_not_tunnelled(raw_proxy, raw_origin):
    raw_origin.reset()
    response, body = raw_proxy.request("GET", "/h2c", headers={"Upgrade": "h2c"})
    # The origin answers "plain" only to a request without Upgrade.
    assert response.status == 200 and body == b"plain\n"


def test_tunnel_cut_at_shutdown_still_writes_its_access_line(make_proxy, ws_origin):
    """The worker cuts what still runs just before the master's graceful
    deadline (and its SIGKILL): the tunnel's greenlet is killed, and it
    still closes both sides and writes its access line."""
    proxy = make_proxy(origin_server=ws_origin, env={"GUNICORN_CMD_ARGS": "--graceful-timeout 4"})
    request_id = uuid.uuid4().hex
    with ws_connect(proxy, "/echo", request_id) as ws:
        ws.send("before")
        assert ws.recv(timeout=10) == "before"
        proxy.signal(signal.SIGTERM)
        signalled = time.monotonic()
        cut_after = _seconds_until_cut(ws, signalled)
    assert 2 <= cut_after < 4, cut_after
    assert proxy.process.wait(20) == 0
    line = access_line(proxy, request_id)
    assert line["status"] == 101 and line["tunnel_end"] == "shutdown"
    assert line["tunnel_bytes_up"] > 0 and line["tunnel_bytes_down"] > 0

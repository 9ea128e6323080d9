"""The cache at edge scale (issue 16, points 1 and 2): collapsed misses fed
from the fill while it streams, stale-while-revalidate refreshed once per
machine, stale-if-error. Real master with two workers, real origin."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from conftest import Proxy, free_port, wait_for
from origin import pattern_bytes

EDGE = "[cache]\nenabled = true\nlock_timeout = 30\n"


def cache_url(name: str, *headers: str, **options: str) -> str:
    query = [("h", h) for h in headers] + list(options.items())
    return f"/cache/{name}?{urllib.parse.urlencode(query)}"


def statuses(response) -> list[str]:
    return [v for k, v in response.getheaders() if k.lower() == "cache-status"]


def records(proxy: Proxy) -> dict[str, dict]:
    out = {}
    for line in proxy.access_log().splitlines():
        if line:
            record = json.loads(line)
            out[record["request_id"]] = record
    return out


def request_read(proxy: Proxy, conn: http.client.HTTPConnection) -> bool:
    """Whether the proxy has read everything sent on ``conn`` (its socket's
    receive queue is empty): the request is being handled."""
    client_port = conn.sock.getsockname()[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)
        if local == proxy.port and remote == client_port:
            return int(fields[4].split(":")[1], 16) == 0
    return False


def send(proxy: Proxy, path: str, request_id: str) -> http.client.HTTPConnection:
    conn = proxy.connection(timeout=60)
    conn.request("GET", path, headers={"X-Request-Id": request_id})
    return conn


def in_thread(conn: http.client.HTTPConnection) -> dict:
    """Read the answer on ``conn`` in a thread; the dict fills when done."""
    out: dict = {}

    def run() -> None:
        try:
            response = conn.getresponse()
            out["body"] = response.read()
            out["response"] = response
        except Exception as exc:
            out["error"] = exc
        out["done"] = time.monotonic()

    threading.Thread(target=run, daemon=True).start()
    return out


@pytest.fixture(scope="module")
def edge(tmp_path_factory, origin):
    tmp = tmp_path_factory.mktemp("edge")
    proxy = Proxy(tmp, origin, env={"WEB_CONCURRENCY": "2", "PROXY_CACHE_DIR": str(tmp / "cache")}, config=EDGE)
    proxy.start()
    both_workers_serving(proxy)
    yield proxy
    proxy.stop()


def both_workers_serving(proxy: Proxy) -> None:
    """Wait until each of the two workers has answered (a worker just booted
    may not accept yet, and the tests need requests in both)."""
    wait_for(lambda: len(proxy.workers()) == 2, what="two workers")
    held = []

    def two() -> bool:
        request_id = f"warm-{len(held)}"
        conn = send(proxy, "/warm", request_id)
        conn.getresponse().read()
        held.append(conn)  # held open: the next connection goes to a less busy worker
        pids = {r["worker_pid"] for i, r in records(proxy).items() if i.startswith("warm-")}
        return len(pids) == 2

    try:
        wait_for(two, what="both workers answering")
    finally:
        for conn in held:
            conn.close()


# -- collapsed misses ---------------------------------------------------------------------


def test_concurrent_misses_in_both_workers_send_one_request_and_read_while_it_streams(edge, origin):
    size = 400_000
    name = "/cache/collapse"
    path = cache_url("collapse", "Cache-Control:max-age=300", size=str(size), hold="body")
    release = origin.hold(name)
    leader = send(edge, path, "collapse-0")
    wait_for(lambda: origin.cache_count(name) == 1, what="the fill at the origin")
    first = leader.getresponse()
    started = [first.read(1000)]
    waiters = []
    for i in range(1, 7):
        conn = send(edge, path, f"collapse-{i}")
        response = conn.getresponse()
        started.append(response.read(1000))  # the origin still holds the second half of the body
        waiters.append((conn, response))
    assert not release.is_set()
    assert all(part == pattern_bytes(1000) for part in started)
    release.set()
    assert started[0] + first.read() == pattern_bytes(size)
    for conn, response in waiters:
        assert pattern_bytes(1000) + response.read() == pattern_bytes(size)
        assert response.getheader("Content-Length") == str(size)
        assert statuses(response)[0].startswith("edge-proxy; hit; ttl=")
        assert statuses(response)[0].endswith("detail=collapsed")
        conn.close()
    leader.close()
    assert origin.cache_count(name) == 1
    ids = [f"collapse-{i}" for i in range(7)]
    seen = wait_for(lambda: (r := records(edge)) and all(i in r for i in ids) and r, what="access records")
    assert seen["collapse-0"]["cache_status"] == "MISS"
    assert {seen[i]["cache_status"] for i in ids[1:]} == {"COLLAPSED"}
    assert len({seen[i]["worker_pid"] for i in ids}) == 2, "every request landed in one worker"
    response, body = edge.request("GET", path)
    assert body == pattern_bytes(size) and statuses(response)[0].startswith("edge-proxy; hit")
    assert origin.cache_count(name) == 1


def test_a_fill_cut_midway_cuts_its_readers(edge, origin):
    name = "/cache/collapse-cut"
    path = cache_url("collapse-cut", "Cache-Control:max-age=300", size="200000", hold="body", truncate="1")
    release = origin.hold(name)
    leader = send(edge, path, "cut-0")
    wait_for(lambda: origin.cache_count(name) == 1, what="the fill at the origin")
    first = leader.getresponse()
    first.read(1000)
    waiter = send(edge, path, "cut-1")
    response = waiter.getresponse()
    assert response.read(1000) == pattern_bytes(1000)
    release.set()
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        first.read()
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        response.read()
    assert origin.cache_count(name) == 1
    record = wait_for(lambda: records(edge).get("cut-1"), what="the reader's access record")
    assert record["cache_status"] == "COLLAPSED"


def test_an_uncacheable_answer_releases_the_waiters_at_once(edge, origin):
    name = "/cache/collapse-private"
    path = cache_url("collapse-private", "Cache-Control:private, max-age=300", hold="head")
    release = origin.hold(name)
    leader = in_thread(send(edge, path, "private-0"))
    wait_for(lambda: origin.cache_count(name) == 1, what="the fill at the origin")
    conn = send(edge, path, "private-1")
    wait_for(lambda: request_read(edge, conn), what="the waiter's request read")
    waiter = in_thread(conn)
    assert origin.cache_count(name) == 1  # waiting, not forwarded
    released = time.monotonic()
    release.set()
    wait_for(lambda: "done" in leader and "done" in waiter, what="both answers")
    assert waiter["done"] - released < 10, "the waiter waited for the lock timeout (30 s)"
    assert waiter["body"] == b"/cache/collapse-private #2"
    assert origin.cache_count(name) == 2


def test_a_stalled_fill_is_given_up_after_the_lock_timeout(make_proxy, tmp_path, origin):
    proxy = make_proxy(
        env={"WEB_CONCURRENCY": "2", "PROXY_CACHE_DIR": str(tmp_path / "cache")},
        config="[cache]\nenabled = true\nlock_timeout = 1\n",
    )
    name = "/cache/collapse-stall"
    path = cache_url("collapse-stall", "Cache-Control:max-age=300", hold="head")
    release = origin.hold(name)
    leader = in_thread(send(proxy, path, "stall-0"))
    wait_for(lambda: origin.cache_count(name) == 1, what="the fill at the origin")
    sent = time.monotonic()
    waiter = in_thread(send(proxy, path, "stall-1"))
    wait_for(lambda: origin.cache_count(name) == 2, what="the waiter going to the origin itself")
    assert time.monotonic() - sent >= 0.9
    release.set()
    wait_for(lambda: "done" in leader and "done" in waiter, what="both answers")
    assert waiter["response"].status == 200 and waiter["body"].startswith(b"/cache/collapse-stall #")


# -- stale-while-revalidate --------------------------------------------------------------


def test_stale_while_revalidate_serves_stale_and_refreshes_once_for_the_machine(edge, origin):
    name = "/cache/swr"
    path = cache_url("swr", "Cache-Control:max-age=50, stale-while-revalidate=600", age_first="100", hold="head")
    release = origin.hold(name)
    release.set()
    _, body = edge.request("GET", path)  # stored already stale (Age 100 > max-age 50)
    assert body == b"/cache/swr #1"
    release.clear()  # the background refresh now waits at the origin
    ids = [f"swr-{i}" for i in range(12)]
    held = []
    for request_id in ids:  # connections held open: the balancer spreads them over both workers
        conn = send(edge, path, request_id)
        response = conn.getresponse()
        assert response.read() == b"/cache/swr #1"
        assert statuses(response)[0].startswith("edge-proxy; hit; ttl=-")
        assert statuses(response)[0].endswith("detail=stale-while-revalidate")
        held.append(conn)
    wait_for(lambda: origin.cache_count(name) == 2, what="the background refresh at the origin")
    seen = wait_for(lambda: (r := records(edge)) and all(i in r for i in ids) and r, what="access records")
    assert {seen[i]["cache_status"] for i in ids} == {"STALE"}
    assert len({seen[i]["worker_pid"] for i in ids}) == 2, "every request landed in one worker"
    release.set()

    def refreshed() -> bool:
        response, body = edge.request("GET", path)
        return body == b"/cache/swr #2" and statuses(response)[0].startswith("edge-proxy; hit; ttl=")

    wait_for(refreshed, what="the refreshed entry")
    for conn in held:
        conn.close()
    assert origin.cache_count(name) == 2


# -- stale-if-error ----------------------------------------------------------------------


def test_stale_if_error_on_a_refused_next_hop(make_proxy, tmp_path, origin):
    cache_dir = str(tmp_path / "cache")
    env = {"WEB_CONCURRENCY": "2", "PROXY_CACHE_DIR": cache_dir}
    paths = {
        "sie": cache_url("sie", "Cache-Control:max-age=10, stale-if-error=600", age_first="100"),
        "sie-etag": cache_url("sie-etag", "Cache-Control:max-age=10, stale-if-error=600", age_first="100", etag='"e"'),
        "sie-none": cache_url("sie-none", "Cache-Control:max-age=10", age_first="100"),
        "sie-must": cache_url(
            "sie-must", "Cache-Control:max-age=10, stale-if-error=600, must-revalidate", age_first="100"
        ),
    }
    host = {"Host": "sie.test"}  # the key's host: the same through each proxy, whatever its port
    filler = make_proxy(env=env, config="[cache]\nenabled = true\n")
    for path in paths.values():
        response, _ = filler.request("GET", path, headers=host)
        assert "stored" in statuses(response)[0]
    filler.stop()
    refused = make_proxy(env={**env, "NEXT_HOP": f"127.0.0.1:{free_port()}"}, config="[cache]\nenabled = true\n")
    for name in ("sie", "sie-etag"):
        response, body = refused.request("GET", paths[name], headers={**host, "X-Request-Id": name})
        assert response.status == 200 and body == f"/cache/{name} #1".encode()
        member = statuses(response)[0]
        assert member.startswith("edge-proxy; fwd=stale; ttl=-") and member.endswith("detail=stale-if-error")
        assert "fwd-status" not in member
        assert wait_for(lambda name=name: records(refused).get(name))["cache_status"] == "STALE"
    for name in ("sie-none", "sie-must"):
        response, _ = refused.request("GET", paths[name], headers=host)
        assert response.status == 502
    refused.stop()
    default = make_proxy(
        env={**env, "NEXT_HOP": f"127.0.0.1:{free_port()}"},
        config="[cache]\nenabled = true\nstale_if_error = 600\n",
    )
    response, body = default.request("GET", paths["sie-none"], headers=host)
    assert response.status == 200 and body == b"/cache/sie-none #1"
    assert default.request("GET", paths["sie-must"], headers=host)[0].status == 502


def test_stale_if_error_on_a_503_answer(edge, origin):
    name = "/cache/sie-503"
    path = cache_url("sie-503", "Cache-Control:max-age=10, stale-if-error=600", age_first="100")
    edge.request("GET", path)
    origin.cache_errors[name] = 503
    try:
        response, body = edge.request("GET", path)
    finally:
        del origin.cache_errors[name]
    assert response.status == 200 and body == b"/cache/sie-503 #1"
    member = statuses(response)[0]
    assert "fwd=stale; fwd-status=503; ttl=-" in member and member.endswith("detail=stale-if-error")
    response, body = edge.request("GET", path)  # next-hop is back: the stale entry is replaced
    assert body == b"/cache/sie-503 #3"

"""Prometheus metrics on loopback (issue 13): real scrapes of a real proxy."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import free_port, raw_exchange, wait_for
from prometheus_client.parser import text_string_to_metric_families

from proxy import metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_port(proxy) -> int:
    return int(proxy.env["PROXY_METRICS_PORT"])


def get(port: int, method: str = "GET", path: str = "/metrics", host: str = "127.0.0.1"):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "pid"}
            key = (sample.name, frozenset(labels.items()))
            samples[key] = samples.get(key, 0.0) + sample.value
    return samples


def scrape(proxy) -> Samples:
    """A scrape, once the endpoint listens (the master starts it once ready)."""

    def answered():
        try:
            return get(metrics_port(proxy))
        except ConnectionRefusedError:
            return None

    response, body = wait_for(answered, what="the metrics endpoint")
    assert response.status == 200, body
    return parse(body.decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_value(proxy, name: str, expected: float, **labels: str) -> Samples:
    """Wait for the workers' next flush to bring ``name`` to ``expected``."""
    seen: list[float] = []

    def reached():
        samples = scrape(proxy)
        seen.append(value(samples, name, **labels))
        return samples if seen[-1] == expected else None

    try:
        return wait_for(reached, timeout=15, interval=0.1, what=f"{name}{labels} == {expected}")
    except AssertionError:
        raise AssertionError(f"{name}{labels}: expected {expected}, last scraped {seen[-1:]}") from None


def requests_total(samples: Samples) -> float:
    return sum(v for (name, _), v in samples.items() if name == "proxy_requests_total")


def get_n(proxy, n: int, path: str = "/") -> None:
    conn = proxy.connection()
    try:
        for _ in range(n):
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            assert response.status == 200
    finally:
        conn.close()


# -- pure logic -----------------------------------------------------------------------


class _Record:
    def __init__(self, **fields) -> None:
        self.environ = {"REQUEST_METHOD": fields.pop("method", "GET")}
        self.status = 200
        self.outcome = "ok"
        self.start_perf = time.perf_counter()
        self.upstream_status: int | None = 200
        self.first_byte_s: float | None = 0.001
        self.request_body = None
        self.body_bytes = 0
        self.tunnel_bytes_up: int | None = None
        self.__dict__.update(fields)


def test_label_values_are_bounded(monkeypatch):
    pending = metrics._Pending()
    monkeypatch.setattr(metrics, "_pending", pending)
    for record in (
        _Record(method="BREW"),  # an unknown method is "other"
        _Record(status=0, outcome="client_abort", upstream_status=None),  # no response sent
        _Record(status=403, upstream_status=None),  # the proxy refused it itself
        _Record(status=404),  # next-hop's 404 is an ordinary answer
    ):
        metrics.observe(record)
    assert pending.requests == {
        ("other", "2xx", "ok"): 1,
        ("GET", "none", "client_abort"): 1,
        ("GET", "4xx", "rejected"): 1,
        ("GET", "4xx", "ok"): 1,
    }


def test_observations_land_in_their_buckets(monkeypatch):
    pending = metrics._Pending()
    monkeypatch.setattr(metrics, "_pending", pending)
    metrics.observe(_Record(first_byte_s=0.001))  # an upper bound is in its bucket (le)
    metrics.observe(_Record(first_byte_s=100.0))
    metrics.observe(_Record(first_byte_s=None, tunnel_bytes_up=5, body_bytes=7))  # a tunnel: bytes only
    assert pending.first_byte[0] == 1 and pending.first_byte[-1] == 1 and sum(pending.first_byte) == 2
    assert sum(pending.duration) == 2
    assert (pending.tunnel_up, pending.tunnel_down, pending.response_bytes) == (5, 7, 0)


def test_per_request_cost_is_small(monkeypatch):
    """The hot path adds up in plain Python (bench/run.py measures the whole request)."""
    monkeypatch.setattr(metrics, "_pending", metrics._Pending())
    record = _Record()
    rounds = 20_000
    best = min(_timed(record, rounds) for _ in range(5))
    assert best / rounds < 20e-6, f"{best / rounds * 1e6:.1f} µs per request"


def _timed(record, rounds: int) -> float:
    started = time.perf_counter()
    for _ in range(rounds):
        metrics.observe(record)
        metrics.upstream_connection(True)
    return time.perf_counter() - started


# -- scrapes ------------------------------------------------------------------------


def test_scrape_counts_exactly_the_requests_made(make_proxy):
    proxy = make_proxy()
    get_n(proxy, 7, "/bytes/1000")
    for _ in range(2):
        response, _ = proxy.request("POST", "/", body=b"x" * 300)
        assert response.status == 200
    assert b" 405 " in raw_exchange(proxy.port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n")
    samples = wait_value(proxy, "proxy_requests_total", 7, method="GET", status="2xx", outcome="ok")
    assert value(samples, "proxy_requests_total", method="POST", status="2xx", outcome="ok") == 2
    assert value(samples, "proxy_requests_total", method="other", status="4xx", outcome="rejected") == 1
    assert requests_total(samples) == 10
    assert value(samples, "proxy_request_body_bytes_total") == 600
    assert value(samples, "proxy_response_body_bytes_total") >= 7000
    assert value(samples, "proxy_request_duration_seconds_count") == 10
    assert value(samples, "proxy_upstream_first_byte_seconds_count") == 9
    opened = value(samples, "proxy_upstream_connections_total", state="opened")
    reused = value(samples, "proxy_upstream_connections_total", state="reused")
    assert opened >= 1 and opened + reused == 9
    assert value(samples, "proxy_config_generation") == 1
    assert any(name == "proxy_build_info" for name, _ in samples)
    assert value(samples, "proxy_upstream_failures_total", kind="refused") == 0
    # Scrapes are not requests of the proxy.
    assert requests_total(scrape(proxy)) == 10


def test_refused_next_hop_counts_as_upstream_failures(make_proxy):
    proxy = make_proxy(env={"NEXT_HOP": f"127.0.0.1:{free_port()}"})  # nothing listens there
    for _ in range(3):
        response, _ = proxy.request("GET", "/")
        assert response.status == 502
    samples = wait_value(proxy, "proxy_upstream_failures_total", 3, kind="refused")
    assert value(samples, "proxy_requests_total", method="GET", status="5xx", outcome="upstream_error") == 3
    assert sum(v for (name, _), v in samples.items() if name == "proxy_upstream_failures_total") == 3
    assert value(samples, "proxy_upstream_connections_total", state="opened") == 0


def test_counters_survive_kill_9_of_a_worker_and_a_reload(make_proxy):
    proxy = make_proxy()
    get_n(proxy, 5)
    wait_value(proxy, "proxy_requests_total", 5, method="GET", status="2xx", outcome="ok")
    (worker,) = proxy.workers()
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: proxy.workers() and worker not in proxy.workers(), what="a new worker")
    samples = scrape(proxy)
    assert value(samples, "proxy_requests_total", method="GET", status="2xx", outcome="ok") == 5
    assert value(samples, "proxy_worker_restarts_total") == 1
    get_n(proxy, 3)
    wait_value(proxy, "proxy_requests_total", 8, method="GET", status="2xx", outcome="ok")
    result = proxy.hook("update")
    assert result.returncode == 0, result.stderr
    samples = scrape(proxy)
    assert value(samples, "proxy_requests_total", method="GET", status="2xx", outcome="ok") == 8
    assert value(samples, "proxy_reloads_total", result="ok") == 1
    assert value(samples, "proxy_config_generation") == 2
    # The killed one and the retired one: update.sh returns once the new
    # configuration serves, the old worker is reaped when it has finished.
    samples = wait_value(proxy, "proxy_worker_restarts_total", 2)
    assert value(samples, "proxy_requests_total", method="GET", status="2xx", outcome="ok") == 8
    get_n(proxy, 4)
    samples = wait_value(proxy, "proxy_requests_total", 12, method="GET", status="2xx", outcome="ok")
    # Live gauges: only the running worker has a series (the dead ones' were dropped).
    response, body = get(metrics_port(proxy))
    pids = {int(line.split('pid="')[1].split('"')[0]) for line in body.decode().splitlines() if 'pid="' in line}
    assert pids == set(proxy.workers())


def test_a_refused_reload_is_counted_and_changes_nothing(make_proxy):
    proxy = make_proxy()
    (proxy.config_dir / "proxy.toml").write_text("[upstream]\nconnect_timeout = -1\n")
    proxy.signal(signal.SIGHUP)
    samples = wait_value(proxy, "proxy_reloads_total", 1, result="refused")
    assert value(samples, "proxy_reloads_total", result="ok") == 0
    assert value(samples, "proxy_config_generation") == 1


def test_log_reopenings_are_counted(make_proxy):
    proxy = make_proxy()
    result = proxy.hook("messagehandler", "reopen-logs")
    assert result.returncode == 0, result.stderr
    wait_value(proxy, "proxy_log_reopens_total", 1, process="master")
    wait_value(proxy, "proxy_log_reopens_total", 1, process="worker")


def test_only_get_and_head_of_slash_metrics_answer(make_proxy):
    proxy = make_proxy()
    port = metrics_port(proxy)
    scrape(proxy)
    response, body = get(port, "HEAD")
    assert response.status == 200 and body == b""
    assert get(port, path="/metrics?name[]=proxy_requests_total")[0].status == 200
    for path in ("/", "/metrics/", "/favicon.ico", "/../metrics"):
        assert get(port, path=path)[0].status == 404, path
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH", "BREW"):
        response, _ = get(port, method)
        assert response.status == 405, method
        assert response.getheader("Allow") == "GET, HEAD"


def _non_loopback_ipv4() -> str | None:
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        address = line.split()[3].split("/")[0]
        if not address.startswith("127."):
            return address
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_the_endpoint_refuses_connections_on_other_addresses(make_proxy):
    address = _non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no IPv4 address other than loopback")
    proxy = make_proxy()
    scrape(proxy)
    assert proxy.request("GET", "/")[0].status == 200  # the public listener is there
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address, metrics_port(proxy)), timeout=5).close()


def _listening_ports(pids: list[int]) -> set[int]:
    """TCP ports that these processes listen on (from /proc)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[9]) in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_metrics_off_opens_no_port_and_writes_nothing(make_proxy):
    proxy = make_proxy(env={"PROXY_METRICS_PORT": "off"})
    get_n(proxy, 3)
    assert _listening_ports([proxy.pid, *proxy.workers()]) == {proxy.port}
    assert not (proxy.run_dir / "metrics").exists()
    result = proxy.hook("messagehandler", "metrics")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_metrics_on_listens_on_loopback_in_the_master_only(make_proxy):
    proxy = make_proxy()
    scrape(proxy)
    assert _listening_ports([proxy.pid]) == {proxy.port, metrics_port(proxy)}
    assert _listening_ports(proxy.workers()) == {proxy.port}


def test_messagehandler_prints_the_same_snapshot(make_proxy):
    proxy = make_proxy()
    get_n(proxy, 4)
    wait_value(proxy, "proxy_requests_total", 4, method="GET", status="2xx", outcome="ok")
    result = proxy.hook("messagehandler", "metrics")
    assert result.returncode == 0, result.stderr
    printed = parse(result.stdout)
    assert value(printed, "proxy_requests_total", method="GET", status="2xx", outcome="ok") == 4
    assert {name for name, _ in printed} == {name for name, _ in scrape(proxy)}


def test_messagehandler_metrics_without_a_proxy_prints_nothing(make_proxy):
    proxy = make_proxy(start=False)
    result = proxy.hook("messagehandler", "metrics")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_a_taken_port_is_an_error_line_not_an_outage(make_proxy):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proxy = make_proxy(env={"PROXY_METRICS_PORT": str(port)})
        assert proxy.request("GET", "/")[0].status == 200
        wait_for(lambda: f"cannot listen on 127.0.0.1:{port}" in proxy.error_log(), what="the error line")


# -- the cache's counters ----------------------------------------------------------------


def cache_samples(samples: Samples) -> dict[str, float]:
    return {name: v for (name, _), v in samples.items() if name.startswith("proxy_cache_")}


def test_cache_counters_in_the_scrape_only_while_the_cache_is_on(make_proxy, tmp_path, origin):
    cache_dir = tmp_path / "cache"
    proxy = make_proxy(env={"PROXY_CACHE_DIR": str(cache_dir)}, config="[cache]\nenabled = true\n")
    path = "/cache/metrics?h=Cache-Control%3Amax-age%3D300"
    bodies = {proxy.request("GET", path)[1] for _ in range(4)}  # a miss, then three hits
    assert len(bodies) == 1 and origin.cache_count("/cache/metrics") == 1
    assert proxy.hook("messagehandler", "purge", proxy.url("/cache/none")).returncode == 0
    samples = wait_value(proxy, "proxy_cache_hits_total", 3)
    stats = json.loads(proxy.hook("messagehandler", "cache-stats").stdout)
    assert stats["bytes_stored"] > 0
    assert cache_samples(samples) == {
        "proxy_cache_hits_total": 3,
        "proxy_cache_misses_total": 1,
        "proxy_cache_revalidated_total": 0,
        "proxy_cache_stale_total": 0,
        "proxy_cache_collapsed_total": 0,
        "proxy_cache_evictions_total": 0,
        "proxy_cache_purges_total": 1,
        "proxy_cache_bans_total": 0,
        "proxy_cache_entries": 1,
        "proxy_cache_stored_bytes": stats["bytes_stored"],
    }
    # messagehandler.sh metrics prints the same cache counters.
    printed = proxy.hook("messagehandler", "metrics").stdout
    assert "proxy_cache_hits_total 3.0" in printed and "proxy_cache_entries 1.0" in printed, printed
    # A reload that turns the cache off takes its metrics out of the scrape.
    (proxy.config_dir / "proxy.toml").write_text("[cache]\nenabled = false\n")
    assert proxy.hook("update").returncode == 0
    wait_for(lambda: not cache_samples(scrape(proxy)), what="no proxy_cache_ metrics")


def test_no_cache_metrics_without_the_cache(make_proxy):
    proxy = make_proxy()
    proxy.request("GET", "/cache/plain?h=Cache-Control%3Amax-age%3D300")
    samples = wait_value(proxy, "proxy_requests_total", 1, method="GET", status="2xx", outcome="ok")
    assert cache_samples(samples) == {}

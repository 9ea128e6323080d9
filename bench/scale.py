#!/usr/bin/env python3
"""``make bench-scale``: the proxy's memory and its scaling with workers.

1. Worker RSS (from /proc) while 1 GiB streams through one worker
   (WEB_CONCURRENCY=1), downloaded, then uploaded; growth over the idle RSS.
2. RSS per connection while 5,000 idle keep-alive client connections (each
   has made one request) are held open on one worker.
3. Throughput, 1 KiB GET over 50 keep-alive connections (wrk), with 1 worker
   and with N workers (default: CPUs).

Prints a table, checks the targets, writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from harness import KIB, MIB, PROXY_VENV, RESULTS, log  # noqa: E402

BLOCK = 1 << 20


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 64 MiB, 200 idle connections, 1 s wrk runs")
    p.add_argument("--stream-mib", type=int, help="MiB streamed each way (default 1024, --quick 64)")
    p.add_argument("--idle", type=int, help="idle keep-alive connections (default 5000, --quick 200)")
    p.add_argument("--duration", type=int, help="seconds per wrk run (default 10, --quick 1)")
    p.add_argument("--connections", type=int, help="wrk connections (default 50, --quick 10)")
    p.add_argument("--workers", type=int, default=harness.cpus(), help="N for the N-worker run (default: CPUs)")
    p.add_argument("--threads", type=int, default=harness.cpus(), help="wrk threads (default: CPUs)")
    p.add_argument("--proxy-python", type=Path, default=PROXY_VENV / "bin" / "python")
    p.add_argument("--no-install", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    p.add_argument("--keep-scratch", action="store_true")
    p.add_argument("--check", action="store_true", help="exit 1 if a target fails")
    args = p.parse_args(argv)
    args.stream_bytes = (args.stream_mib or (64 if args.quick else 1024)) * MIB
    args.idle = args.idle or (200 if args.quick else 5000)
    args.duration = args.duration or (1 if args.quick else 10)
    args.connections = args.connections or (10 if args.quick else 50)
    return args


# -- a raw HTTP/1.1 client (no buffering of bodies) ---------------------------------------


def read_head(sock: socket.socket) -> tuple[int, int, bytes]:
    """Read a response head; return status, Content-Length and the body bytes already read."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before the response head: {data[:200]!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    if length is None:
        raise ConnectionError(f"response without Content-Length: {head!r}")
    return status, length, rest


def read_response(sock: socket.socket, buf: memoryview | None = None) -> tuple[int, int, bytes]:
    """Read a whole response; returns status, body length, and the body's first bytes."""
    status, length, rest = read_head(sock)
    got, first = len(rest), rest[:256]
    buf = buf if buf is not None else memoryview(bytearray(BLOCK))
    while got < length:
        n = sock.recv_into(buf[: min(len(buf), length - got)])
        if not n:
            raise ConnectionError(f"body cut at {got} of {length} bytes")
        if len(first) < 256:
            first += bytes(buf[: min(n, 256 - len(first))])
        got += n
    return status, got, first


class RssSampler:
    """Samples one PID's RSS every 20 ms in a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, harness.rss_bytes(self.pid))
            self.samples += 1
            self._stop.wait(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, harness.rss_bytes(self.pid))


def steady_rss(pid: int, samples: int = 5) -> int:
    values = []
    for _ in range(samples):
        values.append(harness.rss_bytes(pid))
        time.sleep(0.1)
    return int(statistics.median(values))


def only_worker(server: harness.Server) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = server.children()
        if len(children) == 1:
            return children[0]
        time.sleep(0.1)
    raise RuntimeError(f"{server.name}: expected one worker, found {server.children()}")


# -- 1. streaming ---------------------------------------------------------------------


def _transfer(sampler, baseline: int, seconds: float, size: int) -> dict:
    """One streamed transfer's memory and speed."""
    return {
        "peak_rss": sampler.peak,
        "growth": sampler.peak - baseline,
        "seconds": seconds,
        "mb_per_s": size / seconds / 1e6,
        "samples": sampler.samples,
    }


def stream_test(services: harness.Services, size: int) -> dict:
    origin = services.stream_origin()
    proxy = services.proxy(origin, workers=1, access_log=True, name="proxy-stream")
    worker = only_worker(proxy)
    # Warm up: the code paths, the upstream pool, a few MiB each way.
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"GET /bytes/4194304 HTTP/1.1\r\nHost: bench\r\n\r\n")
            read_response(sock)
            sock.sendall(b"POST /sink HTTP/1.1\r\nHost: bench\r\nContent-Length: 4194304\r\n\r\n" + bytes(4 * MIB))
            read_response(sock)
    time.sleep(0.5)
    baseline = steady_rss(worker)
    out = {"bytes": size, "worker_pid": worker, "baseline_rss": baseline}

    log(f"streaming {size // MIB} MiB down through one worker")
    start = time.perf_counter()
    with RssSampler(worker) as sampler, socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        status, got, _ = read_response(sock)
    seconds = time.perf_counter() - start
    if status != 200 or got != size:
        raise RuntimeError(f"download through the proxy: status {status}, {got} of {size} bytes")
    out["down"] = _transfer(sampler, baseline, seconds, size)

    log(f"streaming {size // MIB} MiB up through one worker")
    zeros = memoryview(bytes(BLOCK))
    start = time.perf_counter()
    with RssSampler(worker) as sampler, socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(f"POST /sink HTTP/1.1\r\nHost: bench\r\nContent-Length: {size}\r\n\r\n".encode())
        left = size
        while left:
            step = min(left, BLOCK)
            sock.sendall(zeros[:step])
            left -= step
        status, _, body = read_response(sock)
    seconds = time.perf_counter() - start
    if status != 200 or body.strip() != str(size).encode():
        raise RuntimeError(f"upload through the proxy: status {status}, origin says {body[:100]!r}")
    out["up"] = _transfer(sampler, baseline, seconds, size)
    services.stop(proxy)
    services.stop(origin)
    return out


# -- 2. idle connections ---------------------------------------------------------------


def idle_test(services: harness.Services, origin: harness.Server, count: int) -> dict:
    proxy = services.proxy(origin, workers=1, access_log=True, name="proxy-idle")
    worker = only_worker(proxy)
    request = b"GET /1k HTTP/1.1\r\nHost: bench\r\n\r\n"
    buf = memoryview(bytearray(64 * KIB))
    # Warm up on a few connections, so the baseline has the code paths loaded.
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            for _ in range(20):
                sock.sendall(request)
                read_response(sock, buf)
    time.sleep(0.5)
    baseline = steady_rss(worker)
    log(f"opening {count} keep-alive connections, one request each, then holding them idle")
    socks = []
    start = time.perf_counter()
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", proxy.port))
            socks.append(sock)
            sock.sendall(request)
            status, got, _ = read_response(sock, buf)
            if status != 200 or got != KIB:
                raise RuntimeError(f"idle test: GET /1k gave {status}, {got} bytes")
        opened_s = time.perf_counter() - start
        time.sleep(2.0)
        held = steady_rss(worker, samples=10)
        # Still open and served by the proxy: one more request on the first and last.
        for sock in (socks[0], socks[-1]):
            sock.sendall(request)
            status, _, _ = read_response(sock, buf)
            if status != 200:
                raise RuntimeError(f"idle connection no longer served: {status}")
    finally:
        for sock in socks:
            sock.close()
    services.stop(proxy)
    return {
        "connections": count,
        "worker_pid": worker,
        "baseline_rss": baseline,
        "held_rss": held,
        "growth": held - baseline,
        "per_connection": (held - baseline) / count,
        "open_seconds": opened_s,
    }


# -- 3. throughput with 1 and N workers --------------------------------------------------


def worker_scaling(services: harness.Services, origin: harness.Server, args: argparse.Namespace) -> dict:
    out = {}
    for workers in sorted({1, args.workers}):
        proxy = services.proxy(origin, workers=workers, access_log=True, name=f"proxy-{workers}w")
        harness.wrk(f"{proxy.url}/1k", args.connections, 1, args.threads)  # warm-up
        log(f"throughput, {workers} worker(s): 1 KiB GET, {args.connections} conns, {args.duration} s")
        result = harness.wrk(f"{proxy.url}/1k", args.connections, args.duration, args.threads)
        out[str(workers)] = result
        services.stop(proxy)
    return out


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not args.no_install:
        harness.install_everything(args.proxy_python)
    harness.reexec_in_bench_venv()
    nofile = harness.raise_nofile(args.idle * 2 + 4096)
    if nofile < args.idle + 100:
        sys.exit(f"open-files limit {nofile} is too low for {args.idle} connections (raise the hard limit)")
    services = harness.Services(args.proxy_python)
    started_at = time.time()
    try:
        stream = stream_test(services, args.stream_bytes)
        origin = services.origin(workers=1)
        idle = idle_test(services, origin, args.idle)
        scaling = worker_scaling(services, origin, args)
    finally:
        services.cleanup(keep=args.keep_scratch)

    one, many = scaling["1"], scaling[str(args.workers)]
    targets = [
        (
            "stream_down_rss",
            f"RSS growth, {args.stream_bytes // MIB} MiB down (MiB)",
            stream["down"]["growth"] / MIB,
            32,
            "<",
        ),
        (
            "stream_up_rss",
            f"RSS growth, {args.stream_bytes // MIB} MiB up (MiB)",
            stream["up"]["growth"] / MIB,
            32,
            "<",
        ),
        (
            "idle_rss_per_conn",
            f"RSS per idle keep-alive connection, {args.idle} held (KiB)",
            idle["per_connection"] / KIB,
            20,
            "<",
        ),
    ]
    target_dicts = [
        {"key": k, "description": d, "value": v, "threshold": t, "op": "lt", "passed": v < t}
        for k, d, v, t, _ in targets
    ]
    data = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started_at)),
            "elapsed_s": round(time.time() - started_at, 1),
            "quick": args.quick,
            "versions": harness.versions(args.proxy_python),
        },
        "stream": stream,
        "idle": idle,
        "scaling": {
            "connections": args.connections,
            "duration_s": args.duration,
            "results": scaling,
            "speedup": many["rps"] / one["rps"] if one["rps"] else None,
        },
        "targets": target_dicts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")

    print()
    print(
        f"edge proxy scale test, {data['meta']['date']}, {harness.cpus()} CPUs"
        + ("  [QUICK SMOKE RUN: numbers are meaningless]" if args.quick else "")
    )
    print(
        f"\nOne worker, {args.stream_bytes // MIB} MiB streamed each way "
        f"(idle worker RSS {stream['baseline_rss'] / MIB:.1f} MiB):"
    )
    for way in ("down", "up"):
        s = stream[way]
        print(
            f"  {way:<5} peak RSS {s['peak_rss'] / MIB:7.1f} MiB  growth {s['growth'] / MIB:6.1f} MiB  "
            f"{s['mb_per_s']:7.1f} MB/s  ({s['samples']} samples)"
        )
    print(
        f"\nOne worker, {idle['connections']} idle keep-alive connections: RSS {idle['baseline_rss'] / MIB:.1f} -> "
        f"{idle['held_rss'] / MIB:.1f} MiB, {idle['per_connection'] / KIB:.1f} KiB per connection "
        f"(opened in {idle['open_seconds']:.1f} s)"
    )
    print(f"\nThroughput, 1 KiB GET, {args.connections} keep-alive conns, {args.duration} s:")
    for workers, r in scaling.items():
        print(
            f"  {workers:>3} worker(s): {r['rps']:9.0f} req/s  p50 {r['latency_us']['p50'] / 1000:6.2f} ms  "
            f"p99 {r['latency_us']['p99'] / 1000:6.2f} ms  errors {r['errors_total']}"
        )
    if data["scaling"]["speedup"] is not None:
        print(f"  speed-up {args.workers} workers / 1: {data['scaling']['speedup']:.2f}x")
    print("\nTargets:")
    for t in target_dicts:
        print(
            f"  {'PASS' if t['passed'] else 'FAIL'}  {t['description']:<58} {t['value']:9.2f} (need < {t['threshold']})"
        )
    print(f"results: {args.out}")
    if args.check and not all(t["passed"] for t in target_dicts):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

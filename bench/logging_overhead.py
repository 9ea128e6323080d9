"""Does logging limit the proxy's throughput? Access log on vs off, one run.

Starts an origin on loopback (nginx if installed, else a small asyncio
server in its own process), then for each round starts the proxy exactly as
the image does (``gunicorn -c gunicorn.conf.py``, one worker by default) with
``PROXY_ACCESS_LOG=off`` and then ``=on``, drives each with wrk (or a Python
keep-alive client when wrk is missing) for the same duration, and prints
requests/s side by side with the ratio on/off. The access lines written in
the "on" runs are counted against the requests the client completed.

    python bench/logging_overhead.py                   # 10 s per run, 1 round
    python bench/logging_overhead.py --duration 2      # a quick check
    python bench/logging_overhead.py --rounds 3 --format ltsv --target stdout

Run it on an otherwise idle machine: the numbers are only comparable with
each other. Standard library only; the Python running it must have the
proxy's dependencies installed (``.venv/bin/python`` after ``make test``).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BODY = b"hello from origin\n"

NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
{user}
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type text/plain; return 200 "hello from origin\\n"; }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"logging_overhead: {process.args[0]} exited with {process.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/ready")
            if conn.getresponse().status == 200:
                conn.close()
                return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"logging_overhead: nothing answers on port {port} after {timeout:g}s")


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the origin ---------------------------------------------------------------------


class _OriginProtocol(asyncio.Protocol):
    """Answers every request head with a small 200, keep-alive; no bodies expected."""

    RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) != -1:
            self.buffer = self.buffer[end + 4 :]
            self.transport.write(self.RESPONSE)


def serve_origin(port: int) -> None:
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_OriginProtocol, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def start_origin(tmp: Path, choice: str) -> tuple[subprocess.Popen, int, str]:
    port = free_port()
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if choice == "nginx" and not nginx:
        sys.exit("logging_overhead: nginx is not installed (apt-get install -y nginx), or use --origin python")
    if nginx and choice != "python":
        conf = tmp / "nginx.conf"
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, user=user))
        cmd = [nginx, "-p", str(tmp), "-c", str(conf), "-e", "stderr"]
        kind = "nginx"
    else:
        cmd = [sys.executable, __file__, "--serve-origin", str(port)]
        kind = "asyncio"
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=(tmp / "origin.err").open("wb"))
    wait_ready(port, process)
    return process, port, kind


# -- the proxy ------------------------------------------------------------------------


def start_proxy(tmp: Path, origin_port: int, access_log: str, args: argparse.Namespace):
    port = free_port()
    scratch = Path(tempfile.mkdtemp(prefix=f"proxy-{access_log}-", dir=tmp))
    env = {
        **os.environ,
        "PORT": str(port),
        "NEXT_HOP": f"127.0.0.1:{origin_port}",
        "WEB_CONCURRENCY": str(args.workers),
        "PROXY_CONFIG_DIR": str(scratch / "config"),
        "PROXY_LOG_DIR": str(scratch / "log"),
        "PROXY_RUN_DIR": str(scratch / "run"),
        "PROXY_LOG_TARGET": args.target,
        "PROXY_LOG_FORMAT": args.format,
        "PROXY_ACCESS_LOG": access_log,
    }
    (scratch / "config").mkdir()
    cmd = [args.python, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}"]
    stdout = (scratch / "stdout.log").open("wb")
    stderr = (scratch / "stderr.log").open("wb")
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
    wait_ready(port, process)
    access = scratch / "stdout.log" if args.target == "stdout" else scratch / "log" / "access.log"
    return process, port, access


# -- the client -----------------------------------------------------------------------------


def run_wrk(port: int, seconds: float, connections: int) -> tuple[float, int, int]:
    """(requests/s, requests completed, errors) from wrk."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", f"http://127.0.0.1:{port}/bench"],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rate or not total:
        sys.exit(f"logging_overhead: cannot read wrk's output:\n{out}")
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return float(rate.group(1)), int(total.group(1)), errors


def run_python_client(port: int, seconds: float, connections: int) -> tuple[float, int, int]:
    """The same measurement without wrk: keep-alive clients in threads."""
    counts = [0] * connections
    errors = [0] * connections
    deadline = time.monotonic() + seconds

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() < deadline:
            try:
                conn.request("GET", "/bench")
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    counts[n] += 1
                else:
                    errors[n] += 1
            except (OSError, http.client.HTTPException):
                errors[n] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.close()

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    elapsed = time.monotonic() - started
    return sum(counts) / elapsed, sum(counts) + sum(errors), sum(errors)


def count_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per run (default 10)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each measurement (default 1)")
    p.add_argument("--rounds", type=int, default=1, help="off/on pairs, alternated (default 1)")
    p.add_argument("--connections", type=int, default=16, help="client connections (default 16)")
    p.add_argument("--workers", type=int, default=1, help="WEB_CONCURRENCY (default 1)")
    p.add_argument("--format", choices=("json", "ltsv"), default="json", help="PROXY_LOG_FORMAT (default json)")
    p.add_argument("--target", choices=("file", "stdout"), default="file", help="PROXY_LOG_TARGET (default file)")
    p.add_argument("--client", choices=("auto", "wrk", "python"), default="auto", help="load generator")
    p.add_argument("--origin", choices=("auto", "nginx", "python"), default="auto", help="origin server")
    p.add_argument("--python", default=sys.executable, help="the Python that runs the proxy (default: this one)")
    p.add_argument("--serve-origin", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.serve_origin:
        serve_origin(args.serve_origin)
        return 0
    use_wrk = args.client == "wrk" or (args.client == "auto" and shutil.which("wrk"))
    if args.client == "wrk" and not shutil.which("wrk"):
        sys.exit("logging_overhead: wrk is not installed (apt-get install -y wrk), or use --client python")
    measure = run_wrk if use_wrk else run_python_client
    client = "wrk" if use_wrk else "python"
    results: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="logging-overhead-") as scratch:
        tmp = Path(scratch)
        origin, origin_port, origin_kind = start_origin(tmp, args.origin)
        try:
            for round_ in range(1, args.rounds + 1):
                for mode in ("off", "on"):
                    proxy, port, access = start_proxy(tmp, origin_port, mode, args)
                    try:
                        if args.warmup > 0:
                            measure(port, args.warmup, args.connections)
                        lines_before = count_lines(access)
                        rate, completed, errors = measure(port, args.duration, args.connections)
                    finally:
                        stop(proxy)
                    lines = count_lines(access) - lines_before
                    results[mode].append(rate)
                    note = f", {lines} access lines for {completed} requests" if mode == "on" else ""
                    print(
                        f"round {round_} access log {mode:3}: {rate:9.1f} req/s ({errors} errors{note})",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            stop(origin, signal.SIGQUIT if origin_kind == "nginx" else signal.SIGTERM)
    off, on = statistics.median(results["off"]), statistics.median(results["on"])
    print(
        f"\nproxy: {args.workers} worker(s), {args.target} target, {args.format}; origin: {origin_kind}; "
        f"client: {client}, {args.connections} connections, {args.duration:g} s per run, {args.rounds} round(s)"
    )
    print(f"{'access log':<12}{'req/s (median)':>16}   runs")
    for mode, median in (("off", off), ("on", on)):
        runs = ", ".join(f"{r:.0f}" for r in results[mode])
        print(f"{mode:<12}{median:>16.1f}   {runs}")
    print(f"ratio on/off: {on / off:.3f}  (logging costs {100 * (1 - on / off):.1f}% of throughput)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

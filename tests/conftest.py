"""Fixtures: a real origin in threads and the real proxy under Gunicorn."""

from __future__ import annotations

import http.client
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from origin import Origin, Received

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ROOT / "hooks"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fixed_port() -> int:
    """A free port below the kernel's ephemeral range: unlike one from
    ``free_port``, no later ``free_port`` call can hand it out again (a test's
    "nothing listens there" next-hop must not turn out to be this one)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(10000, low), 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def forwarded_before_marker(proxy: Proxy, origin: Origin, headers: dict | None = None) -> list[Received]:
    """What ``origin`` received before a marker request sent through ``proxy`` now.

    The bound of a check that something was NOT forwarded: rather than wait
    a while and look, send a marker after the request that must not pass and
    wait for the marker at the origin. The test proxies run one worker with
    one pool, so a forward of the earlier request would be on its way (and
    recorded, as the origin records a request before it answers) by the time
    the marker's answer comes back. ``headers`` get the marker past rules
    that would answer it in the proxy (access control, HTTPS redirect).
    """
    marker = f"/.marker/{uuid.uuid4().hex}"
    response, _ = proxy.request("GET", marker, headers=headers)
    assert response.status == 200, f"marker request answered {response.status}"

    def position() -> int | None:
        targets = [r.target for r in origin.requests]
        return targets.index(marker) + 1 if marker in targets else None

    return origin.requests[: wait_for(position, timeout=10, what=f"marker {marker} at the origin") - 1]


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, return everything the proxy sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (Gunicorn's workers), from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry.name))
    return sorted(out)


def pipes(pid: int) -> set[str]:
    """The pipes a process holds open, one entry per pipe (``pipe:[INODE]``,
    whichever of its ends): splice(2) moves bytes through one."""
    links = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            links.add(os.readlink(fd))
        except OSError:
            continue
    return {link for link in links if link.startswith("pipe:")}


def socket_inode(local_port: int, remote_port: int) -> int | None:
    """The inode of the TCP socket with these local and remote ports (IPv4)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == remote_port:
            return int(fields[9])
    return None


TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT"}
TCP_STATES |= {7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}


def tcp_states(remote_port: int) -> list[str]:
    """The states of the IPv4 TCP sockets connected to ``remote_port`` (from
    /proc/net/tcp): ``CLOSE_WAIT`` says the peer's FIN has arrived."""
    states = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == remote_port:
            states.append(TCP_STATES.get(int(fields[3], 16), fields[3]))
    return states


def socket_owner(pids: list[int], inode: int) -> int | None:
    """Which of ``pids`` holds the socket with this inode."""
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    if os.readlink(fd) == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Proxy:
    """One Gunicorn master started exactly as the image starts it."""

    def __init__(
        self,
        tmp: Path,
        origin: Origin,
        env: dict[str, str] | None = None,
        config: str | None = None,
        files: dict[str, str] | None = None,
    ) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.config_dir = tmp / "proxy_config"
        self.log_dir = tmp / "log"
        self.run_dir = tmp / "run"
        self.config_dir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            (self.config_dir / "proxy.toml").write_text(config)
        for name, text in (files or {}).items():
            (self.config_dir / name).write_text(text)
        self.env = {
            **os.environ,
            "PORT": str(self.port),
            "NEXT_HOP": origin.address,
            "WEB_CONCURRENCY": "1",
            "PROXY_CONFIG_DIR": str(self.config_dir),
            "PROXY_LOG_DIR": str(self.log_dir),
            "PROXY_RUN_DIR": str(self.run_dir),
            "PROXY_LOG_TARGET": "file",
            "PROXY_LOG_FORMAT": "json",
            "PROXY_PYTHON": sys.executable,
            "PROXY_METRICS_PORT": str(fixed_port()),
            **(env or {}),
        }
        self.stdout_path = tmp / "stdout.txt"
        self.stderr_path = tmp / "stderr.txt"
        self.process: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> Proxy:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
            cwd=ROOT,
            env=self.env,
            stdout=self.stdout_path.open("wb"),
            stderr=self.stderr_path.open("wb"),
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"proxy exited {self.process.returncode}: {self.stderr()}")
            if not self.pidfile.exists() or not self.workers():
                return False
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_for(ready, what="proxy to listen")

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "gunicorn.pid"

    @property
    def pid(self) -> int:
        return self.process.pid

    def workers(self) -> list[int]:
        return children(self.pid)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def connection(self, timeout: float = 10) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(
        self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 10
    ) -> tuple[http.client.HTTPResponse, bytes]:
        conn = self.connection(timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response, response.read()
        finally:
            conn.close()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def error_log(self) -> str:
        path = self.log_dir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self) -> str:
        path = self.log_dir / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def hook(
        self, name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        """Run hooks/NAME.sh the way the platform runs /opt/section/NAME.sh."""
        return subprocess.run(
            ["bash", str(HOOKS / f"{name}.sh"), *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, timeout: float = 40) -> int:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode if self.process else 0


@pytest.fixture(scope="session")
def origin():
    server = Origin().start()
    yield server
    server.stop()


@pytest.fixture
def make_proxy(tmp_path, origin):
    """Start proxies with their own env and configuration; all stopped after."""
    started: list[Proxy] = []

    def make(
        env: dict[str, str] | None = None,
        config: str | None = None,
        files: dict[str, str] | None = None,
        start: bool = True,
        origin_server: Origin | None = None,
        name: str = "proxy",
    ) -> Proxy:
        proxy = Proxy(tmp_path / f"{name}{len(started)}", origin_server or origin, env, config, files)
        started.append(proxy)
        return proxy.start() if start else proxy

    yield make
    for proxy in started:
        proxy.stop()


@pytest.fixture(scope="module")
def shared_proxy(tmp_path_factory, origin):
    """One plain pass-through proxy for the tests that don't change it."""
    proxy = Proxy(tmp_path_factory.mktemp("shared"), origin).start()
    yield proxy
    proxy.stop()

"""Shared machinery of ``run.py`` and ``scale.py``: installing the tools,
starting the servers on loopback, driving wrk, and cleaning up.

Standard library only until ``reexec_in_bench_venv`` has run (the bench venv
adds matplotlib for the chart and WSGIProxy2 for the comparison).
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
BENCH_VENV = BENCH / ".venv"
BENCH_PY = BENCH_VENV / "bin" / "python"
PROXY_VENV = ROOT / ".venv"
WRK_LUA = BENCH / "wrk.lua"

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

#: Files the origin serves (name: size); ``/upload`` accepts POSTs.
FILES = {"1k": KIB, "64k": 64 * KIB, "1m": MIB}
UPLOAD_BYTES = MIB


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# -- installing -------------------------------------------------------------------


def _run(cmd: list[str], **kwargs) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, **kwargs)


def ensure_apt_tools() -> None:
    """nginx and wrk from Debian's packages."""
    missing = [pkg for pkg in ("nginx", "wrk") if shutil.which(pkg) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        sys.exit(f"bench: {', '.join(missing)} not installed; run: sudo apt-get install -y {' '.join(missing)}")
    had_default_nginx = Path("/run/nginx.pid").exists()
    _run(["apt-get", "update", "-qq"])
    _run(["apt-get", "install", "-y", "-qq", *missing], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    # Where no policy-rc.d forbids it, Debian's package starts its default
    # site on port 80 at install time; stop the one we just caused.
    if "nginx" in missing and not had_default_nginx and Path("/run/nginx.pid").exists():
        subprocess.run(["nginx", "-s", "quit"], check=False)


def ensure_node_modules() -> None:
    """Node's http-proxy, exactly as package-lock.json pins it."""
    if (BENCH / "node_modules" / "http-proxy" / "package.json").exists():
        return
    if shutil.which("npm") is None:
        sys.exit("bench: Node.js and npm are needed (apt-get install -y nodejs npm)")
    _run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=BENCH)


def ensure_bench_venv() -> None:
    """bench/.venv: WSGIProxy2, Gunicorn + gevent (the proxy's versions), matplotlib."""
    stamp = BENCH_VENV / ".installed"
    lock = BENCH / "requirements-lock.txt"
    if stamp.exists() and stamp.stat().st_mtime >= lock.stat().st_mtime:
        return
    _run([sys.executable, "-m", "venv", str(BENCH_VENV)])
    _run([str(BENCH_PY), "-m", "pip", "install", "--quiet", "--require-hashes", "-r", str(lock)])
    stamp.touch()


def ensure_proxy_venv(python: Path) -> None:
    """The proxy's own venv, from its lock files (the Makefile's rule)."""
    if python.exists():
        return
    if python != PROXY_VENV / "bin" / "python":
        sys.exit(f"bench: --proxy-python {python} does not exist")
    _run(["make", "-C", str(ROOT), ".venv/.installed"])


def install_everything(proxy_python: Path) -> None:
    ensure_apt_tools()
    ensure_node_modules()
    ensure_bench_venv()
    ensure_proxy_venv(proxy_python)


def reexec_in_bench_venv() -> None:
    """Run the rest of the script with the bench venv's Python."""
    if Path(sys.prefix).resolve() != BENCH_VENV.resolve():
        os.execv(str(BENCH_PY), [str(BENCH_PY), *sys.argv])


# -- processes --------------------------------------------------------------------


def raise_nofile(want: int = 65536) -> int:
    """Raise this process's (and so its children's) open-files limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _nofile() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen
    stop_signal: int = signal.SIGTERM
    logs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def children(self) -> list[int]:
        """PIDs of the direct children (Gunicorn's or nginx's workers)."""
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split()]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


_NGINX_ORIGIN = """\
{user}
worker_processes {workers};
daemon off;
master_process on;
pid {tmp}/origin.pid;
error_log {tmp}/origin-error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections 20000; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 75s;
    keepalive_requests 100000000;
    client_body_temp_path {tmp}/origin-body;
    proxy_temp_path {tmp}/origin-proxy;
    fastcgi_temp_path {tmp}/origin-fastcgi;
    uwsgi_temp_path {tmp}/origin-uwsgi;
    scgi_temp_path {tmp}/origin-scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {www};
        location / {{ }}
        # 1 MiB POSTs: the mirror module reads the whole body (into memory:
        # buffer size > body) before the content phase; the static module
        # then refuses POST with 405, turned into "200 ok". So the answer
        # leaves only after the last body byte arrived.
        location = /upload {{
            client_max_body_size 2m;
            client_body_buffer_size 2m;
            mirror /_sink;
            mirror_request_body on;
            error_page 405 =200 @ok;
        }}
        location = /_sink {{ internal; return 204; }}
        location @ok {{ return 200 "ok\\n"; }}
    }}
}}
"""

_NGINX_PROXY = """\
{user}
worker_processes 1;
daemon off;
master_process on;
pid {tmp}/nginx-proxy.pid;
error_log {tmp}/nginx-proxy-error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections 20000; }}
http {{
    access_log {tmp}/nginx-proxy-access.log;
    keepalive_timeout 75s;
    keepalive_requests 100000000;
    client_body_temp_path {tmp}/nginx-proxy-body;
    proxy_temp_path {tmp}/nginx-proxy-proxy;
    fastcgi_temp_path {tmp}/nginx-proxy-fastcgi;
    uwsgi_temp_path {tmp}/nginx-proxy-uwsgi;
    scgi_temp_path {tmp}/nginx-proxy-scgi;
    upstream next_hop {{
        server 127.0.0.1:{origin};
        keepalive 1024;
        keepalive_requests 100000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        client_max_body_size 0;
        location / {{
            proxy_pass http://next_hop;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            # Stream request bodies like the proxy under test does.
            proxy_request_buffering off;
        }}
    }}
}}
"""


class Services:
    """Starts servers in a scratch directory; stops them all on exit."""

    def __init__(self, proxy_python: Path) -> None:
        self.proxy_python = proxy_python
        self.tmp = Path(tempfile.mkdtemp(prefix="edge-proxy-bench-"))
        self.servers: list[Server] = []
        atexit.register(self.stop_all)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.stop_all()
        sys.exit(128 + signum)

    def _user_line(self) -> str:
        # nginx's workers drop to "nobody" when started as root; the scratch
        # directory is root's own, so keep them root (loopback-only, throwaway).
        return "user root;" if os.geteuid() == 0 else ""

    def _spawn(self, name: str, port: int, cmd: list[str], stop_signal=signal.SIGTERM, **kwargs) -> Server:
        out = self.tmp / f"{name}.out"
        handle = out.open("wb")
        proc = subprocess.Popen(
            cmd, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, **kwargs
        )
        handle.close()
        server = Server(name, port, proc, stop_signal, [out])
        self.servers.append(server)
        return server

    def stop(self, server: Server) -> None:
        proc = server.proc
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, server.stop_signal)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if server in self.servers:
            self.servers.remove(server)

    def stop_all(self) -> None:
        for server in list(self.servers):
            self.stop(server)

    def cleanup(self, keep: bool = False) -> None:
        self.stop_all()
        if keep:
            log(f"scratch directory kept: {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the servers ----------------------------------------------------------------

    def origin(self, workers: int = 1, big_file: int | None = None) -> Server:
        www = self.tmp / "www"
        www.mkdir(exist_ok=True)
        for name, size in FILES.items():
            (www / name).write_bytes(os.urandom(size))
        (www / "upload").write_bytes(b"")  # the static module must find a file to refuse POST
        if big_file:
            with (www / "big").open("wb") as f:  # sparse: no disk used
                f.truncate(big_file)
        port = free_port()
        conf = self.tmp / "origin.conf"
        conf.write_text(
            _NGINX_ORIGIN.format(
                user=self._user_line(), nofile=_nofile(), workers=workers, tmp=self.tmp, www=www, port=port
            )
        )
        server = self._spawn("origin", port, ["nginx", "-p", str(self.tmp), "-c", str(conf), "-e", "stderr"])
        self.wait_ready(server)
        return server

    def stream_origin(self) -> Server:
        """The stdlib origin of ``stream_origin.py`` (unbounded bodies both ways)."""
        port = free_port()
        server = self._spawn("stream-origin", port, [sys.executable, str(BENCH / "stream_origin.py"), str(port)])
        self.wait_ready(server)
        return server

    def proxy(self, origin: Server, workers: int, access_log: bool = True, name: str = "proxy") -> Server:
        """The proxy under test, exactly as the image starts it (only the bind
        address is narrowed to loopback on the command line)."""
        port = free_port()
        scratch = self.tmp / name
        (scratch / "config").mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PORT": str(port),
            "NEXT_HOP": f"127.0.0.1:{origin.port}",
            "WEB_CONCURRENCY": str(workers),
            "PROXY_CONFIG_DIR": str(scratch / "config"),
            "PROXY_LOG_DIR": str(scratch / "log"),
            "PROXY_RUN_DIR": str(scratch / "run"),
            "PROXY_LOG_TARGET": "file",
            "PROXY_LOG_FORMAT": "json",
            "PROXY_ACCESS_LOG": "on" if access_log else "off",
        }
        cmd = [str(self.proxy_python), "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}"]
        server = self._spawn(name, port, cmd, signal.SIGTERM, cwd=ROOT, env=env)
        server.logs += [scratch / "log" / "error.log"]
        self.wait_ready(server)
        return server

    def nginx_proxy(self, origin: Server) -> Server:
        port = free_port()
        conf = self.tmp / "nginx-proxy.conf"
        conf.write_text(
            _NGINX_PROXY.format(user=self._user_line(), nofile=_nofile(), tmp=self.tmp, port=port, origin=origin.port)
        )
        server = self._spawn("nginx", port, ["nginx", "-p", str(self.tmp), "-c", str(conf), "-e", "stderr"])
        self.wait_ready(server)
        return server

    def node_proxy(self, origin: Server) -> Server:
        port = free_port()
        cmd = ["node", str(BENCH / "node_proxy.js"), str(port), f"http://127.0.0.1:{origin.port}"]
        server = self._spawn("node", port, cmd, cwd=BENCH)
        self.wait_ready(server)
        return server

    def wsgiproxy(self, origin: Server, workers: int) -> Server:
        # Same Gunicorn knobs as the proxy's gunicorn.conf.py.
        sys.path.insert(0, str(ROOT))
        from proxy import settings as proxy_settings

        port = free_port()
        env = {
            **os.environ,
            "BENCH_NEXT_HOP": f"127.0.0.1:{origin.port}",
            "BENCH_PORT": str(port),
            "BENCH_WORKERS": str(workers),
            "BENCH_WORKER_CONNECTIONS": str(proxy_settings.WORKER_CONNECTIONS),
            "BENCH_KEEPALIVE": str(proxy_settings.from_environ({}).keepalive_timeout),
        }
        cmd = [str(BENCH_PY), "-m", "gunicorn", "-c", str(BENCH / "wsgiproxy_conf.py")]
        server = self._spawn("wsgiproxy2", port, cmd, signal.SIGTERM, cwd=BENCH, env=env)
        self.wait_ready(server)
        return server

    def wait_ready(self, server: Server, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                break
            try:
                status, body = http_get(server.port, "/1k")
                if status == 200 and len(body) == KIB:
                    return
                last = RuntimeError(f"GET /1k answered {status} with {len(body)} bytes")
            except OSError as exc:
                last = exc
            time.sleep(0.2)
        tail = ""
        for path in server.logs:
            if path.exists():
                tail += f"\n--- {path.name} ---\n" + path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{server.name} did not become ready on port {server.port}: {last!r}{tail}")


# -- HTTP checks ---------------------------------------------------------------------


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def http_post(port: int, path: str, body: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def sanity_check(server: Server) -> None:
    """Every scenario's request gives the right answer through this server."""
    for name, size in FILES.items():
        status, body = http_get(server.port, f"/{name}")
        if status != 200 or len(body) != size:
            raise RuntimeError(f"{server.name}: GET /{name} gave {status}, {len(body)} bytes (want 200, {size})")
    status, body = http_post(server.port, "/upload", b"u" * UPLOAD_BYTES)
    if status != 200:
        raise RuntimeError(f"{server.name}: POST /upload (1 MiB) gave {status}: {body[:200]!r}")


# -- wrk -------------------------------------------------------------------------------


def wrk(
    url: str,
    connections: int,
    duration: float,
    threads: int,
    headers: list[str] = (),
    post_bytes: int | None = None,
    timeout_s: int = 10,
) -> dict:
    """One wrk run; returns the numbers wrk.lua's done() printed, plus rates."""
    threads = max(1, min(threads, connections))
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s"]
    cmd += ["--timeout", f"{timeout_s}s", "-s", str(WRK_LUA)]
    for header in headers:
        cmd += ["-H", header]
    cmd.append(url)
    env = {**os.environ}
    if post_bytes:
        env["BENCH_POST_BYTES"] = str(post_bytes)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration + 60)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result = json.loads(line[len("BENCH_RESULT ") :])
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    seconds = result["duration_us"] / 1e6
    errors = result["errors"]
    result["errors_total"] = sum(errors.values())
    result["rps"] = result["requests"] / seconds if seconds else 0.0
    result["mb_per_s_down"] = result["bytes"] / seconds / 1e6 if seconds else 0.0
    result["mb_per_s_up"] = result["requests"] * (post_bytes or 0) / seconds / 1e6 if seconds else 0.0
    result["command"] = " ".join(cmd)
    return result


def versions(proxy_python: Path) -> dict:
    def out(cmd: list[str]) -> str:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except OSError as exc:
            return f"unavailable: {exc}"
        return (proc.stdout + proc.stderr).strip().splitlines()[0] if (proc.stdout + proc.stderr).strip() else ""

    node_pkg = BENCH / "node_modules" / "http-proxy" / "package.json"
    return {
        "nginx": out(["nginx", "-v"]),
        "wrk": out(["wrk", "-v"]),
        "node": out(["node", "--version"]),
        "http-proxy": json.loads(node_pkg.read_text())["version"] if node_pkg.exists() else None,
        "proxy_python": out([str(proxy_python), "--version"]),
        "proxy_gunicorn": out([str(proxy_python), "-m", "gunicorn", "--version"]),
        "wsgiproxy2": out([str(BENCH_PY), "-c", "import importlib.metadata as m; print(m.version('WSGIProxy2'))"]),
        "kernel": os.uname().release,
        "cpus": cpus(),
    }

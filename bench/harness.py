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
#: The interpreter the image runs: Debian's python3 (bookworm's CPython 3.11,
#: built by Debian with profile-guided and link-time optimisation). Both
#: Python proxies are measured under it, in venvs of the bench's own; a
#: python3 built without those (pyenv's, say) costs about 22% more CPU a
#: request (README.md, "What each lever gave").
SHIPPED_PYTHON = Path("/usr/bin/python3")
#: The proxy's venv for the bench: its runtime lock, under SHIPPED_PYTHON.
PROXY_VENV = BENCH / ".proxy-venv"
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


# -- the machine and CPU pinning ----------------------------------------------------


def parse_cpu_list(text: str) -> frozenset[int]:
    """``0-2,5`` (the kernel's CPU list format) -> {0, 1, 2, 5}."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        out.update(range(int(low), int(high or low) + 1))
    return frozenset(out)


def format_cpu_list(cpus_: frozenset[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus_))


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    for key in ("model name", "Model", "Hardware", "cpu model"):
        for line in text.splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == key and value.strip():
                return value.strip()
    return "unknown"


def machine() -> dict:
    """What the table was measured on."""
    return {
        "cpu_model": cpu_model(),
        "kernel": f"{os.uname().sysname} {os.uname().release}",
        "cpus_online": os.cpu_count(),
        "cpus_allowed": format_cpu_list(frozenset(os.sched_getaffinity(0))),
    }


@dataclass(frozen=True)
class PerCoreLayout:
    """Which CPU the proxies get and which one wrk and the origin share."""

    proxy_cpu: int
    load_cpu: int
    #: The two CPUs are hyper-threads of one core (no other choice here).
    smt_siblings: bool

    @property
    def proxy_cpus(self) -> frozenset[int]:
        return frozenset({self.proxy_cpu})

    @property
    def load_cpus(self) -> frozenset[int]:
        return frozenset({self.load_cpu})


def _thread_siblings(cpu: int) -> frozenset[int]:
    path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
    try:
        return parse_cpu_list(path.read_text())
    except (OSError, ValueError):
        return frozenset({cpu})


def per_core_layout() -> PerCoreLayout | None:
    """The last allowed CPU for the proxies; for the load, the first allowed
    CPU that is not a hyper-thread sibling of it (a sibling only if nothing
    else is allowed). None with fewer than 2 CPUs."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None
    proxy_cpu = allowed[-1]
    siblings = _thread_siblings(proxy_cpu)
    others = [cpu for cpu in allowed if cpu not in siblings]
    if others:
        return PerCoreLayout(proxy_cpu, others[0], smt_siblings=False)
    return PerCoreLayout(proxy_cpu, allowed[0], smt_siblings=True)


def _pin(cpus_: frozenset[int] | None):
    """A ``preexec_fn`` pinning the child before it execs: everything it
    forks later (Gunicorn's and nginx's workers, Node's threads) inherits."""
    if cpus_ is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus_)


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents first."""
    out = [pid]
    for task in _tasks(pid):
        try:
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
        except OSError:
            continue
        for child in text.split():
            out += process_tree(int(child))
    return out


def _tasks(pid: int) -> list[int]:
    try:
        return sorted(int(name) for name in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return []


def cpus_allowed(pid: int) -> str:
    """``Cpus_allowed_list`` of every thread of ``pid``, distinct values
    joined by ``/`` (one value when all threads agree)."""
    seen: list[str] = []
    for task in _tasks(pid) or [pid]:
        try:
            status = Path(f"/proc/{pid}/task/{task}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                value = line.split(":", 1)[1].strip()
                if value not in seen:
                    seen.append(value)
    return "/".join(seen) or "?"


def pinning(server: Server) -> list[dict]:
    """What the kernel says each process of ``server`` may run on."""
    out = []
    for pid in process_tree(server.proc.pid):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        out.append({"pid": pid, "process": comm, "cpus_allowed": cpus_allowed(pid)})
    return out


def check_pinning(name: str, processes: list[dict], want: frozenset[int]) -> None:
    """Raise unless every thread of every process in ``processes`` (from
    ``pinning``) may run on exactly ``want``."""
    for process in processes:
        try:
            got = {parse_cpu_list(value) for value in process["cpus_allowed"].split("/")}
        except ValueError:
            got = set()
        if got != {want}:
            raise RuntimeError(f"{name}: {process} is not pinned to CPU {format_cpu_list(want)}")


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process ``pid`` (all its threads), from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is the state (field 3 of proc(5)): utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


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


def venv_python() -> str:
    """What the bench's venvs are made with: the image's interpreter where
    this machine has it, else this one (with a warning: the numbers are then
    not those of the image)."""
    if SHIPPED_PYTHON.exists():
        return str(SHIPPED_PYTHON)
    log(f"{SHIPPED_PYTHON} (the image's interpreter) is missing: the Python proxies run under {sys.executable}")
    return sys.executable


def _ensure_venv(venv: Path, lock: Path) -> None:
    """``venv`` made by ``venv_python()`` and filled from ``lock``; made
    again when either changed (the stamp names the interpreter)."""
    stamp = venv / ".installed"
    python = venv_python()
    if stamp.exists() and stamp.stat().st_mtime >= lock.stat().st_mtime and stamp.read_text() == python:
        return
    _run([python, "-m", "venv", "--clear", str(venv)])
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--require-hashes", "-r", str(lock)])
    stamp.write_text(python)


def ensure_bench_venv() -> None:
    """bench/.venv: WSGIProxy2, Gunicorn + gevent (the proxy's versions), matplotlib."""
    _ensure_venv(BENCH_VENV, BENCH / "requirements-lock.txt")


def ensure_proxy_venv(python: Path) -> None:
    """The proxy's venv: its runtime lock file, as the image installs it."""
    if python == PROXY_VENV / "bin" / "python":
        _ensure_venv(PROXY_VENV, ROOT / "requirements-lock.txt")
    elif not python.exists():
        sys.exit(f"bench: --proxy-python {python} does not exist")


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

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: the workers, or the process
        itself where it has none (Node)."""
        return self.children() or [self.proc.pid]


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
        # The cache scenarios' objects: the same files, cacheable for an hour.
        location /cached/ {{ alias {www}/; expires 1h; }}
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
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections 20000; }}
http {{
    access_log {tmp}/{name}-access.log;
    {cache_path}
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
            proxy_buffering {buffering};
            {cache}
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

    def _spawn(
        self,
        name: str,
        port: int,
        cmd: list[str],
        stop_signal=signal.SIGTERM,
        cpus: frozenset[int] | None = None,
        **kwargs,
    ) -> Server:
        out = self.tmp / f"{name}.out"
        handle = out.open("wb")
        proc = subprocess.Popen(
            cmd,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_pin(cpus),
            **kwargs,
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

    def origin(self, workers: int = 1, big_file: int | None = None, cpus: frozenset[int] | None = None) -> Server:
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
        server = self._spawn("origin", port, ["nginx", "-p", str(self.tmp), "-c", str(conf), "-e", "stderr"], cpus=cpus)
        self.wait_ready(server)
        return server

    def stream_origin(self) -> Server:
        """The stdlib origin of ``stream_origin.py`` (unbounded bodies both ways)."""
        port = free_port()
        server = self._spawn("stream-origin", port, [sys.executable, str(BENCH / "stream_origin.py"), str(port)])
        self.wait_ready(server)
        return server

    def proxy(
        self,
        origin: Server,
        workers: int,
        access_log: bool = True,
        name: str = "proxy",
        cpus: frozenset[int] | None = None,
        cache: bool = False,
        next_hop: Server | None = None,
        metrics: bool = True,
    ) -> Server:
        """The proxy under test, exactly as the image starts it (only the bind
        address is narrowed to loopback on the command line)."""
        port = free_port()
        scratch = self.tmp / name
        (scratch / "config").mkdir(parents=True, exist_ok=True)
        if cache:
            (scratch / "config" / "proxy.toml").write_text("[cache]\nenabled = true\n")
        env = {
            **os.environ,
            "PORT": str(port),
            "NEXT_HOP": f"127.0.0.1:{(next_hop or origin).port}",
            "WEB_CONCURRENCY": str(workers),
            "PROXY_CONFIG_DIR": str(scratch / "config"),
            "PROXY_LOG_DIR": str(scratch / "log"),
            "PROXY_RUN_DIR": str(scratch / "run"),
            "PROXY_LOG_TARGET": "file",
            "PROXY_LOG_FORMAT": "json",
            "PROXY_ACCESS_LOG": "on" if access_log else "off",
            "PROXY_CACHE_DIR": str(scratch / "cache"),
            "PROXY_METRICS_PORT": str(free_port()) if metrics else "off",
        }
        cmd = [str(self.proxy_python), "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}"]
        server = self._spawn(name, port, cmd, signal.SIGTERM, cpus=cpus, cwd=ROOT, env=env)
        server.logs += [scratch / "log" / "error.log"]
        self.wait_ready(server)
        return server

    def nginx_proxy(
        self,
        origin: Server,
        response_buffering: bool = True,
        cpus: frozenset[int] | None = None,
        cache: bool = False,
        name: str = "nginx",
    ) -> Server:
        """nginx as a proxy, one worker; ``response_buffering=False`` streams
        answers too (``proxy_buffering off``), as the proxy under test does;
        ``cache``: with ``proxy_cache`` (files on disk, sendfile on)."""
        port = free_port()
        conf = self.tmp / f"{name}.conf"
        conf.write_text(
            _NGINX_PROXY.format(
                user=self._user_line(),
                nofile=_nofile(),
                tmp=self.tmp,
                name=name,
                port=port,
                origin=origin.port,
                buffering="on" if response_buffering or cache else "off",
                cache_path=(
                    f"proxy_cache_path {self.tmp}/{name}-cache levels=1:2 keys_zone={name}:10m max_size=1g;"
                    " sendfile on; tcp_nopush on;"
                    if cache
                    else ""
                ),
                cache=f"proxy_cache {name}; proxy_cache_lock on;" if cache else "",
            )
        )
        cmd = ["nginx", "-p", str(self.tmp), "-c", str(conf), "-e", "stderr"]
        server = self._spawn(name, port, cmd, cpus=cpus)
        self.wait_ready(server)
        return server

    def counting_origin(self, cpus: frozenset[int] | None = None) -> Server:
        """The stampede scenario's origin (``counting_origin.py``)."""
        port = free_port()
        cmd = [sys.executable, str(BENCH / "counting_origin.py"), str(port)]
        server = self._spawn("counting-origin", port, cmd, cpus=cpus)
        self.wait_ready(server)
        return server

    def node_proxy(self, origin: Server, cpus: frozenset[int] | None = None) -> Server:
        port = free_port()
        cmd = ["node", str(BENCH / "node_proxy.js"), str(port), f"http://127.0.0.1:{origin.port}"]
        server = self._spawn("node", port, cmd, cpus=cpus, cwd=BENCH)
        self.wait_ready(server)
        return server

    def wsgiproxy(self, origin: Server, workers: int, cpus: frozenset[int] | None = None) -> Server:
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
        server = self._spawn("wsgiproxy2", port, cmd, signal.SIGTERM, cpus=cpus, cwd=BENCH, env=env)
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
    cpus: frozenset[int] | None = None,
) -> dict:
    """One wrk run; returns the numbers wrk.lua's done() printed, plus rates
    (and, when pinned to ``cpus``, the CPUs the kernel let it use)."""
    threads = max(1, min(threads, connections))
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s"]
    cmd += ["--timeout", f"{timeout_s}s", "-s", str(WRK_LUA)]
    for header in headers:
        cmd += ["-H", header]
    cmd.append(url)
    env = {**os.environ}
    if post_bytes:
        env["BENCH_POST_BYTES"] = str(post_bytes)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_pin(cpus)
    )
    allowed = cpus_allowed(proc.pid) if cpus is not None else None
    try:
        stdout, stderr = proc.communicate(timeout=duration + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    if allowed is not None and parse_cpu_list(allowed) != cpus:
        raise RuntimeError(f"wrk was not pinned to CPU {format_cpu_list(cpus)}: Cpus_allowed_list {allowed}")
    result = None
    for line in stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result = json.loads(line[len("BENCH_RESULT ") :])
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {stdout}\n{stderr}")
    seconds = result["duration_us"] / 1e6
    errors = result["errors"]
    result["errors_total"] = sum(errors.values())
    result["rps"] = result["requests"] / seconds if seconds else 0.0
    result["mb_per_s_down"] = result["bytes"] / seconds / 1e6 if seconds else 0.0
    result["mb_per_s_up"] = result["requests"] * (post_bytes or 0) / seconds / 1e6 if seconds else 0.0
    result["command"] = " ".join(cmd)
    if allowed is not None:
        result["wrk_cpus_allowed"] = allowed
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
        "proxy_python": out([str(proxy_python), "-c", "import sys; print(sys.version.split()[0], sys.base_prefix)"]),
        "proxy_gunicorn": out([str(proxy_python), "-m", "gunicorn", "--version"]),
        "wsgiproxy2": out([str(BENCH_PY), "-c", "import importlib.metadata as m; print(m.version('WSGIProxy2'))"]),
        "kernel": os.uname().release,
        "cpus": cpus(),
    }


def stampede(port: int, path: str, clients: int, size: int, timeout: float = 30.0) -> dict:
    """``clients`` GETs of ``path`` at once (threads released together): how
    many got the whole body (``size`` bytes, status 200) and the time from
    the release to the last byte of the last one."""
    import http.client
    import threading

    barrier = threading.Barrier(clients + 1)
    complete = [False] * clients
    done_at = [0.0] * clients

    def one(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.connect()
            barrier.wait()
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            complete[n] = response.status == 200 and len(body) == size
        except (OSError, http.client.HTTPException):
            pass
        finally:
            done_at[n] = time.perf_counter()
            conn.close()

    threads = [threading.Thread(target=one, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return {"clients": clients, "complete": sum(complete), "last_byte_s": max(done_at) - start}

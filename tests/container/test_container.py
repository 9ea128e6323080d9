"""The image, for real: podman runs it and the tests talk to it on loopback.

The container shares the host's network (``--network host``) and resolves
``next-hop`` to 127.0.0.1, where the tests' origin listens. The user's
configuration directory is a host directory mounted read-only at
``/opt/proxy_config``; the hooks run inside with ``podman exec``, as the
platform runs them.

Skipped unless ``PROXY_IMAGE`` names a built image: ``.ci/container.sh``
builds one and runs these (``make test`` only reports them as skipped).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import free_port, wait_for
from origin import Origin, pattern_bytes

IMAGE = os.environ.get("PROXY_IMAGE", "")
USER = "edgeproxy"
CAP_NET_BIND_SERVICE = 1 << 10
#: A throw-away container with no network and no health check (podman
#: would need systemd for one, and says so on stderr).
RUN_ONCE = ("run", "--rm", "--network=none", "--no-healthcheck")

if not IMAGE:
    pytest.skip("PROXY_IMAGE is not set: .ci/container.sh builds the image and runs these", allow_module_level=True)

pytestmark = pytest.mark.container


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def port_80_free() -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", 80))
        except OSError:
            return False
    return True


class Container:
    """One proxy container; its configuration directory is ``config_dir``."""

    def __init__(self, config_dir: Path, origin: Origin, port: int | None, network: str = "host") -> None:
        self.name = f"proxy-test-{uuid.uuid4().hex[:12]}"
        self.config_dir = config_dir
        self.origin = origin
        self.port = port or 80
        self.network = network

    def start(self, env: dict[str, str] | None = None, extra: tuple[str, ...] = ()) -> Container:
        env = {"NEXT_HOP": f"next-hop:{self.origin.port}", "WEB_CONCURRENCY": "2", **(env or {})}
        if self.port != 80:
            env["PORT"] = str(self.port)
        args = ["run", "--detach", "--name", self.name, f"--network={self.network}", "--health-interval=disable"]
        if self.network == "host":
            args += ["--add-host", "next-hop:127.0.0.1"]
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        args += ["--volume", f"{self.config_dir}:/opt/proxy_config:ro", *extra, IMAGE]
        podman(*args)
        wait_for(self.ready, timeout=30, what=f"container {self.name} to serve")
        return self

    def ready(self) -> bool:
        state = self.inspect()["State"]
        if not state["Running"]:
            raise AssertionError(f"container exited {state['ExitCode']}: {self.logs()}")
        if len(self.processes()) < 2:  # the master and at least one worker
            return False
        return self.exec("python3", "-c", _CONNECT, str(self.port), check=False).returncode == 0

    def inspect(self) -> dict:
        return json.loads(podman("container", "inspect", self.name).stdout)[0]

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def exec(self, *argv: str, check: bool = True, timeout: float = 90) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *argv, check=check, timeout=timeout)

    def hook(self, name: str, *args: str) -> subprocess.CompletedProcess:
        return self.exec(f"/opt/section/{name}.sh", *args, check=False)

    def processes(self) -> dict[int, dict[str, str]]:
        """pid -> the Name, PPid, Uid and capability lines of /proc/PID/status, read inside."""
        result = self.exec("sh", "-c", _PROCESSES, check=False)
        out: dict[int, dict[str, str]] = {}
        for block in result.stdout.split("\n\n"):
            fields = dict(line.split(":\t", 1) for line in block.splitlines() if ":\t" in line)
            if fields.get("Name") and "PPid" in fields:
                out[int(fields["Pid"])] = fields
        return out

    def master(self) -> int:
        return int(self.exec("cat", "/run/proxy/gunicorn.pid").stdout)

    def workers(self) -> set[int]:
        master = self.master()
        return {pid for pid, f in self.processes().items() if int(f["PPid"]) == master}

    def read(self, path: str) -> str:
        result = self.exec("cat", path, check=False)
        return result.stdout if result.returncode == 0 else ""

    def request(self, path: str, timeout: float = 10) -> tuple[http.client.HTTPResponse, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response, response.read()
        finally:
            conn.close()

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check=False, timeout=60)


#: Reads every process's status file inside the container, one block each.
_PROCESSES = "for f in /proc/[0-9]*/status; do grep -E '^(Name|Pid|PPid|Uid|CapEff|CapAmb):' \"$f\"; echo; done"
#: Connects to 127.0.0.1:PORT inside the container.
_CONNECT = "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 2).close()"


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run .ci/base-image.sh")
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        pytest.fail(f"image {IMAGE} does not exist: build it with .ci/container.sh")
    return IMAGE


def _config_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)  # the container's user reads it; pytest's directories are 0700
    return path


@pytest.fixture
def make_container(image, origin, tmp_path):
    """Start containers; each is removed afterwards, whatever happened."""
    started: list[Container] = []

    def make(
        config: str | None = None, port: int | None = None, network: str = "host", env=None, extra=()
    ) -> Container:
        config_dir = _config_dir(tmp_path / f"proxy_config{len(started)}")
        if config is not None:
            (config_dir / "proxy.toml").write_text(config)
        if port is None and network == "host" and not port_80_free():
            port = free_port()
        container = Container(config_dir, origin, port, network)
        started.append(container)
        return container.start(env, extra)

    yield make
    for container in started:
        container.remove()


@pytest.fixture(scope="module")
def proxy(image, origin, tmp_path_factory):
    """One container shared by the tests that only look at it."""
    port = None if port_80_free() else free_port()
    container = Container(_config_dir(tmp_path_factory.mktemp("shared") / "proxy_config"), origin, port)
    try:
        yield container.start()
    finally:
        container.remove()


# -- the image ----------------------------------------------------------------------------


def test_image_metadata(image):
    inspected = json.loads(podman("image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    assert config["Cmd"] == ["gunicorn", "-c", "gunicorn.conf.py"]
    assert config["WorkingDir"] == "/app"
    assert config["User"].split(":")[0] == USER
    assert config["StopSignal"] == "SIGTERM"
    assert "80/tcp" in config["ExposedPorts"]
    assert inspected["Healthcheck"]["Test"][0] == "CMD"  # kept: the image is in Docker's format
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PROXY_HOME"] == "/app"
    assert env["PROXY_PYTHON"] == "/opt/venv/bin/python"


def test_image_contents(image):
    """Hooks in place and executable, an empty config mount point, the
    runtime user's directories, logrotate; no compiler, pip or tests."""
    script = r"""
set -u
for hook in validate update logrotate messagehandler; do
    [ -x /opt/section/$hook.sh ] || echo "missing or not executable: /opt/section/$hook.sh"
done
[ -d /opt/proxy_config ] || echo "no /opt/proxy_config"
[ -z "$(ls -A /opt/proxy_config)" ] || echo "/opt/proxy_config is not empty"
[ -w /var/log/proxy ] || echo "/var/log/proxy not writable"
[ -w /run/proxy ] || echo "/run/proxy not writable"
[ ! -w /app ] || echo "/app writable by the runtime user"
command -v logrotate >/dev/null || echo "no logrotate"
for tool in gcc cc g++ make pip pip3; do
    command -v $tool >/dev/null && echo "has $tool"
done
python3 -m pip --version >/dev/null 2>&1 && echo "python3 -m pip works"
[ -e /app/tests ] && echo "/app/tests exists"
[ -e /root/.cache/pip ] && echo "pip cache"
[ "$(command -v python3)" = /opt/venv/bin/python3 ] || echo "python3 is $(command -v python3)"
[ "$(id -u)" != 0 ] || echo "runs as root"
true
"""
    result = podman(*RUN_ONCE, "--entrypoint", "/bin/sh", image, "-c", script)
    assert result.stdout == "" and result.stderr == ""


# -- serving ------------------------------------------------------------------------------


def test_proxies_through_the_container(proxy, origin):
    response, body = proxy.request("/bytes/100000")
    assert response.status == 200
    assert body == pattern_bytes(100000)
    assert origin.last().target == "/bytes/100000"
    response, body = proxy.request("/.well-known/section-io/aee-hc/healthz?ts=1")
    assert response.status == 200


def test_master_and_workers_run_as_the_non_root_user(proxy):
    top = podman("top", proxy.name, "user", "pid", "ppid", "args").stdout.splitlines()[1:]
    gunicorns = [line.split() for line in top if "gunicorn" in line]
    assert len(gunicorns) >= 3, top  # the master and WEB_CONCURRENCY=2 workers
    assert {fields[0] for fields in gunicorns} == {USER}
    master = proxy.master()
    processes = proxy.processes()
    assert master in processes
    workers = proxy.workers()
    assert len(workers) == 2
    uid = int(podman(*RUN_ONCE, "--entrypoint", "id", IMAGE, "-u").stdout)
    assert uid != 0
    for pid in {master} | workers:
        fields = processes[pid]
        assert {int(x) for x in fields["Uid"].split()} == {uid}, fields
        # Exactly one capability, and only because it is ambient (no file
        # capability on the interpreter, so the processes stay dumpable).
        assert int(fields["CapEff"], 16) == CAP_NET_BIND_SERVICE, fields
        assert int(fields["CapAmb"], 16) == CAP_NET_BIND_SERVICE, fields


def test_healthcheck(proxy):
    assert podman("healthcheck", "run", proxy.name, check=False).returncode == 0


def test_port_80_as_non_root_user(make_container):
    """In a network namespace of its own, without PORT: port 80."""
    container = make_container(network="none", port=80)
    assert container.exec("python3", "-c", _CONNECT, "80", check=False).returncode == 0
    assert podman("healthcheck", "run", container.name, check=False).returncode == 0
    for pid in {container.master()} | container.workers():
        assert container.processes()[pid]["Uid"].split()[0] != "0"


def test_runs_without_the_capability_on_a_high_port(make_container):
    """--cap-drop all: the entrypoint cannot raise the capability and runs
    gunicorn as is, which works on a port above 1023."""
    container = make_container(port=free_port(), env={"WEB_CONCURRENCY": "1"}, extra=("--cap-drop=all",))
    response, _ = container.request("/")
    assert response.status == 200
    assert int(container.processes()[container.master()]["CapEff"], 16) == 0


# -- hooks --------------------------------------------------------------------------------


def test_validate_silent_on_valid_configuration(proxy):
    result = proxy.hook("validate")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    (proxy.config_dir / "proxy.toml").write_text('[response_headers]\nset = { "X-Test" = "ok" }\n')
    try:
        result = proxy.hook("validate")
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    finally:
        (proxy.config_dir / "proxy.toml").unlink()


def test_validate_fails_with_reason(proxy):
    (proxy.config_dir / "proxy.toml").write_text("[response_headers]\nnot_a_key = 1\n")
    try:
        result = proxy.hook("validate")
    finally:
        (proxy.config_dir / "proxy.toml").unlink()
    assert result.returncode != 0
    assert "not_a_key" in result.stderr and "unknown key" in result.stderr, result.stderr


def test_validate_without_network(image, tmp_path):
    """The platform validates with no network at all and nothing running."""
    config_dir = _config_dir(tmp_path / "proxy_config")
    (config_dir / "proxy.toml").write_text('[request_headers]\nset = { "X-From" = "edge" }\n')
    args = [*RUN_ONCE, "--volume", f"{config_dir}:/opt/proxy_config:ro", image]
    result = podman(*args, "/opt/section/validate.sh", check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    (config_dir / "proxy.toml").write_text("upstream = 3\n")
    result = podman(*args, "/opt/section/validate.sh", check=False)
    assert result.returncode != 0 and "upstream" in result.stderr


def test_update_reloads_workers_and_configuration(make_container):
    container = make_container(config='[response_headers]\nset = { "X-Test" = "v1" }\n')
    response, _ = container.request("/")
    assert response.getheader("X-Test") == "v1"
    before = container.workers()
    master = container.master()
    (container.config_dir / "proxy.toml").write_text('[response_headers]\nset = { "X-Test" = "v2" }\n')
    result = container.hook("update")
    assert result.returncode == 0, result.stderr
    assert container.master() == master
    wait_for(lambda: container.workers() and not container.workers() & before, what="old workers to be replaced")
    wait_for(lambda: container.request("/")[0].getheader("X-Test") == "v2", what="the new header rule")


def test_update_keeps_running_configuration_when_invalid(make_container):
    container = make_container(config='[response_headers]\nset = { "X-Test" = "v1" }\n')
    (container.config_dir / "proxy.toml").write_text("[response_headers]\nbogus = 1\n")
    result = container.hook("update")
    assert result.returncode != 0 and "bogus" in result.stderr
    assert container.request("/")[0].getheader("X-Test") == "v1"


def test_update_before_the_proxy_runs(image, tmp_path):
    config_dir = _config_dir(tmp_path / "proxy_config")
    args = [*RUN_ONCE, "--volume", f"{config_dir}:/opt/proxy_config:ro", image]
    result = podman(*args, "/opt/section/update.sh", check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    result = podman(*args, "/opt/section/logrotate.sh", check=False)
    assert result.returncode == 0, result.stderr


def test_logs_go_to_stdout_and_stderr_by_default(make_container):
    """The newer platform's default: access lines in the container's stdout,
    diagnostics on its stderr, no log files."""
    container = make_container()
    container.request("/to-stdout")
    wait_for(lambda: "/to-stdout" in podman("logs", container.name).stdout, what="the access line on stdout")
    [record] = [json.loads(line) for line in podman("logs", container.name).stdout.splitlines()]
    assert record["target"] == "/to-stdout" and record["status"] == 200
    assert "Starting gunicorn" in podman("logs", container.name).stderr
    assert container.exec("ls", "-A", "/var/log/proxy").stdout == ""


@pytest.mark.parametrize("target", ["stdout", "file"])
def test_an_unreadable_configuration_stops_the_container_with_the_reason(image, tmp_path, target):
    """A configuration directory the container's user cannot read: the
    container exits non-zero and ``podman logs`` (its stderr) says why,
    whatever the log target."""
    config_dir = tmp_path / "proxy_config"
    config_dir.mkdir(mode=0o700)
    (config_dir / "proxy.toml").write_text("")
    args = [*RUN_ONCE, "--env", f"PROXY_LOG_TARGET={target}", "--volume", f"{config_dir}:/opt/proxy_config:ro"]
    result = podman(*args, image, check=False, timeout=60)
    assert result.returncode != 0
    assert "invalid configuration, not starting" in result.stderr, result.stderr
    assert "proxy.toml: cannot read: Permission denied" in result.stderr, result.stderr


def test_logrotate_rotates_and_logging_continues(make_container):
    container = make_container(env={"PROXY_LOG_TARGET": "file"})
    container.request("/before-rotation")
    wait_for(lambda: "/before-rotation" in container.read("/var/log/proxy/access.log"), what="the access log line")
    result = container.hook("logrotate")
    assert result.returncode == 0, result.stderr
    listing = container.exec("ls", "/var/log/proxy").stdout.split()
    assert "access.log.1" in listing, listing
    assert "/before-rotation" in container.read("/var/log/proxy/access.log.1")
    container.request("/after-rotation")
    wait_for(lambda: "/after-rotation" in container.read("/var/log/proxy/access.log"), what="logging to the new file")
    assert "/after-rotation" not in container.read("/var/log/proxy/access.log.1")


def test_messagehandler(proxy):
    before = proxy.workers()
    result = proxy.hook("messagehandler", "reload")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: proxy.workers() and not proxy.workers() & before, what="workers replaced by the reload")
    result = proxy.hook("messagehandler", "no-such-message", "arg")
    assert result.returncode != 0
    assert "unknown message: no-such-message" in result.stderr


# -- stopping ------------------------------------------------------------------------------


def test_stop_is_graceful(make_container):
    """podman stop (SIGTERM) lets an in-flight slow response finish, then the
    container exits 0 well within podman's grace period (10 s)."""
    container = make_container()
    outcome: dict = {}

    def slow_request() -> None:
        try:
            response, body = container.request("/slow/50000/3", timeout=30)
            outcome["status"], outcome["body"] = response.status, body
        except Exception as exc:  # reported by the assertion below
            outcome["error"] = exc

    client = threading.Thread(target=slow_request)
    client.start()
    wait_for(lambda: any(r.target == "/slow/50000/3" for r in container.origin.requests), what="the slow request")
    started = time.monotonic()
    podman("stop", "--time", "10", container.name, timeout=60)
    elapsed = time.monotonic() - started
    client.join(30)
    assert not client.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["status"] == 200
    assert outcome["body"] == pattern_bytes(50000)
    state = container.inspect()["State"]
    assert state["ExitCode"] == 0, container.logs()
    assert elapsed < 10, f"stop took {elapsed:.1f}s: SIGKILL after the grace period?"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", container.port), timeout=1).close()

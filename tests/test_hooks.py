"""The platform hooks (issue 4): validate.sh, update.sh, messagehandler.sh.

Every test runs the real scripts the way the platform runs /opt/section/*.sh
(``Proxy.hook``), against a real Gunicorn master, with real signals.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import urllib3
from conftest import HOOKS, wait_for
from origin import pattern_bytes

RULE = '[response_headers.set]\n"X-Rule" = "{}"\n'


def rule_of(proxy) -> str | None:
    response, _ = proxy.request("GET", "/rule")
    assert response.status == 200
    return response.getheader("X-Rule")


def snapshot(directory: Path) -> dict[str, tuple]:
    """Every entry under ``directory`` with its mode, size, mtime and content hash."""
    out = {}
    for path in sorted(directory.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        out[str(path.relative_to(directory))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    st = directory.stat()
    out["."] = (st.st_mode, st.st_mtime_ns)
    return out


# -- validate.sh ----------------------------------------------------------------------

VALID_CONFIG = """\
middleware = "loud:factory"

[upstream]
read_timeout = 30

[response_headers.set]
"X-Frame-Options" = "DENY"

[error_pages]
503 = "503.html"
"""

LOUD_MIDDLEWARE = """
import sys, warnings
print("imported on stdout")
print("imported on stderr", file=sys.stderr)
warnings.warn("a warning at import")

def factory(app):
    print("factory called")
    return app
"""


def test_validate_valid_is_silent_fast_and_writes_nothing(make_proxy):
    """A valid configuration: exit 0, nothing on stdout or stderr (even when the
    middleware prints at import), no file written in the configuration dir."""
    proxy = make_proxy(
        config=VALID_CONFIG, files={"503.html": "<h1>later</h1>", "loud.py": LOUD_MIDDLEWARE}, start=False
    )
    before = snapshot(proxy.config_dir)
    timings = []
    for _ in range(3):
        started = time.monotonic()
        result = proxy.hook("validate")
        timings.append(time.monotonic() - started)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert snapshot(proxy.config_dir) == before
    assert not list(proxy.config_dir.rglob("__pycache__"))
    print(f"validate.sh (valid, with middleware) took {', '.join(f'{t * 1000:.0f} ms' for t in timings)}")
    assert min(timings) < 5, timings  # generous: the machine is shared; measured, not benchmarked


def test_validate_empty_or_missing_directory_is_valid(make_proxy, tmp_path):
    proxy = make_proxy(start=False)
    assert (proxy.hook("validate").returncode, proxy.hook("validate").stdout) == (0, "")
    result = proxy.hook("validate", env={"PROXY_CONFIG_DIR": str(tmp_path / "does-not-exist")})
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def _isolated(config_dir: Path) -> list[str] | None:
    """A command prefix under which ``config_dir`` cannot be written and there
    is no network. As root (permissions do not bind root): a private mount
    namespace with the directory bind-mounted read-only, in a network
    namespace whose only interface is down. Otherwise chmod 555 binds."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("unshare"):
        return None
    probe = subprocess.run(["unshare", "--mount", "--net", "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    script = f'mount --bind "{config_dir}" "{config_dir}" && mount -o remount,bind,ro "{config_dir}" && exec "$@"'
    return ["unshare", "--mount", "--net", "--propagation", "private", "sh", "-c", script, "sh"]


def test_validate_runs_on_a_read_only_directory_without_network(tmp_path):
    """Directory chmod 555, files 444, and (as root) a read-only mount and no
    network: valid still passes silently, invalid still explains, and
    nothing in the directory changes."""
    config_dir = tmp_path / "proxy_config"
    config_dir.mkdir()
    prefix = _isolated(config_dir)
    if prefix is None:
        pytest.skip("cannot make the directory read-only for root here (no unshare)")
    env = {**os.environ, "PROXY_CONFIG_DIR": str(config_dir), "PROXY_PYTHON": sys.executable}

    def validate(config: str) -> tuple[subprocess.CompletedProcess, dict, dict]:
        config_dir.chmod(0o755)
        for name, text in {"proxy.toml": config, "503.html": "<h1>later</h1>", "loud.py": LOUD_MIDDLEWARE}.items():
            path = config_dir / name
            if path.exists():
                path.chmod(0o644)
            path.write_text(text)
            path.chmod(0o444)
        config_dir.chmod(0o555)
        before = snapshot(config_dir)
        result = subprocess.run(
            [*prefix, "sh", str(HOOKS / "validate.sh")], env=env, capture_output=True, text=True, timeout=60
        )
        return result, before, snapshot(config_dir)

    # A write attempt really fails under these conditions (the test proves its own premise).
    premise = subprocess.run([*prefix, "touch", str(config_dir / "x")], capture_output=True, text=True)
    assert premise.returncode != 0, "the configuration directory is writable: the test proves nothing"

    result, before, after = validate(VALID_CONFIG)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert after == before
    assert not list(config_dir.rglob("__pycache__"))

    result, before, after = validate(VALID_CONFIG + '\n[access_control]\ndeny = ["10.0.0.0/33"]\n')
    assert result.returncode == 1
    assert "access_control.deny" in result.stderr and "10.0.0.0/33" in result.stderr
    assert after == before
    config_dir.chmod(0o755)


def test_validate_reports_every_problem_with_file_key_and_line(make_proxy):
    config = """\
[upstream]
read_timeout = "fast"
colour = "blue"

[access_control]
allow = ["10.0.0.0/8", "not-an-ip"]

[error_pages]
502 = "missing.html"
"""
    proxy = make_proxy(config=config, start=False)
    result = proxy.hook("validate")
    assert result.returncode == 1
    assert result.stdout == ""
    toml = str(proxy.config_dir / "proxy.toml")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 4, result.stderr
    assert any(line.startswith(f"{toml}:2: upstream.read_timeout: ") for line in lines), lines
    assert any(line.startswith(f"{toml}:3: upstream.colour: unknown key") for line in lines), lines
    assert any(line.startswith(f"{toml}:6: access_control.allow: 'not-an-ip'") for line in lines), lines
    assert any(line.startswith(f"{toml}:9: error_pages.502: cannot read 'missing.html'") for line in lines), lines


# -- update.sh ------------------------------------------------------------------------


def test_update_without_a_running_proxy_succeeds(make_proxy):
    proxy = make_proxy(config=RULE.format("v1"), start=False)
    assert not proxy.pidfile.exists()
    result = proxy.hook("update")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_update_with_a_stale_pidfile_succeeds(make_proxy):
    proxy = make_proxy(config=RULE.format("v1"), start=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    proxy.run_dir.mkdir(parents=True, exist_ok=True)
    proxy.pidfile.write_text(f"{dead.pid}\n")
    result = proxy.hook("update")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def pending_signals(pid: int) -> set[int]:
    """Signals sent to the process ``pid`` and not yet handled (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("ShdPnd:"):
            mask = int(line.split()[1], 16)
            return {n + 1 for n in range(64) if mask >> n & 1}
    return set()


def test_update_with_an_invalid_configuration_touches_nothing(make_proxy):
    proxy = make_proxy(config=RULE.format("v1"))
    workers = proxy.workers()
    (proxy.config_dir / "proxy.toml").write_text(RULE.format("v2") + "[upstream]\nread_timeout = -1\n")
    result = proxy.hook("update")
    assert result.returncode == 1
    assert "upstream.read_timeout" in result.stderr and "proxy.toml:4" in result.stderr
    # The master handles signals in order: once it has logged a SIGWINCH sent
    # now, it would have logged (and begun) a reload that update.sh asked for.
    proxy.signal(signal.SIGWINCH)
    wait_for(lambda: "Handling signal: winch" in proxy.error_log(), what="the master to handle SIGWINCH")
    assert "Handling signal: hup" not in proxy.error_log()
    assert proxy.workers() == workers
    assert rule_of(proxy) == "v1"


def test_update_applies_a_valid_configuration_with_new_workers(make_proxy):
    proxy = make_proxy(config=RULE.format("v1"), env={"WEB_CONCURRENCY": "2"})
    wait_for(lambda: len(proxy.workers()) == 2, what="two workers")
    old = set(proxy.workers())
    master = proxy.pid
    (proxy.config_dir / "proxy.toml").write_text(RULE.format("v2"))
    result = proxy.hook("update")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    # update.sh returns once the old generation is gone: the new rule holds at once.
    new = set(proxy.workers())
    assert len(new) == 2 and not new & old
    assert proxy.pid == master and proxy.process.poll() is None
    assert [rule_of(proxy) for _ in range(10)] == ["v2"] * 10


def test_update_lets_in_flight_requests_finish(make_proxy, origin):
    proxy = make_proxy(config=RULE.format("v1"))
    result = {}

    def slow() -> None:
        response, body = proxy.request("GET", "/slow/200000/3", timeout=30)
        result.update(status=response.status, rule=response.getheader("X-Rule"), body=body)

    thread = threading.Thread(target=slow)
    thread.start()
    wait_for(lambda: any(r.target == "/slow/200000/3" for r in origin.requests), what="the request in flight")
    (proxy.config_dir / "proxy.toml").write_text(RULE.format("v2"))
    update = proxy.hook("update")
    thread.join(30)
    assert update.returncode == 0, update.stderr
    # Started under v1, finished in full by the old worker after the reload.
    assert result == {"status": 200, "rule": "v1", "body": pattern_bytes(200000)}
    assert rule_of(proxy) == "v2"


# -- messagehandler.sh ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["updateenvironment", "reload"])
def test_message_reloads_like_update(make_proxy, name):
    proxy = make_proxy(config=RULE.format("v1"))
    workers = proxy.workers()
    (proxy.config_dir / "proxy.toml").write_text(RULE.format("v2"))
    result = proxy.hook("messagehandler", name, "")
    assert result.returncode == 0, result.stderr
    assert rule_of(proxy) == "v2"
    assert not set(proxy.workers()) & set(workers)
    # Invalid: refused with the reason, nothing changes.
    (proxy.config_dir / "proxy.toml").write_text("[upstream\n")
    result = proxy.hook("messagehandler", name, "")
    assert result.returncode == 1
    assert "proxy.toml:1" in result.stderr and "TOML syntax" in result.stderr
    assert rule_of(proxy) == "v2"


def test_message_reopen_logs(make_proxy):
    proxy = make_proxy()
    proxy.request("GET", "/before-rotation")
    access = proxy.log_dir / "access.log"
    wait_for(lambda: "/before-rotation" in proxy.access_log(), what="first access line")
    access.rename(access.with_name("access.log.old"))
    result = proxy.hook("messagehandler", "reopen-logs")
    assert result.returncode == 0, result.stderr

    def logged_to_new_file() -> bool:
        proxy.request("GET", "/after-rotation")
        return "/after-rotation" in proxy.access_log()

    wait_for(logged_to_new_file, timeout=10, interval=0.2, what="access log to be reopened")
    assert "/after-rotation" not in access.with_name("access.log.old").read_text()


def test_message_reopen_logs_without_a_running_proxy_succeeds(make_proxy):
    proxy = make_proxy(start=False)
    assert proxy.hook("messagehandler", "reopen-logs").returncode == 0


@pytest.mark.parametrize("name", ["no-such-message", "purge-everything"])
def test_unknown_message_fails_with_its_name(make_proxy, name):
    proxy = make_proxy(start=False)
    result = proxy.hook("messagehandler", name, "some args")
    assert result.returncode != 0
    assert result.stderr.strip() == f"unknown message: {name}"


def test_message_without_a_name_fails(make_proxy):
    proxy = make_proxy(start=False)
    result = proxy.hook("messagehandler")
    assert result.returncode != 0 and result.stderr.strip()


# -- zero-downtime reload under load --------------------------------------------------


class Load:
    """Client threads, each on its own keep-alive http.client connection,
    sending requests back to back. Never retries: every exception counts."""

    def __init__(self, proxy, threads: int = 6, max_requests: int = 20_000, max_seconds: float = 180) -> None:
        self.proxy = proxy
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.statuses: dict[int, int] = {}
        self.errors: list[str] = []
        self.connections = 0
        self.last_rule: dict[int, str | None] = {}
        self.rules_seen: list[str | None] = []
        self.max_requests = max_requests
        self.deadline = time.monotonic() + max_seconds
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _run(self, index: int) -> None:
        conn = None
        sent = 0
        while not self.stop.is_set() and sent < self.max_requests and time.monotonic() < self.deadline:
            if conn is None:
                conn = self.proxy.connection(timeout=30)
                with self.lock:
                    self.connections += 1
            sent += 1
            try:
                conn.request("GET", f"/load/{index}/{sent}")
                response = conn.getresponse()
                body = response.read()
                rule = response.getheader("X-Rule")
                with self.lock:
                    self.statuses[response.status] = self.statuses.get(response.status, 0) + 1
                    if response.status == 200 and body == b"hello from origin\n":
                        self.ok += 1
                    else:
                        self.errors.append(f"thread {index} request {sent}: {response.status} {body[:80]!r}")
                    self.last_rule[index] = rule
                    self.rules_seen.append(rule)
                if response.will_close:
                    conn.close()
                    conn = None
            except Exception as exc:  # no retry: a reset or a dropped request is a failure
                with self.lock:
                    self.errors.append(f"thread {index} request {sent}: {exc!r}")
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def wait_for_requests(self, n: int, timeout: float = 30) -> None:
        start = self.ok + len(self.errors)
        wait_for(lambda: self.ok + len(self.errors) >= start + n, timeout=timeout, what=f"{n} more requests")


@pytest.mark.slow
def test_ten_reloads_under_load_lose_no_request(make_proxy):
    proxy = make_proxy(config=RULE.format("v0"), env={"WEB_CONCURRENCY": "2", "PROXY_ACCESS_LOG": "off"})
    wait_for(lambda: len(proxy.workers()) == 2, what="two workers")
    durations = []
    generations = [set(proxy.workers())]
    with Load(proxy) as load:
        load.wait_for_requests(200)
        for version in range(1, 11):
            (proxy.config_dir / "proxy.toml").write_text(RULE.format(f"v{version}"))
            started = time.monotonic()
            result = proxy.hook("update")
            durations.append(time.monotonic() - started)
            assert result.returncode == 0, result.stderr
            generations.append(set(proxy.workers()))
            load.wait_for_requests(100)
        # The load goes on for a while on the last configuration only.
        settled = len(load.rules_seen)
        load.wait_for_requests(300)
    total = load.ok + len(load.errors)
    print(
        f"{total} requests on {load.connections} connections, {len(load.errors)} failed; "
        f"update.sh took {min(durations):.2f}-{max(durations):.2f} s (mean {sum(durations) / len(durations):.2f} s)"
    )
    assert load.errors == [], load.errors[:20]
    assert load.statuses == {200: total}
    assert all(a.isdisjoint(b) for i, a in enumerate(generations) for b in generations[i + 1 :])
    assert set(load.rules_seen[settled:]) == {"v10"}
    assert set(load.last_rule.values()) == {"v10"}
    assert [rule_of(proxy) for _ in range(10)] == ["v10"] * 10
    assert proxy.process.poll() is None


@pytest.mark.slow
def test_invalid_update_under_load_changes_nothing(make_proxy):
    proxy = make_proxy(config=RULE.format("good"), env={"WEB_CONCURRENCY": "2", "PROXY_ACCESS_LOG": "off"})
    wait_for(lambda: len(proxy.workers()) == 2, what="two workers")
    workers = proxy.workers()
    with Load(proxy) as load:
        load.wait_for_requests(200)
        (proxy.config_dir / "proxy.toml").write_text(RULE.format("bad") + '[access_control]\nallow = ["300.1.1.1"]\n')
        result = proxy.hook("update")
        load.wait_for_requests(300)
    assert result.returncode == 1
    assert "access_control.allow" in result.stderr and "300.1.1.1" in result.stderr
    assert load.errors == [], load.errors[:20]
    assert set(load.rules_seen) == {"good"}
    assert proxy.workers() == workers
    assert rule_of(proxy) == "good"


def test_hook_scripts_exist_and_are_thin():
    for name in ("validate", "update", "messagehandler", "logrotate"):
        script = HOOKS / f"{name}.sh"
        assert script.exists() and os.access(script, os.X_OK), name
        assert "python" in script.read_text() and "proxy.hooks" in script.read_text()


def test_update_with_the_master_gone_mid_reload_is_an_error(make_proxy):
    """The master dies right after SIGHUP: update.sh says so instead of hanging."""
    proxy = make_proxy(config=RULE.format("v1"))
    (proxy.config_dir / "proxy.toml").write_text(RULE.format("v2"))
    # SIGSTOP the master so it cannot spawn, then kill it while update.sh waits.
    workers = proxy.workers()
    proxy.signal(signal.SIGSTOP)
    try:
        runner = subprocess.Popen(
            ["bash", str(HOOKS / "update.sh")], env=proxy.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        wait_for(lambda: signal.SIGHUP in pending_signals(proxy.pid), what="update.sh's SIGHUP to the stopped master")
        proxy.process.kill()
        proxy.process.wait(10)
        out, err = runner.communicate(timeout=30)
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert runner.returncode == 1
    assert "exited during reload" in err


@pytest.mark.slow
def test_reloads_close_idle_keepalive_connections_cleanly(make_proxy):
    """Clients pausing about a second between requests, as a previous hop's
    pooled connections do. An old worker closes connections idle for a
    second after its SIGTERM; a client that checks its pooled connection
    before reusing it (urllib3 here, nginx's upstream keep-alive alike, no
    retry) must never see a failure: the close is a clean FIN, never a
    request dropped in flight."""
    proxy = make_proxy(config=RULE.format("v0"), env={"WEB_CONCURRENCY": "2", "PROXY_ACCESS_LOG": "off"})
    wait_for(lambda: len(proxy.workers()) == 2, what="two workers")
    stop = threading.Event()
    lock = threading.Lock()
    done: list[str | None] = []
    errors: list[str] = []

    def client(index: int) -> None:
        rnd = random.Random(index)
        pool = urllib3.HTTPConnectionPool("127.0.0.1", proxy.port, maxsize=1, retries=False, timeout=30)
        deadline = time.monotonic() + 120
        for n in range(200):
            if stop.is_set() or time.monotonic() > deadline:
                break
            try:
                response = pool.request("GET", f"/idle/{index}/{n}", retries=False)
                with lock:
                    done.append(response.headers.get("X-Rule"))
                    if response.status != 200:
                        errors.append(f"{index}/{n}: {response.status}")
            except Exception as exc:
                with lock:
                    errors.append(f"{index}/{n}: {exc!r}")
            time.sleep(rnd.uniform(0.8, 1.5))  # the stimulus: a client pausing between requests
        pool.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(done) >= 2 * len(threads), what="every client past its first pause")
        for version in range(1, 6):
            (proxy.config_dir / "proxy.toml").write_text(RULE.format(f"v{version}"))
            result = proxy.hook("update")
            assert result.returncode == 0, result.stderr
            time.sleep(0.5)  # the stimulus: reloads spaced as a platform's are, not back to back
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    print(f"{len(done)} requests with pauses across 5 reloads, {len(errors)} failed")
    assert errors == []
    assert done and done[-1] == "v5"

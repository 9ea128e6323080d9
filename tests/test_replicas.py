"""Several replicas (issue 17): three Gunicorn masters on their own ports,
each with its own cache and run directory, one origin; every message fanned
out to each, as the platform runs messagehandler.sh in each pod; and every
hook delivered twice, from two processes at once, and to a pod that is still
starting."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
import urllib.parse
from pathlib import Path

import yaml
from conftest import HOOKS, ROOT, Proxy, wait_for

CACHE_ON = "[cache]\nenabled = true\n"
#: One site: every replica sees the same Host, so they store the same keys.
HOST = "shop.example"
BAN = 'obj.http.x-group == "doomed"'
#: A reload takes a second or two here; a worker that missed the SIGTERM
#: retiring it makes one last the 30 s graceful timeout instead.
PROMPT_S = 20.0


def cache_url(name: str, *headers: str) -> str:
    return f"/cache/replicas-{name}?{urllib.parse.urlencode([('h', h) for h in headers])}"


def fetches(origin, url: str) -> int:
    """How many times the origin answered ``url`` (its query aside)."""
    return origin.cache_count(url.partition("?")[0])


def get(proxy: Proxy, url: str) -> tuple[str, bytes]:
    """This proxy's Cache-Status member and the body."""
    response, body = proxy.request("GET", url, headers={"Host": HOST})
    assert response.status == 200, (proxy.port, url, response.status)
    members = [v for k, v in response.getheaders() if k.lower() == "cache-status" and v.startswith("edge-proxy")]
    return members[0], body


def is_hit(status: str) -> bool:
    return status.startswith("edge-proxy; hit")


def replica(make_proxy, cache_dir: Path | None = None, config: str | None = CACHE_ON, start: bool = True) -> Proxy:
    """One pod's proxy: its own port, run directory and (unless given) a new,
    empty cache directory, like the emptyDir of a new pod."""
    proxy = make_proxy(config=config, start=False, name="replica")
    proxy.env["PROXY_CACHE_DIR"] = str(cache_dir or proxy.tmp / "cache")
    return proxy.start() if start else proxy


def deliver(proxy: Proxy, *message: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start messagehandler.sh MESSAGE in this replica's environment, as the
    platform runs it in the replica's pod."""
    return subprocess.Popen(
        ["bash", str(HOOKS / "messagehandler.sh"), *message],
        env={**proxy.env, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def outcome(process: subprocess.Popen, timeout: float = 90) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def fan_out(proxies: list[Proxy], *message: str) -> list[tuple[int, str, str]]:
    """One delivery per replica, all at once; every one must succeed."""
    results = [outcome(p) for p in [deliver(proxy, *message) for proxy in proxies]]
    for code, _, err in results:
        assert code == 0, err
    return results


def ban_records(proxy: Proxy) -> int:
    db = sqlite3.connect(Path(proxy.env["PROXY_CACHE_DIR"]) / "index.sqlite3")
    try:
        return db.execute("SELECT COUNT(*) FROM invalidations WHERE kind = 'ban'").fetchone()[0]
    finally:
        db.close()


def catches_sighup(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGHUP - 1) & 1)
    return False


# -- three replicas, purge and ban fanned out --------------------------------------------


def test_purge_and_ban_fanned_out_to_three_replicas(make_proxy, origin):
    replicas = [replica(make_proxy) for _ in range(3)]
    purged = cache_url("purged", "Cache-Control:max-age=300", "X-Group:kept")
    banned = cache_url("banned", "Cache-Control:max-age=300", "X-Group:doomed")
    kept = cache_url("kept", "Cache-Control:max-age=300", "X-Group:kept")
    urls = (purged, banned, kept)

    # Round-robin over the replicas: each one fetches each object once and stores it ...
    for url in urls:
        for proxy in replicas:
            status, _ = get(proxy, url)
            assert status.startswith("edge-proxy; fwd=uri-miss; stored"), (proxy.port, status)
    # ... and then serves it from its own cache.
    for url in urls:
        for proxy in replicas:
            assert is_hit(get(proxy, url)[0])
        assert fetches(origin, url) == 3

    # Purge, once per pod, and once more to the first (a retry): the retry finds nothing and succeeds.
    results = fan_out(replicas, "purge", f"http://{HOST}{purged}")
    results += fan_out(replicas[:1], "purge", f"http://{HOST}{purged}")
    assert [out for _, out, _ in results] == ["purged 1 entries\n"] * 3 + ["purged 0 entries\n"]
    for n, proxy in enumerate(replicas, 1):
        status, body = get(proxy, purged)
        assert status.startswith("edge-proxy; fwd=uri-miss"), (proxy.port, status)
        assert fetches(origin, purged) == 3 + n, "the next request after a purge reaches the origin"
        assert body == f"/cache/replicas-purged #{3 + n}".encode()
    for proxy in replicas:
        assert is_hit(get(proxy, banned)[0]) and is_hit(get(proxy, kept)[0])

    # Ban, once per pod, the second pod getting it twice at the same moment (two processes).
    running = [deliver(proxy, "ban", BAN) for proxy in (replicas[0], replicas[1], replicas[1], replicas[2])]
    results = [outcome(process) for process in running]
    assert [code for code, _, _ in results] == [0] * 4, [err for _, _, err in results]
    removed = [int(out.split()[1]) for _, out, _ in results]
    assert (removed[0], removed[1] + removed[2], removed[3]) == (1, 1, 1)
    assert [ban_records(proxy) for proxy in replicas] == [1, 1, 1], "a ban delivered twice is one ban"
    for n, proxy in enumerate(replicas, 1):
        status, _ = get(proxy, banned)
        assert status.startswith("edge-proxy; fwd=uri-miss"), (proxy.port, status)
        assert fetches(origin, banned) == 3 + n
        assert is_hit(get(proxy, kept)[0])
    assert fetches(origin, kept) == 3

    # A pod started after the ban has a new, empty cache: everything it serves it fetched after the ban.
    late = replica(make_proxy)
    for url, before in ((banned, 6), (kept, 3), (purged, 6)):
        status, _ = get(late, url)
        assert status.startswith("edge-proxy; fwd=uri-miss"), (url, status)
        assert fetches(origin, url) == before + 1


def test_cache_directory_lives_as_long_as_the_pod(make_proxy, origin):
    """The descriptor gives the cache an emptyDir: created empty with the pod,
    deleted with it, kept across restarts of the container inside it."""
    descriptor = yaml.safe_load((ROOT / ".section-proxy.yaml").read_text())
    (container,) = descriptor["spec"]["containers"]
    cache_dir = {e["name"]: e["value"] for e in container["env"]}["PROXY_CACHE_DIR"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == cache_dir]
    (volume,) = [v for v in descriptor["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume == {"name": mount["name"]}, "a name-only volume is an emptyDir"

    url = cache_url("restart", "Cache-Control:max-age=300", "X-Group:doomed")
    running = replica(make_proxy)
    restarted = replica(make_proxy)
    for proxy in (running, restarted):
        get(proxy, url)
        assert is_hit(get(proxy, url)[0])
    assert fetches(origin, url) == 2

    # The container of one pod is down while the ban goes out: only the other pod receives it.
    restarted.stop()
    fan_out([running], "ban", BAN)
    assert get(running, url)[0].startswith("edge-proxy; fwd=uri-miss")
    # Back up on its pod's emptyDir, it still has the object stored before the ban it never got.
    restarted.start()
    assert is_hit(get(restarted, url)[0]), "a ban this pod never received cannot apply"
    # The platform's retry reaches it now. Elsewhere the same ban again also removes what
    # was fetched since the first delivery: one more fetch, never an object from before.
    assert [out for _, out, _ in fan_out([running, restarted], "ban", BAN)] == ["banned 1 entries\n"] * 2
    assert get(restarted, url)[0].startswith("edge-proxy; fwd=uri-miss")
    # A new pod has a new emptyDir: nothing from before, so it fetches.
    fresh = replica(make_proxy)
    assert get(fresh, url)[0].startswith("edge-proxy; fwd=uri-miss")
    assert fetches(origin, url) == 5
    # A message that runs in the container while the proxy is stopped applies to its cache.
    assert is_hit(get(fresh, url)[0])
    fresh.stop()
    assert [out for _, out, _ in fan_out([fresh], "purge", f"http://{HOST}{url}")] == ["purged 1 entries\n"]
    fresh.start()
    assert get(fresh, url)[0].startswith("edge-proxy; fwd=uri-miss")
    assert fetches(origin, url) == 6


# -- each hook twice, concurrently, during start-up --------------------------------------


def test_hooks_before_the_master_exists(make_proxy):
    proxy = replica(make_proxy, start=False)
    for _ in (1, 2):
        for message in (("updateenvironment",), ("purge", f"http://{HOST}/x"), ("ban", BAN)):
            code, _, err = outcome(deliver(proxy, *message))
            assert (code, err) == (0, ""), message
    assert not Path(proxy.env["PROXY_CACHE_DIR"]).exists()
    assert not proxy.pidfile.exists()


def test_updateenvironment_twice_and_from_two_processes(make_proxy):
    """Back to back, the second SIGHUP would find the first one's worker just
    forked; from two processes at once, the second one would find it forking."""
    proxy = replica(make_proxy)
    generations = [proxy.workers()]
    for _ in (1, 2):
        started = time.monotonic()
        code, out, err = outcome(deliver(proxy, "updateenvironment"))
        assert code == 0, err
        assert out.startswith("reloaded: master"), out
        assert time.monotonic() - started < PROMPT_S
        generations.append(proxy.workers())
    assert len({tuple(g) for g in generations}) == 3, "each delivery starts a new generation"
    assert proxy.request("GET", "/")[0].status == 200

    started = time.monotonic()
    results = [outcome(p) for p in [deliver(proxy, "updateenvironment") for _ in (1, 2)]]
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    assert all("reloaded: master" in out for _, out, _ in results), results
    assert time.monotonic() - started < 2 * PROMPT_S
    assert len(proxy.workers()) == 1
    assert proxy.request("GET", "/")[0].status == 200
    assert proxy.process.poll() is None


def test_purge_from_two_processes_at_once(make_proxy, origin):
    proxy = replica(make_proxy)
    url = cache_url("twice", "Cache-Control:max-age=300")
    get(proxy, url)
    assert is_hit(get(proxy, url)[0])
    results = [outcome(p) for p in [deliver(proxy, "purge", f"//{HOST}{url}") for _ in (1, 2)]]
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    assert sorted(out for _, out, _ in results) == ["purged 0 entries\n", "purged 1 entries\n"]
    assert get(proxy, url)[0].startswith("edge-proxy; fwd=uri-miss")
    assert fetches(origin, url) == 2


def test_messages_while_the_master_runs_on_starting(make_proxy, tmp_path):
    """Gunicorn writes its pidfile before ``on_starting`` and installs its
    signal handlers after it, so a SIGHUP in between would kill the master.
    A FIFO as proxy.toml holds the master inside ``on_starting`` (where it
    reads the configuration) until the test writes to it; the hook validates
    a copy of the configuration in a directory of its own, so that only the
    master waits on the FIFO."""
    proxy = replica(make_proxy, config=None, start=False)
    held = proxy.config_dir / "proxy.toml"
    os.mkfifo(held)
    writer_end = tmp_path / "held.fifo"
    os.link(held, writer_end)
    copy = tmp_path / "hook_config"
    copy.mkdir()
    (copy / "proxy.toml").write_text(CACHE_ON)
    proxy.start(wait=False)

    def in_on_starting() -> bool:
        assert proxy.process.poll() is None, proxy.stderr()
        return proxy.pidfile.exists() and not catches_sighup(proxy.pid)

    wait_for(in_on_starting, what="the master in on_starting")
    update = deliver(proxy, "updateenvironment", env={"PROXY_CONFIG_DIR": str(copy)})
    line = update.stdout.readline()
    assert line == f"waiting for proxy master {proxy.pid} and its workers to finish starting\n", (
        line,
        outcome(update),
    )
    for message in (("purge", f"http://{HOST}/x"), ("ban", BAN)):
        code, _, err = outcome(deliver(proxy, *message))
        assert (code, err) == (0, ""), message
    assert proxy.process.poll() is None and not catches_sighup(proxy.pid), "still in on_starting"

    (proxy.config_dir / "next.toml").write_text(CACHE_ON)
    os.replace(proxy.config_dir / "next.toml", held)  # what the reload will read
    writer_end.write_text(CACHE_ON)  # lets on_starting go on
    released = time.monotonic()
    code, out, err = outcome(update)
    assert code == 0, err
    assert time.monotonic() - released < PROMPT_S, "the first worker missed its SIGTERM"
    assert out.endswith(f"reloaded: master {proxy.pid} runs a new generation of workers\n"), out
    assert proxy.process.poll() is None
    assert "Handling signal: hup" in proxy.error_log()
    proxy.wait_ready()
    assert proxy.request("GET", "/")[0].status == 200


def test_updateenvironment_while_the_first_worker_boots(make_proxy, tmp_path):
    """A middleware whose import waits for a file holds the first worker in
    its boot (only under Gunicorn: validate.sh imports it too) while the
    master already takes signals."""
    gate = tmp_path / "gate"
    slow = f"import os, sys, time\nwhile 'gunicorn' in sys.argv[0] and not os.path.exists({str(gate)!r}):\n"
    slow += "    time.sleep(0.02)\n\ndef wrap(app):\n    return app\n"
    proxy = make_proxy(config='middleware = "slow_boot:wrap"\n', files={"slow_boot.py": slow}, start=False)
    proxy.start(wait=False)
    first = wait_for(lambda: catches_sighup(proxy.pid) and proxy.workers(), what="the first worker booting")
    update = deliver(proxy, "updateenvironment")
    wait_for(lambda: "Handling signal: hup" in proxy.error_log(), what="the master taking the SIGHUP")
    assert proxy.process.poll() is None
    gate.touch()
    code, out, err = outcome(update)
    assert code == 0, err
    assert out.startswith("reloaded"), out
    assert not set(proxy.workers()) & set(first), "the booting worker was replaced"
    proxy.wait_ready()
    assert proxy.request("GET", "/")[0].status == 200


def test_purge_and_ban_on_an_index_still_being_created(make_proxy):
    """The master creates the index, then its tables one statement at a
    time: a message arriving in between (or after a master died there) finds
    an index without every table, and nothing stored."""
    proxy = replica(make_proxy, start=False)
    cache_dir = Path(proxy.env["PROXY_CACHE_DIR"])
    cache_dir.mkdir()
    db = sqlite3.connect(cache_dir / "index.sqlite3")
    db.execute("PRAGMA journal_mode = WAL")  # what the master's connection does first
    db.close()
    for message in (("purge", f"http://{HOST}/x"), ("ban", BAN)):
        code, out, err = outcome(deliver(proxy, *message))
        assert (code, err) == (0, ""), message
        assert out.endswith(" 0 entries\n")

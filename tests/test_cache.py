"""The shared cache (issue 15) through the real master, two gevent workers,
the real origin and the real hook scripts."""

from __future__ import annotations

import email.utils
import json
import os
import resource
import signal
import socket
import sqlite3
import time
import urllib.parse
from pathlib import Path

import pytest
from conftest import Proxy, pipes, wait_for
from origin import pattern_bytes

from proxy import cache_store

CACHE_ON = "[cache]\nenabled = true\n"


def cache_url(name: str, *headers: str, **options: str) -> str:
    query = [("h", h) for h in headers] + list(options.items())
    return f"/cache/{name}?{urllib.parse.urlencode(query)}"


def statuses(response) -> list[str]:
    return [v for k, v in response.getheaders() if k.lower() == "cache-status"]


def records(proxy: Proxy) -> list[dict]:
    return [json.loads(line) for line in proxy.access_log().splitlines() if line]


def record_of(proxy: Proxy, request_id: str) -> dict:
    return wait_for(
        lambda: next((r for r in records(proxy) if r["request_id"] == request_id), None),
        what=f"access record {request_id}",
    )


@pytest.fixture(scope="module")
def cached(tmp_path_factory, origin):
    """One caching proxy with two workers, shared by the tests that use distinct paths."""
    tmp = tmp_path_factory.mktemp("cached")
    proxy = Proxy(
        tmp, origin, env={"WEB_CONCURRENCY": "2", "PROXY_CACHE_DIR": str(tmp / "cache")}, config=CACHE_ON
    ).start()
    wait_for(lambda: len(proxy.workers()) == 2, what="two workers")
    yield proxy
    proxy.stop()


def make_cached(make_proxy, tmp_path, config: str = CACHE_ON, **env: str) -> Proxy:
    return make_proxy(env={"WEB_CONCURRENCY": "2", "PROXY_CACHE_DIR": str(tmp_path / "cache"), **env}, config=config)


def get(proxy: Proxy, path: str, headers: dict | None = None, method: str = "GET"):
    response, body = proxy.request(method, path, headers=headers)
    return response, body


# -- store and hit, across workers ------------------------------------------------------


def test_stored_by_one_worker_is_a_hit_in_the_other(cached, origin):
    path = cache_url("shared", "Cache-Control:max-age=300")
    first = cached.connection()
    first.request("GET", path, headers={"X-Request-Id": "shared-1"})
    response = first.getresponse()
    body = response.read()
    assert statuses(response) == ["edge-proxy; fwd=uri-miss; stored; ttl=300"]
    storer = record_of(cached, "shared-1")
    assert storer["cache_status"] == "MISS"
    # Hold the first connection open: the balancer gives the next one to the other worker.
    seen = set()
    for attempt in range(20):
        other = cached.connection()
        other.request("GET", path, headers={"X-Request-Id": f"shared-2-{attempt}"})
        again = other.getresponse()
        assert again.read() == body
        assert statuses(again)[0].startswith("edge-proxy; hit; ttl=")
        assert again.getheader("Age") is not None
        record = record_of(cached, f"shared-2-{attempt}")
        assert record["cache_status"] == "HIT"
        seen.add(record["worker_pid"])
        other.close()
        if record["worker_pid"] != storer["worker_pid"]:
            break
    first.close()
    assert seen - {storer["worker_pid"]}, "every hit landed on the storing worker"
    assert origin.cache_count("/cache/shared") == 1


def test_head_is_served_from_a_stored_get(cached, origin):
    path = cache_url("head", "Cache-Control:max-age=300")
    _, body = get(cached, path)
    response, head_body = get(cached, path, method="HEAD")
    assert head_body == b""
    assert response.getheader("Content-Length") == str(len(body))
    assert statuses(response)[0].startswith("edge-proxy; hit")
    assert origin.cache_count("/cache/head") == 1


@pytest.mark.parametrize(
    "name,headers,detail",
    [
        ("nofresh", [], "no-freshness"),
        ("nostore", ["Cache-Control:max-age=60, no-store"], "no-store"),
        ("private", ["Cache-Control:private, max-age=60"], "private"),
        ("cookie", ["Cache-Control:max-age=60", "Set-Cookie:session=secret"], "set-cookie"),
        ("varystar", ["Cache-Control:max-age=60", "Vary:*"], "vary"),
    ],
)
def test_not_stored(cached, origin, name, headers, detail):
    path = cache_url(name, *headers)
    for n in (1, 2):
        response, body = get(cached, path)
        assert body == f"/cache/{name} #{n}".encode()
        assert statuses(response) == [f"edge-proxy; fwd=uri-miss; detail={detail}"]


def test_cut_short_and_proxy_errors_are_not_stored(cached, origin):
    for options in ({"truncate": "1"}, {"truncate": "1", "chunked": "1"}):
        path = cache_url("cut" + "".join(options), "Cache-Control:max-age=60", size="200000", **options)
        for _ in (1, 2):
            try:
                get(cached, path)
            except Exception:
                pass
        assert origin.cache_count(path.split("?")[0]) == 2
    # 5xx that next-hop never sent: the health check path is never cached either.
    response, _ = get(cached, "/.well-known/section-io/aee-hc/healthz?ts=1")
    assert not statuses(response)


def test_chunked_body_is_stored_and_served_byte_exact(cached, origin):
    path = cache_url("chunked", "Cache-Control:max-age=60", size="300000", chunked="1")
    _, body = get(cached, path)
    response, again = get(cached, path)
    assert again == body == pattern_bytes(300000)
    assert statuses(response)[0].startswith("edge-proxy; hit")
    assert origin.cache_count("/cache/chunked") == 1


def test_http_and_https_do_not_share_entries(cached, origin):
    path = cache_url("scheme", "Cache-Control:max-age=60")
    _, plain = get(cached, path)
    _, secure = get(cached, path, {"X-Forwarded-Proto": "https"})
    assert plain != secure
    assert get(cached, path, {"X-Forwarded-Proto": "https"})[1] == secure
    assert get(cached, path)[1] == plain


def test_vary_keeps_variants_side_by_side(cached, origin):
    path = cache_url("vary", "Cache-Control:max-age=60", "Vary:Accept-Language", vary_echo="Accept-Language")
    _, en = get(cached, path, {"Accept-Language": "en"})
    _, fr = get(cached, path, {"Accept-Language": "fr"})
    assert (en, fr) == (b"Accept-Language=en", b"Accept-Language=fr")
    response, again = get(cached, path, {"Accept-Language": " en "})  # whitespace is normalised
    assert again == en and statuses(response)[0].startswith("edge-proxy; hit")
    response, _ = get(cached, path, {"Accept-Language": "de"})
    assert statuses(response)[0].startswith("edge-proxy; fwd=vary-miss")
    assert origin.cache_count("/cache/vary") == 3


def test_cdn_cache_control_wins_and_is_not_forwarded(cached, origin):
    path = cache_url("cdn", "Cache-Control:no-store", "CDN-Cache-Control:max-age=120")
    response, _ = get(cached, path)
    assert response.getheader("CDN-Cache-Control") is None
    assert response.getheader("Cache-Control") == "no-store"
    response, _ = get(cached, path)
    assert statuses(response)[0].startswith("edge-proxy; hit")
    assert response.getheader("CDN-Cache-Control") is None


def test_authorization_only_with_public(cached, origin):
    auth = {"Authorization": "Basic dXNlcjpwdw=="}
    path = cache_url("auth", "Cache-Control:max-age=60")
    get(cached, path, auth)
    assert statuses(get(cached, path, auth)[0]) == ["edge-proxy; fwd=uri-miss; detail=authorization"]
    public = cache_url("authpublic", "Cache-Control:public, max-age=60")
    get(cached, public, auth)
    assert statuses(get(cached, public, auth)[0])[0].startswith("edge-proxy; hit")


def test_a_large_answer_is_stored_whole_and_one_not_stored_goes_by_splice(make_proxy, tmp_path, origin):
    """The cache reads the body it stores (no splice: the bytes pass through
    it); a body it does not store goes next-hop -> pipe -> client as
    without the cache; both arrive byte-exact, and the hit is the whole body."""
    proxy = make_proxy(env={"PROXY_CACHE_DIR": str(tmp_path / "cache")}, config=CACHE_ON)
    (worker,) = wait_for(lambda: proxy.workers(), what="the worker")
    size = 3 * 1024 * 1024 + 5
    warm = cache_url("splice-warm", chunked="1")  # no pipe for a chunked answer
    assert get(proxy, warm)[0].status == 200
    before = pipes(worker)
    stored = cache_url("splice-stored", "Cache-Control:max-age=300", size=str(size))
    response, body = get(proxy, stored)
    assert statuses(response) == ["edge-proxy; fwd=uri-miss; stored; ttl=300"] and body == pattern_bytes(size)
    assert pipes(worker) == before
    response, body = get(proxy, stored)
    assert statuses(response)[0].startswith("edge-proxy; hit") and body == pattern_bytes(size)
    assert origin.cache_count(stored.split("?")[0]) == 1
    passed = cache_url("splice-not-stored", size=str(size))  # no freshness: not stored
    for _ in range(2):
        response, body = get(proxy, passed)
        assert "stored" not in statuses(response)[0] and body == pattern_bytes(size)
    assert origin.cache_count(passed.split("?")[0]) == 2
    assert len(pipes(worker) - before) == 1


# -- request directives, Age, validation ----------------------------------------------


def test_only_if_cached_is_504_when_nothing_is_stored(cached, origin):
    path = cache_url("oic", "Cache-Control:max-age=60")
    response, _ = get(cached, path, {"Cache-Control": "only-if-cached"})
    assert response.status == 504
    assert origin.cache_count("/cache/oic") == 0
    get(cached, path)
    response, _ = get(cached, path, {"Cache-Control": "only-if-cached"})
    assert response.status == 200


def test_request_directives(cached, origin):
    date = email.utils.formatdate(time.time() - 30, usegmt=True)
    path = cache_url("directives", "Cache-Control:max-age=100", f"Date:{date}")
    get(cached, path)
    response, _ = get(cached, path)
    assert int(response.getheader("Age")) >= 30
    assert statuses(response)[0].startswith("edge-proxy; hit")
    for directive in ("max-age=10", "min-fresh=90", "no-cache"):
        response, body = get(cached, path, {"Cache-Control": directive})
        assert statuses(response)[0].startswith("edge-proxy; fwd="), directive
    # max-stale accepts an expired entry unless it must be revalidated.
    stale = cache_url("maxstale", "Cache-Control:max-age=1", "Age:5")
    get(cached, stale)
    response, _ = get(cached, stale, {"Cache-Control": "max-stale=60", "X-Request-Id": "max-stale"})
    assert statuses(response)[0].startswith("edge-proxy; hit; ttl=-")
    assert record_of(cached, "max-stale")["cache_status"] == "STALE"
    strict = cache_url("mustreval", "Cache-Control:max-age=1, must-revalidate", "Age:5")
    get(cached, strict)
    response, _ = get(cached, strict, {"Cache-Control": "max-stale=60"})
    assert statuses(response)[0].startswith("edge-proxy; fwd=stale")


def test_stale_entry_revalidated_with_304(cached, origin):
    path = cache_url("reval", "Cache-Control:max-age=0", "X-Version:1", etag='"e1"')
    _, body = get(cached, path)
    assert statuses(get(cached, path)[0])[0] == "edge-proxy; fwd=stale; fwd-status=304; ttl=0"
    response, again = get(cached, path)
    assert again == body  # the stored body, not a new one
    assert origin.cache_count("/cache/reval") == 3
    last = origin.requests[-1]
    assert last.header("If-None-Match") == '"e1"'
    assert record_of(cached, last.header("X-Request-Id"))["cache_status"] == "REVALIDATED"


def test_client_conditional_answered_304_from_a_fresh_entry(cached, origin):
    path = cache_url("cond", "Cache-Control:max-age=60", etag='"c1"')
    get(cached, path)
    response, body = get(cached, path, {"If-None-Match": '"c1"'})
    assert response.status == 304 and body == b""
    assert response.getheader("ETag") == '"c1"'
    assert origin.cache_count("/cache/cond") == 1


def test_unsafe_method_invalidates_target_and_location(cached, origin):
    path = cache_url("unsafe", "Cache-Control:max-age=60")
    other = cache_url("unsafe-other", "Cache-Control:max-age=60")
    get(cached, path)
    get(cached, other)
    post = cache_url("unsafe", f"Location:{other}")
    # The POST's target is ``post``; invalidating it must also remove ``other`` (Location).
    get(cached, post)  # a GET first: ``post`` stores nothing (no freshness)
    response, _ = cached.request("POST", post, body=b"x", headers={"Host": "h"})
    assert response.status == 200
    assert statuses(get(cached, path)[0])[0].startswith("edge-proxy; hit")  # another target
    response, _ = cached.request("POST", path, body=b"x")
    assert statuses(get(cached, path)[0])[0].startswith("edge-proxy; fwd=uri-miss")


# -- purge ---------------------------------------------------------------------------


def test_purge_across_workers_and_idempotent(cached, origin):
    path = cache_url("purge", "Cache-Control:max-age=300", "Vary:Accept", vary_echo="Accept")
    for accept in ("a", "b"):
        get(cached, path, {"Accept": accept})
        assert statuses(get(cached, path, {"Accept": accept})[0])[0].startswith("edge-proxy; hit")
    host = f"127.0.0.1:{cached.port}"
    for _ in (1, 2):
        result = cached.hook("messagehandler", "purge", f"http://{host}{path}")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("purged")
    # Straight after the hook returns, no worker has it: two connections held open at once.
    conns = [cached.connection(), cached.connection()]
    for conn, accept in zip(conns, "ab", strict=True):
        conn.request("GET", path, headers={"Accept": accept})
        response = conn.getresponse()
        response.read()
        assert statuses(response)[0].startswith("edge-proxy; fwd="), statuses(response)
    for conn in conns:
        conn.close()


def test_purge_and_ban_without_a_cache(make_proxy, tmp_path):
    proxy = make_proxy(env={"PROXY_CACHE_DIR": str(tmp_path / "none")}, start=False)
    result = proxy.hook("messagehandler", "purge", "http://example.com/x")
    assert (result.returncode, result.stderr) == (0, "")
    assert not (tmp_path / "none").exists()
    assert proxy.hook("messagehandler", "purge", "not a url").returncode != 0


# -- persistence, corruption, eviction ----------------------------------------------------


def test_survives_reload_and_restart(make_proxy, tmp_path, origin):
    proxy = make_cached(make_proxy, tmp_path)
    path = cache_url("persist", "Cache-Control:max-age=300")
    host = {"Host": "persist.example"}
    _, body = get(proxy, path, host)
    assert proxy.hook("update").returncode == 0
    assert statuses(get(proxy, path, host)[0])[0].startswith("edge-proxy; hit")
    proxy.stop()
    again = make_proxy(env={"WEB_CONCURRENCY": "2", "PROXY_CACHE_DIR": str(tmp_path / "cache")}, config=CACHE_ON)
    response, second = get(again, path, host)
    assert second == body and statuses(response)[0].startswith("edge-proxy; hit")
    assert origin.cache_count("/cache/persist") == 1


def test_reload_applies_a_new_cache_policy_and_keeps_what_still_qualifies(make_proxy, tmp_path, origin):
    """A reload that changes [cache]: entries the new policy still allows are
    hits, a path it now bypasses is not served from the cache, and a lower
    max_size evicts down to it at once."""
    proxy = make_cached(make_proxy, tmp_path)
    keep = cache_url("policy-keep", "Cache-Control:max-age=300", size="300000")
    old = cache_url("policy-old", "Cache-Control:max-age=300", size="300000")
    api = cache_url("policy-api", "Cache-Control:max-age=300")
    for path in (old, keep, api):
        get(proxy, path)
    (proxy.config_dir / "proxy.toml").write_text(
        CACHE_ON + 'max_size = 1048576\nmax_object_size = 400000\nbypass_paths = ["/cache/policy-api"]\n'
    )
    # Grow the cache past the new limit first: the reload must evict it down.
    extra = [cache_url(f"policy-extra{n}", "Cache-Control:max-age=300", size="300000") for n in range(2)]
    for path in extra:
        get(proxy, path)
    assert proxy.hook("update").returncode == 0
    assert sum(p.stat().st_size for p in entry_files(tmp_path / "cache")) <= 1048576
    assert statuses(get(proxy, keep)[0])[0].startswith("edge-proxy; hit")
    assert statuses(get(proxy, api)[0]) == ["edge-proxy; fwd=bypass"]
    assert statuses(get(proxy, old)[0])[0].startswith("edge-proxy; fwd=uri-miss")
    assert origin.cache_count("/cache/policy-keep") == 1
    assert origin.cache_count("/cache/policy-api") == 2


def entry_files(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (cache_dir / "objects").rglob("*") if p.is_file())


def later_write_shows(file: Path) -> bool:
    """Whether a write now gets an mtime other than ``file``'s (the file
    system's clock has ticked since it was written)."""
    probe = file.parent / ".mtime-probe"
    probe.write_bytes(b"")
    try:
        return probe.stat().st_mtime_ns != file.stat().st_mtime_ns
    finally:
        probe.unlink()


@pytest.mark.parametrize("served_first", [False, True], ids=["fresh", "served-first"])
@pytest.mark.parametrize("damage", ["truncate", "overwrite", "foreign"])
def test_corrupt_entry_is_a_miss_and_removed(cached, origin, damage, served_first):
    """``served-first``: both workers have served the entry (and remember its
    header as verified) before it is damaged."""
    cache_dir = Path(cached.env["PROXY_CACHE_DIR"])
    name = f"corrupt-{damage}-{served_first}"
    path = cache_url(name, "Cache-Control:max-age=300", size="50000")
    before = set(entry_files(cache_dir))
    get(cached, path)
    (file,) = set(entry_files(cache_dir)) - before
    if served_first:
        held = [cached.connection() for _ in range(4)]  # held open: spread over both workers
        for conn in held:
            conn.request("GET", path)
            response = conn.getresponse()
            assert response.read() == pattern_bytes(50000)
            assert statuses(response)[0].startswith("edge-proxy; hit")
        for conn in held:
            conn.close()
        wait_for(lambda: later_write_shows(file), what="the file system's clock to tick")
    if damage == "truncate":
        os.truncate(file, file.stat().st_size - 100)
    elif damage == "overwrite":
        with file.open("r+b") as f:
            f.write(b"garbage!" * 8)
    else:
        other = next(iter(before)) if before else None
        file.write_bytes(other.read_bytes() if other else b"not a cache file")
    response, body = get(cached, path)
    assert statuses(response)[0].startswith("edge-proxy; fwd=uri-miss; stored")
    assert body == pattern_bytes(50000)
    assert not file.exists()
    assert "corrupt entry file" in cached.error_log()


def hits_on_both_workers(proxy: Proxy, path: str, body: bytes) -> set[int]:
    """Ask over four connections held open at once (spread over both
    workers); each answer must be a hit with ``body``. The workers' pids."""
    held = [proxy.connection() for _ in range(4)]
    pids = set()
    for n, conn in enumerate(held):
        request_id = f"both-{path}-{n}-{time.monotonic_ns()}"
        conn.request("GET", path, headers={"X-Request-Id": request_id})
        response = conn.getresponse()
        assert response.read() == body
        assert statuses(response)[0].startswith("edge-proxy; hit"), statuses(response)
        pids.add(record_of(proxy, request_id)["worker_pid"])
    for conn in held:
        conn.close()
    return pids


def test_small_bodies_are_served_from_the_workers_verified_copy(cached, origin):
    """A body up to MEMORY_BODY_BYTES is read and verified once per worker,
    then served from that copy while its index row lives: damage to its file
    since then reaches no client, and a purge still holds at once."""
    cache_dir = Path(cached.env["PROXY_CACHE_DIR"])
    size = cache_store.MEMORY_BODY_BYTES
    path = cache_url("small-copy", "Cache-Control:max-age=300", size=str(size))
    before = set(entry_files(cache_dir))
    get(cached, path)
    (file,) = set(entry_files(cache_dir)) - before
    assert len(hits_on_both_workers(cached, path, pattern_bytes(size))) == 2
    os.truncate(file, file.stat().st_size - 100)  # a file read now fails verification
    assert len(hits_on_both_workers(cached, path, pattern_bytes(size))) == 2
    assert file.name not in cached.error_log()  # never read again, never found corrupt
    assert origin.cache_count("/cache/small-copy") == 1
    result = cached.hook("messagehandler", "purge", f"http://127.0.0.1:{cached.port}{path}")
    assert result.returncode == 0, result.stderr
    response, body = get(cached, path)
    assert statuses(response)[0].startswith("edge-proxy; fwd=uri-miss; stored") and body == pattern_bytes(size)
    assert origin.cache_count("/cache/small-copy") == 2


def test_a_row_deleted_behind_the_proxys_back_is_noticed_within_a_second(cached, origin):
    """A writer that does not move the shared generation (here: another
    program on the index) is noticed all the same: a worker trusts the rows
    it remembers for ROWS_TRUSTED_S only."""
    cache_dir = Path(cached.env["PROXY_CACHE_DIR"])
    path = cache_url("backstop", "Cache-Control:max-age=300", size="1000")
    get(cached, path)
    hits_on_both_workers(cached, path, pattern_bytes(1000))
    db = sqlite3.connect(cache_store.index_path(cache_dir), timeout=10)
    try:
        db.execute("DELETE FROM entries WHERE target = ?", (path,))
        db.commit()
    finally:
        db.close()
    deadline = time.monotonic() + cache_store.ROWS_TRUSTED_S + 3  # well before TOUCH_INTERVAL_S rereads

    def both_miss() -> bool:
        conns = [cached.connection() for _ in range(4)]
        try:
            for conn in conns:
                conn.request("GET", path, headers={"Cache-Control": "only-if-cached"})
            answers = [conn.getresponse() for conn in conns]
            for response in answers:
                response.read()
            return all(response.status == 504 for response in answers)
        finally:
            for conn in conns:
                conn.close()

    wait_for(both_miss, timeout=deadline - time.monotonic(), what="both workers to notice the deleted row")


def test_eviction_at_max_size(make_proxy, tmp_path, origin):
    proxy = make_cached(make_proxy, tmp_path, config=CACHE_ON + "max_size = 1048576\nmax_object_size = 400000\n")
    paths = [cache_url(f"evict{n}", "Cache-Control:max-age=300", size="300000") for n in range(5)]
    for path in paths:
        get(proxy, path)
        total = sum(p.stat().st_size for p in entry_files(tmp_path / "cache"))
        assert total <= 1048576
    assert statuses(get(proxy, paths[-1])[0])[0].startswith("edge-proxy; hit")
    assert statuses(get(proxy, paths[0])[0])[0].startswith("edge-proxy; fwd=uri-miss")
    big = cache_url("evictbig", "Cache-Control:max-age=300", size="500000")
    get(proxy, big)
    assert statuses(get(proxy, big)[0]) == ["edge-proxy; fwd=uri-miss; detail=size"]


def test_full_disk_passes_through_and_logs_once(make_proxy, tmp_path, origin):
    """RLIMIT_FSIZE (inherited by the master and workers, SIGXFSZ ignored)
    makes every write past 256 KiB fail with EFBIG, as a full disk would."""
    proxy = make_proxy(env={"PROXY_CACHE_DIR": str(tmp_path / "cache")}, config=CACHE_ON, start=False)

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    import subprocess
    import sys

    from conftest import ROOT

    proxy.process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
        cwd=ROOT,
        env=proxy.env,
        stdout=proxy.stdout_path.open("wb"),
        stderr=proxy.stderr_path.open("wb"),
        preexec_fn=limited,
    )
    proxy.wait_ready()
    for n in range(3):
        path = cache_url(f"full{n}", "Cache-Control:max-age=300", size="600000")
        response, body = get(proxy, path)
        assert response.status == 200 and body == pattern_bytes(600000)
    log = proxy.error_log()
    assert log.count("passing through") == 1, log


# -- Age through a chain of two caching proxies -----------------------------------------


def test_age_through_a_chain(make_proxy, tmp_path, origin):
    inner = make_proxy(env={"PROXY_CACHE_DIR": str(tmp_path / "inner")}, config=CACHE_ON, name="inner")
    outer = make_proxy(
        env={"PROXY_CACHE_DIR": str(tmp_path / "outer"), "NEXT_HOP": f"127.0.0.1:{inner.port}"},
        config=CACHE_ON,
        name="outer",
    )
    path = cache_url("chain", "Cache-Control:max-age=100", "Age:30")
    response, body = get(outer, path)
    assert len(statuses(response)) == 2
    assert statuses(response)[0].startswith("edge-proxy; fwd=uri-miss; stored")  # inner's, then outer's
    assert statuses(response)[1].startswith("edge-proxy; fwd=uri-miss; stored")
    response, again = get(outer, path)
    assert again == body
    assert int(response.getheader("Age")) >= 30
    assert int(statuses(response)[0].rsplit("ttl=", 1)[1]) <= 70
    origin_count = origin.cache_count("/cache/chain")
    response, _ = get(inner, path, {"Host": f"127.0.0.1:{outer.port}"})
    assert int(response.getheader("Age")) >= 30 and statuses(response)[0].startswith("edge-proxy; hit")
    assert origin.cache_count("/cache/chain") == origin_count == 1


# -- configuration ------------------------------------------------------------------------


def test_validate_reports_bad_cache_values(make_proxy):
    proxy = make_proxy(
        config='[cache]\nenabled = "yes"\nmax_size = -1\nmax_variants = 1000\nbypass_paths = ["x"]\ncolour = 1\n',
        start=False,
    )
    result = proxy.hook("validate")
    assert result.returncode != 0
    for key, line in (("enabled", 2), ("max_size", 3), ("max_variants", 4), ("bypass_paths", 5), ("colour", 6)):
        assert f"proxy.toml:{line}: cache.{key}:" in result.stderr, result.stderr


def test_unusable_cache_dir_stops_start_up(make_proxy, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proxy = make_proxy(env={"PROXY_CACHE_DIR": str(blocker / "cache")}, config=CACHE_ON, start=False)
    proxy.start(wait=False)
    assert proxy.process.wait(30) != 0
    assert "PROXY_CACHE_DIR=" in proxy.error_log() + proxy.stderr()


def test_index_lookup_uses_the_index(cached):
    db = sqlite3.connect(Path(cached.env["PROXY_CACHE_DIR"]) / "index.sqlite3")
    plan = db.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM entries WHERE host = ? AND target = ? AND scheme = ?", ("h", "/", "http")
    ).fetchall()
    db.close()
    assert "USING INDEX entries_url" in str(plan)


def test_ban_across_workers(cached, origin):
    """Runs once proxy/ban.py (the ban helper's module) is in the tree."""
    pytest.importorskip("proxy.ban")
    keep = cache_url("ban-keep", "Cache-Control:max-age=300")
    gone = cache_url("ban-gone", "Cache-Control:max-age=300", "X-Group:doomed")
    for path in (keep, gone):
        get(cached, path)
    bad = cached.hook("messagehandler", "ban", "obj.http.x-group ==")
    assert bad.returncode != 0 and "offset" in bad.stderr
    result = cached.hook("messagehandler", "ban", 'obj.http.x-group == "doomed" && req.url ~ "^/cache/ban-"')
    assert result.returncode == 0, result.stderr
    conns = [cached.connection(), cached.connection()]
    for conn, (path, expected) in zip(
        conns, ((gone, "edge-proxy; fwd=uri-miss"), (keep, "edge-proxy; hit")), strict=True
    ):
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        assert statuses(response)[0].startswith(expected)
        conn.close()


# -- ranges (issue 16) ----------------------------------------------------------------------


def multipart_parts(response, body: bytes) -> list[tuple[str, bytes]]:
    """(Content-Range, bytes) of each part of a multipart/byteranges body."""
    import email.parser
    import email.policy

    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + response.getheader("Content-Type").encode() + b"\r\n\r\n" + body
    )
    return [(part["Content-Range"], part.get_payload(decode=True)) for part in message.iter_parts()]


@pytest.mark.parametrize(
    "size", [300000, cache_store.MEMORY_BODY_BYTES - 1000], ids=["from-the-file", "from-the-workers-copy"]
)
def test_ranges_from_a_stored_entry_are_byte_exact(cached, origin, size):
    modified = email.utils.formatdate(time.time() - 3600, usegmt=True)
    date = email.utils.formatdate(time.time(), usegmt=True)
    name = f"ranges-{size}"
    path = cache_url(
        name,
        "Cache-Control:max-age=300",
        "Content-Type:application/x-test",
        f"Last-Modified:{modified}",
        f"Date:{date}",
        size=str(size),
        etag='"r1"',
    )
    whole = pattern_bytes(size)
    # A Range miss is forwarded as it is; this origin ignores Range and
    # sends the whole body (200), which is stored as the full entry it is.
    response, body = get(cached, path, {"Range": "bytes=0-9"})
    assert response.status == 200 and body == whole
    assert origin.requests[-1].header("Range") == "bytes=0-9"

    response, body = get(cached, path, {"Range": "bytes=1000-1999"})
    assert response.status == 206 and body == whole[1000:2000]
    assert response.getheader("Content-Range") == f"bytes 1000-1999/{size}"
    assert response.getheader("Content-Length") == "1000"
    assert statuses(response)[0].startswith("edge-proxy; hit")

    response, body = get(cached, path, {"Range": "bytes=-500"})
    assert (response.status, body) == (206, whole[-500:])
    assert response.getheader("Content-Range") == f"bytes {size - 500}-{size - 1}/{size}"

    response, body = get(cached, path, {"Range": f"bytes={size - 10}-"})
    assert (response.status, body) == (206, whole[size - 10 :])

    late = size * 2 // 3
    response, body = get(cached, path, {"Range": f"bytes={late}-{late + 99}, 0-99"})
    assert response.status == 206
    assert response.getheader("Content-Type").startswith("multipart/byteranges; boundary=")
    assert int(response.getheader("Content-Length")) == len(body)
    assert multipart_parts(response, body) == [
        (f"bytes 0-99/{size}", whole[:100]),
        (f"bytes {late}-{late + 99}/{size}", whole[late : late + 100]),
    ]
    assert all(p.count(b"Content-Type: application/x-test") for p in body.split(b"Content-Range")[:-1])

    response, body = get(cached, path, {"Range": f"bytes={size}-"})
    assert (response.status, body) == (416, b"")
    assert response.getheader("Content-Range") == f"bytes */{size}"

    response, body = get(cached, path, {"Range": "bytes=10-19", "If-Range": '"r1"'})
    assert (response.status, body) == (206, whole[10:20])
    response, body = get(cached, path, {"Range": "bytes=10-19", "If-Range": '"other"'})
    assert (response.status, body) == (200, whole)  # the validator changed: the whole body
    response, body = get(cached, path, {"Range": "bytes=10-19", "If-Range": modified})
    assert (response.status, body) == (206, whole[10:20])
    response, body = get(cached, path, {"Range": "bytes=10-19", "If-Range": date})
    assert (response.status, body) == (200, whole)

    response, body = get(cached, path, {"Range": "bytes=10-19"}, method="HEAD")  # Range is for GET only
    assert response.status == 200 and response.getheader("Content-Length") == str(size)
    assert origin.cache_count(f"/cache/{name}") == 1


def test_a_206_from_next_hop_is_not_stored(cached, origin):
    path = cache_url("partial", "Cache-Control:max-age=300", "Content-Range:bytes 0-9/100", status="206")
    for _ in (1, 2):
        response, _body = get(cached, path, {"Range": "bytes=0-9"})
        assert response.status == 206
        assert statuses(response) == ["edge-proxy; fwd=uri-miss; detail=status"]
    assert origin.cache_count("/cache/partial") == 2


# -- hits by sendfile(2) --------------------------------------------------------------------


def written(pids: list[int]) -> int:
    """Bytes these processes passed to write-type system calls (``wchar`` of
    /proc/PID/io). sendfile(2) counts there; send(2) on a socket does not."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("wchar:"):
                total += int(line.split()[1])
    return total


def test_a_hit_is_sent_with_sendfile(cached, origin):
    """What this proves: the proxy writes to client sockets with send(2),
    which /proc/PID/io does not count in ``wchar``; only sendfile(2) (or a
    write to a file) does. A 2 MiB hit raising the workers' ``wchar`` by at
    least 2 MiB, with nothing stored meanwhile, went out by sendfile."""
    size = 2 * 1024 * 1024
    path = cache_url("sendfile", "Cache-Control:max-age=300", size=str(size))
    get(cached, path)
    workers = cached.workers()
    before = written(workers)
    response, body = get(cached, path, {"X-Request-Id": "sendfile-hit"})
    assert body == pattern_bytes(size) and statuses(response)[0].startswith("edge-proxy; hit")
    record = record_of(cached, "sendfile-hit")
    assert written(workers) - before >= size
    assert record["response_body_bytes"] == size and record["outcome"] == "ok"
    assert record["bytes"] > size
    # A plain pass-through answer of the same size does not (the control).
    before = written(workers)
    _, body = get(cached, f"/bytes/{size}")
    assert len(body) == size
    assert written(workers) - before < size // 4


# -- surrogate keys ----------------------------------------------------------------------------


def test_surrogate_key_purge_across_workers(cached, origin):
    paths = {
        name: cache_url(f"skey-{name}", "Cache-Control:max-age=300", f"Surrogate-Key:{keys}")
        for name, keys in (("a", "grp-1 grp-2"), ("b", "grp-2"), ("c", "grp-3"))
    }
    for path in paths.values():
        response, _ = get(cached, path)
        assert response.getheader("Surrogate-Key") is None
        response, _ = get(cached, path)
        assert statuses(response)[0].startswith("edge-proxy; hit")
        assert response.getheader("Surrogate-Key") is None
    unstored = cache_url("skey-unstored", "Surrogate-Key:grp-1")
    assert get(cached, unstored)[0].getheader("Surrogate-Key") is None  # stripped, stored or not

    def served(names: str) -> list[str]:
        conns = [cached.connection(), cached.connection()]  # both workers, at once
        out = []
        for name in names:
            for conn in conns:
                conn.request("GET", paths[name])
                response = conn.getresponse()
                response.read()
                out.append(statuses(response)[0].split(";")[1].strip())
        for conn in conns:
            conn.close()
        return out

    result = cached.hook("messagehandler", "purge-key", "grp-1")
    assert (result.returncode, result.stdout.strip()) == (0, "purged 1 entries"), result.stderr
    assert served("abc") == ["fwd=uri-miss", "hit", "hit", "hit", "hit", "hit"]
    result = cached.hook("messagehandler", "purge-key", "grp-2 grp-9")
    assert (result.returncode, result.stdout.strip()) == (0, "purged 2 entries"), result.stderr
    assert served("bc")[0] == "fwd=uri-miss" and served("c") == ["hit", "hit"]
    again = cached.hook("messagehandler", "purge-key", "grp-2", "grp-9")
    assert (again.returncode, again.stdout.strip()) == (0, "purged 1 entries")  # b was stored again
    assert cached.hook("messagehandler", "purge-key").returncode != 0


def test_purge_key_and_cache_stats_without_a_cache(make_proxy, tmp_path):
    proxy = make_proxy(env={"PROXY_CACHE_DIR": str(tmp_path / "none")}, start=False)
    result = proxy.hook("messagehandler", "purge-key", "some-tag")
    assert (result.returncode, result.stderr) == (0, "")
    result = proxy.hook("messagehandler", "cache-stats")
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout).values()) == {0}
    assert not (tmp_path / "none").exists()


# -- counters -----------------------------------------------------------------------------------


def test_cache_stats_count_known_traffic(make_proxy, tmp_path, origin):
    proxy = make_cached(make_proxy, tmp_path)
    stored = cache_url("stats", "Cache-Control:max-age=300", size="1000")
    expired = cache_url("stats-expired", "Cache-Control:max-age=0", etag='"s1"')
    get(proxy, stored)  # miss
    get(proxy, stored)  # hit
    get(proxy, stored, {"Range": "bytes=0-9"})  # hit
    get(proxy, cache_url("stats-nostore"))  # miss, not stored
    get(proxy, expired)  # miss
    get(proxy, expired)  # revalidated (304)
    get(proxy, "/plain", method="POST")  # not counted (method)
    assert proxy.hook("messagehandler", "purge", "/nothing-here").returncode == 0

    def stats() -> dict:
        result = proxy.hook("messagehandler", "cache-stats")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    expected = {"hits": 2, "misses": 3, "revalidated": 1, "stale": 0, "collapsed": 0, "evictions": 0}
    expected |= {"purges": 1, "bans": 0, "entries": 2}
    wait_for(lambda: {k: v for k, v in stats().items() if k != "bytes_stored"} == expected, what=f"{expected}")
    assert stats()["bytes_stored"] > 1000
    proxy.stop()
    assert stats()["hits"] == 2  # on disk, with no proxy running


def test_lookup_and_tag_queries_use_indexes(cached):
    """The lookup statement itself (and purge-key's) through an index, no table
    scan: their cost does not grow with the number of entries or bans."""
    from proxy.cache_store import LOOKUP_SQL, TAGGED_SQL

    db = sqlite3.connect(Path(cached.env["PROXY_CACHE_DIR"]) / "index.sqlite3")
    lookup = str(db.execute("EXPLAIN QUERY PLAN " + LOOKUP_SQL, ("h", "/", "http", 256)).fetchall())
    tagged = str(db.execute("EXPLAIN QUERY PLAN " + TAGGED_SQL.format("?,?"), ("a", "b")).fetchall())
    db.close()
    assert "USING INDEX entries_url" in lookup and "SCAN" not in lookup, lookup
    assert "SCAN" not in tagged and "USING" in tagged, tagged


def test_response_header_rules_of_today_on_a_hit_stored_under_others(make_proxy, tmp_path, origin):
    """[response_headers] apply above the cache: a reload's new rule reaches
    entries stored before it; the proxy's own answers get no rule."""
    rule = '[response_headers]\nremove = ["X-Gone"]\n\n[response_headers.set]\n"X-Rule" = "{}"\n'
    proxy = make_cached(make_proxy, tmp_path, CACHE_ON + rule.format("A"))
    path = cache_url("rules", "Cache-Control:max-age=300", "X-Gone:1")
    response, body = get(proxy, path)
    assert response.getheader("X-Rule") == "A" and response.getheader("X-Gone") is None
    response, _ = get(proxy, path)
    assert statuses(response)[0].startswith("edge-proxy; hit") and response.getheader("X-Rule") == "A"
    (proxy.config_dir / "proxy.toml").write_text(CACHE_ON + rule.format("B"))
    assert proxy.hook("update").returncode == 0
    response, again = wait_for(
        lambda: (answer := get(proxy, path))[0].getheader("X-Rule") == "B" and answer,
        what="the hit served with rule B",
    )
    assert statuses(response)[0].startswith("edge-proxy; hit") and again == body
    assert response.getheader("X-Gone") is None
    assert origin.cache_count("/cache/rules") == 1
    refused, _ = get(proxy, cache_url("rules-none"), {"Cache-Control": "only-if-cached"})
    assert refused.status == 504 and refused.getheader("X-Rule") is None


def test_entries_survive_the_death_of_every_worker(cached, origin):
    path = cache_url("survivor", "Cache-Control:max-age=300")
    _, body = get(cached, path)
    old = set(cached.workers())
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: len(set(cached.workers()) - old) == 2, what="two new workers")
    wait_for(lambda: cached.request("GET", "/ready")[0].status == 200, what="the new workers serving")
    response, again = get(cached, path)
    assert again == body and statuses(response)[0].startswith("edge-proxy; hit")
    assert origin.cache_count("/cache/survivor") == 1


def test_hostile_keys_stay_inside_the_cache_directory(cached, origin):
    cache_dir = Path(cached.env["PROXY_CACHE_DIR"]).resolve()
    odd = "/cache/odd/../../../../etc/passwd%00%2F..%2F?h=Cache-Control%3Amax-age%3D300&x=%FF%0A"
    for _ in (1, 2):
        response, _ = get(cached, odd)
    assert statuses(response)[0].startswith("edge-proxy; hit")
    files = [p.resolve() for p in cache_dir.rglob("*")]
    assert all(p.is_relative_to(cache_dir) for p in files)
    assert all("passwd" not in p.name and ".." not in p.name for p in files)
    # A target past the request-line limit never reaches the cache (414).
    long = cache_url("long", "Cache-Control:max-age=300") + "&pad=" + "a" * 8200
    response, _ = get(cached, long)
    assert response.status == 414 and not statuses(response)
    # Many Vary values: at most max_variants kept side by side, the index bounded.
    path = cache_url("manyvary", "Cache-Control:max-age=300", "Vary:X-V")
    for n in range(40):
        get(cached, path, {"X-V": str(n)})
    db = sqlite3.connect(cache_store.index_path(cache_dir))
    try:
        rows = db.execute("SELECT COUNT(*) FROM entries WHERE target LIKE '/cache/manyvary%'").fetchone()[0]
    finally:
        db.close()
    assert 1 <= rows <= 16


def test_a_client_abort_mid_fill_is_never_stored(cached, origin):
    size = 4_000_000  # the rest, after the abort, is many blocks: the proxy's writes fail long before the last
    name = "/cache/abort-fill"
    path = cache_url("abort-fill", "Cache-Control:max-age=300", size=str(size), hold="body")
    release = origin.hold(name)
    conn = cached.connection(timeout=30)
    conn.request("GET", path, headers={"X-Request-Id": "abort-fill-1"})
    response = conn.getresponse()
    assert response.read(1000) == pattern_bytes(1000)  # the fill is streaming
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-body
    conn.close()
    release.set()  # next-hop goes on sending; the proxy learns of the abort on its next writes
    record = record_of(cached, "abort-fill-1")
    assert record["outcome"] == "client_abort" and record["cache_status"] == "MISS"
    again, body = get(cached, path, headers={"X-Request-Id": "abort-fill-2"})
    assert body == pattern_bytes(size)
    assert statuses(again)[0].startswith("edge-proxy; fwd=uri-miss; stored")
    assert origin.cache_count(name) == 2

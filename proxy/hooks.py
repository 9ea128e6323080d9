"""The platform's hook commands (``/opt/section/*.sh`` call these).

``python -m proxy.hooks validate|update|logrotate|message NAME [ARGS]``

Exit status and streams follow the platform contract: success is exit 0;
failure is a non-zero exit with the reason on stderr (stdout is ignored).
``validate`` prints nothing at all when the configuration is valid.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from . import cache_config, cache_store, config
from .metrics_server import snapshot
from .settings import Settings, SettingsError, from_environ

__all__ = [
    "DRAIN_MARGIN",
    "LOGROTATE_TEMPLATE",
    "NEW_WORKERS_TIMEOUT",
    "REOPEN_RESEND",
    "REOPEN_TIMEOUT",
    "HookError",
    "ban",
    "logrotate",
    "main",
    "message",
    "purge",
    "reload",
    "reopen_logs",
    "running_master",
    "update",
    "validate",
]

LOGROTATE_TEMPLATE = Path(__file__).with_name("logrotate.conf")

#: Seconds update.sh waits for the master to fork the new workers.
NEW_WORKERS_TIMEOUT = 60.0
#: update.sh waits for the old workers this much longer than the graceful
#: timeout (they may be slow to exit once it ran out).
DRAIN_MARGIN = 10
#: Seconds logrotate.sh waits for every process to reopen its log files,
#: signalling again a process still holding a rotated one after REOPEN_RESEND.
REOPEN_TIMEOUT = 10.0
REOPEN_RESEND = 1.0


class HookError(Exception):
    """A hook failed; the message is what the platform records."""


# -- finding the running master ---------------------------------------------------


def _is_gunicorn(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"gunicorn" in cmdline


def _workers(master: int) -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == master:
                pids.add(int(entry.name))
    return pids


def running_master(settings: Settings) -> int | None:
    """The master's pid, or None when no proxy runs (no or stale pidfile)."""
    try:
        pid = int(settings.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _is_gunicorn(pid) else None


# -- validate and update ------------------------------------------------------------


def validate(settings: Settings) -> None:
    """Raise HookError listing every problem in the configuration directory.

    Reads only: the middleware module is imported (bytecode writing is off)
    to prove it loads, in this throw-away process, with its output silenced.
    """
    from .extension import check

    try:
        config.load(settings.config_dir, check_middleware=check)
    except config.ConfigError as exc:
        raise HookError(str(exc)) from None


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _catches(pid: int, sig: int) -> bool:
    """Whether ``pid`` has a handler installed for ``sig`` (``SigCgt``)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def _booted(worker: int) -> bool:
    """Whether a worker runs its own signal handlers yet. Until then it has
    the master's, inherited through fork, which queue a SIGTERM where nothing
    reads it: told to stop then, it would serve on with the old configuration
    until the master's graceful timeout. Gunicorn's workers reset SIGHUP,
    which the master catches: a worker still catching it has not got there."""
    return _alive(worker) and not _catches(worker, signal.SIGHUP)


def _started(settings: Settings, master: int, timeout: float) -> bool:
    """Wait until ``master`` and its workers have their signal handlers;
    False if the master exited first.

    Gunicorn writes the pidfile before ``on_starting`` and installs the
    master's handlers after it: a SIGHUP in between is SIGHUP's default
    action, which kills the master. A SIGHUP taken before the first workers
    are forked would be thought done as soon as they appear, although they
    run what ``on_starting`` read, perhaps before this update. And a worker
    forked a moment ago would miss the SIGTERM that retires it (``_booted``).
    """
    deadline = time.monotonic() + timeout
    waiting = False
    while True:
        workers = {pid for pid in _workers(master) if _alive(pid)}
        if _catches(master, signal.SIGHUP) and len(workers) >= settings.workers and all(map(_booted, workers)):
            return True
        if not _alive(master):
            return False
        if time.monotonic() > deadline:
            raise HookError(f"proxy master {master} still starting {timeout:g}s later; not signalled")
        if not waiting:
            print(f"waiting for proxy master {master} and its workers to finish starting", flush=True)
            waiting = True
        time.sleep(0.05)


@contextlib.contextmanager
def _one_reload_at_a_time(settings: Settings) -> Iterator[None]:
    """Deliveries of the same update (retried, or from two processes) take
    turns: the next SIGHUP waits for the workers of the previous one."""
    path = settings.run_dir / "reload.lock"
    try:
        lock = path.open("a")
    except OSError as exc:
        raise HookError(f"cannot open {path}: {exc.strerror}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def reload(settings: Settings, timeout: float = NEW_WORKERS_TIMEOUT, drain_timeout: float | None = None) -> None:
    """SIGHUP the master; return once the new generation of workers runs and
    the old one has exited.

    On SIGHUP Gunicorn re-reads gunicorn.conf.py (``on_reload`` parses the
    configuration again), forks the new workers and SIGTERMs the old ones;
    those stop accepting, finish their in-flight requests (answering each
    with ``Connection: close``) and exit. Waiting for that makes "update.sh
    returned" mean "every request from now on sees the new configuration".
    Old workers still busy after ``drain_timeout`` (long downloads, tunnels)
    are Gunicorn's to stop at its graceful timeout; that is not a failure.
    """
    if drain_timeout is None:
        drain_timeout = settings.graceful_timeout + DRAIN_MARGIN
    master = running_master(settings)
    if master is None:
        print("proxy not running: the configuration will be read when it starts")
        return
    with _one_reload_at_a_time(settings):
        _reload(settings, master, timeout, drain_timeout)


def _reload(settings: Settings, master: int, timeout: float, drain_timeout: float) -> None:
    if not _started(settings, master, timeout):
        print(f"proxy master {master} exited while starting: the configuration will be read when it starts")
        return
    before = {pid for pid in _workers(master) if _alive(pid)}
    try:
        os.kill(master, signal.SIGHUP)
    except ProcessLookupError:
        print("proxy not running: the configuration will be read when it starts")
        return
    except PermissionError:
        raise HookError(f"not allowed to signal the proxy master {master} (run the hook as its user or root)")
    deadline = time.monotonic() + timeout
    while not {pid for pid in _workers(master) if _alive(pid)} - before:
        if not _alive(master):
            raise HookError(f"proxy master {master} exited during reload")
        if time.monotonic() > deadline:
            raise HookError(f"proxy master {master} started no new workers within {timeout:g}s of SIGHUP")
        time.sleep(0.05)
    deadline = time.monotonic() + drain_timeout
    while any(_alive(pid) for pid in before):
        if time.monotonic() > deadline:
            print(f"reloaded; old workers still finishing requests after {drain_timeout:g}s")
            return
        time.sleep(0.05)
    print(f"reloaded: master {master} runs a new generation of workers")


def update(settings: Settings) -> None:
    validate(settings)
    reload(settings)


# -- logs -------------------------------------------------------------------------------


#: Where logrotate is looked for when it is not on PATH (the platform may run
#: hooks with a PATH that lacks the sbin directories Debian installs it in).
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")

FileId = tuple[int, int]


def _file_id(path: Path) -> FileId | None:
    """(device, inode) of ``path``, or None if it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _open_by(pids: set[int], files: set[FileId]) -> set[int]:
    """The processes among ``pids`` holding a descriptor on one of ``files``
    (identified by inode, so renamed, compressed or deleted files count)."""
    holders = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in files:
                holders.add(pid)
                break
    return holders


def reopen_logs(master: int, rotated: set[FileId], timeout: float = REOPEN_TIMEOUT) -> None:
    """SIGUSR1 the master (it reopens its files, then SIGUSR1s each worker to
    reopen theirs) and return once no process of the proxy holds a rotated
    file any more: after this returns nothing is written to those files.

    A process still holding one REOPEN_RESEND later is signalled again, directly
    (a worker forked just before the master reopened has the old files and
    may have missed the master's signal while it was booting).
    """
    os.kill(master, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    resend = time.monotonic() + REOPEN_RESEND
    while True:
        if not _is_gunicorn(master):
            raise HookError(f"proxy master {master} exited while reopening its log files")
        holders = _open_by({master} | _workers(master), rotated)
        if not holders:
            return
        now = time.monotonic()
        if now > deadline:
            raise HookError(
                f"log files not reopened within {timeout:g}s of SIGUSR1 to master {master}: "
                f"pids {sorted(holders)} still hold the rotated files"
            )
        if now > resend:
            for pid in holders:
                try:
                    os.kill(pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass
            resend = now + REOPEN_RESEND
        time.sleep(0.02)


def _logrotate_program() -> str:
    found = shutil.which("logrotate") or shutil.which("logrotate", path=os.pathsep.join(_SBIN_DIRS))
    if found is None:
        raise HookError(f"logrotate is not installed (not on PATH nor in {', '.join(_SBIN_DIRS)})")
    return found


def logrotate(settings: Settings) -> None:
    """Rotate the log files with logrotate, then have Gunicorn reopen them.

    Nothing to do (exit 0, nothing changed) with the stdout target or before
    the proxy has created its files. Files but no running proxy to reopen
    them is a failure, found before anything is rotated.
    """
    if settings.log_target != "file":
        return
    before = {path: _file_id(path) for path in (settings.access_log, settings.error_log)}
    if not any(before.values()):
        return
    master = _pid_for_rotation(settings)
    program = _logrotate_program()
    conf = settings.log_dir / "logrotate.conf"
    rendered = LOGROTATE_TEMPLATE.read_text().replace("@LOG_DIR@", str(settings.log_dir))
    try:
        if not conf.exists() or conf.read_text() != rendered:
            scratch = conf.with_name(conf.name + ".tmp")
            scratch.write_text(rendered)
            os.chmod(scratch, 0o644)  # logrotate refuses group/world-writable configurations
            os.replace(scratch, conf)
        result = subprocess.run(
            [program, "--force", "--state", str(settings.log_dir / "logrotate.state"), str(conf)],
            capture_output=True,
            text=True,
        )
    except OSError as exc:
        raise HookError(f"cannot run logrotate: {exc}") from None
    problems = []
    if result.returncode != 0:
        problems.append(f"logrotate failed (exit {result.returncode}): {result.stderr.strip()}")
    # Whatever logrotate managed to rename must be reopened, even if it then
    # failed: the next rotation compresses and deletes the renamed files.
    rotated = {fid for path, fid in before.items() if fid is not None and _file_id(path) != fid}
    if rotated:
        try:
            reopen_logs(master, rotated)
        except HookError as exc:
            problems.append(str(exc))
    if problems:
        raise HookError("; ".join(problems))


def _pid_for_rotation(settings: Settings) -> int:
    """The running master's pid; HookError saying why there is none."""
    try:
        raw = settings.pidfile.read_text().strip()
    except FileNotFoundError:
        raise HookError(
            f"log files exist in {settings.log_dir} but {settings.pidfile} does not: "
            "the proxy is not running, nothing could reopen rotated files"
        )
    except OSError as exc:
        raise HookError(f"cannot read {settings.pidfile}: {exc}")
    try:
        pid = int(raw)
    except ValueError:
        raise HookError(f"{settings.pidfile} holds {raw!r}, not a pid")
    if not _is_gunicorn(pid):
        raise HookError(f"{settings.pidfile} is stale: no proxy runs as pid {pid}")
    return pid


# -- messages ---------------------------------------------------------------------------


def _cache_store(settings: Settings) -> cache_store.Store | None:
    """The cache's index if one exists (whether or not the proxy runs or the
    cache is enabled now: entries on disk may be served after the next start)."""
    try:
        return cache_store.open_index(settings.cache_dir, cache_config.TABLE.defaults())
    except sqlite3.Error as exc:
        raise HookError(f"cache index {cache_store.index_path(settings.cache_dir)}: {exc}") from None


def _removed(settings: Settings, message: str, done: str, remove: Callable[[cache_store.Store], int]) -> None:
    """Run one removal on the cache index and say how many entries went;
    nothing to do (exit 0) when there is no index yet."""
    store = _cache_store(settings)
    if store is None:
        return
    try:
        count = remove(store)
    except sqlite3.Error as exc:
        raise HookError(f"{message}: cache index {cache_store.index_path(settings.cache_dir)}: {exc}") from None
    finally:
        store.close()
    print(f"{done} {count} entries")


def purge(settings: Settings, url: str) -> None:
    """Remove every variant of URL (``http[s]://host/target`` or ``//host/target``:
    that host, both schemes; ``/target``: every host). Returns once the rows
    are gone, which is when no worker finds them any more."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        host, slash, target = rest.partition("/")
    elif url.startswith("//"):
        host, slash, target = url[2:].partition("/")
    elif url.startswith("/"):
        host, slash, target = None, "/", url[1:]
    else:
        raise HookError(f"purge: expected http://host/path, //host/path or /path, got {url!r}")
    if host == "":
        raise HookError(f"purge: no host in {url!r}")
    path = "/" + target if slash else "/"
    _removed(settings, "purge", "purged", lambda store: store.invalidate(host, path, purge=True))


def ban(settings: Settings, text: str) -> None:
    """Remove every stored object the expression matches (see proxy/ban.py)."""
    from . import ban as ban_module

    try:
        ban_module.parse(text)
    except ban_module.BanSyntaxError as exc:
        raise HookError(f"ban: {exc}") from None
    _removed(settings, "ban", "banned", lambda store: store.ban(text))


def purge_key(settings: Settings, tags: list[str]) -> None:
    """Remove every stored object whose ``Surrogate-Key`` names one of ``tags``;
    returns once no worker can serve them."""
    _removed(settings, "purge-key", "purged", lambda store: store.purge_tags(tags))


def cache_stats(settings: Settings) -> None:
    """The cache's counters and gauges as one JSON object on stdout (zeros
    when there is no cache index); works whether the proxy runs or not."""
    try:
        stats = cache_store.read_stats(settings.cache_dir)
    except sqlite3.Error as exc:
        raise HookError(f"cache-stats: cache index {cache_store.index_path(settings.cache_dir)}: {exc}") from None
    print(json.dumps(stats, sort_keys=True))


def _enabled_cache_dir(settings: Settings) -> Path | None:
    """The cache directory when the configuration enables the cache (as the
    master's scrape does); None when it does not or cannot be read."""
    try:
        enabled = config.load(settings.config_dir).cache.enabled
    except config.ConfigError:
        return None
    return settings.cache_dir if enabled else None


def message(settings: Settings, name: str, args: list[str]) -> None:
    """``messagehandler.sh NAME ARGS``: ``updateenvironment`` and ``reload`` do
    what update.sh does; ``reopen-logs`` has the master and its workers reopen
    their log files (SIGUSR1; nothing to do when logging to stdout or when no
    proxy runs); ``purge URL`` and ``ban EXPR`` remove cached objects (nothing
    to do when there is no cache); ``purge-key TAG...`` removes the objects
    tagged with any of the tags; ``cache-stats`` prints the cache's counters;
    ``metrics`` prints the metrics as a scrape gets them (nothing when
    metrics are off or no proxy has run)."""
    if name == "purge-key":
        tags = " ".join(args).split()
        if not tags:
            raise HookError("purge-key: missing surrogate key")
        purge_key(settings, tags)
    elif name == "cache-stats":
        cache_stats(settings)
    elif name in ("purge", "ban"):
        if not args or not " ".join(args).strip():
            raise HookError(f"{name}: missing argument")
        (purge if name == "purge" else ban)(settings, " ".join(args).strip())
    elif name in ("updateenvironment", "reload"):
        update(settings)
    elif name == "metrics":
        sys.stdout.buffer.write(snapshot(settings.metrics_dir, lambda: _enabled_cache_dir(settings)))
    elif name == "reopen-logs":
        master = running_master(settings)
        if master is not None and settings.log_target == "file":
            try:
                os.kill(master, signal.SIGUSR1)
            except ProcessLookupError:
                pass
            except PermissionError:
                raise HookError(f"not allowed to signal the proxy master {master}")
    else:
        raise HookError(f"unknown message: {name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.dont_write_bytecode = True
    try:
        settings = from_environ()
        if not argv:
            raise HookError("usage: python -m proxy.hooks validate|update|logrotate|message NAME [ARGS]")
        command, rest = argv[0], argv[1:]
        if command == "validate":
            validate(settings)
        elif command == "update":
            update(settings)
        elif command == "logrotate":
            logrotate(settings)
        elif command == "message":
            if not rest:
                raise HookError("message: missing message name")
            message(settings, rest[0], rest[1:])
        else:
            raise HookError(f"unknown command: {command}")
    except (HookError, SettingsError) as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The platform's hook commands (``/opt/section/*.sh`` call these).

``python -m proxy.hooks validate|update|logrotate|message NAME [ARGS]``

Exit status and streams follow the platform contract: success is exit 0;
failure is a non-zero exit with the reason on stderr (stdout is ignored).
``validate`` prints nothing at all when the configuration is valid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import config
from .settings import Settings, SettingsError, from_environ

LOGROTATE_TEMPLATE = Path(__file__).with_name("logrotate.conf")


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
    """Raise HookError listing every problem in the configuration directory."""
    try:
        loaded = config.load(settings.config_dir)
    except config.ConfigError as exc:
        raise HookError(str(exc)) from None
    if loaded.middleware is not None:
        from .extension import ExtensionError, load_factory

        module, factory = loaded.middleware
        try:
            load_factory(module, factory)
        except ExtensionError as exc:
            raise HookError(str(config.Problem(module.parent / config.CONFIG_FILE, "middleware", None, str(exc))))


def reload(settings: Settings, timeout: float = 60.0) -> None:
    """SIGHUP the master and wait until a new generation of workers runs."""
    master = running_master(settings)
    if master is None:
        print("proxy not running: the configuration will be read when it starts")
        return
    before = _workers(master)
    os.kill(master, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _workers(master) - before:
            print(f"reload signalled to master {master}")
            return
        if not _is_gunicorn(master):
            raise HookError(f"proxy master {master} exited during reload")
        time.sleep(0.1)
    raise HookError(f"proxy master {master} started no new workers within {timeout:g}s of SIGHUP")


def update(settings: Settings) -> None:
    validate(settings)
    reload(settings)


# -- logs -------------------------------------------------------------------------------


def _open_by(pids: set[int], path: Path) -> bool:
    """Whether any of these processes still has ``path`` open."""
    target = str(path)
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return True
            except OSError:
                continue
    return False


def reopen_logs(settings: Settings, master: int, timeout: float = 10.0) -> None:
    """SIGUSR1 the master (it reopens, then makes each worker reopen) and
    wait until no process writes to the rotated files any more."""
    rotated = [settings.access_log.with_name(settings.access_log.name + ".1"),
               settings.error_log.with_name(settings.error_log.name + ".1")]
    os.kill(master, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = {master} | _workers(master)
        if not any(_open_by(pids, path) for path in rotated):
            return
        time.sleep(0.05)
    raise HookError(f"log files were not reopened within {timeout:g}s of SIGUSR1 to {master}")


def logrotate(settings: Settings) -> None:
    """Rotate the log files with logrotate, then have Gunicorn reopen them."""
    if settings.log_target != "file":
        return
    files = [p for p in (settings.access_log, settings.error_log) if p.exists()]
    if not files:
        return
    master = _pid_for_rotation(settings)
    conf = settings.log_dir / "logrotate.conf"
    conf.write_text(LOGROTATE_TEMPLATE.read_text().replace("@LOG_DIR@", str(settings.log_dir)))
    result = subprocess.run(
        ["logrotate", "--force", "--state", str(settings.log_dir / "logrotate.state"), str(conf)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise HookError(f"logrotate failed ({result.returncode}): {result.stderr.strip()}")
    reopen_logs(settings, master)


def _pid_for_rotation(settings: Settings) -> int:
    try:
        raw = settings.pidfile.read_text().strip()
    except FileNotFoundError:
        raise HookError(f"log files exist but {settings.pidfile} does not: cannot signal the proxy to reopen them")
    try:
        pid = int(raw)
    except ValueError:
        raise HookError(f"{settings.pidfile} holds {raw!r}, not a pid")
    if not _is_gunicorn(pid):
        raise HookError(f"{settings.pidfile} is stale: no proxy runs as pid {pid}")
    return pid


# -- messages ---------------------------------------------------------------------------


def message(settings: Settings, name: str, args: list[str]) -> None:
    if name in ("updateenvironment", "reload"):
        update(settings)
    elif name == "reopen-logs":
        master = running_master(settings)
        if master is not None and settings.log_target == "file":
            os.kill(master, signal.SIGUSR1)
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

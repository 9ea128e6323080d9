"""Collapsed misses: waiting for another request's fill, in any worker, and
following its temp file while it grows (read-while-write).

The fill's row in the shared index (``cache_store.Store.claim``) says who
fetches a URL and, once next-hop answered, where the body grows; the temp
file itself says how far it got (its size), whether it finished (its header
gets a ``done`` flag, written after the last body byte) and whether it was
abandoned (unlinked while unfinished).

A waiter costs one gevent ``Event`` wait: per process and per URL (or temp
file) a single greenlet polls the row (one indexed SELECT) or the file
(one ``fstat``), and whether the fill's owner process lives, every
``POLL_S``, and wakes that process's waiters when it changed. So the number
of waiters is unbounded and each adds no polling (measured on the shared
development machine: about 3 KiB per waiting request; one waiter 3 % of a
core, the poller, 10 000 waiters in one process 19 %; all 10 000 woken in
0.3 s).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, Generic, TypeVar

import gevent
from gevent.event import Event

from .cache_store import FillRow, Store, finished_length, pid_alive
from .sockets import BLOCK_SIZE

__all__ = ["IDLE_WAKE_S", "POLL_S", "FollowBody", "Watches", "wait_for_head"]

log = logging.getLogger("proxy")

#: How often one greenlet per process and watched fill looks at the row or file.
POLL_S = 0.01
#: Longest a follower sleeps without news (a safety net: changes wake it).
IDLE_WAKE_S = 60.0

T = TypeVar("T")


class _Watch(Generic[T]):
    """The latest value of ``probe``, polled by one greenlet while anyone watches."""

    def __init__(self, watches: Watches, key: str, probe: Callable[[], T], on_end: Callable[[], None]) -> None:
        self._watches = watches
        self._key = key
        self._probe = probe
        self._on_end = on_end
        self.value = probe()
        self.users = 0
        self._changed = Event()
        gevent.spawn(self._run)

    def _run(self) -> None:
        try:
            while self.users:
                gevent.sleep(POLL_S)
                try:
                    value = self._probe()
                except Exception as exc:  # the waiters time out or see the owner gone
                    log.warning("cache: watching %s failed: %s", self._key, exc)
                    continue
                if value != self.value:
                    self.value = value
                    changed, self._changed = self._changed, Event()
                    changed.set()
        finally:
            self._watches.drop(self._key, self)
            self._on_end()

    def wait(self, timeout: float) -> None:
        """Until the value changes, at most ``timeout`` seconds."""
        self._changed.wait(max(0.0, timeout))


class Watches:
    """This process's watches, one per watched row or temp file."""

    def __init__(self) -> None:
        self._watches: dict[str, _Watch[Any]] = {}

    @contextmanager
    def watch(self, key: str, probe: Callable[[], T], on_end: Callable[[], None] = lambda: None) -> Iterator[_Watch[T]]:
        watch = self._watches.get(key)
        if watch is None:
            watch = self._watches[key] = _Watch(self, key, probe, on_end)
        else:
            on_end()  # the existing watch has its own resources
        watch.users += 1
        try:
            yield watch
        finally:
            watch.users -= 1

    def drop(self, key: str, watch: _Watch[Any]) -> None:
        if self._watches.get(key) is watch:
            del self._watches[key]


def wait_for_head(store: Store, watches: Watches, url: str, token: str, stall_s: float) -> FillRow | None:
    """The fill's row once next-hop's head arrived or the fill ended (or the
    row now belongs to another fill); None when it made no progress for
    ``stall_s`` or its owner died: the caller goes to next-hop itself."""

    def probe() -> tuple[FillRow | None, bool]:
        row = store.fill_row(url)
        return row, row is not None and pid_alive(row.pid)

    with watches.watch(f"row {url}", probe) as watch:
        while True:
            row, alive = watch.value
            if row is None or row.token != token or row.state != "pending":
                return row
            waited = time.time() - row.beat
            if waited >= stall_s or not alive:
                return None
            watch.wait(stall_s - waited)


class FollowBody:
    """A fill's body read from its temp file as the filler writes it. A fill
    that fails (abandoned unfinished, its owner process gone) cuts the client
    connection, as a relay cut by next-hop would: never a short body passed
    off as complete."""

    __slots__ = ("_file", "_length", "_owner", "_watches", "_temp", "_environ")

    def __init__(
        self,
        file: BinaryIO,
        length: int | None,
        owner: int,
        watches: Watches,
        temp: str,
        environ: dict[str, Any],
    ) -> None:
        self._file = file
        self._length = length
        self._owner = owner
        self._watches = watches
        self._temp = temp
        self._environ = environ

    def __iter__(self) -> Iterator[bytes]:
        f, length = self._file, self._length
        fd = f.fileno()
        mine = os.dup(fd)  # the watch's own descriptor: this reader may leave first

        owner = self._owner

        def probe() -> tuple[int, int, bool]:
            st = os.fstat(mine)
            return st.st_size, st.st_nlink, pid_alive(owner)

        sent = 0
        final: int | None = None
        with self._watches.watch(f"file {self._temp}", probe, lambda: os.close(mine)) as watch:
            while length is None or sent < length:
                data = f.read(BLOCK_SIZE)
                if data:
                    sent += len(data)
                    yield data
                    continue
                if final is not None:  # finished, and read to the end after that
                    if sent == final:
                        return
                    break
                final = finished_length(fd)
                if final is not None:
                    continue
                if os.fstat(fd).st_nlink == 0 or not watch.value[2]:
                    break  # abandoned unfinished, or its owner process is gone
                watch.wait(IDLE_WAKE_S)
            else:
                return
        self._cut(sent)

    def _cut(self, sent: int) -> None:
        self._environ["proxy.exchange"].cut_short("the fill this request followed failed", sent)

    def close(self) -> None:
        self._file.close()

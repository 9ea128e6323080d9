"""Spreading client connections evenly over the workers.

Every worker accepts from the one listening socket the master opened, and
the kernel hands each new connection to whichever worker asks first. Under
a burst (a load tester opening its 50 connections at once, clients
reconnecting after a deploy) one worker can take most of them: measured
40 against 10 with 2 workers. Keep-alive connections stay where they
landed, so that worker's clients wait four times longer for their answers
while the other worker has CPU to spare.

So the workers share a small table, in memory the master maps before
forking: one slot per worker holding its count of open client connections.
A worker holding more than ``SLACK`` connections over the least busy one
pauses accepting for ``PAUSE_S`` and leaves new connections to the others.
A worker that is shutting down leaves the table (it accepts nothing more),
and one that has paused for ``MAX_PAUSE_S`` while connections kept coming
accepts them anyway: a stuck peer cannot make a worker refuse work.

Master side: ``create_table`` (once, before the first fork: Gunicorn's
``on_starting``), ``assign`` (``pre_fork``) and ``release``
(``child_exit``). Worker side: ``Share``, which the worker's accept loop
asks (``proxy.worker.BalancedServer``).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable

__all__ = ["MAX_PAUSE_S", "PAUSE_S", "SLACK", "SLOTS", "Share", "assign", "create_table", "release"]

#: Workers that can hold a slot at once (old and new ones overlap during a reload).
SLOTS = 64
#: Connections a worker may hold above the least busy worker before it pauses.
SLACK = 1
#: How long one pause lasts, and the longest run of pauses.
PAUSE_S = 0.002
MAX_PAUSE_S = 0.05

_FREE = -1
#: The table, once ``create_table`` has made it; a worker sees the one its
#: master made before forking it.
_counts: memoryview | None = None


def create_table() -> None:
    """Make the shared table (anonymous shared memory, so every worker forked
    afterwards sees the same one), every slot free. Once, in the master;
    calling it again keeps the table."""
    global _counts
    if _counts is not None:
        return
    counts = memoryview(mmap.mmap(-1, SLOTS * 8)).cast("q")
    for slot in range(SLOTS):
        counts[slot] = _FREE
    _counts = counts


def _table() -> memoryview:
    if _counts is None:
        raise RuntimeError("proxy.balance.create_table() was not called before the workers were forked")
    return _counts


def assign(workers: Iterable[object]) -> int | None:
    """A free slot for a worker about to be forked (None: it goes without)."""
    counts = _table()
    taken = {getattr(worker, "balance_slot", None) for worker in workers}
    for slot in range(SLOTS):
        if slot not in taken and counts[slot] == _FREE:
            counts[slot] = 0
            return slot
    return None


def release(slot: int | None) -> None:
    """The worker in ``slot`` has exited: its connections are gone."""
    if slot is not None:
        _table()[slot] = _FREE


class Share:
    """One worker's view of the table: counts its own connections and says
    whether it holds more than its share."""

    def __init__(self, slot: int | None) -> None:
        self.slot = slot
        self.open = 0
        #: The table, when this worker has a slot in it (only then is it read).
        self._counts = _table() if slot is not None else memoryview(b"")

    def opened(self) -> None:
        self.open += 1
        if self.slot is not None:
            self._counts[self.slot] = self.open

    def closed(self) -> None:
        self.open -= 1
        if self.slot is not None:
            self._counts[self.slot] = self.open

    def leave(self) -> None:
        """This worker accepts no more connections (it is shutting down)."""
        release(self.slot)
        self.slot = None

    def over(self) -> bool:
        """Whether another worker holds more than SLACK fewer connections."""
        if self.slot is None:
            return False
        least = self.open
        counts = self._counts
        for slot in range(SLOTS):
            count = counts[slot]
            if count != _FREE and count < least:
                least = count
        return self.open - least > SLACK

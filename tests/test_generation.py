"""The shared change counter (proxy/generation.py), across real processes."""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import os

from proxy.generation import Generation


def test_a_bump_is_seen_by_every_process_that_maps_the_file(tmp_path):
    path = tmp_path / "index.generation"
    first, second = Generation(path), Generation(path)
    try:
        assert (first.value, second.value) == (0, 0)
        assert path.stat().st_size == os.sysconf("SC_PAGESIZE")
        first.bump()
        assert (first.value, second.value) == (1, 1)
        second.bump()
        assert Generation(path).value == 2  # a later opener keeps the count
    finally:
        first.close()
        second.close()


def _bump(path: str, times: int, start: multiprocessing.synchronize.Event) -> None:
    generation = Generation(path)  # type: ignore[arg-type]
    start.wait(10)
    for _ in range(times):
        generation.bump()
    generation.close()


def test_concurrent_bumps_from_several_processes_lose_none(tmp_path):
    """Each bump is a read-modify-write; the flock makes it whole. Without
    it, two processes bumping at once lose increments."""
    path = tmp_path / "index.generation"
    Generation(path).close()
    context = multiprocessing.get_context("fork")
    start = context.Event()
    workers = [context.Process(target=_bump, args=(str(path), 5000, start)) for _ in range(3)]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert Generation(path).value == 15000

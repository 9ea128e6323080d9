"""The ``slow`` marker really takes the long tests out of ``make quick``.

``make quick`` runs ``pytest -m "not slow"``: a long test that lost its mark
(or a marker expression that selects nothing) would silently make the quick
run slow again, or a slow test would silently stop running anywhere.
"""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

#: The long tests by kind: 1 GiB transfers, load, soak, reloads and rotation under load.
LONG = {
    "tests/test_core.py::test_one_gib_download_and_upload_keep_worker_memory_bounded",
    "tests/test_hooks.py::test_ten_reloads_under_load_lose_no_request",
    "tests/test_hooks.py::test_invalid_update_under_load_changes_nothing",
    "tests/test_hooks.py::test_reloads_close_idle_keepalive_connections_cleanly",
    "tests/test_hostile.py::test_slowloris_is_cut_off_by_the_header_timeout_without_starving_others",
    "tests/test_hostile.py::test_thousands_of_idle_connections_do_not_block_new_ones",
    "tests/test_hostile.py::test_bursts_of_sigusr1_and_sighup_while_serving_fail_nothing",
    "tests/test_logs.py::test_no_line_lost_or_torn_across_rotations[json]",
    "tests/test_logs.py::test_no_line_lost_or_torn_across_rotations[ltsv]",
    "tests/test_tunnel.py::test_200_concurrent_tunnels_through_one_worker",
}
FILES = sorted({test.split("::")[0] for test in LONG})


def collected(*args: str) -> set[str]:
    """Test ids pytest selects from ``FILES`` with these options (nothing runs)."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args, *FILES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return {line for line in result.stdout.splitlines() if "::" in line}


def test_quick_run_deselects_every_long_test():
    quick = collected("-m", "not slow")
    slow = collected("-m", "slow")
    assert LONG <= slow, LONG - slow  # each is a real test, and marked
    assert not quick & LONG
    assert len(quick) > 10 * len(slow)  # the quick run is still most of the suite

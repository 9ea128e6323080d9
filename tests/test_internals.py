"""The guard on third-party internals (proxy.internals).

The declaration is checked against the installed libraries; a wrong one
names the library, its version and the piece; and a real Gunicorn start on
libraries that lack a piece stops, with the reason on stderr.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest
from conftest import ROOT

from proxy import internals
from proxy.internals import Attribute, InstanceAttribute, InternalsError, Method, Piece


def test_the_installed_libraries_have_every_declared_piece():
    internals.check(internals.BEFORE_PATCHING)
    internals.check(internals.AFTER_PATCHING)
    assert {piece.library for piece in internals.PIECES} == {
        *internals.BEFORE_PATCHING,
        *internals.AFTER_PATCHING,
    }


@pytest.mark.parametrize(
    ("piece", "says"),
    [
        (Piece("gunicorn", "gunicorn.http.wsgi", "Response._no_such", Method(2), "t"), "Response._no_such is missing"),
        (
            Piece("gunicorn", "gunicorn.http.wsgi", "Response._emit_body", Method(4), "t"),
            "Response._emit_body no longer takes 4 arguments",
        ),
        (Piece("gevent", "gevent.server", "StreamServer._no_timer", InstanceAttribute(), "t"), "no longer set by"),
        (Piece("gevent", "gevent.no_such_module", "x", Attribute(), "t"), "gevent.no_such_module cannot be imported"),
        (Piece("urllib3", "urllib3", "NoSuchPool._get_conn", Method(1), "t"), "NoSuchPool._get_conn is missing"),
    ],
)
def test_a_missing_or_changed_piece_is_named_with_library_and_version(piece, says):
    with pytest.raises(InternalsError) as raised:
        internals.check((piece.library,), (piece, *internals.PIECES))
    message = str(raised.value)
    assert f"{piece.library} {version(piece.library)}: " in message
    assert says in message
    assert len(raised.value.problems) == 1  # the real declaration holds


def test_every_problem_is_reported_at_once():
    wrong = (
        Piece("gunicorn", "gunicorn.http.wsgi", "Nope", Attribute(), "t"),
        Piece("gevent", "gevent.hub", "Hub.nope", Method(1), "t"),
    )
    with pytest.raises(InternalsError) as raised:
        internals.check(("gunicorn", "gevent"), wrong)
    assert len(raised.value.problems) == 2


def _start_with_sitecustomize(make_proxy, tmp_path, code: str, target: str):
    """Start Gunicorn exactly as the image does, with ``code`` run at
    interpreter start-up (sitecustomize) in the master and every worker."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(code)
    proxy = make_proxy(env={"PYTHONPATH": str(site), "PROXY_LOG_TARGET": target}, start=False)
    proxy.start(wait=False)
    try:
        proxy.process.wait(60)
    except subprocess.TimeoutExpired:
        raise AssertionError("the proxy started on libraries that lack a piece") from None
    return proxy


@pytest.mark.parametrize("target", ["stdout", "file"])
def test_a_missing_gunicorn_piece_stops_the_master(make_proxy, tmp_path, target):
    proxy = _start_with_sitecustomize(
        make_proxy, tmp_path, "from gunicorn.http import wsgi\ndel wsgi.Response._emit_body\n", target
    )
    assert proxy.process.returncode != 0
    stderr = proxy.stderr()
    assert f"gunicorn {version('gunicorn')}: gunicorn.http.wsgi.Response._emit_body is missing" in stderr, stderr
    assert not proxy.workers()
    if target == "file":
        assert "Response._emit_body is missing" in proxy.error_log()


def test_a_missing_urllib3_piece_stops_start_up_from_the_worker(make_proxy, tmp_path):
    """urllib3 is checked in each worker (after gevent's patching): a worker
    that finds a piece missing cannot boot, and Gunicorn's master stops."""
    code = "import urllib3\ndel urllib3.HTTPConnectionPool._put_conn\n"
    proxy = _start_with_sitecustomize(make_proxy, tmp_path, code, "file")
    assert proxy.process.returncode != 0
    stderr = proxy.stderr()
    assert f"urllib3 {version('urllib3')}: urllib3.connectionpool.HTTPConnectionPool._put_conn is missing" in stderr
    assert "HTTPConnectionPool._put_conn is missing" in proxy.error_log()


def test_importing_the_proxy_does_no_work():
    """No import-time side effects: what the master imports leaves urllib3
    (which must wait for gevent's patching) unimported, and importing every
    module leaves the shared table unmade and the pid untracked."""
    code = (
        "import sys, pkgutil, importlib, proxy\n"
        "import proxy.balance, proxy.config, proxy.internals, proxy.logs, proxy.settings, proxy.worker\n"
        "assert 'urllib3' not in sys.modules, 'urllib3 imported by the master'\n"
        "for m in pkgutil.iter_modules(proxy.__path__):\n"
        "    importlib.import_module('proxy.' + m.name)\n"
        "from proxy import balance, logs\n"
        "assert balance._counts is None, 'balance table made at import'\n"
        "assert logs.pid == 0 and not logs._tracking_pid, 'pid tracked at import'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

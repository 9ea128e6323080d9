"""The package's public surface: every module says what it exports.

mypy --strict (``make lint``) checks the types; this checks what mypy does
not: that each module of ``proxy/`` has an ``__all__`` naming only what it
defines, and that the package is marked as typed.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from conftest import ROOT

import proxy

MODULES = sorted(m.name for m in pkgutil.iter_modules(proxy.__path__))


def test_the_package_is_marked_typed() -> None:
    assert (ROOT / "proxy" / "py.typed").is_file()


@pytest.mark.parametrize("name", MODULES)
def test_each_module_declares_what_it_exports(name: str) -> None:
    module = importlib.import_module(f"proxy.{name}")
    exported = module.__dict__.get("__all__")
    assert isinstance(exported, list), f"proxy/{name}.py has no __all__"
    assert len(set(exported)) == len(exported), f"proxy/{name}.py: __all__ repeats a name"
    assert [n for n in exported if not hasattr(module, n)] == [], f"proxy/{name}.py: __all__ names what it lacks"

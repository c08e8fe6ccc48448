"""Importing the CuPy adapter without CuPy fails with an ImportError that says how to install it."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest


@pytest.mark.skipif(
    importlib.util.find_spec("cupy") is not None, reason="CuPy is installed: the missing-CuPy error cannot happen"
)
def test_import_without_cupy_says_how_to_install(monkeypatch):
    monkeypatch.delitem(sys.modules, "rbp_core.backends.cupy", raising=False)
    with pytest.raises(ImportError, match=r"needs CuPy.*pip install cupy-cuda12x") as info:
        importlib.import_module("rbp_core.backends.cupy")
    assert isinstance(info.value.__cause__, ImportError)
    assert "rbp_core.backends.cupy" not in sys.modules
    # the rest of the package is unaffected
    import rbp_core.backends.numpy  # noqa: F401

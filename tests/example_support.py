"""Support for the experiment scripts' tests: loading a script as a module, and backward methods that fail on purpose."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import rbp_core


class Amplified:
    """Original RBP on 1000 J^T: its iteration blows up, as the paper's original RBP does (a result)."""

    needs_jvp = False
    supports_warm_start = False

    def solve(
        self, vjp: Any, g: Any, *, jvp: Any = None, z0: Any = None, contraction: Any = None, throw: bool = True
    ) -> Any:
        return rbp_core.original_rbp(lambda v: 1000.0 * vjp(v), g, max_iter=20, throw=throw)


class Broken(Amplified):
    """A backward method with a bug: the scripts must report it and exit 1."""

    def solve(self, vjp: Any, g: Any, **kwargs: Any) -> Any:
        msg = "a bug in a backward method"
        raise RuntimeError(msg)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@contextlib.contextmanager
def loaded_example(name: str) -> Iterator[ModuleType]:
    """Import ``examples/<name>.py`` as a module (its folder on sys.path for ``_common``), then forget it."""
    sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"{name}_example", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)

"""Support for the experiment scripts' tests: loading a script as a module, and backward methods that fail on purpose."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import rbp_core


@dataclass(frozen=True)
class Amplified(rbp_core.OriginalRBP):
    """Original RBP on 1000 J^T: its iteration blows up, as the paper's original RBP does (a result).

    A new adjoint method is a frozen dataclass with a ``step``: here the one of original RBP on a
    scaled operator.
    """

    max_iter: int = 20
    factor: float = 1000.0
    name: ClassVar[str] = "amplified_rbp"

    def step(self, A: Any, state: Any, ops: Any) -> Any:
        z, g = state
        z_new, sq = ops.add_sqdist(self.factor * A.vjp(z), g, z)
        return (z_new, g), z_new, (sq,), ((z_new, z),)


@dataclass(frozen=True)
class Broken(Amplified):
    """A backward method with a bug: the scripts must report it and exit 1."""

    def step(self, A: Any, state: Any, ops: Any) -> Any:
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

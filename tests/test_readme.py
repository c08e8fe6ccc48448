"""The README's quick starts run and their solves succeed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def run_quick_start(marker: str, what: str, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Run the README's first Python block containing ``marker``; return the lines it printed."""
    if not README.exists():  # an installed copy of the tests without the source tree
        pytest.skip("README.md is not next to the tests")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL) if marker in b]
    assert blocks, f"the README has no {what} quick start"
    exec(compile(blocks[0], str(README), "exec"), {})  # noqa: S102 - our own README
    return [line for line in capsys.readouterr().out.split("\n") if line]


def test_quick_start_runs(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_quick_start("import numpy", "NumPy", capsys)
    assert [line.split()[:2] for line in out] == [
        ["neumann_rbp", "SUCCESS"],
        ["original_rbp", "SUCCESS"],
        ["cg_rbp", "SUCCESS"],
    ]


def test_pytorch_quick_start_runs(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch", reason="the PyTorch quick start needs torch")
    out = run_quick_start("import torch", "PyTorch", capsys)
    assert out[0].startswith("fixed_point_iteration: converged")
    assert out[1].startswith("original_rbp: converged")


def test_jax_quick_start_runs(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("jax", reason="the JAX quick start needs jax")
    (line,) = run_quick_start("import jax", "JAX", capsys)
    status, steps, shape = line.split(maxsplit=2)
    assert status == "SUCCESS"
    assert int(steps) > 1
    assert shape == "(50, 50)"

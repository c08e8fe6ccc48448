"""The README's quick start runs and its solves succeed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def test_quick_start_runs(capsys: pytest.CaptureFixture[str]) -> None:
    if not README.exists():  # an installed copy of the tests without the source tree
        pytest.skip("README.md is not next to the tests")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert blocks, "the README has no Python quick start"
    exec(compile(blocks[0], str(README), "exec"), {})  # noqa: S102 - our own README
    out = capsys.readouterr().out.split("\n")
    assert [line.split()[:2] for line in out if line] == [
        ["neumann_rbp", "SUCCESS"],
        ["original_rbp", "SUCCESS"],
        ["cg_rbp", "SUCCESS"],
    ]


def test_pytorch_quick_start_runs(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch", reason="the PyTorch quick start needs torch")
    if not README.exists():
        pytest.skip("README.md is not next to the tests")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL) if "import torch" in b]
    assert blocks, "the README has no PyTorch quick start"
    exec(compile(blocks[0], str(README), "exec"), {})  # noqa: S102 - our own README
    out = [line for line in capsys.readouterr().out.split("\n") if line]
    assert out[0].startswith("fixed_point_iteration: converged")
    assert out[1].startswith("original_rbp: converged")


def test_jax_quick_start_runs(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("jax", reason="the JAX quick start needs jax")
    if not README.exists():
        pytest.skip("README.md is not next to the tests")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL) if "import jax" in b]
    assert blocks, "the README has no JAX quick start"
    exec(compile(blocks[0], str(README), "exec"), {})  # noqa: S102 - our own README
    status, steps, shape = capsys.readouterr().out.split(maxsplit=2)
    assert status == "SUCCESS"
    assert int(steps) > 1
    assert shape.strip() == "(50, 50)"

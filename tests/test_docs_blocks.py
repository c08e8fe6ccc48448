"""Every code block of the documentation that is shown as Python either runs as a doctest or is
listed here with the reason it cannot; signatures and pseudo-code are ``text`` blocks.

The doctests themselves run through ``--doctest-glob=*.md`` (pyproject's pytest options): a block
with ``>>>`` prompts is tested. A Python block without prompts would look runnable and never run,
so it must be one of the exceptions below, and it must at least compile.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
_PYTHON = {"python", "py", "python3", "pycon", "{code-block} python", "{code} python"}

# (page, the block's first line): why the block is Python that the doc tests cannot run.
NOT_RUN = {
    ("cupy.md", "import cupy as cp"): "needs CuPy and a GPU; tests/test_cupy_backend.py runs the same calls",
    ("cupy.md", "from rbp_core.backends.cupy import implicit_gradient"): "needs CuPy and a GPU",
    ("architecture.md", "class _NumpyOps(rbp_core.VectorOps):"): "an excerpt of backends/numpy.py",
}


def python_blocks() -> list[tuple[str, int, str]]:
    """``(page, line, body)`` of every fenced block highlighted as Python, on every page."""
    blocks = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        for match in _FENCE.finditer(text):
            if match.group(1).strip() in _PYTHON:
                line = text.count("\n", 0, match.start()) + 1
                blocks.append((page.name, line, match.group(2)))
    return blocks


BLOCKS = python_blocks()


@pytest.mark.parametrize(("page", "line", "body"), BLOCKS, ids=[f"{p}:{n}" for p, n, _ in BLOCKS])
def test_python_blocks_run_or_say_why_not(page: str, line: int, body: str) -> None:
    if ">>>" in body:
        assert body.lstrip().startswith(">>>"), f"{page}:{line}: a doctest block starts with a prompt"
        return
    first = body.splitlines()[0]
    assert (page, first) in NOT_RUN, (
        f"{page}:{line}: a Python block without >>> prompts is never run; write it as a doctest, "
        "or as a ```text block if it is a signature or pseudo-code"
    )
    compile(body, f"{page}:{line}", "exec")


def test_the_exceptions_exist() -> None:
    present = {(page, body.splitlines()[0]) for page, _, body in BLOCKS}
    assert set(NOT_RUN) <= present


def test_the_architecture_excerpt_is_the_source() -> None:
    (body,) = (b for p, _, b in BLOCKS if p == "architecture.md" and b.startswith("class _NumpyOps"))
    source = (ROOT / "backends" / "numpy.py").read_text(encoding="utf-8")
    missing = [line for line in body.splitlines() if line.strip() and line not in source]
    assert not missing, f"docs/architecture.md quotes lines that backends/numpy.py no longer has: {missing}"

"""Collection rules for doctests that need an optional library (tests/conftest.py holds the backend matrix)."""

import importlib.util
import os
from typing import Any

import pytest

_GPU_KEY = pytest.StashKey[tuple[int, dict[str, str]]]()

# An adapter's modules import the library; without it there is nothing to run (docs/conftest.py lists the pages).
collect_ignore = [
    path
    for name, paths in {
        "torch": (
            "backends/torch.py",
            "backends/_torch_hook.py",
            "backends/_torch_state.py",
            "backends/_torch_training.py",
        ),
        "cupy": ("backends/cupy.py", "backends/_cupy_kernels.py"),
        "jax": ("backends/jax.py", "backends/_jax_loop.py"),
    }.items()
    if importlib.util.find_spec(name) is None
    for path in paths
]


# --- GPU tests where no GPU is: one summary line instead of hundreds of skips ------------------------
def _gpu_skip_reason(item: pytest.Item) -> str | None:
    """Why a test marked ``gpu`` would be skipped here (a ``skip``, or a ``skipif`` whose condition holds)."""
    for mark in item.iter_markers("skip"):
        return str(mark.kwargs.get("reason", mark.args[0] if mark.args else "skipped"))
    for mark in item.iter_markers("skipif"):
        condition = mark.args[0] if mark.args else mark.kwargs.get("condition")
        if condition is True:
            return str(mark.kwargs.get("reason", "skipped"))
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the GPU tests that cannot run here and remember why, per backend (``RBP_SHOW_GPU_SKIPS=1``
    keeps them as skips)."""
    if os.environ.get("RBP_SHOW_GPU_SKIPS") == "1":
        return
    kept, gone, reasons = [], [], {}
    for item in items:
        reason = _gpu_skip_reason(item) if item.get_closest_marker("gpu") is not None else None
        if reason is None:
            kept.append(item)
            continue
        gone.append(item)
        backend, _, why = reason.partition(": ")
        reasons.setdefault(backend, (why or backend).removesuffix("; none here").removesuffix(" here"))
    if gone:
        config.hook.pytest_deselected(items=gone)
        items[:] = kept
        config.stash[_GPU_KEY] = (len(gone), reasons)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:  # noqa: ARG001
    found = config.stash.get(_GPU_KEY, None)
    if found is not None:
        n, reasons = found
        detail = "; ".join(f"{backend}: {why}" for backend, why in sorted(reasons.items()))
        terminalreporter.write_line(
            f"GPU backends: none here ({detail}); {n} GPU tests not run (RBP_SHOW_GPU_SKIPS=1 lists them)"
        )

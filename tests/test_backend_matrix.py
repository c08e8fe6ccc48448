"""The backend selection itself: a requested backend that cannot run is an error, not a skip."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _collect(selection: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RBP_SHOW_GPU_SKIPS"}
    env.update(RBP_BACKENDS=selection, **extra)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--co", "-p", "no:cacheprovider", str(HERE / "test_neumann.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=HERE.parent,
        check=False,
    )


def test_unknown_backend_is_an_error() -> None:
    result = _collect("numpy,nonesuch")
    assert result.returncode != 0
    assert "unknown backend 'nonesuch'" in result.stdout + result.stderr


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="cupy is installed here")
def test_missing_backend_is_an_error_unless_optional() -> None:
    result = _collect("numpy,cupy")
    assert result.returncode != 0
    assert "RBP_BACKENDS requests 'cupy' but cupy is not installed" in result.stdout + result.stderr
    optional = _collect("numpy,cupy?")
    assert optional.returncode == 0, optional.stdout + optional.stderr
    # Left out, with one line that says why; kept as skips on request.
    assert "[cupy]" not in optional.stdout
    assert "GPU backends: none here (cupy: cupy is not installed); 8 GPU tests not run" in optional.stdout
    shown = _collect("numpy,cupy?", RBP_SHOW_GPU_SKIPS="1")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "[cupy]" in shown.stdout
    assert "GPU backends" not in shown.stdout

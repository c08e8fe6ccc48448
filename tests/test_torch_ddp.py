"""A DEQ layer under DistributedDataParallel: two processes (gloo, localhost) take the one-process step."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

HERE = Path(__file__).resolve().parent


def _run(tmp: str, mode: str) -> list[tuple[int, str]]:
    """Both ranks of ``ddp_worker.py`` in ``mode`` (subprocesses, never fork): their exit codes and outputs."""
    init = "file://" + str(Path(tmp) / "rendezvous")
    out = str(Path(tmp) / "params.pt")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, str(HERE / "ddp_worker.py"), str(rank), init, out, mode],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    results = []
    for p in ranks:
        output, _ = p.communicate(timeout=120)
        results.append((p.returncode, output))
    return results


def test_two_processes_take_the_one_process_step() -> None:
    from ddp_problem import data, model, one_step  # needs torch: imported after the skip above

    with tempfile.TemporaryDirectory() as tmp:
        for code, output in _run(tmp, "step"):
            assert code == 0, output
        distributed = torch.load(str(Path(tmp) / "params.pt"))
    single = model()
    one_step(single, *data())
    for name, value in single.state_dict().items():
        torch.testing.assert_close(distributed[name], value.detach(), rtol=1e-10, atol=1e-12)


def test_ranks_that_disagree_on_the_backward_method_are_refused() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for code, output in _run(tmp, "disagree"):
            assert code == 3, output
            assert "disagree on the backward method or solver" in output
            assert "rank 1: backward=Neumann(steps=5" in output

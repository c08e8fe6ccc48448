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


def test_two_processes_take_the_one_process_step() -> None:
    from ddp_problem import data, model, one_step

    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + str(Path(tmp) / "rendezvous")
        out = str(Path(tmp) / "params.pt")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1",
        }
        ranks = [
            subprocess.Popen(
                [sys.executable, str(HERE / "ddp_worker.py"), str(rank), init, out],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for rank in range(2)
        ]
        for p in ranks:
            output, _ = p.communicate(timeout=120)
            assert p.returncode == 0, output
        distributed = torch.load(out)
    single = model()
    one_step(single, *data())
    for name, value in single.state_dict().items():
        torch.testing.assert_close(distributed[name], value.detach(), rtol=1e-10, atol=1e-12)

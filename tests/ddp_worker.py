"""One rank of the DDP test (``tests/test_torch_ddp.py``), run as its own process: ``python ddp_worker.py RANK INIT OUT [MODE]``.

A script, not a test module: the test starts two of these with ``subprocess`` (never ``fork``,
which is unsafe in a process that already runs torch's threads), and rank 0 saves its parameters
after one step.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from ddp_problem import B, data, model, one_step

import rbp_core


def main(rank: int, init: str, out: str, mode: str) -> int:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        x, y = data()
        half = slice(rank * B // 2, (rank + 1) * B // 2)
        layer = model()
        if mode == "disagree" and rank == 1:  # another backward method on one rank: refused on both
            layer.backward_method = rbp_core.Neumann(steps=5)
        net = torch.nn.parallel.DistributedDataParallel(layer)
        if mode == "disagree":
            try:
                one_step(net, x[half], y[half])
            except ValueError as exc:
                print(exc, flush=True)
                return 3
            return 0
        one_step(net, x[half], y[half])
        info = net.module.info
        assert info is not None
        assert info.backward_converged  # each rank solved its own samples' adjoints
        assert len(info.forward.sample_status) == B // 2
        if rank == 0:
            torch.save({k: v.detach() for k, v in net.module.state_dict().items()}, out)
        return 0
    finally:
        # Both ranks meet here, then leave without destroy_process_group: over a file store the
        # last rank to destroy the group could wait for ever (seen here, with torch 2.13, under load).
        dist.barrier()


if __name__ == "__main__":
    code = main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "step")
    # Leave at once, output flushed: the interpreter's shutdown with a live gloo group can hang too.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

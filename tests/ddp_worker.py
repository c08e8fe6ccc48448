"""One rank of the DDP test (``tests/test_torch_ddp.py``), run as its own process: ``python ddp_worker.py RANK INIT OUT``.

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


def main(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        x, y = data()
        half = slice(rank * B // 2, (rank + 1) * B // 2)
        net = torch.nn.parallel.DistributedDataParallel(model())
        one_step(net, x[half], y[half])
        info = net.module.info
        assert info is not None
        assert info.backward_converged  # each rank solved its own samples' adjoints
        assert len(info.forward.sample_status) == B // 2
        if rank == 0:
            torch.save({k: v.detach() for k, v in net.module.state_dict().items()}, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
    # The last rank to leave a gloo group over a file store can hang in the interpreter's shutdown
    # after everything is done (seen here with torch 2.13): leave at once, output flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

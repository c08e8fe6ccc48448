"""Warm starts across training steps: the iterations a DEQ's solves save when each sample starts from its last fixed point.

What is measured
----------------
A tanh DEQ layer ``h = tanh(W h + U x)`` (width 64, ``||W||_2 = 0.9`` at the start) with a linear
read-out, trained with SGD on 512 fixed random samples in mini-batches of 32 for 6 epochs, in
float64 on torch's CPU (one thread): ``FixedPoint(..., batch_axis=0)`` with ``Anderson`` forward
and ``GMRES`` backward at tolerance 1e-8: from ``h0 = 0`` every step, with
``warm_start="forward"`` (each sample's forward solve starts from its last fixed point) and with
``warm_start="both"`` (its backward solve from its last adjoint too). Reported per epoch: the
forward and backward sample evaluations and the loss of the cold and forward-warm runs (the same
seed, data and batches), then the totals over epochs 2 to 6 for all three. Run ``python benchmarks/bench_warm.py [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import rbp_core
from rbp_core.backends.torch import FixedPoint

N, D, SAMPLES, BATCH, EPOCHS = 64, 16, 512, 32, 6


class Cell(torch.nn.Module):
    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        A = torch.randn(N, N, dtype=torch.float64, generator=gen)
        self.W = torch.nn.Parameter(0.9 * A / torch.linalg.matrix_norm(A, 2))
        self.U = torch.nn.Parameter(torch.randn(N, D, dtype=torch.float64, generator=gen) / D**0.5)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ self.W.T + x @ self.U.T)


def train(warm: bool | str) -> list[dict[str, float]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, D, dtype=torch.float64, generator=gen)
    y = torch.randn(SAMPLES, 1, dtype=torch.float64, generator=gen)
    layer = FixedPoint(
        Cell(gen),
        backward=rbp_core.GMRES(rtol=1e-8),
        solver=rbp_core.Anderson(rtol=1e-8),
        batch_axis=0,
        warm_start=warm,
    )
    torch.manual_seed(2)  # the read-out's initialisation, the same in both runs
    head = torch.nn.Linear(N, 1, dtype=torch.float64)
    params = [*layer.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=0.05)
    order = torch.Generator().manual_seed(1)
    epochs = []
    for _ in range(EPOCHS):
        fwd = bwd = 0
        total = 0.0
        for batch in torch.randperm(SAMPLES, generator=order).split(BATCH):
            opt.zero_grad()
            h = layer(x[batch], torch.zeros(len(batch), N, dtype=torch.float64), ids=batch if warm else None)
            loss = torch.nn.functional.mse_loss(head(h), y[batch])
            loss.backward()
            opt.step()
            info = layer.info
            assert info is not None
            fwd += info.forward.num_sample_evals
            bwd += info.backward[-1].num_sample_evals
            total += float(loss.detach()) * len(batch)
        epochs.append({"forward_evals": fwd, "backward_evals": bwd, "loss": total / SAMPLES})
    return epochs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cold, warm, both = train(False), train("forward"), train("both")
    print(f"DEQ training, {SAMPLES} samples in batches of {BATCH}, {EPOCHS} epochs; per epoch: sample evaluations")
    print(
        f"{'epoch':>5} {'fwd cold':>9} {'fwd warm':>9} {'ratio':>6} {'bwd cold':>9} {'bwd warm':>9} {'ratio':>6} {'loss cold':>10} {'loss warm':>10}"
    )
    for e, (c, w) in enumerate(zip(cold, warm, strict=True)):
        print(
            f"{e + 1:>5} {c['forward_evals']:>9} {w['forward_evals']:>9} {w['forward_evals'] / c['forward_evals']:>6.2f} "
            f"{c['backward_evals']:>9} {w['backward_evals']:>9} {w['backward_evals'] / c['backward_evals']:>6.2f} "
            f"{c['loss']:>10.5f} {w['loss']:>10.5f}"
        )
    later = slice(1, None)  # from the second epoch on, every sample has been seen
    fc = sum(c["forward_evals"] for c in cold[later])
    fw = sum(w["forward_evals"] for w in warm[later])
    bc = sum(c["backward_evals"] for c in cold[later])
    bw = sum(w["backward_evals"] for w in warm[later])
    bb = sum(b["backward_evals"] for b in both[later])
    fb = sum(b["forward_evals"] for b in both[later])
    print(
        f"epochs 2-{EPOCHS}, against cold starts: warm_start='forward' {fw / fc:.2f}x the forward and {bw / bc:.2f}x "
        f"the backward evaluations; warm_start='both' {fb / fc:.2f}x and {bb / bc:.2f}x"
    )
    if args.json is not None:
        result: dict[str, Any] = {
            "cold": cold,
            "forward": warm,
            "both": both,
            "forward_ratio": fw / fc,
            "backward_ratio_adjoint_warm": bb / bc,
        }
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Calls of f to a per-sample relative residual: rbp-core's forward solvers against TorchDEQ's.

What is measured
----------------
The layer ``F(h) = tanh(h W^T + x)``, float64, a batch of 64 rows of width 256, ``W`` symmetric
with eigenvalues uniform in ``[-0.99, 0.99]`` (``default_rng(0)``), inputs ``x`` of scale 0.05 (so
``tanh`` stays near linear and the Jacobian's spectral radius stays near 0.99). Every call of
``f`` (on the whole batch) is counted by one wrapper shared by all solvers, which also computes,
for the point ``h`` it was called at, every row's ``||F(h) - h|| / ||F(h)||``; a solver's count for
a target is the number of calls up to the first point at which every row is below the target.
Each solver runs with a stopping tolerance 100 times below the smallest target and a budget of
3000 calls, so the count is not cut short by its own test.

- rbp-core: ``FixedPointIteration``, ``Anderson`` (defaults) and ``Broyden`` (defaults);
- TorchDEQ: ``get_deq(f_solver=...)`` forward with ``fixed_point_iter``, ``anderson`` and ``broyden``.

Targets (issue: accelerated forward solvers), at 1e-4 and 1e-6: rbp-core's best at most 0.9x the
calls of TorchDEQ's best and at most 0.5x TorchDEQ's Anderson; and rbp-core reaching 1e-10.
Calls are deterministic; the last column is each solver's own time per call of ``f`` (the whole
solve's time minus the time inside the shared wrapper), one intra-op thread. Run ``python benchmarks/bench_forward.py [--json PATH]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import rbp_core

TARGETS = (1e-4, 1e-6, 1e-10)


def make_problem(batch: int = 64, n: int = 256, rho: float = 0.99, scale: float = 0.05, seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = rng.uniform(-rho, rho, size=n)
    lam[0] = rho
    W = torch.tensor((Q * lam) @ Q.T)
    x = torch.tensor(scale * rng.standard_normal((batch, n)))
    return W, x


class Recorder:
    """Counts calls of ``F`` and the first call at which every row's relative residual is below each target."""

    def __init__(self, W: torch.Tensor, x: torch.Tensor) -> None:
        self.W, self.x = W, x
        self.calls = 0
        self.first: dict[float, int | None] = dict.fromkeys(TARGETS)
        self.inside = 0.0  # seconds inside F itself
        self.checking = 0.0  # seconds inside the wrapper (F and the per-row test)
        self.total = 0.0  # seconds of the whole solve

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        t0 = time.perf_counter()
        out = torch.tanh(h.reshape(self.x.shape) @ self.W.T + self.x)
        self.inside += time.perf_counter() - t0
        with torch.no_grad():  # the per-row test: the benchmark's bookkeeping, outside both clocks' difference
            rel = torch.linalg.vector_norm(out - h.reshape(self.x.shape), dim=1) / torch.linalg.vector_norm(out, dim=1)
            worst = float(rel.max())
        for t in TARGETS:
            if self.first[t] is None and worst < t:
                self.first[t] = self.calls
        self.checking += time.perf_counter() - t0
        return out.reshape(h.shape)


def run_rbp(W: torch.Tensor, x: torch.Tensor, solver: Any) -> Recorder:
    rec = Recorder(W, x)
    t0 = time.perf_counter()
    with torch.no_grad():
        rbp_core.fixed_point(rec, torch.zeros_like(x), solver, throw=False)
    rec.total = time.perf_counter() - t0
    return rec


def run_torchdeq(W: torch.Tensor, x: torch.Tensor, name: str) -> Recorder:
    torchdeq = __import__("torchdeq")
    rec = Recorder(W, x)
    deq = torchdeq.get_deq(f_solver=name, f_max_iter=3000, f_tol=min(TARGETS) / 100, f_stop_mode="rel", ift=True)
    deq.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        deq(rec, torch.zeros_like(x))
    rec.total = time.perf_counter() - t0
    return rec


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    W, x = make_problem()
    tol = min(TARGETS) / 100
    runs: dict[str, Callable[[], Recorder]] = {
        "rbp-core FixedPointIteration": lambda: run_rbp(W, x, rbp_core.FixedPointIteration(rtol=tol, max_iter=3000)),
        "rbp-core Anderson": lambda: run_rbp(W, x, rbp_core.Anderson(rtol=tol, max_iter=3000)),
        "rbp-core Broyden": lambda: run_rbp(W, x, rbp_core.Broyden(rtol=tol, max_iter=3000)),
    }
    if importlib.util.find_spec("torchdeq") is not None:
        for name in ("fixed_point_iter", "anderson", "broyden"):
            runs[f"TorchDEQ {name}"] = lambda name=name: run_torchdeq(W, x, name)
    print("calls of f (whole batch) until every row's ||F(h) - h|| / ||F(h)|| is below the target;")
    print(f"tanh layer, float64 {tuple(x.shape)}, symmetric W with eigenvalues in [-0.99, 0.99], input scale 0.05")
    print(f"{'solver':30s}" + "".join(f"{t:>10g}" for t in TARGETS) + f"{'calls':>8s}{'solver us/call':>16s}")
    table: dict[str, dict[str, Any]] = {}
    for label, run in runs.items():
        rec = run()
        outside = 1e6 * (rec.total - rec.checking) / max(rec.calls, 1)  # the solver's own time per call of f
        table[label] = {str(t): rec.first[t] for t in TARGETS} | {"calls": rec.calls, "solver_us_per_call": outside}
        cells = "".join(f"{'-' if rec.first[t] is None else rec.first[t]:>10}" for t in TARGETS)
        print(f"{label:30s}{cells}{rec.calls:>8d}{outside:>16.1f}")
    verdicts = []
    ours = [k for k in table if k.startswith("rbp-core") and "Iteration" not in k]
    theirs = [k for k in table if k.startswith("TorchDEQ")]
    for t in TARGETS[:2]:
        key = str(t)
        best_ours = min((table[k][key] or math.inf for k in ours), default=math.inf)
        best_theirs = min((table[k][key] or math.inf for k in theirs), default=math.inf)
        anderson = table.get("TorchDEQ anderson", {}).get(key) or math.inf
        ok = best_ours <= 0.9 * best_theirs and best_ours <= 0.5 * anderson
        verdicts.append(
            {"target": t, "ours": best_ours, "torchdeq_best": best_theirs, "torchdeq_anderson": anderson, "passed": ok}
        )
        print(
            f"target {t:g}: rbp-core best {best_ours}, TorchDEQ best {best_theirs}, TorchDEQ anderson {anderson}: "
            f"ratio {best_ours / best_theirs:.2f} (<= 0.9) and {best_ours / anderson:.2f} (<= 0.5): {'PASS' if ok else 'FAIL'}"
        )
    reached = all(table[k][str(TARGETS[-1])] is not None for k in ours)
    print(f"rbp-core's accelerated solvers reach {TARGETS[-1]:g}: {'PASS' if reached else 'FAIL'}")
    if args.json is not None:
        args.json.write_text(json.dumps({"table": table, "targets": verdicts, "reached_1e-10": reached}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

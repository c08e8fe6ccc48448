"""A deep-equilibrium layer near the edge of contraction: rbp-core's backward methods against TorchDEQ's, side by side.

What is measured
----------------
The layer ``h = tanh(h W^T + b + x)`` with a batch of 64 float64 rows of width 256 and a
symmetric ``W`` of spectral radius 0.99 (``||J||_2 <= 0.99``: a slowly mixing DEQ). The forward
fixed point is solved once, to 1e-12. Each method then computes the gradient with respect to ``W``
and ``b`` of ``<g, h*>`` for a fixed ``g`` by the implicit function theorem with a backward
tolerance of 1e-8, and is timed over repeated backward passes through the same output (all
methods interleaved round-robin, rotating order, gc off; median ms per backward). Its gradient is
compared with the dense implicit gradient (per-row Jacobian blocks, ``torch.linalg.solve``).

- rbp-core: ``OriginalRBP``, ``GMRES(restart=50)``, ``BiCGSTAB``, ``AndersonRBP`` and ``CGRBP``
  through ``rbp_core.backends.torch.fixed_point``, to ``||g - (I - J^T) z|| <= 1e-8 ||g||`` and
  10 and 100 times tighter (so that a comparison at equal gradient error exists);
- TorchDEQ: ``get_deq(ift=True, b_solver=...)`` with each of its backward solvers
  (``fixed_point_iter``, ``anderson``, ``broyden``), ``b_tol=1e-8``, ``b_stop_mode="rel"``.

Target (issue: Krylov adjoint methods): rbp-core's best time per backward at most 0.5x TorchDEQ's
best, at an equal or lower gradient error. Thread count: set ``OMP_NUM_THREADS`` (the script sets
torch's intra-op threads to it, default 1). Run ``python benchmarks/bench_deq.py [--repeats 7]
[--json PATH]`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import rbp_core

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_torch as bt

TOL = 1e-8
MU = 0.99
TARGET = 0.5


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-sample", type=float, default=0.2)
    parser.add_argument("--max-iter", type=int, default=20_000)
    parser.add_argument(
        "--input-scale",
        type=float,
        default=1.0,
        help="scale of b and x (default 1; 0.05 keeps tanh near linear, so ||J|| is near 0.99)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    p = bt.make_peer_problem(args.batch, args.n, MU, symmetric=True, input_scale=args.input_scale)
    ref, check = bt.dense_reference(p)
    print(
        f"DEQ layer tanh(h W^T + b + x), float64 {args.batch} x {args.n}, symmetric W with spectral radius {MU}, "
        f"input scale {args.input_scale:g}; "
        f"forward to 1e-12 in {p.forward_steps} steps; backward tolerance {TOL:g}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); max ||J||_2 over rows {check['jacobian_norm_max']:.4f}"
    )
    m = args.max_iter
    methods = {
        "OriginalRBP": lambda tol: rbp_core.OriginalRBP(rtol=tol, max_iter=m),
        "GMRES(50)": lambda tol: rbp_core.GMRES(restart=50, rtol=tol, max_iter=m),
        "BiCGSTAB": lambda tol: rbp_core.BiCGSTAB(rtol=tol, max_iter=m),
        "AndersonRBP(10)": lambda tol: rbp_core.AndersonRBP(memory=10, rtol=tol, max_iter=m),
        "CGRBP": lambda tol: rbp_core.CGRBP(rtol=tol, max_iter=m),
    }
    # At the stated tolerance, and 10 and 100 times tighter: TorchDEQ's per-row stopping test can
    # end more accurate than a relative residual of 1e-8, and the target compares at equal error.
    specs = [
        (
            f"rbp-core {name}" + ("" if tol == TOL else f" rtol={tol:g}"),
            f"||g-(I-J^T)z|| <= {tol:g}||g||",
            lambda make=make, tol=tol: bt.rbp_peer(p, make(tol)),
        )
        for tol in (TOL, TOL / 10, TOL / 100)
        for name, make in methods.items()
    ]
    torchdeq = importlib.util.find_spec("torchdeq") is not None
    for solver in ("fixed_point_iter", "anderson", "broyden"):
        specs.append(
            (
                f"TorchDEQ IFT ({solver})",
                f"per row ||dz||/||z|| < {TOL:g}" if solver == "fixed_point_iter" else f"rel {TOL:g}",
                lambda solver=solver: bt.torchdeq_peer(p, TOL, m, b_solver=solver),
            )
        )
    results = bt.run_peers(specs, ref, repeats=args.repeats, min_sample=args.min_sample)
    print(bt.format_peers(results))

    ours = [r for r in results if r.name.startswith("rbp-core") and r.error is None and r.times]
    theirs = [r for r in results if r.name.startswith("TorchDEQ") and r.error is None and r.times]
    verdict = {"target": TARGET, "passed": False}
    if ours and theirs:
        best_theirs = min(theirs, key=lambda r: r.median_ms)
        eligible = [r for r in ours if r.rel_error is not None and r.rel_error <= (best_theirs.rel_error or math.inf)]
        best_ours = min(eligible or ours, key=lambda r: r.median_ms)
        ratio = best_ours.median_ms / best_theirs.median_ms
        ok = bool(eligible) and ratio <= TARGET
        verdict.update(ours=best_ours.name, theirs=best_theirs.name, ratio=ratio, passed=ok)
        print(
            f"\nbest rbp-core at no larger gradient error: {best_ours.name} {best_ours.median_ms:.1f} ms "
            f"(error {best_ours.rel_error:.1e}); best TorchDEQ: {best_theirs.name} {best_theirs.median_ms:.1f} ms "
            f"(error {best_theirs.rel_error:.1e}); ratio {ratio:.3f} (target <= {TARGET}): {'PASS' if ok else 'FAIL'}"
        )
    elif not torchdeq:
        print("\nTorchDEQ is not installed (pip install torchdeq): no comparison")
    if args.json is not None:
        payload = {"check": check, "results": [r.as_dict() for r in results], "target": verdict}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

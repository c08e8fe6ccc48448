"""Matrix-vector products to a relative residual of 1e-8: rbp-core's adjoint methods against SciPy's Krylov solvers.

What is measured
----------------
The adjoint system ``(I - J^T) z = g`` of a near-normal ``J`` with ``n = 500`` and spectral radius
``rho`` in 0.9, 0.99 and 0.999: ``J = Q diag(lam) Q^T + S``, with ``Q`` a random orthogonal matrix,
``lam`` uniform in ``[-rho, rho]`` with ``lam_max = rho``, and ``S`` a skew-symmetric part of norm
``0.01 rho`` (``default_rng(seed)``). Each method solves to ``||g - (I - J^T) z|| <= 1e-8 ||g||``;
the count is the products with ``J^T`` (and with ``J`` for CG-RBP), each library's callbacks
counted the same way, and every answer is checked against a dense solve (its true relative
residual is printed). SciPy solves ``(I - J^T) z = g`` through a ``LinearOperator`` whose
``matvec`` costs one product.

Targets (issue: Krylov adjoint methods):

- ``GMRES(restart=50)`` needs at most 1.1x the products of SciPy's ``gmres(restart=50)``, and
  ``BiCGSTAB`` at most 1.1x SciPy's ``bicgstab``, at ``rho = 0.99`` and ``0.999``;
- the best VJP-only rbp-core method needs at least 10x fewer VJPs than original RBP at
  ``rho = 0.99``.

Counts are deterministic: no timing, so the machine's load does not matter. Run
``python benchmarks/bench_krylov.py [--n 500] [--json PATH]`` (about a minute).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import scipy.sparse.linalg as spla

import rbp_core

RTOL = 1e-8
RHOS = (0.9, 0.99, 0.999)
TARGET_RATIO = 1.1
TARGET_SPEEDUP = 10.0


def make_problem(n: int, rho: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(J, g)``: a near-normal ``J`` of spectral radius about ``rho``, and a random ``g``."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = rng.uniform(-rho, rho, size=n)
    lam[0] = rho
    S = rng.standard_normal((n, n))
    S = S - S.T
    J = (Q * lam) @ Q.T + 0.01 * rho * S / np.linalg.norm(S, 2)
    return J, rng.standard_normal(n)


class Counter:
    """A product that counts its calls."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, v: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self.fn(v)


def rbp_run(J: np.ndarray, g: np.ndarray, method: Any) -> tuple[int, np.ndarray, str]:
    JT = np.ascontiguousarray(J.T)
    vjp, jvp = Counter(lambda v: JT @ v), Counter(lambda v: J @ v)
    sol = rbp_core.solve_adjoint(vjp, g, method, jvp=jvp, throw=False)
    return vjp.calls + jvp.calls, sol.value, sol.status.name


def scipy_run(J: np.ndarray, g: np.ndarray, solver: str) -> tuple[int, np.ndarray, str]:
    n = g.shape[0]
    JT = np.ascontiguousarray(J.T)
    mv = Counter(lambda v: v - JT @ v)
    A = spla.LinearOperator((n, n), matvec=mv, dtype=np.float64)
    if solver == "gmres":
        z, info = spla.gmres(A, g, rtol=RTOL, atol=0.0, restart=50, maxiter=2000)
    elif solver == "lgmres":
        z, info = spla.lgmres(A, g, rtol=RTOL, atol=0.0, maxiter=2000)
    else:
        z, info = spla.bicgstab(A, g, rtol=RTOL, atol=0.0, maxiter=20_000)
    return mv.calls, z, "SUCCESS" if info == 0 else f"info={info}"


METHODS: dict[str, Callable[[np.ndarray, np.ndarray], tuple[int, np.ndarray, str]]] = {
    "rbp-core OriginalRBP": lambda J, g: rbp_run(J, g, rbp_core.OriginalRBP(rtol=RTOL, max_iter=100_000)),
    "rbp-core CGRBP (VJP + JVP)": lambda J, g: rbp_run(J, g, rbp_core.CGRBP(rtol=RTOL, max_iter=100_000)),
    "rbp-core GMRES(50)": lambda J, g: rbp_run(J, g, rbp_core.GMRES(restart=50, rtol=RTOL, max_iter=100_000)),
    "rbp-core BiCGSTAB": lambda J, g: rbp_run(J, g, rbp_core.BiCGSTAB(rtol=RTOL, max_iter=100_000)),
    "rbp-core AndersonRBP(5)": lambda J, g: rbp_run(J, g, rbp_core.AndersonRBP(memory=5, rtol=RTOL, max_iter=100_000)),
    "rbp-core AndersonRBP(20)": lambda J, g: rbp_run(
        J, g, rbp_core.AndersonRBP(memory=20, rtol=RTOL, max_iter=100_000)
    ),
    "SciPy gmres(restart=50)": lambda J, g: scipy_run(J, g, "gmres"),
    "SciPy lgmres": lambda J, g: scipy_run(J, g, "lgmres"),
    "SciPy bicgstab": lambda J, g: scipy_run(J, g, "bicgstab"),
}
VJP_ONLY = ("rbp-core GMRES(50)", "rbp-core BiCGSTAB", "rbp-core AndersonRBP(5)", "rbp-core AndersonRBP(20)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    print(
        f"products with J^T (and J) to a relative residual of {RTOL:g}; n = {args.n}; "
        f"numpy {np.__version__}, scipy {scipy.__version__}, rbp_core {rbp_core.__version__}"
    )
    results: dict[str, dict[str, Any]] = {}
    for rho in RHOS:
        J, g = make_problem(args.n, rho)
        A = np.eye(args.n) - J.T
        print(f"\nrho = {rho}")
        print(f"{'method':30s} {'products':>9s}  {'status':10s} {'true rel. residual':>18s}")
        row: dict[str, Any] = {}
        for name, run in METHODS.items():
            count, z, status = run(J, g)
            residual = float(np.linalg.norm(g - A @ z) / np.linalg.norm(g))
            row[name] = {"products": count, "status": status, "relative_residual": residual}
            print(f"{name:30s} {count:9d}  {status:10s} {residual:18.2e}")
        results[str(rho)] = row
    verdicts = []
    print()
    for rho in ("0.99", "0.999"):
        row = results[rho]
        for ours, theirs in (
            ("rbp-core GMRES(50)", "SciPy gmres(restart=50)"),
            ("rbp-core BiCGSTAB", "SciPy bicgstab"),
        ):
            ratio = row[ours]["products"] / row[theirs]["products"]
            ok = ratio <= TARGET_RATIO and row[ours]["relative_residual"] <= RTOL * (1 + 1e-6)
            verdicts.append({"rho": rho, "ours": ours, "theirs": theirs, "ratio": ratio, "passed": ok})
            print(
                f"rho = {rho}: {ours} / {theirs} = {ratio:.3f} (target <= {TARGET_RATIO}): {'PASS' if ok else 'FAIL'}"
            )
    row = results["0.99"]
    best = min(VJP_ONLY, key=lambda k: row[k]["products"])
    speedup = row["rbp-core OriginalRBP"]["products"] / row[best]["products"]
    ok = speedup >= TARGET_SPEEDUP
    verdicts.append({"rho": "0.99", "best": best, "speedup": speedup, "passed": ok})
    print(
        f"rho = 0.99: original RBP / best VJP-only ({best}) = {speedup:.1f}x (target >= {TARGET_SPEEDUP:g}x): "
        f"{'PASS' if ok else 'FAIL'}"
    )
    if args.json is not None:
        args.json.write_text(json.dumps({"n": args.n, "rtol": RTOL, "results": results, "targets": verdicts}, indent=2))
    return 0 if all(math.isfinite(v.get("ratio", v.get("speedup", 0.0))) for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())

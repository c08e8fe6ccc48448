"""The JAX adapter against optimistix and jaxopt: gradients side by side, and time per forward + backward under jit.

What is measured
----------------
1. Gradient agreement (float64, tight tolerances), relative 2-norm difference of the whole gradient:
   - a tanh fixed point ``h = tanh(W h + x)`` (n = 32, ``||W||_2 = 0.8``), the gradient of
     ``sum(h*^2)`` with respect to ``(W, x)``;
   - the ridge regression of jaxopt's implicit-differentiation example: the weights ``w*(lam)``
     minimising ``0.5 mean((X w - y)^2) + 0.5 lam ||w||^2`` on scikit-learn's diabetes data (first
     300 rows for training, the rest for validation), as the fixed point of a gradient step
     ``w - eta grad``; the gradient of the validation error with respect to ``lam``.
   rbp-core (forward: Anderson, backward: GMRES, both to 1e-13), optimistix
   (``FixedPointIteration`` with ``ImplicitAdjoint(lineax.GMRES)``) and jaxopt
   (``FixedPointIteration(implicit_diff=True)`` with its GMRES solve), each also against the
   gradient of a dense solve of ``(I - J^T) z = g`` at the fixed point.
2. Time per forward + backward under ``jax.jit`` of a tanh DEQ layer: a batch of B = 64 inputs of
   width n = 256 as one state, ``h = tanh(h W^T + x)``, ``||W||_2 = 0.8``, float32, the gradient of
   ``mean(h*^2)`` with respect to ``(W, x)``. Every library runs fixed-point iteration forward and
   GMRES (restart 20) backward at the same tolerance, as each library defines it: rbp-core's
   ``||step|| <= rtol ||h||`` in the 2-norm, optimistix's and lineax's element-wise
   ``|step_i| <= atol + rtol |h_i|`` (``atol = rtol``), jaxopt's ``||step|| <= tol``. rbp-core's
   test is the loosest of the three, so it also runs at a tenth of the tolerance; each gradient's
   error against a solve to 1e-7 and the forward step counts are reported. Compiled once, then
   timed in round-robin repeats (median).

Target (issue: JAX adapter): gradients within 1e-10 relative of optimistix's and jaxopt's; time per
forward + backward at most 1.2x optimistix's. Run ``python benchmarks/bench_jax.py [--repeats 30]
[--json PATH]`` (CPU; one intra-op thread unless ``XLA_FLAGS`` says otherwise).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax
import jax.numpy as jnp
import numpy as np

# float64 for the gradient agreement; the timed float32 layer runs in a child process without it, as a
# float32 user has it (optimistix 0.1.0 fails on a float32 fixed point when float64 is enabled).
jax.config.update("jax_enable_x64", os.environ.get("RBP_BENCH_X64", "1") == "1")

import rbp_core
from rbp_core.backends.jax import fixed_point

TARGET_AGREEMENT = 1e-10
TARGET_TIME = 1.2


def relative(a: Any, b: Any) -> float:
    """``||a - b|| / ||b||`` over all leaves of two pytrees of the same structure."""
    fa, fb = (
        np.concatenate([np.ravel(np.asarray(x, dtype=np.float64)) for x in jax.tree_util.tree_leaves(t)])
        for t in (a, b)
    )
    return float(np.linalg.norm(fa - fb) / np.linalg.norm(fb))


# --- the three libraries on one fixed point -------------------------------------------------------
def rbp_solve(f: Any, h0: Any, params: Any, *, rtol: float, forward: str = "iteration") -> Any:
    solver = (
        rbp_core.Anderson(rtol=rtol, max_iter=10_000)
        if forward == "anderson"
        else rbp_core.FixedPointIteration(rtol=rtol, max_iter=10_000)
    )
    h, _ = fixed_point(f, h0, params, solver=solver, backward=rbp_core.GMRES(rtol=rtol, restart=20, max_iter=10_000))
    return h


def optimistix_solve(f: Any, h0: Any, params: Any, *, rtol: float) -> Any:
    import lineax
    import optimistix

    # optimistix and lineax test each element against atol + rtol |y|, in the max norm by default;
    # with atol = rtol that is how their users set a tolerance.
    adjoint = optimistix.ImplicitAdjoint(linear_solver=lineax.GMRES(rtol=rtol, atol=rtol, restart=20, max_steps=10_000))
    solver = optimistix.FixedPointIteration(rtol=rtol, atol=rtol)
    return optimistix.fixed_point(f, solver, h0, args=params, adjoint=adjoint, max_steps=10_000).value


def jaxopt_solve(f: Any, h0: Any, params: Any, *, rtol: float) -> Any:
    import jaxopt

    solve = functools.partial(jaxopt.linear_solve.solve_gmres, tol=rtol, atol=0.0, restart=20, maxiter=10_000)
    fpi = jaxopt.FixedPointIteration(
        fixed_point_fun=f, maxiter=10_000, tol=rtol, implicit_diff=True, implicit_diff_solve=solve
    )
    return fpi.run(h0, params).params


LIBRARIES = {"rbp-core": rbp_solve, "optimistix": optimistix_solve, "jaxopt": jaxopt_solve}


# --- 1. gradient agreement -------------------------------------------------------------------------
def tanh_problem(n: int = 32, seed: int = 0) -> tuple[Any, Any, Any]:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, n))
    W *= 0.8 / np.linalg.norm(W, 2)
    return (lambda h, p: jnp.tanh(p[0] @ h + p[1])), jnp.zeros(n), (jnp.asarray(W), jnp.asarray(rng.standard_normal(n)))


def dense_tanh_gradient(params: Any) -> Any:
    """The exact gradient of sum(h*^2) by a dense solve at a converged fixed point (NumPy)."""
    W, x = (np.asarray(p) for p in params)
    h = np.zeros(len(x))
    for _ in range(2000):
        h = np.tanh(W @ h + x)
    d = 1 - h**2
    z = np.linalg.solve(np.eye(len(x)) - (d[:, None] * W).T, 2 * h)
    return (np.outer(d * z, h), d * z)


def ridge_problem() -> tuple[Any, Any, Any, Any]:
    """jaxopt's example: ridge weights as the fixed point of a gradient step; the validation error."""
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    Xtr, ytr, Xval, yval = (jnp.asarray(a) for a in (X[:300], y[:300], X[300:], y[300:]))
    eta = 1.0 / (float(np.linalg.eigvalsh(np.asarray(Xtr.T @ Xtr) / len(ytr)).max()) + 1.0)

    def objective(w: Any, lam: Any) -> Any:
        return 0.5 * jnp.mean((Xtr @ w - ytr) ** 2) + 0.5 * lam * jnp.sum(w**2)

    def step(w: Any, lam: Any) -> Any:
        return w - eta * jax.grad(objective)(w, lam)

    def validation(w: Any) -> Any:
        return jnp.mean((Xval @ w - yval) ** 2)

    return step, jnp.zeros(X.shape[1]), jnp.asarray(0.1), validation


def dense_ridge_gradient(lam: float) -> float:
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    Xtr, ytr, Xval, yval = X[:300], y[:300], X[300:], y[300:]
    H = Xtr.T @ Xtr / len(ytr) + lam * np.eye(X.shape[1])
    w = np.linalg.solve(H, Xtr.T @ ytr / len(ytr))
    dw = -np.linalg.solve(H, w)  # dw/dlam
    return float(2 * np.mean((Xval @ w - yval) * (Xval @ dw)))


def agreement() -> dict[str, Any]:
    rows: dict[str, Any] = {}
    f, h0, params = tanh_problem()
    grads = {}
    for name, solve in LIBRARIES.items():
        kw = {"forward": "anderson"} if name == "rbp-core" else {}
        grads[name] = jax.jit(jax.grad(lambda p, solve=solve, kw=kw: jnp.sum(solve(f, h0, p, rtol=1e-13, **kw) ** 2)))(
            params
        )
    dense = dense_tanh_gradient(params)
    rows["tanh"] = {name: {"vs_dense": relative(g, dense)} for name, g in grads.items()}
    for peer in ("optimistix", "jaxopt"):
        rows["tanh"]["rbp-core"][f"vs_{peer}"] = relative(grads["rbp-core"], grads[peer])
    step, w0, lam, validation = ridge_problem()
    grads = {}
    for name, solve in LIBRARIES.items():
        kw = {"forward": "anderson"} if name == "rbp-core" else {}
        grads[name] = jax.jit(jax.grad(lambda l, solve=solve, kw=kw: validation(solve(step, w0, l, rtol=1e-13, **kw))))(
            lam
        )
    dense = dense_ridge_gradient(float(lam))
    rows["ridge"] = {name: {"vs_dense": relative(g, dense), "gradient": float(g)} for name, g in grads.items()}
    for peer in ("optimistix", "jaxopt"):
        rows["ridge"]["rbp-core"][f"vs_{peer}"] = relative(grads["rbp-core"], grads[peer])
    return rows


# --- 2. time per forward + backward ------------------------------------------------------------------
def deq_problem(batch: int = 64, n: int = 256, seed: int = 0) -> tuple[Any, Any, Any]:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, n))
    W *= 0.8 / np.linalg.norm(W, 2)
    W = jnp.asarray(W, dtype=jnp.float32)
    x = jnp.asarray(rng.standard_normal((batch, n)), dtype=jnp.float32)
    return (lambda h, p: jnp.tanh(h @ p[0].T + p[1])), jnp.zeros((batch, n), dtype=jnp.float32), (W, x)


def steps_taken(rtol: float) -> dict[str, Any]:
    """Forward and backward step counts of rbp-core, and the forward counts of the peers, on the DEQ layer."""
    import jaxopt
    import optimistix

    f, h0, params = deq_problem()
    methods = {
        "solver": rbp_core.FixedPointIteration(rtol=rtol, max_iter=10_000),
        "backward": rbp_core.GMRES(rtol=rtol, restart=20, max_iter=10_000),
    }

    def loss(p: Any) -> Any:
        h, info = fixed_point(f, h0, p, **methods)
        return jnp.mean(h**2), info

    _, info = jax.grad(loss, has_aux=True)(params)  # eagerly: the Solutions are recorded
    sol = optimistix.fixed_point(
        f,
        optimistix.FixedPointIteration(rtol=rtol, atol=rtol),
        h0,
        args=params,
        max_steps=10_000,
    )
    state = (
        jaxopt.FixedPointIteration(fixed_point_fun=f, maxiter=10_000, tol=rtol, implicit_diff=False)
        .run(h0, params)
        .state
    )
    return {
        "rbp-core": {"forward": int(info.num_steps), "backward": info.backward[0].num_steps},
        "optimistix": {"forward": int(sol.stats["num_steps"])},
        "jaxopt": {"forward": int(state.iter_num)},
    }


def timing(rtol: float, repeats: int) -> dict[str, Any]:
    """Median time per jitted forward + backward, and each gradient's error against a tight solve.

    rbp-core runs at ``rtol`` and at ``rtol / 10``: its 2-norm test at ``rtol`` is looser than the
    peers' element-wise ones, so the second run is the comparison at equal or better accuracy.
    """
    f, h0, params = deq_problem()
    reference = jax.jit(jax.grad(lambda p: jnp.mean(rbp_solve(f, h0, p, rtol=1e-7) ** 2)))(params)
    runs = {
        "rbp-core": (rbp_solve, rtol),
        "rbp-core (rtol / 10)": (rbp_solve, rtol / 10),
        "optimistix": (optimistix_solve, rtol),
        "jaxopt": (jaxopt_solve, rtol),
    }
    fns = {}
    errors = {}
    for name, (solve, tol) in runs.items():
        fn = jax.jit(jax.grad(lambda p, solve=solve, tol=tol: jnp.mean(solve(f, h0, p, rtol=tol) ** 2)))
        errors[name] = relative(jax.block_until_ready(fn(params)), reference)  # also compiles
        jax.block_until_ready(fn(params))
        fns[name] = fn
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params))
            times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "median_ms": {k: 1e3 * v for k, v in medians.items()},
        "ratio_to_optimistix": {k: v / medians["optimistix"] for k, v in medians.items()},
        "gradient_error": errors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rtol", type=float, default=1e-5, help="tolerance of the timed solves (default 1e-5)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--timing-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.timing_only:
        result = {"steps": steps_taken(args.rtol), "timing": timing(args.rtol, args.repeats)}
        print(json.dumps(result))
        return 0
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; XLA_FLAGS={os.environ.get('XLA_FLAGS')}")
    agree = agreement()
    print("gradient agreement (float64, tolerances 1e-13), relative 2-norm differences:")
    for problem, rows in agree.items():
        for name, row in rows.items():
            print(f"  {problem:6} {name:11} " + ", ".join(f"{k} {v:.2e}" for k, v in row.items() if k != "gradient"))
    worst = max(agree[p]["rbp-core"][f"vs_{peer}"] for p in agree for peer in ("optimistix", "jaxopt"))
    print(
        f"gradients within {TARGET_AGREEMENT:g} of optimistix's and jaxopt's: {'PASS' if worst <= TARGET_AGREEMENT else 'FAIL'} (worst {worst:.2e})"
    )
    child = subprocess.run(
        [sys.executable, __file__, "--timing-only", "--rtol", str(args.rtol), "--repeats", str(args.repeats)],
        env={**os.environ, "RBP_BENCH_X64": "0"},
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    steps, t = measured["steps"], measured["timing"]
    print(f"tanh DEQ layer, B = 64, n = 256, float32, rtol {args.rtol:g}: steps {steps}")
    for name in t["median_ms"]:
        print(
            f"  {name:20} {t['median_ms'][name]:8.2f} ms per forward + backward, {t['ratio_to_optimistix'][name]:.2f}x "
            f"optimistix, gradient error {t['gradient_error'][name]:.1e} (against a solve to 1e-7)"
        )
    for name in ("rbp-core", "rbp-core (rtol / 10)"):
        ratio = t["ratio_to_optimistix"][name]
        print(
            f"{name}: time at most {TARGET_TIME}x optimistix's: {'PASS' if ratio <= TARGET_TIME else 'FAIL'} ({ratio:.2f})"
        )
    if args.json:
        args.json.write_text(json.dumps({"agreement": agree, "steps": steps, "timing": t}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

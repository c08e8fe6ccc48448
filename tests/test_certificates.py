"""Error certificates: tight where theory says they are, and refused when the contraction is false.

For ``J = mu * I`` every bound of rbp-core is attained exactly, so these tests catch a bound that
is too small (unsound) as well as one that is needlessly loose.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import rbp_core
from conftest import ADJOINT_METHODS, FORWARD_SOLVERS
from strategies import Problem, eps, problems

MU = 0.6
G = np.array([3.0, -4.0])  # ||G|| = 5


def _scaled_identity(backend):
    xp = backend.xp
    return (lambda v: MU * v), (lambda v: MU * v), backend.asarray(G), xp


@pytest.mark.parametrize("steps", [0, 1, 5, 20])
def test_neumann_bound_is_attained(backend, steps: int) -> None:
    vjp, _, g, _ = _scaled_identity(backend)
    sol = rbp_core.neumann_rbp(vjp, g, steps=steps, contraction=MU)
    exact = G / (1 - MU)
    true_error = np.linalg.norm(backend.to_numpy(sol.value) - exact)
    expected = MU ** (steps + 1) / (1 - MU) * 5.0
    assert true_error == pytest.approx(expected, rel=1e-9)
    assert sol.error_bound == pytest.approx(expected, rel=1e-9)


def test_original_bound_is_attained(backend) -> None:
    vjp, _, g, _ = _scaled_identity(backend)
    sol = rbp_core.original_rbp(vjp, g, rtol=1e-3, contraction=MU)
    true_error = np.linalg.norm(backend.to_numpy(sol.value) - G / (1 - MU))
    assert sol.error_bound == pytest.approx(true_error, rel=1e-6)


def test_cg_bound_is_attained(backend) -> None:
    vjp, jvp, g, _ = _scaled_identity(backend)
    # Start away from the solution so that the residual is not zero after one step.
    z0 = backend.asarray(np.array([1.0, 1.0]))
    sol = rbp_core.cg_rbp(vjp, jvp, g, rtol=0.5, z0=z0, contraction=MU)
    true_error = np.linalg.norm(backend.to_numpy(sol.value) - G / (1 - MU))
    # For A = (1 - mu) I, ||z - z*|| = ||r|| / (1 - mu) exactly.
    assert sol.error_bound == pytest.approx(true_error, rel=1e-9)


def test_fixed_point_bound_is_attained(backend) -> None:
    b = backend.asarray(G)
    sol = rbp_core.fixed_point(
        lambda h: MU * h + b, backend.asarray(np.zeros(2)), rbp_core.FixedPointIteration(rtol=1e-3), contraction=MU
    )
    true_error = np.linalg.norm(backend.to_numpy(sol.value) - G / (1 - MU))
    assert sol.error_bound == pytest.approx(true_error, rel=1e-6)


def test_damped_fixed_point_bound_uses_damped_rate(backend) -> None:
    b = backend.asarray(G)
    sol = rbp_core.fixed_point(
        lambda h: MU * h + b,
        backend.asarray(np.zeros(2)),
        rbp_core.FixedPointIteration(rtol=1e-3, damping=0.5),
        contraction=MU,
    )
    true_error = np.linalg.norm(backend.to_numpy(sol.value) - G / (1 - MU))
    assert sol.error_bound == pytest.approx(true_error, rel=1e-6)


@pytest.mark.parametrize("method", [*ADJOINT_METHODS, *(f"forward-{name}" for name in FORWARD_SOLVERS)])
def test_false_contraction_is_refused_by_every_method(backend, method: str) -> None:
    J = np.array([[0.9, 0.0], [0.0, 0.1]])
    vjp, jvp = backend.matrix_callbacks(J, (2,), "float64")
    g = backend.asarray(np.ones(2))

    def run(**kw):
        if method.startswith("forward-"):
            solver = FORWARD_SOLVERS[method.removeprefix("forward-")].converged(1e-8, 0.9)
            return rbp_core.fixed_point(lambda h: jvp(h) + g, g, solver, **kw)
        return rbp_core.solve_adjoint(vjp, g, ADJOINT_METHODS[method].converged(1e-8, 0.9), jvp=jvp, **kw)

    with pytest.raises(rbp_core.ContractionViolation, match=r"contraction=0\.5 is false"):
        run(contraction=0.5)
    refused = run(contraction=0.5, throw=False)
    assert refused.error_bound is None
    assert refused.contraction_violated
    assert "disproved" in refused.describe()
    kept = run(contraction=0.9)
    assert kept.error_bound is not None
    assert not kept.contraction_violated


def test_no_contraction_no_bound(backend) -> None:
    g = backend.asarray(np.zeros(2))
    assert rbp_core.original_rbp(lambda v: v, g).error_bound is None
    assert rbp_core.original_rbp(lambda v: v, g, contraction=0.5).error_bound == 0.0


# --- the certificates hold in floating point, with no allowance -----------------------------------
# The callbacks compute in extended precision and round once per element to the working dtype: the
# rounding the certificates document as covered. The oracle is the extended-precision solution.
EXT = np.longdouble


def _exact_rounded(backend, M: np.ndarray, shape, dtype, shift: np.ndarray | None = None):
    """``v -> M v (+ shift)``, computed in extended precision and rounded once per element to ``dtype``."""
    M_ext = M.astype(EXT)
    b_ext = EXT(0) if shift is None else shift.astype(EXT)

    def apply(v):
        out = M_ext @ backend.to_numpy(v).reshape(-1).astype(EXT) + b_ext
        return backend.asarray(out.reshape(shape).astype(dtype), dtype)

    return apply


def _solve_ext(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``A^{-1} b`` to extended precision: a float64 solve refined with extended-precision residuals."""
    A_ext, b_ext = A.astype(EXT), b.astype(EXT)
    x = np.linalg.solve(A, b).astype(EXT)
    for _ in range(4):
        x = x + np.linalg.solve(A, (b_ext - A_ext @ x).astype(np.float64)).astype(EXT)
    return x


def _ext_norm(x) -> EXT:
    return np.sqrt(np.sum(np.asarray(x, dtype=EXT) ** 2))


@given(
    problem=problems(),
    steps=st.integers(1, 40),
    method=st.sampled_from([*sorted(ADJOINT_METHODS), *(f"forward-{name}" for name in sorted(FORWARD_SOLVERS))]),
)
def test_true_error_never_exceeds_the_bound(backend, dtype, problem: Problem, steps: int, method: str) -> None:
    J, g = problem.build()
    J = J * (1 - 1e-9)  # ||J||_2 = mu exactly up to the rounding of the scaling: keep it strictly below
    n, shape, mu = problem.n, problem.shape, problem.mu
    vjp = _exact_rounded(backend, J.T, shape, dtype)
    gb = backend.asarray(g, dtype)
    g_used = backend.to_numpy(gb).reshape(-1)  # g as rounded to dtype: the system being solved
    forward = method.startswith("forward-")
    # Any number of steps: the bound holds whatever the iteration reached.
    if forward:  # the forward solve of h = J h + g (F rounded once per element), whose bound is on h*
        F = _exact_rounded(backend, J, shape, dtype, shift=g_used)
        solver = FORWARD_SOLVERS[method.removeprefix("forward-")].budget(steps)
        sol = rbp_core.fixed_point(F, gb, solver, contraction=mu, throw=False)
    else:
        jvp = _exact_rounded(backend, J, shape, dtype)
        sol = rbp_core.solve_adjoint(
            vjp, gb, ADJOINT_METHODS[method].budget(steps), jvp=jvp, contraction=mu, throw=False
        )
    exact = _solve_ext(np.eye(n) - (J if forward else J.T), g_used)
    true_error = _ext_norm(backend.to_numpy(sol.value).reshape(-1).astype(EXT) - exact)
    assert sol.error_bound is not None
    assert true_error <= sol.error_bound, (method, float(true_error), sol.error_bound)


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_issue_examples_of_optimistic_bounds(backend, dtype_name) -> None:
    # 400 terms of 0.3^t: the truncation error is 1e-210, the rounding error is not.
    g = backend.asarray(np.ones(1), dtype_name)
    sol = rbp_core.neumann_rbp(lambda v: 0.3 * v, g, steps=400, contraction=0.3)
    exact = EXT(1) / (1 - EXT(backend.to_numpy(backend.asarray(0.3 * np.ones(1), dtype_name))[0]))
    true_error = abs(EXT(backend.to_numpy(sol.value)[0]) - exact)
    assert true_error > 0
    assert true_error <= sol.error_bound
    assert sol.error_bound <= 20 * eps(dtype_name)

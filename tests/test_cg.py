"""CG-RBP (CGLS): solves systems that original RBP cannot, reports breakdown, counts exactly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

import rbp_core
from rbp_core import Status
from strategies import Problem, eps, norm, problems


@given(problem=problems(kind="expansive"))
def test_solves_when_spectral_radius_exceeds_one(backend, dtype, problem: Problem) -> None:
    J, g = problem.build()
    vjp, jvp = backend.matrix_callbacks(J, problem.shape, dtype)
    A = np.eye(problem.n) - J.T
    sv = np.linalg.svd(A, compute_uv=False)
    kappa = sv[0] / sv[-1]
    tol = 100 * problem.n * eps(dtype) * kappa
    sol = rbp_core.cg_rbp(vjp, jvp, backend.asarray(g, dtype), rtol=tol, max_iter=20 * problem.n + 50)
    assert sol.converged
    assert sol.num_vjp == sol.num_jvp == sol.num_steps
    z = backend.to_numpy(sol.value)
    # The recurrence's residual is the true residual up to rounding (c n eps kappa ||g||).
    gn = norm(g)
    true_residual = norm(g - (A @ z.reshape(-1)).reshape(g.shape))
    assert true_residual <= tol * gn + 10 * problem.n * eps(dtype) * kappa * gn
    assert norm(z - problem.exact(J, g)) <= (tol * gn + 10 * problem.n * eps(dtype) * kappa * gn) / sv[-1]


@given(problem=problems())
def test_certificate_is_sound(backend, problem: Problem) -> None:
    J, g = problem.build()
    vjp, jvp = backend.matrix_callbacks(J, problem.shape, "float64")
    sol = rbp_core.cg_rbp(vjp, jvp, backend.asarray(g), rtol=1e-6, contraction=problem.mu)
    assert sol.num_vjp == sol.num_steps + 1  # one fresh residual for the certificate
    true_error = norm(backend.to_numpy(sol.value) - problem.exact(J, g))
    assert sol.error_bound is not None
    assert true_error <= sol.error_bound + 1e3 * problem.n * eps("float64") * norm(g) / (1 - problem.mu)


def test_breakdown_on_singular_system(backend) -> None:
    # J = I: I - J^T = 0, the first search direction has zero curvature.
    g = backend.asarray(np.ones(3))
    with pytest.raises(rbp_core.ConvergenceError, match="breakdown") as info:
        rbp_core.cg_rbp(lambda v: v, lambda v: v, g)
    sol = info.value.solution
    assert sol.status is Status.BREAKDOWN
    np.testing.assert_array_equal(backend.to_numpy(sol.value), np.zeros(3))


def test_warm_start(backend) -> None:
    J = np.array([[1.5, 0.2], [0.0, -2.0]])
    vjp, jvp = backend.matrix_callbacks(J, (2,), "float64")
    exact = np.linalg.solve(np.eye(2) - J.T, np.ones(2))
    z0 = backend.asarray(exact)
    sol = rbp_core.cg_rbp(vjp, jvp, backend.asarray(np.ones(2)), rtol=1e-10, z0=z0)
    assert sol.converged
    assert sol.num_steps == 0
    assert sol.num_vjp == 1
    assert sol.value is not z0
    np.testing.assert_allclose(backend.to_numpy(sol.value), exact)


def test_nan_from_jvp_is_loud(backend) -> None:
    g = backend.asarray(np.ones(2))
    with pytest.raises(rbp_core.ConvergenceError, match="non-finite") as info:
        rbp_core.cg_rbp(lambda v: 0.5 * v, lambda v: v * float("nan"), g)
    assert info.value.status is Status.NONFINITE
    assert np.all(np.isfinite(backend.to_numpy(info.value.solution.value)))


def test_max_steps(backend) -> None:
    rng = np.random.default_rng(1)
    J = 0.9 * rng.standard_normal((30, 30)) / 11
    vjp, jvp = backend.matrix_callbacks(J, (30,), "float64")
    with pytest.raises(rbp_core.ConvergenceError) as info:
        rbp_core.cg_rbp(vjp, jvp, backend.asarray(rng.standard_normal(30)), rtol=1e-14, max_iter=2)
    assert info.value.status is Status.MAX_STEPS
    assert info.value.solution.num_steps == 2

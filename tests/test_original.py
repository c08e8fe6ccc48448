"""Original RBP: converges for contractive J, never reports success when the spectral radius exceeds 1."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

import rbp_core
from rbp_core import Status
from strategies import Problem, eps, norm, problems, rounding


def _tol(n: int, mu: float, dtype: str) -> float:
    # Above the rounding floor of the computed residual, ~ n eps ||z|| <= n eps ||g|| / (1 - mu).
    return 10 * n * eps(dtype) / (1 - mu)


@given(problem=problems())
def test_converges_for_contractive_J(backend, dtype, problem: Problem) -> None:
    J, g = problem.build()
    vjp, _ = backend.matrix_callbacks(J, problem.shape, dtype)
    tol = _tol(problem.n, problem.mu, dtype)
    sol = rbp_core.original_rbp(vjp, backend.asarray(g, dtype), rtol=tol, max_iter=5000, contraction=problem.mu)
    assert sol.converged
    assert sol.num_vjp == sol.num_steps  # z_1 = g costs nothing; the certificate's residual costs one
    assert sol.residual_norms[-1] <= tol * norm(g)
    mu, gn = problem.mu, norm(g)
    true_error = norm(backend.to_numpy(sol.value) - problem.exact(J, g))
    slack = rounding(problem.n, 1, dtype, gn / (1 - mu) ** 2)
    assert sol.error_bound is not None
    # The certificate's residual is J^T (z_i - z_{i-1}) up to rounding (allowed for in the bound).
    allowance = (rounding(problem.n, 1, dtype, gn / (1 - mu)) + 4 * eps(dtype) * 3 * gn / (1 - mu)) / (1 - mu)
    assert sol.error_bound <= (mu / (1 - mu) * tol * gn + allowance) * (1 + 4 * (problem.n + 2) * eps(dtype))
    assert true_error <= sol.error_bound + slack


@given(problem=problems(kind="expansive"))
def test_never_succeeds_when_spectral_radius_exceeds_one(backend, problem: Problem) -> None:
    J, g = problem.build()
    vjp, _ = backend.matrix_callbacks(J, problem.shape, "float64")
    gb = backend.asarray(g)
    sol = rbp_core.original_rbp(vjp, gb, rtol=1e-8, max_iter=1000, throw=False)
    assert sol.status is Status.DIVERGED
    assert not sol.converged
    # Detected early: growth by the divergence factor takes about log(1e4)/log(rho) steps after the
    # unstable mode dominates, far below the budget.
    assert sol.num_steps < 1000
    with pytest.raises(rbp_core.ConvergenceError, match="diverged"):
        rbp_core.original_rbp(vjp, gb, rtol=1e-8, max_iter=1000)


def test_warm_start_counts_and_is_not_modified(backend) -> None:
    J = np.array([[0.5, 0.1], [0.0, 0.3]])
    vjp, _ = backend.matrix_callbacks(J, (2,), "float64")
    g = backend.asarray([1.0, 1.0])
    exact = np.linalg.solve(np.eye(2) - J.T, np.ones(2))
    z0 = backend.asarray(exact + 1e-3)
    sol = rbp_core.original_rbp(vjp, g, rtol=1e-12, z0=z0)
    assert sol.converged
    assert sol.num_vjp == sol.num_steps
    np.testing.assert_allclose(backend.to_numpy(sol.value), exact, rtol=1e-10)
    np.testing.assert_array_equal(backend.to_numpy(z0), exact + 1e-3)
    cold = rbp_core.original_rbp(vjp, g, rtol=1e-12)
    assert sol.num_steps < cold.num_steps


def test_max_steps_is_a_failure(backend) -> None:
    J = np.array([[0.99]])
    vjp, _ = backend.matrix_callbacks(J, (1,), "float64")
    g = backend.asarray([1.0])
    with pytest.raises(rbp_core.ConvergenceError, match="maximum number of iterations") as info:
        rbp_core.original_rbp(vjp, g, rtol=1e-12, max_iter=10)
    assert info.value.status is Status.MAX_STEPS
    assert info.value.solution.num_steps == 10


def test_zero_rhs_gives_zero(backend) -> None:
    sol = rbp_core.original_rbp(lambda v: v, backend.asarray(np.zeros(3)))
    assert sol.converged
    assert sol.num_vjp == 0
    np.testing.assert_array_equal(backend.to_numpy(sol.value), np.zeros(3))


def test_divergence_test_can_be_turned_off(backend) -> None:
    J = np.array([[2.0]])
    vjp, _ = backend.matrix_callbacks(J, (1,), "float64")
    sol = rbp_core.original_rbp(vjp, backend.asarray([1.0]), max_iter=50, divergence_factor=None, throw=False)
    assert sol.status is Status.MAX_STEPS
    assert sol.num_steps == 50

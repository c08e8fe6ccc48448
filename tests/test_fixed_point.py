"""The forward solve on contractive affine maps, with damping, batch shapes and certificates."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import rbp_core
from rbp_core import Status
from strategies import Problem, eps, norm, problems


@given(problem=problems(), damping=st.sampled_from([1.0, 0.7]))
def test_reaches_fixed_point_of_affine_contraction(backend, dtype, problem: Problem, damping: float) -> None:
    J, b = problem.build()
    _, jvp = backend.matrix_callbacks(J, problem.shape, dtype)
    bb = backend.asarray(b, dtype)
    h0 = backend.asarray(np.zeros(problem.shape), dtype)
    tol = 10 * problem.n * eps(dtype) / (1 - problem.mu)
    sol = rbp_core.fixed_point(
        lambda h: jvp(h) + bb,
        h0,
        rbp_core.FixedPointIteration(rtol=tol, max_iter=10_000, damping=damping),
        contraction=problem.mu,
    )
    assert sol.converged
    h = backend.to_numpy(sol.value)
    exact = np.linalg.solve(np.eye(problem.n) - J, b.reshape(-1)).reshape(problem.shape)
    m = 1 - damping + damping * problem.mu
    error = norm(h - exact)
    # ||h - h*|| <= m/(1-m) ||h_{t+1} - h_t|| <= m/(1-m) tol ||h||, plus rounding of the map.
    slack = 10 * problem.n * eps(dtype) * norm(b) / (1 - problem.mu) ** 2
    assert sol.error_bound is not None
    # (the bound's allowances: the computed step norm, and the rounding of a damped combination)
    rounding_allowance = (1 + m) * eps(dtype) * norm(h) * (1 if damping == 1.0 else 7) * 1.01 / (1 - m)
    assert sol.error_bound <= m / (1 - m) * tol * norm(h) * (1 + 4 * (problem.n + 2) * eps(dtype)) + rounding_allowance
    assert error <= sol.error_bound + slack
    assert sol.value.dtype == h0.dtype


def test_absolute_floor_for_zero_fixed_point(backend) -> None:
    h0 = backend.asarray(np.ones(3))
    with pytest.raises(rbp_core.ConvergenceError):
        rbp_core.fixed_point(lambda h: 0.5 * h, h0, rbp_core.FixedPointIteration(rtol=1e-3, max_iter=50))
    sol = rbp_core.fixed_point(lambda h: 0.5 * h, h0, rbp_core.FixedPointIteration(rtol=1e-3, atol=1e-8, max_iter=100))
    assert sol.converged
    assert norm(backend.to_numpy(sol.value)) <= 2e-8


def test_counts_and_residual_history(backend) -> None:
    calls = []

    def f(h):
        calls.append(1)
        return 0.5 * h + 1.0

    sol = rbp_core.fixed_point(f, backend.asarray(np.zeros(2)), rbp_core.FixedPointIteration(rtol=1e-12))
    assert len(calls) == sol.num_f_evals == sol.num_steps == len(sol.residual_norms)
    assert sol.num_vjp == sol.num_jvp == 0
    assert all(b <= a for a, b in zip(sol.residual_norms, sol.residual_norms[1:], strict=False))
    np.testing.assert_allclose(backend.to_numpy(sol.value), [2.0, 2.0])


def test_divergent_map_is_reported(backend) -> None:
    with pytest.raises(rbp_core.ConvergenceError) as info:
        rbp_core.fixed_point(
            lambda h: 3.0 * h + 1.0, backend.asarray(np.zeros(2)), rbp_core.FixedPointIteration(max_iter=500)
        )
    assert info.value.status in (Status.DIVERGED, Status.NONFINITE)
    assert np.all(np.isfinite(backend.to_numpy(info.value.solution.value)))


def test_nonfinite_start(backend) -> None:
    h0 = backend.asarray([np.nan, 1.0])
    with pytest.raises(rbp_core.ConvergenceError, match="non-finite"):
        rbp_core.fixed_point(lambda h: h, h0)
    sol = rbp_core.fixed_point(lambda h: h, h0, throw=False)
    assert sol.status is Status.NONFINITE
    assert np.all(np.isfinite(backend.to_numpy(sol.value)))

"""Neumann-RBP against the dense partial sum and the dense solve, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import rbp_core
from strategies import Problem, eps, norm, problems, rounding


def partial_sum(J: np.ndarray, g: np.ndarray, steps: int) -> np.ndarray:
    v = g.reshape(-1)
    z = v.copy()
    for _ in range(steps):
        v = J.T @ v
        z = z + v
    return z.reshape(g.shape)


@given(problem=problems(), steps=st.integers(0, 60))
def test_neumann_matches_partial_sum_and_bounds(backend, dtype, problem: Problem, steps: int) -> None:
    J, g = problem.build()
    vjp, _ = backend.matrix_callbacks(J, problem.shape, dtype)
    gb = backend.asarray(g, dtype)
    sol = rbp_core.neumann_rbp(vjp, gb, steps=steps, contraction=problem.mu)

    mu, gn = problem.mu, norm(g)
    scale = gn / (1 - mu)
    # Rounding of the solver in dtype, plus that of the float64 oracle (condition number
    # of I - J^T at most (1 + mu) / (1 - mu)).
    slack = rounding(problem.n, steps, dtype, scale) + rounding(problem.n, 0, "float64", scale * (1 + mu) / (1 - mu))
    z = backend.to_numpy(sol.value)
    assert sol.converged
    assert sol.num_vjp == steps + 1  # and one for the certificate's residual
    assert sol.num_steps == len(sol.residual_norms) == steps
    assert f"summed {steps + 1} terms" in sol.note
    # Equal to the dense partial sum of K + 1 terms.
    assert norm(z - partial_sum(J, g, steps)) <= slack
    # The paper's proposition: truncation error <= mu^(K+1)/(1-mu) ||g||.
    a_priori = mu ** (steps + 1) / (1 - mu) * gn
    true_error = norm(z - problem.exact(J, g))
    assert true_error <= a_priori + slack
    # The certificate is sound (the matrix products' own rounding, which the certificate takes as
    # exact, is the slack; tests/test_certificates.py checks it with none) and never worse than the
    # a-priori bound beyond its allowance for rounding: the residual of the computed partial sum
    # differs from (J^T)^(K+1) g by (I - J^T) times the sum's rounding, plus the rounding of forming it.
    assert sol.error_bound is not None
    assert true_error <= sol.error_bound + slack
    allowance = ((1 + mu) * slack + 4 * eps(dtype) * (gn + 2 * scale)) / (1 - mu)
    assert sol.error_bound <= (a_priori + allowance) * (1 + 4 * (problem.n + 2) * eps(dtype))


def test_zero_steps_returns_a_copy_of_g(backend) -> None:
    g = backend.asarray([1.0, 2.0])
    sol = rbp_core.neumann_rbp(lambda v: v, g, steps=0)
    assert sol.value is not g
    np.testing.assert_array_equal(backend.to_numpy(sol.value), [1.0, 2.0])
    assert sol.num_vjp == 0


def test_counts_calls_exactly(backend) -> None:
    calls = []

    def vjp(v):
        calls.append(1)
        return 0.5 * v

    sol = rbp_core.neumann_rbp(vjp, backend.asarray(np.ones(3)), steps=7)
    assert len(calls) == sol.num_vjp == 7
    assert sol.num_jvp == 0
    np.testing.assert_allclose(backend.to_numpy(sol.value), np.full(3, sum(0.5**t for t in range(8))))


def test_spectral_radius_above_one_is_a_plain_truncated_series(backend) -> None:
    # Neumann-RBP is well defined for any J: the partial sum, even when the series diverges.
    J = np.array([[1.5, 0.0], [0.0, 0.2]])
    vjp, _ = backend.matrix_callbacks(J, (2,), "float64")
    sol = rbp_core.neumann_rbp(vjp, backend.asarray(np.ones(2)), steps=5)
    np.testing.assert_allclose(backend.to_numpy(sol.value), partial_sum(J, np.ones(2), 5))
    assert sol.error_bound is None


def test_divergent_series_is_loud(backend) -> None:
    J = np.array([[1.5, 0.0], [0.0, 0.2]])
    vjp, _ = backend.matrix_callbacks(J, (2,), "float64")
    g = backend.asarray(np.ones(2))
    with pytest.raises(rbp_core.ConvergenceError, match="diverged") as info:
        rbp_core.neumann_rbp(vjp, g, steps=40)
    sol = info.value.solution
    assert sol.status is rbp_core.Status.DIVERGED
    # ||v_t|| ~ 1.5^t exceeds the default 10 * min(||g||, ...) = 10 * sqrt(2) first at t = 7,
    # and the message says what tripped and how to relax it.
    assert sol.num_vjp == 7
    assert "(divergence_factor=10);" in sol.note
    assert "raise divergence_factor or set it to None" in sol.describe()
    # with the tolerance-driven solvers' factor 1e4, at t = 24
    sol = rbp_core.neumann_rbp(vjp, g, steps=40, divergence_factor=1e4, throw=False)
    assert (sol.status, sol.num_vjp) == (rbp_core.Status.DIVERGED, 24)
    # Turned off, the partial sum is returned as it is.
    sol = rbp_core.neumann_rbp(vjp, g, steps=40, divergence_factor=None)
    assert sol.converged
    np.testing.assert_allclose(backend.to_numpy(sol.value), partial_sum(J, np.ones(2), 40))


def test_nan_during_iteration_is_loud(backend) -> None:
    count = {"n": 0}

    def vjp(v):
        count["n"] += 1
        return v * float("nan") if count["n"] == 3 else 0.5 * v

    g = backend.asarray(np.ones(4))
    with pytest.raises(rbp_core.ConvergenceError, match="non-finite") as info:
        rbp_core.neumann_rbp(vjp, g, steps=10)
    sol = info.value.solution
    assert sol.status is rbp_core.Status.NONFINITE
    assert sol.num_vjp == 3
    # The value is the last finite partial sum, never NaN.
    np.testing.assert_allclose(backend.to_numpy(sol.value), np.full(4, 1 + 0.5 + 0.25))

    count["n"] = 0
    sol = rbp_core.neumann_rbp(vjp, g, steps=10, throw=False)
    assert sol.status is rbp_core.Status.NONFINITE
    assert not sol.converged
    assert np.all(np.isfinite(backend.to_numpy(sol.value)))


def test_false_contraction_is_refused(backend) -> None:
    J = np.diag([0.9, 0.1])
    vjp, _ = backend.matrix_callbacks(J, (2,), "float64")
    g = backend.asarray(np.ones(2))
    with pytest.raises(rbp_core.ContractionViolation, match=r"contraction=0\.5"):
        rbp_core.neumann_rbp(vjp, g, steps=10, contraction=0.5)
    sol = rbp_core.neumann_rbp(vjp, g, steps=10, contraction=0.5, throw=False)
    assert sol.error_bound is None
    # A true bound certifies.
    assert rbp_core.neumann_rbp(vjp, g, steps=10, contraction=0.9).error_bound is not None

"""GMRES, BiCGSTAB and Anderson-RBP: optimality, breakdown and stagnation, warm starts, restarts.

The registry in conftest.py runs them through every backend, contract, certificate and adapter
test; here are the properties particular to them.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import rbp_core
from strategies import Problem, eps, problems


def _dense_krylov_residual(A: np.ndarray, g: np.ndarray, k: int) -> float:
    """``min ||g - A z||`` over ``z`` in the Krylov space ``span{g, A g, ..., A^(k-1) g}`` (dense, float64)."""
    K = np.empty((g.size, k))
    v = g / np.linalg.norm(g)
    for j in range(k):
        K[:, j] = v
        v = A @ v
        v = v / np.linalg.norm(v) if np.linalg.norm(v) > 0 else v
    Q, _ = np.linalg.qr(K)
    y, *_ = np.linalg.lstsq(A @ Q, g, rcond=None)
    return float(np.linalg.norm(g - A @ Q @ y))


@given(problem=st.one_of(problems(), problems(kind="expansive")), k=st.integers(1, 8))
def test_gmres_residual_is_the_least_squares_minimum_over_its_krylov_space(backend, problem: Problem, k: int) -> None:
    J, g = problem.build()
    n = problem.n
    k = min(k, n)
    A = np.eye(n) - J.T
    vjp, _ = backend.matrix_callbacks(J, problem.shape, "float64")
    sol = rbp_core.solve_adjoint(vjp, backend.asarray(g), rbp_core.GMRES(restart=k, rtol=0.0, max_iter=k), throw=False)
    z = backend.to_numpy(sol.value).reshape(-1)
    true = float(np.linalg.norm(g.reshape(-1) - A @ z))
    best = _dense_krylov_residual(A, g.reshape(-1), k)
    scale = float(np.linalg.norm(g)) * np.linalg.cond(A)
    assert true <= best + 100 * n * eps("float64") * scale, (true, best)
    assert sol.num_steps == k or (sol.converged and true <= 1e-12 * float(np.linalg.norm(g)))
    # One VJP per step, and one to confirm a residual that reached 0 (the only way to meet rtol = 0).
    assert sol.num_vjp == sol.num_steps + sol.stats["confirmations"]
    assert sol.stats["restarts"] == 0


def test_singular_systems_stagnate_or_break_down_without_nans(backend) -> None:
    g = backend.asarray(np.array([1.0, 1.0, -2.0]))
    identity = (lambda v: v), (lambda v: v)  # J = I: I - J^T = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = rbp_core.solve_adjoint(identity[0], g, rbp_core.GMRES(restart=3, max_iter=12), throw=False)
        bi = rbp_core.solve_adjoint(identity[0], g, rbp_core.BiCGSTAB(max_iter=12), throw=False)
    assert gm.status is rbp_core.Status.MAX_STEPS  # the residual stays ||g||: GMRES stagnates, never breaks
    np.testing.assert_allclose(gm.residual_norms, [np.sqrt(6.0)] * 12, rtol=1e-12)
    assert bi.status is rbp_core.Status.BREAKDOWN  # <rhat, A p> = 0 at once: reported, not a NaN
    for sol in (gm, bi):
        np.testing.assert_array_equal(backend.to_numpy(sol.value), np.zeros(3))


def test_skew_system_is_a_bicgstab_breakdown_and_gmres_solves_it(backend) -> None:
    S = np.array([[0.0, 2.0, 0.0], [-2.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    J = np.eye(3) + S  # I - J^T = S^T: skew, so <r, A r> = 0 for every r
    vjp, _ = backend.matrix_callbacks(J, (3,), "float64")
    g_np = np.array([2.0, 1.0, -1.0])  # orthogonal to the null space of S, (1, 0, 2): a consistent system
    g = backend.asarray(g_np)
    bi = rbp_core.solve_adjoint(vjp, g, rbp_core.BiCGSTAB(max_iter=50), throw=False)
    assert bi.status is rbp_core.Status.BREAKDOWN
    assert np.all(np.isfinite(backend.to_numpy(bi.value)))
    gm = rbp_core.solve_adjoint(vjp, g, rbp_core.GMRES(rtol=1e-12), throw=False)
    # S^T is singular (odd dimension) and g lies in its range: GMRES, which needs no <r, A r> != 0, solves it.
    residual = g_np - (np.eye(3) - J.T) @ backend.to_numpy(gm.value)
    assert gm.converged
    assert np.linalg.norm(residual) <= 1e-11


def test_lucky_breakdown_converges_exactly(backend) -> None:
    # g spans an invariant subspace of dimension 2: the Krylov space is exhausted after two steps.
    J = np.diag([0.5, -0.3, 0.9, 0.2])
    g_np = np.array([1.0, 2.0, 0.0, 0.0])
    vjp, _ = backend.matrix_callbacks(J, (4,), "float64")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = rbp_core.solve_adjoint(vjp, backend.asarray(g_np), rbp_core.GMRES(restart=10, rtol=1e-14))
    assert sol.num_steps == 2
    np.testing.assert_allclose(backend.to_numpy(sol.value), g_np / (1 - np.diag(J)), rtol=1e-13)


@pytest.mark.parametrize("method", [rbp_core.GMRES(), rbp_core.BiCGSTAB(), rbp_core.AndersonRBP()])
def test_warm_starts(backend, method) -> None:
    rng = np.random.default_rng(2)
    A = rng.standard_normal((20, 20))
    J = 0.8 * A / np.linalg.norm(A, 2)
    vjp, _ = backend.matrix_callbacks(J, (20,), "float64")
    g_np = rng.standard_normal(20)
    exact = np.linalg.solve(np.eye(20) - J.T, g_np)
    at_solution = rbp_core.solve_adjoint(vjp, backend.asarray(g_np), method, z0=backend.asarray(exact))
    assert at_solution.num_steps == 0
    assert at_solution.num_vjp == 1  # the warm start's residual
    cold = rbp_core.solve_adjoint(vjp, backend.asarray(g_np), method)
    near = rbp_core.solve_adjoint(vjp, backend.asarray(g_np), method, z0=backend.asarray(exact + 1e-5))
    assert near.num_steps < cold.num_steps
    assert np.linalg.norm(backend.to_numpy(near.value) - exact) <= 1.5e-8 * np.linalg.norm(g_np) / 0.2


def test_zero_g_needs_no_product(backend) -> None:
    for method in (rbp_core.GMRES(), rbp_core.BiCGSTAB(), rbp_core.AndersonRBP()):
        sol = rbp_core.solve_adjoint(lambda v: 0.5 * v, backend.asarray(np.zeros(3)), method, contraction=0.5)
        assert (sol.status, sol.num_vjp, sol.error_bound) == (rbp_core.Status.SUCCESS, 0, 0.0)


def test_gmres_restarts_and_still_converges(backend) -> None:
    rng = np.random.default_rng(5)
    A = rng.standard_normal((30, 30))
    J = 0.95 * A / np.linalg.norm(A, 2)
    vjp, _ = backend.matrix_callbacks(J, (30,), "float64")
    g_np = rng.standard_normal(30)
    sol = rbp_core.solve_adjoint(vjp, backend.asarray(g_np), rbp_core.GMRES(restart=3, rtol=1e-10, max_iter=5000))
    assert sol.stats["restarts"] >= 1
    assert sol.stats["confirmations"] >= 1
    exact = np.linalg.solve(np.eye(30) - J.T, g_np)
    # ||z - z*|| <= ||r|| / (1 - 0.95) with ||r|| <= 1e-10 ||g||
    assert np.linalg.norm(backend.to_numpy(sol.value) - exact) <= 1e-10 * np.linalg.norm(g_np) / 0.05 * (1 + 1e-6)
    assert sol.num_vjp == sol.num_steps + sol.stats["restarts"] + sol.stats["confirmations"]


def test_anderson_reaches_a_tight_tolerance_near_the_edge_of_contraction() -> None:
    # rho = 0.99: an absolute regularisation of 1e-4 (TorchDEQ's) stalls above 1e-8 here; the relative one does not.
    rng = np.random.default_rng(0)
    n = 100
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = rng.uniform(-0.99, 0.99, size=n)
    lam[0] = 0.99
    J = (Q * lam) @ Q.T
    g = rng.standard_normal(n)
    sol = rbp_core.solve_adjoint(lambda v: J.T @ v, g, rbp_core.AndersonRBP(memory=10, rtol=1e-12, max_iter=2000))
    assert np.linalg.norm(g - (np.eye(n) - J.T) @ sol.value) <= 1e-12 * np.linalg.norm(g) * (1 + 1e-6)
    plain = rbp_core.solve_adjoint(lambda v: J.T @ v, g, rbp_core.OriginalRBP(rtol=1e-12, max_iter=20_000))
    assert sol.num_vjp * 10 < plain.num_vjp


def test_new_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="restart must be >= 1"):
        rbp_core.GMRES(restart=0)
    with pytest.raises(ValueError, match="memory must be >= 1"):
        rbp_core.AndersonRBP(memory=0)
    with pytest.raises(ValueError, match=r"mixing must be a number in \(0, 1\], got 1.5"):
        rbp_core.AndersonRBP(mixing=1.5)
    with pytest.raises(TypeError):
        rbp_core.GMRES(20)  # keyword-only settings


@pytest.mark.parametrize(
    "method", [rbp_core.GMRES(rtol=1e-3), rbp_core.BiCGSTAB(rtol=1e-3), rbp_core.AndersonRBP(rtol=1e-3)]
)
def test_half_precision_states_keep_their_dtype(backend, method) -> None:
    if backend.name.startswith("array-api-strict"):
        pytest.skip("array-api-strict has no float16")
    J = np.array([[0.5, 0.2], [-0.1, 0.4]])
    vjp, _ = backend.matrix_callbacks(J, (2,), "float16")
    g = backend.asarray(np.array([1.0, -2.0]), "float16")
    sol = rbp_core.solve_adjoint(vjp, g, method)
    assert sol.value.dtype == g.dtype
    np.testing.assert_allclose(backend.to_numpy(sol.value), np.linalg.solve(np.eye(2) - J.T, [1.0, -2.0]), rtol=1e-2)

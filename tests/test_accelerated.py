"""The accelerated forward solvers: where plain iteration fails, the safeguard, the best iterate.

The registry in conftest.py runs them through every backend, contract, certificate and adapter
test; here are the properties particular to them.
"""

from __future__ import annotations

import numpy as np
import pytest

import rbp_core
from rbp_core._solvers._mixing import Memory  # the adaptive rule lives in the private memory

ACCELERATED = [rbp_core.Anderson(rtol=1e-12, max_iter=500), rbp_core.Broyden(rtol=1e-12, max_iter=500)]


@pytest.mark.parametrize("solver", ACCELERATED, ids=lambda s: s.name)
def test_solves_a_map_that_plain_iteration_cannot(backend, solver) -> None:
    # Spectral radius 1.4 (plain iteration diverges), but I - A is invertible.
    A = np.array([[0.3, 1.2, 0.0], [-1.2, 0.3, 0.2], [0.0, -0.2, -0.5]])
    _, matvec = backend.matrix_callbacks(A, (3,), "float64")
    c = backend.asarray(np.array([1.0, -1.0, 0.5]))
    plain = rbp_core.fixed_point(lambda h: matvec(h) + c, c, rbp_core.FixedPointIteration(max_iter=200), throw=False)
    assert not plain.converged
    sol = rbp_core.fixed_point(lambda h: matvec(h) + c, c, solver)
    exact = np.linalg.solve(np.eye(3) - A, [1.0, -1.0, 0.5])
    assert np.linalg.norm(backend.to_numpy(sol.value) - exact) <= 1e-10 * np.linalg.norm(exact)


@pytest.mark.parametrize("solver", ACCELERATED, ids=lambda s: s.name)
def test_reaches_the_plain_iterations_fixed_point_in_fewer_calls(backend, solver) -> None:
    rng = np.random.default_rng(4)
    Q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    lam = rng.uniform(-0.95, 0.95, size=30)
    lam[0] = 0.95
    W = (Q * lam) @ Q.T  # symmetric, spectral radius 0.95: plain iteration is slow
    Wb, _ = backend.matrix_callbacks(W.T, (30,), "float64")  # v -> W v
    u = backend.asarray(0.05 * rng.standard_normal(30))  # small inputs: tanh near linear, ||J|| near 0.95
    xp = backend.xp

    def f(h):
        return xp.tanh(Wb(h) + u)

    h0 = backend.asarray(np.zeros(30))
    plain = rbp_core.fixed_point(f, h0, rbp_core.FixedPointIteration(rtol=1e-13, max_iter=5000))
    fast = rbp_core.fixed_point(f, h0, solver, contraction=0.95)
    np.testing.assert_allclose(backend.to_numpy(fast.value), backend.to_numpy(plain.value), rtol=0, atol=1e-11)
    assert fast.num_f_evals * 3 < plain.num_f_evals
    true_error = np.linalg.norm(backend.to_numpy(fast.value) - backend.to_numpy(plain.value))
    assert fast.error_bound is not None
    assert true_error <= fast.error_bound + 1e-13


@pytest.mark.parametrize("solver", ACCELERATED, ids=lambda s: s.name)
def test_secants_are_taken_only_for_a_claimed_contraction_and_change_nothing(solver) -> None:
    rng = np.random.default_rng(5)
    W = 0.9 * np.linalg.qr(rng.standard_normal((20, 20)))[0]  # orthogonal times 0.9: ||J|| <= 0.9
    u = rng.standard_normal(20)

    def f(h):
        return np.tanh(W @ h + u)

    claimed = rbp_core.fixed_point(f, np.zeros(20), solver, contraction=0.95)
    plain = rbp_core.fixed_point(f, np.zeros(20), solver)
    np.testing.assert_array_equal(claimed.value, plain.value)  # the same iterates, bit for bit
    assert claimed.num_f_evals == plain.num_f_evals
    assert claimed.error_bound is not None
    assert plain.error_bound is None
    # Without a claim no pair is computed; with one every pair of consecutive evaluations is checked.
    state, _, _ = solver.init(f, np.zeros(20), rbp_core.VectorOps(np), secants=False)
    assert solver.lipschitz_pairs(state) == ()
    wrong = rbp_core.fixed_point(f, np.zeros(20), solver, contraction=0.5, throw=False)
    assert wrong.contraction_violated


@pytest.mark.parametrize(("lam", "beta"), [(-3.0, 0.5), (-0.5, 2 / 3), (0.5, 2.0), (0.9, 4.0)])
def test_the_adaptive_mixing_is_the_scalar_inverse_along_the_newest_secant(lam, beta) -> None:
    # F(h) = lam h + c: the ideal step along any direction is 1 / (1 - lam), kept in [0.5, 4].
    rng = np.random.default_rng(1)
    ops = rbp_core.VectorOps(np)
    x0, x1, c = rng.standard_normal((3, 6))
    G0, G1 = lam * x0 + c, lam * x1 + c
    memory = Memory(3, "adaptive")
    memory.extend(ops, G1 - x1, G1, G0 - x0, G0)
    assert memory.update(ops.to_host(memory.transfer(ops, G1 - x1))[1:], 1e-10)
    assert memory.beta == pytest.approx(beta, rel=1e-12)


@pytest.mark.parametrize(("low", "high"), [(0.0, 0.95), (-0.95, 0.0), (-0.95, 0.95)])
def test_the_adaptive_mixing_takes_fewer_calls_than_a_fixed_one(low, high) -> None:
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    A = (Q * np.linspace(low, high, 40)) @ Q.T
    u = 0.05 * rng.standard_normal(40)

    def f(h):
        return np.tanh(A @ h + u)

    calls = {
        mixing: rbp_core.fixed_point(
            f, np.zeros(40), rbp_core.Anderson(memory=5, mixing=mixing, rtol=1e-11)
        ).num_f_evals
        for mixing in ("adaptive", 1.0)
    }
    assert calls["adaptive"] < calls[1.0]


def test_anderson_reaches_1e_minus_10_near_the_edge() -> None:
    rng = np.random.default_rng(0)
    n = 200
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = rng.uniform(-0.99, 0.99, size=n)
    lam[0] = 0.99
    W = (Q * lam) @ Q.T
    u = 0.05 * rng.standard_normal(n)
    sol = rbp_core.fixed_point(lambda h: np.tanh(W @ h + u), np.zeros(n), rbp_core.Anderson(rtol=1e-10, max_iter=2000))
    F = np.tanh(W @ sol.value + u)
    assert np.linalg.norm(F - sol.value) <= 1e-10 * np.linalg.norm(F) * (1 + 1e-6)


def test_the_safeguard_rejects_a_growing_step_and_still_converges(backend) -> None:
    # A strongly nonlinear map: unsafeguarded mixing overshoots; a strict safeguard must act.
    xp = backend.xp
    c = backend.asarray(np.array([2.0, -1.5, 0.7, 3.0]))

    def f(h):
        return 0.9 * xp.sin(3.0 * h) + 0.1 * c

    sol = rbp_core.fixed_point(
        f, backend.asarray(np.zeros(4)), rbp_core.Anderson(memory=5, safeguard=1.01, rtol=1e-12, max_iter=3000)
    )
    assert sol.stats["rejected_steps"] >= 1
    h = backend.to_numpy(sol.value)
    assert np.linalg.norm(0.9 * np.sin(3.0 * h) + 0.1 * backend.to_numpy(c) - h) <= 1e-11 * np.linalg.norm(h)


def test_a_budget_stop_returns_the_best_iterate_and_says_so() -> None:
    A = np.array([[0.0, 1.5], [-1.5, 0.0]])
    residuals = []
    sol = rbp_core.fixed_point(
        lambda h: A @ h + 1.0, np.zeros(2), rbp_core.Anderson(rtol=0.0, max_iter=12), throw=False
    )
    assert sol.status is rbp_core.Status.MAX_STEPS or sol.converged
    k = sol.stats["best_iteration"]
    assert sol.residual_norms[k - 1] == min(sol.residual_norms)
    residuals = np.linalg.norm(A @ sol.value + 1.0 - sol.value)
    assert residuals == pytest.approx(min(sol.residual_norms), rel=1e-6, abs=1e-15)
    if k != sol.num_steps:
        assert f"returned iteration {k}" in sol.note


def test_the_torch_adapter_uses_an_accelerated_forward_solver_and_refuses_to_unroll_it() -> None:
    torch = pytest.importorskip("torch")
    from rbp_core.backends.torch import BPTT, fixed_point

    W = torch.tensor([[0.5, -0.3], [0.2, 0.4]], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([1.0, -1.0], dtype=torch.float64)
    h, info = fixed_point(
        lambda h: torch.tanh(W @ h + x),
        torch.zeros(2, dtype=torch.float64),
        backward=rbp_core.GMRES(rtol=1e-12),
        solver=rbp_core.Anderson(rtol=1e-13),
    )
    (grad,) = torch.autograd.grad(h.sum(), W)
    h2, _ = fixed_point(
        lambda h: torch.tanh(W @ h + x),
        torch.zeros(2, dtype=torch.float64),
        backward=rbp_core.CGRBP(rtol=1e-13),
        solver=rbp_core.FixedPointIteration(rtol=1e-14),
    )
    (ref,) = torch.autograd.grad(h2.sum(), W)
    torch.testing.assert_close(grad, ref, rtol=1e-9, atol=1e-12)
    assert info.forward.method == "anderson"
    with pytest.raises(ValueError, match="Anderson declares its step not differentiable"):
        fixed_point(
            lambda h: torch.tanh(W @ h + x),
            torch.zeros(2, dtype=torch.float64),
            backward=BPTT(),
            solver=rbp_core.Anderson(),
        )

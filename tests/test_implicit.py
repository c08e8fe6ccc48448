"""Method objects and the framework-neutral entry points."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import rbp_core
from conftest import ADJOINT_METHODS


def test_method_objects_are_frozen_and_validated() -> None:
    m = rbp_core.Neumann(steps=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.steps = 6  # type: ignore[misc]
    with pytest.raises(ValueError, match="steps must be >= 0"):
        rbp_core.Neumann(steps=-2)
    with pytest.raises(ValueError, match="max_iter must be >= 1"):
        rbp_core.OriginalRBP(max_iter=0)
    with pytest.raises(ValueError, match="tol must be finite and >= 0"):
        rbp_core.CGRBP(rtol=-1.0)
    with pytest.raises(ValueError, match="damping"):
        rbp_core.FixedPointIteration(damping=1.5)
    for method in (rbp_core.Neumann(3), rbp_core.OriginalRBP(), rbp_core.CGRBP()):
        assert isinstance(method, rbp_core.AdjointMethod)
    assert rbp_core.CGRBP().needs_jvp
    assert not rbp_core.Neumann(1).supports_warm_start


@pytest.mark.parametrize("name", list(ADJOINT_METHODS))
def test_implicit_backward_matches_dense(backend, name) -> None:
    method = ADJOINT_METHODS[name].converged(1e-12, 0.6)
    rng = np.random.default_rng(3)
    n, p = 6, 4
    J = 0.6 * rng.standard_normal((n, n)) / np.sqrt(n) / 2
    B = rng.standard_normal((n, p))  # dF/dw
    g = rng.standard_normal(n)
    vjp, jvp = backend.matrix_callbacks(J, (n,), "float64")
    BT = backend.asarray(B.T)
    grad, sol = rbp_core.implicit_backward(
        vjp, lambda z: backend.xp.matmul(BT, z), backend.asarray(g), method, jvp_state=jvp
    )
    expected = B.T @ np.linalg.solve(np.eye(n) - J.T, g)
    np.testing.assert_allclose(backend.to_numpy(grad), expected, rtol=1e-9, atol=1e-12)
    assert sol.converged


def test_cg_without_jvp_is_refused() -> None:
    with pytest.raises(ValueError, match="CGRBP needs the jvp"):
        rbp_core.implicit_backward(lambda v: v, lambda z: z, np.ones(2), rbp_core.CGRBP())
    with pytest.raises(ValueError, match="CGRBP needs jvp_state"):
        rbp_core.implicit_gradient(
            lambda h: 0.5 * h,
            np.ones(2),
            np.ones(2),
            vjp_state=lambda h, v: v,
            vjp_params=lambda h, z: z,
            method=rbp_core.CGRBP(),
        )


def test_unknown_method_is_refused() -> None:
    with pytest.raises(TypeError, match="method must be an adjoint method"):
        rbp_core.implicit_backward(lambda v: v, lambda z: z, np.ones(2), "neumann")  # type: ignore[arg-type]


def test_neumann_refuses_warm_start() -> None:
    with pytest.raises(ValueError, match="warm start"):
        rbp_core.implicit_backward(lambda v: 0.5 * v, lambda z: z, np.ones(2), rbp_core.Neumann(3), z0=np.ones(2))


def test_implicit_gradient_of_nonlinear_map_matches_finite_differences(backend) -> None:
    """F(h) = tanh(W h + a x): gradient of L = sum(h*) with respect to the scalar a."""
    xp = backend.xp
    rng = np.random.default_rng(7)
    n = 5
    W_np = 0.5 * rng.standard_normal((n, n)) / np.linalg.norm(rng.standard_normal((n, n)), 2)
    W_np = 0.5 * W_np / np.linalg.norm(W_np, 2)
    x_np = rng.standard_normal(n)
    W, WT, x = backend.asarray(W_np), backend.asarray(W_np.T), backend.asarray(x_np)

    def solve_h(a: float) -> np.ndarray:
        h = np.zeros(n)
        for _ in range(200):
            h = np.tanh(W_np @ h + a * x_np)
        return h

    def f(h):
        return xp.tanh(xp.matmul(W, h) + 0.8 * x)

    def vjp_state(h, v):
        return xp.matmul(WT, (1.0 - f(h) ** 2) * v)

    def jvp_state(h, v):
        return (1.0 - f(h) ** 2) * xp.matmul(W, v)

    def vjp_params(h, z):
        return xp.sum((1.0 - f(h) ** 2) * x * z)

    h0 = backend.asarray(np.zeros(n))
    fd = (np.sum(solve_h(0.8 + 1e-6)) - np.sum(solve_h(0.8 - 1e-6))) / 2e-6
    for method in (rbp_core.Neumann(60), rbp_core.OriginalRBP(rtol=1e-12), rbp_core.CGRBP(rtol=1e-12)):
        res = rbp_core.implicit_gradient(
            f,
            h0,
            xp.ones_like,
            vjp_state=vjp_state,
            vjp_params=vjp_params,
            jvp_state=jvp_state,
            method=method,
            solver=rbp_core.FixedPointIteration(rtol=1e-13),
            contraction=0.5,
        )
        assert res.forward.converged
        assert res.backward.converged
        assert float(res.gradient) == pytest.approx(fd, rel=1e-7)
        assert res.backward.error_bound is not None
        assert res.backward.error_bound < 1e-9


@pytest.mark.parametrize("name", list(ADJOINT_METHODS))
def test_scalar_state(backend, name) -> None:
    """A 0-d state is a state like any other (a scalar iteration's gradient was zero in a peer)."""
    method = ADJOINT_METHODS[name].converged(1e-12, 0.6)
    g = backend.asarray(np.asarray(2.0))
    grad, sol = rbp_core.implicit_backward(lambda v: 0.5 * v, lambda z: 3.0 * z, g, method, jvp_state=lambda v: 0.5 * v)
    assert sol.converged
    assert sol.value.shape == ()
    assert float(backend.to_numpy(grad)) == pytest.approx(3.0 * 2.0 / (1 - 0.5), rel=1e-10)

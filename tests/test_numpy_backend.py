"""The NumPy adapter: callbacks from dense, sparse and operator Jacobians; the simulator helper."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg

import rbp_core
from rbp_core.backends.numpy import as_state, implicit_gradient, jacobian_callbacks


def _forms(J: np.ndarray) -> dict[str, object]:
    return {
        "dense": J,
        "csr": scipy.sparse.csr_matrix(J),
        "csr_array": scipy.sparse.csr_array(J),
        "operator": scipy.sparse.linalg.aslinearoperator(J),
    }


@pytest.mark.parametrize("form", ["dense", "csr", "csr_array", "operator"])
@pytest.mark.parametrize("shape", [(6,), (2, 3)])
def test_callbacks_from_each_form(form: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    J = 0.4 * rng.standard_normal((6, 6)) / np.sqrt(6)
    cb = jacobian_callbacks(_forms(J)[form], shape=shape)
    v = rng.standard_normal(shape)
    np.testing.assert_allclose(cb.vjp(v), (J.T @ v.reshape(-1)).reshape(shape))
    np.testing.assert_allclose(cb.jvp(v), (J @ v.reshape(-1)).reshape(shape))
    g = rng.standard_normal(shape)
    exact = np.linalg.solve(np.eye(6) - J.T, g.reshape(-1)).reshape(shape)
    for sol in (
        rbp_core.neumann_rbp(cb.vjp, g, steps=80),
        rbp_core.original_rbp(cb.vjp, g, rtol=1e-13),
        rbp_core.cg_rbp(cb.vjp, cb.jvp, g, rtol=1e-13),
    ):
        np.testing.assert_allclose(sol.value, exact, rtol=1e-10, atol=1e-12)


def test_float32_state_keeps_its_dtype() -> None:
    cb = jacobian_callbacks(np.eye(3) * 0.5)
    out = cb.vjp(np.ones(3, dtype=np.float32))
    assert out.dtype == np.float32


def test_bad_jacobians() -> None:
    with pytest.raises(ValueError, match="must be square"):
        jacobian_callbacks(np.ones((2, 3)))
    with pytest.raises(ValueError, match="2-d"):
        jacobian_callbacks(np.ones(3))
    with pytest.raises(TypeError, match=r"must be a numpy\.ndarray"):
        jacobian_callbacks([[1.0]])
    with pytest.raises(TypeError, match="must be real"):
        jacobian_callbacks(np.eye(2, dtype=complex))
    with pytest.raises(ValueError, match="has 5 elements but J is 6 x 6"):
        jacobian_callbacks(np.eye(6), shape=(5,))
    cb = jacobian_callbacks(np.eye(4))
    with pytest.raises(ValueError, match=r"vjp got a vector of shape \(3,\)"):
        cb.vjp(np.ones(3))


def test_as_state() -> None:
    assert as_state([1, 2]).dtype == np.float64
    assert as_state(np.ones(2, dtype=np.float32)).dtype == np.float32
    with pytest.raises(TypeError, match="must be real"):
        as_state(np.ones(2, dtype=complex), "h0")


def test_helper_with_hand_written_derivatives() -> None:
    """F(h) = tanh(W h + b); L = 0.5 ||h* - t||^2; gradients in W and b against finite differences."""
    rng = np.random.default_rng(1)
    n = 4
    W = rng.standard_normal((n, n))
    W *= 0.7 / np.linalg.norm(W, 2)
    b = rng.standard_normal(n)
    t = rng.standard_normal(n)

    def run(W: np.ndarray, b: np.ndarray, method: rbp_core.AdjointMethod) -> rbp_core.ImplicitGradient:
        def f(h: np.ndarray) -> np.ndarray:
            return np.tanh(W @ h + b)

        def vjp_state(h: np.ndarray, v: np.ndarray) -> np.ndarray:
            return W.T @ ((1 - f(h) ** 2) * v)

        def jvp_state(h: np.ndarray, v: np.ndarray) -> np.ndarray:
            return (1 - f(h) ** 2) * (W @ v)

        def vjp_params(h: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            s = (1 - f(h) ** 2) * z
            return np.outer(s, h), s

        return implicit_gradient(
            f,
            [0.0] * n,
            lambda h: h - t,
            vjp_state=vjp_state,
            vjp_params=vjp_params,
            jvp_state=jvp_state,
            method=method,
            solver=rbp_core.FixedPointIteration(rtol=1e-14),
            contraction=0.7,
        )

    def loss(W: np.ndarray, b: np.ndarray) -> float:
        h = run(W, b, rbp_core.Neumann(0)).value
        return 0.5 * float(np.sum((h - t) ** 2))

    eps = 1e-6
    fd_b = np.array([(loss(W, b + eps * e) - loss(W, b - eps * e)) / (2 * eps) for e in np.eye(n)])
    fd_W = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            E = np.zeros((n, n))
            E[i, j] = eps
            fd_W[i, j] = (loss(W + E, b) - loss(W - E, b)) / (2 * eps)
    for method in (rbp_core.Neumann(80), rbp_core.OriginalRBP(rtol=1e-12), rbp_core.CGRBP(rtol=1e-12)):
        res = run(W, b, method)
        gW, gb = res.gradient
        np.testing.assert_allclose(gb, fd_b, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(gW, fd_W, rtol=1e-6, atol=1e-9)
        assert res.forward.converged
        assert res.backward.converged

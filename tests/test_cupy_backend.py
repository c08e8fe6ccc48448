"""The CuPy adapter: Jacobian callbacks, the simulator helper and the fused kernels, on a CUDA device.

Without CuPy or without a CUDA device these tests skip with the reason
(tests/test_cupy_import.py checks the ImportError that says how to install CuPy).
The solvers themselves run on CuPy arrays in the backend matrix (``cupy`` in
``RBP_BACKENDS``), with the fused kernels once ``rbp_core.backends.cupy`` is imported (which
registers them with the core's ops registry).
"""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import pytest

import rbp_core

HAVE_CUPY = importlib.util.find_spec("cupy") is not None


def _cuda() -> bool:
    if not HAVE_CUPY:
        return False
    try:
        import cupy

        return bool(cupy.cuda.runtime.getDeviceCount() > 0)
    except Exception:  # noqa: BLE001 - any failure means no usable device
        return False


CUDA = _cuda()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="cupy: needs CuPy and a CUDA device; none here")]


@pytest.fixture(scope="module")
def cp():
    if not CUDA:
        pytest.skip("cupy: needs CuPy and a CUDA device; none here")
    import cupy

    return cupy


@pytest.fixture(scope="module")
def cb():
    if not CUDA:
        pytest.skip("cupy: needs CuPy and a CUDA device; none here")
    return importlib.import_module("rbp_core.backends.cupy")


def _ops(cp, fused):
    from rbp_core._callbacks import namespace_of
    from rbp_core._ops import VectorOps, ops_for

    xp = namespace_of(cp.zeros(1), "x")
    return ops_for(xp) if fused else VectorOps(xp)


# --- fused kernels against the generic operations and NumPy -----------------------------------------
SIZES = [1, 255, 257, 100_003, 3_000_001]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.usefixtures("cb")
def test_fused_kernels_match_numpy(cp, n, dtype):
    from rbp_core.backends._cupy_kernels import FusedOps

    rng = np.random.default_rng(n)
    a_np, b_np, c_np = (rng.standard_normal(n).astype(dtype) for _ in range(3))
    a, b, c = (cp.asarray(x) for x in (a_np, b_np, c_np))
    ops = _ops(cp, fused=True)
    assert isinstance(ops, FusedOps)
    rtol = 1e-6 if dtype == "float32" else 1e-13
    f64 = np.float64

    out, sq = ops.add_sqnorm(a, b)  # (b + a, ||a||^2)
    np.testing.assert_array_equal(out.get(), b_np + a_np)
    np.testing.assert_allclose(float(sq), np.sum(a_np.astype(f64) ** 2), rtol=rtol)

    out, sq = ops.add_sqdist(a, b, c)  # (a + b, ||a + b - c||^2)
    np.testing.assert_array_equal(out.get(), a_np + b_np)
    np.testing.assert_allclose(float(sq), np.sum((a_np + b_np - c_np).astype(f64) ** 2), rtol=rtol)

    for alpha in (-1.0, 0.625, cp.asarray(0.625), cp.asarray(0.625, dtype=dtype)):
        a_host = np.asarray(float(alpha), dtype=dtype)
        out, sq = ops.axpy_sqnorm(alpha, a, b)  # (b + alpha a, ||.||^2)
        np.testing.assert_allclose(out.get(), b_np + a_host * a_np, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(float(sq), np.sum((b_np + a_host * a_np).astype(f64) ** 2), rtol=10 * rtol)
        out = ops.axpy(alpha, a, b)
        np.testing.assert_allclose(out.get(), b_np + a_host * a_np, rtol=rtol, atol=rtol)
        assert out.dtype == a.dtype

    sums = ops.step_sqnorms(a, b)
    dsq, hsq = ops.to_host(sums)
    assert isinstance(dsq, float)
    np.testing.assert_allclose(dsq, np.sum((a_np - b_np).astype(f64) ** 2), rtol=rtol)
    np.testing.assert_allclose(hsq, np.sum(a_np.astype(f64) ** 2), rtol=rtol)

    for x_np, x in zip((a_np, b_np, c_np), (a, b, c), strict=True):
        np.testing.assert_array_equal(x.get(), x_np)  # inputs untouched


@pytest.mark.usefixtures("cb")
def test_fused_kernels_are_deterministic(cp):
    x = cp.asarray(np.random.default_rng(0).standard_normal(2_000_003))
    ops = _ops(cp, fused=True)
    sums = {float(ops.add_sqnorm(x, x)[1]) for _ in range(5)}
    assert len(sums) == 1


def test_strided_and_other_dtypes_fall_back(cp, cb):
    ops = _ops(cp, fused=True)
    base = cp.arange(20, dtype=cp.float64)
    strided = base[::2]
    assert not strided.flags.c_contiguous
    out, sq = ops.add_sqnorm(strided, strided)
    np.testing.assert_array_equal(out.get(), 2 * base.get()[::2])
    assert float(sq) == float(np.sum(base.get()[::2] ** 2))
    with cb.fused_kernels(False):
        out, sq = ops.add_sqnorm(base, base)
    np.testing.assert_array_equal(out.get(), 2 * base.get())
    half = cp.ones(4, dtype=cp.float16)
    out, sq = ops.axpy_sqnorm(0.5, half, half)
    assert out.dtype == cp.float16


@pytest.mark.usefixtures("cb")
def test_breakdown_and_overflow_are_seen_through_the_fused_kernels(cp):
    # CG on a singular system: J = diag(1, 0.5) makes I - J^T singular and g = (1, 1) is not in its range.
    J = cp.asarray([[1.0, 0.0], [0.0, 0.5]])
    sol = rbp_core.cg_rbp(lambda v: J.T @ v, lambda v: J @ v, cp.ones(2), rtol=1e-14, max_iter=50, throw=False)
    assert sol.status in (rbp_core.Status.BREAKDOWN, rbp_core.Status.MAX_STEPS)
    assert np.isfinite(sol.value.get()).all()
    # A term whose sum of squares overflows float64 but whose norm does not: the norm is still right.
    big = cp.full(4, 1e160)
    sol = rbp_core.neumann_rbp(lambda v: 0.5 * v, big, steps=1)
    np.testing.assert_allclose(sol.residual_norms[0], 0.5 * 2e160, rtol=1e-12)
    # A non-finite VJP is caught.
    sol = rbp_core.neumann_rbp(lambda v: v * cp.nan, cp.ones(3), steps=3, throw=False)
    assert sol.status is rbp_core.Status.NONFINITE
    assert np.isfinite(sol.value.get()).all()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_solvers_fused_equal_generic(cp, cb, dtype):
    rng = np.random.default_rng(3)
    n = 300
    A = rng.standard_normal((n, n))
    J = cp.asarray(0.8 * A / np.linalg.norm(A, 2), dtype=dtype)
    g = cp.asarray(rng.standard_normal(n), dtype=dtype)
    vjp, jvp = (lambda v: J.T @ v), (lambda v: J @ v)
    exact = np.linalg.solve(np.eye(n) - J.get().astype(np.float64).T, g.get().astype(np.float64))
    tol = 1e-5 if dtype == "float32" else 1e-12
    runs = {}
    for fused in (True, False):
        with cb.fused_kernels(fused):
            runs[fused] = [
                rbp_core.neumann_rbp(vjp, g, steps=150),
                rbp_core.original_rbp(vjp, g, rtol=tol),
                rbp_core.cg_rbp(vjp, jvp, g, rtol=tol),
            ]
    for a, b in zip(runs[True], runs[False], strict=True):
        assert a.status is b.status
        assert a.value.dtype == g.dtype
        scale = np.linalg.norm(exact)
        assert np.linalg.norm(a.value.get() - exact) <= 50 * tol * scale
        assert abs(a.num_steps - b.num_steps) <= 1
        np.testing.assert_allclose(
            a.residual_norms[:5], b.residual_norms[:5], rtol=1e-4 if dtype == "float32" else 1e-10
        )
    h = rbp_core.fixed_point(
        lambda h: cp.tanh(J @ h + g), cp.zeros(n, dtype=dtype), rbp_core.FixedPointIteration(rtol=tol)
    )
    assert h.converged
    assert isinstance(h.value, cp.ndarray)


# --- jacobian_callbacks ----------------------------------------------------------------------------
def _kinds(cp, J_np):
    import cupyx.scipy.sparse as sp
    import cupyx.scipy.sparse.linalg as spla

    J = cp.asarray(J_np)
    op = spla.LinearOperator(J.shape, matvec=lambda v: J @ v, rmatvec=lambda v: J.T @ v, dtype=J.dtype)
    return {"dense": J, "csr": sp.csr_matrix(J), "csc": sp.csc_matrix(J), "operator": op}


@pytest.mark.parametrize("kind", ["dense", "csr", "csc", "operator"])
def test_jacobian_callbacks(cp, cb, kind):
    rng = np.random.default_rng(1)
    J_np = rng.standard_normal((12, 12)) * (rng.random((12, 12)) < 0.3)
    J = _kinds(cp, J_np)[kind]
    calls = cb.jacobian_callbacks(J, shape=(3, 4))
    v_np = rng.standard_normal((3, 4))
    v = cp.asarray(v_np)
    np.testing.assert_allclose(calls.vjp(v).get(), (J_np.T @ v_np.ravel()).reshape(3, 4), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(calls.jvp(v).get(), (J_np @ v_np.ravel()).reshape(3, 4), rtol=1e-12, atol=1e-12)
    out32 = calls.vjp(v.astype(cp.float32))
    assert out32.dtype == cp.float32
    assert out32.shape == (3, 4)
    with pytest.raises(ValueError, match="state shape"):
        calls.vjp(cp.ones(12))
    with pytest.raises(TypeError, match=r"cupy\.ndarray"):
        calls.vjp(np.ones((3, 4)))
    np.testing.assert_array_equal(v.get(), v_np)


def test_jacobian_callbacks_errors(cp, cb):
    with pytest.raises(TypeError, match=r"rbp_core.backends.numpy"):
        cb.jacobian_callbacks(np.eye(3))
    with pytest.raises(ValueError, match="square"):
        cb.jacobian_callbacks(cp.ones((2, 3)))
    with pytest.raises(ValueError, match="2-d"):
        cb.jacobian_callbacks(cp.ones(3))
    with pytest.raises(TypeError, match="real"):
        cb.jacobian_callbacks(cp.eye(3, dtype=cp.complex128))
    with pytest.raises(ValueError, match="elements"):
        cb.jacobian_callbacks(cp.eye(4), shape=(3,))
    with pytest.raises(TypeError, match="real"):
        cb.as_state(cp.ones(2, dtype=cp.complex64))
    assert cb.as_state([1, 2]).dtype == cp.float64


@pytest.mark.parametrize(
    "method", [rbp_core.Neumann(steps=200), rbp_core.OriginalRBP(rtol=1e-12), rbp_core.CGRBP(rtol=1e-12)]
)
def test_implicit_gradient_of_a_cupy_simulator(cp, cb, method):
    # h = tanh(W h + U x), dL/dh* = h* - target; the gradient with respect to x against a dense solve.
    rng = np.random.default_rng(2)
    n, m = 80, 5
    W_np = rng.standard_normal((n, n))
    W_np *= 0.7 / np.linalg.norm(W_np, 2)
    U_np, x_np, t_np = rng.standard_normal((n, m)), rng.standard_normal(m), rng.standard_normal(n)
    W, U, x, t = (cp.asarray(a) for a in (W_np, U_np, x_np, t_np))

    def f(h):
        return cp.tanh(W @ h + U @ x)

    res = cb.implicit_gradient(
        f,
        cp.zeros(n),
        lambda h: h - t,
        vjp_state=lambda h, v: W.T @ ((1 - f(h) ** 2) * v),
        jvp_state=lambda h, v: (1 - f(h) ** 2) * (W @ v),
        vjp_params=lambda h, z: U.T @ ((1 - f(h) ** 2) * z),
        method=method,
        solver=rbp_core.FixedPointIteration(rtol=1e-13),
    )
    assert isinstance(res.gradient, cp.ndarray)
    h = res.value.get()
    D = np.diag(1 - np.tanh(W_np @ h + U_np @ x_np) ** 2)
    J = D @ W_np
    dh_dx = np.linalg.solve(np.eye(n) - J, D @ U_np)
    np.testing.assert_allclose(res.gradient.get(), dh_dx.T @ (h - t_np), rtol=1e-8, atol=1e-10)

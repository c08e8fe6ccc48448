"""Bad input fails loudly, with messages that name the problem; inputs are never modified."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import rbp_core
from conftest import ADJOINT_METHODS


def _solver(name: str):
    def solve(vjp, g, **kw):
        return rbp_core.solve_adjoint(vjp, g, ADJOINT_METHODS[name].budget(5), jvp=lambda v: 0.5 * v, **kw)

    return solve


SOLVERS = {name: _solver(name) for name in ADJOINT_METHODS}


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_wrong_shape_names_callback_and_shapes(backend, solver) -> None:
    g = backend.asarray(np.ones((2, 3)))
    xp = backend.xp
    with pytest.raises(ValueError, match=r"vjp returned an array of shape \(6,\); expected shape \(2, 3\)"):
        SOLVERS[solver](lambda v: xp.reshape(v, (6,)), g)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_wrong_dtype(backend, solver) -> None:
    g = backend.asarray(np.ones(3), "float64")
    xp = backend.xp
    with pytest.raises(TypeError, match=r"vjp returned dtype .*float32.*expected .*float64"):
        SOLVERS[solver](lambda v: xp.astype(v, xp.float32), g)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_wrong_library(backend, solver) -> None:
    if backend.name.startswith("numpy"):
        pytest.skip("the wrong library for a NumPy state is tested with a list below")
    g = backend.asarray(np.ones(3))
    with pytest.raises(TypeError, match=r"vjp returned a numpy\.ndarray; expected an array of the same library"):
        SOLVERS[solver](lambda v: np.ones(3), g)


def test_list_returned_for_numpy_state() -> None:
    with pytest.raises(TypeError, match=r"vjp returned a builtins\.list"):
        rbp_core.neumann_rbp(lambda v: [0.0, 0.0], np.ones(2), steps=1)


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (lambda g: rbp_core.neumann_rbp(lambda v: v, g, steps=-1), ValueError, "steps must be >= 0, got -1"),
        (lambda g: rbp_core.neumann_rbp(lambda v: v, g, steps=2.5), TypeError, "steps must be an integer"),
        (lambda g: rbp_core.neumann_rbp(lambda v: v, g, steps=True), TypeError, "steps must be an integer"),
        (lambda g: rbp_core.original_rbp(lambda v: v, g, rtol=-1e-3), ValueError, "tol must be finite and >= 0"),
        (lambda g: rbp_core.original_rbp(lambda v: v, g, max_iter=0), ValueError, "max_iter must be >= 1, got 0"),
        (lambda g: rbp_core.cg_rbp(lambda v: v, lambda v: v, g, rtol=float("nan")), ValueError, "tol must be finite"),
        (lambda g: rbp_core.neumann_rbp(lambda v: v, g, steps=1, contraction=1.0), ValueError, r"\[0, 1\)"),
        (lambda g: rbp_core.neumann_rbp(lambda v: v, g, steps=1, contraction=-0.1), ValueError, r"\[0, 1\)"),
        (
            lambda g: rbp_core.fixed_point(lambda v: v, g, rbp_core.FixedPointIteration(damping=0.0)),
            ValueError,
            r"damping must lie in \(0, 1\]",
        ),
        (lambda g: rbp_core.original_rbp(lambda v: v, g, divergence_factor=0.5), ValueError, "divergence_factor"),
        (lambda g: rbp_core.neumann_rbp(None, g, steps=1), TypeError, "vjp must be callable"),
    ],
)
def test_bad_options(backend, call, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        call(backend.asarray(np.ones(2)))


def test_integer_state_is_refused() -> None:
    with pytest.raises(TypeError, match="g must have a real floating dtype"):
        rbp_core.neumann_rbp(lambda v: v, np.ones(2, dtype=np.int64), steps=1)


def test_non_array_is_refused() -> None:
    with pytest.raises(TypeError, match="g must be an array"):
        rbp_core.neumann_rbp(lambda v: v, [1.0, 2.0], steps=1)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_nonfinite_rhs(backend, solver) -> None:
    g = backend.asarray([1.0, np.inf])
    with pytest.raises(rbp_core.ConvergenceError, match="non-finite") as info:
        SOLVERS[solver](lambda v: 0.5 * v, g)
    assert info.value.status is rbp_core.Status.NONFINITE
    sol = SOLVERS[solver](lambda v: 0.5 * v, g, throw=False)
    assert sol.status is rbp_core.Status.NONFINITE
    assert np.all(np.isfinite(backend.to_numpy(sol.value)))


def test_warm_start_of_wrong_shape(backend) -> None:
    g = backend.asarray(np.ones(3))
    with pytest.raises(ValueError, match=r"z0 is an array of shape \(2,\); expected shape \(3,\)"):
        rbp_core.original_rbp(lambda v: v, g, z0=backend.asarray(np.ones(2)))


def test_norm_survives_overflow_and_underflow(backend) -> None:
    from rbp_core._norms import norm

    big = backend.asarray(np.full(4, 1e30), "float32")  # sum of squares overflows float32
    with warnings.catch_warnings():
        # NumPy may report the fast path's overflow (documented in norm); the value must be right.
        warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)
        assert norm(backend.xp, big) == pytest.approx(2e30, rel=1e-6)
    tiny = backend.asarray(np.full(4, 1e-200), "float64")  # squares underflow to zero
    assert norm(backend.xp, tiny) == pytest.approx(2e-200, rel=1e-12)
    assert np.isnan(norm(backend.xp, backend.asarray([np.nan, 1.0])))
    # Subnormal entries: scaling must not divide by the subnormal maximum (PyTorch's CUDA kernels divide
    # through the reciprocal, which overflows), nor lose the tail of a long geometric series.
    sub32 = backend.asarray([1e-40, -3e-41, 0.0], "float32")
    want32 = float(np.hypot(np.float64(np.float32(1e-40)), np.float64(np.float32(3e-41))))
    assert norm(backend.xp, sub32) == pytest.approx(want32, rel=1e-6)
    sub64 = backend.asarray([1e-310, 2e-310], "float64")
    assert norm(backend.xp, sub64) == pytest.approx(5**0.5 * 1e-310, rel=1e-6)
    if backend.name != "jax":  # XLA on the CPU flushes subnormal results to zero: 5e-324 is 0 there
        assert norm(backend.xp, backend.asarray([5e-324], "float64")) == 5e-324
    huge = backend.asarray([1e300, 1e300], "float64")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)
        assert norm(backend.xp, huge) == pytest.approx(2**0.5 * 1e300, rel=1e-12)
        assert norm(backend.xp, backend.asarray(np.full(4, 1e308), "float64")) == np.inf


def test_neumann_series_into_the_subnormal_range(backend, dtype) -> None:
    # J = 0.05: the terms 0.05^t g fall below the smallest normal float32 after ~29 steps and
    # underflow to zero later; the solve must end cleanly, never report a non-finite value.
    g = backend.asarray(np.ones(3), dtype)
    sol = rbp_core.neumann_rbp(lambda v: 0.05 * v, g, steps=300)
    assert sol.status is rbp_core.Status.SUCCESS
    assert all(np.isfinite(sol.residual_norms))
    np.testing.assert_allclose(backend.to_numpy(sol.value), np.full(3, 1 / 0.95), rtol=1e-6)


def test_a_nonfinite_input_is_never_certified(backend) -> None:
    bad = backend.asarray([1.0, np.nan])
    sol = rbp_core.solve_adjoint(lambda v: 0.5 * v, bad, rbp_core.Neumann(steps=5), contraction=0.6, throw=False)
    assert (sol.status, sol.error_bound) == (rbp_core.Status.NONFINITE, None)
    fwd = rbp_core.fixed_point(lambda h: 0.5 * h, bad, contraction=0.6, throw=False)
    assert (fwd.status, fwd.error_bound) == (rbp_core.Status.NONFINITE, None)


def _vjp_params(h, z):
    return z


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (
            lambda g: rbp_core.implicit_gradient(
                lambda h: 0.5 * h, g, g, vjp_state=lambda v: v, vjp_params=_vjp_params, method=rbp_core.OriginalRBP()
            ),
            r"vjp_state is called as vjp_state\(h, v\), with 2 positional arguments, .* signature \(v\)",
        ),
        (
            lambda g: rbp_core.implicit_gradient(
                lambda h: 0.5 * h, g, g, vjp_state=lambda h, v: v, vjp_params=lambda z: z, method=rbp_core.OriginalRBP()
            ),
            r"vjp_params is called as vjp_params\(h, z\)",
        ),
        (
            lambda g: rbp_core.implicit_gradient(
                lambda h: 0.5 * h,
                g,
                lambda: g,
                vjp_state=lambda h, v: v,
                vjp_params=_vjp_params,
                method=rbp_core.OriginalRBP(),
            ),
            r"loss_grad is called as loss_grad\(h\)",
        ),
        (lambda g: rbp_core.solve_adjoint(lambda v, w: v, g, rbp_core.OriginalRBP()), r"vjp is called as vjp\(v\)"),
        (lambda g: rbp_core.fixed_point(lambda: g, g, rbp_core.FixedPointIteration()), r"f is called as f\(h\)"),
        (
            lambda g: rbp_core.fixed_point(
                lambda h: h, g[None], rbp_core.FixedPointIteration(), batch_axis=0, takes_indices=True
            ),
            r"f is called as f\(h, indices\), .* signature \(h\)",
        ),
        (
            lambda g: rbp_core.solve_adjoint(lambda v: v, g[None], rbp_core.GMRES(), batch_axis=0, takes_indices=True),
            r"vjp is called as vjp\(v, indices\)",
        ),
    ],
)
def test_callback_of_the_wrong_arity_is_refused_before_solving(call, pattern) -> None:
    with pytest.raises(TypeError, match=pattern):
        call(np.ones(3))


def test_callbacks_with_defaults_or_varargs_are_accepted() -> None:
    g = np.ones(3)
    sol = rbp_core.solve_adjoint(lambda v, scale=0.5: scale * v, g, rbp_core.OriginalRBP())
    assert sol.converged
    sol = rbp_core.fixed_point(lambda *args: 0.5 * args[0] + 1.0, g, rbp_core.FixedPointIteration())
    assert sol.converged
    assert rbp_core.fixed_point(np.cos, np.zeros(2), rbp_core.FixedPointIteration()).converged  # a ufunc

"""Regression tests for the core's robustness: scale-safe CG, checked inputs, empty states, messages.

Each test names the defect it covers (issue 10's numbering).
"""

from __future__ import annotations

import numpy as np
import pytest

import rbp_core
from conftest import ADJOINT_METHODS
from rbp_core.backends.numpy import implicit_gradient as np_implicit_gradient
from strategies import eps

HALF = 0.5  # J = 0.5 I: every product is exact, so only the solver's own arithmetic is tested


# --- defect 2: CG's squared norms over the dtype's whole range ---------------------------------
SCALES = {"float64": [1e-200, 1e-170, 1e-100, 1.0, 1e100, 1e160, 1e200], "float32": [1e-25, 1e-15, 1.0, 1e15, 1e20]}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cg_solution_scales_with_g_over_the_whole_range(backend, dtype) -> None:
    J = np.array([[0.3, 0.2, 0.0], [-0.1, 0.4, 0.2], [0.0, 0.3, -0.5]])
    vjp, jvp = backend.matrix_callbacks(J, (3,), dtype)
    g = np.array([1.0, -2.0, 0.5])
    ref = rbp_core.cg_rbp(vjp, jvp, backend.asarray(g, dtype), rtol=1e-5)
    base = backend.to_numpy(ref.value)
    for s in SCALES[dtype]:
        sol = rbp_core.cg_rbp(vjp, jvp, backend.asarray(s * g, dtype), rtol=1e-5)
        assert sol.status is rbp_core.Status.SUCCESS, (s, sol.describe())
        # s * g rounds to dtype (relative eps), and the solve's rounding follows: norm-wise, a few eps.
        assert np.linalg.norm(backend.to_numpy(sol.value) / s - base) <= 16 * 3 * eps(dtype) * np.linalg.norm(base)
        assert sol.num_steps == ref.num_steps
        assert sol.residual_norms[-1] <= sol.tolerance  # reported in the caller's units
        assert sol.tolerance == pytest.approx(1e-5 * s * np.linalg.norm(g), rel=1e-5)


def test_cg_issue_examples_neither_overflow_nor_break_down(backend) -> None:
    for s in (1e160, 1e-170):
        sol = rbp_core.cg_rbp(lambda v: HALF * v, lambda v: HALF * v, backend.asarray(np.full(4, s)))
        assert sol.converged, sol.describe()
        np.testing.assert_allclose(backend.to_numpy(sol.value), np.full(4, 2 * s), rtol=1e-12)


def test_cg_float16_gradients_scaled_like_loss_scaling() -> None:
    # numpy float16: sums of squares are taken in float32, and the solve runs at unit scale.
    J = np.array([[0.3, 0.2], [-0.1, 0.4]], dtype=np.float16)
    base = None
    for s in (1e-5, 1e-3, 1.0, 1e3):
        g = (s * np.array([1.0, -0.5])).astype(np.float16)
        sol = rbp_core.cg_rbp(lambda v: J.T @ v, lambda v: J @ v, g)
        assert sol.converged, (s, sol.describe())
        assert sol.value.dtype == np.float16
        z = sol.value.astype(np.float64) / g.astype(np.float64)[0]
        base = z if base is None else base
        np.testing.assert_allclose(z, base, rtol=1e-2)


def test_breakdown_is_relative_to_the_vectors_norms(backend) -> None:
    # A singular system at a tiny scale is still singular, and a regular one is not, whatever the scale.
    J = np.diag([1.0, 0.5])
    vjp, jvp = backend.matrix_callbacks(J, (2,), "float64")
    for s in (1e-170, 1.0, 1e160):
        sol = rbp_core.cg_rbp(vjp, jvp, backend.asarray(s * np.array([1.0, 1.0])), throw=False)
        assert sol.status is rbp_core.Status.BREAKDOWN, (s, sol.describe())


# --- defect 3: loss_grad is checked against h* ----------------------------------------------------
def _simulator(backend, dtype="float64"):
    a = 0.5
    one = backend.asarray([1.0, 1.0], dtype)
    xp = backend.xp
    return {
        "f": lambda h: a * xp.sin(h) + one,
        "vjp_state": lambda h, v: a * xp.cos(h) * v,
        "vjp_params": lambda h, z: xp.sum(xp.sin(h) * z),
        "method": rbp_core.Neumann(steps=40),
    }


def test_loss_grad_of_wrong_shape_dtype_or_library_is_refused(backend) -> None:
    sim = _simulator(backend)
    h0 = backend.asarray([0.0, 0.0])
    f, kw = sim.pop("f"), sim
    with pytest.raises(ValueError, match=r"loss_grad is an array of shape \(1,\); expected shape \(2,\)"):
        rbp_core.implicit_gradient(f, h0, backend.asarray([1.0]), **kw)
    with pytest.raises(TypeError, match=r"loss_grad is dtype .*float32.*; expected .*float64"):
        rbp_core.implicit_gradient(f, h0, backend.asarray([1.0, 1.0], "float32"), **kw)
    with pytest.raises(TypeError, match=r"loss_grad is a builtins.list; expected an array of the same library"):
        rbp_core.implicit_gradient(f, h0, [1.0, 1.0], **kw)
    with pytest.raises(ValueError, match=r"loss_grad\(h\*\) is an array of shape \(3,\)"):
        rbp_core.implicit_gradient(f, h0, lambda h: backend.asarray([1.0, 1.0, 1.0]), **kw)


def test_numpy_adapter_checks_loss_grad_and_converts_lists_to_the_state_dtype() -> None:
    kw = {
        "vjp_state": lambda h, v: 0.5 * np.cos(h) * v,
        "vjp_params": lambda h, z: float(np.sum(np.sin(h) * z)),
        "method": rbp_core.Neumann(steps=40),
    }

    def f(h):
        return 0.5 * np.sin(h) + 1

    h0 = np.zeros(2, dtype=np.float32)
    with pytest.raises(ValueError, match="loss_grad is an array of shape"):
        np_implicit_gradient(f, h0, [1.0], **kw)
    with pytest.raises(TypeError, match="loss_grad is dtype float64; expected float32"):
        np_implicit_gradient(f, h0, np.ones(2), **kw)
    res = np_implicit_gradient(f, h0, [1.0, 1.0], **kw)  # a list takes the state's dtype
    assert res.value.dtype == np.float32


# --- defect 4: empty states ------------------------------------------------------------------------
def _never(_v):
    msg = "a callback was called on an empty state"
    raise AssertionError(msg)


def _never_at(_h, _v):
    msg = "a callback was called on an empty state"
    raise AssertionError(msg)


@pytest.mark.parametrize("shape", [(0,), (0, 5)])
def test_empty_states_are_solved_without_callbacks(backend, shape) -> None:
    e = backend.asarray(np.zeros(shape))
    runs = {
        "fixed_point": lambda: rbp_core.fixed_point(_never, e, contraction=0.5),
        "neumann": lambda: rbp_core.neumann_rbp(_never, e, steps=5, contraction=0.5),
        "original": lambda: rbp_core.original_rbp(_never, e, contraction=0.5),
        "cg": lambda: rbp_core.cg_rbp(_never, _never, e, contraction=0.5),
    }
    for name, run in runs.items():
        sol = run()
        assert sol.converged, name
        assert (sol.num_steps, sol.num_vjp, sol.error_bound) == (0, 0, 0.0), name
        assert tuple(sol.value.shape) == shape
        assert sol.value is not e
    res = rbp_core.implicit_gradient(
        _never, e, e, vjp_state=_never_at, vjp_params=lambda h, z: z, method=rbp_core.CGRBP(), jvp_state=_never_at
    )
    assert tuple(res.gradient.shape) == shape


# --- defect 7: a method class instead of an instance -----------------------------------------------
@pytest.mark.parametrize("cls", sorted({type(case.budget(1)) for case in ADJOINT_METHODS.values()}, key=str))
def test_method_class_is_refused_at_the_call(cls) -> None:
    g = np.ones(2)
    with pytest.raises(TypeError, match=rf"method must be an instance, not the class .*rbp_core\.{cls.__name__}\(\)"):
        rbp_core.implicit_backward(lambda v: v, lambda z: z, g, cls)
    with pytest.raises(TypeError, match=r"solver must be an instance.*rbp_core\.FixedPointIteration\(\)"):
        rbp_core.implicit_gradient(
            np.cos,
            g,
            g,
            vjp_state=lambda h, v: v,
            vjp_params=lambda h, z: z,
            method=rbp_core.Neumann(5),
            solver=rbp_core.FixedPointIteration,
        )


# --- defect 10: one validator for every integer setting ----------------------------------------------
def test_numpy_integers_are_accepted_everywhere() -> None:
    assert rbp_core.Neumann(steps=np.int64(5)).steps == 5
    assert rbp_core.OriginalRBP(max_iter=np.int32(7)).max_iter == 7
    assert rbp_core.CGRBP(max_iter=np.int64(7)).max_iter == 7
    assert rbp_core.FixedPointIteration(max_iter=np.int64(9)).max_iter == 9


# --- defect 11: a divergence stop says what tripped and how to relax it --------------------------------
def test_transient_growth_stop_names_the_setting_and_the_way_out(backend) -> None:
    # Spectral radius 0.5, ||J|| ~ 1e3: the iteration converges, after the residual grows ~1e3-fold.
    J = np.array([[0.5, 0.0], [2e3, 0.5]])
    vjp, _ = backend.matrix_callbacks(J, (2,), "float64")
    g = backend.asarray([0.0, 1.0])
    with pytest.raises(rbp_core.ConvergenceError) as err:
        rbp_core.original_rbp(vjp, g, divergence_factor=100.0)
    message = str(err.value)
    assert "(divergence_factor=100);" in message
    assert "times its smallest" in message
    assert "raise divergence_factor or set it to None" in message
    sol = rbp_core.original_rbp(vjp, g, divergence_factor=None, rtol=1e-12)
    assert sol.converged
    np.testing.assert_allclose(backend.to_numpy(sol.value), np.linalg.solve(np.eye(2) - J.T, [0.0, 1.0]), rtol=1e-9)


def test_truncated_series_says_what_it_did(backend) -> None:
    sol = rbp_core.neumann_rbp(lambda v: HALF * v, backend.asarray([1.0, 1.0]), steps=4)
    assert sol.note == "summed 5 terms of the series; the last, 8.839e-02, is 0.0625 times the first"
    assert sol.describe().startswith("neumann_rbp: ran 4 iterations")
    assert "converged" not in sol.describe()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("solver", ["neumann", "original"])
def test_series_solvers_scale_with_g_without_warnings(backend, dtype, solver) -> None:
    # Linear in g like CG: at extreme scales the solve runs on g / 2^e, so no sum of squares
    # overflows (NumPy would warn: the suite turns warnings into errors) and z(s g) = s z(g).
    J = np.array([[0.3, 0.2, 0.0], [-0.1, 0.4, 0.2], [0.0, 0.3, -0.5]])
    vjp, _ = backend.matrix_callbacks(J, (3,), dtype)
    g = np.array([1.0, -2.0, 0.5])

    def run(s):
        gb = backend.asarray(s * g, dtype)
        if solver == "neumann":
            return rbp_core.neumann_rbp(vjp, gb, steps=30, contraction=0.7)
        return rbp_core.original_rbp(vjp, gb, rtol=1e-5, contraction=0.7)

    ref = run(1.0)
    base = backend.to_numpy(ref.value)
    for s in SCALES[dtype]:
        sol = run(s)
        assert sol.converged, (s, sol.describe())
        assert np.linalg.norm(backend.to_numpy(sol.value) / s - base) <= 16 * 3 * eps(dtype) * np.linalg.norm(base)
        assert sol.num_steps == ref.num_steps
        # In the caller's units: the stopping norm follows s to rounding; the bound, dominated by
        # its rounding allowance in float32 (the residual of the computed sum is rounding noise
        # there), follows s within a factor of 2 of its value at s = 1.
        assert sol.residual_norms[-1] == pytest.approx(s * ref.residual_norms[-1], rel=1e-2)
        assert 0.5 * s * ref.error_bound <= sol.error_bound <= 2.0 * s * ref.error_bound

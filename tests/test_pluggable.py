"""Any solver plugs in everywhere: one written here, outside the library, runs through every entry point.

``Richardson`` (an adjoint method) and ``Ishikawa`` (a forward solver) are frozen dataclasses with
``limits``/``init``/``step``, as a new solver in ``rbp_core/_solvers/`` would be. Also the core's
failure policy, the ops registry and the public names.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest

import rbp_core
from rbp_core._iterate import Limits


@dataclass(frozen=True)
class Richardson:
    """``z <- z + omega (g - z + J^T z)``: original RBP relaxed by ``omega``."""

    omega: float = 0.8
    rtol: float = 1e-12
    max_iter: int = 2000
    name: ClassVar[str] = "richardson"
    needs_jvp: ClassVar[bool] = False
    supports_warm_start: ClassVar[bool] = True
    successive_images: ClassVar[bool] = False

    def limits(self, xp: Any, dtype: Any) -> Limits:
        return Limits(self.max_iter, self.rtol)

    def init(self, A, g, z0, ops):
        z = ops.xp.zeros_like(g) if z0 is None else z0
        return (z, g), z, None

    def step(self, A, state, ops):
        z, g = state
        r = (g - z) + A.vjp(z)
        z_new, _ = ops.axpy_sqnorm(self.omega, r, z)
        return (z_new, g), z_new, (ops.sqnorm(r),), ((r, None),)


@dataclass(frozen=True)
class Ishikawa:
    """Ishikawa's iteration ``h <- (1 - a) h + a F((1 - a) h + a F(h))``: two calls of ``f`` per step."""

    a: float = 0.5
    rtol: float = 1e-12
    max_iter: int = 10_000
    name: ClassVar[str] = "ishikawa"
    differentiable_step: ClassVar[bool] = True

    def limits(self, xp: Any, dtype: Any) -> Limits:
        return Limits(self.max_iter, self.rtol)

    def init(self, f, h0, ops):
        return h0, h0, None

    def step(self, f, h, ops):
        a = self.a
        h_new = (1.0 - a) * h + a * f((1.0 - a) * h + a * f(h))
        return h_new, h_new, ops.step_sqnorms(h_new, h), ((h_new, h), (h_new, None))

    def step_contraction(self, mu: float) -> None:
        return None

    def error_bound(self, xp, like, mu, norms, previous, state):  # pragma: no cover - no step contraction
        return math.inf


J = np.array([[0.5, 0.2], [-0.1, 0.4]])
G = np.array([1.0, -2.0])


def test_a_new_adjoint_method_runs_through_the_driver(backend) -> None:
    vjp, _ = backend.matrix_callbacks(J, (2,), "float64")
    sol = rbp_core.solve_adjoint(vjp, backend.asarray(G), Richardson(), contraction=0.6)
    np.testing.assert_allclose(backend.to_numpy(sol.value), np.linalg.solve(np.eye(2) - J.T, G), rtol=1e-10)
    assert sol.method == "richardson"
    assert sol.converged
    assert sol.error_bound is not None
    assert sol.num_vjp == sol.num_steps + 1  # one per step and one for the certificate


def test_a_new_forward_solver_runs_through_the_driver_and_implicit_gradient(backend) -> None:
    b = backend.asarray(G)
    Jb, _ = backend.matrix_callbacks(J.T, (2,), "float64")  # v -> J v
    res = rbp_core.implicit_gradient(
        lambda h: Jb(h) + b,
        backend.asarray(np.zeros(2)),
        backend.asarray(np.ones(2)),
        vjp_state=lambda h, v: backend.matrix_callbacks(J, (2,), "float64")[0](v),
        vjp_params=lambda h, z: z,  # dF/db = I
        method=Richardson(),
        solver=Ishikawa(rtol=1e-13),
    )
    exact_h = np.linalg.solve(np.eye(2) - J, G)
    np.testing.assert_allclose(backend.to_numpy(res.value), exact_h, rtol=1e-11)
    np.testing.assert_allclose(backend.to_numpy(res.gradient), np.linalg.solve(np.eye(2) - J.T, np.ones(2)), rtol=1e-9)
    assert res.forward.method == "ishikawa"
    assert res.forward.num_f_evals == 2 * res.forward.num_steps
    assert res.forward.error_bound is None  # no step contraction: no bound, and none claimed
    assert res.backward.method == "richardson"


def test_new_solvers_run_in_the_torch_adapter() -> None:
    torch = pytest.importorskip("torch")
    from rbp_core.backends.torch import BPTT, TBPTT, fixed_point

    W = torch.tensor(J, requires_grad=True)
    x = torch.tensor(G)

    def grad(backward, solver):
        h, info = fixed_point(
            lambda h: torch.tanh(W @ h + x), torch.zeros(2, dtype=torch.float64), backward=backward, solver=solver
        )
        (g,) = torch.autograd.grad(h.sum(), W)
        return g, info

    reference, _ = grad(rbp_core.CGRBP(rtol=1e-13), rbp_core.FixedPointIteration(rtol=1e-14))
    implicit, info = grad(Richardson(rtol=1e-13), Ishikawa(rtol=1e-14))
    torch.testing.assert_close(implicit, reference, rtol=1e-6, atol=1e-9)
    assert info.forward.method == "ishikawa"
    assert info.backward[0].method == "richardson"
    # BPTT unrolls Ishikawa's own step: the derivative of that loop, close to the implicit one.
    unrolled, info = grad(BPTT(), Ishikawa(rtol=1e-12))
    torch.testing.assert_close(unrolled, reference, rtol=1e-4, atol=1e-6)
    truncated, _ = grad(TBPTT(steps=60), Ishikawa(rtol=1e-12))
    assert torch.all(torch.isfinite(truncated))


def test_a_step_that_cannot_be_unrolled_is_refused_by_name() -> None:
    torch = pytest.importorskip("torch")
    from rbp_core.backends.torch import BPTT, TBPTT, fixed_point

    @dataclass(frozen=True)
    class Opaque(Ishikawa):
        differentiable_step: ClassVar[bool] = False

    for backward in (BPTT(), TBPTT(3)):
        with pytest.raises(ValueError, match=r"Opaque declares its step not differentiable"):
            fixed_point(lambda h: 0.5 * h, torch.zeros(2), backward=backward, solver=Opaque())


# --- the failure policy of implicit_backward -------------------------------------------------------
def _diverging(on_failure):
    return rbp_core.implicit_backward(
        lambda v: 3.0 * v, lambda z: 2.0 * z, np.ones(2), rbp_core.OriginalRBP(max_iter=50), on_failure=on_failure
    )


def test_policy_raise_is_the_default() -> None:
    with pytest.raises(rbp_core.ConvergenceError, match="diverged"):
        rbp_core.implicit_backward(lambda v: 3.0 * v, lambda z: z, np.ones(2), rbp_core.OriginalRBP())


def test_policy_skip_gives_zero_cotangents_and_a_warning() -> None:
    with pytest.warns(rbp_core.BackwardFailureWarning, match="skipped"):
        grad, sol = _diverging("skip")
    assert sol.status is rbp_core.Status.DIVERGED
    np.testing.assert_array_equal(grad, np.zeros(2))


def test_policy_warn_and_ignore_apply_the_last_finite_iterate() -> None:
    with pytest.warns(rbp_core.BackwardFailureWarning, match="the gradient is inexact"):
        warned, sol = _diverging("warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ignored, _ = _diverging("ignore")
    np.testing.assert_array_equal(warned, 2.0 * sol.value)
    np.testing.assert_array_equal(ignored, warned)


def test_policy_never_hands_on_a_nan_and_refuses_a_nonfinite_g() -> None:
    with pytest.raises(FloatingPointError, match="incoming gradient"):
        rbp_core.implicit_backward(
            lambda v: v, lambda z: z, np.array([np.nan, 1.0]), rbp_core.Neumann(3), on_failure="ignore"
        )
    with pytest.raises(FloatingPointError, match="backward iteration"):
        rbp_core.implicit_backward(
            lambda v: v * np.inf,
            lambda z: z,
            np.ones(2),
            rbp_core.Neumann(3, divergence_factor=None),
            on_failure="warn",
        )


def test_policy_reports_a_disproved_contraction() -> None:
    run = lambda policy: rbp_core.implicit_backward(
        lambda v: 0.9 * v, lambda z: z, np.ones(2), rbp_core.OriginalRBP(), contraction=0.5, on_failure=policy
    )
    with pytest.raises(rbp_core.ContractionViolation, match=r"contraction=0\.5 was disproved"):
        run("raise")
    with pytest.warns(rbp_core.BackwardFailureWarning, match="disproved"):
        _, sol = run("skip")
    assert sol.contraction_violated
    with pytest.raises(ValueError, match="on_failure must be one of"):
        run("sometimes")


def test_on_solution_sees_the_solution_before_the_policy_raises() -> None:
    seen = []
    with pytest.raises(rbp_core.ConvergenceError):
        rbp_core.implicit_backward(
            lambda v: 3.0 * v, lambda z: z, np.ones(2), rbp_core.OriginalRBP(), on_solution=seen.append
        )
    assert [s.status for s in seen] == [rbp_core.Status.DIVERGED]


# --- the ops registry ---------------------------------------------------------------------------
def test_registered_ops_are_used_for_their_namespace_only(backend) -> None:
    from rbp_core._ops import _CACHE, _REGISTRY, ops_for

    calls = []

    class Spy(rbp_core.VectorOps):
        def sqnorm(self, x):
            calls.append(1)
            return super().sqnorm(x)

    target = backend.xp
    saved = list(_REGISTRY)
    try:
        rbp_core.register_ops(lambda xp: xp is target, Spy)
        assert type(ops_for(target)) is Spy
        sol = rbp_core.solve_adjoint(lambda v: 0.5 * v, backend.asarray(G), rbp_core.Neumann(4))
        assert len(calls) >= 4
        np.testing.assert_allclose(backend.to_numpy(sol.value), G * (2 - 0.5**4), rtol=1e-12)
    finally:
        _REGISTRY[:] = saved
        _CACHE.clear()
    assert type(ops_for(target)) is not Spy


def test_each_backends_ops_agree_with_the_generic_ones(backend) -> None:
    import rbp_core.backends.numpy  # registers its ops
    from rbp_core._ops import ops_for

    rng = np.random.default_rng(8)
    xp = backend.xp
    fast, generic = ops_for(xp), rbp_core.VectorOps(xp)
    x, y = backend.asarray(rng.standard_normal(50)), backend.asarray(rng.standard_normal(50))
    rows = backend.asarray(rng.standard_normal((3, 50)))
    c = [0.5, -2.0, 0.25]
    for op, args in (
        ("axpy", (0.3, x, y)),
        ("axpy", (-1.0, x, y)),
        ("add_combination", (x, c, rows)),
        ("sqnorm", (x,)),
        ("dot", (x, y)),
    ):
        np.testing.assert_allclose(
            backend.to_numpy(getattr(fast, op)(*args)), backend.to_numpy(getattr(generic, op)(*args)), rtol=1e-14
        )
    buffers = [xp.zeros((2, 2, 50), dtype=x.dtype, device=backend.device) for _ in range(2)]  # a solver's own
    # What they return is the buffer written (the same array, or a new one where arrays are immutable).
    buffers = [fast.write_difference(buffers[0], (1, 0), x, y), generic.write_difference(buffers[1], (1, 0), x, y)]
    want = np.zeros((2, 2, 50))
    want[1, 0] = backend.to_numpy(x) - backend.to_numpy(y)
    for b in buffers:
        np.testing.assert_array_equal(backend.to_numpy(b), want)


def test_the_core_imports_no_adapter_and_no_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, rbp_core; "
        "rbp_core.solve_adjoint(lambda v: 0.5 * v, np.ones(3), rbp_core.CGRBP(), jvp=lambda v: 0.5 * v); "
        "rbp_core.fixed_point(lambda h: 0.5 * h + 1, np.zeros(3)); "
        "bad = [m for m in sys.modules if m.startswith('rbp_core.backends') or m.split('.')[0] in ('torch', 'cupy', 'jax')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_public_names() -> None:
    assert sorted(rbp_core.__all__) == sorted(
        [
            "AdjointMethod",
            "Anderson",
            "AndersonRBP",
            "BackwardFailureWarning",
            "BiCGSTAB",
            "Broyden",
            "CGRBP",
            "ContractionViolation",
            "ConvergenceError",
            "FixedPointIteration",
            "ForwardSolver",
            "GMRES",
            "ImplicitGradient",
            "Neumann",
            "OriginalRBP",
            "RBPError",
            "Solution",
            "Status",
            "VectorOps",
            "__version__",
            "cg_rbp",
            "fixed_point",
            "implicit_backward",
            "implicit_gradient",
            "neumann_rbp",
            "original_rbp",
            "register_ops",
            "solve_adjoint",
        ]
    )
    for name in rbp_core.__all__:
        assert hasattr(rbp_core, name), name

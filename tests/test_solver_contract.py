"""The contract every registered solver keeps, on every backend (the registries are in conftest.py).

A solver added to ``ADJOINT_METHODS`` or ``FORWARD_SOLVERS`` runs through all of these: its result
is an array of the input's library, shape, dtype and device; the caller's arrays are never
modified; its call counts are exact; its answer is within the tolerance's bound of a dense solve.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import rbp_core
from conftest import ADJOINT_METHODS, FORWARD_SOLVERS, assert_like
from strategies import Problem, eps, problems, rounding


class Counted:
    """A callback that counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, v):
        self.calls += 1
        return self.fn(v)


def _warm_start(method, g):
    return g * 0.5 if method.supports_warm_start else None


def test_adjoint_result_is_like_g_and_inputs_untouched(backend, dtype, adjoint) -> None:
    g_np = np.linspace(-1.0, 1.0, 6).reshape(2, 3)
    g = backend.asarray(g_np, dtype)
    method = adjoint.budget(5)
    z0 = _warm_start(method, g)
    z0_np = None if z0 is None else backend.to_numpy(z0)
    vjp, jvp = Counted(lambda v: 0.5 * v), Counted(lambda v: 0.5 * v)
    sol = rbp_core.solve_adjoint(vjp, g, method, jvp=jvp, z0=z0, throw=False)
    assert_like(sol.value, g)
    np.testing.assert_array_equal(backend.to_numpy(g), g_np.astype(dtype))
    if z0 is not None:
        np.testing.assert_array_equal(backend.to_numpy(z0), z0_np)
        assert sol.value is not z0
    assert sol.value is not g
    assert (sol.num_vjp, sol.num_jvp, sol.num_f_evals) == (vjp.calls, jvp.calls if method.needs_jvp else 0, 0)
    assert sol.num_steps == len(sol.residual_norms)
    assert sol.method == method.name


def test_forward_result_is_like_h0_and_inputs_untouched(backend, dtype, forward) -> None:
    h0_np = np.linspace(-1.0, 1.0, 6).reshape(3, 2)
    h0 = backend.asarray(h0_np, dtype)
    b = backend.asarray(np.ones((3, 2)), dtype)
    f = Counted(lambda h: 0.5 * h + b)
    sol = rbp_core.fixed_point(f, h0, forward.budget(4), throw=False)
    assert_like(sol.value, h0)
    np.testing.assert_array_equal(backend.to_numpy(h0), h0_np.astype(dtype))
    assert sol.value is not h0
    assert (sol.num_f_evals, sol.num_vjp, sol.num_jvp, sol.num_steps) == (f.calls, 0, 0, 4)


def test_solves_on_another_device_stay_there(backend, adjoint, forward) -> None:
    device = backend.other_device
    if device is None or backend.name.startswith("torch"):
        pytest.skip("no second device that computes here (torch's meta device holds no values)")
    g = backend.on(backend.asarray(np.array([1.0, -2.0, 0.5])), device)
    sol = rbp_core.solve_adjoint(lambda v: 0.5 * v, g, adjoint.converged(1e-10, 0.5), jvp=lambda v: 0.5 * v)
    assert_like(sol.value, g)
    np.testing.assert_allclose(backend.to_numpy(sol.value), 2.0 * backend.to_numpy(g), rtol=1e-8)
    fwd = rbp_core.fixed_point(lambda h: 0.5 * h + g, g, forward.converged(1e-10, 0.5))
    assert_like(fwd.value, g)


def test_callback_on_another_device_is_refused(backend, adjoint) -> None:
    device = backend.other_device
    if device is None:
        pytest.skip(f"{backend.name} has one device here")
    g = backend.asarray(np.ones(3))
    method = adjoint.budget(3)
    with pytest.raises(ValueError, match=r"vjp returned an array on device .*; expected"):
        rbp_core.solve_adjoint(lambda v: backend.on(0.5 * v, device), g, method, jvp=lambda v: 0.5 * v)
    if method.supports_warm_start:
        with pytest.raises(ValueError, match=r"z0 is an array on device .*; expected"):
            rbp_core.solve_adjoint(lambda v: 0.5 * v, g, method, jvp=lambda v: 0.5 * v, z0=backend.on(g, device))
    with pytest.raises(ValueError, match=r"f returned an array on device .*; expected"):
        rbp_core.fixed_point(lambda h: backend.on(0.5 * h, device), g)


@given(problem=problems(), name=st.sampled_from(sorted(ADJOINT_METHODS)))
def test_adjoint_solution_matches_the_dense_solve(backend, dtype, problem: Problem, name: str) -> None:
    J, g = problem.build()
    vjp, jvp = backend.matrix_callbacks(J, problem.shape, dtype)
    rtol = max(1e-6, 50 * problem.n * eps(dtype) / (1 - problem.mu))
    sol = rbp_core.solve_adjoint(
        vjp, backend.asarray(g, dtype), ADJOINT_METHODS[name].converged(rtol, problem.mu), jvp=jvp
    )
    z = backend.to_numpy(sol.value)
    exact = problem.exact(J, g)
    gnorm = float(np.linalg.norm(g))
    # A residual below rtol ||g|| (or a truncated series) puts z within rtol ||g|| / (1 - mu) of z*.
    steps = max(sol.num_steps, 1)
    bound = rtol * gnorm / (1 - problem.mu) + rounding(problem.n, steps, dtype, gnorm / (1 - problem.mu)) / (
        1 - problem.mu
    )
    assert float(np.linalg.norm(z - exact)) <= bound, (name, sol.describe())


@given(problem=problems(), name=st.sampled_from(sorted(FORWARD_SOLVERS)))
def test_forward_solution_matches_the_dense_solve(backend, dtype, problem: Problem, name: str) -> None:
    J, b = problem.build()
    _, jvp = backend.matrix_callbacks(J, problem.shape, dtype)
    bb = backend.asarray(b, dtype)
    rtol = max(1e-6, 50 * problem.n * eps(dtype) / (1 - problem.mu))
    sol = rbp_core.fixed_point(
        lambda h: jvp(h) + bb, backend.asarray(np.zeros(problem.shape), dtype), FORWARD_SOLVERS[name].converged(rtol, 0)
    )
    exact = np.linalg.solve(np.eye(problem.n) - J, b.reshape(-1)).reshape(problem.shape)
    h = backend.to_numpy(sol.value)
    scale = float(np.linalg.norm(exact))
    m = FORWARD_SOLVERS[name].converged(rtol, 0).step_contraction(problem.mu)
    if m is not None:
        # A step solver returns h_{t+1} = T(h_t): its test ||h_{t+1} - h_t|| <= rtol ||h_{t+1}|| bounds
        # the error by m / (1 - m) times the step.
        bound = m / (1 - m) * rtol * float(np.linalg.norm(h)) + rounding(problem.n, 1, dtype, scale) / (1 - m)
    else:
        # A solver that returns an evaluated iterate h: ||F(h) - h|| <= rtol ||F(h)|| bounds its error by
        # 1 / (1 - mu) times the residual.
        Fh = (J @ h.reshape(-1) + b.reshape(-1)).reshape(problem.shape)
        mu = problem.mu
        bound = rtol * float(np.linalg.norm(Fh)) / (1 - mu) + rounding(problem.n, 1, dtype, scale) / (1 - mu)
    assert float(np.linalg.norm(h - exact)) <= bound * (1 + 1e-6), (name, sol.describe())


def test_registries_hold_every_exported_solver() -> None:
    exported = {
        obj
        for obj in vars(rbp_core).values()
        if isinstance(obj, type) and obj.__module__.startswith("rbp_core._solvers")
    }
    adjoint = [case.budget(1) for case in ADJOINT_METHODS.values()]
    forward = [case.budget(1) for case in FORWARD_SOLVERS.values()]
    assert exported == {type(m) for m in adjoint + forward}
    assert all(isinstance(m, rbp_core.AdjointMethod) for m in adjoint)
    assert all(isinstance(m, rbp_core.ForwardSolver) for m in forward)


def test_neumann_steps_of_the_registry_reach_the_tolerance() -> None:
    method = ADJOINT_METHODS["neumann"].converged(1e-8, 0.9)
    assert 0.9 ** (method.steps + 1) / (1 - 0.9) <= 1e-8 < 0.9**method.steps / (1 - 0.9)
    assert math.isfinite(method.steps)


def test_every_solver_reports_its_memory_in_stats(adjoint, forward) -> None:
    g = np.ones(4)
    sol = rbp_core.solve_adjoint(lambda v: 0.5 * v, g, adjoint.budget(3), jvp=lambda v: 0.5 * v, throw=False)
    fwd = rbp_core.fixed_point(lambda h: 0.5 * h + 1.0, g, forward.budget(3), throw=False)
    for s in (sol, fwd):
        assert isinstance(s.stats["memory_vectors"], int)
        assert s.stats["memory_vectors"] >= 1
        with pytest.raises(TypeError):
            s.stats["memory_vectors"] = 0  # read-only

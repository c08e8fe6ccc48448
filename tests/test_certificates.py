"""Error certificates: tight where theory says they are, and refused when the contraction is false.

For ``J = mu * I`` every bound of rbp-core is attained exactly, so these tests catch a bound that
is too small (unsound) as well as one that is needlessly loose.
"""

from __future__ import annotations

import numpy as np
import pytest

import rbp_core

MU = 0.6
G = np.array([3.0, -4.0])  # ||G|| = 5


def _scaled_identity(backend):
    xp = backend.xp
    return (lambda v: MU * v), (lambda v: MU * v), backend.asarray(G), xp


@pytest.mark.parametrize("steps", [0, 1, 5, 20])
def test_neumann_bound_is_attained(backend, steps: int) -> None:
    vjp, _, g, _ = _scaled_identity(backend)
    sol = rbp_core.neumann_rbp(vjp, g, steps=steps, contraction=MU)
    exact = G / (1 - MU)
    true_error = np.linalg.norm(backend.to_numpy(sol.value) - exact)
    expected = MU ** (steps + 1) / (1 - MU) * 5.0
    assert true_error == pytest.approx(expected, rel=1e-9)
    assert sol.error_bound == pytest.approx(expected, rel=1e-9)


def test_original_bound_is_attained(backend) -> None:
    vjp, _, g, _ = _scaled_identity(backend)
    sol = rbp_core.original_rbp(vjp, g, tol=1e-3, contraction=MU)
    true_error = np.linalg.norm(backend.to_numpy(sol.value) - G / (1 - MU))
    assert sol.error_bound == pytest.approx(true_error, rel=1e-6)


def test_cg_bound_is_attained(backend) -> None:
    vjp, jvp, g, _ = _scaled_identity(backend)
    # Start away from the solution so that the residual is not zero after one step.
    z0 = backend.asarray(np.array([1.0, 1.0]))
    sol = rbp_core.cg_rbp(vjp, jvp, g, tol=0.5, z0=z0, contraction=MU)
    true_error = np.linalg.norm(backend.to_numpy(sol.value) - G / (1 - MU))
    # For A = (1 - mu) I, ||z - z*|| = ||r|| / (1 - mu) exactly.
    assert sol.error_bound == pytest.approx(true_error, rel=1e-9)


def test_fixed_point_bound_is_attained(backend) -> None:
    b = backend.asarray(G)
    sol = rbp_core.fixed_point(lambda h: MU * h + b, backend.asarray(np.zeros(2)), tol=1e-3, contraction=MU)
    true_error = np.linalg.norm(backend.to_numpy(sol.value) - G / (1 - MU))
    assert sol.error_bound == pytest.approx(true_error, rel=1e-6)


def test_damped_fixed_point_bound_uses_damped_rate(backend) -> None:
    b = backend.asarray(G)
    sol = rbp_core.fixed_point(
        lambda h: MU * h + b, backend.asarray(np.zeros(2)), tol=1e-3, damping=0.5, contraction=MU
    )
    true_error = np.linalg.norm(backend.to_numpy(sol.value) - G / (1 - MU))
    assert sol.error_bound == pytest.approx(true_error, rel=1e-6)


@pytest.mark.parametrize("method", ["neumann", "original", "cg", "fixed_point"])
def test_false_contraction_is_refused_by_every_method(backend, method: str) -> None:
    J = np.array([[0.9, 0.0], [0.0, 0.1]])
    vjp, jvp = backend.matrix_callbacks(J, (2,), "float64")
    g = backend.asarray(np.ones(2))
    run = {
        "neumann": lambda **kw: rbp_core.neumann_rbp(vjp, g, steps=10, **kw),
        "original": lambda **kw: rbp_core.original_rbp(vjp, g, **kw),
        "cg": lambda **kw: rbp_core.cg_rbp(vjp, jvp, g, **kw),
        "fixed_point": lambda **kw: rbp_core.fixed_point(lambda h: jvp(h) + g, g, **kw),
    }[method]
    with pytest.raises(rbp_core.ContractionViolation, match=r"contraction=0\.5 is false"):
        run(contraction=0.5)
    assert run(contraction=0.5, throw=False).error_bound is None
    assert run(contraction=0.9).error_bound is not None


def test_no_contraction_no_bound(backend) -> None:
    g = backend.asarray(np.zeros(2))
    assert rbp_core.original_rbp(lambda v: v, g).error_bound is None
    assert rbp_core.original_rbp(lambda v: v, g, contraction=0.5).error_bound == 0.0

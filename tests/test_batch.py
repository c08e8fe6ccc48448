"""Per-sample solves (``batch_axis``): batch invariance, per-sample status and certificates, samples leaving.

The batched problems act on each sample with its own matrix, computed row by row
(``sum(J[s] * h[s], axis=-1)``): every sample's arithmetic is the same sequence of operations
whatever else is in its batch. A solve with ``batch_axis`` takes every per-sample decision from
that sample's norms alone, so on the CPU a sample solved in any batch must give the bit-identical
value, status and step count it gives alone: the allowance for batching is zero there. (A batched
matrix product, whose summation order may depend on the batch size, would need the summation
bound ``2 n eps |J| |h|`` per step, divided by ``1 - mu``, on top; these maps avoid that on
purpose.)

That holds for NumPy and array-api-strict, whose batched products (the solvers' own small
``matmul`` of Anderson, Broyden and GMRES) compute each batch element alike. Torch may not: a
batched product over one matrix takes another kernel than over several (seen with Hypothesis's
thorough profile: one ulp in a Broyden residual), and on a GPU the row reductions may choose their
summation order by the shape. Then a sample's norms can differ by that rounding between batches,
a stopping test can flip at its threshold, and a step count can differ by one. There the
property allows exactly that: both results stop within their tolerance of the same fixed point,
so they are within twice the stopping test's error bound (``tol ||h|| / (1 - mu)`` each) of each
other.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import rbp_core
from conftest import ADJOINT_METHODS, FORWARD_SOLVERS
from rbp_core import Status

BIT_IDENTICAL = ("numpy", "numpy-readonly", "array-api-strict", "array-api-strict-noext")
"""The backends whose per-sample results are bit-identical in any batch (see above)."""

BATCHABLE_FORWARD = ("iteration", "damped", "anderson", "broyden")
BATCHABLE_ADJOINT = ("neumann", "original", "cg", "gmres", "bicgstab", "anderson")


def batch_problem(seed: int, mus: list[float], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample ``J_s`` with ``||J_s||_2 = mu_s`` and right-hand sides ``b_s``: ``(B, n, n)``, ``(B, n)``."""
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((len(mus), n, n))
    for s, mu in enumerate(mus):
        J[s] *= mu / np.linalg.norm(J[s], 2)
    return J, rng.standard_normal((len(mus), n))


class Maps:
    """``F(h)_s = J_s h_s + b_s``, its VJP and JVP on a backend, on the whole batch or on given samples."""

    def __init__(self, backend, J: np.ndarray, b: np.ndarray, axis: int = 0) -> None:
        self.xp, self.axis = backend.xp, axis
        self.J, self.JT = backend.asarray(J), backend.asarray(np.ascontiguousarray(np.swapaxes(J, 1, 2)))
        self.b = backend.asarray(b)

    def _rows(self, h):
        return h if self.axis == 0 else self.xp.permute_dims(h, (1, 0))

    def _apply(self, M, h, idx=None):
        xp = self.xp
        M = M if idx is None else xp.take(M, idx, axis=0)
        return xp.sum(M * self._rows(h)[:, None, :], axis=2)

    def f(self, h, idx=None):
        b = self.b if idx is None else self.xp.take(self.b, idx, axis=0)
        return self._rows(self._apply(self.J, h, idx) + b)

    def vjp(self, v, idx=None):
        return self._rows(self._apply(self.JT, v, idx))

    def jvp(self, v, idx=None):
        return self._rows(self._apply(self.J, v, idx))


def exact_fixed_points(J: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.stack([np.linalg.solve(np.eye(J.shape[1]) - J[s], b[s]) for s in range(len(b))])


def exact_adjoints(J: np.ndarray, g: np.ndarray) -> np.ndarray:
    return np.stack([np.linalg.solve(np.eye(J.shape[1]) - J[s].T, g[s]) for s in range(len(g))])


def assert_same_samples(backend, got, want, steps_got, steps_want, scale: float, mu: float) -> None:
    """The same values and step counts: bit-identical where the backend allows, else within the allowance above."""
    if backend.name in BIT_IDENTICAL:
        np.testing.assert_array_equal(got, want)
        assert steps_got == steps_want
        return
    np.testing.assert_allclose(got, want, rtol=0, atol=2 * 1e-10 * scale / (1 - mu) + 1e-14)
    assert all(abs(a - b) <= 1 for a, b in zip(steps_got, steps_want, strict=True))


batches = st.tuples(
    st.integers(0, 2**32 - 1),
    st.lists(st.floats(0.05, 0.95), min_size=1, max_size=5),
    st.integers(1, 8),
)


@given(case=batches, which=st.sampled_from(BATCHABLE_FORWARD), data=st.data())
def test_forward_is_batch_invariant(backend, case, which, data) -> None:
    seed, mus, n = case
    J, b = batch_problem(seed, mus, n)
    solver = FORWARD_SOLVERS[which].converged(1e-10, max(mus))
    batch = rbp_core.fixed_point(Maps(backend, J, b).f, backend.asarray(np.zeros_like(b)), solver, batch_axis=0)
    assert batch.converged
    value = backend.to_numpy(batch.value)
    # any sub-batch, in any order, gives each of its samples the same result
    subset = data.draw(st.permutations(range(len(mus))).flatmap(lambda p: st.integers(1, len(p)).map(lambda k: p[:k])))
    sub = rbp_core.fixed_point(
        Maps(backend, J[subset], b[subset]).f, backend.asarray(np.zeros_like(b[subset])), solver, batch_axis=0
    )
    scale, mu = float(np.abs(value).max()) * np.sqrt(n), max(mus)
    steps = tuple(batch.sample_num_steps[s] for s in subset)
    assert_same_samples(backend, backend.to_numpy(sub.value), value[subset], sub.sample_num_steps, steps, scale, mu)
    assert sub.sample_status == tuple(batch.sample_status[s] for s in subset)
    if backend.name in BIT_IDENTICAL:
        assert sub.sample_residual_norms == tuple(batch.sample_residual_norms[s] for s in subset)
    for s in subset[:2]:  # alone
        one = rbp_core.fixed_point(
            Maps(backend, J[s : s + 1], b[s : s + 1]).f, backend.asarray(np.zeros((1, n))), solver, batch_axis=0
        )
        got = backend.to_numpy(one.value)[0]
        assert_same_samples(backend, got, value[s], one.sample_num_steps, (batch.sample_num_steps[s],), scale, mu)


@given(case=batches, which=st.sampled_from(BATCHABLE_ADJOINT), data=st.data())
def test_adjoint_is_batch_invariant(backend, case, which, data) -> None:
    seed, mus, n = case
    J, g = batch_problem(seed, mus, n)
    method = ADJOINT_METHODS[which].converged(1e-10, max(mus))
    maps = Maps(backend, J, g)
    batch = rbp_core.solve_adjoint(maps.vjp, backend.asarray(g), method, jvp=maps.jvp, batch_axis=0)
    assert batch.converged
    value = backend.to_numpy(batch.value)
    subset = data.draw(st.permutations(range(len(mus))).flatmap(lambda p: st.integers(1, len(p)).map(lambda k: p[:k])))
    sub_maps = Maps(backend, J[subset], g[subset])
    sub = rbp_core.solve_adjoint(sub_maps.vjp, backend.asarray(g[subset]), method, jvp=sub_maps.jvp, batch_axis=0)
    scale, mu = float(np.abs(value).max()) * np.sqrt(n), max(mus)
    steps = tuple(batch.sample_num_steps[s] for s in subset)
    assert_same_samples(backend, backend.to_numpy(sub.value), value[subset], sub.sample_num_steps, steps, scale, mu)
    assert sub.sample_status == tuple(batch.sample_status[s] for s in subset)


@given(case=batches, which=st.sampled_from(BATCHABLE_FORWARD + BATCHABLE_ADJOINT))
def test_per_sample_certificates_hold(backend, case, which) -> None:
    seed, mus, n = case
    J, b = batch_problem(seed, mus, n)
    mu = max(mus)
    maps = Maps(backend, J, b)
    if which in BATCHABLE_FORWARD:
        solver = FORWARD_SOLVERS[which].converged(1e-8, mu)
        sol = rbp_core.fixed_point(maps.f, backend.asarray(np.zeros_like(b)), solver, batch_axis=0, contraction=mu)
        exact = exact_fixed_points(J, b)
    else:
        method = ADJOINT_METHODS[which].converged(1e-8, mu)
        sol = rbp_core.solve_adjoint(maps.vjp, backend.asarray(b), method, jvp=maps.jvp, batch_axis=0, contraction=mu)
        exact = exact_adjoints(J, b)
    assert sol.converged
    errors = np.linalg.norm(backend.to_numpy(sol.value) - exact, axis=1)
    bounds = np.array(sol.sample_error_bound)
    # the maps' own rounding (a sum of n products per element) is outside the certificate
    slack = 4 * n * np.finfo(np.float64).eps * np.linalg.norm(exact, axis=1) / (1 - mu)
    assert np.all(errors <= bounds + slack)
    assert sol.error_bound == max(sol.sample_error_bound)
    for norms, tol in zip(sol.sample_residual_norms, sol.sample_tolerance, strict=True):
        assert tol is None or norms[-1:] == () or norms[-1] <= tol


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_batch_axis_other_than_first(backend, axis) -> None:
    J, b = batch_problem(3, [0.3, 0.9, 0.6], 4)
    layout = 0 if axis == 0 else 1
    bb = b if layout == 0 else b.T
    maps = Maps(backend, J, b, axis=layout)
    solver = rbp_core.FixedPointIteration(rtol=1e-12)
    sol = rbp_core.fixed_point(maps.f, backend.asarray(np.zeros_like(bb)), solver, batch_axis=axis)
    h = backend.to_numpy(sol.value)
    np.testing.assert_allclose(h if layout == 0 else h.T, exact_fixed_points(J, b), atol=1e-10)
    assert len(sol.sample_status) == 3
    z = rbp_core.solve_adjoint(maps.vjp, backend.asarray(bb), rbp_core.OriginalRBP(rtol=1e-12), batch_axis=axis)
    zz = backend.to_numpy(z.value)
    np.testing.assert_allclose(zz if layout == 0 else zz.T, exact_adjoints(J, b), atol=1e-10)


def test_samples_leave_the_batch_with_indices(backend) -> None:
    J, b = batch_problem(5, [0.2, 0.95, 0.5, 0.9], 6)
    maps = Maps(backend, J, b)
    seen: list[list[int]] = []

    def f(h, idx):
        seen.append(backend.to_numpy(idx).astype(int).tolist())
        return maps.f(h, idx)

    solver = rbp_core.FixedPointIteration(rtol=1e-10)
    whole = rbp_core.fixed_point(maps.f, backend.asarray(np.zeros_like(b)), solver, batch_axis=0)
    subset = rbp_core.fixed_point(f, backend.asarray(np.zeros_like(b)), solver, batch_axis=0, takes_indices=True)
    hw = backend.to_numpy(whole.value)
    scale = float(np.abs(hw).max()) * 6**0.5
    assert_same_samples(
        backend, backend.to_numpy(subset.value), hw, subset.sample_num_steps, whole.sample_num_steps, scale, 0.95
    )
    assert whole.num_sample_evals == whole.num_f_evals * 4  # every call evaluates the whole batch
    assert subset.num_sample_evals == sum(subset.sample_num_steps)  # each sample only while it iterates
    assert seen[0] == [0, 1, 2, 3]
    assert seen[-1] == [1]  # the slowest sample (contraction 0.95) ends alone
    assert all(sorted(s) == s for s in seen)
    # the adjoint side: vjp and jvp on the active samples only
    g = backend.asarray(b)
    for method in (rbp_core.OriginalRBP(rtol=1e-10), rbp_core.CGRBP(rtol=1e-10), rbp_core.Neumann(steps=30)):
        w = rbp_core.solve_adjoint(maps.vjp, g, method, jvp=maps.jvp, batch_axis=0)
        s = rbp_core.solve_adjoint(maps.vjp, g, method, jvp=maps.jvp, batch_axis=0, takes_indices=True)
        zw = backend.to_numpy(w.value)
        scale = float(np.abs(zw).max()) * 6**0.5
        assert_same_samples(backend, backend.to_numpy(s.value), zw, s.sample_num_steps, w.sample_num_steps, scale, 0.95)
        per_call = 2 if method.needs_jvp else 1
        assert s.num_sample_evals <= per_call * sum(s.sample_num_steps) + 4
        assert w.num_sample_evals == 4 * (w.num_vjp + w.num_jvp)


def test_a_diverging_sample_fails_alone(backend) -> None:
    J, b = batch_problem(7, [0.5, 0.5, 0.8, 0.3], 5)
    J[2] = 1.5 * np.eye(5)  # plain iteration and original RBP diverge on this sample only
    maps = Maps(backend, J, b)
    solver = rbp_core.FixedPointIteration(rtol=1e-10, max_iter=5000)
    sol = rbp_core.fixed_point(maps.f, backend.asarray(np.zeros_like(b)), solver, batch_axis=0, throw=False)
    assert sol.status is Status.DIVERGED
    assert sol.failed_samples == (2,)
    assert sol.sample_status[2] is Status.DIVERGED
    assert "2 (DIVERGED" in sol.note
    h = backend.to_numpy(sol.value)
    ok = [0, 1, 3]
    np.testing.assert_allclose(h[ok], exact_fixed_points(J[ok], b[ok]), atol=1e-9)
    assert np.all(np.isfinite(h))
    with pytest.raises(rbp_core.ConvergenceError, match=r"1 of 4 samples did not converge: 2 \(DIVERGED"):
        rbp_core.fixed_point(maps.f, backend.asarray(np.zeros_like(b)), solver, batch_axis=0)

    # backward: the other samples' adjoints are exact under every policy that hands one on
    g = backend.asarray(b)
    exact = exact_adjoints(J[ok], b[ok])
    method = rbp_core.OriginalRBP(rtol=1e-12)
    with pytest.warns(rbp_core.BackwardFailureWarning, match=r"samples \[2\]"):
        z, solution = rbp_core.implicit_backward(maps.vjp, lambda z: z, g, method, batch_axis=0, on_failure="skip")
    z = backend.to_numpy(z)
    np.testing.assert_allclose(z[ok], exact, atol=1e-10)
    np.testing.assert_array_equal(z[2], 0.0)
    assert solution.failed_samples == (2,)
    with pytest.warns(rbp_core.BackwardFailureWarning, match="inexact"):
        z, _ = rbp_core.implicit_backward(maps.vjp, lambda z: z, g, method, batch_axis=0, on_failure="warn")
    np.testing.assert_allclose(backend.to_numpy(z)[ok], exact, atol=1e-10)
    with pytest.raises(rbp_core.ConvergenceError, match="2 \\(DIVERGED"):
        rbp_core.implicit_backward(maps.vjp, lambda z: z, g, method, batch_axis=0)
    # CG-RBP converges on every sample, the expansive one included (I - J^T is invertible)
    z, solution = rbp_core.implicit_backward(
        maps.vjp, lambda z: z, g, rbp_core.CGRBP(rtol=1e-12), jvp_state=maps.jvp, batch_axis=0
    )
    assert solution.converged
    np.testing.assert_allclose(backend.to_numpy(z), exact_adjoints(J, b), atol=1e-9)


def test_settled_samples(backend) -> None:
    J, b = batch_problem(11, [0.5, 0.5, 0.5], 3)
    maps = Maps(backend, J, b)
    h0 = np.zeros_like(b)
    h0[1, 0] = np.nan
    sol = rbp_core.fixed_point(
        maps.f, backend.asarray(h0), rbp_core.FixedPointIteration(rtol=1e-10), batch_axis=0, throw=False
    )
    assert sol.sample_status == (Status.SUCCESS, Status.NONFINITE, Status.SUCCESS)
    assert sol.status is Status.NONFINITE
    h = backend.to_numpy(sol.value)
    np.testing.assert_array_equal(h[1], 0.0)
    np.testing.assert_allclose(h[[0, 2]], exact_fixed_points(J[[0, 2]], b[[0, 2]]), atol=1e-9)
    g = b.copy()
    g[0] = 0.0
    z = rbp_core.solve_adjoint(
        maps.vjp, backend.asarray(g), rbp_core.OriginalRBP(rtol=1e-10), batch_axis=0, contraction=0.5
    )
    assert z.converged
    assert z.sample_num_steps[0] == 0
    assert z.sample_error_bound[0] == 0.0
    np.testing.assert_array_equal(backend.to_numpy(z.value)[0], 0.0)
    g[2, 1] = np.inf
    with pytest.raises(FloatingPointError, match=r"samples \[2\]"):
        rbp_core.implicit_backward(
            maps.vjp, lambda z: z, backend.asarray(g), rbp_core.OriginalRBP(), batch_axis=0, on_failure="skip"
        )
    empty = rbp_core.fixed_point(lambda h: h, backend.asarray(np.zeros((0, 3))), batch_axis=0)
    assert empty.converged
    assert empty.sample_status == ()
    assert tuple(empty.value.shape) == (0, 3)


def test_callers_arrays_are_never_modified(backend) -> None:
    J, b = batch_problem(2, [0.4, 0.9], 4)
    maps = Maps(backend, J, b)
    h0 = backend.asarray(np.ones_like(b))
    g = backend.asarray(b)
    before = backend.to_numpy(h0).copy(), backend.to_numpy(g).copy()
    sol = rbp_core.fixed_point(maps.f, h0, rbp_core.FixedPointIteration(rtol=1e-8), batch_axis=0)
    z = rbp_core.solve_adjoint(maps.vjp, g, rbp_core.Neumann(steps=5), batch_axis=0, takes_indices=True)
    np.testing.assert_array_equal(backend.to_numpy(h0), before[0])
    np.testing.assert_array_equal(backend.to_numpy(g), before[1])
    assert sol.value is not h0
    assert z.value is not g


def test_a_solver_without_a_per_sample_form_is_refused(backend) -> None:
    class HostSolver:  # host logic per solve (a host_update), and no per_sample() form
        name = "host_solver"
        differentiable_step = False

        def limits(self, xp, dtype):
            return rbp_core.FixedPointIteration().limits(xp, dtype)

        def init(self, f, h0, ops):
            return h0, h0, None

        def step(self, f, state, ops):
            h = f(state)
            return h, h, ops.step_sqnorms(h, state), ((h, state), (h, None))

        def host_update(self, state, values):
            return state, values[0], values[1]

        def step_contraction(self, mu):
            return None

        def error_bound(self, xp, like, mu, norms, previous, state):
            return 0.0

    with pytest.raises(NotImplementedError, match="HostSolver does not take batch_axis yet: its host_update"):
        rbp_core.fixed_point(lambda h: 0.5 * h, backend.asarray(np.ones((2, 3))), HostSolver(), batch_axis=0)


def test_bad_batch_arguments(backend) -> None:
    h0 = backend.asarray(np.ones((2, 3)))
    solver = rbp_core.FixedPointIteration()
    with pytest.raises(ValueError, match=r"batch_axis=2 is out of range for h0 of shape \(2, 3\)"):
        rbp_core.fixed_point(lambda h: 0.5 * h, h0, solver, batch_axis=2)
    with pytest.raises(TypeError, match="batch_axis must be an int"):
        rbp_core.fixed_point(lambda h: 0.5 * h, h0, solver, batch_axis=True)
    with pytest.raises(TypeError, match="batch_axis must be an int"):
        rbp_core.solve_adjoint(lambda v: 0.5 * v, h0, rbp_core.Neumann(steps=3), batch_axis=0.0)
    with pytest.raises(ValueError, match="takes_indices=True needs a batch_axis"):
        rbp_core.fixed_point(lambda h: 0.5 * h, h0, solver, takes_indices=True)
    with pytest.raises(TypeError, match="takes_indices must be True or False"):
        rbp_core.solve_adjoint(lambda v: 0.5 * v, h0, rbp_core.Neumann(steps=3), batch_axis=0, takes_indices=1)
    scalar = backend.asarray(np.ones(()))
    with pytest.raises(ValueError, match="out of range for h0 of shape"):
        rbp_core.fixed_point(lambda h: 0.5 * h, scalar, solver, batch_axis=0)

    def whole_batch(h, idx):  # ignores the indices: returns every sample
        del idx
        return xp_full

    xp_full = backend.asarray(np.zeros((2, 3)))
    J, b = batch_problem(1, [0.2, 0.9], 3)
    with pytest.raises(ValueError, match=r"f returned an array of shape \(2, 3\); expected shape \(1, 3\)"):
        rbp_core.fixed_point(
            lambda h, idx: Maps(backend, J, b).f(h, idx) if h.shape[0] == 2 else whole_batch(h, idx),
            backend.asarray(np.zeros((2, 3))),
            rbp_core.FixedPointIteration(rtol=1e-12),
            batch_axis=0,
            takes_indices=True,
        )


def test_no_warnings_on_a_clean_batch(backend) -> None:
    J, b = batch_problem(4, [0.3, 0.7], 4)
    maps = Maps(backend, J, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rbp_core.implicit_gradient(
            maps.f,
            backend.asarray(np.zeros_like(b)),
            backend.asarray(b),
            vjp_state=lambda h, v: maps.vjp(v),
            vjp_params=lambda h, z: z,
            method=rbp_core.OriginalRBP(rtol=1e-10),
            solver=rbp_core.FixedPointIteration(rtol=1e-10),
            batch_axis=0,
        )


@pytest.mark.parametrize("which", ["anderson", "broyden"])
def test_accelerated_per_sample_solve_what_plain_iteration_cannot(backend, which) -> None:
    J, b = batch_problem(9, [0.3, 0.6, 0.9], 6)
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    J[1] = (Q * np.array([-1.6, -1.2, 0.3, 0.1, -0.5, 0.2])) @ Q.T  # spectral radius 1.6, I - J invertible
    maps = Maps(backend, J, b)
    h0 = backend.asarray(np.zeros_like(b))
    plain = rbp_core.fixed_point(maps.f, h0, rbp_core.FixedPointIteration(rtol=1e-10), batch_axis=0, throw=False)
    assert plain.failed_samples == (1,)
    solver = rbp_core.Anderson(rtol=1e-12, max_iter=500) if which == "anderson" else rbp_core.Broyden(rtol=1e-12)
    sol = rbp_core.fixed_point(maps.f, h0, solver, batch_axis=0)
    np.testing.assert_allclose(backend.to_numpy(sol.value), exact_fixed_points(J, b), atol=1e-9)
    # the other samples' iterations are untouched by the hard one
    easy = [0, 2]
    alone = rbp_core.fixed_point(
        Maps(backend, J[easy], b[easy]).f,
        backend.asarray(np.zeros_like(b[easy])),
        solver,
        batch_axis=0,
    )
    hs = backend.to_numpy(sol.value)
    steps = tuple(sol.sample_num_steps[s] for s in easy)
    scale = float(np.abs(hs).max()) * 6**0.5
    assert_same_samples(backend, backend.to_numpy(alone.value), hs[easy], alone.sample_num_steps, steps, scale, 0.9)


@pytest.mark.parametrize("which", BATCHABLE_FORWARD + BATCHABLE_ADJOINT)
def test_a_false_contraction_is_caught_per_sample(backend, which) -> None:
    J, b = batch_problem(6, [0.1, 0.9, 0.1], 5)  # the claim below holds for two samples of three
    maps = Maps(backend, J, b)
    if which in BATCHABLE_FORWARD:
        solver = FORWARD_SOLVERS[which].converged(1e-10, 0.9)
        h0 = backend.asarray(np.zeros_like(b))
        with pytest.raises(rbp_core.ContractionViolation):
            rbp_core.fixed_point(maps.f, h0, solver, batch_axis=0, contraction=0.2)
    else:
        method = ADJOINT_METHODS[which].converged(1e-10, 0.9)
        g = backend.asarray(b)
        with pytest.raises(rbp_core.ContractionViolation):
            rbp_core.solve_adjoint(maps.vjp, g, method, jvp=maps.jvp, batch_axis=0, contraction=0.2)


def test_indices_are_one_array_per_active_set(backend) -> None:
    J, b = batch_problem(8, [0.2, 0.9, 0.5], 4)
    maps = Maps(backend, J, b)
    seen = []

    def f(h, idx):
        seen.append(idx)
        return maps.f(h, idx)

    rbp_core.fixed_point(
        f, backend.asarray(np.zeros_like(b)), rbp_core.FixedPointIteration(rtol=1e-10), batch_axis=0, takes_indices=True
    )
    distinct = []
    for idx in seen:
        if not any(idx is d for d in distinct):
            distinct.append(idx)
    sets = [tuple(backend.to_numpy(d).astype(int)) for d in distinct]
    assert len(sets) == len(set(sets))  # a new array exactly when the active samples change
    assert sets[0] == (0, 1, 2)


@pytest.mark.parametrize(
    "method",
    [
        rbp_core.GMRES(restart=1, rtol=1e-12, max_iter=5000),
        rbp_core.GMRES(restart=2, rtol=1e-12, max_iter=5000),
        rbp_core.GMRES(rtol=1e-12),
        rbp_core.BiCGSTAB(rtol=1e-12),
        rbp_core.AndersonRBP(memory=8, rtol=1e-12),
    ],
    ids=["gmres1", "gmres2", "gmres20", "bicgstab", "anderson_rbp"],
)
def test_krylov_per_sample_on_an_expansive_sample(backend, method) -> None:
    J, g = batch_problem(12, [0.3, 0.95, 0.6, 0.8], 6)
    J[2] = 1.5 * np.eye(6)  # original RBP diverges here; these need only I - J^T invertible
    maps = Maps(backend, J, g)
    sol = rbp_core.solve_adjoint(maps.vjp, backend.asarray(g), method, batch_axis=0, takes_indices=True)
    assert sol.converged
    np.testing.assert_allclose(backend.to_numpy(sol.value), exact_adjoints(J, g), rtol=1e-9, atol=1e-10)
    for s in range(4):  # the recurrence's residual agrees with the true one
        z = backend.to_numpy(sol.value)[s]
        true = np.linalg.norm(g[s] - z + J[s].T @ z)
        assert true <= 10 * sol.sample_tolerance[s]


def test_bicgstab_breaks_down_on_one_sample_only(backend) -> None:
    J, g = batch_problem(13, [0.4, 0.7, 0.2], 5)
    J[1] = np.eye(5)  # I - J^T = 0 for this sample: a breakdown at the first step
    maps = Maps(backend, J, g)
    sol = rbp_core.solve_adjoint(maps.vjp, backend.asarray(g), rbp_core.BiCGSTAB(rtol=1e-12), batch_axis=0, throw=False)
    assert sol.sample_status[1] is Status.BREAKDOWN
    assert sol.failed_samples == (1,)
    z = backend.to_numpy(sol.value)
    assert np.all(np.isfinite(z))
    np.testing.assert_allclose(z[[0, 2]], exact_adjoints(J[[0, 2]], g[[0, 2]]), rtol=1e-9, atol=1e-10)

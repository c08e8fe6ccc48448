"""The JAX adapter: implicit gradients through fixed points, eager and under jax.jit, jax.vmap and jax.grad."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
from jax.test_util import check_grads

import rbp_core
from rbp_core.backends.jax import STATUSES, FixedPointInfo, fixed_point

N = 6
MU = 0.7  # ||W||_2, and tanh is 1-Lipschitz: a contraction with this constant

FORWARD = {
    "iteration": rbp_core.FixedPointIteration(rtol=1e-13),
    "anderson": rbp_core.Anderson(rtol=1e-13),
    "broyden": rbp_core.Broyden(rtol=1e-13),
}
BACKWARD = {
    "neumann": rbp_core.Neumann(steps=200),
    "original": rbp_core.OriginalRBP(rtol=1e-13),
    "cg": rbp_core.CGRBP(rtol=1e-13),
    "gmres": rbp_core.GMRES(rtol=1e-13),
    "bicgstab": rbp_core.BiCGSTAB(rtol=1e-13),
    "anderson": rbp_core.AndersonRBP(rtol=1e-13),
}


def tanh_map(h, p):
    return jnp.tanh(p["W"] @ h + p["x"])


def problem(seed: int = 0, n: int = N, dtype=np.float64):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, n))
    W *= MU / np.linalg.norm(W, 2)
    return {"W": jnp.asarray(W, dtype=dtype), "x": jnp.asarray(rng.standard_normal(n), dtype=dtype)}


def dense_gradient(params):
    """The gradient of sum(h*^2) from a converged fixed point and a dense adjoint solve (NumPy, float64)."""
    W, x = np.asarray(params["W"], dtype=np.float64), np.asarray(params["x"], dtype=np.float64)
    h = np.zeros(len(x))
    for _ in range(2000):
        h = np.tanh(W @ h + x)
    d = 1 - h**2
    z = np.linalg.solve(np.eye(len(x)) - (d[:, None] * W).T, 2 * h)
    return {"W": np.outer(d * z, h), "x": d * z}


def loss(params, *, backward=BACKWARD["gmres"], solver=FORWARD["iteration"], **options):
    h, _ = fixed_point(
        tanh_map,
        jnp.zeros(params["x"].shape, dtype=params["x"].dtype),
        params,
        backward=backward,
        solver=solver,
        **options,
    )
    return jnp.sum(h**2)


def assert_tree_close(got, want, rtol):
    for key in want:
        np.testing.assert_allclose(np.asarray(got[key]), want[key], rtol=rtol, atol=rtol * np.abs(want[key]).max())


# Every adjoint method behind fixed-point iteration, and every forward solver before GMRES: each
# solver on both drivers, without the 18 compilations of every pair.
PAIRS = [("iteration", b) for b in BACKWARD] + [(f, "gmres") for f in FORWARD if f != "iteration"]


@pytest.mark.parametrize(("forward", "backward"), PAIRS)
def test_gradient_matches_a_dense_solve_eager_and_under_jit(forward, backward) -> None:
    params = problem()
    want = dense_gradient(params)
    grad = jax.grad(lambda p: loss(p, backward=BACKWARD[backward], solver=FORWARD[forward]))
    assert_tree_close(grad(params), want, 1e-10)
    assert_tree_close(jax.jit(grad)(params), want, 1e-10)


def test_float32_gradients_within_its_precision() -> None:
    params = problem(dtype=np.float32)
    want = dense_gradient(params)
    rtol = float(np.sqrt(np.finfo(np.float32).eps))
    methods = {"backward": rbp_core.GMRES(rtol=rtol), "solver": rbp_core.FixedPointIteration(rtol=rtol)}
    for grad in (jax.grad(lambda p: loss(p, **methods)), jax.jit(jax.grad(lambda p: loss(p, **methods)))):
        got = grad(params)
        assert got["W"].dtype == jnp.float32
        assert_tree_close(got, want, 20 * rtol)


def test_finite_differences_agree_under_jit() -> None:
    params = problem(1)
    check_grads(jax.jit(lambda W: loss({"W": W, "x": params["x"]})), (params["W"],), order=1, modes=["rev"], eps=1e-6)
    check_grads(lambda x: loss({"W": params["W"], "x": x}), (params["x"],), order=1, modes=["rev"], eps=1e-6)


def test_vmap_solves_each_problem_on_its_own() -> None:
    params = problem(2)
    X = jnp.asarray(np.random.default_rng(3).standard_normal((4, N)) * np.array([[1.0], [8.0], [0.1], [3.0]]))

    def solve(x):
        return fixed_point(
            tanh_map, jnp.zeros(N), {"W": params["W"], "x": x}, backward=BACKWARD["gmres"], solver=FORWARD["iteration"]
        )

    hs, infos = jax.jit(jax.vmap(solve))(X)
    assert isinstance(infos, FixedPointInfo)
    assert infos.status.shape == (4,)
    assert bool(jnp.all(infos.converged))
    steps = [int(s) for s in infos.num_steps]
    assert len(set(steps)) > 1  # each its own stopping test: no batch-wide count
    single = jax.jit(solve)
    for i in range(4):
        h, info = single(X[i])
        # The same solve alone or in the batch, up to the rounding of the batched product W h (vmap
        # makes it a matrix product, another kernel): n roundings of each element, with room.
        np.testing.assert_allclose(np.asarray(hs[i]), np.asarray(h), rtol=10 * N * np.finfo(np.float64).eps)
        assert int(info.num_steps) == steps[i]
    per_problem = jax.jit(jax.vmap(jax.grad(lambda x: loss({"W": params["W"], "x": x}))))(X)
    for i in range(4):
        want = dense_gradient({"W": params["W"], "x": X[i]})["x"]
        np.testing.assert_allclose(np.asarray(per_problem[i]), want, rtol=1e-10, atol=1e-12)


def test_values_that_the_map_closes_over_get_their_gradients() -> None:
    params = problem(10)  # W is params; x is closed over, and what jit, grad and vmap trace
    W = params["W"]

    def solve(x):
        h, _ = fixed_point(
            lambda h, p: jnp.tanh(p @ h + x),
            jnp.asarray(np.zeros(N)),
            W,
            backward=BACKWARD["gmres"],
            solver=FORWARD["iteration"],
        )
        return jnp.sum(h**2)

    X = jnp.asarray(np.random.default_rng(11).standard_normal((3, N)))
    jitted, single = jax.jit(jax.grad(solve)), jax.jit(solve)
    for i in range(3):
        want = dense_gradient({"W": W, "x": X[i]})["x"]
        np.testing.assert_allclose(np.asarray(jitted(X[i])), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(jax.grad(solve)(X[0])), dense_gradient({"W": W, "x": X[0]})["x"], rtol=1e-10)
    values = jax.jit(jax.vmap(solve))(X)
    np.testing.assert_allclose(np.asarray(values), [float(single(X[i])) for i in range(3)], rtol=1e-12)


def test_pytree_states_and_parameters() -> None:
    params = problem(4)
    W, x = params["W"], params["x"]

    def f(h, p):  # a state split in two leaves of another structure, parameters a tuple
        (Wp, xp) = p
        whole = jnp.concatenate([h["a"], h["b"]])
        new = jnp.tanh(Wp @ whole + xp)
        return {"a": new[:2], "b": new[2:]}

    def pytree_loss(p):
        h, _ = fixed_point(
            f, {"a": jnp.zeros(2), "b": jnp.zeros(N - 2)}, p, backward=BACKWARD["gmres"], solver=FORWARD["anderson"]
        )
        return jnp.sum(h["a"] ** 2) + jnp.sum(h["b"] ** 2)

    got = jax.jit(jax.grad(pytree_loss))((W, x))
    want = dense_gradient(params)
    np.testing.assert_allclose(np.asarray(got[0]), want["W"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(got[1]), want["x"], rtol=1e-10, atol=1e-12)


def test_eager_info_holds_the_solutions_and_h0_gets_no_gradient() -> None:
    params = problem(5)

    def with_info(p, h0):
        h, info = fixed_point(tanh_map, h0, p, backward=BACKWARD["gmres"], solver=FORWARD["iteration"], contraction=MU)
        return jnp.sum(h**2), info

    (_, info), grads = jax.value_and_grad(with_info, argnums=(0, 1), has_aux=True)(params, jnp.ones(N))
    assert info.forward is not None
    assert info.forward.converged
    assert info.forward.error_bound is not None
    assert info.forward.error_bound < 1e-10
    assert len(info.backward) == 1
    assert info.backward[0].converged
    assert int(info.status) == 0
    assert int(info.num_steps) == info.forward.num_steps
    np.testing.assert_array_equal(np.asarray(grads[1]), np.zeros(N))


def test_a_failed_forward_solve_raises_eagerly_and_under_jit() -> None:
    params = problem(6)
    short = rbp_core.FixedPointIteration(rtol=1e-13, max_iter=3)
    with pytest.raises(rbp_core.ConvergenceError, match="maximum number of iterations"):
        fixed_point(tanh_map, jnp.zeros(N), params, backward=BACKWARD["gmres"], solver=short)
    jitted = jax.jit(lambda p: fixed_point(tanh_map, jnp.zeros(N), p, backward=BACKWARD["gmres"], solver=short)[0])
    with pytest.raises(Exception, match="maximum number of iterations") as caught:
        jax.block_until_ready(jitted(params))
    assert "ConvergenceError" in str(caught.value)

    # throw=False: the status code says it, eagerly and under jit.
    def quiet(p):
        return fixed_point(tanh_map, jnp.zeros(N), p, backward=BACKWARD["gmres"], solver=short, throw=False)

    for call in (quiet, jax.jit(quiet)):
        _, info = call(params)
        assert STATUSES[int(info.status)] is rbp_core.Status.MAX_STEPS
        assert int(info.num_steps) == 3


@pytest.mark.parametrize("jit", [False, True])
def test_backward_failure_policies(jit) -> None:
    params = problem(7)
    short = rbp_core.GMRES(rtol=1e-13, max_iter=2)
    want = dense_gradient(params)["x"]

    def grad(policy):
        g = jax.grad(lambda x: loss({"W": params["W"], "x": x}, backward=short, on_backward_failure=policy))
        return (jax.jit(g) if jit else g)(params["x"])

    with pytest.warns(rbp_core.BackwardFailureWarning, match="did not converge"):
        skipped = grad("skip")
    np.testing.assert_array_equal(np.asarray(skipped), np.zeros(N))
    with pytest.warns(rbp_core.BackwardFailureWarning, match="inexact"):
        inexact = grad("warn")
    assert 0 < np.linalg.norm(np.asarray(inexact) - want) < np.linalg.norm(want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(np.asarray(grad("ignore")), np.asarray(inexact))
    with pytest.raises(rbp_core.ConvergenceError if not jit else Exception, match="maximum number of iterations"):
        jax.block_until_ready(grad("raise"))


def test_traced_contraction_check() -> None:
    params = problem(8)
    _, info = jax.jit(
        lambda p: fixed_point(
            tanh_map,
            jnp.zeros(N),
            p,
            backward=BACKWARD["gmres"],
            solver=FORWARD["iteration"],
            contraction=0.01,
            throw=False,
        )
    )(params)
    assert bool(info.contraction_violated)
    _, info = jax.jit(
        lambda p: fixed_point(
            tanh_map, jnp.zeros(N), p, backward=BACKWARD["gmres"], solver=FORWARD["iteration"], contraction=MU
        )
    )(params)
    assert not bool(info.contraction_violated)


def test_bad_input_names_the_part() -> None:
    params = problem(9)
    h0 = jnp.zeros(N)
    gm = BACKWARD["gmres"]
    with pytest.raises(TypeError, match=r"h0\['s'\] must be a floating array, got str"):
        fixed_point(lambda h, p: h, {"s": "text"}, params, backward=gm)
    with pytest.raises(TypeError, match=r"params\['n'\] has dtype int"):
        fixed_point(tanh_map, h0, {**params, "n": jnp.arange(3)}, backward=gm)
    with pytest.raises(ValueError, match="returned a pytree of structure"):
        fixed_point(lambda h, p: (h, h), h0, params, backward=gm)
    with pytest.raises(ValueError, match=r"f\(h, params\) is float64\[3\]; h0's leaf there is float64\[6\]"):
        fixed_point(lambda h, p: h[:3], h0, params, backward=gm)
    with pytest.raises(TypeError, match="not an adjoint method of rbp-core; the JAX adapter takes Neumann"):
        fixed_point(tanh_map, h0, params, backward="gmres")
    with pytest.raises(TypeError, match="not the class GMRES"):
        fixed_point(tanh_map, h0, params, backward=rbp_core.GMRES)
    with pytest.raises(ValueError, match="on_backward_failure must be one of"):
        fixed_point(tanh_map, h0, params, backward=gm, on_backward_failure="zero")
    with pytest.raises(TypeError, match="h0 must hold arrays of one dtype"):
        fixed_point(lambda h, p: h, (jnp.zeros(2), jnp.zeros(2, dtype=jnp.float32)), params, backward=gm)

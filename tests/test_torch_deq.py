"""What DEQ training in torch needs beyond exact gradients: JFB, phantom gradients and the Jacobian penalty."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import rbp_core
from rbp_core.backends.torch import JFB, PhantomGradient, fixed_point, jacobian_penalty

B, N = 4, 6


def layer(seed: int = 0, scale: float = 0.6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(N, N, dtype=torch.float64, generator=gen)
    W = torch.nn.Parameter(scale * A / torch.linalg.matrix_norm(A, 2))
    x = torch.randn(B, N, dtype=torch.float64, generator=gen)
    g = torch.randn(B, N, dtype=torch.float64, generator=gen)
    return W, x, g


def tight() -> rbp_core.FixedPointIteration:
    return rbp_core.FixedPointIteration(rtol=1e-14, max_iter=5000)


@pytest.mark.parametrize("solver", [tight(), rbp_core.Anderson(rtol=1e-13)])
def test_jfb_is_the_gradient_of_one_step_at_the_fixed_point(solver) -> None:
    W, x, g = layer()

    def f(h):
        return torch.tanh(h @ W.T + x)

    h, info = fixed_point(f, torch.zeros(B, N, dtype=torch.float64), backward=JFB(), solver=solver)
    (grad,) = torch.autograd.grad(h, W, g)
    h_star = info.forward.value.detach()
    (expected,) = torch.autograd.grad(f(h_star), W, g)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)
    assert info.backward == []  # no backward solve


@pytest.mark.parametrize(("steps", "damping"), [(1, 1.0), (3, 1.0), (4, 0.5)])
def test_phantom_gradient_unrolls_damped_steps_from_the_fixed_point(steps, damping) -> None:
    W, x, g = layer(1)

    def f(h):
        return torch.tanh(h @ W.T + x)

    h, info = fixed_point(
        f,
        torch.zeros(B, N, dtype=torch.float64),
        backward=PhantomGradient(steps=steps, damping=damping),
        solver=tight(),
    )
    (grad,) = torch.autograd.grad(h, W, g)
    v = info.forward.value.detach()
    for _ in range(steps):
        v = (1 - damping) * v + damping * f(v)
    (expected,) = torch.autograd.grad(v, W, g)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


def test_phantom_gradient_of_k_plus_one_steps_is_neumann_of_k() -> None:
    W, x, g = layer(2)

    def f(h):
        return torch.tanh(h @ W.T + x)

    grads = []
    for backward in (PhantomGradient(steps=8), rbp_core.Neumann(steps=7)):
        h, _ = fixed_point(f, torch.zeros(B, N, dtype=torch.float64), backward=backward, solver=tight())
        grads.append(torch.autograd.grad(h, W, g)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-13)
    # and far from the exact gradient with few steps, close with many
    h, _ = fixed_point(
        f, torch.zeros(B, N, dtype=torch.float64), backward=rbp_core.OriginalRBP(rtol=1e-13), solver=tight()
    )
    exact = torch.autograd.grad(h, W, g)[0]
    h, _ = fixed_point(f, torch.zeros(B, N, dtype=torch.float64), backward=PhantomGradient(steps=80), solver=tight())
    torch.testing.assert_close(torch.autograd.grad(h, W, g)[0], exact, rtol=1e-9, atol=1e-12)
    h, _ = fixed_point(f, torch.zeros(B, N, dtype=torch.float64), backward=PhantomGradient(steps=2), solver=tight())
    few = torch.autograd.grad(h, W, g)[0]
    assert float((few - exact).norm() / exact.norm()) > 1e-2  # inexact with few steps


def test_inexact_gradients_per_sample() -> None:
    W, x, g = layer(3)
    h, info = fixed_point(
        lambda h, idx: torch.tanh(h @ W.T + x[idx]),
        torch.zeros(B, N, dtype=torch.float64),
        backward=PhantomGradient(steps=2),
        solver=rbp_core.Anderson(rtol=1e-12),
        batch_axis=0,
        takes_indices=True,
    )
    (grad,) = torch.autograd.grad(h, W, g)
    v = info.forward.value.detach()
    for _ in range(2):
        v = torch.tanh(v @ W.T + x)
    torch.testing.assert_close(grad, torch.autograd.grad(v, W, g)[0], rtol=1e-10, atol=1e-13)
    assert len(info.forward.sample_status) == B


def test_bad_inexact_settings() -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError, match="PhantomGradient steps must be >= 1"):
            PhantomGradient(steps=bad)
    with pytest.raises(TypeError, match="PhantomGradient steps must be an integer"):
        PhantomGradient(steps=1.5)
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="PhantomGradient damping must lie in"):
            PhantomGradient(steps=2, damping=bad)
    with pytest.raises(TypeError, match="PhantomGradient damping must be a real number"):
        PhantomGradient(steps=2, damping=True)
    W, x, _ = layer()
    with pytest.raises(ValueError, match="no tensor that f uses requires grad"):
        fixed_point(lambda h: torch.tanh(h @ W.detach().T + x), torch.zeros(B, N, dtype=torch.float64), backward=JFB())


def test_jacobian_penalty_estimates_the_frobenius_norm() -> None:
    W, x, _ = layer(4, scale=0.9)

    def f(h):
        return torch.tanh(h @ W.T + x)

    h, _ = fixed_point(f, torch.zeros(B, N, dtype=torch.float64), backward=JFB(), solver=tight())
    h_star = h.detach()
    J = torch.autograd.functional.jacobian(f, h_star).reshape(B * N, B * N)
    exact = float(J.square().sum()) / (B * N)
    estimate = jacobian_penalty(f, h, samples=4000, generator=torch.Generator().manual_seed(0))
    assert abs(float(estimate.detach()) - exact) <= 0.05 * exact
    # differentiable: for fixed probes it is sum ||J^T e||^2 / (k n), whose gradient autograd gives
    gen = torch.Generator().manual_seed(1)
    penalty = jacobian_penalty(f, h, samples=3, generator=torch.Generator().manual_seed(1))
    (got,) = torch.autograd.grad(penalty, W)
    h_in = h_star.clone().requires_grad_()
    out = f(h_in)
    total = 0.0
    for _ in range(3):
        e = torch.randn(out.shape, dtype=out.dtype, generator=gen)
        (jte,) = torch.autograd.grad(out, h_in, e, create_graph=True)
        total = total + jte.square().sum()
    (want,) = torch.autograd.grad(total / (3 * B * N), W)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(penalty, total / (3 * B * N), rtol=1e-12, atol=1e-15)


def test_jacobian_penalty_of_a_linear_map_and_bad_input() -> None:
    W = torch.nn.Parameter(torch.randn(N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))
    h = torch.zeros(B, N, dtype=torch.float64)
    estimate = jacobian_penalty(lambda v: v @ W.T, h, samples=4000, generator=torch.Generator().manual_seed(2))
    exact = float(W.detach().square().sum()) / N  # J is W on each of the B rows: ||J||_F^2 = B ||W||_F^2
    assert abs(float(estimate.detach()) - exact) <= 0.05 * exact
    with pytest.raises(ValueError, match="no tensor that f uses requires grad"):
        jacobian_penalty(lambda v: v @ W.detach().T, h)
    with pytest.raises(ValueError, match="samples must be >= 1"):
        jacobian_penalty(lambda v: v @ W.T, h, samples=0)
    pair = jacobian_penalty(lambda s: (s[0] @ W.T, s[1] * 0.5), (h, torch.ones(3, dtype=torch.float64)))
    assert pair.requires_grad


class _Cell(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        W, _, _ = layer(6, scale=0.9)
        self.W = W

    def forward(self, h, x):
        return torch.tanh(h @ self.W.T + x)


@pytest.mark.parametrize("mode", [True, "forward", "both"])
def test_warm_starts_save_forward_iterations_and_keep_the_results(mode) -> None:
    from rbp_core.backends.torch import FixedPoint

    x = torch.randn(B, N, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    g = torch.ones(B, N, dtype=torch.float64)
    kwargs = {"backward": rbp_core.GMRES(rtol=1e-12), "solver": rbp_core.Anderson(rtol=1e-12), "batch_axis": 0}
    cold = FixedPoint(_Cell(), **kwargs)
    warm = FixedPoint(_Cell(), warm_start=mode, **kwargs)
    ids = torch.arange(B)
    h0 = torch.zeros(B, N, dtype=torch.float64)
    results = []
    for net in (cold, warm):
        for visit in range(2):
            h = net(x, h0, ids=ids) if net is warm else net(x, h0)
            (grad,) = torch.autograd.grad(h, net.cell.W, g)
            results.append((visit, h.detach(), grad, net.info.forward.num_sample_evals))
    (_, hc, gc, ec), (_, hc2, gc2, ec2), (_, hw, gw, ew), (_, hw2, gw2, ew2) = results
    assert ew == ec  # a first visit starts cold: the same solve
    torch.testing.assert_close(hw, hc, rtol=0, atol=0)
    torch.testing.assert_close(gw, gc, rtol=0, atol=0)
    assert ew2 < ec2  # the second visit starts from the kept fixed points
    torch.testing.assert_close(hw2, hc2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw2, gc2, rtol=1e-9, atol=1e-12)
    assert len(warm.warm) == B
    assert bool(warm.warm_adjoint) == (mode == "both")


def test_bad_warm_start_settings() -> None:
    from rbp_core.backends.torch import FixedPoint

    with pytest.raises(ValueError, match="warm_start needs a batch_axis"):
        FixedPoint(_Cell(), backward=JFB(), warm_start=True)
    with pytest.raises(ValueError, match="warm_start must be False, True, 'forward' or 'both'"):
        FixedPoint(_Cell(), backward=JFB(), batch_axis=0, warm_start="adjoint")
    net = FixedPoint(_Cell(), backward=JFB(), batch_axis=0, warm_start=True)
    h0 = torch.zeros(B, N, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs the samples' ids"):
        net(h0, h0)
    with pytest.raises(ValueError, match="ids must be 4 integers"):
        net(h0, h0, ids=[0, 1])


def _precision_grad(dtype, solver, backward, batch_axis=None, autocast=False):
    gen = torch.Generator().manual_seed(8)
    n, b = 24, 6
    A = torch.randn(n, n, dtype=torch.float64, generator=gen)
    W = torch.nn.Parameter((0.5 * A / torch.linalg.matrix_norm(A, 2)).to(dtype))
    x = torch.randn(b, n, dtype=torch.float64, generator=gen).to(dtype)
    g = torch.randn(b, n, dtype=torch.float64, generator=gen)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with ctx:
        h, info = fixed_point(
            lambda h: torch.tanh(h @ W.T + x),
            torch.zeros(b, n, dtype=dtype),
            backward=backward,
            solver=solver,
            batch_axis=batch_axis,
            on_backward_failure="raise",
        )
    (grad,) = torch.autograd.grad(h, W, g.to(h.dtype))
    return grad.double(), info, h.dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("solver", [rbp_core.FixedPointIteration(), rbp_core.Anderson(), rbp_core.Broyden()])
@pytest.mark.parametrize("backward", [rbp_core.GMRES(), rbp_core.OriginalRBP(), rbp_core.CGRBP()])
@pytest.mark.parametrize("batch_axis", [None, 0])
def test_half_precision_training_gradients(dtype, solver, backward, batch_axis) -> None:
    ref, _, _ = _precision_grad(torch.float32, rbp_core.FixedPointIteration(), rbp_core.GMRES())
    grad, info, out_dtype = _precision_grad(dtype, solver, backward, batch_axis)
    assert out_dtype == dtype  # the state keeps its dtype; norms and solver scalars are float32
    assert info.forward.converged
    assert info.backward_converged
    # Both solves stop at the dtype's default rtol = sqrt(eps); with ||J|| <= 0.5 each leaves an
    # error of at most rtol / (1 - 0.5) relative: within 4 sqrt(eps) of the float32 gradient.
    tol = 4 * float(torch.finfo(dtype).eps) ** 0.5
    assert float((grad - ref).norm() / ref.norm()) <= tol


def test_autocast_tolerances_follow_the_autocast_dtype() -> None:
    ref, _, _ = _precision_grad(torch.float32, rbp_core.FixedPointIteration(), rbp_core.GMRES())
    grad, info, out_dtype = _precision_grad(torch.float32, rbp_core.Anderson(), rbp_core.GMRES(), autocast=True)
    assert out_dtype == torch.float32
    assert info.backward_converged  # float32's default tolerance would end by its budget here
    rtol = float(torch.finfo(torch.bfloat16).eps) ** 0.5
    assert info.forward.tolerance is not None
    assert float((grad - ref).norm() / ref.norm()) <= 4 * rtol
    # explicit tolerances are kept: the same solve asked for 1e-12 cannot reach it in bfloat16
    with pytest.raises(rbp_core.ConvergenceError):
        _precision_grad(torch.float32, rbp_core.Anderson(rtol=1e-12, max_iter=50), rbp_core.GMRES(), autocast=True)

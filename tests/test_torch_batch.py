"""The torch adapter with ``batch_axis``: per-sample solves, samples leaving the batch, per-sample failure policy."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import rbp_core
from rbp_core.backends.torch import BPTT, TBPTT, FixedPoint, fixed_point

B, N = 6, 5
RHO = (0.5, 0.99, 0.5, 0.95, 0.3, 0.9)


def problem(seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(N, N, dtype=torch.float64, generator=gen)
    W = torch.nn.Parameter(A / torch.linalg.matrix_norm(A, 2))
    rho = torch.tensor(RHO, dtype=torch.float64)[:, None]
    x = (0.3 * torch.randn(B, N, dtype=torch.float64, generator=gen)).requires_grad_()
    g = torch.randn(B, N, dtype=torch.float64, generator=gen)
    return W, rho, x, g


def F(h: torch.Tensor, W: torch.Tensor, rho: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(rho * (h @ W.T) + x)


def reference(W, rho, x, g, samples=range(B)) -> tuple[torch.Tensor, torch.Tensor]:
    """``dL/dW`` and ``dL/dx`` for ``L = sum_s <g_s, h_s*>``, each sample solved alone and densely."""
    gW, gx = torch.zeros_like(W), torch.zeros_like(x)
    for s in samples:
        r, xs = rho[s : s + 1], x[s : s + 1].detach()
        h = torch.zeros(1, N, dtype=torch.float64)
        for _ in range(4000):
            h = F(h, W.detach(), r, xs)
        J = torch.autograd.functional.jacobian(lambda v: F(v, W.detach(), r, xs), h)[0, :, 0, :]  # noqa: B023
        z = torch.linalg.solve(torch.eye(N, dtype=torch.float64) - J.T, g[s])
        xs_ = xs.clone().requires_grad_()
        dW, dx = torch.autograd.grad(F(h, W, r, xs_), (W, xs_), z[None])
        gW += dW
        gx[s] = dx[0]
    return gW, gx


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> bool:
    return float((a - b).norm() / b.norm()) < tol


@pytest.mark.parametrize("solver", [rbp_core.FixedPointIteration(rtol=1e-13), rbp_core.Anderson(rtol=1e-13)])
@pytest.mark.parametrize(
    "backward",
    [
        rbp_core.OriginalRBP(rtol=1e-13),
        rbp_core.CGRBP(rtol=1e-13),
        rbp_core.GMRES(restart=3, rtol=1e-13),
        rbp_core.Neumann(steps=2500),
    ],
)
@pytest.mark.parametrize("takes_indices", [False, True])
def test_per_sample_gradients_are_exact(solver, backward, takes_indices) -> None:
    W, rho, x, g = problem()
    ref_W, ref_x = reference(W, rho, x, g)
    if takes_indices:
        h, info = fixed_point(
            lambda h, idx: F(h, W, rho[idx], x[idx]),
            torch.zeros(B, N, dtype=torch.float64),
            backward=backward,
            solver=solver,
            batch_axis=0,
            takes_indices=True,
        )
    else:
        h, info = fixed_point(
            lambda h: F(h, W, rho, x),
            torch.zeros(B, N, dtype=torch.float64),
            backward=backward,
            solver=solver,
            batch_axis=0,
        )
    gW, gx = torch.autograd.grad(h, (W, x), g)
    assert close(gW, ref_W)
    assert close(gx, ref_x)
    assert info.forward.converged
    assert len(info.forward.sample_status) == B
    assert info.backward_converged
    assert len(info.backward[-1].sample_status) == B
    if takes_indices:
        assert info.forward.num_sample_evals == sum(info.forward.sample_num_steps)


def test_tuple_state_keeps_its_batch_axis() -> None:
    W, rho, x, g = problem(1)
    seen = []

    def f(state, idx):
        a, b = state  # a: (b, N), b: (b, 2, 3), samples first in both
        seen.append((tuple(a.shape), tuple(b.shape)))
        return F(a, W, rho[idx], x[idx]), 0.5 * b + 0.1 * a.sum(1)[:, None, None]

    h0 = (torch.zeros(B, N, dtype=torch.float64), torch.zeros(B, 2, 3, dtype=torch.float64))
    backward = rbp_core.OriginalRBP(rtol=1e-12)
    solver = rbp_core.FixedPointIteration(rtol=1e-12)
    (a, b), _ = fixed_point(f, h0, backward=backward, solver=solver, batch_axis=0, takes_indices=True)
    assert seen[0] == ((B, N), (B, 2, 3))
    assert any(sa[0] < B for sa, _ in seen)  # finished samples left
    assert tuple(a.shape) == (B, N)
    assert tuple(b.shape) == (B, 2, 3)
    gx = torch.autograd.grad((a * g).sum() + b.sum(), x)[0]
    for s in (0, 1):  # each sample alone gives the same value and gradient
        one = torch.tensor([s])
        (a1, b1), _ = fixed_point(
            lambda st, idx: f(st, one[idx]),  # noqa: B023
            (h0[0][:1], h0[1][:1]),
            backward=backward,
            solver=solver,
            batch_axis=0,
            takes_indices=True,
        )
        assert torch.allclose(a1[0], a[s], rtol=0, atol=1e-14)
        assert torch.allclose(b1[0], b[s], rtol=0, atol=1e-14)
        gx1 = torch.autograd.grad((a1 * g[s]).sum() + b1.sum(), x)[0]
        assert torch.allclose(gx1[s], gx[s], rtol=1e-10, atol=1e-14)


def test_module_leaves_samples_and_matches_the_reference() -> None:
    W, rho, x, g = problem(2)
    ref_W, ref_x = reference(W, rho, x, g)
    calls = []

    class Cell(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W = W

        def forward(self, h, x, r):  # samples on axis 1
            calls.append(h.shape[1])
            return torch.tanh(r * (self.W @ h) + x)

    layer = FixedPoint(
        Cell(), backward=rbp_core.OriginalRBP(rtol=1e-13), solver=rbp_core.Anderson(rtol=1e-13), batch_axis=1
    )
    xt = x.T
    h = layer(xt, torch.zeros(N, B, dtype=torch.float64), rho.T)
    forward_calls = len(calls)
    gW, gx = torch.autograd.grad(h, (W, x), g.T)
    assert close(gW, ref_W)
    assert close(gx, ref_x)
    assert min(calls[:forward_calls]) < B  # finished samples left the forward solve
    assert layer.info.forward.num_sample_evals < B * layer.info.forward.num_f_evals
    # the backward re-recorded the step on the active samples once they were at most half
    assert any(c <= B // 2 for c in calls[forward_calls:])


def test_a_failing_sample_is_skipped_alone() -> None:
    W, rho, x, g = problem(3)
    rho, x = rho.clone(), x.detach().clone()
    rho[4], x[4] = 3.0, 0.0  # h* = 0 for this sample, where J = 3 W stretches: original RBP diverges on it
    x.requires_grad_()
    method = rbp_core.OriginalRBP(rtol=1e-12, max_iter=300)
    h, info = fixed_point(
        lambda h: F(h, W, rho, x),
        torch.zeros(B, N, dtype=torch.float64),
        backward=method,
        solver=rbp_core.Anderson(rtol=1e-12),
        batch_axis=0,
        on_backward_failure="skip",
    )
    with pytest.warns(rbp_core.BackwardFailureWarning, match=r"samples \[4\]"):
        (gx,) = torch.autograd.grad(h, x, g)
    assert info.backward[-1].failed_samples == (4,)
    assert torch.all(gx[4] == 0)
    ok = [s for s in range(B) if s != 4]
    _, ref_x = reference(W, rho, x, g, samples=ok)
    assert close(gx[ok], ref_x[ok])
    h, _ = fixed_point(
        lambda h: F(h, W, rho, x),
        torch.zeros(B, N, dtype=torch.float64),
        backward=method,
        solver=rbp_core.Anderson(rtol=1e-12),
        batch_axis=0,
        on_backward_failure="raise",
    )
    with pytest.raises(rbp_core.ConvergenceError, match=r"4 \(DIVERGED"):
        torch.autograd.grad(h, x, g)


def test_bad_batch_options() -> None:
    W, rho, x, _ = problem()
    h0 = torch.zeros(B, N, dtype=torch.float64)
    for baseline in (BPTT(), TBPTT(steps=3)):
        with pytest.raises(ValueError, match="does not take batch_axis"):
            fixed_point(lambda h: F(h, W, rho, x), h0, backward=baseline, batch_axis=0)
    with pytest.raises(ValueError, match="different batch sizes"):
        fixed_point(
            lambda s: s, (h0, torch.zeros(3, N, dtype=torch.float64)), backward=rbp_core.Neumann(steps=2), batch_axis=0
        )
    with pytest.raises(ValueError, match="out of range for the state"):
        fixed_point(lambda h: h, h0, backward=rbp_core.Neumann(steps=2), batch_axis=2)
    with pytest.raises(ValueError, match="takes_indices=True needs a batch_axis"):
        fixed_point(lambda h, i: h, h0, backward=rbp_core.Neumann(steps=2), takes_indices=True)
    with pytest.raises(ValueError, match=r"f returned an array of shape \(6, 5\); expected shape \([1-5], 5\)"):
        fixed_point(
            lambda h, idx: F(h, W, rho[idx], x[idx]) if h.shape[0] == B else h0,
            h0,
            backward=rbp_core.Neumann(steps=2),
            solver=rbp_core.FixedPointIteration(rtol=1e-12),
            batch_axis=0,
            takes_indices=True,
        )
    with pytest.raises(TypeError, match="batch_axis must be an int"):
        FixedPoint(torch.nn.Identity(), backward=rbp_core.Neumann(steps=2), batch_axis="0")

"""Regression tests for the PyTorch adapter: the forward-time map, checked options, failures never applied silently.

Each test names the defect it covers (issue 10's numbering).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch adapter needs torch (nox -s tests, torch set)")

import rbp_core
from rbp_core.backends.torch import BPTT, TBPTT, BackwardFailureWarning, FixedPoint, fixed_point

F64 = torch.float64
RBP = {
    "Neumann": rbp_core.Neumann(steps=200),
    "OriginalRBP": rbp_core.OriginalRBP(rtol=1e-13),
    "CGRBP": rbp_core.CGRBP(rtol=1e-13),
}
TIGHT = rbp_core.FixedPointIteration(rtol=1e-14, max_iter=10_000)


def _weights(seed: int = 0, n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=F64)
    return (0.5 * W / torch.linalg.matrix_norm(W, 2)).requires_grad_()


# --- defect 1: the backward differentiates f as it was evaluated in the forward pass ------------
@pytest.mark.parametrize("name", list(RBP))
def test_gradient_accumulation_over_a_loop_uses_each_steps_own_input(name) -> None:
    W = _weights()
    xs = [torch.randn(4, dtype=F64, generator=torch.Generator().manual_seed(s)) for s in range(3)]

    def total(backward):
        W.grad = None
        losses = []
        for x in xs:  # the closure reads the loop variable x: late binding
            h, _ = fixed_point(
                lambda h: torch.tanh(W @ h + x),  # noqa: B023 - the late binding under test
                torch.zeros(4, dtype=F64),
                backward=backward,
                solver=TIGHT,
            )
            losses.append((h**2).sum())
        sum(losses).backward()
        return W.grad.clone()

    torch.testing.assert_close(total(RBP[name]), total(BPTT()), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(RBP))
def test_input_buffer_refilled_in_place_gives_the_forward_time_gradient(name) -> None:
    W = _weights(1)
    first, second = torch.randn(2, 4, dtype=F64, generator=torch.Generator().manual_seed(7))
    x = first.clone()
    layer_input = x  # the buffer that a data loader refills in place

    def grad(refill: bool, backward) -> torch.Tensor:
        W.grad = None
        layer_input.copy_(first)
        h, _ = fixed_point(
            lambda h: torch.tanh(W @ h + layer_input), torch.zeros(4, dtype=F64), backward=backward, solver=TIGHT
        )
        if refill:
            layer_input.copy_(second)
        (h**2).sum().backward()
        return W.grad.clone()

    torch.testing.assert_close(grad(True, RBP[name]), grad(False, BPTT()), rtol=1e-9, atol=1e-12)


def test_in_place_change_of_a_saved_input_is_torchs_error() -> None:
    W = _weights(2)
    x = torch.rand(4, dtype=F64) + 0.5
    h, _ = fixed_point(lambda h: torch.tanh((W @ h) * x), torch.ones(4, dtype=F64), backward=rbp_core.Neumann(50))
    x.add_(1.0)  # x is saved by the product for its backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        h.sum().backward()


def test_forward_mode_jvp_refuses_a_map_that_changed_since_the_forward_pass() -> None:
    W = _weights(3)
    x = torch.randn(4, dtype=F64)
    h, _ = fixed_point(
        lambda h: torch.tanh(W @ h + x), torch.zeros(4, dtype=F64), backward=rbp_core.CGRBP(), jvp_mode="forward"
    )
    x.add_(0.5)  # not saved by the graph, but jvp_mode="forward" evaluates f again
    with pytest.raises(RuntimeError, match="no longer equals the step recorded in the forward pass"):
        h.sum().backward()


# --- defect 5: torch.func ------------------------------------------------------------------------
def test_torch_func_grad_is_refused_with_a_message_that_names_it() -> None:
    W0 = _weights(4).detach()

    def loss(W):
        h, _ = fixed_point(lambda h: torch.tanh(W @ h + 1.0), torch.zeros(4, dtype=F64), backward=rbp_core.Neumann(20))
        return h.sum()

    with pytest.raises(RuntimeError, match=r"cannot run inside a torch\.func transform.*torch\.autograd\.grad"):
        torch.func.grad(loss)(W0)

    # The baselines that the message points to do run under torch.func, and agree with autograd.
    def bptt_loss(W):
        h, _ = fixed_point(lambda h: torch.tanh(W @ h + 1.0), torch.zeros(4, dtype=F64), backward=BPTT(), solver=TIGHT)
        return h.sum()

    W = W0.clone().requires_grad_()
    bptt_loss(W).backward()
    torch.testing.assert_close(torch.func.grad(bptt_loss)(W0), W.grad)


# --- defect 6: a map that ignores the state ----------------------------------------------------------
@pytest.mark.parametrize("jvp", ["double-backward", "forward"])
@pytest.mark.parametrize("name", list(RBP))
def test_map_that_ignores_the_state_gives_the_plain_gradient(name, jvp) -> None:
    w = torch.tensor([0.3, -1.2, 2.0], dtype=F64, requires_grad=True)
    h, info = fixed_point(lambda h: torch.sin(w), torch.zeros(3, dtype=F64), backward=RBP[name], jvp_mode=jvp)
    (h * torch.tensor([1.0, 2.0, 3.0], dtype=F64)).sum().backward()
    torch.testing.assert_close(w.grad, torch.cos(w.detach()) * torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    assert info.backward_converged


# --- defects 7 and 8: options are checked at the call and at construction ---------------------------------
def test_a_class_instead_of_an_instance_is_refused_at_the_call() -> None:
    W = _weights(5)
    for cls, shown in [
        (rbp_core.OriginalRBP, r"rbp_core\.OriginalRBP\(\)"),
        (BPTT, r"rbp_core\.backends\.torch\.BPTT\(\)"),
    ]:
        with pytest.raises(TypeError, match=rf"backward must be an instance, not the class.*{shown}"):
            fixed_point(lambda h: W @ h, torch.zeros(4, dtype=F64), backward=cls)
    with pytest.raises(TypeError, match=r"solver must be an instance.*FixedPointIteration\(\)"):
        fixed_point(lambda h: W @ h, torch.zeros(4, dtype=F64), backward=BPTT(), solver=rbp_core.FixedPointIteration)


def test_fixed_point_layer_validates_at_construction() -> None:
    cell = torch.nn.Linear(3, 3)
    with pytest.raises(TypeError, match="backward must be"):
        FixedPoint(cell, backward="cg")
    with pytest.raises(ValueError, match="contraction must lie in"):
        FixedPoint(cell, backward=rbp_core.CGRBP(), contraction=1.5)
    with pytest.raises(ValueError, match="on_backward_failure must be one of"):
        FixedPoint(cell, backward=rbp_core.CGRBP(), on_backward_failure="loud")
    with pytest.raises(ValueError, match="jvp_mode must be"):
        FixedPoint(cell, backward=rbp_core.CGRBP(), jvp_mode="reverse")
    with pytest.raises(TypeError, match="backward must be an instance"):
        FixedPoint(cell, backward=rbp_core.Neumann)


# --- defect 9: every part of a tuple state is checked ---------------------------------------------------
def test_tuple_state_parts_are_checked_naming_f_and_the_part() -> None:
    W = _weights(6)
    h0 = (torch.zeros(4, dtype=F64), torch.zeros(4, dtype=F64))
    with pytest.raises(TypeError, match=r"f returned state\[1\] NoneType; expected a tensor of shape \(4,\)"):
        fixed_point(lambda s: (torch.tanh(W @ s[0]), None), h0, backward=rbp_core.Neumann(5))
    with pytest.raises(
        TypeError, match=r"f returned state\[1\] of dtype torch\.float32 on cpu; expected torch\.float64"
    ):
        fixed_point(lambda s: (torch.tanh(W @ s[0]), s[1].float()), h0, backward=rbp_core.Neumann(5))
    with pytest.raises(ValueError, match=r"f returned state\[0\] of shape \(2,\); expected shape \(4,\)"):
        fixed_point(lambda s: ((W @ s[0])[:2], s[1]), h0, backward=TBPTT(3))


# --- defect 10 ------------------------------------------------------------------------------------------
def test_numpy_integers_are_accepted_by_tbptt_like_the_core() -> None:
    assert TBPTT(steps=np.int64(5)).steps == 5
    assert rbp_core.Neumann(steps=np.int64(5)).steps == 5


# --- defect 12: a failed backward solve never reaches the parameters silently ---------------------------
def _diverging(on_backward_failure: str | None):
    """A map whose Jacobian has spectral radius 1.5 at the fixed point: the Neumann series diverges."""
    w = torch.tensor([1.5, 0.2], dtype=F64, requires_grad=True)
    kw = {} if on_backward_failure is None else {"on_backward_failure": on_backward_failure}
    h, info = fixed_point(
        lambda h: w * h + 1.0,
        torch.zeros(2, dtype=F64),
        backward=rbp_core.Neumann(steps=30),
        solver=rbp_core.FixedPointIteration(max_iter=5, divergence_factor=None),
        throw=False,
        **kw,
    )
    return w, h, info


def test_diverged_backward_is_skipped_by_default_with_a_warning() -> None:
    w, h, info = _diverging(None)
    with pytest.warns(BackwardFailureWarning, match=r"gradient was skipped \(a zero cotangent\).*'warn' applies"):
        h.sum().backward()
    assert info.backward[0].status is rbp_core.Status.DIVERGED
    torch.testing.assert_close(w.grad, torch.zeros(2, dtype=F64))


def test_backward_failure_policies() -> None:
    w, h, _ = _diverging("raise")
    with pytest.raises(rbp_core.ConvergenceError, match="diverged"):
        h.sum().backward()
    w, h, _ = _diverging("warn")
    with pytest.warns(BackwardFailureWarning, match="the gradient is inexact"):
        h.sum().backward()
    assert torch.count_nonzero(w.grad) == 2  # applied: the partial sum of the diverging series
    w, h, _ = _diverging("ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h.sum().backward()
    assert torch.count_nonzero(w.grad) == 2


def test_nonfinite_backward_is_skipped_by_default_and_never_applied() -> None:
    for policy, expect in [(None, "skip"), ("warn", "raise"), ("ignore", "raise")]:
        w = torch.tensor([2.0], dtype=F64, requires_grad=True)
        kw = {} if policy is None else {"on_backward_failure": policy}
        h, _ = fixed_point(
            lambda h, w=w: w * h * 1e300,
            torch.ones(1, dtype=F64),
            backward=rbp_core.Neumann(5, divergence_factor=None),
            solver=rbp_core.FixedPointIteration(max_iter=1, divergence_factor=None),
            throw=False,
            **kw,
        )
        if expect == "skip":
            with pytest.warns(BackwardFailureWarning, match="skipped"):
                h.sum().backward()
            assert float(w.grad) == 0.0
        else:
            with pytest.raises(FloatingPointError, match="backward iteration"):
                h.sum().backward()


# --- defect 4: empty states -------------------------------------------------------------------------------
@pytest.mark.parametrize("backward", [*RBP.values(), BPTT(), TBPTT(3)], ids=[*RBP, "BPTT", "TBPTT"])
def test_empty_batch_gives_zero_gradients(backward) -> None:
    W = _weights(8)
    h, info = fixed_point(lambda h: torch.tanh(h @ W.T), torch.zeros(0, 4, dtype=F64), backward=backward)
    assert h.shape == (0, 4)
    (h**2).sum().backward()
    torch.testing.assert_close(W.grad, torch.zeros_like(W))
    assert info.forward.converged


# --- defect 2 in torch: float16 gradients under loss scaling ------------------------------------------------
def test_float16_cg_gradient_scales_with_the_loss() -> None:
    torch.manual_seed(0)
    W = (0.4 * torch.eye(4) + 0.05 * torch.randn(4, 4)).half().requires_grad_()
    x = torch.randn(4).half()
    grads = {}
    for s in (1e-5, 1.0, 1e3):
        W.grad = None
        h, info = fixed_point(
            lambda h: torch.tanh(W @ h + x), torch.zeros(4, dtype=torch.float16), backward=rbp_core.CGRBP()
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            (s * h.sum()).backward()
        assert info.backward_converged, info.backward[0].describe()
        grads[s] = W.grad.double() / s
    assert torch.count_nonzero(grads[1.0]) == 16
    for s in (1e-5, 1e3):
        torch.testing.assert_close(grads[s], grads[1.0], rtol=2e-2, atol=2e-3)

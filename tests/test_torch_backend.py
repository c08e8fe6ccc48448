"""The PyTorch adapter: gradients of all five methods against the dense implicit gradient."""

from __future__ import annotations

import gc
import math
import warnings

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch adapter needs torch (nox -s tests, torch set)")

import rbp_core
from conftest import ADJOINT_METHODS
from rbp_core.backends.torch import (
    BPTT,
    TBPTT,
    BackwardFailureWarning,
    FixedPoint,
    fixed_point,
)

F64 = torch.float64
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="torch-cuda: no CUDA device here"),
        ],
    ),
]
TIGHT = rbp_core.FixedPointIteration(rtol=1e-14, max_iter=10_000)
# Every registered adjoint method, solved to 1e-13 on these models (their Jacobians contract by at most
# about 0.85: ||W||_2 = 0.6, gated for the GRU), and the baselines.
METHODS = {
    **{type(m).__name__: m for m in (case.converged(1e-13, 0.85) for case in ADJOINT_METHODS.values())},
    "BPTT": BPTT(),
    "TBPTT": TBPTT(steps=150),
}


# --- models -----------------------------------------------------------------------------------
class TanhRNN(torch.nn.Module):
    """F(h) = tanh(h W^T + x U^T + b), contractive with ||W||_2 = 0.6."""

    def __init__(self, n: int, m: int, seed: int, device: str) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(n, n, generator=g, dtype=F64)
        self.W = torch.nn.Parameter((0.6 * W / torch.linalg.matrix_norm(W, 2)).to(device))
        self.U = torch.nn.Parameter(torch.randn(n, m, generator=g, dtype=F64).to(device))
        self.b = torch.nn.Parameter(torch.randn(n, generator=g, dtype=F64).to(device))

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ self.W.T + x @ self.U.T + self.b)


class GRUFixedPoint(torch.nn.Module):
    """h = GRUCell(x, h) with small recurrent weights (a contraction)."""

    def __init__(self, n: int, m: int, seed: int, device: str) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.cell = torch.nn.GRUCell(m, n, dtype=F64, device=device)
        with torch.no_grad():
            self.cell.weight_hh.mul_(0.3)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.cell(x, h)


def _dense_gradient(model, x, h_star, c):
    """The implicit gradient of L = sum(c * h*) from the dense Jacobian and a dense solve."""
    shape = h_star.shape
    n = h_star.numel()

    def F_flat(h_flat):
        return model(h_flat.reshape(shape), x).reshape(-1)

    J = torch.autograd.functional.jacobian(F_flat, h_star.reshape(-1))
    z = torch.linalg.solve(torch.eye(n, dtype=F64, device=J.device) - J.T, c.reshape(-1))
    leaves = [*model.parameters(), x]
    out = model(h_star, x)
    return torch.autograd.grad(out, leaves, z.reshape(shape))


def _implicit_gradients(model, x, h0, c, backward, **kw):
    h, info = fixed_point(lambda h: model(h, x), h0, backward=backward, solver=TIGHT, **kw)
    loss = (c * h).sum()
    leaves = [*model.parameters(), x]
    return torch.autograd.grad(loss, leaves), info, h


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_cls", [TanhRNN, GRUFixedPoint], ids=["tanh-rnn", "gru"])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradients_match_dense_implicit_gradient(device, model_cls, method, seed) -> None:
    n, m, batch = 6, 3, 4
    model = model_cls(n, m, seed, device)
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(batch, m, generator=g, dtype=F64).to(device).requires_grad_()
    c = torch.randn(batch, n, generator=g, dtype=F64).to(device)
    h0 = torch.zeros(batch, n, dtype=F64, device=device)
    grads, info, h = _implicit_gradients(model, x, h0, c, METHODS[method])
    assert info.forward.converged
    assert h.dtype == F64
    assert h.device.type == device
    expected = _dense_gradient(model, x.detach().requires_grad_(), info.forward.value.reshape(batch, n), c)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    if method not in ("BPTT", "TBPTT"):
        assert info.backward_converged


@pytest.mark.parametrize("K", [0, 1, 3, 10])
def test_neumann_equals_tbptt_one_step_longer(K) -> None:
    model = TanhRNN(5, 2, seed=3, device="cpu")
    x = torch.randn(2, 2, dtype=F64)
    c = torch.randn(2, 5, dtype=F64)
    h0 = torch.zeros(2, 5, dtype=F64)
    neumann, _, _ = _implicit_gradients(model, x.clone().requires_grad_(), h0, c, rbp_core.Neumann(steps=K))
    tbptt, _, _ = _implicit_gradients(model, x.clone().requires_grad_(), h0, c, TBPTT(steps=K + 1))
    for a, b in zip(neumann, tbptt, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    if K >= 1:  # and it is not TBPTT(K): the counting convention is one step
        shorter, _, _ = _implicit_gradients(model, x.clone().requires_grad_(), h0, c, TBPTT(steps=K))
        assert not torch.allclose(neumann[0], shorter[0], rtol=1e-9, atol=0)


@pytest.mark.parametrize("method", list(ADJOINT_METHODS))
def test_gradcheck(method) -> None:
    torch.manual_seed(0)
    W0 = 0.4 * torch.randn(4, 4, dtype=F64) / 2
    x = torch.randn(4, dtype=F64)
    backward = ADJOINT_METHODS[method].converged(1e-14, 0.9)

    def fn(W, x):
        h, _ = fixed_point(lambda h: torch.tanh(W @ h + x), torch.zeros(4, dtype=F64), backward=backward, solver=TIGHT)
        return h

    assert torch.autograd.gradcheck(fn, (W0.clone().requires_grad_(), x.clone().requires_grad_()))


def test_tuple_state_lstm() -> None:
    torch.manual_seed(1)
    n, m = 5, 3
    cell = torch.nn.LSTMCell(m, n, dtype=F64)
    with torch.no_grad():
        cell.weight_hh.mul_(0.3)
    x = torch.randn(2, m, dtype=F64)
    h0 = (torch.zeros(2, n, dtype=F64), torch.zeros(2, n, dtype=F64))
    ch, cc = torch.randn(2, n, dtype=F64), torch.randn(2, n, dtype=F64)

    def f(state):
        return cell(x, state)

    grads = {}
    for name, method in [("cg", rbp_core.CGRBP(rtol=1e-13)), ("bptt", BPTT()), ("neumann", rbp_core.Neumann(200))]:
        (h, c), _ = fixed_point(f, h0, backward=method, solver=TIGHT)
        assert h.shape == (2, n)
        assert c.shape == (2, n)
        loss = (ch * h).sum() + (cc * c).sum()
        grads[name] = torch.autograd.grad(loss, list(cell.parameters()))
    for a, b, d in zip(grads["cg"], grads["bptt"], grads["neumann"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(a, d, rtol=1e-9, atol=1e-11)


def test_module_with_several_parameters_and_info() -> None:
    model = TanhRNN(6, 3, seed=4, device="cpu")
    layer = FixedPoint(model, backward=rbp_core.OriginalRBP(rtol=1e-12), solver=TIGHT, contraction=0.6)
    assert {name for name, _ in layer.named_parameters()} == {"cell.W", "cell.U", "cell.b"}
    h = layer(torch.randn(2, 3, dtype=F64), torch.zeros(2, 6, dtype=F64))
    h.square().sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    info = layer.info
    assert info.forward.converged
    assert info.forward.residual_norms
    assert len(info.backward) == 1
    assert info.backward[0].converged
    assert info.backward[0].residual_norms[-1] <= info.backward[0].tolerance
    assert info.backward[0].error_bound is not None


def test_backward_twice_with_retain_graph_gives_same_gradients() -> None:
    model = TanhRNN(4, 2, seed=5, device="cpu")
    x = torch.randn(3, 2, dtype=F64)
    h, info = fixed_point(lambda h: model(h, x), torch.zeros(3, 4, dtype=F64), backward=rbp_core.Neumann(30))
    loss = h.square().sum()
    first = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(model.parameters()))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(info.backward) == 2


def test_second_order_is_a_clear_error() -> None:
    model = TanhRNN(4, 2, seed=6, device="cpu")
    x = torch.randn(4, 2, dtype=F64)
    h, _ = fixed_point(lambda h: model(h, x), torch.zeros(4, 4, dtype=F64), backward=rbp_core.Neumann(10))
    with pytest.raises(RuntimeError, match="second-order gradients through the implicit backward"):
        torch.autograd.grad(h.sum(), model.W, create_graph=True)


def test_second_order_through_bptt_works() -> None:
    W = torch.tensor([[0.3]], dtype=F64, requires_grad=True)
    h, _ = fixed_point(lambda h: torch.tanh(W @ h + 1.0), torch.zeros(1, dtype=F64), backward=BPTT(), solver=TIGHT)
    (gW,) = torch.autograd.grad(h.sum(), W, create_graph=True)
    (ggW,) = torch.autograd.grad(gW.sum(), W)
    assert torch.isfinite(ggW).all()


@pytest.mark.parametrize("mode", ["forward", "double-backward"])
def test_cg_jvp_modes_agree(mode) -> None:
    model = TanhRNN(5, 2, seed=7, device="cpu")
    x = torch.randn(2, 2, dtype=F64)
    c = torch.randn(2, 5, dtype=F64)
    h0 = torch.zeros(2, 5, dtype=F64)
    cg, info, _ = _implicit_gradients(
        model, x.clone().requires_grad_(), h0, c, rbp_core.CGRBP(rtol=1e-13), jvp_mode=mode
    )
    ref, _, _ = _implicit_gradients(model, x.clone().requires_grad_(), h0, c, rbp_core.OriginalRBP(rtol=1e-13))
    assert info.backward[0].num_jvp == info.backward[0].num_steps
    for a, b in zip(cg, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def _graph_size(t: torch.Tensor) -> int:
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


def test_rbp_graph_does_not_grow_with_forward_iterations() -> None:
    model = TanhRNN(4, 2, seed=8, device="cpu")
    x = torch.randn(2, 2, dtype=F64)
    sizes = {}
    for tol in (1e-2, 1e-12):
        for name, method in [("neumann", rbp_core.Neumann(50)), ("bptt", BPTT())]:
            h, info = fixed_point(
                lambda h: model(h, x),
                torch.zeros(2, 4, dtype=F64),
                backward=method,
                solver=rbp_core.FixedPointIteration(rtol=tol),
            )
            sizes[name, tol] = (_graph_size(h), info.forward.num_steps)
    assert sizes["neumann", 1e-2][1] < sizes["neumann", 1e-12][1]
    assert sizes["neumann", 1e-2][0] == sizes["neumann", 1e-12][0]
    assert sizes["bptt", 1e-12][0] > 3 * sizes["bptt", 1e-2][0]


def test_graph_is_freed_when_the_result_is_dropped() -> None:
    import weakref

    model = TanhRNN(4, 2, seed=9, device="cpu")
    x = torch.randn(2, 2, dtype=F64)
    gc.disable()
    try:
        h, _ = fixed_point(lambda h: model(h, x), torch.zeros(2, 4, dtype=F64), backward=rbp_core.Neumann(5))
        (hook,) = h._backward_hooks.values()
        ref = weakref.ref(hook)
        del hook, h
        # Freed by reference counting alone: no cycle keeps the hook and its one-step graph alive.
        assert ref() is None
    finally:
        gc.enable()


# --- failures are loud --------------------------------------------------------------------------
def test_backward_failure_warns_by_default_and_can_raise_or_be_quiet() -> None:
    model = TanhRNN(6, 3, seed=10, device="cpu")
    x = torch.randn(2, 3, dtype=F64)
    h0 = torch.zeros(2, 6, dtype=F64)
    weak = rbp_core.OriginalRBP(rtol=1e-14, max_iter=2)
    h, info = fixed_point(lambda h: model(h, x), h0, backward=weak)
    with pytest.warns(BackwardFailureWarning, match=r"OriginalRBP did not converge.*residual norm .*tolerance"):
        h.sum().backward()
    assert info.backward_converged is False
    h, _ = fixed_point(lambda h: model(h, x), h0, backward=weak, on_backward_failure="raise")
    with pytest.raises(rbp_core.ConvergenceError, match="maximum number of iterations"):
        h.sum().backward()
    h, _ = fixed_point(lambda h: model(h, x), h0, backward=weak, on_backward_failure="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h.sum().backward()


def test_nonfinite_incoming_gradient_raises() -> None:
    model = TanhRNN(3, 2, seed=11, device="cpu")
    x = torch.randn(1, 2, dtype=F64)
    h, _ = fixed_point(lambda h: model(h, x), torch.zeros(1, 3, dtype=F64), backward=rbp_core.Neumann(5))
    with pytest.raises(FloatingPointError, match=r"Neumann: non-finite values .* incoming gradient"):
        (h * math.nan).sum().backward()


def test_nonfinite_forward_raises() -> None:
    W = torch.tensor([[3.0]], dtype=F64, requires_grad=True)
    with pytest.raises(rbp_core.ConvergenceError, match="fixed_point"):
        fixed_point(lambda h: torch.exp(W @ h) * 1e300, torch.ones(1, dtype=F64), backward=rbp_core.Neumann(5))


def test_f_changing_shape_or_dtype_is_refused() -> None:
    W = torch.eye(3, dtype=F64, requires_grad=True)
    h0 = torch.zeros(3, dtype=F64)
    with pytest.raises(ValueError, match=r"f returned an array of shape \(2,\); expected shape \(3,\)"):
        fixed_point(lambda h: (0.5 * W @ h)[:2], h0, backward=rbp_core.Neumann(5))
    with pytest.raises(TypeError, match=r"f returned dtype torch.float32 on cpu; expected torch.float64"):
        fixed_point(lambda h: (0.5 * W @ h).float(), h0, backward=rbp_core.Neumann(5))
    with pytest.raises(TypeError, match=r"f returned Tensor; expected a tuple of 2 tensors"):
        fixed_point(lambda s: s[0], (h0, h0), backward=rbp_core.Neumann(5))


def test_no_gradient_anywhere_is_an_error_under_grad_mode() -> None:
    W = 0.5 * torch.eye(3, dtype=F64)  # does not require grad
    h0 = torch.zeros(3, dtype=F64)
    for method in (rbp_core.Neumann(5), BPTT(), TBPTT(3)):
        with pytest.raises(ValueError, match="no tensor that f uses requires grad"):
            fixed_point(lambda h: torch.tanh(W @ h + 1), h0, backward=method)
    with torch.no_grad():
        h, info = fixed_point(lambda h: torch.tanh(W @ h + 1), h0, backward=rbp_core.Neumann(5))
    assert not h.requires_grad
    assert info.forward.converged


def test_bad_options() -> None:
    W = torch.eye(2, dtype=F64, requires_grad=True)
    h0 = torch.zeros(2, dtype=F64)
    with pytest.raises(TypeError, match="backward must be"):
        fixed_point(lambda h: W @ h, h0, backward="neumann")
    with pytest.raises(ValueError, match="on_backward_failure"):
        fixed_point(lambda h: W @ h, h0, backward=BPTT(), on_backward_failure="shout")
    with pytest.raises(ValueError, match="TBPTT steps must be >= 1, got 0"):
        TBPTT(steps=0)
    with pytest.raises(TypeError, match=r"TBPTT steps must be an integer, got 2\.5"):
        TBPTT(steps=2.5)
    with pytest.raises(TypeError, match="tuple state must share dtype"):
        fixed_point(lambda s: s, (h0, h0.float()), backward=BPTT())


def test_inputs_not_modified_and_no_grad_into_h0() -> None:
    model = TanhRNN(3, 2, seed=12, device="cpu")
    x = torch.randn(1, 2, dtype=F64)
    h0 = torch.full((1, 3), 0.25, dtype=F64, requires_grad=True)
    h, _ = fixed_point(lambda h: model(h, x), h0, backward=rbp_core.Neumann(10))
    h.sum().backward()
    assert h0.grad is None
    assert torch.equal(h0.detach(), torch.full((1, 3), 0.25, dtype=F64))


@pytest.mark.parametrize("policy", ["warn", "raise", "ignore"])
def test_disproved_contraction_follows_the_failure_policy(policy) -> None:
    W = torch.nn.Parameter(torch.diag(torch.tensor([0.9, 0.1], dtype=F64)))
    x = torch.ones(2, dtype=F64)
    h, info = fixed_point(
        lambda h: W @ h + x,
        torch.zeros(2, dtype=F64),
        backward=rbp_core.Neumann(steps=20),
        contraction=0.3,  # false: ||W|| = 0.9
        throw=False,
        on_backward_failure=policy,
    )
    assert info.forward.error_bound is None
    if policy == "raise":
        with pytest.raises(rbp_core.ContractionViolation, match=r"contraction=0\.3 was disproved"):
            h.sum().backward()
    elif policy == "warn":
        with pytest.warns(BackwardFailureWarning, match=r"contraction=0\.3 was disproved"):
            h.sum().backward()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            h.sum().backward()
        assert info.backward[0].error_bound is None


def test_backward_makes_exactly_the_solvers_state_vjps() -> None:
    """The solver's K state VJPs, and one more only where autograd runs the whole recorded step.

    The step recorded at forward time has the state requiring grad (so that the backward
    differentiates f as it was evaluated then); loss.backward() runs all of its graph, the state's
    branch included, whose result is dropped. torch.autograd.grad with the parameters as inputs
    runs only the branches it needs: exactly the solver's K.
    """
    calls = []

    class CountStateVJPs(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h):
            return h.view_as(h)

        @staticmethod
        def backward(ctx, grad):
            calls.append(1)
            return grad

    model = TanhRNN(4, 2, seed=13, device="cpu")
    x = torch.randn(2, 2, dtype=F64)
    h, info = fixed_point(
        lambda h: model(CountStateVJPs.apply(h), x), torch.zeros(2, 4, dtype=F64), backward=rbp_core.Neumann(7)
    )
    h.square().sum().backward()
    assert info.backward[0].num_vjp == 7
    assert len(calls) == 8
    assert info.backward[0].value is None  # the record does not keep z

    calls.clear()
    h, info = fixed_point(
        lambda h: model(CountStateVJPs.apply(h), x), torch.zeros(2, 4, dtype=F64), backward=rbp_core.Neumann(7)
    )
    torch.autograd.grad(h.square().sum(), list(model.parameters()))
    assert info.backward[0].num_vjp == len(calls) == 7

"""``torch.compile`` of a model with a fixed-point layer: the eager gradients, with the solve run eagerly."""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")

import rbp_core
from rbp_core.backends.torch import FixedPoint

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile's CPU backend needs a C compiler")


class Net(torch.nn.Module):
    def __init__(self, backward: object) -> None:
        super().__init__()
        self.cell = torch.nn.Linear(5, 5, dtype=torch.float64)
        torch.nn.init.normal_(self.cell.weight, std=0.1)
        self.deq = FixedPoint(
            lambda h, x: torch.tanh(self.cell(h) + x),  # type: ignore[arg-type]
            backward=backward,
            solver=rbp_core.Anderson(rtol=1e-12),
        )
        self.head = torch.nn.Linear(5, 2, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.deq(2.0 * x, torch.zeros_like(x))))


# Dynamo probes ``.grad`` of the layer's (non-leaf) output while it resumes after the eager solve,
# inside its own warning filter, which this suite's "error" filter outranks: its probe, not ours.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.parametrize("backward", [rbp_core.OriginalRBP(rtol=1e-12), rbp_core.GMRES(rtol=1e-12)])
def test_compiled_model_gives_the_eager_gradients(backward) -> None:
    torch.manual_seed(0)
    net = Net(backward)
    x = torch.randn(3, 5, dtype=torch.float64)
    net(x).square().sum().backward()
    eager = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    compiled = torch.compile(net)
    compiled(x).square().sum().backward()
    for p, want in zip(net.parameters(), eager, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=1e-14)
    assert net.deq.info is not None
    assert net.deq.info.backward_converged

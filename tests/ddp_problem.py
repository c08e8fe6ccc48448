"""The model, data and step shared by the DDP test and its worker processes."""

from __future__ import annotations

import torch

import rbp_core
from rbp_core.backends.torch import FixedPoint

B, N = 8, 5


class Cell(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(0.3 * torch.randn(N, N, dtype=torch.float64, generator=gen))
        self.U = torch.nn.Parameter(torch.randn(N, N, dtype=torch.float64, generator=gen))

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ self.W.T + x @ self.U.T)


def model() -> FixedPoint:
    return FixedPoint(
        Cell(),
        backward=rbp_core.OriginalRBP(rtol=1e-13),
        solver=rbp_core.Anderson(rtol=1e-13),
        batch_axis=0,
        on_backward_failure="raise",
    )


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(B, N, dtype=torch.float64, generator=gen), torch.randn(B, N, dtype=torch.float64, generator=gen)


def one_step(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    out = net(x, torch.zeros_like(x))
    torch.nn.functional.mse_loss(out, y).backward()
    opt.step()

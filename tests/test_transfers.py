"""At most one device-to-host transfer per iteration, for every registered solver.

On torch tensors (whose core operations are not the host-memory ones) every conversion of a
tensor to a Python number is counted: ``__float__``, ``item`` and ``tolist``. Ten more iterations
must cost at most ten more conversions, whatever the solver.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="counts conversions of torch tensors")

import rbp_core
from conftest import ADJOINT_METHODS, FORWARD_SOLVERS


@pytest.fixture
def conversions(monkeypatch):
    count = [0]
    for name in ("__float__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return count


def _problem():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(16, 16, generator=gen, dtype=torch.float64)
    J = 0.5 * A / torch.linalg.matrix_norm(A, 2)
    g = torch.randn(16, generator=gen, dtype=torch.float64)
    return J, g


@pytest.mark.parametrize("name", list(ADJOINT_METHODS))
@pytest.mark.parametrize("contraction", [None, 0.5])
def test_adjoint_iterations_transfer_once_each(conversions, name, contraction) -> None:
    J, g = _problem()
    counts = []
    for k in (10, 20):
        before = conversions[0]
        sol = rbp_core.solve_adjoint(
            lambda v: J.T @ v,
            g,
            ADJOINT_METHODS[name].budget(k),
            jvp=lambda v: J @ v,
            contraction=contraction,
            throw=False,
        )
        counts.append((conversions[0] - before, sol.num_steps))
    (c10, s10), (c20, s20) = counts
    assert s20 - s10 == 10, counts
    assert c20 - c10 <= s20 - s10, counts


@pytest.mark.parametrize("name", list(FORWARD_SOLVERS))
def test_forward_iterations_transfer_once_each(conversions, name) -> None:
    J, g = _problem()
    counts = []
    for k in (10, 20):
        before = conversions[0]
        sol = rbp_core.fixed_point(
            lambda h: J @ h + g, g, FORWARD_SOLVERS[name].budget(k), contraction=0.5, throw=False
        )
        counts.append((conversions[0] - before, sol.num_steps))
    (c10, s10), (c20, s20) = counts
    assert s20 - s10 == 10, counts
    assert c20 - c10 <= s20 - s10, counts

r"""What DEQ training needs beyond exact gradients: inexact gradients, the Jacobian penalty, warm starts.

Re-exported by :mod:`rbp_core.backends.torch`: :class:`JFB` and :class:`PhantomGradient` (backward
methods that unroll one or :math:`K` damped steps from :math:`h^*`), :func:`jacobian_penalty` (a Hutchinson
estimate of :math:`\|\partial f / \partial h\|_F^2` to add to the loss) and :class:`WarmStart` (the per-sample cache of
:class:`~rbp_core.backends.torch.FixedPoint`'s warm starts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rbp_core._checks import check_damping, check_int

from ._torch_state import State, _has_other_leaves, _Packing

__all__ = ["JFB", "PhantomGradient", "WarmStart", "jacobian_penalty"]


@dataclass(frozen=True)
class PhantomGradient:
    r"""An inexact gradient: back-propagation through ``steps`` damped steps taken from :math:`h^*`.

    The forward solve runs to its tolerance without a graph (any forward solver); then
    :math:`h \leftarrow (1 - \lambda) h + \lambda f(h)` runs :math:`k` = ``steps`` times with autograd from :math:`h^*`
    (detached), and the output is the last of them. Its gradient is that of the unrolled steps,
    :math:`\sum_{t<k} (\lambda J^T + (1 - \lambda) I)^t` applied to :math:`\lambda\, \partial F/\partial w` in place of
    :math:`(I - J^T)^{-1} \partial F/\partial w`: cheap (``steps`` VJPs, memory for ``steps`` steps, none for the
    forward iterations) and inexact; no backward solve, so ``info.backward`` stays empty.
    ``PhantomGradient(steps=1, damping=1.0)`` is :class:`JFB`.

    Parameters
    ----------
    steps : int
        :math:`k \ge 1` unrolled steps (TorchDEQ's ``grad=k``).
    damping : float
        :math:`\lambda \in (0, 1]` (default 1: plain steps).

    Examples
    --------
    >>> from rbp_core.backends.torch import PhantomGradient
    >>> PhantomGradient(steps=5, damping=0.8)
    PhantomGradient(steps=5, damping=0.8)
    """

    steps: int
    damping: float = 1.0

    def __post_init__(self) -> None:
        check_int(self.steps, "PhantomGradient steps", 1)
        check_damping(self.damping, "PhantomGradient damping")


@dataclass(frozen=True)
class JFB:
    r"""The Jacobian-free backward: the gradient of one step :math:`f(h^*)` at the fixed point.

    :math:`(I - J^T)^{-1}` is replaced by :math:`I`, so the parameters get :math:`g^T \partial F/\partial w` at :math:`h^*`: the
    cheapest gradient (one VJP through one step), a descent direction when :math:`\|J\|` is small
    enough, and inexact. The same as ``PhantomGradient(steps=1)``.

    Examples
    --------
    >>> from rbp_core.backends.torch import JFB
    >>> JFB()
    JFB()
    """

    @property
    def steps(self) -> int:
        """One step."""
        return 1

    @property
    def damping(self) -> float:
        """Plain steps."""
        return 1.0


class WarmStart:
    """Fixed points and adjoints by sample id, to start the next solves of the same samples from them.

    Training visits the same samples epoch after epoch, and their fixed points (and adjoints) move
    little between visits: a solve that starts from the last one needs fewer iterations.
    :class:`FixedPoint` with ``warm_start`` keeps one of these and takes the ids of the batch's
    samples (``layer(x, h0, ids=ids)``): a sample seen before starts from its last fixed point
    instead of its row of ``h0``, and with ``warm_start="both"`` an adjoint method that supports
    warm starts (``supports_warm_start``: all but Neumann) starts from its last adjoint (new samples
    from zero). Everything is kept detached, one row per sample id ever seen: the
    memory of two states per sample of the data set.
    """

    def __init__(self) -> None:
        self.states: dict[int, torch.Tensor] = {}
        self.adjoints: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.states)

    @staticmethod
    def _ids(ids: Any, batch: int) -> list[int]:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if len(values) != batch or not all(isinstance(v, int) for v in values):
            msg = f"ids must be {batch} integers, one per sample of the batch; got {ids!r}"
            raise ValueError(msg)
        return values

    def start(self, ids: list[int], rows: torch.Tensor, table: dict[int, torch.Tensor]) -> torch.Tensor:
        """``rows`` with each kept sample's row in place of its own (a new tensor)."""
        if not any(i in table for i in ids):
            return rows
        return torch.stack([table[i].to(rows) if i in table else rows[k] for k, i in enumerate(ids)])

    def keep(self, ids: list[int], rows: torch.Tensor, table: dict[int, torch.Tensor]) -> None:
        """Keep each sample's row (detached)."""
        for k, i in enumerate(ids):
            table[i] = rows[k].detach().clone()


class _Adjoints:
    """The hook's warm start: the batch's kept adjoints (zero rows for new samples), and where z goes."""

    def __init__(self, cache: WarmStart, ids: list[int]) -> None:
        self.cache, self.ids = cache, ids

    def start(self, g: torch.Tensor) -> torch.Tensor | None:
        table = self.cache.adjoints
        if not any(i in table for i in self.ids):
            return None
        return self.cache.start(self.ids, torch.zeros_like(g), table)

    def keep(self, z: torch.Tensor) -> None:
        self.cache.keep(self.ids, z, self.cache.adjoints)


def jacobian_penalty(
    f: Callable[[Any], Any],
    h: State,
    *,
    samples: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""A differentiable Hutchinson estimate of :math:`\|\partial f / \partial h\|_F^2 / n` at ``h``, for adding to a loss.

    The Jacobian regularisation of deep equilibrium models (Bai, Koltun and Kolter, 2021): with
    :math:`\epsilon` standard normal, :math:`\mathbb{E}\, \|J^T \epsilon\|^2 = \|J\|_F^2`, so the mean over ``samples`` probes
    of :math:`\|J^T \epsilon\|^2 / n` (:math:`n` the state's elements) estimates the squared Frobenius norm per
    element. Each probe costs one VJP through one recorded step ``f(h)`` (``h`` detached) and its
    graph is kept (``create_graph``), so the penalty's gradient reaches the parameters of ``f``.
    Penalising it keeps :math:`J` small: fewer forward and backward iterations.

    Parameters
    ----------
    f : callable
        The map of the fixed point, ``h -> f(h)``, as given to :func:`fixed_point`.
    h : Tensor or tuple of Tensor
        Where to estimate it: the fixed point (the output of :func:`fixed_point`).
    samples : int
        Probes (>= 1) averaged.
    generator : optional
        A ``torch.Generator``, for reproducible probes.

    Examples
    --------
    >>> import torch
    >>> from rbp_core.backends.torch import jacobian_penalty
    >>> W = torch.nn.Parameter(torch.full((3, 3), 0.1, dtype=torch.float64))
    >>> penalty = jacobian_penalty(lambda h: h @ W.T, torch.zeros(2, 3, dtype=torch.float64), samples=4)
    >>> penalty.requires_grad, penalty.shape
    (True, torch.Size([]))
    """
    check_int(samples, "samples", 1)
    packing = _Packing(h)
    h_in = packing.pack(h, "h").detach().requires_grad_()
    with torch.enable_grad():
        out = packing.pack(f(packing.unpack(h_in)), "f")
    if not _has_other_leaves(out, h_in):
        msg = (
            "jacobian_penalty: no tensor that f uses requires grad, so the penalty would carry no gradient. "
            "Make the parameters of f require grad, or leave the penalty out under torch.no_grad()."
        )
        raise ValueError(msg)
    total = out.new_zeros(())
    for _ in range(samples):
        probe = torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=generator)
        (jtp,) = torch.autograd.grad(out, h_in, probe, create_graph=True, retain_graph=True, materialize_grads=True)
        total = total + jtp.square().sum()
    return total / (samples * out.numel())

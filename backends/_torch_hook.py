"""The torch adapter's implicit backward: the gradient hook on ``f(h*)`` and its products.

:class:`_ImplicitHook` replaces the incoming gradient ``g`` of the recorded step ``y = f(h*)`` by
the solution ``z`` of ``(I - J^T) z = g``, solved by the core's :func:`rbp_core.implicit_backward`
with VJPs (and JVPs) through that step; :class:`_ActiveSamples` gives those products on the
samples still iterating of a batched solve.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, cast

import torch

import rbp_core
from rbp_core import AdjointMethod, Solution
from rbp_core._adjoint import OnFailure

if TYPE_CHECKING:
    from ._torch_training import _Adjoints
    from .torch import FixedPointInfo

__all__: list[str] = []

JVPMode = Literal["forward", "double-backward"]


def _drop_grad(t: torch.Tensor) -> None:
    t.grad = None


def _identity(z: torch.Tensor) -> torch.Tensor:
    return z


class _ImplicitHook:
    """The gradient hook on ``y = f(h*)``: replaces ``g`` by ``z`` with ``(I - J^T) z = g``.

    ``out = f(h_in)`` is the step recorded at forward time with ``h_in = h*`` requiring grad; the
    solver's VJPs (and JVPs) are reverse passes through it, with the graph retained for the
    parameters' pass that autograd runs next. The solve and its failure policy are the core's
    :func:`rbp_core.implicit_backward`, with the identity as the parameters' VJP: autograd
    delivers ``z^T dF/dw`` itself.
    """

    def __init__(
        self,
        h_in: torch.Tensor,
        out: torch.Tensor,
        f_flat: Callable[[torch.Tensor], torch.Tensor],
        method: AdjointMethod,
        info: FixedPointInfo,
        contraction: float | None,
        jvp_mode: JVPMode,
        on_failure: OnFailure,
    ) -> None:
        self.h_in = h_in
        self.out = out
        self.f_flat = f_flat
        self.method = method
        self.info = info
        self.contraction = contraction
        self.jvp_mode = jvp_mode
        self.on_failure = on_failure
        self.samples: _ActiveSamples | None = None  # with a batch axis: each sample solved on its own
        self.warm: _Adjoints | None = None  # a warm start of the adjoint, and where z goes after

    def _vjp(self, v: torch.Tensor) -> torch.Tensor:
        # materialize_grads: a map that ignores the state has J = 0, not an error.
        (grad,) = torch.autograd.grad(self.out, self.h_in, v, retain_graph=True, materialize_grads=True)
        return grad

    def _jvp(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``v -> J v`` for the methods that need it, at the recorded step."""
        if not self.method.needs_jvp:
            return None
        if self.jvp_mode == "forward":
            return self._forward_mode_jvp
        # Double backward: J^T u is linear in u, so the gradient of <J^T u, v> with respect to u is
        # J v. The graph of J^T u is recorded once per backward pass and differentiated per product.
        with torch.enable_grad():
            u = torch.zeros_like(self.out, requires_grad=True)
            (jtu,) = torch.autograd.grad(
                self.out, self.h_in, u, retain_graph=True, create_graph=True, materialize_grads=True
            )
        if not jtu.requires_grad:  # J^T u does not depend on u: J = 0
            return torch.zeros_like

        def jvp(v: torch.Tensor) -> torch.Tensor:
            (jv,) = torch.autograd.grad(jtu, u, v, retain_graph=True, materialize_grads=True)
            return jv

        return jvp

    def _forward_mode_jvp(self, v: torch.Tensor) -> torch.Tensor:
        """One forward-mode evaluation of ``f`` at ``h*``, refused unless it reproduces the recorded step."""
        result = torch.func.jvp(self.f_flat, (self.h_in.detach(),), (v,))
        primal, tangent = result[0], result[1]
        if not torch.equal(primal.detach(), self.out.detach()):
            msg = (
                "jvp_mode='forward' re-evaluates f at backward time, and f(h*) no longer equals the step "
                "recorded in the forward pass (an input of f changed since, or f is random): its JVP "
                "would belong to another map. Use jvp_mode='double-backward', which differentiates the "
                "recorded step."
            )
            raise RuntimeError(msg)
        return cast("torch.Tensor", tangent).detach()

    def _record(self, solution: Solution) -> None:
        # The record keeps everything but z, which autograd takes over: repeated backward passes
        # through one output must not pile up state-sized arrays in info.
        self.info.backward.append(dataclasses.replace(solution, value=None))

    def __call__(self, g: torch.Tensor | None) -> torch.Tensor | None:
        if g is None:  # an undefined gradient (all zeros) stays undefined
            return None
        if torch.is_grad_enabled():
            msg = (
                f"second-order gradients through the implicit backward ({type(self.method).__name__}) are "
                "not supported: the backward solve is not differentiable. Use BPTT or TBPTT for "
                "higher-order derivatives."
            )
            raise RuntimeError(msg)
        samples = self.samples
        jvp = self._jvp()
        if samples is None:
            z, _ = rbp_core.implicit_backward(
                self._vjp,
                _identity,
                g.detach(),
                self.method,
                jvp_state=jvp,
                contraction=self.contraction,
                on_failure=self.on_failure,
                on_solution=self._record,
            )
            return cast("torch.Tensor", z)
        subset = samples.f is not None
        warm = self.warm
        z0 = warm.start(g) if warm is not None and self.method.supports_warm_start else None
        z, _ = rbp_core.implicit_backward(
            samples.vjp if subset else self._vjp,
            _identity,
            g.detach(),
            self.method,
            jvp_state=None if jvp is None else (samples.jvp(jvp) if subset else jvp),
            z0=z0,
            contraction=self.contraction,
            on_failure=self.on_failure,
            on_solution=self._record,
            batch_axis=0,
            takes_indices=subset,
        )
        if warm is not None:
            warm.keep(z)
        return cast("torch.Tensor", z)


class _ActiveSamples:
    """The backward products of a batched fixed point on the samples still iterating, given their indices.

    The VJPs go through the step recorded at forward time (the other rows of the cotangent zero)
    while at least half of its samples are active. Once the active samples are at most half of
    the recorded ones, the step is recorded again on them alone (one evaluation of ``f`` on the
    active samples, paid back within two products at half the size) and the VJPs go through that.
    The JVPs (CG-RBP) always go through the graph of the first recording.
    """

    def __init__(self, hook: _ImplicitHook, f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None) -> None:
        self.f = f
        self.h_star = hook.h_in.detach()
        self.batch = hook.out.shape[0]
        self.recorded: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor] = (None, hook.h_in, hook.out)
        self.recordings = 1
        self._positions: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def _step(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The recorded step to differentiate for the samples ``idx``, and their rows in it (None: all)."""
        rec, h, out = self.recorded
        count = self.batch if rec is None else rec.shape[0]
        if idx.shape[0] == count:
            return h, out, None
        if 2 * idx.shape[0] <= count:
            assert self.f is not None
            h = self.h_star[idx].detach().requires_grad_()
            with torch.enable_grad():
                out = self.f(h, idx)
            self.recorded, self.recordings = (idx, h, out), self.recordings + 1
            return h, out, None
        if self._positions[0] is not idx:
            if rec is None:
                self._positions = (idx, idx)
            else:
                lookup = torch.full((self.batch,), -1, dtype=torch.long, device=idx.device)
                lookup[rec] = torch.arange(count, device=idx.device)
                self._positions = (idx, lookup[idx])
        return h, out, self._positions[1]

    def vjp(self, v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        h, out, rows = self._step(idx)
        cot = v if rows is None else torch.zeros_like(out).index_copy(0, rows, v)
        (grad,) = torch.autograd.grad(out, h, cot, retain_graph=True, materialize_grads=True)
        return grad if rows is None else grad[rows]

    def jvp(self, full: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``J v`` on the samples ``idx`` through ``full``, the JVP of the whole recorded batch."""

        def jvp(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            if idx.shape[0] == self.batch:
                return full(v)
            whole = v.new_zeros((self.batch, v.shape[1])).index_copy(0, idx, v)
            return full(whole)[idx]

        return jvp

"""PyTorch adapter: fixed points whose gradients come from RBP, CG-RBP or Neumann-RBP.

:func:`fixed_point` finds ``h* = f(h*)`` without an autograd graph and attaches
autograd to one extra step of ``f`` at ``h*``. A hook on that step's output
replaces the incoming gradient ``g = dL/dh*`` by the solution ``z`` of
``(I - J^T) z = g`` (the chosen backward method of :mod:`rbp_core`, with VJPs
from autograd through the stored step), so autograd then delivers
``z^T dF/dw`` to every tensor that ``f`` uses: the implicit gradient, in memory
that grows neither with the forward iterations nor with the backward steps.

:class:`BPTT` and :class:`TBPTT` are the baselines of the paper: back-propagation
through every forward update, or through the last ``K`` only.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, cast

import torch

from rbp_core import BackwardMethod, ContractionViolation, ConvergenceError, FixedPointIteration, Solution, Status

__all__ = [
    "BPTT",
    "TBPTT",
    "BackwardFailureWarning",
    "FixedPoint",
    "FixedPointInfo",
    "fixed_point",
]

State: TypeAlias = torch.Tensor | tuple[torch.Tensor, ...]
OnFailure: TypeAlias = Literal["warn", "raise", "ignore"]
JVPMode: TypeAlias = Literal["forward", "double-backward"]


@dataclass(frozen=True)
class BPTT:
    """Back-propagation through every forward iteration: the exact derivative of the unrolled
    loop, with memory that grows with the number of iterations. The baseline of the paper.

    Examples
    --------
    >>> from rbp_core.backends.torch import BPTT
    >>> BPTT()
    BPTT()
    """


@dataclass(frozen=True)
class TBPTT:
    """Truncated back-propagation through the last ``steps`` updates.

    The forward iteration runs to its tolerance without a graph; then ``steps``
    more updates run with autograd and the output is the last of them. At an
    exact fixed point ``TBPTT(steps=K + 1)`` gives the gradients of
    ``rbp_core.Neumann(steps=K)``. Memory grows with ``steps``.

    Examples
    --------
    >>> from rbp_core.backends.torch import TBPTT
    >>> TBPTT(steps=20)
    TBPTT(steps=20)
    """

    steps: int

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            msg = f"TBPTT steps must be an integer >= 1, got {self.steps!r}"
            raise ValueError(msg)


Backward: TypeAlias = BackwardMethod | BPTT | TBPTT


class BackwardFailureWarning(RuntimeWarning):
    """The implicit backward solve did not converge; the gradient may be inaccurate."""


@dataclass
class FixedPointInfo:
    """What happened in the forward solve and in each backward pass through its output.

    Attributes
    ----------
    forward : Solution
        The forward solve (``value`` is ``h*`` packed into one flat tensor for tuple states).
    method : str
        The backward method's name.
    backward : list of Solution
        One Solution per backward pass through the output (RBP methods only;
        BPTT and TBPTT solve nothing). Their ``value`` is None: the adjoint
        ``z`` goes on to autograd and is not kept, so repeated backward passes
        do not pile up state-sized arrays here.
    """

    forward: Solution
    method: str
    backward: list[Solution] = field(default_factory=list)

    @property
    def backward_converged(self) -> bool | None:
        """Whether the last backward solve converged; None before any backward pass."""
        return self.backward[-1].converged if self.backward else None


# --- states: one tensor, or a tuple of tensors packed into one flat vector ----------------------
class _Packing:
    """Pack a tuple state into one flat tensor (views back on unpack); a single tensor passes."""

    def __init__(self, state: State) -> None:
        self.is_tuple = isinstance(state, tuple)
        parts = state if isinstance(state, tuple) else (state,)
        if not parts or not all(isinstance(p, torch.Tensor) for p in parts):
            msg = f"the state must be a tensor or a non-empty tuple of tensors, got {type(state).__name__}"
            raise TypeError(msg)
        first = parts[0]
        for i, p in enumerate(parts):
            if not p.is_floating_point():
                msg = f"state[{i}] must be a floating tensor, got dtype {p.dtype}"
                raise TypeError(msg)
            if p.dtype != first.dtype or p.device != first.device:
                msg = (
                    f"all parts of a tuple state must share dtype and device; state[{i}] is "
                    f"{p.dtype} on {p.device}, state[0] is {first.dtype} on {first.device}"
                )
                raise TypeError(msg)
        self.shapes = [tuple(p.shape) for p in parts]
        self.sizes = [p.numel() for p in parts]

    def pack(self, state: State, name: str) -> torch.Tensor:
        if not self.is_tuple:
            if not isinstance(state, torch.Tensor):
                msg = f"{name} returned a {type(state).__name__}; expected a tensor like the state"
                raise TypeError(msg)
            return state
        if not isinstance(state, tuple) or len(state) != len(self.shapes):
            msg = (
                f"{name} returned {type(state).__name__}; expected a tuple of {len(self.shapes)} tensors like the state"
            )
            raise TypeError(msg)
        for i, (p, shape) in enumerate(zip(state, self.shapes, strict=True)):
            if tuple(p.shape) != shape:
                msg = f"{name} returned state[{i}] of shape {tuple(p.shape)}; expected {shape}"
                raise ValueError(msg)
        return torch.cat([p.reshape(-1) for p in state])

    def unpack(self, flat: torch.Tensor) -> State:
        if not self.is_tuple:
            return flat
        parts = torch.split(flat, self.sizes)
        return tuple(p.reshape(s) for p, s in zip(parts, self.shapes, strict=True))


# --- the public entry point ---------------------------------------------------------------------
def fixed_point(
    f: Callable[[Any], Any],
    h0: State,
    *,
    backward: Backward,
    forward: FixedPointIteration | None = None,
    contraction: float | None = None,
    jvp: JVPMode = "double-backward",
    on_backward_failure: OnFailure = "warn",
    throw: bool = True,
) -> tuple[State, FixedPointInfo]:
    """Fixed point ``h* = f(h*)`` whose gradients come from ``backward``.

    Parameters
    ----------
    f : callable
        ``h -> F(x, w, h)``: any function of the state that closes over tensors
        (inputs, ``nn.Module`` parameters). It must return a state of the same
        structure, shapes and dtype.
    h0 : Tensor or tuple of Tensor
        Starting point; batch axes are part of the state (the stopping test and
        inner products run over all elements). Never modified; gradients do not
        flow into it.
    backward : BackwardMethod, BPTT or TBPTT
        :class:`rbp_core.Neumann`, :class:`rbp_core.OriginalRBP`,
        :class:`rbp_core.CGRBP` (implicit, constant memory), or the baselines
        :class:`BPTT` and :class:`TBPTT`.
    forward : FixedPointIteration, optional
        Settings of the forward solve (tolerance, budget, damping).
    contraction : float, optional
        A Lipschitz bound ``mu < 1`` of ``f``; certifies the forward and
        backward solves (``info.forward.error_bound``, ``info.backward[i].error_bound``).
    jvp : {"double-backward", "forward"}
        How CG-RBP gets ``J v``. ``"double-backward"`` (default): the graph of
        ``J^T u`` is recorded once per backward pass and each product is one
        reverse pass through it (needs double-backward support of the ops in
        ``f``). ``"forward"``: forward-mode AD, ``torch.func.jvp``, one
        forward-mode evaluation of ``f`` per product (needs forward-AD
        support). benchmarks/bench_torch.py measured the forward mode at about
        5 evaluations of ``f`` per product on a tanh RNN, twice the cost of the
        double-backward products there.
    on_backward_failure : {"warn", "raise", "ignore"}
        What a backward solve that ends without converging (``MAX_STEPS``,
        ``DIVERGED``, ``BREAKDOWN``) does: warn with
        :class:`BackwardFailureWarning` naming the method, the residual and
        the tolerance (default), raise :class:`rbp_core.ConvergenceError`, or
        nothing. The same choice applies to a ``contraction`` that the backward
        iteration disproves (warn, raise :class:`rbp_core.ContractionViolation`,
        or only ``error_bound=None``). Non-finite values always raise.
    throw : bool
        Raise :class:`rbp_core.ConvergenceError` when the forward solve fails
        (default). With False a forward solve that reached its budget goes on
        from its last iterate, and ``info.forward`` says so.

    Returns
    -------
    state : Tensor or tuple of Tensor
        For the RBP methods, ``f(h*)``: one step from the forward solution, the
        step autograd is attached to. For TBPTT, the last of its extra steps;
        for BPTT, the last forward iterate.
    info : FixedPointInfo
        The forward Solution now; each backward pass appends its Solution.

    Examples
    --------
    >>> import torch
    >>> import rbp_core
    >>> from rbp_core.backends.torch import fixed_point
    >>> W = torch.nn.Parameter(0.5 * torch.eye(3, dtype=torch.float64))
    >>> x = torch.ones(3, dtype=torch.float64)
    >>> h, info = fixed_point(lambda h: torch.tanh(W @ h + x), torch.zeros(3, dtype=torch.float64),
    ...                       backward=rbp_core.Neumann(steps=40))
    >>> h.sum().backward()
    >>> info.forward.converged, info.backward_converged, W.grad.shape
    (True, True, torch.Size([3, 3]))
    """
    forward = FixedPointIteration() if forward is None else forward
    if not isinstance(cast("object", forward), FixedPointIteration):
        msg = f"forward must be a rbp_core.FixedPointIteration, got {forward!r}"
        raise TypeError(msg)
    if on_backward_failure not in ("warn", "raise", "ignore"):
        msg = f"on_backward_failure must be 'warn', 'raise' or 'ignore', got {on_backward_failure!r}"
        raise ValueError(msg)
    if jvp not in ("forward", "double-backward"):
        msg = f"jvp must be 'forward' or 'double-backward', got {jvp!r}"
        raise ValueError(msg)
    is_baseline = isinstance(backward, BPTT | TBPTT)
    if not is_baseline and not isinstance(backward, BackwardMethod):
        msg = (
            "backward must be rbp_core.Neumann, rbp_core.OriginalRBP, rbp_core.CGRBP (or another "
            f"rbp_core.BackwardMethod), or rbp_core.backends.torch.BPTT / TBPTT; got {backward!r}"
        )
        raise TypeError(msg)
    packing = _Packing(h0)
    start = packing.pack(h0, "h0").detach()

    def f_flat(h: torch.Tensor) -> torch.Tensor:
        return packing.pack(f(packing.unpack(h)), "f")

    name = type(backward).__name__
    if isinstance(backward, BPTT) and torch.is_grad_enabled():
        return _bptt(f_flat, start, forward, contraction, throw, packing, name)

    with torch.no_grad():
        sol = forward.solve(f_flat, start, contraction=contraction, throw=throw)
    info = FixedPointInfo(forward=sol, method=name)
    h_star = sol.value.detach()
    if not torch.is_grad_enabled():
        return packing.unpack(f_flat(h_star)), info

    if isinstance(backward, TBPTT):
        h = h_star
        beta = forward.damping
        for _ in range(backward.steps):
            h = f_flat(h) if beta == 1.0 else (1.0 - beta) * h + beta * f_flat(h)
        _require_grad(h, name)
        return packing.unpack(h), info

    method = cast("BackwardMethod", backward)  # BPTT returned above, in both grad modes
    # The returned step is a function of the parameters only (h* carries no grad): a user's
    # loss.backward() then computes no gradient with respect to the state, which the hook's
    # solve does instead. The hook holds h* and f, not y: no reference cycle keeps y's graph.
    y = f_flat(h_star)
    _require_grad(y, name)
    hook = _ImplicitHook(h_star, f_flat, method, info, contraction, jvp, on_backward_failure)
    y.register_hook(hook)  # type: ignore[no-untyped-call]
    return packing.unpack(y), info


def _bptt(
    f_flat: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    forward: FixedPointIteration,
    contraction: float | None,
    throw: bool,
    packing: _Packing,
    name: str,
) -> tuple[State, FixedPointInfo]:
    """Every update in the graph; the core iteration sees detached mirrors of the iterates.

    The core's stopping test (norms, ``float`` conversions) then never touches the graph,
    while each update ``h <- (1 - beta) h + beta f(h)`` is recorded here with autograd.
    """
    beta = forward.damping
    chain = [start]  # the graph iterates h_0, h_1, ...

    def step(_mirror: torch.Tensor) -> torch.Tensor:  # the core's detached copy of chain[-1]
        h = chain[-1]
        fh = f_flat(h)
        chain.append(fh if beta == 1.0 else (1.0 - beta) * h + beta * fh)
        return fh.detach()

    sol = forward.solve(step, start, contraction=contraction, throw=throw)
    # The core accepted every update but a non-finite last one (whose value it discards).
    h_out = chain[sol.num_vjp - 1] if sol.status is Status.NONFINITE else chain[-1]
    _require_grad(h_out, name)
    return packing.unpack(h_out), FixedPointInfo(forward=sol, method=name)


def _require_grad(out: torch.Tensor, name: str) -> None:
    """A fixed point that carries no gradient under grad mode is an error, not a silent zero."""
    if not out.requires_grad:
        msg = (
            f"fixed_point(backward={name}): no tensor that f uses requires grad, so the fixed point "
            "would carry no gradient. Make the parameters or inputs of f require grad, or call it "
            "under torch.no_grad() for inference."
        )
        raise ValueError(msg)


class _ImplicitHook:
    """The gradient hook on ``y = f(h*)``: replaces ``g`` by ``z`` with ``(I - J^T) z = g``.

    Each backward pass records one step ``out = f(h_in)`` with ``h_in = h*`` requiring grad,
    takes the solver's VJPs (and JVPs) through it, and drops it: the state's graph exists only
    while the backward solve runs.
    """

    def __init__(
        self,
        h_star: torch.Tensor,
        f_flat: Callable[[torch.Tensor], torch.Tensor],
        method: BackwardMethod,
        info: FixedPointInfo,
        contraction: float | None,
        jvp_mode: JVPMode,
        on_failure: OnFailure,
    ) -> None:
        self.h_star = h_star
        self.f_flat = f_flat
        self.method = method
        self.info = info
        self.contraction = contraction
        self.jvp_mode = jvp_mode
        self.on_failure = on_failure

    def _callbacks(
        self,
    ) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor] | None]:
        """``vjp`` and, for methods that need it, ``jvp`` through one recorded step at ``h*``."""
        with torch.enable_grad():
            h_in = self.h_star.detach().requires_grad_()
            out = self.f_flat(h_in)

        def vjp(v: torch.Tensor) -> torch.Tensor:
            (grad,) = torch.autograd.grad(out, h_in, v, retain_graph=True)
            return grad

        if not self.method.needs_jvp:
            return vjp, None
        if self.jvp_mode == "forward":

            def jvp(v: torch.Tensor) -> torch.Tensor:
                result = torch.func.jvp(self.f_flat, (self.h_star,), (v,))
                tangent: torch.Tensor = result[1]
                return tangent.detach()

            return vjp, jvp
        # Double backward: J^T u is linear in u, so the gradient of <J^T u, v> with respect to u is
        # J v. The graph of J^T u is recorded once per backward pass and differentiated per product.
        with torch.enable_grad():
            u = torch.zeros_like(self.h_star, requires_grad=True)
            (jtu,) = torch.autograd.grad(out, h_in, u, retain_graph=True, create_graph=True)

        def jvp_double_backward(v: torch.Tensor) -> torch.Tensor:
            (jv,) = torch.autograd.grad(jtu, u, v, retain_graph=True)
            return jv

        return vjp, jvp_double_backward

    def __call__(self, g: torch.Tensor | None) -> torch.Tensor | None:
        if g is None:  # an undefined gradient (all zeros) stays undefined
            return None
        name = type(self.method).__name__
        if torch.is_grad_enabled():
            msg = (
                f"second-order gradients through the implicit backward ({name}) are not supported: "
                "the backward solve is not differentiable. Use BPTT or TBPTT for higher-order derivatives."
            )
            raise RuntimeError(msg)
        vjp, jvp = self._callbacks()
        solution = self.method.solve(vjp, g.detach(), jvp=jvp, contraction=self.contraction, throw=False)
        # The record keeps everything but z, which autograd takes over: repeated backward passes
        # through one output must not pile up state-sized arrays in info.
        self.info.backward.append(dataclasses.replace(solution, value=None))
        if solution.status is Status.NONFINITE:
            where = "the incoming gradient dL/dh*" if not math.isfinite(_norm(g)) else "the backward iteration"
            msg = f"{name}: non-finite values (NaN or Inf) in {where}; {solution.describe()}"
            raise FloatingPointError(msg)
        if not solution.converged and self.on_failure != "ignore":
            if self.on_failure == "raise":
                raise ConvergenceError(solution)
            warnings.warn(
                f"backward solve {name} did not converge: {solution.describe()}; the gradient is inexact",
                BackwardFailureWarning,
                stacklevel=2,
            )
        if self.contraction is not None and solution.converged and solution.error_bound is None:
            msg = (
                f"backward solve {name}: contraction={self.contraction!r} was disproved by the iteration; "
                "no error bound is certified"
            )
            if self.on_failure == "raise":
                raise ContractionViolation(msg)
            if self.on_failure == "warn":
                warnings.warn(msg, BackwardFailureWarning, stacklevel=2)
        return cast("torch.Tensor", solution.value)


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.detach()))


# --- the module ---------------------------------------------------------------------------------
class FixedPoint(torch.nn.Module):
    """A deep-equilibrium layer: ``forward(x, h0)`` returns the fixed point of ``h -> cell(h, x)``.

    Parameters
    ----------
    cell : nn.Module
        Called as ``cell(h, *inputs)``; its parameters are registered with this module.
    backward : BackwardMethod, BPTT or TBPTT
        As in :func:`fixed_point`.
    forward_solver : FixedPointIteration, optional
        As ``forward`` in :func:`fixed_point`.
    contraction, jvp, on_backward_failure, throw
        As in :func:`fixed_point`.

    Attributes
    ----------
    info : FixedPointInfo or None
        The info of the last call.

    Examples
    --------
    >>> import torch
    >>> import rbp_core
    >>> from rbp_core.backends.torch import FixedPoint
    >>> class Cell(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = torch.nn.Linear(4, 4)
    ...         torch.nn.init.normal_(self.lin.weight, std=0.1)
    ...     def forward(self, h, x):
    ...         return torch.tanh(self.lin(h) + x)
    >>> layer = FixedPoint(Cell(), backward=rbp_core.Neumann(steps=30))
    >>> h = layer(torch.ones(2, 4), torch.zeros(2, 4))
    >>> h.sum().backward()
    >>> layer.info.backward_converged
    True
    """

    def __init__(
        self,
        cell: torch.nn.Module,
        *,
        backward: Backward,
        forward_solver: FixedPointIteration | None = None,
        contraction: float | None = None,
        jvp: JVPMode = "double-backward",
        on_backward_failure: OnFailure = "warn",
        throw: bool = True,
    ) -> None:
        super().__init__()
        self.cell = cell
        self.backward_method = backward
        self.forward_solver = forward_solver
        self.contraction = contraction
        self.jvp = jvp
        self.on_backward_failure = on_backward_failure
        self.throw = throw
        self.info: FixedPointInfo | None = None

    def forward(self, x: Any, h0: State, *extra: Any) -> State:
        """The fixed point of ``h -> cell(h, x, *extra)`` from ``h0``; its info goes to ``self.info``."""
        inputs: Sequence[Any] = (x, *extra)
        h, info = fixed_point(
            lambda h: self.cell(h, *inputs),
            h0,
            backward=self.backward_method,
            forward=self.forward_solver,
            contraction=self.contraction,
            jvp=self.jvp,
            on_backward_failure=self.on_backward_failure,
            throw=self.throw,
        )
        self.info = info
        return h

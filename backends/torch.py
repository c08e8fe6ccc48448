"""PyTorch adapter: fixed points whose gradients come from RBP, CG-RBP or Neumann-RBP.

:func:`fixed_point` finds ``h* = f(h*)`` without an autograd graph and records
one extra step ``y = f(h*)`` with autograd, the state requiring grad, at forward
time. A hook on that step's output replaces the incoming gradient ``g = dL/dh*``
by the solution ``z`` of ``(I - J^T) z = g`` (the chosen backward method of
:mod:`rbp_core`, with VJPs from autograd through that same recorded step), so
autograd then delivers ``z^T dF/dw`` to every tensor that ``f`` uses: the
implicit gradient of the map exactly as it was evaluated in the forward pass, in
memory that grows neither with the forward iterations nor with the backward steps.

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
from rbp_core._arrays import check_contraction, check_int
from rbp_core._implicit import check_instance

__all__ = [
    "BPTT",
    "TBPTT",
    "BackwardFailureWarning",
    "FixedPoint",
    "FixedPointInfo",
    "fixed_point",
]

State: TypeAlias = torch.Tensor | tuple[torch.Tensor, ...]
OnFailure: TypeAlias = Literal["skip", "raise", "warn", "ignore"]
_POLICIES = ("skip", "raise", "warn", "ignore")
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
        check_int(self.steps, "TBPTT steps", 1)


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
        self.dtype, self.device = first.dtype, first.device

    def pack(self, state: State, name: str) -> torch.Tensor:
        """``state`` (``f``'s output) as one flat tensor, each part checked like the state's own.

        A part of another shape, dtype or device, or not a tensor at all, is refused naming ``name``
        and the part: ``torch.cat`` would promote a float32 part of a float64 state silently.
        """
        if not self.is_tuple:
            self._check_part(state, 0, name, "")
            return cast("torch.Tensor", state)
        if not isinstance(state, tuple) or len(state) != len(self.shapes):
            msg = (
                f"{name} returned {type(state).__name__}; expected a tuple of {len(self.shapes)} tensors like the state"
            )
            raise TypeError(msg)
        for i, p in enumerate(state):
            self._check_part(p, i, name, f"state[{i}]")
        return torch.cat([p.reshape(-1) for p in state])

    def _check_part(self, part: object, i: int, name: str, label: str) -> None:
        shape, what = self.shapes[i], label or "an array"
        if not isinstance(part, torch.Tensor):
            msg = f"{name} returned {label or 'a'} {type(part).__name__}; expected a tensor of shape {shape} like the state"
            raise TypeError(msg)
        if tuple(part.shape) != shape:
            msg = (
                f"{name} returned {what} of shape {tuple(part.shape)}; expected shape {shape} (the shape of the state)"
            )
            raise ValueError(msg)
        if part.dtype != self.dtype or part.device != self.device:
            got = f"{label} of dtype" if label else "dtype"
            msg = (
                f"{name} returned {got} {part.dtype} on {part.device}; expected {self.dtype} on "
                f"{self.device} (the dtype and device of the state)"
            )
            raise TypeError(msg)

    def unpack(self, flat: torch.Tensor) -> State:
        if not self.is_tuple:
            return flat
        parts = torch.split(flat, self.sizes)
        return tuple(p.reshape(s) for p, s in zip(parts, self.shapes, strict=True))


# --- the public entry point ---------------------------------------------------------------------
def _check_options(
    backward: object, forward: object, contraction: object, jvp: object, on_backward_failure: object
) -> FixedPointIteration:
    """Validate the options of :func:`fixed_point` and :class:`FixedPoint`; return the forward solver."""
    check_instance(backward, "backward")
    check_instance(forward, "forward")
    forward = FixedPointIteration() if forward is None else forward
    if not isinstance(forward, FixedPointIteration):
        msg = f"forward must be a rbp_core.FixedPointIteration, got {forward!r}"
        raise TypeError(msg)
    check_contraction(contraction)
    if on_backward_failure not in _POLICIES:
        msg = f"on_backward_failure must be one of {', '.join(map(repr, _POLICIES))}, got {on_backward_failure!r}"
        raise ValueError(msg)
    if jvp not in ("forward", "double-backward"):
        msg = f"jvp must be 'forward' or 'double-backward', got {jvp!r}"
        raise ValueError(msg)
    if not isinstance(backward, BPTT | TBPTT | BackwardMethod):
        msg = (
            "backward must be rbp_core.Neumann, rbp_core.OriginalRBP, rbp_core.CGRBP (or another "
            f"rbp_core.BackwardMethod), or rbp_core.backends.torch.BPTT / TBPTT; got {backward!r}"
        )
        raise TypeError(msg)
    return forward


def _refuse_functorch(name: str) -> None:
    """The implicit backward is an autograd hook, which torch.func's transforms do not run: refuse loudly."""
    if torch._C._functorch.peek_interpreter_stack() is not None:  # inside torch.func.grad, vjp, vmap, ...
        msg = (
            f"fixed_point(backward={name}) cannot run inside a torch.func transform (grad, vjp, jacrev, "
            "vmap, ...): its implicit backward is an autograd hook on the recorded step, which those "
            "transforms do not call. Use torch.autograd.grad or loss.backward() outside torch.func, or "
            "backward=BPTT() or TBPTT(steps=K), which run under torch.func."
        )
        raise RuntimeError(msg)


def fixed_point(
    f: Callable[[Any], Any],
    h0: State,
    *,
    backward: Backward,
    forward: FixedPointIteration | None = None,
    contraction: float | None = None,
    jvp: JVPMode = "double-backward",
    on_backward_failure: OnFailure = "skip",
    throw: bool = True,
) -> tuple[State, FixedPointInfo]:
    """Fixed point ``h* = f(h*)`` whose gradients come from ``backward``.

    Parameters
    ----------
    f : callable
        ``h -> F(x, w, h)``: any function of the state that closes over tensors
        (inputs, ``nn.Module`` parameters). It must return a state of the same
        structure, shapes, dtype and device. For the RBP methods it is
        differentiated as it was evaluated here, at the call: the step ``f(h*)``
        is recorded with autograd now, so inputs that change before
        ``backward()`` (a loop variable the closure reads, a buffer refilled in
        place) change nothing, or raise torch's in-place-modification error.
    h0 : Tensor or tuple of Tensor
        Starting point; batch axes are part of the state (the stopping test and
        inner products run over all elements). Never modified; gradients do not
        flow into it. An empty state (no elements) is its own fixed point.
    backward : BackwardMethod, BPTT or TBPTT
        An instance: :class:`rbp_core.Neumann`, :class:`rbp_core.OriginalRBP`,
        :class:`rbp_core.CGRBP` (implicit, constant memory), or the baselines
        :class:`BPTT` and :class:`TBPTT`.
    forward : FixedPointIteration, optional
        Settings of the forward solve (tolerance, budget, damping).
    contraction : float, optional
        A Lipschitz bound ``mu < 1`` of ``f``; certifies the forward and
        backward solves (``info.forward.error_bound``, ``info.backward[i].error_bound``).
    jvp : {"double-backward", "forward"}
        How CG-RBP gets ``J v``. ``"double-backward"`` (default): the graph of
        ``J^T u`` is recorded once per backward pass through the recorded step
        and each product is one reverse pass through it (needs double-backward
        support of the ops in ``f``). ``"forward"``: forward-mode AD,
        ``torch.func.jvp``, one forward-mode evaluation of ``f`` per product
        (needs forward-AD support); since that re-evaluates ``f`` at backward
        time, each product checks that ``f(h*)`` still equals the recorded step
        and raises if not (an input changed, or ``f`` is random). benchmarks/bench_torch.py
        measured the forward mode at about 5 evaluations of ``f`` per product on
        a tanh RNN, twice the cost of the double-backward products there.
    on_backward_failure : {"skip", "raise", "warn", "ignore"}
        What a backward solve that does not converge (``MAX_STEPS``,
        ``DIVERGED``, ``BREAKDOWN``, ``NONFINITE``) does to the gradient.
        ``"skip"`` (default): this fixed point contributes nothing (a zero
        cotangent) and a :class:`BackwardFailureWarning` says so, with the
        solve's outcome; ``"raise"``: :class:`rbp_core.ConvergenceError`;
        ``"warn"``: the unconverged adjoint is applied, with a warning;
        ``"ignore"``: applied silently (read ``info.backward`` yourself). A
        non-finite adjoint is never applied: under ``"warn"`` and ``"ignore"``
        it raises ``FloatingPointError``. A ``contraction`` that the backward
        iteration disproves warns (``"skip"``, ``"warn"``), raises
        :class:`rbp_core.ContractionViolation` (``"raise"``), or only sets
        ``error_bound=None``. A non-finite incoming gradient always raises.
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
    forward = _check_options(backward, forward, contraction, jvp, on_backward_failure)
    packing = _Packing(h0)
    start = packing.pack(h0, "h0").detach()

    def f_flat(h: torch.Tensor) -> torch.Tensor:
        return packing.pack(f(packing.unpack(h)), "f")

    name = type(backward).__name__
    if isinstance(backward, BPTT) and torch.is_grad_enabled():
        return _bptt(f_flat, start, forward, contraction, throw, packing, name)
    if not isinstance(backward, TBPTT) and torch.is_grad_enabled():
        _refuse_functorch(name)  # before the forward solve, which would be wasted

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
        _require_grad(h.requires_grad, name)
        return packing.unpack(h), info

    method = cast("BackwardMethod", backward)  # BPTT returned above, in both grad modes
    # The one recorded step, now: the hook's VJPs and the parameters' gradient both go through
    # it, so the backward differentiates f as it was evaluated here. The returned y is a view of
    # the step's output: the hook on y holds the output, and no reference cycle keeps its graph.
    h_in = h_star.detach().requires_grad_()
    out = f_flat(h_in)
    _require_grad(_has_other_leaves(out, h_in), name)
    # autograd computes the state's gradient of the recorded step too (it is on the graph): drop it.
    h_in.register_post_accumulate_grad_hook(_drop_grad)
    y = out.view_as(out)
    y.register_hook(_ImplicitHook(h_in, out, f_flat, method, info, contraction, jvp, on_backward_failure))  # type: ignore[no-untyped-call]
    return packing.unpack(y), info


def _drop_grad(t: torch.Tensor) -> None:
    t.grad = None


def _has_other_leaves(out: torch.Tensor, leaf: torch.Tensor) -> bool:
    """Whether ``out``'s graph reaches a tensor that requires grad other than ``leaf``."""
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf
        if variable is not None:
            if variable is not leaf:
                return True
            continue
        stack.extend(n for n, _ in node.next_functions)
    return False


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
    if len(chain) == 1 and start.numel() == 0:  # an empty state is its own fixed point: record one step
        step(start)
    # The core accepted every update but a non-finite last one (whose value it discards).
    h_out = chain[sol.num_vjp - 1] if sol.status is Status.NONFINITE else chain[-1]
    _require_grad(h_out.requires_grad, name)
    return packing.unpack(h_out), FixedPointInfo(forward=sol, method=name)


def _require_grad(carries_grad: bool, name: str) -> None:
    """A fixed point that carries no gradient under grad mode is an error, not a silent zero."""
    if not carries_grad:
        msg = (
            f"fixed_point(backward={name}): no tensor that f uses requires grad, so the fixed point "
            "would carry no gradient. Make the parameters or inputs of f require grad, or call it "
            "under torch.no_grad() for inference."
        )
        raise ValueError(msg)


class _ImplicitHook:
    """The gradient hook on ``y = f(h*)``: replaces ``g`` by ``z`` with ``(I - J^T) z = g``.

    ``out = f(h_in)`` is the step recorded at forward time with ``h_in = h*`` requiring grad; the
    solver's VJPs (and JVPs) are reverse passes through it, with the graph retained for the
    parameters' pass that autograd runs next.
    """

    def __init__(
        self,
        h_in: torch.Tensor,
        out: torch.Tensor,
        f_flat: Callable[[torch.Tensor], torch.Tensor],
        method: BackwardMethod,
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
                "jvp='forward' re-evaluates f at backward time, and f(h*) no longer equals the step "
                "recorded in the forward pass (an input of f changed since, or f is random): its JVP "
                "would belong to another map. Use jvp='double-backward', which differentiates the recorded step."
            )
            raise RuntimeError(msg)
        return cast("torch.Tensor", tangent).detach()

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
        solution = self.method.solve(self._vjp, g.detach(), jvp=self._jvp(), contraction=self.contraction, throw=False)
        # The record keeps everything but z, which autograd takes over: repeated backward passes
        # through one output must not pile up state-sized arrays in info.
        self.info.backward.append(dataclasses.replace(solution, value=None))
        if solution.status is Status.NONFINITE and not math.isfinite(_norm(g)):
            msg = f"{name}: non-finite values (NaN or Inf) in the incoming gradient dL/dh*; {solution.describe()}"
            raise FloatingPointError(msg)
        if not solution.converged:
            return self._failed(solution, name, g)
        if self.contraction is not None and solution.error_bound is None:
            msg = (
                f"backward solve {name}: contraction={self.contraction!r} was disproved by the iteration; "
                "no error bound is certified"
            )
            if self.on_failure == "raise":
                raise ContractionViolation(msg)
            if self.on_failure != "ignore":
                warnings.warn(msg, BackwardFailureWarning, stacklevel=2)
        return cast("torch.Tensor", solution.value)

    def _failed(self, solution: Solution, name: str, g: torch.Tensor) -> torch.Tensor:
        """The cotangent that a failed solve hands to autograd, as ``on_backward_failure`` says."""
        if self.on_failure == "raise":
            raise ConvergenceError(solution)
        if self.on_failure == "skip":
            warnings.warn(
                f"backward solve {name} did not converge: {solution.describe()}. This fixed point's "
                "gradient was skipped (a zero cotangent); on_backward_failure='warn' applies the "
                "unconverged adjoint instead, 'raise' stops",
                BackwardFailureWarning,
                stacklevel=3,
            )
            return torch.zeros_like(g)
        if solution.status is Status.NONFINITE:
            msg = f"{name}: non-finite values (NaN or Inf) in the backward iteration; {solution.describe()}"
            raise FloatingPointError(msg)
        if self.on_failure == "warn":
            warnings.warn(
                f"backward solve {name} did not converge: {solution.describe()}; the gradient is inexact",
                BackwardFailureWarning,
                stacklevel=3,
            )
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
        on_backward_failure: OnFailure = "skip",
        throw: bool = True,
    ) -> None:
        super().__init__()
        # Checked at construction, as torch's own layers check their arguments.
        _check_options(backward, forward_solver, contraction, jvp, on_backward_failure)
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

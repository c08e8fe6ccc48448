r"""PyTorch adapter: fixed points whose gradients come from RBP, CG-RBP or Neumann-RBP.

:func:`fixed_point` finds :math:`h^* = f(h^*)` without an autograd graph and records
one extra step :math:`y = f(h^*)` with autograd, the state requiring grad, at forward
time. A hook on that step's output replaces the incoming gradient :math:`g = \partial L / \partial h^*`
by the solution :math:`z` of :math:`(I - J^T) z = g` (the chosen backward method of
:mod:`rbp_core`, with VJPs from autograd through that same recorded step), so
autograd then delivers :math:`z^T \partial F / \partial w` to every tensor that ``f`` uses: the
implicit gradient of the map exactly as it was evaluated in the forward pass, in
memory that grows neither with the forward iterations nor with the backward steps.

:class:`BPTT` and :class:`TBPTT` are the baselines of the paper: back-propagation
through every forward update, or through the last :math:`K` only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, TypeVar, cast

import array_api_compat
import torch

import rbp_core
from rbp_core import AdjointMethod, BackwardFailureWarning, ForwardSolver, Solution
from rbp_core._adjoint import OnFailure, check_policy
from rbp_core._checks import check_contraction, check_instance, check_int
from rbp_core._forward import check_solver
from rbp_core._ops import ops_for
from rbp_core._samples import check_takes_indices

from ._torch_hook import _ActiveSamples, _drop_grad, _ImplicitHook
from ._torch_state import State, _Gather, _has_other_leaves, _Packing
from ._torch_training import JFB, PhantomGradient, WarmStart, _Adjoints, jacobian_penalty

# The public names defined in the private modules belong to this one (their repr, pickling and docs).
for _public in (JFB, PhantomGradient, WarmStart, jacobian_penalty):
    _public.__module__ = __name__

__all__ = [
    "BPTT",
    "JFB",
    "TBPTT",
    "BackwardFailureWarning",
    "FixedPoint",
    "FixedPointInfo",
    "PhantomGradient",
    "WarmStart",
    "fixed_point",
    "jacobian_penalty",
]

JVPMode: TypeAlias = Literal["forward", "double-backward"]


@dataclass(frozen=True)
class BPTT:
    """Back-propagation through every forward iteration, the baseline of the paper.

    The forward solver's own ``step`` runs under autograd, so this is the exact
    derivative of the unrolled loop, with memory that grows with the number of
    iterations. A solver whose step is not differentiable
    (``differentiable_step=False``) is refused by name.

    Examples
    --------
    >>> from rbp_core.backends.torch import BPTT
    >>> BPTT()
    BPTT()
    """


@dataclass(frozen=True)
class TBPTT:
    """Truncated back-propagation through the last ``steps`` updates.

    The forward solve runs to its tolerance without a graph; then ``steps``
    more steps of the forward solver run with autograd from :math:`h^*` and the
    output is the last of them. At an
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


Backward: TypeAlias = AdjointMethod | BPTT | TBPTT | PhantomGradient | JFB


@dataclass
class FixedPointInfo:
    """What happened in the forward solve and in each backward pass through its output.

    Attributes
    ----------
    forward : Solution
        The forward solve (``value`` is :math:`h^*` packed into one flat tensor for tuple states).
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


# --- the public entry point ---------------------------------------------------------------------
def _check_options(
    backward: object, solver: object, contraction: object, jvp_mode: object, on_backward_failure: object
) -> ForwardSolver:
    """Validate the options of :func:`fixed_point` and :class:`FixedPoint`; return the forward solver."""
    check_instance(backward, "backward")
    solver = check_solver(solver)
    check_contraction(contraction)
    check_policy(on_backward_failure, "on_backward_failure")
    if jvp_mode not in ("forward", "double-backward"):
        msg = f"jvp_mode must be 'forward' or 'double-backward', got {jvp_mode!r}"
        raise ValueError(msg)
    if not isinstance(backward, BPTT | TBPTT | PhantomGradient | JFB | AdjointMethod):
        msg = (
            "backward must be rbp_core.Neumann, rbp_core.OriginalRBP, rbp_core.CGRBP (or another "
            "rbp_core.AdjointMethod), or rbp_core.backends.torch.BPTT / TBPTT / JFB / PhantomGradient; "
            f"got {backward!r}"
        )
        raise TypeError(msg)
    if isinstance(backward, BPTT | TBPTT) and not solver.differentiable_step:
        msg = (
            f"backward={type(backward).__name__}() unrolls the forward solver's step under autograd, and "
            f"{type(solver).__name__} declares its step not differentiable (differentiable_step=False); "
            "use an implicit backward method such as rbp_core.Neumann(steps=20)"
        )
        raise ValueError(msg)
    return solver


class _TorchOps(rbp_core.VectorOps):
    """The core's operations for torch tensors, with the monitored norms off the autograd graph.

    BPTT runs the forward solver's steps under autograd; the squared norms the driver monitors
    need no gradient, so they are taken of detached tensors (no graph nodes, no warning when they
    become Python floats).
    """

    def sqnorm(self, x: torch.Tensor) -> torch.Tensor:
        return cast("torch.Tensor", super().sqnorm(x.detach()))

    def exact_norm(self, s: float, x: torch.Tensor, minus: torch.Tensor | None = None) -> float:
        return super().exact_norm(s, x.detach(), None if minus is None else minus.detach())

    # One kernel where the generic code takes two (float32, n = 16384: 2-5 us saved each, a tenth
    # of Anderson's time per step outside the calls of f).
    def axpy(self, alpha: torch.Tensor | float, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if isinstance(alpha, float):
            return torch.add(y, x, alpha=alpha)
        return cast("torch.Tensor", super().axpy(alpha, x, y))

    def add_combination(self, x: torch.Tensor, coefficients: Sequence[float], rows: torch.Tensor) -> torch.Tensor:
        c = torch.tensor(coefficients, dtype=rows.dtype, device=rows.device)
        return torch.addmv(x, rows.T, c)

    def write_difference(
        self, buffer: torch.Tensor, index: tuple[int, ...], a: torch.Tensor, b: torch.Tensor
    ) -> torch.Tensor:
        if a.requires_grad or b.requires_grad:  # out= does not record a graph
            return cast("torch.Tensor", super().write_difference(buffer, index, a, b))
        torch.sub(a, b, out=buffer[index])
        return buffer


rbp_core.register_ops(array_api_compat.is_torch_namespace, _TorchOps)


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


_F = TypeVar("_F", bound=Callable[..., Any])


def _eager(fn: _F) -> _F:
    """``fn`` run eagerly under ``torch.compile`` (``torch.compiler.disable``).

    A solve is a host loop with one transfer per iteration and a gradient hook, which tracing would
    split into graph breaks and recompilations (23 s for a small model here, against 2 s) without
    changing a number; the code around the layer is still compiled.
    """
    return cast("_F", torch.compiler.disable(fn))  # type: ignore[no-untyped-call]


@_eager
def fixed_point(
    f: Callable[..., Any],
    h0: State,
    *,
    backward: Backward,
    solver: ForwardSolver | None = None,
    contraction: float | None = None,
    jvp_mode: JVPMode = "double-backward",
    on_backward_failure: OnFailure = "skip",
    throw: bool = True,
    batch_axis: int | None = None,
    takes_indices: bool = False,
    _warm: _Adjoints | None = None,
) -> tuple[State, FixedPointInfo]:
    r"""Fixed point :math:`h^* = f(h^*)` whose gradients come from ``backward``.

    Parameters
    ----------
    f : callable
        :math:`h \mapsto F(x, w, h)`: any function of the state that closes over tensors
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
    backward : adjoint method, BPTT or TBPTT
        An instance: :class:`rbp_core.Neumann`, :class:`rbp_core.OriginalRBP`,
        :class:`rbp_core.CGRBP` or any other :class:`rbp_core.AdjointMethod`
        (implicit, constant memory), or the baselines :class:`BPTT` and :class:`TBPTT`.
    solver : forward solver, optional
        The forward solver (default :class:`rbp_core.FixedPointIteration()`):
        tolerances, budget, damping.
    contraction : float, optional
        A Lipschitz bound :math:`\mu < 1` of ``f``; certifies the forward and
        backward solves (``info.forward.error_bound``, ``info.backward[i].error_bound``).
    jvp_mode : {"double-backward", "forward"}
        How CG-RBP gets :math:`J v`. ``"double-backward"`` (default): the graph of
        :math:`J^T u` is recorded once per backward pass through the recorded step
        and each product is one reverse pass through it (needs double-backward
        support of the ops in ``f``). ``"forward"``: forward-mode AD,
        ``torch.func.jvp``, one forward-mode evaluation of ``f`` per product
        (needs forward-AD support); since that re-evaluates ``f`` at backward
        time, each product checks that ``f(h*)`` still equals the recorded step
        and raises if not (an input changed, or ``f`` is random). The benchmark
        page compares the two modes' costs.
    on_backward_failure : {"skip", "raise", "warn", "ignore"}
        What a backward solve that does not converge (``MAX_STEPS``,
        ``DIVERGED``, ``BREAKDOWN``, ``NONFINITE``) does to the gradient: the
        policy of :func:`rbp_core.implicit_backward`. ``"skip"`` (default): this
        fixed point contributes nothing (a zero cotangent) and a
        :class:`rbp_core.BackwardFailureWarning` says so, with the solve's
        outcome; ``"raise"``: :class:`rbp_core.ConvergenceError`; ``"warn"``: the
        unconverged adjoint is applied, with a warning; ``"ignore"``: applied
        silently (read ``info.backward`` yourself). A non-finite adjoint is
        never applied: under ``"warn"`` and ``"ignore"`` it raises
        ``FloatingPointError``. A ``contraction`` that the backward iteration
        disproves warns (``"skip"``, ``"warn"``), raises
        :class:`rbp_core.ContractionViolation` (``"raise"``), or only sets
        ``error_bound=None``. A non-finite incoming gradient always raises.
    throw : bool
        Raise :class:`rbp_core.ConvergenceError` when the forward solve fails
        (default). With False a forward solve that reached its budget goes on
        from its last iterate, and ``info.forward`` says so.
    batch_axis : int, optional
        The axis of every part of the state that indexes independent samples:
        each sample then has its own stopping test, status and error bound in
        the forward and the backward solve (see :func:`rbp_core.fixed_point`),
        and ``on_backward_failure`` applies to the failed samples only (``"skip"``
        zeroes their rows of the adjoint; the others keep their exact
        gradients). Tuple states keep their batch axis. BPTT and TBPTT refuse it.
    takes_indices : bool
        With ``batch_axis``: ``f`` is called as ``f(h, indices)`` with the
        samples still iterating only, so that finished samples leave the work
        (see :func:`rbp_core.fixed_point`). The backward solve's VJPs then run on
        the active samples too: through the recorded step while at least half
        of its samples are active, and through a step re-recorded on the active
        samples (one evaluation of ``f`` on them) once they are at most half of
        the recorded ones. :class:`FixedPoint` does this for its cell itself.

    Returns
    -------
    state : Tensor or tuple of Tensor
        For the RBP methods, :math:`f(h^*)`: one step from the forward solution, the
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
    solver = _check_options(backward, solver, contraction, jvp_mode, on_backward_failure)
    check_takes_indices(takes_indices, batch_axis)
    solver, backward = _autocast_tolerances(h0, solver, backward)
    name = type(backward).__name__
    if batch_axis is not None and isinstance(backward, BPTT | TBPTT):
        msg = (
            f"backward={name}() does not take batch_axis: it unrolls the whole batch's forward steps. Use an "
            "implicit method such as rbp_core.OriginalRBP() per sample, or no batch_axis"
        )
        raise ValueError(msg)
    packing = _Packing(h0, batch_axis)
    start = packing.pack(h0, "h0").detach()
    per_sample: dict[str, Any] = {} if batch_axis is None else {"batch_axis": 0, "takes_indices": takes_indices}
    f_samples: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    if takes_indices:

        def f_samples(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return packing.pack(f(packing.unpack(h), idx), "f")

        every = torch.arange(packing.batch, device=start.device)

        def f_flat(h: torch.Tensor) -> torch.Tensor:
            assert f_samples is not None
            return f_samples(h, every)

    else:

        def f_flat(h: torch.Tensor) -> torch.Tensor:
            return packing.pack(f(packing.unpack(h)), "f")

    if isinstance(backward, BPTT) and torch.is_grad_enabled():
        # The driver runs the solver's own steps under autograd: every step is on the graph.
        sol = rbp_core.fixed_point(f_flat, start, solver, contraction=contraction, throw=throw)
        h_out = f_flat(start) if start.numel() == 0 else sol.value  # an empty state: one recorded step
        _require_grad(h_out.requires_grad, name)
        record = dataclasses.replace(sol, value=sol.value.detach())  # the info holds no graph
        return packing.unpack(h_out), FixedPointInfo(forward=record, method=name)
    if not isinstance(backward, TBPTT | PhantomGradient | JFB) and torch.is_grad_enabled():
        _refuse_functorch(name)  # before the forward solve, which would be wasted

    with torch.no_grad():
        sol = rbp_core.fixed_point(
            f_flat if f_samples is None else f_samples,
            start,
            solver,
            contraction=contraction,
            throw=throw,
            **per_sample,
        )
    info = FixedPointInfo(forward=sol, method=name)
    h_star = sol.value.detach()
    if not torch.is_grad_enabled():
        return packing.unpack(f_flat(h_star)), info

    if isinstance(backward, PhantomGradient | JFB):
        # k damped steps from h*, under autograd: the graph of those steps only.
        h, beta = h_star, backward.damping
        for _ in range(backward.steps):
            h = f_flat(h) if beta == 1.0 else (1.0 - beta) * h + beta * f_flat(h)
        _require_grad(h.requires_grad, name)
        return packing.unpack(h), info

    if isinstance(backward, TBPTT):
        ops = ops_for(rbp_core._callbacks.namespace_of(h_star, "h0"))
        state, h, _ = solver.init(f_flat, h_star, ops)
        for _ in range(backward.steps):
            state, h, _, _ = solver.step(f_flat, state, ops)
        _require_grad(h.requires_grad, name)
        return packing.unpack(h), info

    method = cast("AdjointMethod", backward)  # BPTT returned above, in both grad modes
    # The one recorded step, now: the hook's VJPs and the parameters' gradient both go through
    # it, so the backward differentiates f as it was evaluated here. The returned y is a view of
    # the step's output: the hook on y holds the output, and no reference cycle keeps its graph.
    h_in = h_star.detach().requires_grad_()
    out = f_flat(h_in)
    _require_grad(_has_other_leaves(out, h_in), name)
    # autograd computes the state's gradient of the recorded step too (it is on the graph): drop it.
    h_in.register_post_accumulate_grad_hook(_drop_grad)
    y = out.view_as(out)
    hook = _ImplicitHook(h_in, out, f_flat, method, info, contraction, jvp_mode, on_backward_failure)
    if batch_axis is not None:
        hook.samples = _ActiveSamples(hook, f_samples)
        hook.warm = _warm  # FixedPoint's warm start of the adjoints (private: the layer owns the cache)
    y.register_hook(hook)  # type: ignore[no-untyped-call]
    return packing.unpack(y), info


def _autocast_tolerances(h0: State, solver: ForwardSolver, backward: Backward) -> tuple[Any, Any]:
    """Under ``torch.autocast`` to a narrower dtype, the default tolerances of that dtype.

    The map then computes in the autocast dtype whatever the state's dtype, so a default ``rtol``
    (``sqrt(eps)`` of the state's dtype) would ask for more than its products can give, and the
    backward solve would end by its budget: a solver or method with ``rtol=None`` gets
    ``sqrt(eps)`` of the autocast dtype instead (0.088 for bfloat16, 0.031 for float16). Explicit
    tolerances are kept.
    """
    state = h0[0] if isinstance(h0, tuple) else h0
    device = state.device.type
    if not torch.is_autocast_enabled(device):
        return solver, backward
    narrow = torch.get_autocast_dtype(device)
    if torch.finfo(narrow).eps <= torch.finfo(state.dtype).eps:
        return solver, backward
    rtol = math.sqrt(torch.finfo(narrow).eps)

    def loosen(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type) and getattr(obj, "rtol", 0.0) is None:
            return dataclasses.replace(obj, rtol=rtol)
        return obj

    return loosen(solver), loosen(backward)


def _require_grad(carries_grad: bool, name: str) -> None:
    """A fixed point that carries no gradient under grad mode is an error, not a silent zero."""
    if not carries_grad:
        msg = (
            f"fixed_point(backward={name}): no tensor that f uses requires grad, so the fixed point "
            "would carry no gradient. Make the parameters or inputs of f require grad, or call it "
            "under torch.no_grad() for inference."
        )
        raise ValueError(msg)


# --- the module ---------------------------------------------------------------------------------
def _check_ranks_agree(backward: object, solver: object) -> None:
    """In a process group, every rank must run the same backward method and solver (checked once).

    The gradients DDP averages are only one model's when every rank computes them alike; a rank
    with another method would average an inexact gradient into the exact ones without a word.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    mine = (repr(backward), repr(solver))
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if any(other != mine for other in everyone):
        listed = "; ".join(f"rank {r}: backward={b}, solver={s}" for r, (b, s) in enumerate(everyone))
        msg = f"FixedPoint: the ranks of the process group disagree on the backward method or solver ({listed})"
        raise ValueError(msg)


class FixedPoint(torch.nn.Module):
    """A deep-equilibrium layer: ``forward(x, h0)`` returns the fixed point of ``h -> cell(h, x)``.

    Parameters
    ----------
    cell : nn.Module
        Called as ``cell(h, *inputs)``; its parameters are registered with this module.
    backward : adjoint method, BPTT or TBPTT
        As in :func:`fixed_point`.
    solver : forward solver, optional
        As in :func:`fixed_point`.
    contraction : float, optional
        As in :func:`fixed_point`.
    jvp_mode : {"double-backward", "forward"}
        As in :func:`fixed_point`.
    on_backward_failure : {"skip", "raise", "warn", "ignore"}
        As in :func:`fixed_point`.
    throw : bool
        As in :func:`fixed_point`.
    batch_axis : int, optional
        The axis of independent samples, of the state and of the inputs: each
        sample is solved on its own (see :func:`fixed_point`), and a sample that
        is done leaves the work. The cell is then called with the active
        samples only: every input tensor whose size along ``batch_axis`` is the
        batch size is indexed with them (once per change of the active
        samples); other inputs are passed whole.
    warm_start : bool or {"forward", "both"}
        With ``batch_axis``: keep every sample's last fixed point
        (:class:`WarmStart`, the attribute ``warm``) and start its next forward
        solve from it (True or ``"forward"``); ``"both"`` also starts the
        backward solve from the sample's last adjoint. ``forward`` then takes
        the samples' ``ids``. Measured in ``benchmarks/bench_warm.py``: 0.83x the
        forward evaluations; the adjoint start cost 1.04x with GMRES there (the
        incoming gradients move too much between visits), hence not the default.

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
        solver: ForwardSolver | None = None,
        contraction: float | None = None,
        jvp_mode: JVPMode = "double-backward",
        on_backward_failure: OnFailure = "skip",
        throw: bool = True,
        batch_axis: int | None = None,
        warm_start: bool | Literal["forward", "both"] = False,
    ) -> None:
        super().__init__()
        # Checked at construction, as torch's own layers check their arguments.
        _check_options(backward, solver, contraction, jvp_mode, on_backward_failure)
        if batch_axis is not None and (isinstance(batch_axis, bool) or not isinstance(batch_axis, int)):
            msg = f"batch_axis must be an int or None, got {batch_axis!r}"
            raise TypeError(msg)
        self.batch_axis = batch_axis
        if warm_start not in (False, True, "forward", "both"):
            msg = f"warm_start must be False, True, 'forward' or 'both', got {warm_start!r}"
            raise ValueError(msg)
        if warm_start and batch_axis is None:
            msg = "warm_start needs a batch_axis: the warm starts are kept per sample"
            raise ValueError(msg)
        self.warm: WarmStart | None = WarmStart() if warm_start else None
        self.warm_adjoint = warm_start == "both"
        self.cell = cell
        self.backward_method = backward
        self.solver = solver
        self.contraction = contraction
        self.jvp_mode = jvp_mode
        self.on_backward_failure = on_backward_failure
        self.throw = throw
        self.info: FixedPointInfo | None = None
        self._ranks_checked = False

    def forward(self, x: Any, h0: State, *extra: Any, ids: Any = None) -> State:
        """The fixed point of ``h -> cell(h, x, *extra)`` from ``h0``; its info goes to ``self.info``.

        With ``warm_start``, ``ids`` (a sequence or integer tensor, one id per sample) says which
        samples these are, and the samples seen before start from their last fixed points.
        """
        if not self._ranks_checked:
            _check_ranks_agree(self.backward_method, self.solver)
            self._ranks_checked = True
        inputs: Sequence[Any] = (x, *extra)
        options: dict[str, Any] = {
            "backward": self.backward_method,
            "solver": self.solver,
            "contraction": self.contraction,
            "jvp_mode": self.jvp_mode,
            "on_backward_failure": self.on_backward_failure,
            "throw": self.throw,
        }
        if self.batch_axis is None:
            h, info = fixed_point(lambda h: self.cell(h, *inputs), h0, **options)
        else:
            axis = self.batch_axis
            packing = _Packing(h0, axis)
            gather = _Gather(inputs, axis, packing.batch)

            def cell(h: State, idx: torch.Tensor) -> State:
                return cast("State", self.cell(h, *gather(idx)))

            cache, warm = self.warm, None
            if cache is not None:
                if ids is None:
                    msg = "FixedPoint(warm_start=True) needs the samples' ids: layer(x, h0, ids=ids)"
                    raise ValueError(msg)
                keys = WarmStart._ids(ids, packing.batch)
                h0 = packing.unpack(cache.start(keys, packing.pack(h0, "h0").detach(), cache.states))
                warm = _Adjoints(cache, keys)
            adjoints = warm if self.warm_adjoint else None
            h, info = fixed_point(cell, h0, batch_axis=axis, takes_indices=True, _warm=adjoints, **options)
            if cache is not None and warm is not None:
                cache.keep(warm.ids, info.forward.value, cache.states)
        self.info = info
        return h

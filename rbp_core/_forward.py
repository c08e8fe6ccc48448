"""The forward solve ``h* = F(h*)`` with any forward solver, and forward plus backward in one call."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from ._adjoint import check_method, solve_adjoint
from ._batched import fixed_point_samples
from ._callbacks import CheckedCallback, check_arity, namespace_of, same_kind
from ._checks import check_contraction, check_instance
from ._floats import eps, size
from ._iterate import check_ratio, finish, iterate, settled
from ._norms import norm
from ._ops import ops_for
from ._protocols import AdjointMethod, ForwardSolver
from ._samples import check_takes_indices
from ._solution import Solution, Status
from ._solvers.fixed_point_iteration import FixedPointIteration
from ._typing import Array, FixedPointMap, SampleMap

__all__ = ["ImplicitGradient", "check_solver", "fixed_point", "implicit_gradient"]


def check_solver(solver: object) -> ForwardSolver:
    """``solver``, checked to be an instance of a forward solver; None gives the default."""
    if solver is None:
        return FixedPointIteration()
    check_instance(solver, "solver")
    if not isinstance(solver, ForwardSolver):
        msg = f"solver must be a forward solver such as rbp_core.FixedPointIteration(), got {solver!r}"
        raise TypeError(msg)
    return solver


def fixed_point(
    f: FixedPointMap | SampleMap,
    h0: Array,
    solver: ForwardSolver | None = None,
    *,
    contraction: float | None = None,
    throw: bool = True,
    batch_axis: int | None = None,
    takes_indices: bool = False,
) -> Solution:
    r"""Find :math:`h^* = F(h^*)` from ``h0`` with a forward ``solver``.

    Parameters
    ----------
    f : callable
        The map ``h -> F(x, w, h)``; returns an array of the library, shape,
        dtype and device of ``h0``.
    h0 : array
        Starting point, any shape. Never modified.
    solver : forward solver, optional
        Default :class:`~rbp_core.FixedPointIteration()`; it holds the
        tolerances, the budget and the damping.
    contraction : float, optional
        A Lipschitz bound :math:`\mu < 1` of :math:`F`; gives ``error_bound``, a bound on
        the distance of the returned iterate from :math:`h^*` (see the solver). A
        step that the bound cannot explain disproves it
        (:class:`~rbp_core.ContractionViolation`, or ``contraction_violated``
        with ``throw=False``).
    throw : bool
        Raise :class:`~rbp_core.ConvergenceError` unless the solve converged
        (with ``batch_axis``: unless every sample did; the message names the
        samples that failed).
    batch_axis : int, optional
        The axis of ``h0`` that indexes independent samples (``F`` acts on each
        sample alone). Each sample then has its own norms, tolerance
        (relative to its own :math:`\|F(h)\|`), status, step count, history,
        divergence test and error bound, so its result does not depend on the
        other samples of the batch; a sample that is done leaves the
        iteration, frozen at its final value. The per-sample results are the
        Solution's ``sample_*`` fields. Default None: the whole array is one
        problem.
    takes_indices : bool
        With ``batch_axis``: ``f`` is called as ``f(h, indices)`` with the
        samples still iterating only, ``indices`` an integer array of their
        positions in the batch (to select their inputs, ``x[indices]``), and
        returns their images, so that finished samples cost nothing. Without
        it, ``f`` always gets the whole batch, finished samples held at their
        final values.

    Returns
    -------
    Solution
        ``value`` is the last iterate whose values were all finite (per
        sample, with ``batch_axis``); ``num_f_evals`` counts the calls of
        ``f``, ``num_sample_evals`` the samples they evaluated.

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> sol = rbp_core.fixed_point(np.cos, np.zeros(3), rbp_core.FixedPointIteration(rtol=1e-12), contraction=0.85)
    >>> bool(np.allclose(sol.value, np.cos(sol.value))), sol.error_bound < 1e-10
    (True, True)
    """
    solver = check_solver(solver)
    xp = namespace_of(h0, "h0")
    mu = check_contraction(contraction)
    check_takes_indices(takes_indices, batch_axis)
    if batch_axis is not None:
        return fixed_point_samples(
            f, h0, solver, xp=xp, contraction=mu, batch_axis=batch_axis, takes_indices=takes_indices, throw=throw
        )
    op = CheckedCallback(f, "f", h0, xp, called_as="f(h)")
    limits = solver.limits(xp, h0.dtype)
    m = None if mu is None else solver.step_contraction(mu)
    root_eps = math.sqrt(eps(xp, h0.dtype))
    hnorm = norm(xp, h0)
    if not math.isfinite(hnorm) or size(h0) == 0:
        # A non-finite start (NONFINITE, zeros) or an empty state, its own fixed point.
        finite = math.isfinite(hnorm)
        return settled(
            xp.asarray(h0, copy=True) if finite else xp.zeros_like(h0),
            hnorm,
            name=solver.name,
            threshold=max(limits.rtol * hnorm, limits.atol) if limits.rtol is not None and finite else None,
            note="an empty state: nothing to solve",
            nonfinite_note="the starting point h0 is not finite (NaN or Inf)",
            certified=mu is not None,
            throw=throw,
        )

    ops = ops_for(xp)
    pairs = getattr(solver, "lipschitz_pairs", None)  # a solver whose steps are no single map reports its secants
    outcome = iterate(
        solver,
        op,
        solver.init(op, h0, ops) if pairs is None else cast("Any", solver).init(op, h0, ops, secants=mu is not None),
        ops=ops,
        limits=limits,
        scale=hnorm,
        relative_to_iterate=True,
        ratio_bound=m,
        slack=root_eps * hnorm,
        rel_slack=root_eps,
    )
    if mu is not None and pairs is not None:
        slack = root_eps * max(hnorm, outcome.previous_scale)
        for image, vector in pairs(outcome.state):
            check_ratio(outcome, image, vector, mu, slack, root_eps)
    bound = None
    if mu is not None and outcome.status is not Status.NONFINITE and outcome.last:
        bound = solver.error_bound(xp, h0, mu, outcome.last, outcome.previous_scale, outcome.state)
    if outcome.value is h0:
        outcome.value = xp.asarray(h0, copy=True)
    return finish(
        outcome,
        name=solver.name,
        ratio_bound=mu if m is None else m,
        contraction=mu,
        num_f_evals=op.calls,
        error_bound=bound,
        throw=throw,
    )


@dataclass(frozen=True, eq=False)
class ImplicitGradient:
    r"""What :func:`implicit_gradient` returns.

    Attributes
    ----------
    value : array
        The fixed point :math:`h^*`.
    gradient : object
        :math:`(\partial F/\partial w)^T z`, whatever ``vjp_params`` returns.
    forward : Solution
        The forward solve.
    backward : Solution
        The backward solve.
    """

    value: Array
    gradient: Any
    forward: Solution
    backward: Solution


def implicit_gradient(
    f: FixedPointMap,
    h0: Array,
    loss_grad: Array | Callable[[Array], Array],
    *,
    vjp_state: Callable[[Array, Array], Array],
    vjp_params: Callable[[Array, Array], Any],
    method: AdjointMethod,
    jvp_state: Callable[[Array, Array], Array] | None = None,
    solver: ForwardSolver | None = None,
    contraction: float | None = None,
    throw: bool = True,
    batch_axis: int | None = None,
) -> ImplicitGradient:
    r"""Fixed point, adjoint solve and parameter VJP in one call, from callbacks.

    For simulators with hand-written derivatives: finds :math:`h^* = F(h^*)` from
    ``h0`` with ``solver``, evaluates :math:`g` = ``loss_grad(h*)``, solves
    :math:`(I - J^T) z = g` with ``method`` and returns
    :math:`(\partial F/\partial w)^T z`, the gradient of the loss with respect
    to the parameters ``w``.

    Parameters
    ----------
    f : callable
        ``h -> F(x, w, h)``.
    h0 : array
        Starting point of the forward solve.
    loss_grad : array or callable
        ``dL/dh*``, or ``h* -> dL/dh*``: an array of the library, shape,
        dtype and device of ``h*`` (checked; nothing is broadcast or promoted).
    vjp_state : callable
        ``(h, v)`` :math:`\mapsto (\partial F/\partial h)^T v` at ``h``.
    vjp_params : callable
        ``(h, z)`` :math:`\mapsto (\partial F/\partial w)^T z` at ``h``; any return type.
    method : adjoint method
        The backward method: :class:`~rbp_core.Neumann`, :class:`~rbp_core.OriginalRBP`, ...
    jvp_state : callable, optional
        ``(h, v) -> (dF/dh at h) v``, for methods with ``needs_jvp``.
    solver : forward solver, optional
        The forward solver (default :class:`~rbp_core.FixedPointIteration()`).
    contraction : float, optional
        A Lipschitz bound ``mu < 1`` of ``F`` in ``h``; it bounds ``||J||_2``
        too, so it certifies both solves.
    throw : bool
        Raise :class:`~rbp_core.ConvergenceError` when either solve fails;
        otherwise read the two Solutions.
    batch_axis : int, optional
        The axis of independent samples, for both solves (see
        :func:`fixed_point`); the callbacks then see the whole batch.

    Returns
    -------
    ImplicitGradient

    Notes
    -----
    This is the one implementation. ``rbp_core.backends.numpy.implicit_gradient`` and
    ``rbp_core.backends.cupy.implicit_gradient`` call it after converting their inputs (a list,
    a scalar or a host array for ``h0`` and ``loss_grad`` becomes an array of that library, on
    the state's device); this function converts nothing and takes arrays of any Array API
    library as they are.

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> W = np.array([[0.3, -0.2], [0.1, 0.4]]); x = np.array([1.0, -1.0])
    >>> f = lambda h: np.tanh(W @ h + x)          # F(x, W, h)
    >>> def vjp_state(h, v):                      # (dF/dh)^T v
    ...     return W.T @ ((1 - f(h) ** 2) * v)
    >>> def vjp_params(h, z):                     # (dF/dW)^T z
    ...     return np.outer((1 - f(h) ** 2) * z, h)
    >>> res = rbp_core.implicit_gradient(
    ...     f, np.zeros(2), lambda h: h, vjp_state=vjp_state, vjp_params=vjp_params,
    ...     method=rbp_core.OriginalRBP(rtol=1e-10),
    ... )
    >>> res.gradient.shape, res.backward.converged
    ((2, 2), True)
    """
    method = check_method(method)
    # The callbacks' arities before the forward solve, which can take long (fixed_point checks f's).
    for fn, called_as in (
        (vjp_state, "vjp_state(h, v)"),
        (vjp_params, "vjp_params(h, z)"),
        (jvp_state, "jvp_state(h, v)"),
        (loss_grad if callable(loss_grad) else None, "loss_grad(h)"),
    ):
        if fn is not None:
            if not callable(fn):
                msg = f"{called_as.partition('(')[0]} must be callable, got {type(fn).__name__}"
                raise TypeError(msg)
            check_arity(fn, called_as)
    if method.needs_jvp and jvp_state is None:
        msg = f"{type(method).__name__} needs jvp_state, the callback (h, v) -> (dF/dh at h) v"
        raise ValueError(msg)
    fwd = fixed_point(f, h0, check_solver(solver), contraction=contraction, throw=throw, batch_axis=batch_axis)
    h = fwd.value
    g = loss_grad(h) if callable(loss_grad) else loss_grad
    # Like h* in library, shape, dtype and device: a broadcastable or promotable g would give the
    # gradient of another problem (or an error that blames the state).
    same_kind(namespace_of(h, "h0"), g, h, "loss_grad(h*)" if callable(loss_grad) else "loss_grad")
    jvp = None if jvp_state is None else (lambda v: jvp_state(h, v))
    bwd = solve_adjoint(
        lambda v: vjp_state(h, v), g, method, jvp=jvp, contraction=contraction, throw=throw, batch_axis=batch_axis
    )
    gradient = vjp_params(h, bwd.value)
    return ImplicitGradient(value=h, gradient=gradient, forward=fwd, backward=bwd)

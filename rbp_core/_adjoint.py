"""The adjoint solve :math:`(I - J^T) z = g` with any adjoint method, and the implicit backward pass."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Literal, TypeAlias

from ._batched import sample_cotangent, solve_adjoint_samples
from ._callbacks import CheckedCallback, namespace_of, same_kind
from ._certificate import residual_bound
from ._checks import check_contraction, check_instance
from ._errors import BackwardFailureWarning, ContractionViolation, ConvergenceError
from ._floats import eps, scale_pow2, size, unit_scale
from ._iterate import check_pairs, check_ratio, finish, iterate, settled
from ._norms import norm
from ._operator import AdjointOperator
from ._ops import ops_for
from ._protocols import AdjointMethod
from ._samples import check_batch_axis, check_takes_indices
from ._solution import Solution, Status
from ._typing import Array, SampleMap, VectorMap

__all__ = ["OnFailure", "check_method", "implicit_backward", "solve_adjoint"]

OnFailure: TypeAlias = Literal["raise", "skip", "warn", "ignore"]
POLICIES = ("raise", "skip", "warn", "ignore")


def check_method(method: object) -> AdjointMethod:
    """``method``, checked to be an instance of an adjoint method."""
    check_instance(method, "method")
    if not isinstance(method, AdjointMethod):
        msg = (
            "method must be an adjoint method such as rbp_core.Neumann(steps=20), "
            f"rbp_core.OriginalRBP() or rbp_core.CGRBP(), got {method!r}"
        )
        raise TypeError(msg)
    return method


def solve_adjoint(
    vjp: VectorMap | SampleMap,
    g: Array,
    method: AdjointMethod,
    *,
    jvp: VectorMap | SampleMap | None = None,
    z0: Array | None = None,
    contraction: float | None = None,
    throw: bool = True,
    batch_axis: int | None = None,
    takes_indices: bool = False,
) -> Solution:
    r"""Solve :math:`(I - J^T) z = g` with ``method``, from the callbacks ``vjp`` (and ``jvp``).

    Parameters
    ----------
    vjp : callable
        :math:`v \mapsto J^T v` for the Jacobian :math:`J = \partial F / \partial h` at the fixed point. Must
        return an array of the library, shape, dtype and device of ``g``.
    g : array
        The right-hand side, :math:`\partial L / \partial h^*`, any shape. Never modified. Without
        ``batch_axis`` inner products and norms run over all its elements.
    method : adjoint method
        :class:`~rbp_core.Neumann`, :class:`~rbp_core.OriginalRBP`,
        :class:`~rbp_core.CGRBP`, or any object with the protocol of
        ``docs/architecture.md``.
    jvp : callable, optional
        :math:`v \mapsto J v`, for methods with ``needs_jvp`` (CG-RBP).
    z0 : array, optional
        Warm start, for methods with ``supports_warm_start``.
    contraction : float, optional
        A bound :math:`\mu < 1` on :math:`\|J\|_2`. Enables :attr:`!Solution.error_bound`, a
        bound on :math:`\|z - z^*\|` that holds in floating point: the residual
        :math:`r = g - z + J^T z` is evaluated afresh (one more VJP, counted in
        ``num_vjp``) and ``error_bound`` is
        :math:`(\|r\| + \delta) / (1 - \mu)` with an allowance :math:`\delta` for rounding (docs/method.md says what it assumes).
        A vector met on the way that :math:`J` stretches by more than :math:`\mu`
        disproves the bound and raises :class:`~rbp_core.ContractionViolation`
        (with ``throw=False``: ``contraction_violated`` is set, and no bound).
    throw : bool
        Raise :class:`~rbp_core.ConvergenceError` unless the solve converged
        (default); otherwise return the failed Solution, whose value is the last
        finite iterate.

    batch_axis : int, optional
        The axis of ``g`` that indexes independent samples (``J`` is block
        diagonal over them). Each sample then has its own norms, tolerance
        (relative to its own :math:`\|g\|`), status, history, divergence test and
        error bound, and leaves the iteration when it is done; see the
        Solution's ``sample_*`` fields and docs/batches.md. Every adjoint
        method of rbp-core works per sample.
    takes_indices : bool
        With ``batch_axis``: ``vjp`` and ``jvp`` are called as ``vjp(v, indices)``
        with the samples still iterating only (``indices`` their positions in
        the batch); otherwise they get the whole batch, finished samples at zero.

    Returns
    -------
    Solution
        In the caller's library, dtype and device. At extreme scales of ``g``
        the solve runs on ``g`` scaled exactly by a power of two to unit norm,
        so squared norms stay in range: the solution for ``s * g`` is ``s``
        times the solution for ``g``, to rounding, for any ``s``.

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> J = np.array([[0.5, 0.0], [0.1, 0.2]])
    >>> sol = rbp_core.solve_adjoint(lambda v: J.T @ v, np.ones(2), rbp_core.OriginalRBP(rtol=1e-12))
    >>> sol.converged, np.allclose(sol.value, np.linalg.solve(np.eye(2) - J.T, np.ones(2)))
    (True, True)
    """
    method = check_method(method)
    xp = namespace_of(g, "g")
    mu = check_contraction(contraction)
    label = type(method).__name__
    if method.needs_jvp and jvp is None:
        msg = f"{label} needs the jvp callback (v -> J v) as well as the vjp"
        raise ValueError(msg)
    if z0 is not None:
        if not method.supports_warm_start:
            msg = f"{label} does not take a warm start z0 (it always starts from g)"
            raise ValueError(msg)
        same_kind(xp, z0, g, "z0")
    check_takes_indices(takes_indices, batch_axis)
    if batch_axis is not None:
        return solve_adjoint_samples(
            vjp,
            g,
            method,
            xp=xp,
            jvp=jvp,
            z0=z0,
            contraction=mu,
            batch_axis=batch_axis,
            takes_indices=takes_indices,
            throw=throw,
        )
    A = AdjointOperator(
        xp,
        CheckedCallback(vjp, "vjp", g, xp, called_as="vjp(v)"),
        CheckedCallback(jvp, "jvp", g, xp, called_as="jvp(v)") if method.needs_jvp else None,
        checks_contraction=mu is not None,
    )
    limits = method.limits(xp, g.dtype)
    gnorm = norm(xp, g)
    # Extreme scales: solved for g / 2^e (exact), reported and returned in the caller's units.
    e, gs, gnorm_s = unit_scale(xp, g, gnorm)
    unit = math.ldexp(1.0, e)
    root_eps = math.sqrt(eps(xp, g.dtype))
    # Every vector such a solve applies J^T to has a norm of at most ||g|| / (1 - mu).
    slack = root_eps * gnorm_s / (1.0 - (mu or 0.0))
    threshold = None if limits.rtol is None else max(limits.rtol * gnorm_s, limits.atol / unit)

    if not math.isfinite(gnorm) or size(g) == 0 or gnorm == 0.0:
        # Nothing to iterate: a non-finite g (NONFINITE, zeros), an empty state or g = 0 (z* = 0 exactly).
        return settled(
            xp.zeros_like(g) if size(g) else xp.asarray(g, copy=True),
            gnorm,
            name=method.name,
            threshold=threshold,
            note="",
            nonfinite_note="the right-hand side g is not finite (NaN or Inf)",
            certified=mu is not None,
            throw=throw,
        )

    ops = ops_for(xp)
    z0s = None if z0 is None else scale_pow2(xp, z0, -e)
    outcome = iterate(
        method,
        A,
        method.init(A, gs, z0s, ops),
        ops=ops,
        limits=limits,
        scale=gnorm_s,
        relative_to_iterate=False,
        ratio_bound=mu,
        slack=slack,
        rel_slack=root_eps,
        unit=unit,
    )
    bound = None
    if mu is not None:
        check_pairs(ops, A.pairs, outcome, mu, slack, root_eps)

        def check(image: float, vector: float) -> None:
            check_ratio(outcome, image, vector, mu, slack, root_eps)

        # Whatever the status, the kept iterate is finite: its fresh residual certifies it.
        bound = residual_bound(xp, A.vjp, gs, outcome.value, gnorm_s, mu, check)
    note = ""
    success_note = getattr(method, "success_note", None)
    if success_note is not None and outcome.status is Status.SUCCESS:
        note = success_note(tuple(r * unit for r in outcome.history), gnorm)
    z = scale_pow2(xp, outcome.value, e)
    if z is g or z is z0:  # never hand back the caller's array
        z = xp.asarray(z, copy=True)
    outcome.value = z
    return finish(
        outcome,
        name=method.name,
        ratio_bound=mu,
        num_vjp=A.num_vjp,
        num_jvp=A.num_jvp,
        error_bound=bound,
        unit=unit,
        note=note,
        throw=throw,
    )


def check_policy(on_failure: object, name: str = "on_failure") -> None:
    """``on_failure`` must be one of the four policies."""
    if on_failure not in POLICIES:
        msg = f"{name} must be one of {', '.join(map(repr, POLICIES))}, got {on_failure!r}"
        raise ValueError(msg)


def failure_cotangent(
    solution: Solution,
    g: Array,
    label: str,
    on_failure: OnFailure,
    *,
    contraction: float | None = None,
    stacklevel: int = 2,
) -> Array:
    """The adjoint that a solve hands on under the policy ``on_failure``: its value, zeros, or an error.

    A non-finite ``g`` always raises ``FloatingPointError``. A solve that did not converge raises
    :class:`~rbp_core.ConvergenceError` (``"raise"``), gives a zero cotangent with a
    :class:`~rbp_core.BackwardFailureWarning` (``"skip"``), or hands on its last finite iterate
    with a warning (``"warn"``) or silently (``"ignore"``); a non-finite iteration never hands on
    anything (``FloatingPointError``). A contraction bound that the iteration disproved raises
    :class:`~rbp_core.ContractionViolation` (``"raise"``), warns (``"skip"``, ``"warn"``) or only
    leaves the error bound out (``"ignore"``).
    """
    if solution.stats.get("nonfinite_input"):
        msg = f"{label}: non-finite values (NaN or Inf) in the incoming gradient dL/dh*; {solution.describe()}"
        raise FloatingPointError(msg)
    if not solution.converged:
        if on_failure == "raise":
            raise ConvergenceError(solution)
        if on_failure == "skip":
            warnings.warn(
                f"backward solve {label} did not converge: {solution.describe()}. This fixed point's "
                "gradient was skipped (a zero cotangent); the policy 'warn' applies the unconverged "
                "adjoint instead, 'raise' stops",
                BackwardFailureWarning,
                stacklevel=stacklevel + 1,
            )
            return namespace_of(g, "g").zeros_like(g)
        if solution.status is Status.NONFINITE:
            msg = f"{label}: non-finite values (NaN or Inf) in the backward iteration; {solution.describe()}"
            raise FloatingPointError(msg)
        if on_failure == "warn":
            warnings.warn(
                f"backward solve {label} did not converge: {solution.describe()}; the gradient is inexact",
                BackwardFailureWarning,
                stacklevel=stacklevel + 1,
            )
        return solution.value
    if solution.contraction_violated and on_failure != "ignore":
        _contraction_policy(label, contraction, on_failure, stacklevel=stacklevel + 1)
    return solution.value


def _contraction_policy(label: str, contraction: float | None, on_failure: str, *, stacklevel: int) -> None:
    """A disproved ``contraction`` raises (``"raise"``) or warns."""
    msg = f"backward solve {label}: contraction={contraction!r} was disproved by the iteration; no error bound is certified"
    if on_failure == "raise":
        raise ContractionViolation(msg)
    warnings.warn(msg, BackwardFailureWarning, stacklevel=stacklevel + 1)


def implicit_backward(
    vjp_state: VectorMap | SampleMap,
    vjp_params: Callable[[Array], Any],
    g: Array,
    method: AdjointMethod,
    *,
    jvp_state: VectorMap | SampleMap | None = None,
    z0: Array | None = None,
    contraction: float | None = None,
    on_failure: OnFailure = "raise",
    on_solution: Callable[[Solution], None] | None = None,
    batch_axis: int | None = None,
    takes_indices: bool = False,
) -> tuple[Any, Solution]:
    r"""The implicit backward pass that any framework's custom-gradient rule can call.

    Solves :math:`(I - J^T) z = g` with ``method`` (:func:`solve_adjoint`) and
    returns ``vjp_params(z)``, the cotangents of the parameters,
    :math:`z^T \partial F / \partial w`, with the backward Solution. A solve
    that fails is handled by ``on_failure``, the policy the framework adapters
    share (the torch adapter's hook calls this with ``vjp_params`` the identity).

    Parameters
    ----------
    vjp_state : callable
        :math:`v \mapsto J^T v` with :math:`J = \partial F / \partial h` at the fixed point.
    vjp_params : callable
        :math:`z \mapsto (\partial F / \partial w)^T z`; may return anything (an array, a tuple of arrays,
        a dict): it is passed through.
    g : array
        :math:`\partial L / \partial h^*`.
    method : adjoint method
        :class:`~rbp_core.Neumann`, :class:`~rbp_core.OriginalRBP`,
        :class:`~rbp_core.CGRBP`, or any object with the same protocol.
    jvp_state : callable, optional
        :math:`v \mapsto J v`; required by methods with ``needs_jvp``.
    z0 : array, optional
        Warm start for methods with ``supports_warm_start``.
    contraction : float, optional
        A bound :math:`\mu < 1` on :math:`\|J\|_2`, for the error bound.
    on_failure : {"raise", "skip", "warn", "ignore"}
        What a solve that did not converge does. ``"raise"`` (default):
        :class:`~rbp_core.ConvergenceError`; ``"skip"``: a zero cotangent
        (``vjp_params`` of zeros) and a :class:`~rbp_core.BackwardFailureWarning`;
        ``"warn"``: the last finite iterate, with that warning; ``"ignore"``: the
        same, silently. A non-finite ``g``, or a non-finite iteration under
        ``"warn"`` and ``"ignore"``, raises ``FloatingPointError``: no NaN is
        ever handed on. A disproved ``contraction`` raises, warns or is only
        recorded in the Solution, alike.
    on_solution : callable, optional
        Called with the Solution before the policy applies, so that an adapter
        can record it even when the policy raises.
    batch_axis : int, optional
        The axis of independent samples (see :func:`solve_adjoint`). The policy
        then applies per sample: the samples that converged keep their exact
        adjoint whatever happens to the others; ``"skip"`` zeroes only the
        failed samples' rows, and the messages name them.
    takes_indices : bool
        With ``batch_axis``: ``vjp_state`` and ``jvp_state`` take the indices of
        the active samples (see :func:`solve_adjoint`).

    Returns
    -------
    tuple
        ``(vjp_params(z), solution)``.

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> J = np.array([[0.5, 0.0], [0.1, 0.2]]); B = np.eye(2)  # dF/dw
    >>> grad, sol = rbp_core.implicit_backward(
    ...     lambda v: J.T @ v, lambda z: B.T @ z, np.ones(2), rbp_core.Neumann(steps=50)
    ... )
    >>> sol.num_vjp
    50
    """
    check_policy(on_failure)
    method = check_method(method)
    solution = solve_adjoint(
        vjp_state,
        g,
        method,
        jvp=jvp_state,
        z0=z0,
        contraction=contraction,
        throw=False,
        batch_axis=batch_axis,
        takes_indices=takes_indices,
    )
    if on_solution is not None:
        on_solution(solution)
    if batch_axis is not None:
        axis = check_batch_axis(batch_axis, g, "g")
        z = sample_cotangent(solution, g, type(method).__name__, on_failure, batch_axis=axis, stacklevel=2)
        if solution.contraction_violated and on_failure != "ignore":
            _contraction_policy(type(method).__name__, contraction, on_failure, stacklevel=2)
        return vjp_params(z), solution
    z = failure_cotangent(solution, g, type(method).__name__, on_failure, contraction=contraction, stacklevel=2)
    return vjp_params(z), solution

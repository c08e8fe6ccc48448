"""The one iteration driver: every solver's loop, termination and bookkeeping, written once.

A solver supplies ``init`` and ``step`` (see :mod:`rbp_core._protocols`); :func:`iterate`
runs them. Per iteration it brings the solver's monitored squared norms to the host in one
transfer (:meth:`~rbp_core._ops.VectorOps.to_host`), keeps the history, tests convergence,
divergence and finiteness, checks the claimed contraction on successive images, and keeps the
last iterate whose values were all finite. :func:`finish` assembles the Solution and raises
when asked to. Solvers never write a loop, never convert an array to a Python number and never
see this bookkeeping.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._errors import ContractionViolation, ConvergenceError
from ._ops import VectorOps
from ._solution import Solution, Status
from ._typing import Array

__all__ = ["Limits", "Outcome", "finish", "iterate", "raise_violation", "settled"]

Vectors = Sequence[tuple[Array, Array | None]]
"""For each monitored squared norm, the array it is the norm of (or the two whose difference it is)."""


@dataclass(frozen=True)
class Limits:
    """How a solver's iteration may end, from its settings.

    ``rtol`` None means a fixed number of steps: the budget reached is SUCCESS.
    """

    max_steps: int
    rtol: float | None
    atol: float = 0.0
    divergence_factor: float | None = None


@dataclass
class Outcome:
    """What the loop found: the kept iterate, its status and history (in the units of the solve)."""

    value: Array
    state: object
    status: Status
    history: list[float]
    threshold: float | None
    note: str = ""
    observed_ratio: float = 0.0
    violated: bool = False
    last: tuple[float, ...] = ()
    previous_scale: float = 0.0
    stats: dict[str, object] = field(default_factory=dict)


def _norms(ops: VectorOps, sqs: Sequence[Array], vectors: Vectors) -> tuple[float, ...]:
    """The 2-norms of the monitored values, through one host transfer (more only for 0, inf or NaN)."""
    vals = ops.to_host(sqs)
    out = []
    for s, (x, minus) in zip(vals, vectors, strict=True):
        out.append(math.sqrt(s) if 0.0 < s < math.inf else ops.exact_norm(s, x, minus))
    return tuple(out)


def iterate(
    solver: object,
    problem: object,
    start: tuple[object, Array, tuple[Sequence[Array], Vectors] | None],
    *,
    ops: VectorOps,
    limits: Limits,
    scale: float,
    relative_to_iterate: bool,
    ratio_bound: float | None,
    slack: float,
    rel_slack: float,
    unit: float = 1.0,
) -> Outcome:
    """Run ``solver.step`` from ``start = solver.init(...)`` until a status is reached.

    The stopping test is ``r <= max(rtol * scale, atol)`` for the first monitored norm ``r``;
    with ``relative_to_iterate`` the second monitored norm (that of the new iterate) is the
    scale and the contraction check's slack grows with it, as a forward solve needs.
    """
    state, x, first = start
    step: Callable[..., tuple[object, Array, Sequence[Array], Vectors]] = solver.step  # type: ignore[attr-defined]
    breakdown: Callable[[object, object], bool] | None = getattr(solver, "breakdown", None)
    # Krylov methods turn the transferred values into their residual norm on the host, form their
    # iterate only on request, and confirm a converged recurrence with the true residual.
    host_update: Callable[[object, tuple[float, ...]], Any] | None = getattr(solver, "host_update", None)
    solution: Callable[[object, object], Array] | None = getattr(solver, "solution", None)
    confirm: Callable[[object, object, float], tuple[object, float]] | None = getattr(solver, "confirm", None)
    kept = state
    successive = bool(getattr(solver, "successive_images", False)) and ratio_bound is not None
    rtol, factor, max_steps = limits.rtol, limits.divergence_factor, limits.max_steps
    atol = limits.atol / unit  # in the units of the solve
    threshold = None if rtol is None else max(rtol * scale, atol)
    history: list[float] = []
    append = history.append
    best = math.inf
    prev: float | None = None
    observed = 0.0
    violated = False
    note = ""
    vals: tuple[float, ...] = ()
    scale_prev = scale
    status: Status | None = None

    if first is not None:
        vals = _norms(ops, *first)
        r = vals[0]
        if getattr(solver, "start_is_iteration", False):
            append(r)
            if not math.isfinite(r):
                status = Status.NONFINITE
            elif threshold is not None and r <= threshold:
                status = Status.SUCCESS
            best = r
        elif not math.isfinite(r):
            append(r)
            status = Status.NONFINITE
        elif threshold is not None and r <= threshold:
            status = Status.SUCCESS
        else:
            best = r
        prev = r
    if status is None and len(history) >= max_steps:
        status = Status.SUCCESS if threshold is None else Status.MAX_STEPS

    # The hot loop: locals only, sentinels instead of None (a threshold of -1 is never met, an
    # infinite factor never trips, prev = -1 means no previous norm yet).
    sqrt, inf, exact = math.sqrt, math.inf, ops.exact_norm
    thr = -1.0 if threshold is None else threshold
    fac = inf if factor is None else factor
    bound = ratio_bound if successive and ratio_bound is not None else -1.0
    prev_r = -1.0 if prev is None else prev
    count = len(history)
    while status is None:
        state, x_new, sqs, vectors = step(problem, state, ops)
        if host_update is not None:  # the one transfer of this iteration, read by the solver
            if relative_to_iterate:  # a forward solver also gives the scale of its relative test
                state, r, hn = host_update(state, ops.to_host(sqs))
                vals = (r, hn)
                scale_prev, scale = scale, hn
                if rtol is not None:
                    thr = max(rtol * scale, atol)
                slack = rel_slack * scale
            else:
                state, r = host_update(state, ops.to_host(sqs))
        elif relative_to_iterate:  # the step's norm and the new iterate's, in one transfer
            d2, h2 = ops.to_host(sqs)
            r = sqrt(d2) if 0.0 < d2 < inf else exact(d2, *vectors[0])
            hn = sqrt(h2) if 0.0 < h2 < inf else exact(h2, *vectors[1])
            vals = (r, hn)
            scale_prev, scale = scale, hn
            if rtol is not None:
                thr = max(rtol * scale, atol)
            if not scale < inf:
                r = math.nan
            slack = rel_slack * scale
        else:
            sq = float(sqs[0])  # the one transfer of this iteration
            r = sqrt(sq) if 0.0 < sq < inf else exact(sq, *vectors[0])
        # A residual that grew (or a NaN) first asks the solver whether it broke down (CG: a
        # direction that I - J^T annihilates), which is not the same as a non-finite callback.
        if breakdown is not None and prev_r >= 0.0 and not r <= prev_r and breakdown(problem, state):
            append(prev_r)  # the last residual that was reached
            status = Status.BREAKDOWN
            break
        if not r < inf:  # NaN or inf: the previous iterate is kept
            append(r)
            status = Status.NONFINITE
            break
        append(r)
        count += 1
        if bound >= 0.0 and prev_r > 0.0:
            if r > observed * prev_r:
                observed = r / prev_r
            if r > bound * prev_r * (1.0 + rel_slack) + slack:
                violated = True
        prev_r = r
        x, kept = x_new, state
        if r <= thr and confirm is not None:
            # A recurrence's residual can drift below the true one: the true residual decides, and
            # the solver goes on (restarting from the iterate) when it is still above the threshold.
            state, r = confirm(problem, state, thr)
            kept = state
            history[-1] = r
            if not r < inf:
                status = Status.NONFINITE
                break
        if r <= thr:
            status = Status.SUCCESS
        elif r > fac * best:
            note = (
                f"it reached {r * unit:.3e}, {r / best:.3g} times its smallest {best * unit:.3e} "
                f"(divergence_factor={fac:g}); if the growth is transient (a non-normal Jacobian "
                "whose iteration still converges), raise divergence_factor or set it to None"
            )
            status = Status.DIVERGED
        else:
            if r < best:  # noqa: PLR1730 - a comparison is cheaper than min() on the hot path
                best = r
            if count >= max_steps:
                status = Status.SUCCESS if threshold is None else Status.MAX_STEPS
    if relative_to_iterate and rtol is not None:
        threshold = thr

    if solution is not None:  # an iterate formed on request, from the last state whose values were finite
        x = solution(problem, kept)
    final_note = getattr(solver, "final_note", None)
    if final_note is not None and not note:
        note = final_note(kept)
    stats = getattr(solver, "stats", None)
    return Outcome(
        value=x,
        state=state,
        stats={} if stats is None else dict(stats(state)),
        status=status,
        history=history,
        threshold=threshold,
        note=note,
        observed_ratio=observed,
        violated=violated,
        last=vals,
        previous_scale=scale_prev,
    )


def check_pairs(
    ops: VectorOps, pairs: Sequence[tuple[Array, Array]], outcome: Outcome, bound: float, slack: float, rel_slack: float
) -> None:
    """Check the ``(||J v||^2, ||v||^2)`` pairs a solver recorded against the claimed ``bound``, in one transfer."""
    if not pairs:
        return
    vals = ops.to_host([s for pair in pairs for s in pair])
    for i in range(0, len(vals), 2):
        check_ratio(outcome, math.sqrt(vals[i]), math.sqrt(vals[i + 1]), bound, slack, rel_slack)


def check_ratio(
    outcome: Outcome, image_norm: float, vector_norm: float, bound: float, slack: float, rel_slack: float
) -> None:
    """Record ``||J v|| / ||v||`` and whether it disproves ``||J|| <= bound`` beyond rounding."""
    if not (vector_norm > 0.0 and math.isfinite(image_norm)):
        return
    outcome.observed_ratio = max(outcome.observed_ratio, image_norm / vector_norm)
    if image_norm > bound * vector_norm * (1.0 + rel_slack) + slack:
        outcome.violated = True


def raise_violation(name: str, ratio_bound: float | None, contraction: float | None, observed: float) -> None:
    """Raise :class:`~rbp_core.ContractionViolation`: the iteration saw a ratio above the claimed bound.

    ``ratio_bound`` is the constant the iteration was checked against; ``contraction`` the user's
    claim it came from, when they differ (a damped forward step).
    """
    claim = ratio_bound if contraction is None else contraction
    step = "" if claim == ratio_bound else f" (one step's constant for it is {ratio_bound:.6g})"
    msg = (
        f"{name}: contraction={claim!r} is false: the iteration saw a ratio ||J^T v|| / ||v|| = {observed:.6g} "
        f"> {ratio_bound:.6g}{step}, so no error bound can be certified. Give a true upper bound on ||J||_2 or none."
    )
    raise ContractionViolation(msg)


def finish(
    outcome: Outcome,
    *,
    name: str,
    ratio_bound: float | None,
    contraction: float | None = None,
    num_vjp: int = 0,
    num_jvp: int = 0,
    num_f_evals: int = 0,
    error_bound: float | None = None,
    unit: float = 1.0,
    note: str = "",
    throw: bool,
) -> Solution:
    """The Solution of ``outcome`` in the caller's units; raise if it failed and ``throw`` is set.

    ``ratio_bound`` is the constant the iteration was checked against; ``contraction`` the user's
    claim it came from, when they differ (a damped forward step), for the message.
    """
    if outcome.violated:
        if throw:
            raise_violation(name, ratio_bound, contraction, outcome.observed_ratio)
        error_bound = None
    status = outcome.status
    solution = Solution(
        value=outcome.value,
        status=status,
        method=name,
        num_steps=len(outcome.history),
        num_vjp=num_vjp,
        num_jvp=num_jvp,
        residual_norms=tuple(r * unit for r in outcome.history),
        tolerance=None if outcome.threshold is None else outcome.threshold * unit,
        # A failed solve keeps its last finite iterate, which a finite bound still certifies.
        error_bound=error_bound * unit if error_bound is not None and math.isfinite(error_bound) else None,
        note=note or outcome.note,
        num_f_evals=num_f_evals,
        contraction_violated=outcome.violated,
        stats=types.MappingProxyType(dict(outcome.stats)),
    )
    if throw and not solution.converged:
        raise ConvergenceError(solution)
    return solution


def settled(
    value: Array,
    input_norm: float,
    *,
    name: str,
    threshold: float | None,
    note: str,
    nonfinite_note: str,
    certified: bool,
    throw: bool,
) -> Solution:
    """The Solution of a solve with nothing to iterate: SUCCESS with ``value`` (exact, error bound 0 when
    ``certified``), or, for a non-finite input of norm ``input_norm``, NONFINITE with ``value`` (zeros)."""
    finite = math.isfinite(input_norm)
    outcome = Outcome(
        value=value,
        state=None,
        status=Status.SUCCESS if finite else Status.NONFINITE,
        history=[] if finite else [input_norm],
        threshold=threshold,
        note=note if finite else nonfinite_note,
    )
    if not finite:
        outcome.stats["nonfinite_input"] = True
    return finish(outcome, name=name, ratio_bound=None, error_bound=0.0 if certified and finite else None, throw=throw)

"""The driver of a batch of independent samples: each its own stopping test, status, history and bound.

:func:`iterate_samples` runs a solver's ``init``/``step`` on the ``(b, m)`` rows of the samples
still iterating (:mod:`rbp_core._samples`). Per iteration it brings every monitored per-row norm to
the host in one transfer and applies to each sample the tests :func:`rbp_core._iterate.iterate`
applies to a whole solve: tolerance, budget, divergence, finiteness, breakdown and the claimed
contraction. A sample that is done leaves the rows: its final value is kept (never written in
place into anything of the caller's), the solver's state is cut to the remaining rows, and the
callbacks evaluate only those from then on. :func:`finish_samples` builds the Solution with the
per-sample results and a summary for the batch.

A solver whose host logic is per solve (a small least-squares problem on the host, a
confirmation of the true residual) runs here through its ``per_sample()`` form (Anderson, GMRES);
one without such a form is refused with its name (:func:`check_batchable`). A solver that forms
its iterate on request gives ``iterate(problem, state, previous=False)``, asked only when samples
end.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import gt, le, mul
from typing import Any

import array_api_compat

from ._errors import ConvergenceError
from ._iterate import Limits, raise_violation
from ._samples import RowOps, SampleCallback, index_array
from ._solution import Solution, Status
from ._typing import Array

__all__ = ["SampleOutcome", "check_batchable", "finish_samples", "iterate_samples", "per_sample"]

SEVERITY = (Status.NONFINITE, Status.DIVERGED, Status.BREAKDOWN, Status.MAX_STEPS)
"""The batch's status is the first of these that a sample ended with (SUCCESS when all converged)."""

_NAMED = 10
"""How many failing samples the note names before it counts the rest."""


def per_sample(solver: Any, label: str) -> Any:
    """The solver that runs per sample: its ``per_sample()`` form if it has one, else itself if it can."""
    form = getattr(solver, "per_sample", None)
    if form is not None:
        return form()
    check_batchable(solver, label)
    return solver


def check_batchable(solver: object, label: str) -> None:
    """Refuse a solver with no per-sample form, naming it and what works instead."""
    host = [m for m in ("host_update", "confirm", "solution") if getattr(solver, m, None) is not None]
    if host:
        msg = (
            f"{label} does not take batch_axis yet: its {', '.join(host)} works on the whole batch, not per "
            "sample, and it has no per_sample() form. Every solver of rbp-core works per sample; or solve "
            "without batch_axis"
        )
        raise NotImplementedError(msg)


@dataclass
class SampleOutcome:
    """What the loop found for each sample (in the units of the solve), and the final rows ``(B, m)``."""

    value: Array
    status: list[Status]
    history: list[list[float]]
    threshold: list[float | None]
    last: list[tuple[float, ...]]
    previous_scale: list[float]
    notes: list[str]
    observed_ratio: float = 0.0
    violated: bool = False
    stats: dict[str, object] = field(default_factory=dict)
    states: dict[int, Any] = field(default_factory=dict)  # each sample's row of its last state (keep_states)
    final_state: Any = None


def compact(state: Any, keep: Array, b: int) -> Any:
    """``state`` with only the rows ``keep`` of each of its arrays that has ``b`` rows (tuples and lists
    walked; an object with a ``compact(keep, b)`` method does it itself)."""
    own = getattr(state, "compact", None)
    if own is not None:
        return own(keep, b)
    if isinstance(state, tuple | list):
        return type(state)(compact(s, keep, b) for s in state)
    if array_api_compat.is_array_api_obj(state) and state.ndim >= 1 and state.shape[0] == b:
        return array_api_compat.array_namespace(state).take(state, keep, axis=0)
    return state


class _Finals:
    """The final rows of the samples that are done, in one ``(B, m)`` array updated by whole blocks."""

    __slots__ = ("rows", "xp")

    def __init__(self, rows: Array) -> None:
        self.xp = array_api_compat.array_namespace(rows)
        self.rows = rows

    def put(self, samples: Sequence[int], block: Array) -> None:
        """Rows ``samples`` become ``block``'s rows (a new array: nothing is written in place)."""
        xp, batch = self.xp, self.rows.shape[0]
        where = dict(zip(samples, range(batch, batch + len(samples)), strict=True))
        gather = index_array(xp, [where.get(s, s) for s in range(batch)], block)
        self.rows = xp.take(xp.concat([self.rows, block]), gather, axis=0)


def iterate_samples(
    solver: object,
    problem: object,
    start: tuple[object, Array, tuple[Sequence[Array], Any] | None],
    *,
    ops: RowOps,
    callbacks: Sequence[SampleCallback],
    active: list[int],
    finals: Array,
    forward: bool,
    limits: Limits,
    scale: list[float],
    ratio_bound: float | None,
    slack: list[float],
    rel_slack: float,
    unit: float = 1.0,
    settled: dict[int, tuple[Status, list[float]]] | None = None,
    keep_states: bool = False,
) -> SampleOutcome:
    """Run ``solver`` on the rows of the samples ``active`` (positions in the batch) until each has a status.

    ``finals`` holds every sample's row to begin with (the start of a forward solve, zeros for an
    adjoint one); ``settled`` the samples that needed no iteration, with their status and history.
    ``scale`` and ``slack`` are per sample (all of the batch); with ``forward`` the scale of each
    sample's relative test is the norm of its new iterate, the second monitored norm. With
    ``keep_states`` the outcome holds each sample's row of the state it ended with (for its
    certificate).
    """
    xp = ops.xp
    batch = len(scale)
    status: list[Status | None] = [None] * batch
    history: list[list[float]] = [[] for _ in range(batch)]
    notes = [""] * batch
    last: list[tuple[float, ...]] = [()] * batch
    previous = list(scale)
    for s, (st, settled_history) in (settled or {}).items():
        status[s], history[s] = st, list(settled_history)
    rtol, factor, max_steps = limits.rtol, limits.divergence_factor, limits.max_steps
    atol = limits.atol / unit
    thr = [-1.0 if rtol is None else max(rtol * sc, atol) for sc in scale]
    fac = math.inf if factor is None else factor
    successive = bool(getattr(solver, "successive_images", False)) and ratio_bound is not None
    bound = ratio_bound if successive and ratio_bound is not None else -1.0
    breakdown = getattr(solver, "breakdown", None)
    observed = 0.0
    violated = False
    done = _Finals(finals)
    states: dict[int, Any] = {}
    state, x, first = start
    # Per active sample, aligned with ``active``: its history, threshold, smallest and last residual,
    # scale (and the one before), slack of the contraction check, and last monitored norms.
    hist: list[list[float]] = [history[s] for s in active]
    a_thr = [thr[s] for s in active]
    a_best = [math.inf] * len(active)
    a_prev = [-1.0] * len(active)
    a_scale = [scale[s] for s in active]
    a_before = list(a_scale)
    a_slack = [slack[s] for s in active]
    a_last: list[tuple[float, ...]] = [()] * len(active)

    iterate = getattr(solver, "iterate", None)  # a solver that forms its iterate on request (GMRES)

    def end(ended: list[tuple[int, int]], new: Array | None, old: Array | None) -> None:
        """Record the samples that ended (position, 1 for the new iterate or 0 for the old) and keep their rows."""
        if new is None and ended:
            new = iterate(problem, state)  # type: ignore[misc]
        if old is None and any(w == 0 for _, w in ended):
            old = iterate(problem, state, previous=True)  # type: ignore[misc]
        for p, _ in ended:
            s = active[p]
            thr[s], last[s], previous[s] = a_thr[p], a_last[p], a_before[p]
            if keep_states:
                states[s] = compact(state, index_array(xp, [p], new), len(active))
        for source, which in ((new, 1), (old, 0)):
            pos = [p for p, w in ended if w == which]
            if pos:
                done.put([active[p] for p in pos], xp.take(source, index_array(xp, pos, source), axis=0))

    if first is not None:
        cols = ops.to_host(first[0])
        start_is_iteration = getattr(solver, "start_is_iteration", False)
        ended: list[tuple[int, int]] = []
        for i, s in enumerate(active):
            r = _norm(ops, cols[0][i], first[1][0], i)
            if start_is_iteration:
                history[s].append(r)
                if not math.isfinite(r):
                    status[s] = Status.NONFINITE
                elif r <= a_thr[i]:
                    status[s] = Status.SUCCESS
                a_best[i] = r
            elif not math.isfinite(r):
                history[s].append(r)
                status[s] = Status.NONFINITE
            elif r <= a_thr[i]:
                status[s] = Status.SUCCESS
            else:
                a_best[i] = r
            a_prev[i] = r
            if status[s] is None and len(history[s]) >= max_steps:
                status[s] = Status.SUCCESS if rtol is None else Status.MAX_STEPS
            if status[s] is not None:
                ended.append((i, 1))
        end(ended, x, x)
        keep = _kept(len(active), ended)
        hist, a_thr, a_best, a_prev, a_scale, a_before, a_slack, a_last = _select(
            keep, hist, a_thr, a_best, a_prev, a_scale, a_before, a_slack, a_last
        )
        state, x, active = _leave(state, x, active, keep, callbacks, done)
    elif max_steps <= 0:
        for s in active:
            status[s] = Status.SUCCESS if rtol is None else Status.MAX_STEPS
        active = []
    count = len(history[active[0]]) if active else 0  # every active sample has run as many steps
    confirm_rows = getattr(solver, "confirm_rows", None)  # a recurrence whose true residual decides
    confirming: list[int] = []

    while active:
        state, x_new, sqs, vectors = solver.step(problem, state, ops)  # type: ignore[attr-defined]
        cols = ops.to_host(sqs)  # the one transfer of this iteration
        count += 1
        rs = list(map(math.sqrt, cols[0]))  # a NaN stays NaN, an inf inf: the screen below sends both on
        # The common step, for the batch at once: every norm positive and finite, no sample at its
        # tolerance, budget, divergence or breakdown test, no contraction to check. It keeps only
        # what a later step reads (histories, last residuals, scales, smallest residuals); what a
        # sample reports when it ends is set by the step that ends it, below.
        if bound < 0.0 and count < max_steps and min(rs) > 0.0 and math.isfinite(sum(rs)):
            if forward:
                hns = list(map(math.sqrt, cols[1]))
                fast = min(hns) > 0.0 and math.isfinite(sum(hns))
                if fast and rtol is not None:
                    fast = min(rs) > atol and not any(map(le, rs, map(mul, hns, repeat(rtol))))
            else:
                fast = not any(map(le, rs, a_thr))
            if fast and fac < math.inf:
                fast = not any(map(gt, rs, map(mul, a_best, repeat(fac))))
            if fast and breakdown is not None and count > 1:
                fast = not any(map(gt, rs, a_prev))
            if fast:
                for h, r in zip(hist, rs, strict=True):
                    h.append(r)
                a_prev = rs
                if fac < math.inf:
                    a_best = list(map(min, a_best, rs))
                if forward:
                    a_before, a_scale = a_scale, hns
                x = x_new
                continue
        ended = []
        for i, s in enumerate(active):
            r = _norm(ops, cols[0][i], vectors[0], i)
            if forward:
                hn = _norm(ops, cols[1][i], vectors[1], i)
                a_last[i] = (r, hn)
                a_before[i], a_scale[i] = a_scale[i], hn
                if rtol is not None:
                    a_thr[i] = max(rtol * hn, atol)
                if not hn < math.inf:
                    r = math.nan
                a_slack[i] = rel_slack * hn
            else:
                a_last[i] = (r,)
            p = a_prev[i]
            if breakdown is not None and p >= 0.0 and not r <= p:
                one = index_array(xp, [i], x_new)
                if breakdown(problem, compact(state, one, len(active))):
                    hist[i].append(p)
                    status[s] = Status.BREAKDOWN
                    ended.append((i, 0))
                    continue
            if not r < math.inf:
                hist[i].append(r)
                status[s] = Status.NONFINITE
                ended.append((i, 0))
                continue
            hist[i].append(r)
            if bound >= 0.0 and p > 0.0:
                observed = max(observed, r / p)
                if r > bound * p * (1.0 + rel_slack) + a_slack[i]:
                    violated = True
            a_prev[i] = r
            if r <= a_thr[i] and confirm_rows is not None:
                confirming.append(i)  # the true residual decides, below
                continue
            if r <= a_thr[i]:
                status[s] = Status.SUCCESS
            elif r > fac * a_best[i]:
                notes[s] = (
                    f"it reached {r * unit:.3e}, {r / a_best[i]:.3g} times its smallest {a_best[i] * unit:.3e} "
                    f"(divergence_factor={fac:g})"
                )
                status[s] = Status.DIVERGED
            else:
                a_best[i] = min(a_best[i], r)
                if count >= max_steps:
                    status[s] = Status.SUCCESS if rtol is None else Status.MAX_STEPS
            if status[s] is not None:
                ended.append((i, 1))
        if confirming:
            # A recurrence's residual can drift below the true one: the true residuals of the rows
            # it says converged decide (one product for the batch, one transfer), and the rows above
            # their threshold go on, restarted by the solver from their iterates.
            assert confirm_rows is not None
            state, true_sq = confirm_rows(problem, state, confirming, ops)
            (trues,) = ops.to_host([true_sq])
            for i, sq in zip(confirming, trues, strict=True):
                r = math.sqrt(sq) if 0.0 < sq < math.inf else (0.0 if sq == 0.0 else math.nan)
                hist[i][-1] = a_prev[i] = r
                s = active[i]
                if not r < math.inf:
                    status[s] = Status.NONFINITE
                elif r <= a_thr[i]:
                    status[s] = Status.SUCCESS
                elif count >= max_steps:
                    status[s] = Status.MAX_STEPS
                if status[s] is not None:
                    ended.append((i, 1))
            confirming = []
        end(ended, x_new, x)
        keep = _kept(len(active), ended)
        hist, a_thr, a_best, a_prev, a_scale, a_before, a_slack, a_last = _select(
            keep, hist, a_thr, a_best, a_prev, a_scale, a_before, a_slack, a_last
        )
        state, x, active = _leave(state, x_new, active, keep, callbacks, done)

    stats = getattr(solver, "stats", None)
    return SampleOutcome(
        value=done.rows,
        status=[Status.SUCCESS if st is None else st for st in status],
        history=history,
        threshold=[None if rtol is None else t for t in thr],
        last=last,
        previous_scale=previous,
        notes=notes,
        observed_ratio=observed,
        violated=violated,
        stats={} if stats is None else dict(stats(state)),
        states=states,
        final_state=state,
    )


def _select(keep: list[int], *lists: list[Any]) -> tuple[list[Any], ...]:
    """Each of ``lists`` at the positions ``keep``."""
    return tuple([v[p] for p in keep] for v in lists)


def _kept(b: int, ended: list[tuple[int, int]]) -> list[int]:
    """The positions of the ``b`` active samples that did not end."""
    gone = {p for p, _ in ended}
    return [p for p in range(b) if p not in gone]


def _norm(ops: RowOps, sq: float, vectors: tuple[Array, Array | None], i: int) -> float:
    """Row ``i``'s norm from its sum of squares ``sq``; the rows themselves only when ``sq`` is 0, inf or NaN."""
    if 0.0 < sq < math.inf:
        return math.sqrt(sq)
    x, minus = vectors
    return ops.row_norm(sq, x[i, :], None if minus is None else minus[i, :])


def _leave(
    state: Any,
    x: Array,
    active: list[int],
    keep: list[int],
    callbacks: Sequence[SampleCallback],
    done: _Finals,
) -> tuple[Any, Array, list[int]]:
    """Only the samples at positions ``keep`` go on: the state, the iterate and the callbacks keep their rows."""
    if len(keep) == len(active):
        return state, x, active
    remaining = [active[p] for p in keep]
    if not remaining:
        return state, x, remaining
    xp = done.xp
    rows = index_array(xp, keep, done.rows)
    for cb in callbacks:
        cb.set_active(remaining, done.rows, done.rows)
    return compact(state, rows, len(active)), None if x is None else xp.take(x, rows, axis=0), remaining


def finish_samples(
    outcome: SampleOutcome,
    *,
    name: str,
    ratio_bound: float | None,
    contraction: float | None = None,
    num_vjp: int = 0,
    num_jvp: int = 0,
    num_f_evals: int = 0,
    num_sample_evals: int = 0,
    error_bounds: Sequence[float | None] | None = None,
    value: Array,
    unit: float = 1.0,
    throw: bool,
) -> Solution:
    """The Solution of a batch: per-sample results and their summary; raise if asked and a sample failed."""
    if outcome.violated:
        if throw:
            raise_violation(name, ratio_bound, contraction, outcome.observed_ratio)
        error_bounds = None
    statuses = tuple(outcome.status)
    bounds: tuple[float | None, ...] = (
        tuple(None if b is None or not math.isfinite(b) else b * unit for b in error_bounds)
        if error_bounds is not None
        else (None,) * len(statuses)
    )
    failed = [s for s, st in enumerate(statuses) if st is not Status.SUCCESS]
    status = next((st for st in SEVERITY if st in statuses), Status.SUCCESS)
    longest = max((len(h) for h in outcome.history), default=0)
    largest = [-math.inf] * longest  # per iteration, the largest residual of the samples still iterating
    for h in outcome.history:
        largest[: len(h)] = map(max, largest[: len(h)], h)
    summary = tuple(r * unit for r in largest)
    thresholds = tuple(None if t is None else t * unit for t in outcome.threshold)
    named = ", ".join(
        f"{s} ({statuses[s].name}{': ' + outcome.notes[s] if outcome.notes[s] else ''})" for s in failed[:_NAMED]
    )
    more = f" and {len(failed) - _NAMED} more" if len(failed) > _NAMED else ""
    note = f"{len(failed)} of {len(statuses)} samples did not converge: {named}{more}" if failed else ""
    solution = Solution(
        value=value,
        status=status,
        method=name,
        num_steps=longest,
        num_vjp=num_vjp,
        num_jvp=num_jvp,
        residual_norms=summary,
        tolerance=None if any(t is None for t in thresholds) else max(thresholds, default=None),  # type: ignore[type-var]
        error_bound=None if any(b is None for b in bounds) else max(bounds, default=None),  # type: ignore[type-var]
        note=note,
        num_f_evals=num_f_evals,
        contraction_violated=outcome.violated,
        stats=types.MappingProxyType(dict(outcome.stats)),
        num_sample_evals=num_sample_evals,
        sample_status=statuses,
        sample_num_steps=tuple(len(h) for h in outcome.history),
        sample_residual_norms=tuple(tuple(r * unit for r in h) for h in outcome.history),
        sample_tolerance=thresholds,
        sample_error_bound=bounds,
    )
    if throw and not solution.converged:
        raise ConvergenceError(solution)
    return solution

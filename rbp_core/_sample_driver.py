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


def compact(state: Any, keep: Array, b: int, taken: dict[int, Array] | None = None) -> Any:
    """``state`` with only the rows ``keep`` of each of its arrays that has ``b`` rows (tuples and lists
    walked; an object with a ``compact(keep, b)`` method does it itself). ``taken`` remembers the
    arrays already cut, so that one held twice is cut once."""
    own = getattr(state, "compact", None)
    if own is not None:
        return own(keep, b)
    if isinstance(state, tuple | list):
        return type(state)(compact(s, keep, b, taken) for s in state)
    if array_api_compat.is_array_api_obj(state) and state.ndim >= 1 and state.shape[0] == b:
        return _take(array_api_compat.array_namespace(state), state, keep, taken)
    return state


def _take(xp: Any, x: Array, keep: Array, taken: dict[int, Array] | None) -> Array:
    """The rows ``keep`` of ``x``, once per array in ``taken``."""
    if taken is None:
        return xp.take(x, keep, axis=0)
    out = taken.get(id(x))
    if out is None:
        out = taken[id(x)] = xp.take(x, keep, axis=0)
    return out


class _Finals:
    """The final rows of the samples that are done: a ``(B, m)`` array and the blocks put since it was
    formed, which :attr:`rows` gathers into a new array when asked (nothing is written in place)."""

    __slots__ = ("_blocks", "_rows", "xp")

    def __init__(self, rows: Array) -> None:
        self.xp = array_api_compat.array_namespace(rows)
        self._rows = rows
        self._blocks: list[tuple[Sequence[int], Array]] = []

    def put(self, samples: Sequence[int], block: Array) -> None:
        """Rows ``samples`` become ``block``'s rows."""
        self._blocks.append((samples, block))

    @property
    def like(self) -> Array:
        """An array of the batch's dtype and device (without gathering the blocks)."""
        return self._rows

    @property
    def rows(self) -> Array:
        """Every sample's final row so far, ``(B, m)``."""
        if self._blocks:
            xp, batch = self.xp, self._rows.shape[0]
            where: dict[int, int] = {}
            for samples, _block in self._blocks:
                where.update(zip(samples, range(batch + len(where), batch + len(where) + len(samples)), strict=True))
            gather = index_array(xp, [where.get(s, s) for s in range(batch)], self._rows)
            self._rows = xp.take(xp.concat([self._rows, *(b for _, b in self._blocks)]), gather, axis=0)
            self._blocks = []
        return self._rows


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

    screen = _Screen(forward=forward, rtol=rtol, atol=atol, factor=fac, breakdown=breakdown is not None)
    while active:
        state, x_new, sqs, vectors = solver.step(problem, state, ops)  # type: ignore[attr-defined]
        cols = ops.to_host(sqs)  # the one transfer of this iteration
        count += 1
        # The common step, for the batch at once: no sample at its tolerance, budget, divergence or
        # breakdown test and no contraction to check. Its squared norms wait in the screen; the
        # histories and the per-sample values a later test reads are brought up to date from them
        # before any sample is looked at on its own (below).
        if bound < 0.0 and count < max_steps and screen.passes(cols, a_thr, a_best, a_prev, count):
            x = x_new
            continue
        if screen.pending:
            a_prev, a_best, a_before, a_scale = screen.flush(hist, a_prev, a_best, a_before, a_scale)
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
            chosen = set(confirming)
            mask = xp.asarray([i in chosen for i in range(len(active))], device=array_api_compat.device(sqs[0]))
            state, true_sq = confirm_rows(problem, state, mask, ops)
            (trues,) = ops.to_host([xp.take(true_sq, index_array(xp, confirming, true_sq), axis=0)])
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
        screen.reset()

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
    like = x if x is not None else done.like
    rows = index_array(xp, keep, like)
    for cb in callbacks:
        cb.set_active(remaining, None if cb.takes_indices else done.rows, like)
    taken: dict[int, Array] = {}
    return compact(state, rows, len(active), taken), None if x is None else _take(xp, x, rows, taken), remaining


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
    summary = tuple(largest) if unit == 1.0 else tuple(r * unit for r in largest)
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
        sample_residual_norms=tuple(tuple(h) if unit == 1.0 else tuple(r * unit for r in h) for h in outcome.history),
        sample_tolerance=thresholds,
        sample_error_bound=bounds,
    )
    if throw and not solution.converged:
        raise ConvergenceError(solution)
    return solution


class _Screen:
    """The test of the common step, on the squared norms of all active samples at once.

    :meth:`passes` is true only when no active sample meets its tolerance, divergence or breakdown
    test at this step; it is conservative by a relative margin of ``2**-40`` (far above the few
    roundings between a squared norm and the tests on norms), so a sample near a test goes to the
    exact per-sample tests. A batch-wide bound decides first (the smallest squared residual against
    the largest threshold); the per-sample comparison runs only when that bound is not enough. The
    squared norms of the steps that pass wait in :attr:`pending`; :meth:`flush` turns them into the
    histories and per-sample values the exact tests read, bit for bit as if each step had been
    recorded on its own. :meth:`reset` forgets the limits derived from per-sample values that the
    exact tests change.
    """

    __slots__ = (
        "_best2",
        "_breakdown",
        "_c",
        "_fac2",
        "_floor2",
        "_forward",
        "_prev2",
        "_shrink",
        "_thr2",
        "pending_h",
        "pending_r",
    )

    _MARGIN = 1.0 + 2.0**-40

    def __init__(self, *, forward: bool, rtol: float | None, atol: float, factor: float, breakdown: bool) -> None:
        m = self._MARGIN
        self._forward = forward
        self._c = -1.0 if rtol is None else (rtol * m) ** 2  # r^2 > c hn^2 means r > rtol hn
        self._floor2 = (atol * m) ** 2
        self._fac2 = math.inf if factor == math.inf else (factor / m) ** 2
        self._breakdown = breakdown
        self._shrink = 1.0 / (m * m)
        self.pending_r: list[Sequence[float]] = []
        self.pending_h: list[Sequence[float]] = []
        self._thr2: tuple[float, list[float]] | None = None
        self._best2: float | None = None
        self._prev2: list[float] | None = None

    @property
    def pending(self) -> bool:
        """Whether steps wait to be recorded."""
        return bool(self.pending_r)

    def reset(self) -> None:
        """The exact tests ran: the derived limits are recomputed from the per-sample values when next needed."""
        self._thr2 = self._best2 = self._prev2 = None

    def passes(
        self, cols: Sequence[Sequence[float]], thr: list[float], best: list[float], prev: list[float], count: int
    ) -> bool:
        """Whether this step (its squared norms ``cols``) is common for every active sample; if so it is kept."""
        sq = cols[0]
        lo = min(sq)
        if not (lo > 0.0 and math.isfinite(sum(sq))):
            return False
        if self._forward:
            hsq = cols[1]
            if not (min(hsq) > 0.0 and math.isfinite(sum(hsq))):
                return False
            c = self._c
            if c >= 0.0 and not (
                lo > self._floor2 and (lo > c * max(hsq) or not any(map(le, sq, map(mul, hsq, repeat(c)))))
            ):
                return False
        else:
            if self._thr2 is None:
                thr2 = [(t * self._MARGIN) ** 2 if t >= 0.0 else -1.0 for t in thr]
                self._thr2 = (max(thr2, default=-1.0), thr2)
            top, thr2 = self._thr2
            if not (lo > top or not any(map(le, sq, thr2))):
                return False
        if self._fac2 < math.inf:
            best2 = self._best2
            if best2 is None:
                best2 = min(best, default=math.inf) ** 2
            if not max(sq) <= self._fac2 * best2:
                return False
            self._best2 = min(best2, lo)
        if self._breakdown and count > 1:
            prev2 = self._prev2
            if prev2 is None:
                prev2 = [p * p * self._shrink if p >= 0.0 else math.inf for p in prev]
            if any(map(gt, sq, prev2)):
                return False
            self._prev2 = list(map(mul, sq, repeat(self._shrink)))
        self.pending_r.append(sq)
        if self._forward:
            self.pending_h.append(cols[1])
        return True

    def flush(
        self, hist: list[list[float]], prev: list[float], best: list[float], before: list[float], scale: list[float]
    ) -> tuple[list[float], list[float], list[float], list[float]]:
        """Record the waiting steps: each sample's history, last and smallest residual, and (forward) its
        last two iterate norms; returns the new ``(prev, best, before, scale)``."""
        roots = [list(map(math.sqrt, c)) for c in self.pending_r]
        for h, col in zip(hist, zip(*roots, strict=True), strict=True):
            h.extend(col)
        prev = roots[-1]
        if self._fac2 < math.inf:
            best = list(map(min, best, *roots))
        if self._forward:
            tail = [list(map(math.sqrt, c)) for c in self.pending_h[-2:]]
            before, scale = (tail[0], tail[1]) if len(tail) == 2 else (scale, tail[0])
        self.pending_r, self.pending_h = [], []
        return prev, best, before, scale

"""The forward and adjoint solves of a batch of independent samples (``batch_axis``), and the per-sample policy.

:func:`rbp_core.fixed_point` and :func:`rbp_core.solve_adjoint` come here when given a
``batch_axis``; validation of the solver, the contraction and the inputs is theirs. Each sample
is its own problem: its own norms, tolerance, status, history and error bound; one that needs no
iteration (a non-finite start, a zero right-hand side) is settled before the loop, and one that
is done leaves the batch (:mod:`rbp_core._sample_driver`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import array_api_compat

from ._callbacks import same_kind
from ._certificate import residual_bound_from_norms
from ._errors import BackwardFailureWarning, ConvergenceError
from ._floats import eps, scale_pow2, unit_scale
from ._iterate import check_ratio
from ._norms import norm
from ._operator import AdjointOperator
from ._protocols import AdjointMethod, ForwardSolver
from ._sample_driver import finish_samples, iterate_samples, per_sample
from ._samples import RowOps, SampleCallback, SampleLayout, check_batch_axis, index_array
from ._solution import Solution, Status
from ._typing import Array, Namespace

__all__ = ["fixed_point_samples", "sample_cotangent", "solve_adjoint_samples"]


def _mask_rows(xp: Namespace, rows: Array, keep: list[bool]) -> Array:
    """``rows`` with the rows not in ``keep`` set to zero (a new array)."""
    mask = xp.asarray(keep, device=array_api_compat.device(rows))
    return xp.where(xp.reshape(mask, (-1, 1)), rows, xp.zeros_like(rows))


def _subset(xp: Namespace, rows: Array, active: list[int]) -> Array:
    return rows if len(active) == rows.shape[0] else xp.take(rows, index_array(xp, active, rows), axis=0)


def _init(solver: Any, f: Any, h0: Array, ops: RowOps, *, secants: bool) -> Any:
    """``solver.init``, told whether a contraction is claimed when it collects secant pairs for one."""
    if getattr(solver, "sample_pairs", None) is not None:
        return solver.init(f, h0, ops, secants=secants)
    return solver.init(f, h0, ops)


def fixed_point_samples(
    f: Any,
    h0: Array,
    solver: ForwardSolver,
    *,
    xp: Namespace,
    contraction: float | None,
    batch_axis: object,
    takes_indices: bool,
    throw: bool,
) -> Solution:
    """:func:`rbp_core.fixed_point` with a batch axis: every sample on its own."""
    solver = per_sample(solver, type(solver).__name__)
    layout = SampleLayout(xp, h0, check_batch_axis(batch_axis, h0, "h0"))
    ops = RowOps(xp)
    rows0 = layout.rows(h0)
    mu = contraction
    limits = solver.limits(xp, h0.dtype)
    m = None if mu is None else solver.step_contraction(mu)
    root_eps = math.sqrt(eps(xp, h0.dtype))
    hnorms = ops.norms(rows0) if rows0.shape[0] and layout.row_size else [0.0] * rows0.shape[0]
    finite = [math.isfinite(h) for h in hnorms]
    settled = {s: (Status.NONFINITE, [h]) for s, h in enumerate(hnorms) if not finite[s]}
    if not layout.row_size:
        settled = {s: (Status.SUCCESS, []) for s in range(layout.batch)}
    finals = rows0 if all(finite) else _mask_rows(xp, rows0, finite)
    active = [s for s in range(layout.batch) if s not in settled]
    cb = SampleCallback(f, "f", layout, h0, takes_indices=takes_indices, linear=False)
    cb.set_active(active, finals, rows0)
    x0 = _subset(xp, rows0, active)
    outcome = iterate_samples(
        solver,
        cb,
        _init(solver, cb, x0, ops, secants=mu is not None) if active else (None, x0, None),
        ops=ops,
        callbacks=[cb],
        active=active,
        finals=finals,
        forward=True,
        limits=limits,
        scale=list(hnorms),
        ratio_bound=m,
        slack=[root_eps * h for h in hnorms],
        rel_slack=root_eps,
        settled=settled,
        keep_states=mu is not None,
    )
    bounds = None
    if mu is not None and layout.batch:
        pairs = getattr(solver, "sample_pairs", None)
        if pairs is not None and outcome.final_state is not None:
            scale = max((h for h in hnorms + outcome.previous_scale if math.isfinite(h)), default=0.0)
            _check_pairs(ops, pairs(outcome.final_state), outcome, mu, root_eps * scale, root_eps)
        like = rows0[0, :]
        bounds = [
            None
            if st is Status.NONFINITE or not last
            else solver.error_bound(xp, like, mu, last, outcome.previous_scale[s], outcome.states.get(s))
            for s, (st, last) in enumerate(zip(outcome.status, outcome.last, strict=True))
        ]
        bounds = [0.0 if s in settled and outcome.status[s] is Status.SUCCESS else b for s, b in enumerate(bounds)]
    value = layout.restore(outcome.value)
    if not active:  # nothing iterated: the rows may still be views of h0, which is never handed back
        value = xp.asarray(value, copy=True)
    return finish_samples(
        outcome,
        name=solver.name,
        ratio_bound=mu if m is None else m,
        contraction=mu,
        num_f_evals=cb.calls,
        num_sample_evals=cb.evaluations,
        error_bounds=bounds,
        value=value,
        throw=throw,
    )


def solve_adjoint_samples(
    vjp: Any,
    g: Array,
    method: AdjointMethod,
    *,
    xp: Namespace,
    jvp: Any,
    z0: Array | None,
    contraction: float | None,
    batch_axis: object,
    takes_indices: bool,
    throw: bool,
) -> Solution:
    """:func:`rbp_core.solve_adjoint` with a batch axis: every sample on its own."""
    method = per_sample(method, type(method).__name__)
    layout = SampleLayout(xp, g, check_batch_axis(batch_axis, g, "g"))
    ops = RowOps(xp)
    mu = contraction
    cb_vjp = SampleCallback(vjp, "vjp", layout, g, takes_indices=takes_indices, linear=True)
    cb_jvp = (
        SampleCallback(jvp, "jvp", layout, g, takes_indices=takes_indices, linear=True) if method.needs_jvp else None
    )
    callbacks = [cb for cb in (cb_vjp, cb_jvp) if cb is not None]
    A = AdjointOperator(xp, cb_vjp, cb_jvp, checks_contraction=mu is not None)  # type: ignore[arg-type]
    limits = method.limits(xp, g.dtype)
    e, gs, _ = unit_scale(xp, g, norm(xp, g))
    unit = math.ldexp(1.0, e)
    rows_g = layout.rows(gs)
    gnorms = ops.norms(rows_g) if rows_g.shape[0] and layout.row_size else [0.0] * rows_g.shape[0]
    settled: dict[int, tuple[Status, list[float]]] = {}
    for s, gn in enumerate(gnorms):
        if not math.isfinite(gn):
            settled[s] = (Status.NONFINITE, [gn])
        elif gn == 0.0 or not layout.row_size:
            settled[s] = (Status.SUCCESS, [])
    active = [s for s in range(layout.batch) if s not in settled]
    finals = xp.zeros_like(rows_g)
    for cb in callbacks:
        cb.set_active(active, finals, rows_g)
    x0 = _subset(xp, rows_g, active)
    z0s = None
    if z0 is not None:
        same_kind(xp, z0, g, "z0")
        z0s = _subset(xp, layout.rows(scale_pow2(xp, z0, -e)), active)
    root_eps = math.sqrt(eps(xp, g.dtype))
    slack = [root_eps * gn / (1.0 - (mu or 0.0)) if math.isfinite(gn) else 0.0 for gn in gnorms]
    outcome = iterate_samples(
        method,
        A,
        method.init(A, x0, z0s, ops) if active else (None, x0, None),
        ops=ops,
        callbacks=callbacks,
        active=active,
        finals=finals,
        forward=False,
        limits=limits,
        scale=list(gnorms),
        ratio_bound=mu,
        slack=slack,
        rel_slack=root_eps,
        unit=unit,
        settled=settled,
    )
    nonfinite_input = tuple(s for s, (st, _) in settled.items() if st is Status.NONFINITE)
    if nonfinite_input:
        outcome.stats["nonfinite_input_samples"] = nonfinite_input
    bounds = None
    if mu is not None and layout.batch:
        _check_pairs(ops, A.pairs, outcome, mu, max(slack, default=0.0), root_eps)
        bounds = _residual_bounds(xp, ops, A, cb_vjp, rows_g, outcome, gnorms, settled, mu, slack, root_eps)
    return finish_samples(
        outcome,
        name=method.name,
        ratio_bound=mu,
        num_vjp=A.num_vjp,
        num_jvp=A.num_jvp,
        num_sample_evals=sum(cb.evaluations for cb in callbacks),
        error_bounds=bounds,
        value=scale_pow2(xp, layout.restore(outcome.value), e),
        unit=unit,
        throw=throw,
    )


def _check_pairs(
    ops: RowOps, pairs: list[tuple[Array, Array]], outcome: Any, mu: float, slack: float, rel: float
) -> None:
    """The ``(||J v||^2, ||v||^2)`` rows a method recorded, against the claimed ``mu``."""
    for image_sq, vector_sq in pairs:
        images, vectors = ops.to_host([image_sq, vector_sq])
        for a, b in zip(images, vectors, strict=True):
            check_ratio(outcome, math.sqrt(a), math.sqrt(b), mu, slack, rel)


def _residual_bounds(
    xp: Namespace,
    ops: RowOps,
    A: AdjointOperator,
    cb: SampleCallback,
    rows_g: Array,
    outcome: Any,
    gnorms: list[float],
    settled: dict[int, tuple[Status, list[float]]],
    mu: float,
    slack: list[float],
    rel: float,
) -> list[float | None]:
    """Each sample's certificate from a fresh residual ``g - z + J^T z`` (one VJP of the whole batch)."""
    z = outcome.value
    cb.set_active(list(range(rows_g.shape[0])), z, z)
    jz = A.vjp(z)
    rn, zn, jn = (ops.norms(v) for v in ((rows_g - z) + jz, z, jz))
    like = rows_g[0, :]
    bounds: list[float | None] = []
    for s in range(rows_g.shape[0]):
        if s in settled:
            bounds.append(0.0 if settled[s][0] is Status.SUCCESS else None)
            continue
        check_ratio(outcome, jn[s], zn[s], mu, slack[s], rel)
        bounds.append(residual_bound_from_norms(xp, like, mu, rn[s], gnorms[s], zn[s], jn[s]))
    return bounds


def sample_cotangent(
    solution: Solution, g: Array, label: str, on_failure: str, *, batch_axis: int, stacklevel: int
) -> Array:
    """The adjoint a batched solve hands on under ``on_failure``, sample by sample.

    The samples that converged keep their value whatever the policy; the failed ones raise
    (``"raise"``), get zero rows with a warning naming them (``"skip"``), or keep their last finite
    iterate, with the warning (``"warn"``) or silently (``"ignore"``). A sample with a non-finite
    ``g`` or a non-finite iteration never hands on anything: ``FloatingPointError`` names it.
    """
    statuses = solution.sample_status or ()
    bad_input = list(solution.stats.get("nonfinite_input_samples", ()))  # type: ignore[call-overload]
    if bad_input:
        msg = f"{label}: non-finite values (NaN or Inf) in the incoming gradient dL/dh* of samples {bad_input}"
        raise FloatingPointError(msg)
    failed = solution.failed_samples
    if not failed:
        return solution.value
    xp = array_api_compat.array_namespace(g)
    nonfinite = [s for s in failed if statuses[s] is Status.NONFINITE]
    if nonfinite and on_failure != "skip":
        if on_failure == "raise":
            raise ConvergenceError(solution)
        msg = f"{label}: non-finite values (NaN or Inf) in samples {nonfinite} of the backward solve; {solution.describe()}"
        raise FloatingPointError(msg)
    if on_failure == "raise":
        raise ConvergenceError(solution)
    if on_failure == "skip":
        layout = SampleLayout(xp, g, batch_axis)
        keep = [st is Status.SUCCESS for st in statuses]
        warnings.warn(
            f"backward solve {label}: samples {list(failed)} did not converge ({solution.describe()}); their "
            "gradients were skipped (zero cotangents), the other samples' are exact",
            BackwardFailureWarning,
            stacklevel=stacklevel + 1,
        )
        return layout.restore(_mask_rows(xp, layout.rows(solution.value), keep))
    if on_failure == "warn":
        warnings.warn(
            f"backward solve {label}: samples {list(failed)} did not converge ({solution.describe()}); their "
            "gradients are inexact",
            BackwardFailureWarning,
            stacklevel=stacklevel + 1,
        )
    return solution.value

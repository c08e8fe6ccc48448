"""The JAX adapter's traced driver: a solver's ``init``/``step`` under ``jax.lax.while_loop``.

Under ``jax.jit`` (and ``jax.vmap``) no array can become a Python number, so the host drivers of
the core cannot run. :func:`run` is their counterpart for one problem held as a ``(1, n)`` row:
it runs the same solver objects (each solver's ``per_sample()`` form where it has one, whose
decisions are array operations), and applies the same tests to the monitored norms as arrays:
the tolerance (relative to ``||g||``, or to the new iterate's norm for a forward solve), the
budget, the divergence factor, non-finite values (the last finite iterate is kept), a breakdown
that the solver reports, the true residual of a recurrence that says it converged, and the ratio
of successive norms against a claimed contraction. It returns the status as a code into
:data:`STATUSES`, the step count and the last residual norm, as arrays.

Under ``jax.vmap`` each problem of the batch runs its own loop: JAX keeps iterating the
problems that are not done and holds the others at their final values, so each result is that
of its own solve.

The first step runs before the loop (a solver's state may take its shape there: Anderson's
memory is made at its first evaluation); a problem already done at its start keeps its start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from rbp_core._iterate import Limits
from rbp_core._samples import RowOps
from rbp_core._solution import Status
from rbp_core._solvers._rows import RowState

__all__ = ["STATUSES", "Result", "TracedOps", "run"]

STATUSES: tuple[Status, ...] = (Status.SUCCESS, Status.MAX_STEPS, Status.DIVERGED, Status.NONFINITE, Status.BREAKDOWN)
"""The statuses by code: a traced solve reports ``STATUSES.index(status)``."""

_RUNNING = -1
_CODE = {status: code for code, status in enumerate(STATUSES)}


class TracedOps(RowOps):
    """The row operations with branches on traced predicates (``jax.lax.cond``)."""

    def cond(self, pred: Any, then: Callable[[Any], Any], otherwise: Callable[[Any], Any], operand: Any) -> Any:
        if isinstance(pred, bool):
            return then(operand) if pred else otherwise(operand)
        return jax.lax.cond(pred, lambda o: _arrays(then(o)), lambda o: _arrays(otherwise(o)), operand)


@dataclass(frozen=True)
class Result:
    """What a traced solve found: its value (rows), status code, step count, last residual norm, the
    threshold it was tested against and whether a claimed contraction was disproved, all arrays."""

    value: Any
    status: Any
    num_steps: Any
    residual_norm: Any
    tolerance: Any
    contraction_violated: Any


def _register(tree: Any) -> None:
    """Make the solver states in ``tree`` JAX pytrees (their slots the children), once per class."""
    if isinstance(tree, RowState):
        cls = type(tree)
        if cls not in _REGISTERED:
            _REGISTERED.add(cls)
            jax.tree_util.register_pytree_node(cls, *_slot_functions(cls))
        slots: tuple[str, ...] = tree.__slots__
        for slot in slots:
            _register(getattr(tree, slot, None))
    elif isinstance(tree, tuple | list):
        for item in tree:
            _register(item)


_REGISTERED: set[type] = set()


def _slot_functions(cls: type) -> tuple[Callable[[Any], tuple[tuple[Any, ...], None]], Callable[[None, Any], Any]]:
    """Flatten and unflatten for a state class: its slots, in order, are the children."""
    names: tuple[str, ...] = cls.__slots__  # type: ignore[attr-defined]

    def flatten(state: Any) -> tuple[tuple[Any, ...], None]:
        return tuple(getattr(state, n, None) for n in names), None

    def unflatten(_: None, children: Any) -> Any:
        out = cls()
        for name, value in zip(names, children, strict=True):
            setattr(out, name, value)
        return out

    return flatten, unflatten


def _arrays(tree: Any) -> Any:
    """``tree`` with Python numbers as JAX arrays (a loop carry, or the branches of a cond, must be arrays)."""

    def convert(leaf: Any) -> Any:
        if isinstance(leaf, bool):
            return jnp.asarray(leaf)
        if isinstance(leaf, int):
            return jnp.asarray(leaf, dtype=jnp.int32)
        return leaf

    return jax.tree_util.tree_map(convert, tree)


def run(
    solver: Any,
    problem: Any,
    start: tuple[Any, Any, Any],
    *,
    ops: TracedOps,
    limits: Limits,
    scale: Any,
    forward: bool,
    ratio_bound: float | None = None,
    rel_slack: float = 0.0,
) -> Result:
    """Run ``solver`` from ``start = solver.init(...)`` on one problem (rows of one sample) until it has a status.

    ``scale`` is the norm the relative tolerance applies to (``||g||``, or ``||h0||`` before a forward
    solve's first step, after which the new iterate's norm is); ``ratio_bound`` the constant that
    successive monitored norms are checked against, for a solver with ``successive_images``.
    """
    state, x, first = start
    _register(state)
    iterate = getattr(solver, "iterate", None)  # a solver that forms its iterate on request (GMRES)
    confirm = getattr(solver, "confirm_rows", None)  # a recurrence whose true residual decides (BiCGSTAB)
    broken = getattr(solver, "broken_rows", None)  # rows whose step broke down (BiCGSTAB)
    successive = bool(getattr(solver, "successive_images", False)) and ratio_bound is not None
    rtol, atol = limits.rtol, limits.atol
    factor = jnp.inf if limits.divergence_factor is None else limits.divergence_factor
    budget_status = _CODE[Status.SUCCESS] if rtol is None else _CODE[Status.MAX_STEPS]
    wide = scale.dtype
    inf = jnp.asarray(jnp.inf, dtype=wide)
    if x is None:
        assert iterate is not None, "a solver whose step returns no iterate forms it on request"
        x0 = iterate(problem, state)
    else:
        x0 = x
    threshold = jnp.asarray(-1.0, dtype=wide) if rtol is None else jnp.maximum(rtol * scale, atol)

    status = jnp.asarray(_RUNNING, dtype=jnp.int32)
    count = jnp.asarray(0, dtype=jnp.int32)
    best = inf
    prev = jnp.asarray(-1.0, dtype=wide)
    if first is not None:
        r0 = jnp.sqrt(first[0][0][0])
        finite = r0 < inf
        met = finite & (r0 <= threshold)
        status = jnp.where(~finite, _CODE[Status.NONFINITE], jnp.where(met, _CODE[Status.SUCCESS], _RUNNING))
        if getattr(solver, "start_is_iteration", False):
            count = count + 1
            best = jnp.where(finite, r0, inf)
        else:
            count = count + jnp.where(finite, 0, 1)  # a non-finite start is recorded, as the host drivers do
            best = jnp.where(finite & ~met, r0, inf)
        prev = r0
    status = jnp.where((status == _RUNNING) & (count >= limits.max_steps), budget_status, status)
    done_at_start = status != _RUNNING

    def advance(carry: dict[str, Any]) -> dict[str, Any]:
        """One step and its tests; a problem that is done keeps everything but the state."""
        running = carry["status"] == _RUNNING
        new_state, x_new, sqs, _ = solver.step(problem, carry["state"], ops)
        r = jnp.sqrt(sqs[0][0])
        thr = carry["threshold"]
        if forward:
            hn = jnp.sqrt(sqs[1][0])
            if rtol is not None:
                thr = jnp.maximum(rtol * hn, atol)
            r = jnp.where(hn < inf, r, jnp.nan)
        broke = jnp.asarray(False) if broken is None else broken(new_state)[0]
        if confirm is not None:  # a recurrence that says it converged: its true residual decides
            claimed = running & (r <= thr)
            new_state, true_sq = ops.cond(
                claimed,
                lambda s: confirm(problem, s, jnp.reshape(claimed, (1,)), ops),
                lambda s: (s, sqs[0]),
                new_state,
            )
            r = jnp.where(claimed, jnp.sqrt(true_sq[0]), r)
        failed = broke | ~(r < inf)
        count = carry["count"] + 1
        previous = carry["prev"]
        violated, observed = carry["violated"], carry["observed"]
        if successive:
            assert ratio_bound is not None
            compared = ~failed & (previous > 0)
            observed = jnp.where(compared, jnp.maximum(observed, r / jnp.where(compared, previous, 1.0)), observed)
            violated = violated | (compared & (r > ratio_bound * previous * (1.0 + rel_slack)))
        new_status = jnp.where(
            broke,
            _CODE[Status.BREAKDOWN],
            jnp.where(
                ~(r < inf),
                _CODE[Status.NONFINITE],
                jnp.where(
                    r <= thr,
                    _CODE[Status.SUCCESS],
                    jnp.where(
                        r > factor * carry["best"],
                        _CODE[Status.DIVERGED],
                        jnp.where(count >= limits.max_steps, budget_status, _RUNNING),
                    ),
                ),
            ),
        )
        out = dict(carry)
        out["state"] = new_state
        out["status"] = jnp.where(running, new_status, carry["status"])
        out["count"] = jnp.where(running, count, carry["count"])
        out["threshold"] = jnp.where(running, thr, carry["threshold"])
        out["best"] = jnp.where(running & ~failed, jnp.minimum(carry["best"], r), carry["best"])
        out["prev"] = jnp.where(running & ~failed, r, carry["prev"])
        out["residual"] = jnp.where(running, jnp.where(broke, previous, r), carry["residual"])
        out["violated"] = jnp.where(running, violated, carry["violated"])
        out["observed"] = jnp.where(running, observed, carry["observed"])
        out["stale"] = jnp.where(running, failed, carry["stale"])
        if x_new is not None:
            out["x"] = jnp.where(running & ~failed, x_new, carry["x"])
        return out

    carry = {
        "state": state,
        "status": status,
        "count": count,
        "threshold": threshold,
        "best": best,
        "prev": prev,
        "residual": jnp.where(prev >= 0, prev, inf) if first is not None else inf,
        "violated": jnp.asarray(False),
        "observed": jnp.zeros((), dtype=wide),
        "stale": jnp.asarray(False),
        "x": x0,
    }
    carry = _arrays(advance(_arrays(carry)))  # the first step, outside the loop
    _register(carry["state"])
    carry = jax.lax.while_loop(lambda c: c["status"] == _RUNNING, lambda c: _arrays(advance(c)), carry)

    if x is None and iterate is not None:  # the iterate of the last finite state, formed once
        value = jnp.where(
            carry["stale"], iterate(problem, carry["state"], previous=True), iterate(problem, carry["state"])
        )
    else:
        value = carry["x"]
    value = jnp.where(done_at_start, x0, value)
    return Result(
        value=value,
        status=carry["status"],
        num_steps=carry["count"],
        residual_norm=carry["residual"],
        tolerance=carry["threshold"],
        contraction_violated=carry["violated"],
    )

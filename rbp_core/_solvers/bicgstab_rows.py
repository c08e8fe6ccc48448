"""BiCGSTAB for a batch of independent adjoint systems: every sample its own scalars, restarts and breakdowns.

:class:`~rbp_core.BiCGSTAB` decides its restarts on the host, once per solve; with ``batch_axis``
each sample decides its own. :class:`BiCGSTABRows` (what ``BiCGSTAB.per_sample()`` gives the
per-sample driver) keeps every scalar as a ``(b,)`` device array and takes each decision with
masks: a row whose step is not finite goes back to the iterate before it and restarts (or, right
after a restart, reports a breakdown); a row near a breakdown of the recurrence restarts from its
new iterate; every other row goes on. A row whose recurrence says it converged is confirmed with
its true residual (:meth:`BiCGSTABRows.confirm_rows`, one VJP of the batch), and restarts from it
when that is still above its threshold, as the host version does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .._floats import eps
from .._typing import Array, Namespace
from ._rows import PerSampleForm, RowState
from .bicgstab import half_steps

if TYPE_CHECKING:
    from .._operator import AdjointOperator
    from .._samples import RowOps
    from .bicgstab import BiCGSTAB

__all__ = ["BiCGSTABRows"]


class _Rows(RowState):
    """The samples' iteration: every array has one row per sample still iterating."""

    __slots__ = (
        "alpha",
        "broke_down",
        "fresh",
        "g",
        "omega",
        "p",
        "r",
        "residual",
        "rhat",
        "rhat_sq",
        "rho",
        "rho_prev",
        "v",
        "young",
        "z",
    )

    g: Array  # (b, n) right-hand sides
    z: Array  # (b, n) iterates and their recurrence residuals
    r: Array
    rhat: Array  # (b, n) each row's shadow residual, and its squared norm
    rhat_sq: Array
    p: Array  # (b, n) directions, and A p
    v: Array
    rho: Array  # (b,) <rhat, r> for the next step, and the one before
    rho_prev: Array
    alpha: Array
    omega: Array
    fresh: Array  # (b,) the next step starts a cycle (rhat = p = r)
    young: Array  # (b,) the last step started one
    residual: Array  # (b,) the last residual norm reported
    broke_down: Array  # (b,) a step broke down right after a restart


@dataclass(frozen=True)
class BiCGSTABRows(PerSampleForm):
    """:class:`~rbp_core.BiCGSTAB`'s method for the per-sample driver: its scalars and decisions per row."""

    settings: BiCGSTAB
    name: ClassVar[str] = "bicgstab"
    needs_jvp: ClassVar[bool] = False
    supports_warm_start: ClassVar[bool] = True
    successive_images: ClassVar[bool] = False

    def init(self, A: AdjointOperator, g: Array, z0: Array | None, ops: RowOps) -> tuple[_Rows, Array, Any]:
        """From ``z0`` (or 0) and its residual, each row's reference norm."""
        xp = ops.xp
        st = _Rows()
        st.g = g
        st.z = xp.zeros_like(g) if z0 is None else z0
        st.r = g if z0 is None else (g - z0) + A.vjp(z0)
        zero = xp.zeros_like(st.r[:, 0])
        st.rhat, st.p, st.v = st.r, st.r, xp.zeros_like(st.r)
        st.rhat_sq = st.rho = st.rho_prev = zero
        st.alpha = st.omega = zero + 1.0
        st.fresh = zero == 0
        st.young = st.broke_down = zero != 0
        first = ops.sqnorm(st.r)
        st.residual = xp.sqrt(first)
        return st, st.z, ((first,), ((st.r, None),))

    def step(self, A: AdjointOperator, st: _Rows, ops: RowOps) -> tuple[_Rows, Array, list[Array], Any]:
        """One iteration of every row: ``p``, ``v = A p``, ``s``, ``t = A s``, then ``z`` and ``r``, and its decisions."""
        xp, ratio, dot = ops.xp, ops.ratio, ops.dot
        col = _column(xp)
        fresh, r = st.fresh, st.r
        r_sq = ops.sqnorm(r)
        beta = ratio(st.rho, st.rho_prev) * ratio(st.alpha, st.omega)
        going = ops.axpy(beta, ops.axpy(-st.omega, st.v, st.p), r)  # r + beta (p - omega v)
        rhat = xp.where(col(fresh), r, st.rhat)
        p = xp.where(col(fresh), r, going)
        rho = xp.where(fresh, r_sq, st.rho)
        rhat_sq = xp.where(fresh, r_sq, st.rhat_sq)
        v, rv, alpha, s, ts, tt, omega, z_new, r_new, rr = half_steps(A, ops, p, r, rhat, rho, st.z)
        rho_next, vv, ss = dot(rhat, r_new), ops.sqnorm(v), ops.sqnorm(s)
        finite = xp.isfinite(rr)
        for value in (rho_next, rv, vv, tt, ts, ss):
            finite = finite & xp.isfinite(value)
        # An exact breakdown: a cycle broke down at its first step, or A s = 0 for s != 0.
        broke = (~finite & fresh) | (finite & (tt == 0) & (ss > 0))
        undo = ~finite & ~fresh  # go back to the iterate before this step, and restart there
        residual = xp.sqrt(rr)
        tol = math.sqrt(eps(xp, st.g.dtype))
        rhat_norm = xp.sqrt(xp.where(rhat_sq > 0, rhat_sq, xp.zeros_like(rhat_sq)))
        near = finite & (residual > 0)
        near = near & (
            (xp.abs(rho_next) <= tol * rhat_norm * residual)
            | (xp.abs(rv) <= tol * rhat_norm * xp.sqrt(vv))
            | (xp.abs(ts) <= tol * xp.sqrt(tt * ss))
        )
        keep_old = col(undo | broke)
        new = _Rows()
        new.g = st.g
        new.z = xp.where(keep_old, st.z, z_new)
        new.r = xp.where(keep_old, r, r_new)
        new.rhat, new.rhat_sq, new.p, new.v = rhat, rhat_sq, p, v
        new.rho, new.rho_prev, new.alpha, new.omega = rho_next, rho, alpha, omega
        new.fresh = undo | near
        new.young = fresh
        new.broke_down = broke
        new.residual = xp.where(undo, st.residual, residual)
        reported = xp.where(broke, xp.full_like(residual, math.nan), new.residual)
        rows = xp.where(col(broke), xp.full_like(r, math.nan), new.r)  # the vector each reported norm is of
        return new, new.z, [reported * reported], ((rows, None),)

    def confirm_rows(self, A: AdjointOperator, st: _Rows, rows: Array, ops: RowOps) -> tuple[_Rows, Array]:
        """The true residuals (one VJP of the batch); the rows where the ``(b,)`` mask ``rows`` is set restart from them.

        Returns the state and every row's true squared residual norm, a ``(b,)`` array.
        """
        xp = A.namespace
        true = (st.g - st.z) + A.vjp(st.z)
        new = st.copy()
        new.r = xp.where(xp.reshape(rows, (-1, 1)), true, st.r)
        new.fresh = st.fresh | rows
        sq = ops.sqnorm(true)
        new.residual = xp.where(rows, xp.sqrt(sq), st.residual)
        return new, sq

    def broken_rows(self, st: _Rows) -> Array:
        """The rows whose last step broke down right after a restart, a ``(b,)`` mask."""
        return st.broke_down

    def breakdown(self, A: AdjointOperator, st: _Rows) -> bool:  # noqa: ARG002 - part of the protocol
        """Whether the (one-row) state's last step broke down right after a restart."""
        return bool(self.broken_rows(st)[0])

    def stats(self, state: Any) -> dict[str, object]:  # noqa: ARG002 - part of the protocol
        """``memory_vectors``: state-sized arrays per sample."""
        return {"memory_vectors": 7}


def _column(xp: Namespace) -> Any:
    """``(b,)`` masks as ``(b, 1)`` columns, to select whole rows."""
    return lambda mask: xp.reshape(mask, (-1, 1))

"""Limited-memory Broyden for a batch of independent fixed points: every sample its own updates and line search.

:class:`~rbp_core.Broyden` decides each step length on the host, once per solve; with
``batch_axis`` each sample decides its own. :class:`BroydenRows` (what ``Broyden.per_sample()``
gives the per-sample driver) keeps each sample's rank-one factors, direction, step length,
halvings and best iterate as rows of device arrays and takes each decision with masks: a row whose
trial residual exceeds ``safeguard`` times its current one halves its step (no update), up to
``backtracks`` times, after which it takes the point and restarts its memory; every other row
accepts its trial point and applies the good-Broyden update at its next step. The updates of all
rows share one ring of ``memory`` slots: when it wraps every row restarts from ``H = -I``, as the
host version restarts a full memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import array_api_compat

from .._typing import Array, FixedPointMap, Namespace
from ._rows import BestRowsForm, Pairs, RowState

if TYPE_CHECKING:
    from .._samples import RowOps
    from .broyden import Broyden

__all__ = ["BroydenRows"]


class _Rows(RowState):
    """The samples' iteration: every array has one row per sample still iterating."""

    __slots__ = (
        "U",
        "V",
        "alpha",
        "backtracks",
        "best_res",
        "best_scale",
        "best_x",
        "dg",
        "dx",
        "g",
        "h0",
        "p",
        "pairs",
        "pending",
        "residual",
        "slot",
        "valid",
        "x",
    )

    h0: Array
    x: Array | None  # (b, n) the accepted iterates (None before the first evaluation), and g(x) = F(x) - x
    g: Array
    U: Array  # (b, memory, n) the rank-one factors: H = -I + sum over valid slots of u_i v_i^T
    V: Array
    valid: Array  # (b, memory)
    slot: int  # the ring's last written slot, shared by the rows
    p: Array  # (b, n) directions
    alpha: Array  # (b,) step lengths, and the halvings taken
    backtracks: Array
    pending: Array  # (b,) an accepted step whose update is due, with its differences
    dx: Array
    dg: Array
    residual: Array  # (b,) ||g(x)|| at the accepted iterates
    best_x: Array
    best_res: Array
    best_scale: Array
    pairs: Pairs | None


@dataclass(frozen=True)
class BroydenRows(BestRowsForm):
    """:class:`~rbp_core.Broyden`'s method for the per-sample driver: its factors and line search per row."""

    settings: Broyden
    name: ClassVar[str] = "broyden"
    differentiable_step: ClassVar[bool] = False

    def start(self, h0: Array) -> _Rows:
        """The state before the first evaluation."""
        st = _Rows()
        st.h0, st.x = h0, None
        return st

    def step(self, f: FixedPointMap, st: _Rows, ops: RowOps) -> tuple[_Rows, Array, list[Array], Any]:
        """Update each row's factors with its accepted step, then evaluate ``F`` at ``x + alpha p``."""
        xp, cfg = ops.xp, self.settings
        col = _column(xp)
        if st.x is None:
            x_trial = st.h0
        else:
            self._update(xp, ops, st)
            x_trial = ops.axpy(st.alpha, st.p, st.x)
        G = f(x_trial)
        g_trial = G - x_trial
        res_sq, scale_sq = ops.sqnorm(g_trial), ops.sqnorm(G)
        res = xp.sqrt(res_sq)
        if st.x is None:
            self._start(xp, st, x_trial, g_trial, res, xp.sqrt(scale_sq))
            return st, st.best_x, [res_sq, scale_sq], ((g_trial, None), (G, None))
        if st.pairs is not None:
            st.pairs.items.append((ops.sqnorm(G - (st.g + st.x)), ops.sqnorm(x_trial - st.x)))
        grew = res > cfg.safeguard * st.residual
        reject = grew & (st.backtracks < cfg.backtracks)  # halve the step: same direction, no update
        exhausted = grew & ~reject  # out of halvings: take the point, restart the memory, plain step
        accept = ~reject
        st.pending = accept & ~exhausted
        st.dx, st.dg = x_trial - st.x, g_trial - st.g
        st.x = xp.where(col(accept), x_trial, st.x)
        st.g = xp.where(col(accept), g_trial, st.g)
        st.residual = xp.where(accept, res, st.residual)
        st.alpha = xp.where(reject, 0.5 * st.alpha, xp.ones_like(st.alpha))
        st.backtracks = xp.where(reject, st.backtracks + 1, xp.zeros_like(st.backtracks))
        st.p = xp.where(col(exhausted), g_trial, st.p)
        st.valid = st.valid & ~col(exhausted)
        better = accept & (res < st.best_res)
        st.best_x = xp.where(col(better), x_trial, st.best_x)
        st.best_res = xp.where(better, res, st.best_res)
        st.best_scale = xp.where(better, xp.sqrt(scale_sq), st.best_scale)
        return st, st.best_x, [res_sq, scale_sq], ((g_trial, None), (G, None))

    def _start(self, xp: Namespace, st: _Rows, x: Array, g: Array, res: Array, scale: Array) -> None:
        """The first evaluation, accepted: empty factors, the plain step next."""
        b, n = x.shape
        k, device = self.settings.memory, array_api_compat.device(x)
        st.U = xp.zeros((b, k, n), dtype=x.dtype, device=device)
        st.V = xp.zeros_like(st.U)
        st.valid = xp.zeros((b, k), dtype=xp.bool, device=device)
        st.slot = -1
        st.x, st.g, st.p = x, g, g
        st.alpha = xp.ones_like(res)
        st.backtracks = xp.zeros_like(res)
        st.pending = xp.zeros(res.shape, dtype=xp.bool, device=device)
        st.dx = st.dg = xp.zeros_like(x)
        st.residual = res
        st.best_x, st.best_res, st.best_scale = x, res, scale

    def _update(self, xp: Namespace, ops: RowOps, st: _Rows) -> None:
        """The good-Broyden update of the rows whose last step was accepted, and their new directions."""
        col = _column(xp)  # rows with no update due write an unused slot (no host read to skip it)
        hdg = _apply(xp, st, st.dg)
        denom = ops.dot(st.dx, hdg)
        inv = ops.ratio_or_zero(xp.ones_like(denom), denom)  # 1 / dx^T H dg, or 0: no update
        u_row = ops.axpy(inv, st.dx - hdg, xp.zeros_like(st.dx))
        v_row = _apply(xp, st, st.dx, transpose=True)
        # When the ring wraps, every row restarts from H = -I.
        st.valid = ops.cond(st.slot + 1 >= self.settings.memory, xp.zeros_like, _same, st.valid)
        st.slot = (st.slot + 1) % self.settings.memory
        st.U = ops.put(st.U, (slice(None), st.slot, slice(None)), u_row)
        st.V = ops.put(st.V, (slice(None), st.slot, slice(None)), v_row)
        st.valid = ops.put(st.valid, (slice(None), st.slot), st.pending)
        st.p = xp.where(col(st.pending), -_apply(xp, st, st.g), st.p)
        st.pending = xp.zeros_like(st.pending)

    def stats(self, state: Any) -> dict[str, object]:  # noqa: ARG002 - part of the protocol
        """``memory_vectors``: state-sized arrays per sample."""
        return {"memory_vectors": 2 * self.settings.memory + 7}


def _apply(xp: Namespace, st: _Rows, y: Array, *, transpose: bool = False) -> Array:
    """Every row's ``H y = -y + U^T (V y)`` over its valid slots (or ``H^T y``)."""
    left, right = (st.V, st.U) if transpose else (st.U, st.V)
    coefficients = xp.matmul(right, y[:, :, None])[:, :, 0]
    coefficients = xp.where(st.valid, coefficients, xp.zeros_like(coefficients))
    return xp.matmul(coefficients[:, None, :], left)[:, 0, :] - y


def _same(x: Array) -> Array:
    return x


def _column(xp: Namespace) -> Any:
    """``(b,)`` masks as ``(b, 1)`` columns, to select whole rows."""
    return lambda mask: xp.reshape(mask, (-1, 1))

"""Restarted GMRES for a batch of independent adjoint systems: every sample its own Krylov basis, on the device.

:class:`~rbp_core.GMRES` rotates each new Hessenberg column into its triangular factor on the
host; with ``batch_axis`` each sample needs its own. :class:`GMRESRows` (what
``GMRES.per_sample()`` gives the per-sample driver) keeps each sample's basis, triangular factor,
Givens rotations and residual vector as rows of device arrays: a step is one product with
``I - J^T`` for the batch, two passes of classical Gram-Schmidt per row, and the rotations applied
to the ``b`` new columns at once. The residual norm each sample reports is its recurrence's
(the host version also confirms a converged recurrence with the true residual; here the
certificate, when a ``contraction`` is given, comes from a fresh residual of the result).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import array_api_compat

from .._operator import AdjointOperator
from .._typing import Array, Namespace
from ._rows import PerSampleForm, RowState

if TYPE_CHECKING:
    from .._samples import RowOps
    from .gmres import GMRES

__all__ = ["GMRESRows"]


class _Cycle(RowState):
    """The samples' current cycle: every array has one row per sample still iterating."""

    __slots__ = ("R", "V", "cs", "g", "j", "r", "rhs", "sn", "z")

    g: Array  # (b, n) right-hand sides
    z: Array  # (b, n) the cycle's starting iterates
    r: Array | None  # (b, n) their residuals, until the cycle's basis is built
    V: Array | None  # (b, restart + 1, n) the bases
    R: Array  # (b, restart, restart) the triangular factors, by columns
    cs: Array  # (b, restart) the Givens rotations
    sn: Array
    rhs: Array  # (b, restart + 1) the rotated right-hand sides
    j: int  # columns in the cycle (the same for every active sample)


@dataclass(frozen=True)
class GMRESRows(PerSampleForm):
    """:class:`~rbp_core.GMRES`'s method for the per-sample driver: one Krylov basis per row, all on the device."""

    settings: GMRES
    name: ClassVar[str] = "gmres"
    needs_jvp: ClassVar[bool] = False
    supports_warm_start: ClassVar[bool] = True
    successive_images: ClassVar[bool] = False

    def init(self, A: AdjointOperator, g: Array, z0: Array | None, ops: RowOps) -> tuple[_Cycle, None, Any]:
        """The first cycle starts from ``z0`` (or 0) and its residual, each row's reference norm."""
        st = _Cycle()
        st.g, st.j, st.V = g, 0, None
        st.z = ops.xp.zeros_like(g) if z0 is None else z0
        st.r = g if z0 is None else (g - z0) + A.vjp(z0)
        return st, None, ((ops.sqnorm(st.r),), ((st.r, None),))

    def step(self, A: AdjointOperator, st: _Cycle, ops: RowOps) -> tuple[_Cycle, None, list[Array], Any]:
        """One Arnoldi step for every row (after a restart when the cycle is full); monitors each row's residual."""
        xp, k = ops.xp, self.settings.restart
        if st.j == k:  # a full cycle: restart from its iterate
            z, g = self.iterate(A, st), st.g
            st = _Cycle()
            st.g, st.z, st.j, st.V = g, z, 0, None
            st.r = (g - z) + A.vjp(z)
        if st.V is None:
            self._start_cycle(xp, ops, st)
        assert st.V is not None
        V, j = st.V, st.j
        basis = V[:, : j + 1, :]
        w = A.matvec(V[:, j, :])
        h = xp.matmul(basis, w[:, :, None])[:, :, 0]
        w = w - xp.matmul(h[:, None, :], basis)[:, 0, :]
        h2 = xp.matmul(basis, w[:, :, None])[:, :, 0]  # classical Gram-Schmidt twice: as stable as modified
        w = w - xp.matmul(h2[:, None, :], basis)[:, 0, :]
        h = h + h2
        hn = xp.sqrt(ops.sqnorm(w))
        V[:, j + 1, :] = w / xp.reshape(_nonzero(xp, hn), (-1, 1))  # a lucky breakdown leaves a zero row
        for i in range(j):  # the earlier rotations, on every row's new column at once
            hi, hi1 = h[:, i], h[:, i + 1]
            h[:, i], h[:, i + 1] = st.cs[:, i] * hi + st.sn[:, i] * hi1, -st.sn[:, i] * hi + st.cs[:, i] * hi1
        diag = xp.sqrt(h[:, j] * h[:, j] + hn * hn)
        pos = diag > 0
        c = xp.where(pos, h[:, j] / _nonzero(xp, diag), xp.ones_like(diag))
        s = xp.where(pos, hn / _nonzero(xp, diag), xp.zeros_like(diag))
        h[:, j] = diag
        st.R[:, : j + 1, j] = h
        st.cs[:, j], st.sn[:, j] = c, s
        top = st.rhs[:, j]
        st.rhs[:, j], st.rhs[:, j + 1] = c * top, -s * top
        st.j = j + 1
        last = st.rhs[:, j + 1 : j + 2]  # (b, 1): its norm is the residual's
        return st, None, [last[:, 0] * last[:, 0]], ((last, None),)

    def _start_cycle(self, xp: Namespace, ops: RowOps, st: _Cycle) -> None:
        """``v_0 = r / ||r||`` for every row, and an empty factor."""
        assert st.r is not None
        k, (b, n) = self.settings.restart, st.r.shape
        device = array_api_compat.device(st.r)
        beta = xp.sqrt(ops.sqnorm(st.r))
        st.V = xp.zeros((b, k + 1, n), dtype=st.r.dtype, device=device)
        st.V[:, 0, :] = st.r / xp.reshape(_nonzero(xp, beta), (-1, 1))
        st.R = xp.zeros((b, k, k), dtype=st.r.dtype, device=device)
        st.cs = xp.zeros((b, k), dtype=st.r.dtype, device=device)
        st.sn = xp.zeros_like(st.cs)
        st.rhs = xp.zeros((b, k + 1), dtype=st.r.dtype, device=device)
        st.rhs[:, 0] = beta
        st.r = None

    def iterate(self, A: AdjointOperator, st: _Cycle, *, previous: bool = False) -> Array:
        """Every row's ``z + V y`` with ``R y = rhs`` (back substitution on the device; a zero pivot leaves 0).

        ``previous``: the iterate before the last step's column (the last finite one, when that
        column was not).
        """
        j = st.j - 1 if previous else st.j
        if st.V is None or j <= 0:
            return st.z
        xp = A.namespace
        y = xp.zeros_like(st.rhs[:, :j])
        for i in range(j - 1, -1, -1):
            acc = st.rhs[:, i] - xp.sum(st.R[:, i, i + 1 : j] * y[:, i + 1 : j], axis=-1)
            pivot = st.R[:, i, i]
            y[:, i] = xp.where(pivot != 0, acc / _nonzero(xp, pivot), xp.zeros_like(acc))
        return st.z + xp.matmul(y[:, None, :], st.V[:, :j, :])[:, 0, :]

    def stats(self, state: Any) -> dict[str, object]:  # noqa: ARG002 - part of the protocol
        """``memory_vectors``: state-sized arrays per sample."""
        return {"memory_vectors": self.settings.restart + 3}


def _nonzero(xp: Namespace, x: Array) -> Array:
    """``x``, with 1 where it is 0: a divisor that never makes 0 / 0."""
    return xp.where(x != 0, x, xp.ones_like(x))

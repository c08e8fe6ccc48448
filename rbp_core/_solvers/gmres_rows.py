"""Restarted GMRES for a batch of independent adjoint systems: every sample its own Krylov basis, on the device.

:class:`~rbp_core.GMRES` rotates each new Hessenberg column into its triangular factor on the
host; with ``batch_axis`` each sample needs its own. :class:`GMRESRows` (what
``GMRES.per_sample()`` gives the per-sample driver, and what the JAX adapter runs under
``jax.jit``) keeps each sample's basis, triangular factor and rotations as rows of device arrays
whose shapes never change within a cycle: a step is one product with ``I - J^T`` for the batch,
two passes of classical Gram-Schmidt per row against the whole basis (its rows not yet written
are zero, so they add nothing), the earlier rotations applied to the ``b`` new columns as one
product with their accumulated orthogonal factor ``Q``, and one new rotation. The column index
``j`` may be a Python int (the host drivers) or a traced integer (a traced driver): no shape
depends on it, and the restart of a full cycle is a branch taken through ``ops.cond``.

The residual norm each sample reports is its recurrence's, ``|beta Q[j, 0]|`` (the host version
also confirms a converged recurrence with the true residual; here the certificate, when a
``contraction`` is given, comes from a fresh residual of the result).
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

    __slots__ = ("Q", "R", "V", "beta", "g", "j", "z")

    g: Array  # (b, n) right-hand sides
    z: Array  # (b, n) the cycle's starting iterates
    V: Array  # (b, restart + 1, n) the bases; rows past j + 1 are zero
    R: Array  # (b, restart, restart) the triangular factors, by columns; columns from j on are zero
    Q: Array  # (b, restart + 1, restart + 1) the product of the cycle's rotations
    beta: Array  # (b,) the norms of the cycle's starting residuals
    j: Any  # columns in the cycle, the same for every active sample: an int, or a traced integer


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
        z = ops.xp.zeros_like(g) if z0 is None else z0
        r = g if z0 is None else (g - z0) + A.vjp(z0)
        return self._cycle(ops, g, z, r), None, ((ops.sqnorm(r),), ((r, None),))

    def step(self, A: AdjointOperator, st: _Cycle, ops: RowOps) -> tuple[_Cycle, None, list[Array], Any]:
        """One Arnoldi step for every row (after a restart when the cycle is full); monitors each row's residual."""
        xp, k = ops.xp, self.settings.restart
        st = ops.cond(st.j == k, lambda full: self._restart(A, ops, full), _same, st)
        V, Q, j = st.V, st.Q, st.j
        # The host drivers know j: the rows written so far are enough (half the work, on average).
        # A traced j takes them all; the rows not yet written are zero and add nothing.
        basis = V[:, : j + 1, :] if isinstance(j, int) else V
        w = A.matvec(V[:, j, :])
        h = xp.matmul(basis, w[:, :, None])[:, :, 0]
        w = w - xp.matmul(h[:, None, :], basis)[:, 0, :]
        h2 = xp.matmul(basis, w[:, :, None])[:, :, 0]  # classical Gram-Schmidt twice: as stable as modified
        w = w - xp.matmul(h2[:, None, :], basis)[:, 0, :]
        hn = xp.sqrt(ops.sqnorm(w))
        V = ops.put(V, (slice(None), j + 1, slice(None)), w / _column(xp, _nonzero(xp, hn)))  # a lucky breakdown: 0
        # The new Hessenberg column (entries 0..j+1), then the earlier rotations (Q's rows past j are the identity's).
        if isinstance(j, int):
            column = xp.concat([h + h2, xp.astype(_column(xp, hn), h.dtype)], axis=1)
        else:
            column = ops.put(h + h2, (slice(None), j + 1), hn)
        t = xp.matmul(Q[:, :, : column.shape[1]], column[:, :, None])[:, :, 0]
        top = t[:, j]
        diag = xp.sqrt(top * top + hn * hn)
        pos = diag > 0
        c = xp.where(pos, top / _nonzero(xp, diag), xp.ones_like(diag))
        s = xp.where(pos, hn / _nonzero(xp, diag), xp.zeros_like(diag))
        t = ops.put(ops.put(t, (slice(None), j), diag), (slice(None), j + 1), 0.0)
        new = st.copy()
        new.V = V
        new.R = ops.put(st.R, (slice(None), slice(None), j), t[:, :k])
        qj, qj1 = Q[:, j, :], Q[:, j + 1, :]  # both new rows are formed before either is written (views)
        row_j, row_j1 = _column(xp, c) * qj + _column(xp, s) * qj1, _column(xp, c) * qj1 - _column(xp, s) * qj
        new.Q = ops.put(ops.put(Q, (slice(None), j, slice(None)), row_j), (slice(None), j + 1, slice(None)), row_j1)
        new.j = j + 1
        last = _column(xp, st.beta * new.Q[:, j + 1, 0])  # (b, 1): its norm is the residual's
        return new, None, [last[:, 0] * last[:, 0]], ((last, None),)

    def _cycle(self, ops: RowOps, g: Array, z: Array, r: Array) -> _Cycle:
        """A cycle from the iterates ``z`` and their residuals ``r``: ``v_0 = r / ||r||``, empty factors."""
        xp, k = ops.xp, self.settings.restart
        b, n = r.shape
        device = array_api_compat.device(r)
        st = _Cycle()
        st.g, st.z, st.j = g, z, 0
        st.beta = xp.astype(xp.sqrt(ops.sqnorm(r)), r.dtype)  # the norms may be wider (float32 for half precisions)
        V = xp.zeros((b, k + 1, n), dtype=r.dtype, device=device)
        st.V = ops.put(V, (slice(None), 0, slice(None)), r / _column(xp, _nonzero(xp, st.beta)))
        st.R = xp.zeros((b, k, k), dtype=r.dtype, device=device)
        st.Q = xp.zeros((b, k + 1, k + 1), dtype=r.dtype, device=device) + xp.eye(k + 1, dtype=r.dtype, device=device)
        return st

    def _restart(self, A: AdjointOperator, ops: RowOps, st: _Cycle) -> _Cycle:
        """A new cycle from the full one's iterate and its true residual (one product with ``I - J^T``)."""
        z = self.iterate(A, st)
        return self._cycle(ops, st.g, z, (st.g - z) + A.vjp(z))

    def iterate(self, A: AdjointOperator, st: _Cycle, *, previous: bool = False) -> Array:
        """Every row's ``z + V y`` with ``R y = beta Q[:j, 0]`` (back substitution on the device; a zero pivot leaves 0).

        ``previous``: the iterate before the last step's column (the last finite one, when that
        column was not); the last rotation leaves the first ``j - 1`` entries of ``beta Q[:, 0]``
        as they were.
        """
        xp, k = A.namespace, self.settings.restart
        used = st.j - 1 if previous else st.j
        # The columns that count: on the host drivers the first `used`; traced, all k with the
        # others masked out (they are zero, or not finite after a failed step, and must not be
        # multiplied by a zero coefficient).
        m = used if isinstance(used, int) else k
        R, rhs, V = st.R[:, :m, :m], _column(xp, st.beta) * st.Q[:, :m, 0], st.V[:, :m, :]
        if not isinstance(used, int):
            cols = xp.arange(k, device=array_api_compat.device(R)) < used
            R = xp.where(xp.reshape(cols, (1, 1, k)), R, xp.zeros_like(R))
            rhs = xp.where(xp.reshape(cols, (1, k)), rhs, xp.zeros_like(rhs))
            V = xp.where(xp.reshape(cols, (1, k, 1)), V, xp.zeros_like(V))
        if m == 0:
            return st.z
        tail = rhs[:, m:]  # the solution's entries after row i, built from the last row up
        for i in range(m - 1, -1, -1):
            acc = rhs[:, i] - xp.sum(R[:, i, i + 1 :] * tail, axis=-1)
            pivot = R[:, i, i]
            yi = xp.where(pivot != 0, acc / _nonzero(xp, pivot), xp.zeros_like(acc))
            tail = xp.concat([_column(xp, yi), tail], axis=1)
        return st.z + xp.matmul(tail[:, None, :], V)[:, 0, :]

    def stats(self, state: Any) -> dict[str, object]:  # noqa: ARG002 - part of the protocol
        """``memory_vectors``: state-sized arrays per sample."""
        return {"memory_vectors": self.settings.restart + 3}


def _same(st: _Cycle) -> _Cycle:
    return st


def _column(xp: Namespace, x: Array) -> Array:
    """A ``(b,)`` array as a ``(b, 1)`` column."""
    return xp.reshape(x, (-1, 1))


def _nonzero(xp: Namespace, x: Array) -> Array:
    """``x``, with 1 where it is 0: a divisor that never makes 0 / 0."""
    return xp.where(x != 0, x, xp.ones_like(x))

"""Restarted GMRES on (I - J^T) z = g: one VJP per iteration, the Krylov basis as one array."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import array_api_compat

from .._checks import check_int, check_tolerances
from .._iterate import Limits
from .._norms import norm
from .._operator import AdjointOperator
from .._ops import VectorOps
from .._typing import Array, Namespace
from ._settings import DEFAULT_MAX_ITER, resolve_rtol
from .gmres_rows import GMRESRows

__all__ = ["GMRES"]


@dataclass(frozen=True)
class _Cycle:
    """GMRES's state: the cycle's base iterate and basis on the device, its small problem on the host.

    ``V`` is None at the start of a cycle (``r`` is then its residual). ``columns`` are the rotated
    Hessenberg columns (the triangular factor ``R``, by columns), ``cs``/``sn`` the Givens
    rotations and ``rhs`` the rotated right-hand side ``beta e_1``.
    """

    g: Array
    z: Array
    r: Array | None
    V: Array | None
    fresh: bool
    columns: tuple[tuple[float, ...], ...] = ()
    cs: tuple[float, ...] = ()
    sn: tuple[float, ...] = ()
    rhs: tuple[float, ...] = ()
    restarts: int = 0
    confirmations: int = 0


@dataclass(frozen=True, kw_only=True)  # settings by name: a positional value could land in the wrong one
class GMRES:
    r"""Restarted GMRES(m) on :math:`(I - J^T) z = g`: one VJP per iteration, no JVP.

    Each iteration extends an orthonormal basis of the Krylov space of :math:`A = I - J^T` by one
    vector (classical Gram-Schmidt with one re-orthogonalisation: all inner products of a step
    are one product with the basis, held as one ``(m + 1, n)`` array written in place) and brings that step's
    ``m + 2`` numbers to the host in one transfer, where Givens rotations update the small
    least-squares problem and its residual norm. After ``restart`` iterations the iterate is
    formed and a new cycle starts from its true residual (one more VJP); a residual that the
    recurrence says is below the tolerance is confirmed the same way before SUCCESS. It
    converges for any invertible :math:`I - J`, however close :math:`J`'s spectral radius is to 1 or
    beyond, at a rate set by the spectrum of :math:`I - J` rather than by :math:`\rho(J)`.

    Memory: ``restart + 3`` state-sized arrays (the basis, the iterate and a residual).

    Parameters
    ----------
    restart : int
        :math:`m \ge 1`, the iterations of a cycle (the basis size).
    rtol : float, optional
        Relative tolerance on :math:`\|g - (I - J^T) z\|`; default ``sqrt(eps)`` of ``g``'s dtype.
    atol : float
        Absolute floor of the stopping test (default 0).
    max_iter : int
        Iteration budget (>= 1), counted in Arnoldi steps over all cycles.

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> J = np.array([[1.5, 0.0], [0.0, -2.0]])  # spectral radius 2: original RBP diverges
    >>> sol = rbp_core.solve_adjoint(lambda v: J.T @ v, np.ones(2), rbp_core.GMRES(rtol=1e-12))
    >>> np.allclose(sol.value, np.linalg.solve(np.eye(2) - J.T, np.ones(2))), sol.num_jvp
    (True, 0)
    """

    restart: int = 20
    rtol: float | None = None
    atol: float = 0.0
    max_iter: int = DEFAULT_MAX_ITER
    name: ClassVar[str] = "gmres"
    needs_jvp: ClassVar[bool] = False
    supports_warm_start: ClassVar[bool] = True
    successive_images: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_int(self.restart, "restart", 1)
        check_tolerances(self.rtol, self.atol, self.max_iter)

    def per_sample(self) -> GMRESRows:
        """The same method for a batch of independent samples (``batch_axis``): each its own basis."""
        return GMRESRows(self)

    def limits(self, xp: Namespace, dtype: Any) -> Limits:
        """``max_iter`` iterations to ``max(rtol ||g||, atol)``; no divergence test (the residual never grows)."""
        return Limits(self.max_iter, resolve_rtol(self.rtol, xp, dtype), self.atol, None)

    def init(self, A: AdjointOperator, g: Array, z0: Array | None, ops: VectorOps) -> tuple[Any, Array, Any]:
        """The first cycle starts from ``z0`` (or 0) and its residual, the reference norm."""
        z = ops.xp.zeros_like(g) if z0 is None else z0
        r = g if z0 is None else (g - z0) + A.vjp(z0)
        return _Cycle(g=g, z=z, r=r, V=None, fresh=True), z, ((ops.sqnorm(r),), ((r, None),))

    def step(self, A: AdjointOperator, state: _Cycle, ops: VectorOps) -> tuple[Any, None, Array, tuple[()]]:
        """One Arnoldi step (after a restart when the cycle is full); transfers the new Hessenberg column."""
        xp = ops.xp
        if len(state.columns) == self.restart:
            state = self._restart(A, state)
        extra: list[Array] = []
        V = state.V
        j = len(state.columns)  # the basis holds rows 0..j
        if V is None:  # a new cycle: v_0 = r / ||r||, and ||r||^2 goes to the host with the column
            r = xp.reshape(state.r, (-1,))
            beta_sq = r @ r
            # The cycle's own (restart + 1, n) basis, filled in place row by row (a fresh one per
            # cycle, so a kept state's rows are never overwritten). Uninitialised: rows are read
            # only once written, and zeroing it cost 150 us a backward at 21 x 16384 float32.
            V = xp.empty((self.restart + 1, r.shape[0]), dtype=r.dtype, device=array_api_compat.device(r))
            V = ops.put(V, (0, slice(None)), r / _safe_sqrt(xp, beta_sq))
            extra.append(xp.reshape(beta_sq, (1,)))
        shape = state.g.shape
        basis = V[: j + 1, :]
        w = xp.reshape(A.matvec(xp.reshape(V[j, :], shape)), (-1,))
        h = basis @ w
        w = w - h @ basis
        h2 = basis @ w  # one re-orthogonalisation: classical Gram-Schmidt twice is as stable as modified
        w = w - h2 @ basis
        h = h + h2
        hn_sq = w @ w
        # A lucky breakdown (w = 0: the solution lies in the basis) gives a zero vector, never a NaN;
        # the host sees ||w|| = 0 and the residual 0, so it is not used.
        V = ops.put(V, (j + 1, slice(None)), w / _safe_sqrt(xp, hn_sq))
        values = xp.concat([h, xp.reshape(hn_sq, (1,)), *extra])
        return replace(state, V=V, r=None), None, values, ()

    def host_update(self, state: _Cycle, values: tuple[float, ...]) -> tuple[_Cycle, float]:
        """Rotate the new column into the triangular factor; the residual norm is the rhs's last entry."""
        vals = list(values)
        columns, cs, sn, rhs = state.columns, state.cs, state.sn, state.rhs
        if state.fresh:
            columns, cs, sn, rhs = (), (), (), (math.sqrt(vals.pop()),)
        h, hn = vals[:-1], math.sqrt(vals[-1]) if vals[-1] > 0.0 else 0.0
        j = len(columns)
        for i in range(j):
            h[i], h[i + 1] = cs[i] * h[i] + sn[i] * h[i + 1], -sn[i] * h[i] + cs[i] * h[i + 1]
        diag = math.hypot(h[j], hn)
        c, s = (h[j] / diag, hn / diag) if diag > 0.0 else (1.0, 0.0)
        h[j] = diag
        top = rhs[j]
        rhs = (*rhs[:j], c * top, -s * top)
        new = replace(state, fresh=False, columns=(*columns, tuple(h[: j + 1])), cs=(*cs, c), sn=(*sn, s), rhs=rhs)
        return new, abs(rhs[-1])

    def solution(self, A: AdjointOperator, state: _Cycle) -> Array:
        """``z + V y`` with ``R y = rhs`` solved by back substitution on the host."""
        k = len(state.columns)
        if k == 0 or state.V is None:
            return state.z
        R, rhs = state.columns, state.rhs
        y = [0.0] * k
        for i in reversed(range(k)):
            acc = rhs[i] - math.fsum(R[c][i] * y[c] for c in range(i + 1, k))
            y[i] = acc / R[i][i] if R[i][i] != 0.0 else 0.0  # a zero pivot: stagnation, that direction unused
        xp = A.namespace
        V = state.V
        coefficients = xp.asarray(y, dtype=V.dtype, device=array_api_compat.device(V))
        return state.z + xp.reshape(coefficients @ V[:k, :], state.g.shape)

    def _restart(self, A: AdjointOperator, state: _Cycle, *, confirming: bool = False) -> _Cycle:
        z = self.solution(A, state)
        r = (state.g - z) + A.vjp(z)
        return _Cycle(
            g=state.g,
            z=z,
            r=r,
            V=None,
            fresh=True,
            restarts=state.restarts + (not confirming),
            confirmations=state.confirmations + confirming,
        )

    def confirm(self, A: AdjointOperator, state: _Cycle, threshold: float) -> tuple[_Cycle, float]:  # noqa: ARG002
        """The true residual of the iterate (one VJP, one transfer); a new cycle starts from it if needed."""
        new = self._restart(A, state, confirming=True)
        assert new.r is not None  # a new cycle has its residual
        return new, norm(A.namespace, new.r)

    def stats(self, state: _Cycle) -> dict[str, object]:
        """``restarts`` (full cycles), ``confirmations`` (true residuals of converged recurrences), ``memory_vectors``."""
        return {"restarts": state.restarts, "confirmations": state.confirmations, "memory_vectors": self.restart + 3}


def _safe_sqrt(xp: Namespace, sq: Array) -> Array:
    """``sqrt(sq)``, or 1 where ``sq`` is 0: a divisor that never makes 0 / 0 (on the device, no transfer)."""
    return xp.where(sq > 0, xp.sqrt(sq), xp.ones_like(sq))

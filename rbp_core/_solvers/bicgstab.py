"""BiCGSTAB on (I - J^T) z = g: two VJPs per iteration, constant memory, restarts at near-breakdown."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from .._checks import check_tolerances
from .._floats import eps
from .._iterate import Limits
from .._norms import norm
from .._operator import AdjointOperator
from .._ops import VectorOps
from .._typing import Array, Namespace
from ._settings import DEFAULT_MAX_ITER, resolve_rtol

if TYPE_CHECKING:
    from .bicgstab_rows import BiCGSTABRows

__all__ = ["BiCGSTAB"]


@dataclass(frozen=True)
class _State:
    """The iteration's vectors and scalars (scalars as 0-d arrays on the device, or host floats).

    ``rho`` is ``<rhat, r>`` for the next step and ``rho_prev`` the one before. ``z_prev`` and
    ``r_prev`` are the previous iterate and residual (references, not copies), to go back to when
    a step breaks down. ``fresh``: the next step starts a cycle (``rhat = p = r``); ``young``: the
    last step started one.
    """

    g: Array
    z: Array
    r: Array
    z_prev: Array
    r_prev: Array
    tol: float
    rhat: Array | None = None
    p: Array | None = None
    v: Array | None = None
    rho: Any = 1.0
    rho_prev: Any = 1.0
    alpha: Any = 1.0
    omega: Any = 1.0
    rhat_sq: float = 0.0
    fresh: bool = True
    young: bool = False
    residual: float = math.inf
    broke_down: bool = False
    restarts: int = 0


class HalfSteps(NamedTuple):
    """What one BiCGSTAB iteration computes from its direction ``p`` (see :func:`half_steps`)."""

    v: Array
    rv: Any
    alpha: Any
    s: Array
    ts: Any
    tt: Any
    omega: Any
    z: Array
    r: Array
    rr: Any


def half_steps(A: AdjointOperator, ops: VectorOps, p: Array, r: Array, rhat: Array, rho: Any, z: Array) -> HalfSteps:
    """The two half steps of a BiCGSTAB iteration from the direction ``p``, written once.

    ``v = A p``, ``alpha = rho / <rhat, v>``, ``s = r - alpha v``, ``t = A s``, ``omega = <t, s> / ||t||^2``
    (0 when ``t = 0``), then ``z + alpha p + omega s`` and its residual ``s - omega t`` with its squared
    norm. Scalars are whatever ``ops`` gives: 0-d arrays for one solve, ``(b,)`` arrays per sample.
    """
    v = A.matvec(p)
    rv = ops.dot(rhat, v)
    alpha = ops.ratio(rho, rv)
    s = ops.axpy(-alpha, v, r)
    t = A.matvec(s)
    ts, tt = ops.dot(t, s), ops.sqnorm(t)
    omega = ops.ratio_or_zero(ts, tt)  # t = A s = 0: s is 0 (done after the half step) or A singular
    z_new = ops.axpy(omega, s, ops.axpy(alpha, p, z))
    r_new, rr = ops.axpy_sqnorm(-omega, t, s)
    return HalfSteps(v, rv, alpha, s, ts, tt, omega, z_new, r_new, rr)


def _restart_from(st: _State, z: Array, r: Array, *, count: bool = True) -> _State:
    """A new cycle from ``z`` and its residual ``r``."""
    return replace(
        st, z=z, r=r, z_prev=z, r_prev=r, rhat=None, p=None, v=None, fresh=True, restarts=st.restarts + count
    )


@dataclass(frozen=True, kw_only=True)  # settings by name: a positional value could land in the wrong one
class BiCGSTAB:
    r"""BiCGSTAB on :math:`(I - J^T) z = g`: two VJPs per iteration, no JVP, constant memory.

    Van der Vorst's stabilised bi-conjugate gradient. Each iteration's inner products stay on the
    device and come to the host together, in one transfer, with the residual norm. A step whose
    bi-orthogonality is nearly lost (:math:`|\langle \hat r, r\rangle|`, :math:`|\langle \hat r, v\rangle|` or :math:`|\langle t, s\rangle|` below
    :math:`\sqrt{\varepsilon}` times the norms it is made of) ends the cycle: the next starts afresh from the
    current residual. A step that breaks down exactly (a non-finite scalar) is undone and the
    cycle restarted from the step before; a breakdown right after a restart is ``BREAKDOWN``, and
    no NaN is ever returned. A recurrence residual below the tolerance is confirmed with the true
    residual (one more VJP) before SUCCESS.

    Memory: 7 state-sized arrays (iterate, residual, shadow residual, direction, :math:`A p`, and the
    previous iterate and residual).

    Parameters
    ----------
    rtol : float, optional
        Relative tolerance on :math:`\|g - (I - J^T) z\|`; default ``sqrt(eps)`` of ``g``'s dtype.
    atol : float
        Absolute floor of the stopping test (default 0).
    max_iter : int
        Iteration budget (>= 1); each iteration costs two VJPs.

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> J = np.array([[1.5, 0.3], [0.0, -2.0]])  # spectral radius 2: original RBP diverges
    >>> sol = rbp_core.solve_adjoint(lambda v: J.T @ v, np.ones(2), rbp_core.BiCGSTAB(rtol=1e-12))
    >>> bool(np.allclose(sol.value, np.linalg.solve(np.eye(2) - J.T, np.ones(2))))
    True
    """

    rtol: float | None = None
    atol: float = 0.0
    max_iter: int = DEFAULT_MAX_ITER
    name: ClassVar[str] = "bicgstab"
    needs_jvp: ClassVar[bool] = False
    supports_warm_start: ClassVar[bool] = True
    successive_images: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_tolerances(self.rtol, self.atol, self.max_iter)

    def per_sample(self) -> BiCGSTABRows:
        """The same method for a batch of independent samples (``batch_axis``): each its own scalars."""
        from .bicgstab_rows import BiCGSTABRows  # noqa: PLC0415 - it imports half_steps from here

        return BiCGSTABRows(self)

    def limits(self, xp: Namespace, dtype: Any) -> Limits:
        """``max_iter`` iterations to ``max(rtol ||g||, atol)``; no divergence test (restarts handle growth)."""
        return Limits(self.max_iter, resolve_rtol(self.rtol, xp, dtype), self.atol, None)

    def init(self, A: AdjointOperator, g: Array, z0: Array | None, ops: VectorOps) -> tuple[Any, Array, Any]:
        """From ``z0`` (or 0) and its residual, the reference norm."""
        z = ops.xp.zeros_like(g) if z0 is None else z0
        r = g if z0 is None else (g - z0) + A.vjp(z0)
        state = _State(g=g, z=z, r=r, z_prev=z, r_prev=r, tol=math.sqrt(eps(ops.xp, g.dtype)))
        return state, z, ((ops.sqnorm(r),), ((r, None),))

    def step(self, A: AdjointOperator, st: _State, ops: VectorOps) -> tuple[_State, None, list[Array], tuple[()]]:
        """One iteration: ``p``, ``v = A p``, ``s``, ``t = A s``, then ``z`` and ``r``; its scalars go to the host."""
        ratio, dot, r = ops.ratio, ops.dot, st.r
        extra = []
        if st.fresh or st.rhat is None or st.p is None or st.v is None:  # a new cycle: rhat = p = r
            rhat, p = r, r
            rho = ops.sqnorm(r)
            extra.append(rho)  # ||rhat||^2, for the near-breakdown tests
        else:
            rhat, rho = st.rhat, st.rho
            beta = ratio(rho, st.rho_prev) * ratio(st.alpha, st.omega)
            p = ops.axpy(beta, ops.axpy(-st.omega, st.v, st.p), r)  # r + beta (p - omega v)
        it = half_steps(A, ops, p, r, rhat, rho, st.z)
        v, rv, alpha, s, ts, tt, omega, z_new, r_new, rr = it
        values = [rr, dot(rhat, r_new), rv, ops.sqnorm(v), tt, ts, ops.sqnorm(s), *extra]
        new = replace(
            st,
            z=z_new,
            r=r_new,
            z_prev=st.z,
            r_prev=r,
            rhat=rhat,
            p=p,
            v=v,
            rho=values[1],
            rho_prev=rho,
            alpha=alpha,
            omega=omega,
            fresh=False,
            young=st.fresh,
        )
        return new, None, values, ()

    def host_update(self, st: _State, values: tuple[float, ...]) -> tuple[_State, float]:
        """The residual norm; a restart at near-breakdown, the step undone at an exact one."""
        rr, rho_next, rv, vv, tt, ts, ss, *start = values
        if start:
            st = replace(st, rhat_sq=start[0])
        if not all(math.isfinite(x) for x in values):
            if st.young:  # a cycle broke down at its first step: the system is (nearly) singular
                return replace(st, broke_down=True), math.nan
            return _restart_from(st, st.z_prev, st.r_prev), st.residual  # undo the step, restart before it
        if tt == 0.0 and ss > 0.0:  # A s = 0 for s != 0: I - J^T is singular
            return replace(st, broke_down=True), math.nan
        residual = math.sqrt(rr) if rr > 0.0 else 0.0
        rhat_norm, tol = math.sqrt(max(st.rhat_sq, 0.0)), st.tol
        near = (
            abs(rho_next) <= tol * rhat_norm * residual
            or abs(rv) <= tol * rhat_norm * math.sqrt(max(vv, 0.0))
            or abs(ts) <= tol * math.sqrt(max(tt, 0.0) * max(ss, 0.0))
        )
        st = replace(st, residual=residual)
        if near and residual > 0.0:
            st = _restart_from(st, st.z, st.r)
        return st, residual

    def solution(self, A: AdjointOperator, st: _State) -> Array:  # noqa: ARG002 - part of the protocol
        """The iterate of the state (undone steps are not in it)."""
        return st.z

    def breakdown(self, A: AdjointOperator, st: _State) -> bool:  # noqa: ARG002 - part of the protocol
        """Set by :meth:`host_update` when a step broke down right after a restart."""
        return st.broke_down

    def confirm(self, A: AdjointOperator, st: _State, threshold: float) -> tuple[_State, float]:  # noqa: ARG002
        """The true residual of the iterate (one VJP, one transfer); a new cycle starts from it if needed."""
        r = (st.g - st.z) + A.vjp(st.z)
        rn = norm(A.namespace, r)
        return _restart_from(replace(st, residual=rn), st.z, r, count=False), rn

    def stats(self, st: _State) -> dict[str, object]:
        """``restarts`` (cycles begun after the first) and ``memory_vectors``."""
        return {"restarts": st.restarts, "memory_vectors": 7}

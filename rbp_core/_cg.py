"""CG-RBP: conjugate gradient on the normal equations, in the CGLS form."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ._arrays import (
    Array,
    CheckedCallback,
    check_contraction,
    check_int,
    eps,
    namespace_of,
    norm,
    same_kind,
    scale_pow2,
    unit_scale,
)
from ._certificate import residual_bound
from ._defaults import DEFAULT_MAX_ITER, resolve_tol
from ._monitor import adjoint_monitor, trivial_input
from ._solution import Solution, Status
from ._vector import norm_from_sq, vector_ops

__all__ = ["cg_rbp"]


def cg_rbp(
    vjp: Callable[[Array], Array],
    jvp: Callable[[Array], Array],
    g: Array,
    *,
    tol: float | None = None,
    max_iter: int = DEFAULT_MAX_ITER,
    z0: Array | None = None,
    contraction: float | None = None,
    throw: bool = True,
) -> Solution:
    r"""Solve :math:`(I - J^T) z = g` by conjugate gradient on the normal equations.

    With ``A = I - J^T`` this is CG on ``A^T A z = A^T g``, that is
    ``(I - J)(I - J^T) z = (I - J) g``, written in the CGLS form: the
    residual ``r = g - A z`` of the original system is updated alongside ``z``
    at no extra cost and the solve stops when ``||r|| <= tol * ||g||``. It
    converges whenever ``I - J`` is invertible, whatever the spectral radius
    of ``J``, at a rate set by the condition number of ``I - J`` (squared by the
    normal equations). Each iteration costs one VJP and one JVP.

    Parameters
    ----------
    vjp : callable
        ``v -> J^T v``.
    jvp : callable
        ``v -> J v``.
    g : array
        Right-hand side, any shape. Never modified.
    tol : float, optional
        Relative tolerance; default ``sqrt(eps)`` of ``g``'s dtype.
    max_iter : int
        Iteration budget (>= 1).
    z0 : array, optional
        Warm start (costs one extra VJP for its residual); zeros by default.
    contraction : float, optional
        A bound ``mu < 1`` on ``||J||_2``. At the end the residual of the
        returned value is evaluated afresh (one more VJP, so that rounding in
        the updated residual cannot make the bound optimistic) and
        ``error_bound = (||r|| + delta) / (1 - mu)``, with an allowance
        ``delta`` for rounding. The norms ``||J r_0||/||r_0||`` and
        ``||J^T z||/||z||`` seen on the way are checked against ``mu``; a
        larger one raises :class:`~rbp_core.ContractionViolation`.
    throw : bool
        Raise :class:`~rbp_core.ConvergenceError` unless the solve converged.

    Returns
    -------
    Solution
        ``residual_norms[i-1] = ||g - (I - J^T) z_i||`` as updated by the
        recurrence. ``BREAKDOWN`` means a search direction ``p`` with
        ``(I - J^T) p = 0`` up to the rounding of that difference: the system
        is singular. At extreme scales of ``g`` the solve runs on ``g`` scaled
        exactly by a power of two to unit norm, so its squared norms stay in
        range, and the solution for ``s * g`` is ``s`` times the solution for
        ``g``, to rounding, for any ``s``.

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> J = np.array([[1.5, 0.0], [0.0, -2.0]])  # spectral radius 2: original RBP diverges
    >>> sol = rbp_core.cg_rbp(lambda v: J.T @ v, lambda v: J @ v, np.ones(2), tol=1e-12)
    >>> np.allclose(sol.value, np.linalg.solve(np.eye(2) - J.T, np.ones(2)))
    True
    """
    xp = namespace_of(g, "g")
    tol = resolve_tol(tol, xp, g.dtype)
    max_iter = check_int(max_iter, "max_iter", 1)
    mu = check_contraction(contraction)
    op = CheckedCallback(vjp, "vjp", g, xp)
    op_t = CheckedCallback(jvp, "jvp", g, xp)
    gnorm = norm(xp, g)
    # CG's recurrences square norms (gamma = ||A^T r||^2, delta = ||A p||^2), which leave the
    # dtype's range long before the vectors do: at extreme scales the solve runs on g / 2^e, undone
    # on the way out (unit_scale). The Monitor reports in the caller's units.
    e, gs, gnorm_s = unit_scale(xp, g, gnorm)
    mon = adjoint_monitor(
        "cg_rbp", xp, gs, gnorm_s, max_iter=max_iter, threshold=tol * gnorm_s, contraction=mu, successive_images=False
    )
    mon.unit = math.ldexp(1.0, e)
    trivial = trivial_input(mon, xp, g, gnorm, certified=mu is not None, throw=throw)
    if trivial is not None:
        return trivial

    if z0 is None:
        z = xp.zeros_like(g)
        r = gs
        rnorm = gnorm_s
    else:
        same_kind(xp, z0, g, "z0")
        z = scale_pow2(xp, z0, -e)
        r = gs - z + op(z)
        rnorm = norm(xp, r)
        if not math.isfinite(rnorm):
            mon.history.append(rnorm)
            return mon.finish(xp.asarray(z0, copy=True), Status.NONFINITE, num_vjp=op.calls, throw=throw)

    ops = vector_ops(xp)
    status: Status | None = Status.SUCCESS if rnorm <= tol * gnorm_s else None
    if status is None:
        s, gamma = ops.sub_sq(r, op_t(r))  # A^T r = r - J r and ||A^T r||^2
        p = s
        if mu is not None:  # J r = r - s: one more lower bound on ||J|| = ||J^T||
            mon.check_ratio(norm(xp, r - s), rnorm)
    # gamma and delta stay on the arrays' device (0-d arrays): the residual norm is the only
    # value each iteration brings to the host.
    while status is None:
        jtp = op(p)
        q, delta = ops.sub_sq(p, jtp)  # A p and ||A p||^2
        z_new, r_new, rho = ops.cg_update(z, p, r, q, gamma, delta)  # alpha = gamma / delta
        rnorm_new = norm_from_sq(xp, rho, r_new)
        # CGLS never increases the residual in exact arithmetic: a step that does, or a NaN from
        # delta = 0, asks whether A p vanished relative to its operands, a singular system.
        if not rnorm_new <= rnorm and _annihilated(xp, q, p, jtp):
            mon.history.append(rnorm)
            status = Status.BREAKDOWN
            break
        r, rnorm = r_new, rnorm_new
        status = mon.observe(rnorm)
        if status is Status.NONFINITE:
            break
        z = z_new
        if status is not None:
            break
        s, gamma_new = ops.sub_sq(r, op_t(r))
        p = ops.xpby(s, p, gamma_new, gamma)
        gamma = gamma_new

    assert status is not None  # the loop only ends with a status
    bound = None
    if mu is not None and status is not Status.NONFINITE:
        bound = residual_bound(xp, op, gs, z, gnorm_s, mu, mon)
    z = scale_pow2(xp, z, e)
    if z is z0:
        z = xp.asarray(z, copy=True)
    return mon.finish(z, status, num_vjp=op.calls, num_jvp=op_t.calls, error_bound=bound, throw=throw)


def _annihilated(xp: Any, q: Array, p: Array, jtp: Array) -> bool:
    """Whether ``q = p - J^T p`` is zero up to the rounding of that difference: zero curvature.

    Only asked when a step went wrong, so its two extra norms (host transfers) are off the hot path.
    """
    qnorm = norm(xp, q)
    return qnorm <= 2.0 * eps(xp, q.dtype) * (norm(xp, p) + norm(xp, jtp))

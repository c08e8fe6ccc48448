"""Original RBP (Almeida 1987, Pineda 1987): the fixed-point iteration z <- J^T z + g."""

from __future__ import annotations

import math
from collections.abc import Callable

from ._arrays import (
    Array,
    CheckedCallback,
    check_contraction,
    check_int,
    namespace_of,
    norm,
    same_kind,
    scale_pow2,
    unit_scale,
)
from ._certificate import residual_bound
from ._defaults import DEFAULT_DIVERGENCE_FACTOR, DEFAULT_MAX_ITER, check_divergence_factor, resolve_tol
from ._monitor import adjoint_monitor, trivial_input
from ._solution import Solution, Status
from ._vector import norm_from_sq, vector_ops

__all__ = ["original_rbp"]


def original_rbp(
    vjp: Callable[[Array], Array],
    g: Array,
    *,
    tol: float | None = None,
    max_iter: int = DEFAULT_MAX_ITER,
    z0: Array | None = None,
    contraction: float | None = None,
    divergence_factor: float | None = DEFAULT_DIVERGENCE_FACTOR,
    throw: bool = True,
) -> Solution:
    r"""Solve :math:`(I - J^T) z = g` by iterating ``z_i = vjp(z_{i-1}) + g``.

    Converges when the spectral radius of ``J`` is below 1, at a rate of about
    that radius per iteration, and diverges otherwise even when ``I - J`` is
    invertible: use :func:`cg_rbp` there. The difference ``z_i - z_{i-1}`` is
    exactly the residual ``g - (I - J^T) z_{i-1}``; the iteration stops when its
    norm is ``<= tol * ||g||``.

    Parameters
    ----------
    vjp : callable
        ``v -> J^T v``; returns an array like ``g``.
    g : array
        Right-hand side, any shape. Never modified.
    tol : float, optional
        Relative tolerance; default ``sqrt(eps)`` of ``g``'s dtype.
    max_iter : int
        Iteration budget (>= 1).
    z0 : array, optional
        Warm start. Without it ``z_0 = 0``, so ``z_1 = g`` costs no VJP and
        ``num_vjp = num_steps - 1``; with it every iteration costs one VJP.
    contraction : float, optional
        A bound ``mu < 1`` on ``||J||_2``; gives ``error_bound``, a bound on
        ``||z_i - z*||`` that holds in floating point, from the residual of
        the returned ``z_i`` evaluated afresh (one more VJP, counted in
        ``num_vjp``): ``(||g - z_i + J^T z_i|| + delta) / (1 - mu)``.
    divergence_factor : float or None
        Status ``DIVERGED`` as soon as the residual norm exceeds this factor
        times the smallest residual norm seen; None turns the test off (for a
        non-normal ``J`` whose residuals grow for a while before they shrink).
    throw : bool
        Raise :class:`~rbp_core.ConvergenceError` unless the solve converged.

    Returns
    -------
    Solution
        ``residual_norms[i-1] = ||z_i - z_{i-1}||``.

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> J = np.array([[0.5, 0.0], [0.1, 0.2]])
    >>> sol = rbp_core.original_rbp(lambda v: J.T @ v, np.ones(2), tol=1e-12)
    >>> sol.converged, np.allclose(sol.value, np.linalg.solve(np.eye(2) - J.T, np.ones(2)))
    (True, True)
    """
    xp = namespace_of(g, "g")
    tol = resolve_tol(tol, xp, g.dtype)
    max_iter = check_int(max_iter, "max_iter", 1)
    mu = check_contraction(contraction)
    divergence_factor = check_divergence_factor(divergence_factor)
    op = CheckedCallback(vjp, "vjp", g, xp)
    gnorm = norm(xp, g)
    e, gs, gnorm_s = unit_scale(xp, g, gnorm)  # extreme scales: solved for g / 2^e, undone at the end
    mon = adjoint_monitor(
        "original_rbp",
        xp,
        gs,
        gnorm_s,
        max_iter=max_iter,
        threshold=tol * gnorm_s,
        contraction=mu,
        divergence_factor=divergence_factor,
    )
    mon.unit = math.ldexp(1.0, e)
    trivial = trivial_input(mon, xp, g, gnorm, certified=mu is not None, throw=throw)
    if trivial is not None:
        return trivial
    if gnorm == 0.0:
        bound0 = None if mu is None else 0.0
        return mon.finish(xp.zeros_like(g), Status.SUCCESS, num_vjp=0, error_bound=bound0, throw=throw)

    if z0 is None:
        z = gs  # z_1 = J^T 0 + g, no VJP needed
        rnorm = gnorm_s
        status = mon.observe(rnorm)
    else:
        same_kind(xp, z0, g, "z0")
        z = scale_pow2(xp, z0, -e)
        status = None
    ops = vector_ops(xp)
    while status is None:
        z_new, sq = ops.add_diff_sq(op(z), gs, z)  # J^T z + g and ||z_new - z||^2, fused where possible
        rnorm = norm_from_sq(xp, sq, z_new, z)
        status = mon.observe(rnorm)
        if status is Status.NONFINITE:
            break
        z = z_new

    bound = None
    if mu is not None and status is not Status.NONFINITE:
        bound = residual_bound(xp, op, gs, z, gnorm_s, mu, mon)
    z = scale_pow2(xp, z, e)
    if z is g or z is z0:
        z = xp.asarray(z, copy=True)
    return mon.finish(z, status, num_vjp=op.calls, error_bound=bound, throw=throw)

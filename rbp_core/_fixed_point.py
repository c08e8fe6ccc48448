"""The forward solve: (damped) fixed-point iteration h <- F(h)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

from ._arrays import Array, CheckedCallback, check_contraction, check_int, check_nonnegative, eps, namespace_of, norm
from ._certificate import norm_slack
from ._defaults import DEFAULT_DIVERGENCE_FACTOR, DEFAULT_MAX_ITER, check_divergence_factor, resolve_tol
from ._monitor import Monitor, trivial_input
from ._solution import Solution, Status
from ._vector import norm_from_sq, vector_ops

__all__ = ["fixed_point"]


def check_damping(damping: object) -> float:
    """A damping factor in (0, 1]."""
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real):
        msg = f"damping must be a real number in (0, 1], got {damping!r}"
        raise TypeError(msg)
    d = float(damping)
    if not 0.0 < d <= 1.0:
        msg = f"damping must lie in (0, 1], got {damping!r}"
        raise ValueError(msg)
    return d


def fixed_point(
    f: Callable[[Array], Array],
    h0: Array,
    *,
    tol: float | None = None,
    max_iter: int = DEFAULT_MAX_ITER,
    damping: float = 1.0,
    atol: float = 0.0,
    contraction: float | None = None,
    divergence_factor: float | None = DEFAULT_DIVERGENCE_FACTOR,
    throw: bool = True,
) -> Solution:
    r"""Iterate ``h <- (1 - damping) h + damping F(h)`` from ``h0`` to a fixed point.

    Stops when ``||h_{t+1} - h_t|| <= max(tol * ||h_{t+1}||, atol)``. The
    test is relative; ``atol`` (0 by default) is an absolute floor for fixed
    points at or near zero, where a relative test can never be met.

    Parameters
    ----------
    f : callable
        The map ``h -> F(x, w, h)``; returns an array of the library, shape,
        dtype and device of ``h0``.
    h0 : array
        Starting point, any shape. Never modified.
    tol : float, optional
        Relative tolerance; default ``sqrt(eps)`` of ``h0``'s dtype.
    max_iter : int
        Budget of calls of ``f`` (>= 1).
    damping : float
        Step size in (0, 1]; 1 is the plain iteration.
    atol : float
        Absolute floor of the stopping test.
    contraction : float, optional
        A Lipschitz bound ``mu < 1`` of ``F``. With the damped map's constant
        ``m = 1 - damping + damping * mu`` it gives ``error_bound``, a bound
        on ``||h_{t+1} - h*||``: ``m/(1-m) * ||h_{t+1} - h_t||`` with
        allowances for the rounding of the step, of its norm and of the damped
        combination (``F`` as evaluated is taken as exact; docs/method.md).
    divergence_factor : float or None
        Status ``DIVERGED`` once the step norm exceeds this factor times the
        smallest step norm seen; None turns the test off.
    throw : bool
        Raise :class:`~rbp_core.ConvergenceError` unless the solve converged.

    Returns
    -------
    Solution
        ``value`` is the last iterate ``h_{t+1}``; ``residual_norms`` holds
        ``||h_{t+1} - h_t||``; ``num_vjp`` counts the calls of ``f``.

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> sol = rbp_core.fixed_point(np.cos, np.zeros(3), tol=1e-12, contraction=0.85)
    >>> bool(np.allclose(sol.value, np.cos(sol.value)))
    True
    """
    xp = namespace_of(h0, "h0")
    tol = resolve_tol(tol, xp, h0.dtype)
    atol = check_nonnegative(atol, "atol")
    max_iter = check_int(max_iter, "max_iter", 1)
    beta = check_damping(damping)
    mu = check_contraction(contraction)
    divergence_factor = check_divergence_factor(divergence_factor)
    m = None if mu is None else 1.0 - beta + beta * mu
    op = CheckedCallback(f, "f", h0, xp)
    root_eps = math.sqrt(eps(xp, h0.dtype))
    hnorm = norm(xp, h0)
    mon = Monitor(
        "fixed_point",
        max_iter=max_iter,
        threshold=max(tol * hnorm, atol),
        divergence_factor=divergence_factor,
        ratio_bound=m,
        slack=root_eps * hnorm,
        rel_slack=root_eps,
    )
    trivial = trivial_input(mon, xp, h0, hnorm, certified=m is not None, throw=throw)
    if trivial is not None:
        return trivial

    ops = vector_ops(xp)
    h = h0
    dnorm = math.inf
    hnorm_prev = hnorm
    status: Status | None = None
    while status is None:
        fh = op(h)
        h_new = fh if beta == 1.0 else (1.0 - beta) * h + beta * fh
        dsq, hsq = ops.step_sqs(h_new, h)  # one host transfer for both where the backend fuses them
        dnorm = norm_from_sq(xp, dsq, h_new, h)
        hnorm_prev, hnorm = hnorm, norm_from_sq(xp, hsq, h_new)
        threshold = max(tol * hnorm, atol)
        mon.slack = root_eps * hnorm
        status = mon.observe(dnorm if math.isfinite(hnorm) else math.nan, threshold)
        if status is Status.NONFINITE:
            break
        h = h_new

    bound = None
    if m is not None and status is not Status.NONFINITE:
        bound = _step_bound(xp, h0, m, beta, dnorm, hnorm, hnorm_prev)
    if h is h0:
        h = xp.asarray(h, copy=True)
    return mon.finish(h, status, num_vjp=op.calls, error_bound=bound, throw=throw)


def _step_bound(xp: Any, like: Array, m: float, beta: float, dnorm: float, hnorm: float, hnorm_prev: float) -> float:
    """A bound on ``||h_{t+1} - h*||`` from the step that holds in floating point.

    With ``T(h) = (1 - beta) h + beta F(h)`` an ``m``-contraction and ``h_{t+1} = T(h_t) + e``, where
    ``e`` is the rounding of ``F``'s result (taken as at most one rounding per element, as for an
    element-wise map) and of the damped combination, ``||h_{t+1} - h*|| <= (m D + (1 + m) E) / (1 - m)``
    for ``D`` the true step norm and ``E >= ||e||``. ``D`` is bounded from the computed norm of the
    computed difference.
    """
    ep = eps(xp, like.dtype)
    slack = norm_slack(xp, like)
    step = dnorm * slack * (1.0 + ep)
    err = ep * hnorm if beta == 1.0 else ep * hnorm + 2.0 * ep * (hnorm + 2.0 * hnorm_prev)
    return (m * step + (1.0 + m) * err * slack) / (1.0 - m) * (1.0 + 16 * 2.0**-53)

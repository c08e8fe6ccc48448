"""Neumann-RBP: the truncated Neumann series of (I - J^T)^{-1} g in constant memory."""

from __future__ import annotations

import math
from collections.abc import Callable

from ._arrays import Array, CheckedCallback, check_contraction, check_int, namespace_of, norm, scale_pow2, unit_scale
from ._certificate import residual_bound
from ._defaults import NEUMANN_DIVERGENCE_FACTOR, check_divergence_factor
from ._monitor import adjoint_monitor, trivial_input
from ._solution import Solution, Status
from ._vector import norm_from_sq, vector_ops

__all__ = ["neumann_rbp"]


def neumann_rbp(
    vjp: Callable[[Array], Array],
    g: Array,
    *,
    steps: int,
    contraction: float | None = None,
    divergence_factor: float | None = NEUMANN_DIVERGENCE_FACTOR,
    throw: bool = True,
) -> Solution:
    r"""Sum ``steps + 1`` terms of the Neumann series :math:`\sum_t (J^T)^t g`.

    With ``v_0 = z_0 = g`` it computes ``v_t = vjp(v_{t-1})`` and
    ``z_t = z_{t-1} + v_t`` for ``t = 1..steps``: exactly ``steps`` calls of
    ``vjp`` and two state-sized buffers, whatever ``steps`` is. At an exact
    fixed point this equals truncated back-propagation through the last
    ``steps + 1`` updates.

    Parameters
    ----------
    vjp : callable
        ``v -> J^T v`` for the Jacobian ``J = dF/dh`` at the fixed point.
        Must return an array of the library, shape, dtype and device of ``g``.
    g : array
        The cotangent ``dL/dh*``, any shape (batch axes included; inner products
        and norms run over all elements). Never modified.
    steps : int
        ``K >= 0``, the number of VJPs.
    contraction : float, optional
        A bound ``mu < 1`` on ``||J||_2``. Enables :attr:`!Solution.error_bound`,
        a bound on ``||z_K - z*||`` that holds in floating point: the residual
        ``g - z_K + J^T z_K`` is evaluated afresh (one more VJP, counted in
        ``num_vjp``) and ``error_bound = (||r|| + delta) / (1 - mu)`` with an
        allowance ``delta`` for rounding (the method page says what it
        assumes). A ratio ``||v_t|| / ||v_{t-1}||`` above ``mu`` disproves the
        bound and raises :class:`~rbp_core.ContractionViolation`.
    divergence_factor : float or None
        Status ``DIVERGED`` as soon as a term's norm ``||v_t||`` exceeds this
        factor times the smallest term norm so far (``||g||`` included). The
        default, 10, is far stricter than the tolerance-driven solvers' 1e4:
        a truncated series has no later iterations to recover in, so terms that
        grow tenfold mean the partial sum is no gradient (docs/method.md says
        how the default was chosen). None turns the test off and returns any
        partial sum.
    throw : bool
        Raise :class:`~rbp_core.ConvergenceError` when the series diverges or a
        non-finite value appears (default); otherwise return the failed
        Solution, whose value is the last finite partial sum.

    Returns
    -------
    Solution
        ``residual_norms`` holds ``||v_t||`` for ``t = 1..K``; ``status`` is
        ``SUCCESS`` once the ``K`` steps are done with finite values and no
        sign of divergence: a truncation ran as asked, not a convergence
        test. ``note`` says how many terms were summed and the size of the
        last one relative to the first.

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> J = np.array([[0.5, 0.0], [0.1, 0.2]])
    >>> sol = rbp_core.neumann_rbp(lambda v: J.T @ v, np.ones(2), steps=60, contraction=0.6)
    >>> np.allclose(sol.value, np.linalg.solve(np.eye(2) - J.T, np.ones(2)))
    True
    >>> sol.num_vjp  # 60 for the series, one for the certificate
    61
    """
    xp = namespace_of(g, "g")
    steps = check_int(steps, "steps", 0)
    mu = check_contraction(contraction)
    divergence_factor = check_divergence_factor(divergence_factor)
    op = CheckedCallback(vjp, "vjp", g, xp)
    gnorm = norm(xp, g)
    e, gs, gnorm_s = unit_scale(xp, g, gnorm)  # extreme scales: solved for g / 2^e, undone at the end
    mon = adjoint_monitor(
        "neumann_rbp",
        xp,
        gs,
        gnorm_s,
        max_iter=steps,
        threshold=None,
        contraction=mu,
        divergence_factor=divergence_factor,
    )
    mon.unit = math.ldexp(1.0, e)
    trivial = trivial_input(mon, xp, g, gnorm, certified=mu is not None, throw=throw)
    if trivial is not None:
        return trivial

    mon.best = gnorm_s  # the zeroth term counts for the divergence test
    ops = vector_ops(xp)
    z = gs
    v = gs
    vnorm = gnorm_s
    status = Status.SUCCESS
    for _ in range(steps):
        v = op(v)
        z_new, sq = ops.add_sq(z, v)  # z + v and ||v||^2, one pass where the backend fuses them
        vnorm = norm_from_sq(xp, sq, v)
        done = mon.observe(vnorm)
        if done is Status.NONFINITE:
            status = done
            break
        z = z_new
        if done is not None:
            status = done
            break

    bound = None
    if mu is not None and status is Status.SUCCESS:
        bound = residual_bound(xp, op, gs, z, gnorm_s, mu, mon)
    note = ""
    if status is Status.SUCCESS:
        ratio = f"{vnorm / gnorm_s:.3g}" if gnorm > 0.0 else "n/a"
        last = vnorm * mon.unit
        note = f"summed {mon.num_steps + 1} terms of the series; the last, {last:.3e}, is {ratio} times the first"
    z = scale_pow2(xp, z, e)
    if z is g:  # no term was added: hand back a copy, never the caller's array
        z = xp.asarray(g, copy=True)
    return mon.finish(z, status, num_vjp=op.calls, error_bound=bound, note=note, throw=throw)

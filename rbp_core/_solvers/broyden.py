"""Limited-memory ("good") Broyden on g(h) = F(h) - h, with a safeguarded step."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import array_api_compat

from .._checks import check_divergence_factor, check_int, check_nonnegative, check_tolerances
from .._iterate import Limits
from .._ops import VectorOps
from .._typing import Array, FixedPointMap, Namespace
from ._best import BestIterate, record_best
from ._settings import DEFAULT_DIVERGENCE_FACTOR, DEFAULT_MAX_ITER, resolve_rtol
from .broyden_rows import BroydenRows

__all__ = ["Broyden"]


@dataclass
class _State:
    """The accepted iterate ``x`` and ``g(x)`` (flat), the inverse-Jacobian factors, the step, the best.

    The inverse of ``g``'s Jacobian is approximated by ``H = -I + U^T V`` (rows of ``U`` and ``V``).
    ``pending`` is the accepted step's ``(dx, dg)``, applied to ``H`` at the start of the next step;
    ``trial`` the last evaluated point ``(x, g(x))`` awaiting the host's verdict. Not frozen: the
    best-iterate fields are recorded in place (:func:`~rbp_core._solvers._best.record_best`).
    """

    h0: Array
    x: Array | None = None
    g: Array | None = None
    U: Array | None = None  # (memory, n) buffers, the first ``rank`` rows in use
    V: Array | None = None
    rank: int = 0
    p: Array | None = None
    alpha: float = 1.0
    trial: tuple[Array, Array] | None = None
    pending: tuple[Array, Array] | None = None
    residual: float = math.inf
    best: Array | None = None
    best_residual: float = math.inf
    best_scale: float = 0.0
    best_iteration: int = 0
    iteration: int = 0
    backtracks: int = 0
    restarts: int = 0
    secants: tuple[tuple[float, float], ...] | None = ()  # None: no contraction to check, not computed

    @property
    def best_point(self) -> Array | None:
        """The best accepted iterate (flat)."""
        return self.best


@dataclass(frozen=True, kw_only=True)  # settings by name: a positional value could land in the wrong one
class Broyden(BestIterate):
    r"""Limited-memory good Broyden on :math:`g(h) = F(h) - h`: one call of ``f`` per iteration.

    The inverse of :math:`g`'s Jacobian :math:`J - I` is approximated by :math:`H = -I + \sum_i u_i v_i^T`,
    updated after each accepted step by the good-Broyden rank-one formula (so the first step is
    the plain one, :math:`h + g(h) = F(h)`), and the step is :math:`p = -H g(h)`. At most ``memory``
    updates are kept; a full memory restarts from :math:`H = -I`. All products with the factors run on
    the device; the host receives the two norms of the stopping test and a secant pair in one
    transfer. Safeguard: a step whose residual exceeds ``safeguard`` times the current one is not
    taken; the step length halves (up to ``backtracks`` times, each one more call of ``f``), after
    which the memory restarts and the plain step is taken. A zero curvature :math:`\Delta x^T H \Delta g` skips the
    update rather than dividing by it. The Solution holds the iterate with the smallest residual.

    Stops when :math:`\|F(h) - h\| \le \max(\mathrm{rtol}\,\|F(h)\|, \mathrm{atol})`. Memory: ``2 memory + 6`` state-sized
    arrays. Its step lengths are host decisions, so BPTT and TBPTT refuse it (use an implicit
    backward method). With a ``contraction`` bound the certificate is the residual's, as for
    :class:`Anderson`.

    Parameters
    ----------
    memory : int
        :math:`m \ge 1` rank-one updates kept (default 50; on the tanh layer of ``bench_forward.py`` 10
        updates needed 139 calls of ``f`` to 1e-6 where 50 needed 81 and 200 needed 85).
    safeguard : float
        A step whose residual exceeds this factor (> 1) times the current one is shortened
        (default 10; 2 cost 100 calls to 1e-6 there instead of 81).
    backtracks : int
        How many halvings before the plain step (default 4).
    rtol : float, optional
        Relative tolerance; default ``sqrt(eps)`` of ``h0``'s dtype.
    atol : float
        Absolute floor of the stopping test (default 0).
    max_iter : int
        Budget of calls of ``f`` (>= 1).
    divergence_factor : float or None
        Status ``DIVERGED`` once the residual exceeds this factor times the smallest seen.

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> A = np.array([[0.0, 1.5], [-1.5, 0.0]])  # spectral radius 1.5: plain iteration diverges
    >>> sol = rbp_core.fixed_point(lambda h: A @ h + 1.0, np.zeros(2), rbp_core.Broyden(rtol=1e-12))
    >>> bool(np.allclose(sol.value, np.linalg.solve(np.eye(2) - A, np.ones(2))))
    True
    """

    memory: int = 50
    safeguard: float = 10.0
    backtracks: int = 4
    rtol: float | None = None
    atol: float = 0.0
    max_iter: int = DEFAULT_MAX_ITER
    divergence_factor: float | None = DEFAULT_DIVERGENCE_FACTOR
    name: ClassVar[str] = "broyden"
    differentiable_step: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_int(self.memory, "memory", 1)
        if not check_nonnegative(self.safeguard, "safeguard") > 1.0:
            msg = f"safeguard must be > 1, got {self.safeguard!r}"
            raise ValueError(msg)
        check_int(self.backtracks, "backtracks", 0)
        check_tolerances(self.rtol, self.atol, self.max_iter)
        check_divergence_factor(self.divergence_factor)

    def limits(self, xp: Namespace, dtype: Any) -> Limits:
        """``max_iter`` calls of ``f`` to ``max(rtol ||F(h)||, atol)``."""
        return Limits(self.max_iter, resolve_rtol(self.rtol, xp, dtype), self.atol, self.divergence_factor)

    def per_sample(self) -> BroydenRows:
        """The same method for a batch of independent samples (``batch_axis``): each its own updates."""
        return BroydenRows(self)

    def start(self, h0: Array, *, secants: bool) -> _State:
        """The state before the first evaluation."""
        return _State(h0=h0, secants=() if secants else None)

    def step(self, f: FixedPointMap, st: _State, ops: VectorOps) -> tuple[_State, None, Array, tuple[()]]:
        """Update ``H`` with the last accepted step, then evaluate ``F`` at ``x + alpha p``."""
        xp = ops.xp
        shape = st.h0.shape
        rank = st.rank
        if st.x is None or st.g is None:  # the first evaluation: F(h0)
            x_new, U, V, p = xp.reshape(st.h0, (-1,)), None, None, None
            secant = [ops.sqnorm(x_new) * 0.0] * 2 if st.secants is not None else []
        else:
            U, V, p = st.U, st.V, st.p
            if st.pending is not None:  # the good-Broyden update for the accepted step, then a new direction
                dx, dg = st.pending
                k = st.rank
                Hdg = _apply(U, V, k, dg)
                denom = ops.dot(dx, Hdg)
                inv = ops.ratio_or_zero(denom * 0.0 + 1.0, denom)  # 1 / dx^T H dg, or 0: no update
                u_row = ops.axpy(inv, dx - Hdg, xp.zeros_like(dx))
                v_row = _apply(U, V, k, dx, transpose=True)
                if U is None or V is None:  # the method's own buffers, written in place
                    U = xp.empty((self.memory, dx.shape[0]), dtype=dx.dtype, device=array_api_compat.device(dx))
                    V = xp.empty_like(U)  # rows are read only once written
                if k >= self.memory:  # a full memory restarts from H = -I and this update
                    k = 0
                U = ops.put(U, (k, slice(None)), u_row)
                V = ops.put(V, (k, slice(None)), v_row)
                rank = k + 1
                p = -_apply(U, V, rank, st.g)
            assert p is not None
            x_new = ops.axpy(st.alpha, p, st.x)
        G = xp.reshape(f(xp.reshape(x_new, shape)), (-1,))
        g_new = G - x_new
        if st.x is not None and st.g is not None:
            secant = (
                [] if st.secants is None else [ops.sqnorm((g_new + x_new) - (st.g + st.x)), ops.sqnorm(x_new - st.x)]
            )
        values = xp.concat([xp.reshape(v, (1,)) for v in (ops.sqnorm(g_new), ops.sqnorm(G), *secant)])
        new = replace(st, U=U, V=V, rank=rank, p=p, pending=None, trial=(x_new, g_new), iteration=st.iteration + 1)
        return new, None, values, ()

    def host_update(self, st: _State, values: tuple[float, ...]) -> tuple[_State, float, float]:
        """Accept the trial point, or halve the step (a safeguarded line search); track the best."""
        residual = math.sqrt(values[0]) if values[0] > 0.0 else 0.0
        scale = math.sqrt(values[1]) if values[1] > 0.0 else 0.0
        if not (math.isfinite(residual) and math.isfinite(scale)) or st.trial is None:
            return st, math.nan, scale
        x_new, g_new = st.trial
        first = st.x is None or st.g is None
        if not first and residual > self.safeguard * st.residual:
            if st.backtracks < self.backtracks:  # shorten the step, same direction, no update
                return replace(st, alpha=0.5 * st.alpha, backtracks=st.backtracks + 1, trial=None), residual, scale
            # Out of halvings: take the point, and restart the memory (the next step is the plain one).
            st = replace(st, rank=0, restarts=st.restarts + 1)
            pending = None
        else:
            pending = None if first else (x_new - st.x, g_new - st.g)
        secants = st.secants
        if secants is not None and not first and values[3] > 0.0:
            secants = (*secants, (math.sqrt(values[2]), math.sqrt(values[3])))
        st = replace(
            st,
            x=x_new,
            g=g_new,
            pending=pending,
            p=g_new if pending is None else st.p,
            alpha=1.0,
            backtracks=0,
            trial=None,
            residual=residual,
            secants=secants,
        )
        return record_best(st, x_new, residual, scale), residual, scale

    def stats(self, st: _State) -> dict[str, object]:
        """``best_iteration``, ``memory_restarts`` and ``memory_vectors``."""
        return {
            "best_iteration": st.best_iteration,
            "memory_restarts": st.restarts,
            "memory_vectors": 2 * self.memory + 6,
        }


def _apply(U: Array | None, V: Array | None, k: int, y: Array, *, transpose: bool = False) -> Array:
    """``H y = -y + U_k^T (V_k y)`` (or ``H^T y``) with the first ``k`` rows; ``H = -I`` before any update."""
    if U is None or V is None or k == 0:
        return -y
    left, right = (V[:k, :], U[:k, :]) if transpose else (U[:k, :], V[:k, :])
    return (right @ y) @ left - y

"""Safeguarded type-II Anderson acceleration of the forward iteration h <- F(h)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from .._checks import check_divergence_factor, check_nonnegative, check_tolerances
from .._iterate import Limits
from .._ops import VectorOps
from .._typing import Array, FixedPointMap, Namespace
from ._best import BestIterate, record_best
from ._mixing import ADAPTIVE, Memory, check_settings
from ._settings import DEFAULT_DIVERGENCE_FACTOR, DEFAULT_MAX_ITER, resolve_rtol
from .anderson_rows import AndersonRows

__all__ = ["Anderson"]


class _State:
    """The last evaluated iterate ``h``, ``f = F(h) - h`` and ``F(h)`` (flat), the memory, and the best so far.

    Mutable and owned by one solve: copying a frozen state (``replace``, seven times a step) cost
    about 28 us per iteration, as much as the host's solve of the mixing coefficients.
    """

    __slots__ = (
        "G",
        "best",
        "best_iteration",
        "best_residual",
        "best_scale",
        "f",
        "fallback",
        "h",
        "h0",
        "iteration",
        "mem",
        "reject",
        "rejections",
        "resets",
        "secants",
    )

    def __init__(self, h0: Array, memory: int, mixing: float | str, *, secants: bool) -> None:
        self.h0 = h0
        self.h: Array | None = None
        self.f: Array | None = None
        self.G: Array | None = None
        self.mem = Memory(memory, mixing)
        self.best: tuple[Array, Array, Array] | None = None  # (h, f, F(h)) of the smallest residual
        self.best_residual = math.inf
        self.best_scale = 0.0
        self.best_iteration = 0
        self.iteration = 0
        self.reject = False  # the next step is a plain step from the best iterate
        self.fallback = False  # the last evaluated step was that plain step: taken whatever its residual
        self.rejections = 0
        self.resets = 0
        # (||F(h) - F(h')||, ||h - h'||) of consecutive evaluations, when a contraction is to be checked
        self.secants: list[tuple[float, float]] | None = [] if secants else None

    @property
    def best_point(self) -> Array | None:
        """The best evaluated iterate (flat)."""
        return None if self.best is None else self.best[0]


@dataclass(frozen=True, kw_only=True)  # settings by name: a positional value could land in the wrong one
class Anderson(BestIterate):
    r"""Safeguarded type-II Anderson acceleration of :math:`h \leftarrow F(h)`: one call of ``f`` per iteration.

    Each iteration evaluates :math:`F` at :math:`h + \beta f - (\Delta G - (1 - \beta) \Delta F) \gamma`, where
    :math:`f = F(h) - h`, :math:`\Delta F` and :math:`\Delta G` hold the differences of the last ``memory`` residuals and
    images, and :math:`\gamma` minimises :math:`\|f - \Delta F \gamma\|^2 + \lambda \|\gamma\|^2` with
    :math:`\lambda = \mathrm{regularization} \cdot \max \operatorname{diag}(\Delta F\, \Delta F^T)`: relative to the residuals' scale, so the
    method keeps its conditioning as they shrink and reaches tight tolerances (a fixed ridge, as in
    TorchDEQ, swamps small residuals). The Gram matrix reaches the host with the two norms of the
    stopping test in one transfer. Safeguards: a step whose residual exceeds ``safeguard`` times the
    smallest so far is rejected, the memory restarts, and the next step is the plain step from the
    best iterate, taken whatever its residual (the method falls back to plain iteration there); a
    Gram matrix the host cannot factor restarts the memory too. The Solution holds
    the iterate with the smallest residual (``stats["best_iteration"]``; the note says when that is
    not the last).

    Stops when :math:`\|F(h) - h\| \le \max(\mathrm{rtol}\,\|F(h)\|, \mathrm{atol})`. Memory: ``2 memory + 6`` state-sized
    arrays. Its step mixes with coefficients solved on the host, so it cannot be unrolled under
    autograd (``differentiable_step`` is False: the torch adapter's BPTT and TBPTT refuse it; use an
    implicit backward method). With a ``contraction`` bound :math:`\mu` of :math:`F` the certificate is
    :math:`\|F(h) - h\| / (1 - \mu)` with allowances for rounding, for the returned iterate.

    Parameters
    ----------
    memory : int
        :math:`m \ge 1`: how many past differences the mixing uses (default 10).
    mixing : float or "adaptive"
        :math:`\beta \in (0, 1]`: 1 takes the mixed images, smaller values damp towards the iterates.
        ``"adaptive"`` (the default) takes :math:`\beta = 1 - \langle \Delta G, \Delta F\rangle / \langle \Delta F, \Delta F\rangle` from the newest
        differences, kept in ``[0.5, 4]``: the step along the new direction at the map's own scale
        (:math:`1 / (1 - \lambda)` for :math:`F(h) = \lambda h + c`). In bench_forward.py it saved 10 % of the
        calls to 1e-4 on the DEQ ResNet cell (19 -> 17, three seeds) and 18-22 % to 1e-10 on the
        tanh layer, and cost at most one call elsewhere.
    regularization : float
        The relative Tikhonov factor (default 1e-10).
    safeguard : float
        A step whose residual exceeds this factor (> 1) times the smallest so far is rejected.
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
    >>> sol = rbp_core.fixed_point(lambda h: A @ h + 1.0, np.zeros(2), rbp_core.Anderson(rtol=1e-12))
    >>> bool(np.allclose(sol.value, np.linalg.solve(np.eye(2) - A, np.ones(2))))
    True
    """

    memory: int = 10
    mixing: float | str = ADAPTIVE
    regularization: float = 1e-10
    safeguard: float = 10.0
    rtol: float | None = None
    atol: float = 0.0
    max_iter: int = DEFAULT_MAX_ITER
    divergence_factor: float | None = DEFAULT_DIVERGENCE_FACTOR
    name: ClassVar[str] = "anderson"
    differentiable_step: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_settings(self.memory, self.mixing, self.regularization, adaptive=True)
        if not check_nonnegative(self.safeguard, "safeguard") > 1.0:
            msg = f"safeguard must be > 1, got {self.safeguard!r}"
            raise ValueError(msg)
        check_tolerances(self.rtol, self.atol, self.max_iter)
        check_divergence_factor(self.divergence_factor)

    def limits(self, xp: Namespace, dtype: Any) -> Limits:
        """``max_iter`` calls of ``f`` to ``max(rtol ||F(h)||, atol)``."""
        return Limits(self.max_iter, resolve_rtol(self.rtol, xp, dtype), self.atol, self.divergence_factor)

    def per_sample(self) -> AndersonRows:
        """The same method for a batch of independent samples (``batch_axis``): each its own mixing."""
        return AndersonRows(self)

    def start(self, h0: Array, *, secants: bool) -> _State:
        """The state before the first evaluation."""
        return _State(h0, self.memory, self.mixing, secants=secants)

    def step(self, f: FixedPointMap, st: _State, ops: VectorOps) -> tuple[_State, None, Array, tuple[()]]:
        """Evaluate ``F`` at the next iterate (plain, mixed, or from the best after a rejection)."""
        xp = ops.xp
        mem = st.mem
        if st.f is None or st.G is None:  # the first evaluation: F(h0)
            h = xp.reshape(st.h0, (-1,))
        elif st.reject and st.best is not None:
            h = st.best[2]  # the plain step from the best iterate
        else:
            h = mem.mixed(ops, st.f, st.G)
        G = xp.reshape(f(xp.reshape(h, st.h0.shape)), (-1,))
        r = G - h
        extra = [ops.sqnorm(G)]
        if st.f is not None and st.G is not None:
            # The newest differences, from the last point or (after a rejection, into the memory
            # restarted then) from the best: dG = F(h) - F(h') and dG - dF = h - h'.
            f_prev, G_prev = (st.best[1], st.best[2]) if st.reject and st.best is not None else (st.f, st.G)
            mem.extend(ops, r, G, f_prev, G_prev)
            if st.secants is not None:
                dg, df = mem.newest()
                extra += [ops.sqnorm(dg), ops.sqnorm(dg - df)]
        if st.secants is not None and len(extra) == 1:  # no pair yet: two zeros keep the transfer's layout
            extra += [extra[0] * 0.0] * 2
        st.fallback, st.reject = st.reject and st.best is not None, False
        st.h, st.f, st.G = h, r, G
        st.iteration += 1
        return st, None, mem.transfer(ops, r, extra), ()

    def host_update(self, st: _State, values: tuple[float, ...]) -> tuple[_State, float, float]:
        """The residual and scale; the best iterate; a rejection, or the mixing coefficients."""
        residual = math.sqrt(values[0]) if values[0] > 0.0 else 0.0
        scale = math.sqrt(values[1]) if values[1] > 0.0 else 0.0
        if not (math.isfinite(residual) and math.isfinite(scale)):
            return st, math.nan, scale
        start = 2
        if st.secants is not None:
            if values[3] > 0.0:
                st.secants.append((math.sqrt(values[2]), math.sqrt(values[3])))
            start = 4
        if residual > self.safeguard * st.best_residual and not st.fallback:  # reject: restart from the best
            st.reject = True
            st.mem.reset()
            st.rejections += 1
            return st, residual, scale
        record_best(st, (st.h, st.f, st.G), residual, scale)
        if not st.mem.update(values[start:], self.regularization):
            st.mem.reset()
            st.resets += 1
        return st, residual, scale

    def stats(self, st: _State) -> dict[str, object]:
        """``best_iteration``, ``rejected_steps``, ``memory_resets`` and ``memory_vectors``."""
        return {
            "best_iteration": st.best_iteration,
            "rejected_steps": st.rejections,
            "memory_resets": st.resets,
            "memory_vectors": 2 * self.memory + 6,
        }

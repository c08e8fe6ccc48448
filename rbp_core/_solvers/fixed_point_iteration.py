"""The forward solve by (damped) fixed-point iteration h <- (1 - damping) h + damping F(h)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .._certificate import norm_slack
from .._checks import check_damping, check_divergence_factor, check_tolerances
from .._floats import eps
from .._iterate import Limits
from .._ops import VectorOps
from .._typing import Array, FixedPointMap, Namespace
from ._settings import DEFAULT_DIVERGENCE_FACTOR, DEFAULT_MAX_ITER, resolve_rtol

__all__ = ["FixedPointIteration"]


@dataclass(frozen=True, kw_only=True)  # settings by name: a positional value could land in the wrong one
class FixedPointIteration:
    r"""Iterate :math:`h \leftarrow (1 - \beta) h + \beta F(h)` (:math:`\beta` the ``damping``) to a fixed point: the default forward solver.

    Stops when :math:`\|h_{t+1} - h_t\| \le \max(\mathrm{rtol}\,\|h_{t+1}\|, \mathrm{atol})`. The test
    is relative; ``atol`` is an absolute floor for fixed points at or near zero,
    where a relative test can never be met. The Solution's ``value`` is the last
    iterate :math:`h_{t+1}`, ``residual_norms`` holds :math:`\|h_{t+1} - h_t\|` and
    ``num_f_evals`` counts the calls of ``f``.

    With a Lipschitz bound :math:`\mu < 1` of :math:`F` (``contraction=``), the damped map's
    constant :math:`m = 1 - \beta + \beta \mu` gives ``error_bound``, a bound on
    :math:`\|h_{t+1} - h^*\|`: :math:`\frac{m}{1 - m} \|h_{t+1} - h_t\|` with allowances for the
    rounding of the step, of its norm and of the damped combination (``F`` as
    evaluated is taken as exact; docs/method.md).

    Parameters
    ----------
    rtol : float, optional
        Relative tolerance; default ``sqrt(eps)`` of ``h0``'s dtype.
    atol : float
        Absolute floor of the stopping test (default 0).
    max_iter : int
        Budget of calls of ``f`` (>= 1).
    damping : float
        Step size in (0, 1]; 1 is the plain iteration.
    divergence_factor : float or None
        Status ``DIVERGED`` once the step norm exceeds this factor times the
        smallest step norm seen; None turns the test off.

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> sol = rbp_core.fixed_point(np.cos, np.zeros(3), rbp_core.FixedPointIteration(rtol=1e-12), contraction=0.85)
    >>> bool(np.allclose(sol.value, np.cos(sol.value))), sol.num_f_evals == sol.num_steps
    (True, True)
    """

    rtol: float | None = None
    atol: float = 0.0
    max_iter: int = DEFAULT_MAX_ITER
    damping: float = 1.0
    divergence_factor: float | None = DEFAULT_DIVERGENCE_FACTOR
    name: ClassVar[str] = "fixed_point_iteration"
    differentiable_step: ClassVar[bool] = True
    successive_images: ClassVar[bool] = True  # each step is the damped map applied to the last one

    def __post_init__(self) -> None:
        check_tolerances(self.rtol, self.atol, self.max_iter)
        check_damping(self.damping)
        check_divergence_factor(self.divergence_factor)

    def limits(self, xp: Namespace, dtype: Any) -> Limits:
        """``max_iter`` calls of ``f`` to ``max(rtol ||h||, atol)``."""
        return Limits(self.max_iter, resolve_rtol(self.rtol, xp, dtype), self.atol, self.divergence_factor)

    def init(self, f: FixedPointMap, h0: Array, ops: VectorOps) -> tuple[Any, Array, Any]:  # noqa: ARG002
        """The state is the iterate itself."""
        return h0, h0, None

    def step(self, f: FixedPointMap, state: Any, ops: VectorOps) -> tuple[Any, Array, Any, Any]:
        """``h <- (1 - damping) h + damping f(h)``; monitors the step and the new iterate."""
        h = state
        fh = f(h)
        beta = self.damping
        h_new = fh if beta == 1.0 else (1.0 - beta) * h + beta * fh
        return h_new, h_new, ops.step_sqnorms(h_new, h), ((h_new, h), (h_new, None))

    def stats(self, state: Any) -> dict[str, object]:  # noqa: ARG002 - part of the protocol
        """``memory_vectors``: the state-sized arrays kept between steps (the iterate)."""
        return {"memory_vectors": 1}

    def step_contraction(self, mu: float) -> float:
        """``1 - damping + damping * mu``, the damped map's Lipschitz constant."""
        return 1.0 - self.damping + self.damping * mu

    def error_bound(
        self, xp: Namespace, like: Array, mu: float, norms: tuple[float, ...], previous: float, state: Any
    ) -> float:
        """A bound on ``||h_{t+1} - h*||`` from the last step that holds in floating point.

        With ``T(h) = (1 - beta) h + beta F(h)`` an ``m``-contraction and ``h_{t+1} = T(h_t) + e``,
        where ``e`` is the rounding of ``F``'s result (taken as at most one rounding per element, as
        for an element-wise map) and of the damped combination, ``||h_{t+1} - h*|| <= (m D + (1 + m) E)
        / (1 - m)`` for ``D`` the true step norm and ``E >= ||e||``. ``D`` is bounded from the computed
        norm of the computed difference; ``norms`` are the last step's and iterate's, ``previous`` the
        norm of the iterate before (``state`` is not needed).
        """
        del state
        dnorm, hnorm = norms
        beta, m = self.damping, self.step_contraction(mu)
        ep = eps(xp, like.dtype)
        slack = norm_slack(xp, like)
        step = dnorm * slack * (1.0 + ep)
        err = ep * hnorm if beta == 1.0 else ep * hnorm + 2.0 * ep * (hnorm + 2.0 * previous)
        return (m * step + (1.0 + m) * err * slack) / (1.0 - m) * (1.0 + 16 * 2.0**-53)

"""What a forward solver that keeps its best iterate shares: the iterate returned, its certificate, its note.

:class:`~rbp_core.Anderson` and :class:`~rbp_core.Broyden` evaluate ``F`` at points of their own
choosing and return the evaluated point with the smallest residual. Their states carry ``h0``,
``best_point`` (None before the first evaluation), ``best_residual``, ``best_scale``,
``best_iteration``, ``iteration`` and ``secants`` (None when no contraction is claimed: not computed); :func:`record_best` updates the best fields in
place (the states are mutable, owned by one solve).
"""

from __future__ import annotations

from typing import Any

import array_api_compat

from .._certificate import fixed_point_residual_bound
from .._typing import Array, FixedPointMap, Namespace

__all__ = ["BestIterate", "record_best"]


def record_best(st: Any, best: Any, residual: float, scale: float) -> Any:
    """``st``, with ``best`` (whatever the state keeps of the point) recorded if ``residual`` is the smallest yet."""
    if residual < st.best_residual:
        st.best, st.best_residual, st.best_scale, st.best_iteration = best, residual, scale, st.iteration
    return st


class BestIterate:
    """The protocol members of a forward solver that returns its best evaluated iterate.

    A subclass gives ``start(h0, *, secants)``, its state before the first evaluation.
    """

    def init(
        self,
        f: FixedPointMap,  # noqa: ARG002 - part of the protocol
        h0: Array,
        ops: Any,  # noqa: ARG002 - part of the protocol
        *,
        secants: bool = True,
    ) -> tuple[Any, Array, None]:
        """Nothing evaluated yet: the first step evaluates ``F(h0)``; ``secants`` for a claimed contraction."""
        return self.start(h0, secants=secants), h0, None  # type: ignore[attr-defined]

    def solution(self, f: FixedPointMap, st: Any) -> Array:  # noqa: ARG002 - part of the protocol
        """The iterate with the smallest residual."""
        if st.best_point is None:
            return st.h0
        return array_api_compat.array_namespace(st.h0).reshape(st.best_point, st.h0.shape)

    def step_contraction(self, mu: float) -> None:  # noqa: ARG002 - part of the protocol
        """None: one step is not a map with a known constant (the certificate is the residual's)."""
        return

    def error_bound(
        self, xp: Namespace, like: Array, mu: float, norms: tuple[float, ...], previous: float, state: Any
    ) -> float:
        """``||h - h*|| <= ||F(h) - h|| / (1 - mu)`` for the returned ``h``, rounding included."""
        del norms, previous
        return fixed_point_residual_bound(xp, like, mu, float(state.best_residual), float(state.best_scale))

    def lipschitz_pairs(self, st: Any) -> tuple[tuple[float, float], ...]:
        """The secant pairs ``(||F(h) - F(h')||, ||h - h'||)`` met, for the check of a claimed contraction."""
        return tuple(st.secants or ())

    def final_note(self, st: Any) -> str:
        """Says when the returned iterate is not the last one."""
        if st.best_point is None or st.best_iteration == st.iteration:
            return ""
        return (
            f"returned iteration {st.best_iteration} of {st.iteration}, the one with the smallest residual "
            f"({st.best_residual:.3e})"
        )

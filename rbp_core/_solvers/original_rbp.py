"""Original RBP (Almeida 1987, Pineda 1987): the fixed-point iteration z <- J^T z + g."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .._checks import check_divergence_factor, check_tolerances
from .._iterate import Limits
from .._operator import AdjointOperator
from .._ops import VectorOps
from .._typing import Array, Namespace
from ._settings import DEFAULT_DIVERGENCE_FACTOR, DEFAULT_MAX_ITER, resolve_rtol

__all__ = ["OriginalRBP"]


@dataclass(frozen=True, kw_only=True)  # settings by name: a positional value could land in the wrong one
class OriginalRBP:
    r"""Original RBP: solve :math:`(I - J^T) z = g` by iterating :math:`z_i = J^T z_{i-1} + g`.

    Converges when the spectral radius of :math:`J` is below 1, at a rate of about
    that radius per iteration, and diverges otherwise even when :math:`I - J` is
    invertible: use :class:`CGRBP` there. The difference :math:`z_i - z_{i-1}` is
    exactly the residual :math:`g - (I - J^T) z_{i-1}`; the iteration stops when its
    norm is :math:`\le \max(\mathrm{rtol}\,\|g\|, \mathrm{atol})`, and ``residual_norms[i-1]`` is
    :math:`\|z_i - z_{i-1}\|`. Without a warm start :math:`z_0 = 0`, so :math:`z_1 = g` costs
    no VJP and ``num_vjp = num_steps - 1``; with one every iteration costs one VJP.

    Parameters
    ----------
    rtol : float, optional
        Relative tolerance; default ``sqrt(eps)`` of ``g``'s dtype.
    atol : float
        Absolute floor of the stopping test (default 0).
    max_iter : int
        Iteration budget (>= 1).
    divergence_factor : float or None
        Status ``DIVERGED`` as soon as the residual norm exceeds this factor
        times the smallest residual norm seen; None turns the test off (for a
        non-normal :math:`J` whose residuals grow for a while before they shrink).

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> J = np.array([[0.5, 0.0], [0.1, 0.2]])
    >>> sol = rbp_core.solve_adjoint(lambda v: J.T @ v, np.ones(2), rbp_core.OriginalRBP(rtol=1e-12))
    >>> sol.converged, np.allclose(sol.value, np.linalg.solve(np.eye(2) - J.T, np.ones(2)))
    (True, True)
    """

    rtol: float | None = None
    atol: float = 0.0
    max_iter: int = DEFAULT_MAX_ITER
    divergence_factor: float | None = DEFAULT_DIVERGENCE_FACTOR
    name: ClassVar[str] = "original_rbp"
    needs_jvp: ClassVar[bool] = False
    supports_warm_start: ClassVar[bool] = True
    successive_images: ClassVar[bool] = True  # z_{i+1} - z_i = J^T (z_i - z_{i-1})
    start_is_iteration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_tolerances(self.rtol, self.atol, self.max_iter)
        check_divergence_factor(self.divergence_factor)

    def limits(self, xp: Namespace, dtype: Any) -> Limits:
        """``max_iter`` steps to ``max(rtol ||g||, atol)``."""
        return Limits(self.max_iter, resolve_rtol(self.rtol, xp, dtype), self.atol, self.divergence_factor)

    def init(self, A: AdjointOperator, g: Array, z0: Array | None, ops: VectorOps) -> tuple[Any, Array, Any]:  # noqa: ARG002
        """From ``z_0 = 0`` the first iterate ``z_1 = g`` is free; a warm start begins at ``z0``."""
        if z0 is None:
            return (g, g), g, ((ops.sqnorm(g),), ((g, None),))
        return (z0, g), z0, None

    def step(self, A: AdjointOperator, state: Any, ops: VectorOps) -> tuple[Any, Array, Any, Any]:
        """``z <- J^T z + g``; monitors ``||z_new - z||``."""
        z, g = state
        z_new, sq = ops.add_sqdist(A.vjp(z), g, z)
        return (z_new, g), z_new, (sq,), ((z_new, z),)

    def stats(self, state: Any) -> dict[str, object]:  # noqa: ARG002 - part of the protocol
        """``memory_vectors``: the state-sized arrays kept between steps (the iterate; ``g`` is the caller's)."""
        return {"memory_vectors": 1}

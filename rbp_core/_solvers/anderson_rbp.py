"""Anderson-accelerated original RBP: z <- J^T z + g mixed over a memory of past iterates."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from .._checks import check_divergence_factor, check_tolerances
from .._iterate import Limits
from .._operator import AdjointOperator
from .._ops import VectorOps
from .._typing import Array, Namespace
from ._mixing import Memory, check_settings
from ._settings import DEFAULT_DIVERGENCE_FACTOR, DEFAULT_MAX_ITER, resolve_rtol
from .anderson_rows import AndersonRBPRows

__all__ = ["AndersonRBP"]


@dataclass(frozen=True)
class _State:
    """The last evaluated iterate ``z``, its residual ``f = G(z) - z`` and image ``G(z)`` (flat), and the memory.

    Frozen, so that the driver's last finite state keeps its ``z``; the memory inside is updated in place.
    """

    g: Array
    z: Array
    f: Array
    G: Array
    mem: Memory
    resets: int = 0


@dataclass(frozen=True, kw_only=True)  # settings by name: a positional value could land in the wrong one
class AndersonRBP:
    r"""Original RBP accelerated by Anderson mixing: one VJP per iteration, ``2 memory + 3`` vectors.

    Iterates the adjoint map :math:`G(z) = J^T z + g`, whose residual :math:`f = G(z) - z` is the residual
    :math:`g - (I - J^T) z` of the adjoint equation, and takes as the next iterate
    :math:`z + \beta f - (\Delta G - (1 - \beta) \Delta F) \gamma` (:math:`\beta` the ``mixing``), where :math:`\Delta F` and :math:`\Delta G` hold the differences
    of the last ``memory`` residuals and images and :math:`\gamma` minimises
    :math:`\|f - \Delta F \gamma\|^2 + \lambda \|\gamma\|^2`. The Gram matrix :math:`\Delta F\, \Delta F^T` and :math:`\Delta F f` come to
    the host with the residual norm in one transfer, where the small system is solved. The
    regularisation is relative, :math:`\lambda = \mathrm{regularization} \cdot \max \operatorname{diag}(\Delta F\, \Delta F^T)`, so it keeps the
    same conditioning as the residuals shrink and tight tolerances stay reachable. A system the
    host cannot solve (or a :math:`\gamma` that is not finite) clears the memory: the step is a plain
    RBP step. Converges where original RBP does, usually far faster for :math:`\rho(J)` near 1.

    Parameters
    ----------
    memory : int
        :math:`m \ge 1`: how many past differences the mixing uses.
    mixing : float
        :math:`\beta \in (0, 1]`: 1 takes the mixed images, smaller values damp towards the iterates.
    regularization : float
        The relative Tikhonov factor (default 1e-10).
    rtol : float, optional
        Relative tolerance on :math:`\|g - (I - J^T) z\|`; default ``sqrt(eps)`` of ``g``'s dtype.
    atol : float
        Absolute floor of the stopping test (default 0).
    max_iter : int
        Iteration budget (>= 1).
    divergence_factor : float or None
        Status ``DIVERGED`` once the residual exceeds this factor times the smallest seen.

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> J = np.diag([0.99, 0.5, -0.9])
    >>> sol = rbp_core.solve_adjoint(lambda v: J.T @ v, np.ones(3), rbp_core.AndersonRBP(rtol=1e-10))
    >>> bool(np.allclose(sol.value, 1 / (1 - np.diag(J)))), sol.num_vjp < 20
    (True, True)
    """

    memory: int = 5
    mixing: float = 1.0
    regularization: float = 1e-10
    rtol: float | None = None
    atol: float = 0.0
    max_iter: int = DEFAULT_MAX_ITER
    divergence_factor: float | None = DEFAULT_DIVERGENCE_FACTOR
    name: ClassVar[str] = "anderson_rbp"
    needs_jvp: ClassVar[bool] = False
    supports_warm_start: ClassVar[bool] = True
    successive_images: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_settings(self.memory, self.mixing, self.regularization)
        check_tolerances(self.rtol, self.atol, self.max_iter)
        check_divergence_factor(self.divergence_factor)

    def per_sample(self) -> AndersonRBPRows:
        """The same method for a batch of independent samples (``batch_axis``): each its own mixing."""
        return AndersonRBPRows(self)

    def limits(self, xp: Namespace, dtype: Any) -> Limits:
        """``max_iter`` iterations to ``max(rtol ||g||, atol)``."""
        return Limits(self.max_iter, resolve_rtol(self.rtol, xp, dtype), self.atol, self.divergence_factor)

    def init(self, A: AdjointOperator, g: Array, z0: Array | None, ops: VectorOps) -> tuple[Any, Array, Any]:
        """``z0`` (one VJP for its image) or 0 (whose image ``g`` is free); its residual is the reference."""
        xp = ops.xp
        flat_g = xp.reshape(g, (-1,))
        if z0 is None:
            z, G = xp.zeros_like(g), flat_g
        else:
            z, G = z0, xp.reshape(A.vjp(z0), (-1,)) + flat_g
        f = G - xp.reshape(z, (-1,))
        return _State(g=g, z=z, f=f, G=G, mem=Memory(self.memory, self.mixing)), z, ((ops.sqnorm(f),), ((f, None),))

    def step(self, A: AdjointOperator, st: _State, ops: VectorOps) -> tuple[_State, None, Array, tuple[()]]:
        """Form the mixed iterate, evaluate ``G`` there (one VJP), extend the memory, transfer its Gram matrix."""
        xp = ops.xp
        shape = st.g.shape
        z = st.mem.mixed(ops, st.f, st.G)
        G = xp.reshape(A.vjp(xp.reshape(z, shape)), (-1,)) + xp.reshape(st.g, (-1,))
        f = G - z
        st.mem.extend(ops, f, G, st.f, st.G)
        return replace(st, z=xp.reshape(z, shape), f=f, G=G), None, st.mem.transfer(ops, f), ()

    def host_update(self, st: _State, values: tuple[float, ...]) -> tuple[_State, float]:
        """Solve ``(dF dF^T + lambda I) gamma = dF f`` on the host; the residual norm is ``||f||``."""
        residual = math.sqrt(values[0]) if values[0] > 0.0 else 0.0
        if not math.isfinite(residual):
            return st, residual
        if not st.mem.update(values[1:], self.regularization):  # nothing usable: forget it, take a plain step
            st.mem.reset()
            return replace(st, resets=st.resets + 1), residual
        return st, residual

    def solution(self, A: AdjointOperator, st: _State) -> Array:  # noqa: ARG002 - part of the protocol
        """The last evaluated iterate: the one whose residual was monitored."""
        return st.z

    def stats(self, st: _State) -> dict[str, object]:
        """``memory_resets`` (unsolvable mixing systems) and ``memory_vectors``."""
        return {"memory_resets": st.resets, "memory_vectors": 2 * self.memory + 3}

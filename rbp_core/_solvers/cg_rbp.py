"""CG-RBP: conjugate gradient on the normal equations, in the CGLS form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .._checks import check_tolerances
from .._floats import eps
from .._iterate import Limits
from .._norms import norm
from .._operator import AdjointOperator
from .._ops import VectorOps
from .._typing import Array, Namespace
from ._settings import DEFAULT_MAX_ITER, resolve_rtol

__all__ = ["CGRBP"]


@dataclass(frozen=True, kw_only=True)  # settings by name: a positional value could land in the wrong one
class CGRBP:
    r"""CG-RBP: solve :math:`(I - J^T) z = g` by conjugate gradient on the normal equations.

    With :math:`A = I - J^T` this is CG on :math:`A^T A z = A^T g`, that is
    :math:`(I - J)(I - J^T) z = (I - J) g`, in the CGLS form: the residual
    :math:`r = g - A z` of the original system is updated alongside :math:`z` at no extra
    cost, and the solve stops when :math:`\|r\| \le \max(\mathrm{rtol}\,\|g\|, \mathrm{atol})`. It
    converges whenever :math:`I - J` is invertible, whatever the spectral radius of
    :math:`J`, at a rate set by the condition number of :math:`I - J` (squared by the
    normal equations). Each iteration costs one VJP and one JVP; a warm start
    ``z0`` costs one more VJP for its residual. ``residual_norms[i-1]`` is
    :math:`\|g - (I - J^T) z_i\|` as updated by the recurrence.

    ``BREAKDOWN`` means a search direction :math:`p` with :math:`(I - J^T) p = 0` up to
    the rounding of that difference: the system is singular.

    Parameters
    ----------
    rtol : float, optional
        Relative tolerance; default ``sqrt(eps)`` of ``g``'s dtype.
    atol : float
        Absolute floor of the stopping test (default 0).
    max_iter : int
        Iteration budget (>= 1).

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> J = np.array([[1.5, 0.0], [0.0, -2.0]])  # spectral radius 2: original RBP diverges
    >>> sol = rbp_core.solve_adjoint(lambda v: J.T @ v, np.ones(2), rbp_core.CGRBP(rtol=1e-12), jvp=lambda v: J @ v)
    >>> np.allclose(sol.value, np.linalg.solve(np.eye(2) - J.T, np.ones(2)))
    True
    """

    rtol: float | None = None
    atol: float = 0.0
    max_iter: int = DEFAULT_MAX_ITER
    name: ClassVar[str] = "cg_rbp"
    needs_jvp: ClassVar[bool] = True
    supports_warm_start: ClassVar[bool] = True
    successive_images: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_tolerances(self.rtol, self.atol, self.max_iter)

    def limits(self, xp: Namespace, dtype: Any) -> Limits:
        """``max_iter`` steps to ``max(rtol ||g||, atol)``; CG has no divergence test (its residual never grows)."""
        return Limits(self.max_iter, resolve_rtol(self.rtol, xp, dtype), self.atol, None)

    def init(self, A: AdjointOperator, g: Array, z0: Array | None, ops: VectorOps) -> tuple[Any, Array, Any]:
        """``z = 0, r = g``, or the residual of the warm start; ``||r||`` is the reference."""
        if z0 is None:
            z, r = ops.xp.zeros_like(g), g
        else:
            z, r = z0, A.vjp(z0) + (g - z0)
        return (z, r, None, None, None, None), z, ((ops.sqnorm(r),), ((r, None),))

    def step(self, A: AdjointOperator, state: Any, ops: VectorOps) -> tuple[Any, Array, Any, Any]:
        """A new direction from ``A^T r``, then ``z <- z + alpha p`` and ``r <- r - alpha A p``; monitors ``||r||``."""
        z, r, p, gamma, _, _ = state
        jr = A.jvp(r)
        s, gamma_new = ops.axpy_sqnorm(-1.0, jr, r)  # A^T r = r - J r and its squared norm
        if p is None:
            p = s
            A.record_pair(ops.sqnorm(jr), ops.sqnorm(r))  # ||J r|| / ||r||: a lower bound on ||J||
        else:
            p = ops.axpy(ops.ratio(gamma_new, gamma), p, s)
        gamma = gamma_new
        jtp = A.vjp(p)
        q, delta = ops.axpy_sqnorm(-1.0, jtp, p)  # A p and ||A p||^2
        alpha = ops.ratio(gamma, delta)  # NaN when delta = 0: a breakdown, told apart by the driver
        z = ops.axpy(alpha, p, z)
        r, rho = ops.axpy_sqnorm(-alpha, q, r)
        return (z, r, p, gamma, jtp, q), z, (rho,), ((r, None),)

    def stats(self, state: Any) -> dict[str, object]:  # noqa: ARG002 - part of the protocol
        """``memory_vectors``: the state-sized arrays kept between steps (z, r, p, A p and J^T p)."""
        return {"memory_vectors": 5}

    def breakdown(self, A: AdjointOperator, state: Any) -> bool:
        """Whether the last ``A p = p - J^T p`` vanished up to the rounding of that difference.

        Asked by the driver only when the residual grew or turned NaN, which CGLS never does in
        exact arithmetic, so its three norms (host transfers) are off the hot path.
        """
        _, _, p, _, jtp, q = state
        xp = A.namespace
        return norm(xp, q) <= 2.0 * eps(xp, q.dtype) * (norm(xp, p) + norm(xp, jtp))

"""Neumann-RBP: the truncated Neumann series of (I - J^T)^{-1} g in constant memory."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar

from .._checks import check_divergence_factor, check_int
from .._iterate import Limits
from .._operator import AdjointOperator
from .._ops import VectorOps
from .._typing import Array, Namespace
from ._settings import NEUMANN_DIVERGENCE_FACTOR

__all__ = ["Neumann"]


@dataclass(frozen=True)
class Neumann:
    r"""Neumann-RBP: sum ``steps + 1`` terms of the series :math:`\sum_t (J^T)^t g`.

    With :math:`v_0 = z_0 = g` each step computes :math:`v_t = J^T v_{t-1}` and
    :math:`z_t = z_{t-1} + v_t`: exactly ``steps`` VJPs and two state-sized buffers,
    whatever ``steps`` is. At an exact fixed point this equals truncated
    back-propagation through the last ``steps + 1`` updates. The solve is a
    truncation, not a convergence test: SUCCESS means the ``steps`` ran with
    finite values and no sign of divergence, and ``Solution.note`` says how many
    terms were summed and the size of the last one relative to the first.
    ``residual_norms`` holds :math:`\|v_t\|` for :math:`t = 1, \dots, K`.

    Parameters
    ----------
    steps : int
        :math:`K \ge 0`, the number of VJPs.
    divergence_factor : float or None
        Status ``DIVERGED`` as soon as a term's norm :math:`\|v_t\|` exceeds this
        factor times the smallest term norm so far (:math:`\|g\|` included). The
        default, 10, is far stricter than the tolerance-driven solvers' 1e4:
        a truncated series has no later iterations to recover in, so terms that
        grow tenfold mean the partial sum is no gradient (docs/method.md says
        how the default was chosen). None turns the test off and returns any
        partial sum.

    Notes
    -----
    With a ``contraction`` bound :math:`\mu`, a ratio :math:`\|v_t\| / \|v_{t-1}\|`
    above :math:`\mu` disproves it, and the certificate costs one more VJP.

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> J = np.array([[0.5, 0.0], [0.1, 0.2]])
    >>> sol = rbp_core.solve_adjoint(lambda v: J.T @ v, np.ones(2), rbp_core.Neumann(steps=60), contraction=0.6)
    >>> np.allclose(sol.value, np.linalg.solve(np.eye(2) - J.T, np.ones(2)))
    True
    >>> sol.num_vjp  # 60 for the series, one for the certificate
    61
    """

    steps: int
    _: KW_ONLY  # the rest by name
    divergence_factor: float | None = NEUMANN_DIVERGENCE_FACTOR
    name: ClassVar[str] = "neumann_rbp"
    needs_jvp: ClassVar[bool] = False
    supports_warm_start: ClassVar[bool] = False
    successive_images: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_int(self.steps, "steps", 0)
        check_divergence_factor(self.divergence_factor)

    def limits(self, xp: Namespace, dtype: Any) -> Limits:  # noqa: ARG002 - part of the protocol
        """``steps`` steps, no tolerance."""
        return Limits(max_steps=self.steps, rtol=None, divergence_factor=self.divergence_factor)

    def init(self, A: AdjointOperator, g: Array, z0: Array | None, ops: VectorOps) -> tuple[Any, Array, Any]:  # noqa: ARG002
        r"""``z_0 = v_0 = g``; :math:`\|g\|` is the reference the first term is compared with."""
        return (g, g), g, ((ops.sqnorm(g),), ((g, None),))

    def step(self, A: AdjointOperator, state: Any, ops: VectorOps) -> tuple[Any, Array, Any, Any]:
        """``v <- J^T v``, ``z <- z + v``; monitors ``||v||``."""
        v, z = state
        v = A.vjp(v)
        z, sq = ops.add_sqnorm(v, z)
        return (v, z), z, (sq,), ((v, None),)

    def stats(self, state: Any) -> dict[str, object]:  # noqa: ARG002 - part of the protocol
        """``memory_vectors``: the state-sized arrays kept between steps (the term and the partial sum)."""
        return {"memory_vectors": 2}

    def success_note(self, norms: tuple[float, ...], reference: float) -> str:
        """How many terms were summed, and the size of the last relative to the first."""
        last = norms[-1] if norms else reference
        ratio = f"{last / reference:.3g}" if reference > 0.0 else "n/a"
        return f"summed {len(norms) + 1} terms of the series; the last, {last:.3e}, is {ratio} times the first"

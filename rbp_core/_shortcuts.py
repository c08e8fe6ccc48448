"""The paper's three methods by name: one-line conveniences over :func:`~rbp_core.solve_adjoint`."""

from __future__ import annotations

from ._adjoint import solve_adjoint
from ._solution import Solution
from ._solvers._settings import DEFAULT_DIVERGENCE_FACTOR, DEFAULT_MAX_ITER, NEUMANN_DIVERGENCE_FACTOR
from ._solvers.cg_rbp import CGRBP
from ._solvers.neumann import Neumann
from ._solvers.original_rbp import OriginalRBP
from ._typing import Array, VectorMap

__all__ = ["cg_rbp", "neumann_rbp", "original_rbp"]


def neumann_rbp(
    vjp: VectorMap,
    g: Array,
    *,
    steps: int,
    divergence_factor: float | None = NEUMANN_DIVERGENCE_FACTOR,
    contraction: float | None = None,
    throw: bool = True,
) -> Solution:
    """``solve_adjoint(vjp, g, Neumann(steps, divergence_factor=divergence_factor), ...)``; see :class:`~rbp_core.Neumann`.

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> rbp_core.neumann_rbp(lambda v: 0.5 * v, np.ones(2), steps=40).value
    array([2., 2.])
    """
    return solve_adjoint(
        vjp, g, Neumann(steps, divergence_factor=divergence_factor), contraction=contraction, throw=throw
    )


def original_rbp(
    vjp: VectorMap,
    g: Array,
    *,
    rtol: float | None = None,
    atol: float = 0.0,
    max_iter: int = DEFAULT_MAX_ITER,
    divergence_factor: float | None = DEFAULT_DIVERGENCE_FACTOR,
    z0: Array | None = None,
    contraction: float | None = None,
    throw: bool = True,
) -> Solution:
    """``solve_adjoint(vjp, g, OriginalRBP(rtol=..., ...), ...)``; see :class:`~rbp_core.OriginalRBP`.

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> bool(rbp_core.original_rbp(lambda v: 0.5 * v, np.ones(2), rtol=1e-12).converged)
    True
    """
    method = OriginalRBP(rtol=rtol, atol=atol, max_iter=max_iter, divergence_factor=divergence_factor)
    return solve_adjoint(vjp, g, method, z0=z0, contraction=contraction, throw=throw)


def cg_rbp(
    vjp: VectorMap,
    jvp: VectorMap,
    g: Array,
    *,
    rtol: float | None = None,
    atol: float = 0.0,
    max_iter: int = DEFAULT_MAX_ITER,
    z0: Array | None = None,
    contraction: float | None = None,
    throw: bool = True,
) -> Solution:
    """``solve_adjoint(vjp, g, CGRBP(rtol=rtol, atol=atol, max_iter=max_iter), jvp=jvp, ...)``; see :class:`~rbp_core.CGRBP`.

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> sol = rbp_core.cg_rbp(lambda v: 2.0 * v, lambda v: 2.0 * v, np.ones(2), rtol=1e-12)
    >>> sol.value  # (1 - 2) z = 1
    array([-1., -1.])
    """
    return solve_adjoint(
        vjp, g, CGRBP(rtol=rtol, atol=atol, max_iter=max_iter), jvp=jvp, z0=z0, contraction=contraction, throw=throw
    )

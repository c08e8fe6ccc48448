"""Solver objects: frozen settings that adapters accept, one ``solve`` method each.

A backward method is anything with ``needs_jvp``, ``supports_warm_start`` and
``solve(vjp, g, *, jvp, z0, contraction, throw) -> Solution``
(:class:`BackwardMethod`). New methods (GMRES, BiCGSTAB, Anderson) plug in by
providing the same three members; adapters never look at the concrete type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

from ._arrays import Array, check_int, check_nonnegative
from ._cg import cg_rbp
from ._defaults import (
    DEFAULT_DIVERGENCE_FACTOR,
    DEFAULT_MAX_ITER,
    NEUMANN_DIVERGENCE_FACTOR,
    check_divergence_factor,
)
from ._fixed_point import check_damping, fixed_point
from ._neumann import neumann_rbp
from ._original import original_rbp
from ._solution import Solution

__all__ = ["CGRBP", "BackwardMethod", "FixedPointIteration", "Neumann", "OriginalRBP"]


@runtime_checkable
class BackwardMethod(Protocol):
    """What an adapter needs from a backward (adjoint) solver."""

    @property
    def needs_jvp(self) -> bool:
        """Whether :meth:`solve` needs the ``jvp`` callback."""
        ...

    @property
    def supports_warm_start(self) -> bool:
        """Whether :meth:`solve` accepts a starting point ``z0``."""
        ...

    def solve(
        self,
        vjp: Callable[[Array], Array],
        g: Array,
        *,
        jvp: Callable[[Array], Array] | None = None,
        z0: Array | None = None,
        contraction: float | None = None,
        throw: bool = True,
    ) -> Solution:
        """Solve ``(I - J^T) z = g``."""
        ...


def _optional_tol(tol: float | None) -> None:
    if tol is not None:
        check_nonnegative(tol, "tol")


@dataclass(frozen=True)
class Neumann:
    """Neumann-RBP with ``steps`` VJPs (``steps + 1`` series terms); see :func:`~rbp_core.neumann_rbp`.

    Examples
    --------
    >>> import rbp_core
    >>> rbp_core.Neumann(steps=20)
    Neumann(steps=20, divergence_factor=10.0)
    """

    steps: int
    divergence_factor: float | None = NEUMANN_DIVERGENCE_FACTOR
    needs_jvp: ClassVar[bool] = False
    supports_warm_start: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_int(self.steps, "steps", 0)
        check_divergence_factor(self.divergence_factor)

    def solve(
        self,
        vjp: Callable[[Array], Array],
        g: Array,
        *,
        jvp: Callable[[Array], Array] | None = None,  # noqa: ARG002 - part of the protocol
        z0: Array | None = None,
        contraction: float | None = None,
        throw: bool = True,
    ) -> Solution:
        """Run :func:`~rbp_core.neumann_rbp`; ``jvp`` is not used and ``z0`` is refused."""
        if z0 is not None:
            msg = "Neumann does not take a warm start z0: the series always starts from g"
            raise ValueError(msg)
        return neumann_rbp(
            vjp,
            g,
            steps=self.steps,
            contraction=contraction,
            divergence_factor=self.divergence_factor,
            throw=throw,
        )


@dataclass(frozen=True)
class OriginalRBP:
    """Original RBP, ``z <- J^T z + g`` to a relative tolerance; see :func:`~rbp_core.original_rbp`.

    Examples
    --------
    >>> import rbp_core
    >>> rbp_core.OriginalRBP(tol=1e-8, max_iter=200)
    OriginalRBP(tol=1e-08, max_iter=200, divergence_factor=10000.0)
    """

    tol: float | None = None
    max_iter: int = DEFAULT_MAX_ITER
    divergence_factor: float | None = DEFAULT_DIVERGENCE_FACTOR
    needs_jvp: ClassVar[bool] = False
    supports_warm_start: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _optional_tol(self.tol)
        check_int(self.max_iter, "max_iter", 1)
        check_divergence_factor(self.divergence_factor)

    def solve(
        self,
        vjp: Callable[[Array], Array],
        g: Array,
        *,
        jvp: Callable[[Array], Array] | None = None,  # noqa: ARG002 - part of the protocol
        z0: Array | None = None,
        contraction: float | None = None,
        throw: bool = True,
    ) -> Solution:
        """Run :func:`~rbp_core.original_rbp`; ``jvp`` is not used."""
        return original_rbp(
            vjp,
            g,
            tol=self.tol,
            max_iter=self.max_iter,
            z0=z0,
            contraction=contraction,
            divergence_factor=self.divergence_factor,
            throw=throw,
        )


@dataclass(frozen=True)
class CGRBP:
    """CG-RBP, CGLS on the normal equations; needs a JVP; see :func:`~rbp_core.cg_rbp`.

    Examples
    --------
    >>> import rbp_core
    >>> rbp_core.CGRBP(tol=1e-8).needs_jvp
    True
    """

    tol: float | None = None
    max_iter: int = DEFAULT_MAX_ITER
    needs_jvp: ClassVar[bool] = True
    supports_warm_start: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _optional_tol(self.tol)
        check_int(self.max_iter, "max_iter", 1)

    def solve(
        self,
        vjp: Callable[[Array], Array],
        g: Array,
        *,
        jvp: Callable[[Array], Array] | None = None,
        z0: Array | None = None,
        contraction: float | None = None,
        throw: bool = True,
    ) -> Solution:
        """Run :func:`~rbp_core.cg_rbp`; raises ValueError without ``jvp``."""
        if jvp is None:
            msg = "CGRBP needs the jvp callback (v -> J v) as well as the vjp"
            raise ValueError(msg)
        return cg_rbp(vjp, jvp, g, tol=self.tol, max_iter=self.max_iter, z0=z0, contraction=contraction, throw=throw)


@dataclass(frozen=True)
class FixedPointIteration:
    """The forward solver: (damped) fixed-point iteration; see :func:`~rbp_core.fixed_point`.

    Examples
    --------
    >>> import rbp_core
    >>> rbp_core.FixedPointIteration(tol=1e-10, max_iter=500, damping=0.5).damping
    0.5
    """

    tol: float | None = None
    max_iter: int = DEFAULT_MAX_ITER
    damping: float = 1.0
    atol: float = 0.0
    divergence_factor: float | None = DEFAULT_DIVERGENCE_FACTOR

    def __post_init__(self) -> None:
        _optional_tol(self.tol)
        check_int(self.max_iter, "max_iter", 1)
        check_damping(self.damping)
        check_nonnegative(self.atol, "atol")
        check_divergence_factor(self.divergence_factor)

    def solve(
        self,
        f: Callable[[Array], Array],
        h0: Array,
        *,
        contraction: float | None = None,
        throw: bool = True,
    ) -> Solution:
        """Run :func:`~rbp_core.fixed_point` with these settings."""
        return fixed_point(
            f,
            h0,
            tol=self.tol,
            max_iter=self.max_iter,
            damping=self.damping,
            atol=self.atol,
            contraction=contraction,
            divergence_factor=self.divergence_factor,
            throw=throw,
        )

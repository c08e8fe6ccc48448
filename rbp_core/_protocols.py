"""What the driver and the adapters need from a solver: the two protocols.

An adjoint method solves :math:`(I - J^T) z = g` on an :class:`~rbp_core._operator.AdjointOperator`;
a forward solver finds ``h = F(h)``. Both are frozen dataclasses whose fields are their settings,
validated once, with an ``init``/``step`` pair that the driver (:mod:`rbp_core._iterate`) runs.
``step`` returns ``(state, iterate, squared_norms, vectors)``: the new iterate, the 0-d arrays
whose square roots the driver monitors (the first is the residual the tolerance applies to; a
forward solver's second is the new iterate's own norm), and for each the array it is the norm of
(or the pair whose difference it is), used only when the fast sum of squares was 0, inf or NaN.
Neither method ever converts an array to a Python number.

Optional members the driver reads when a solver has them: ``successive_images`` (each monitored
norm is that of ``J^T`` (or the step map) applied to the previous vector, so their ratios are
checked against a claimed contraction), ``start_is_iteration`` (see :class:`AdjointMethod`),
``breakdown(problem, state)`` (asked when the residual grew or turned NaN: True means BREAKDOWN),
``success_note(norms, reference)`` (words for :attr:`Solution.note` on success),
``stats(state)`` (solver-specific counts for :attr:`Solution.stats`) and, for a forward solver
whose steps are no single map, ``lipschitz_pairs(state)``: the secant pairs
``(||F(h) - F(h')||, ||h - h'||)`` it met, checked against a claimed contraction. Such a solver's
``init`` takes ``secants=False`` when no contraction is claimed, and then need not compute them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

from ._iterate import Limits, Vectors
from ._operator import AdjointOperator
from ._ops import VectorOps
from ._typing import Array, Namespace

__all__ = ["AdjointMethod", "ForwardSolver"]

Start = tuple[Any, Array, tuple[Sequence[Array], Vectors] | None]
Step = tuple[Any, Array, Sequence[Array], Vectors]


@runtime_checkable
class AdjointMethod(Protocol):
    """A solver of :math:`(I - J^T) z = g`: :class:`~rbp_core.Neumann`, :class:`~rbp_core.OriginalRBP`, ...

    ``init`` may return, as its third item, a measurement of its start: with
    ``start_is_iteration`` it counts as the first iteration (original RBP's ``z_1 = g``);
    otherwise it is the reference residual the first step is compared with.
    """

    name: ClassVar[str]
    needs_jvp: ClassVar[bool]
    supports_warm_start: ClassVar[bool]

    def limits(self, xp: Namespace, dtype: Any) -> Limits:
        """Budget, tolerances and divergence test, resolved for the dtype of ``g``."""
        ...

    def init(self, A: AdjointOperator, g: Array, z0: Array | None, ops: VectorOps) -> Start:
        """The state before the first step, the first iterate, and optionally a measured start."""
        ...

    def step(self, A: AdjointOperator, state: Any, ops: VectorOps) -> Step:
        """One iteration."""
        ...


@runtime_checkable
class ForwardSolver(Protocol):
    r"""A solver of :math:`h = F(h)`: :class:`~rbp_core.FixedPointIteration`, ...

    ``differentiable_step`` says whether ``step`` may run under an autodiff framework's
    recording (the torch adapter's BPTT and TBPTT unroll it), and ``step_contraction(mu)``
    gives the Lipschitz constant of one step for a map with constant :math:`\mu`, when one step
    is such a map (None otherwise: the certificate then comes from :meth:`error_bound` alone).
    """

    name: ClassVar[str]
    differentiable_step: ClassVar[bool]

    def limits(self, xp: Namespace, dtype: Any) -> Limits:
        """Budget, tolerances and divergence test, resolved for the dtype of ``h0``."""
        ...

    def init(self, f: Any, h0: Array, ops: VectorOps) -> Start:
        """The state before the first step."""
        ...

    def step(self, f: Any, state: Any, ops: VectorOps) -> Step:
        """One iteration; its monitored norms are the step and the new iterate."""
        ...

    def step_contraction(self, mu: float) -> float | None:
        r"""The Lipschitz constant of one step when :math:`F`'s is :math:`\mu`, or None."""
        ...

    def error_bound(
        self, xp: Namespace, like: Array, mu: float, norms: tuple[float, ...], previous: float, state: Any
    ) -> float:
        """A bound on the distance of the returned iterate from :math:`h^*`, from the last ``norms`` or the final ``state``."""
        ...

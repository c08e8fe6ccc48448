"""The linear operator ``A = I - J^T`` of the adjoint equation ``A z = g``, and its transpose ``I - J``."""

from __future__ import annotations

from ._callbacks import CheckedCallback
from ._typing import Array, Namespace

__all__ = ["AdjointOperator"]


class AdjointOperator:
    """``A = I - J^T`` from the checked callbacks ``v -> J^T v`` and (optionally) ``v -> J v``.

    Adjoint methods act on the problem through this object only: :meth:`vjp` for the
    series methods, :meth:`matvec` and :meth:`rmatvec` for the Krylov ones. It counts the
    products, and it collects pairs ``(||J v||^2, ||v||^2)`` that a method meets on the way
    (:meth:`record_pair`): each is a lower bound on ``||J||_2``, which the driver checks
    against a claimed contraction at the end, with no host transfer during the iteration.
    """

    __slots__ = ("checks_contraction", "jvp", "namespace", "pairs", "vjp")

    def __init__(
        self, xp: Namespace, vjp: CheckedCallback, jvp: CheckedCallback | None, *, checks_contraction: bool
    ) -> None:
        self.namespace = xp
        self.vjp = vjp
        """``v -> J^T v`` (the checked callback itself: no wrapper on the hot path)."""
        self.jvp: CheckedCallback | _NoJVP = jvp if jvp is not None else _NoJVP()
        """``v -> J v``; only for methods that declare ``needs_jvp``."""
        self.checks_contraction = checks_contraction
        self.pairs: list[tuple[Array, Array]] = []

    @property
    def num_vjp(self) -> int:
        """Products with ``J^T`` so far."""
        return self.vjp.calls

    @property
    def num_jvp(self) -> int:
        """Products with ``J`` so far."""
        return self.jvp.calls

    def matvec(self, v: Array) -> Array:
        """``(I - J^T) v``."""
        return v - self.vjp(v)

    def rmatvec(self, v: Array) -> Array:
        """``(I - J) v``."""
        return v - self.jvp(v)

    def record_pair(self, image_sq: Array, vector_sq: Array) -> None:
        """Note ``||J v||^2`` (or ``||J^T v||^2``) and ``||v||^2``, 0-d arrays, for the contraction check."""
        if self.checks_contraction:
            self.pairs.append((image_sq, vector_sq))


class _NoJVP:
    """The ``jvp`` of an operator built without one: it refuses to run (methods that need it get one)."""

    calls = 0

    def __call__(self, v: Array) -> Array:  # noqa: ARG002 - a callback's signature
        msg = "this adjoint method needs the jvp callback (v -> J v), which was not given"
        raise ValueError(msg)

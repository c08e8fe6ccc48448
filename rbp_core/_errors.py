"""Exceptions raised by rbp-core."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._solution import Solution, Status

__all__ = ["BackwardFailureWarning", "ContractionViolation", "ConvergenceError", "RBPError"]


class RBPError(Exception):
    """Base class of the errors that rbp-core raises on purpose."""


class ConvergenceError(RBPError):
    """A solve failed. The :class:`~rbp_core.Solution` is attached.

    Attributes
    ----------
    solution : Solution
        Everything the solver knew when it stopped.
    status : Status
        Shortcut for ``solution.status``.
    """

    def __init__(self, solution: Solution) -> None:
        self.solution = solution
        self.status: Status = solution.status
        super().__init__(solution.describe())


class ContractionViolation(RBPError, ValueError):  # noqa: N818 - it reports a violated bound
    r"""The user's ``contraction`` bound was contradicted by the iteration.

    Each step of the RBP iterations applies :math:`J^T` to a known vector, so the
    ratio of consecutive norms is a lower bound on :math:`\|J\|_2`. When it exceeds
    the stated bound, the error certificate built on that bound would be
    false, so rbp-core refuses to return it.
    """


class BackwardFailureWarning(RuntimeWarning):
    """An implicit backward solve failed and its gradient was skipped or applied inexact (see ``on_failure``)."""

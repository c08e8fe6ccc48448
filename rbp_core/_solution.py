"""Outcomes of a solve as data: the :class:`Status` enum and the :class:`Solution`."""

from __future__ import annotations

import enum
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Solution", "Status"]


class Status(enum.Enum):
    """How an iteration ended. The value of each member is a message for users."""

    SUCCESS = "converged"
    MAX_STEPS = "the maximum number of iterations was reached before the tolerance was met"
    DIVERGED = "the iteration diverged (its monitored norm grew past divergence_factor times its smallest value)"
    NONFINITE = "a non-finite value (NaN or Inf) appeared"
    BREAKDOWN = (
        "breakdown: I - J^T annihilated a direction the method built (it is singular there, to rounding), "
        "so the method cannot go on"
    )


@dataclass(frozen=True, eq=False)
class Solution:
    r"""The result of a forward or backward solve.

    Attributes
    ----------
    value : array
        The solution, in the caller's array library, dtype and device. When
        the solve fails it is the last iterate whose values were all finite
        (zeros when the input itself was not finite), never an array holding
        NaN.
    status : Status
        How the iteration ended.
    method : str
        The name of the solver that produced this solution, its ``name``
        (``"fixed_point_iteration"``, ``"neumann_rbp"``, ``"original_rbp"``,
        ``"cg_rbp"``, ...).
    num_steps : int
        Iterations performed.
    num_vjp : int
        Calls of the ``vjp`` callback (0 for a forward solve).
    num_jvp : int
        Calls of the ``jvp`` callback (0 for a forward solve).
    residual_norms : tuple of float
        The norm monitored at each iteration (see each routine for what it
        is), as Python floats.
    tolerance : float or None
        The absolute threshold the monitored norm was compared with; None for
        methods that run a fixed number of steps.
    error_bound : float or None
        Given a contraction bound :math:`\mu` on the Jacobian's 2-norm, a bound on
        the 2-norm distance between :attr:`!value` and the exact solution,
        rounding included (see the certificates in the method page); None
        when no contraction bound was given or it was shown false.
    contraction_violated : bool
        True when the iteration met a vector ``v`` with :math:`\|J v\| > \mu \|v\|`
        (beyond rounding) for the ``contraction`` bound :math:`\mu` it was given:
        the bound is false, so :attr:`!error_bound` is None.
    note : str
        What the status alone does not say, in words: for a truncated
        Neumann series the number of terms and the size of the last one
        relative to the first; for ``DIVERGED`` the growth that tripped the
        test, the setting, and how to relax it. Empty otherwise.
    num_f_evals : int
        Calls of ``f`` in a forward solve (0 for an adjoint solve).
    stats : Mapping
        Counts that only some solvers have, by name (read-only).
    num_sample_evals : int
        With ``batch_axis``: the samples evaluated by the callbacks in all (each call counts the
        samples it was given: all of the batch, or only the active ones with ``takes_indices``).
    sample_status : tuple of Status or None
        With ``batch_axis``: each sample's status, in batch order (None without). The batch's
        :attr:`!status` is SUCCESS when every sample converged, else the first of NONFINITE,
        DIVERGED, BREAKDOWN and MAX_STEPS that a sample ended with; :attr:`!note` names the
        samples that failed.
    sample_num_steps : tuple of int or None
        With ``batch_axis``: each sample's iterations (:attr:`!num_steps` is the largest).
    sample_residual_norms : tuple of tuple of float, or None
        With ``batch_axis``: each sample's monitored norms (:attr:`!residual_norms` holds, per
        iteration, the largest of the samples still iterating).
    sample_tolerance : tuple of float or None
        With ``batch_axis``: each sample's threshold (:attr:`!tolerance` is the largest).
    sample_error_bound : tuple of float or None
        With ``batch_axis`` and a ``contraction``: each sample's error bound, on the 2-norm of its
        own error (:attr:`!error_bound` is the largest).
    """

    value: Any
    status: Status
    method: str
    num_steps: int
    num_vjp: int
    num_jvp: int
    residual_norms: tuple[float, ...]
    tolerance: float | None
    error_bound: float | None
    note: str = ""
    num_f_evals: int = 0
    contraction_violated: bool = False
    stats: Mapping[str, object] = field(default_factory=lambda: types.MappingProxyType({}))
    num_sample_evals: int = 0
    sample_status: tuple[Status, ...] | None = None
    sample_num_steps: tuple[int, ...] | None = None
    sample_residual_norms: tuple[tuple[float, ...], ...] | None = None
    sample_tolerance: tuple[float | None, ...] | None = None
    sample_error_bound: tuple[float | None, ...] | None = None

    @property
    def converged(self) -> bool:
        """True when :attr:`!status` is :attr:`Status.SUCCESS`."""
        return self.status is Status.SUCCESS

    @property
    def failed_samples(self) -> tuple[int, ...]:
        """With ``batch_axis``: the positions of the samples that did not converge (empty without)."""
        if self.sample_status is None:
            return ()
        return tuple(i for i, st in enumerate(self.sample_status) if st is not Status.SUCCESS)

    def describe(self) -> str:
        """One line that says what happened, for logs and error messages."""
        last = f"{self.residual_norms[-1]:.3e}" if self.residual_norms else "n/a"
        tol = f"{self.tolerance:.3e}" if self.tolerance is not None else "n/a"
        if self.num_f_evals:
            calls = f"{self.num_f_evals} calls of f"
        elif self.num_vjp or self.num_jvp:
            calls = f"{self.num_vjp} VJP, {self.num_jvp} JVP calls"
        else:
            calls = "no callback calls"
        if self.error_bound is not None:
            bound = f"error bound {self.error_bound:.3e}"
        else:
            bound = (
                "no error bound (the contraction bound was disproved)"
                if self.contraction_violated
                else "no error bound"
            )
        # A fixed number of steps (Neumann-RBP) has nothing to converge to: say what ran.
        fixed = self.tolerance is None and self.converged
        outcome = (
            f"ran {self.num_steps} iterations" if fixed else f"{self.status.value} after {self.num_steps} iterations"
        )
        note = f"; {self.note}" if self.note else ""
        return f"{self.method}: {outcome} ({calls}); last residual norm {last}, tolerance {tol}, {bound}{note}"

    def __repr__(self) -> str:
        bound = "None" if self.error_bound is None else f"{self.error_bound:.3e}"
        return (
            f"Solution(status={self.status.name}, method={self.method!r}, "
            f"num_steps={self.num_steps}, num_vjp={self.num_vjp}, num_jvp={self.num_jvp}, "
            f"num_f_evals={self.num_f_evals}, "
            f"error_bound={bound}, value=<{type(self.value).__name__} "
            f"shape={tuple(getattr(self.value, 'shape', ()))}>)"
        )

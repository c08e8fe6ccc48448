"""The bookkeeping shared by every iterative routine: one place decides how an iteration ends.

Each solver computes its own updates and hands the monitored norm (one Python
float per iteration, the only device sync) to :class:`Monitor`, which keeps the
history, tests convergence, divergence and finiteness, checks the user's
contraction bound, and finally builds the :class:`~rbp_core.Solution`.
"""

from __future__ import annotations

import math
from typing import Any

from ._arrays import Array, eps, size
from ._errors import ContractionViolation, ConvergenceError
from ._solution import Solution, Status

__all__ = ["Monitor", "adjoint_monitor", "nonfinite_input", "trivial_input"]


class Monitor:
    """Termination logic and history of one solve.

    Parameters
    ----------
    method : str
        Name used in messages and in :attr:`Solution.method`.
    max_iter : int
        Iteration budget; reaching it without success gives ``MAX_STEPS``.
    threshold : float or None
        Success when the monitored norm is ``<= threshold``; None for a fixed
        number of steps (success when the budget is used up).
    divergence_factor : float or None
        ``DIVERGED`` when the norm exceeds this factor times the smallest norm
        seen so far.
    ratio_bound : float or None
        The contraction the user claims. A pair ``(||M v||, ||v||)`` with a
        ratio above it (beyond rounding) disproves the claim; solvers report
        such pairs through :meth:`check_ratio`.
    successive_images : bool
        Whether each monitored vector is the image of the previous one under
        the map (true of the fixed-point, original-RBP and Neumann
        iterations, not of CG residuals); then :meth:`observe` checks every
        ratio of consecutive norms.
    slack, rel_slack : float
        Absolute and relative rounding allowances for that check.

    Attributes
    ----------
    unit : float
        What the monitored norms are multiplied by in the Solution (and its
        tolerance and error bound): 1 unless the solver works on a scaled copy
        of its problem, as :func:`~rbp_core.cg_rbp` does.
    """

    def __init__(
        self,
        method: str,
        *,
        max_iter: int,
        threshold: float | None,
        divergence_factor: float | None = None,
        ratio_bound: float | None = None,
        successive_images: bool = True,
        slack: float = 0.0,
        rel_slack: float = 0.0,
    ) -> None:
        self.method = method
        self.max_iter = max_iter
        self.threshold = threshold
        self.divergence_factor = divergence_factor
        self.ratio_bound = ratio_bound
        self.successive_images = successive_images
        self.slack = slack
        self.rel_slack = rel_slack
        self.history: list[float] = []
        self.best = math.inf
        self.observed_ratio = 0.0
        self.violated = False
        self.note = ""
        self.unit = 1.0

    @property
    def num_steps(self) -> int:
        return len(self.history)

    def observe(self, r: float, threshold: float | None = None) -> Status | None:
        """Record the norm after one iteration; return the final status or None to go on.

        ``threshold`` replaces the stored one from now on (for relative tests
        whose scale moves, as in :func:`~rbp_core.fixed_point`).
        """
        if threshold is not None:
            self.threshold = threshold
        prev = self.history[-1] if self.history else None
        self.history.append(r)
        if not math.isfinite(r):
            return Status.NONFINITE
        if prev is not None and self.successive_images and self.ratio_bound is not None:
            self.check_ratio(r, prev)
        if self.threshold is not None and r <= self.threshold:
            return Status.SUCCESS
        if self.divergence_factor is not None and r > self.divergence_factor * self.best:
            u = self.unit
            self.note = (
                f"it reached {r * u:.3e}, {r / self.best:.3g} times its smallest {self.best * u:.3e} "
                f"(divergence_factor={self.divergence_factor:g}); if the growth is transient (a "
                "non-normal Jacobian whose iteration still converges), raise divergence_factor or set it to None"
            )
            return Status.DIVERGED
        self.best = min(self.best, r)
        if len(self.history) >= self.max_iter:
            return Status.SUCCESS if self.threshold is None else Status.MAX_STEPS
        return None

    def check_ratio(self, image_norm: float, vector_norm: float) -> None:
        """Check ``||J^T v|| <= mu ||v||`` (or with ``J``) for one pair seen outside :meth:`observe`."""
        if self.ratio_bound is None or not (vector_norm > 0.0 and math.isfinite(image_norm)):
            return
        self.observed_ratio = max(self.observed_ratio, image_norm / vector_norm)
        if image_norm > self.ratio_bound * vector_norm * (1.0 + self.rel_slack) + self.slack:
            self.violated = True

    def finish(
        self,
        value: Any,
        status: Status,
        *,
        num_vjp: int,
        num_jvp: int = 0,
        error_bound: float | None = None,
        note: str = "",
        throw: bool,
    ) -> Solution:
        """Build the Solution; raise if it failed and ``throw`` is set. ``note`` replaces the Monitor's own."""
        if self.violated:
            if throw:
                msg = (
                    f"{self.method}: contraction={self.ratio_bound!r} is false: the iteration saw "
                    f"||J^T v|| / ||v|| = {self.observed_ratio:.6g} > {self.ratio_bound!r}, so no "
                    f"error bound can be certified. Give a true upper bound on ||J||_2 or none."
                )
                raise ContractionViolation(msg)
            error_bound = None
        u = self.unit
        solution = Solution(
            value=value,
            status=status,
            method=self.method,
            num_steps=len(self.history),
            num_vjp=num_vjp,
            num_jvp=num_jvp,
            residual_norms=tuple(r * u for r in self.history),
            tolerance=None if self.threshold is None else self.threshold * u,
            error_bound=error_bound * u if error_bound is not None and status is not Status.NONFINITE else None,
            note=note or self.note,
        )
        if throw and not solution.converged:
            raise ConvergenceError(solution)
        return solution


def adjoint_monitor(
    method: str,
    xp: Any,
    g: Array,
    gnorm: float,
    *,
    max_iter: int,
    threshold: float | None,
    contraction: float | None,
    divergence_factor: float | None = None,
    successive_images: bool = True,
) -> Monitor:
    """The Monitor of a solve of ``(I - J^T) z = g``.

    The rounding allowance of the contraction check is ``sqrt(eps) ||g|| / (1 - mu)``, since
    every vector such a solve applies ``J^T`` to has a norm of at most ``||g|| / (1 - mu)``.
    """
    root_eps = math.sqrt(eps(xp, g.dtype))
    return Monitor(
        method,
        max_iter=max_iter,
        threshold=threshold,
        divergence_factor=divergence_factor,
        ratio_bound=contraction,
        successive_images=successive_images,
        slack=root_eps * gnorm / (1.0 - (contraction or 0.0)),
        rel_slack=root_eps,
    )


def nonfinite_input(mon: Monitor, xp: Any, like: Array, input_norm: float, *, throw: bool) -> Solution:
    """The outcome of a solve whose input (``g`` or ``h0``) is not finite: zeros, status NONFINITE."""
    mon.history.append(input_norm)
    return mon.finish(xp.zeros_like(like), Status.NONFINITE, num_vjp=0, throw=throw)


def trivial_input(
    mon: Monitor, xp: Any, x: Array, input_norm: float, *, certified: bool, throw: bool
) -> Solution | None:
    """The outcome of a solve whose input needs no iteration, or None when it does.

    A non-finite input is NONFINITE (:func:`nonfinite_input`). An empty state (size 0: an empty
    batch, a graph without nodes) is its own fixed point and its adjoint is empty: SUCCESS with no
    call of any callback, a copy of the input, and an exact error bound of 0 when certified.
    """
    if not math.isfinite(input_norm):
        return nonfinite_input(mon, xp, x, input_norm, throw=throw)
    if size(x) == 0:
        return mon.finish(
            xp.asarray(x, copy=True),
            Status.SUCCESS,
            num_vjp=0,
            error_bound=0.0 if certified else None,
            note="an empty state: nothing to solve",
            throw=throw,
        )
    return None

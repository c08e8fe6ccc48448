"""What the per-sample forms of the solvers share: row states, secant pairs, limits, best-iterate certificates.

The ``per_sample()`` forms (:mod:`.anderson_rows`, :mod:`.broyden_rows`, :mod:`.gmres_rows`,
:mod:`.bicgstab_rows`) keep every array with one row per sample still iterating. Their states
derive from :class:`RowState`, which cuts itself to the remaining rows and copies itself; the forms
derive from :class:`PerSampleForm` (their settings' limits), and the forward ones that return each
sample's best evaluated iterate from :class:`BestRowsForm`, the per-sample counterpart of
:class:`~rbp_core._solvers._best.BestIterate`.
"""

from __future__ import annotations

from typing import Any, Self

from .._certificate import fixed_point_residual_bound
from .._iterate import Limits
from .._sample_driver import compact
from .._typing import Array, FixedPointMap, Namespace

__all__ = ["BestRowsForm", "Pairs", "PerSampleForm", "RowState"]


class RowState:
    """A per-sample state: its ``__slots__`` hold arrays with one row per sample (and other values)."""

    __slots__ = ()

    def compact(self, keep: Array, b: int) -> Self:
        """The state of the samples at positions ``keep`` only (``b`` rows before)."""
        out = type(self)()
        names: tuple[str, ...] = self.__slots__
        for name in names:
            setattr(out, name, compact(getattr(self, name, None), keep, b))
        return out

    def copy(self) -> Self:
        """A shallow copy: the same arrays, to be replaced rather than written."""
        out = type(self)()
        names: tuple[str, ...] = self.__slots__
        for name in names:
            setattr(out, name, getattr(self, name, None))
        return out


class Pairs:
    """The secant pairs ``(||F(h) - F(h')||^2, ||h - h'||^2)`` met, as ``(b,)`` arrays: never cut with the rows."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[tuple[Array, Array]] = []


class PerSampleForm:
    """A solver's per-sample form: a frozen dataclass whose ``settings`` are the solver object it came from."""

    settings: Any

    def limits(self, xp: Namespace, dtype: Any) -> Limits:
        """The settings' limits."""
        return self.settings.limits(xp, dtype)  # type: ignore[no-any-return]


class BestRowsForm(PerSampleForm):
    """A forward form that returns each sample's best evaluated iterate, its state holding ``best_res``,
    ``best_scale`` and ``pairs`` rows; a subclass gives ``start(h0)``, its state before the first step."""

    def init(
        self,
        f: FixedPointMap,  # noqa: ARG002 - part of the protocol
        h0: Array,
        ops: Any,  # noqa: ARG002 - part of the protocol
        *,
        secants: bool = True,
    ) -> tuple[Any, Array, None]:
        """Nothing evaluated yet: the first step evaluates ``F(h0)``; ``secants`` for a claimed contraction."""
        st = self.start(h0)  # type: ignore[attr-defined]
        st.pairs = Pairs() if secants else None
        return st, h0, None

    def step_contraction(self, mu: float) -> None:  # noqa: ARG002 - part of the protocol
        """None: a step is no single map."""
        return

    def error_bound(
        self, xp: Namespace, like: Array, mu: float, norms: tuple[float, ...], previous: float, state: Any
    ) -> float:
        """``||F(h) - h|| / (1 - mu)`` for a sample's best iterate, from its row of ``state``, rounding included."""
        del norms, previous
        return fixed_point_residual_bound(xp, like, mu, float(state.best_res[0]), float(state.best_scale[0]))

    def sample_pairs(self, state: Any) -> list[tuple[Array, Array]]:
        """The secant pairs met, for the check of a claimed contraction."""
        return [] if state.pairs is None else list(state.pairs.items)

"""A batch of independent samples: its layout as rows, per-row vector operations, callbacks on the active rows.

With ``batch_axis`` a solve treats each sample of the batch as its own problem: the driver
(:mod:`rbp_core._sample_driver`) keeps every array as a ``(b, m)`` block of rows, one per sample
still iterating, and the solvers see :class:`RowOps`, whose inner products and norms are taken per
row and whose coefficients are per row. So a solver written once for one vector runs on a batch
unchanged, each sample with its own scalars; a sample that is done leaves the rows.

The user's callbacks never see rows: :class:`SampleCallback` puts the rows back into the caller's
layout and either hands the callback the active samples with their indices (``takes_indices``) or
evaluates the whole batch with the samples that are done held at their final values, and keeps
the active rows of the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat

from ._callbacks import CheckedCallback, check_arity
from ._norms import norm_from_sq, widens
from ._ops import VectorOps
from ._typing import Array, Namespace

__all__ = ["RowOps", "SampleCallback", "SampleLayout", "check_batch_axis", "check_takes_indices"]


def check_takes_indices(takes_indices: object, batch_axis: object) -> None:
    """``takes_indices`` is a bool, and True only with a ``batch_axis``."""
    if not isinstance(takes_indices, bool):
        msg = f"takes_indices must be True or False, got {takes_indices!r}"
        raise TypeError(msg)
    if takes_indices and batch_axis is None:
        msg = "takes_indices=True needs a batch_axis: the indices are positions of samples along it"
        raise ValueError(msg)


def check_batch_axis(batch_axis: object, x: Array, name: str) -> int:
    """``batch_axis`` as a non-negative axis of ``x`` (negative values count from the end)."""
    if isinstance(batch_axis, bool) or not isinstance(batch_axis, int):
        msg = f"batch_axis must be an int (an axis of {name}) or None, got {batch_axis!r}"
        raise TypeError(msg)
    ndim = int(x.ndim)
    if not -ndim <= batch_axis < ndim:
        msg = f"batch_axis={batch_axis} is out of range for {name} of shape {tuple(x.shape)}"
        raise ValueError(msg)
    return batch_axis % ndim


class SampleLayout:
    """How a batched array of the caller's shape maps to ``(b, m)`` rows, one per sample, and back."""

    __slots__ = ("axis", "batch", "flat", "forward", "inverse", "rest", "xp")

    def __init__(self, xp: Namespace, like: Array, axis: int) -> None:
        self.xp = xp
        self.axis = axis
        shape = tuple(like.shape)
        self.batch = shape[axis]
        self.rest = shape[:axis] + shape[axis + 1 :]
        self.forward = (axis, *(i for i in range(len(shape)) if i != axis))
        self.inverse = tuple(self.forward.index(i) for i in range(len(shape)))
        self.flat = axis == 0 and len(shape) == 2  # samples already rows: nothing to reshape

    @property
    def row_size(self) -> int:
        """The elements of one sample."""
        return math.prod(self.rest)

    def rows(self, x: Array) -> Array:
        """``x`` (the caller's layout, any batch size) as rows ``(b, m)``."""
        if self.flat:
            return x
        xp = self.xp
        if self.axis != 0:
            x = xp.permute_dims(x, self.forward)
        return xp.reshape(x, (x.shape[0], self.row_size))

    def restore(self, rows: Array) -> Array:
        """Rows ``(b, m)`` in the caller's layout, with ``b`` samples on the batch axis."""
        if self.flat:
            return rows
        xp = self.xp
        x = xp.reshape(rows, (rows.shape[0], *self.rest))
        return x if self.axis == 0 else xp.permute_dims(x, self.inverse)


class RowOps(VectorOps):
    """The vector operations of a solver on ``(b, m)`` rows: every sample on its own.

    Inner products and squared norms are ``(b,)`` arrays, one per row (half precisions summed in
    float32, as :func:`~rbp_core._norms.summable`); a coefficient is a Python float or a ``(b,)``
    array, one per row; :meth:`to_host` brings ``(b,)`` arrays to the host as one tuple per array.
    Row ``i``'s results depend on row ``i`` alone, so a sample's iteration is the same in any batch
    (up to the callbacks' own rounding).
    """

    def __init__(self, xp: Namespace) -> None:
        super().__init__(xp)

    def _wide(self, x: Array) -> Array:
        return self.xp.astype(x, self.xp.float32) if widens(self.xp, x.dtype) else x

    def sqnorm(self, x: Array) -> Array:
        """``||x_i||^2`` for each row, a ``(b,)`` array."""
        w = self._wide(x)
        return self.xp.sum(w * w, axis=-1)

    def dot(self, x: Array, y: Array) -> Array:
        """``<x_i, y_i>`` for each row, a ``(b,)`` array."""
        return self.xp.sum(self._wide(x) * self._wide(y), axis=-1)

    def _scalar(self, alpha: Array | float, x: Array) -> Array | float:
        if isinstance(alpha, float):
            return alpha
        if alpha.dtype != x.dtype:
            alpha = self.xp.astype(alpha, x.dtype)
        return self.xp.reshape(alpha, (-1, 1))

    def ratio(self, a: Array, b: Array) -> Array | float:
        """``a / b`` per row; NaN (never a warning) where ``b`` is 0 or not finite."""
        xp = self.xp
        ok = (b != 0) & xp.isfinite(b)
        return xp.where(ok, a / xp.where(ok, b, xp.ones_like(b)), xp.full_like(a, math.nan))

    def ratio_or_zero(self, a: Array, b: Array) -> Array | float:
        """``a / b`` per row, 0 where ``b`` is 0."""
        xp = self.xp
        nonzero = b != 0
        return xp.where(nonzero, a / xp.where(nonzero, b, xp.ones_like(b)), xp.zeros_like(a))

    def add_combination(self, x: Array, coefficients: Sequence[float], rows: Array) -> Array:
        """Not per row: a solver that mixes stored vectors with host coefficients has no batched form."""
        msg = "add_combination has no per-sample form"
        raise NotImplementedError(msg)

    def to_host(self, values: Sequence[Array] | Array) -> tuple[Any, ...]:
        """Each ``(b,)`` array of ``values`` as a sequence of Python floats, in one transfer."""
        xp = self.xp
        if getattr(values, "ndim", None) == 1:
            values = (values,)
        if len(values) == 1:
            stacked = values[0]
        else:
            dtype = values[0].dtype
            stacked = xp.stack([a if a.dtype == dtype else xp.astype(a, dtype) for a in values])
        tolist = getattr(stacked, "tolist", None)  # NumPy, torch and CuPy: one copy for all of them
        if tolist is not None:
            host = tolist()
            return (host,) if len(values) == 1 else tuple(host)
        if len(values) == 1:
            return (tuple(float(stacked[j]) for j in range(stacked.shape[0])),)
        return tuple(tuple(float(stacked[i, j]) for j in range(stacked.shape[1])) for i in range(stacked.shape[0]))

    def row_norm(self, s: float, x: Array, minus: Array | None = None) -> float:
        """The 2-norm of one row ``x`` (or ``x - minus``) from its sum of squares ``s``, rescaled where needed."""
        return norm_from_sq(self.xp, s, x, minus)

    def norms(self, x: Array) -> list[float]:
        """The 2-norm of each row of ``x``, overflow and underflow handled (one transfer on the fast path)."""
        (sqs,) = self.to_host([self.sqnorm(x)])
        if 0.0 in sqs:  # zero rows (a start at zero) or underflows: one test for all of them
            xp = self.xp
            (nonzero,) = self.to_host([xp.astype(xp.any(x != 0, axis=-1), xp.float32)])
            sqs = tuple(-1.0 if s == 0.0 and z else s for s, z in zip(sqs, nonzero, strict=True))
        return [math.sqrt(s) if 0.0 <= s < math.inf else self.row_norm(max(s, 0.0), x[i, :]) for i, s in enumerate(sqs)]


def index_array(xp: Namespace, indices: Sequence[int], like: Array) -> Array:
    """``indices`` as an integer array on the device of ``like``."""
    return xp.asarray(list(indices), dtype=xp.int64, device=array_api_compat.device(like))


class SampleCallback:
    """A callback of the caller (``f``, ``vjp`` or ``jvp``) applied to the rows of the active samples.

    ``takes_indices``: the callback is called as ``fn(x, indices)`` with the active samples only
    (``x`` in the caller's layout with ``b`` samples, ``indices`` an integer array of their positions
    in the batch) and returns their images. Otherwise it is called on the whole batch, the samples
    that are done held at their final values (``f``) or at zero (a ``linear`` map: ``vjp``, ``jvp``),
    and its result's active rows are kept. ``calls`` counts calls, ``evaluations`` the samples
    evaluated.
    """

    __slots__ = (
        "_check",
        "_every",
        "_fn",
        "_layout",
        "_linear",
        "_takes",
        "active",
        "calls",
        "evaluations",
        "fill",
        "gather",
        "indices",
    )

    def __init__(
        self, fn: object, name: str, layout: SampleLayout, like: Array, *, takes_indices: bool, linear: bool
    ) -> None:
        if not callable(fn):
            msg = f"{name} must be callable, got {type(fn).__name__}"
            raise TypeError(msg)
        argument = "h" if name == "f" else "v"
        check_arity(fn, f"{name}({argument}, indices)" if takes_indices else f"{name}({argument})")
        self._fn: Callable[..., Array] = fn
        self._layout = layout
        self._takes = takes_indices
        self._linear = linear
        self._every: Array | None = None
        self._check = _ShapeCheck(name, like, layout)
        self.calls = 0
        self.evaluations = 0
        self.active: list[int] = list(range(layout.batch))
        self.indices: Array | None = None  # the active positions on the device; None: every sample
        self.gather: Array | None = None
        self.fill: Array | None = None  # (B, m) rows of the full batch for samples that are done

    def set_active(self, active: list[int], finals: Array | None, like: Array) -> None:
        """Evaluate only the samples ``active`` from now on; the others are held at their rows of ``finals``
        (``(B, m)``; not read by a callback that takes indices, or by a linear map: those are held at zero)."""
        xp = self._layout.xp
        self.active = active
        batch = self._layout.batch
        if len(active) == batch:
            self.indices = self.gather = self.fill = None
            return
        self.indices = index_array(xp, active, like)
        if self._takes:
            return
        if not self._linear:
            assert finals is not None
            self.fill = finals
        elif self.fill is None or self.fill.shape != (batch, self._layout.row_size):
            self.fill = xp.zeros((batch, self._layout.row_size), dtype=like.dtype, device=array_api_compat.device(like))
        position = dict(zip(active, range(len(active)), strict=True))
        b = len(active)
        self.gather = index_array(xp, [position.get(s, b + s) for s in range(batch)], like)

    @property
    def takes_indices(self) -> bool:
        """Whether the callback is called on the active samples only, with their indices."""
        return self._takes

    def __call__(self, rows: Array) -> Array:
        layout, xp = self._layout, self._layout.xp
        self.calls += 1
        if self._takes:
            indices = self.indices
            if indices is None:  # every sample: one index array for all such calls, as documented
                if self._every is None:
                    self._every = index_array(xp, range(layout.batch), rows)
                indices = self._every
            self.evaluations += rows.shape[0]
            out = self._fn(layout.restore(rows), indices)
            self._check(out, rows.shape[0])
            return layout.rows(out)
        if self.indices is None:
            self.evaluations += rows.shape[0]
            out = self._fn(layout.restore(rows))
            self._check(out, rows.shape[0])
            return layout.rows(out)
        assert self.fill is not None
        assert self.gather is not None
        full = xp.take(xp.concat([rows, self.fill]), self.gather, axis=0)
        self.evaluations += layout.batch
        out = self._fn(layout.restore(full))
        self._check(out, layout.batch)
        return xp.take(layout.rows(out), self.indices, axis=0)


class _ShapeCheck:
    """The callback's output must match the state in library, dtype, device and (for ``b`` samples) shape.

    The full check runs once per batch size and whenever the output's type, shape or dtype differs
    from the last good one; otherwise it is one comparison.
    """

    __slots__ = ("_checks", "_good", "_layout", "_like", "_name")

    def __init__(self, name: str, like: Array, layout: SampleLayout) -> None:
        self._name = name
        self._like = like
        self._layout = layout
        self._checks: dict[int, CheckedCallback] = {}
        self._good: tuple[object, ...] = ()

    def __call__(self, out: Array, b: int) -> None:
        if self._good == (type(out), out.shape, out.dtype, b):
            return
        check = self._checks.get(b)
        if check is None:
            layout = self._layout
            shape = list(layout.rest)
            shape.insert(layout.axis, b)
            check = CheckedCallback(lambda v: v, self._name, self._like, layout.xp, shape=tuple(shape))
            self._checks[b] = check
        check(out)
        self._good = (type(out), out.shape, out.dtype, b)

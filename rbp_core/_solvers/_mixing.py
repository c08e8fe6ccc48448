"""Anderson mixing, written once: the memory of differences, the transfer, the host solve.

Used by the adjoint method :class:`~rbp_core.AndersonRBP` (mixing ``z <- J^T z + g``) and the
forward solver :class:`~rbp_core.Anderson` (mixing ``h <- F(h)``): both iterate a map ``G`` with
residual ``f = G(x) - x`` and take ``x + beta f - (dG - (1 - beta) dF) gamma`` next, ``gamma``
minimising ``||f - dF gamma||^2 + lambda ||gamma||^2`` with ``lambda`` relative to the Gram
matrix's scale.

The differences live in one ``(memory, 2, n)`` buffer written in place, as a ring (the method's
own array, never the caller's), and the Gram matrix ``dF dF^T`` lives on the host, where each step
adds one row: a step reads the memory twice (one product for the host, one for the mixing) and
transfers ``memory + 3`` numbers, not the whole Gram matrix. The mixing is invariant to the order of the differences, so the ring's
order needs no bookkeeping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import mul

import array_api_compat

from .._checks import check_int, check_nonnegative
from .._norms import widens
from .._ops import VectorOps
from .._typing import Array

__all__ = ["Memory", "check_settings"]


ADAPTIVE = "adaptive"
"""The ``mixing`` setting that takes each step's ``beta`` from the newest secant pair."""

ADAPTIVE_BOUNDS = (0.5, 4.0)
"""The range of the adaptive ``beta``: ``1 / (1 - lambda)`` for a scalar ``lambda`` in ``[-1, 0.75]``."""


def check_settings(memory: object, mixing: object, regularization: object, *, adaptive: bool = False) -> None:
    """``memory`` >= 1, ``mixing`` in (0, 1] (or ``"adaptive"`` where allowed), ``regularization`` >= 0."""
    check_int(memory, "memory", 1)
    if adaptive and mixing == ADAPTIVE:
        pass
    elif isinstance(mixing, str) or not 0.0 < check_nonnegative(mixing, "mixing") <= 1.0:
        choices = f"a number in (0, 1] or {ADAPTIVE!r}" if adaptive else "a number in (0, 1]"
        msg = f"mixing must be {choices}, got {mixing!r}"
        raise ValueError(msg)
    check_nonnegative(regularization, "regularization")


class Memory:
    """The ring buffer of differences, the host's Gram matrix of the residual differences, and the
    coefficients ``gamma`` (and ``beta``) for the next step.

    One ``(memory, 2, n)`` buffer holds each slot's ``dG`` and ``dF`` side by side, so that the
    mixing reads both in one matrix-vector product over ``2 k`` contiguous rows. Mutable and owned
    by one solve: the buffer is written in place, and the host's bookkeeping is updated in place
    too (a copy of the state per iteration cost as much as the host solve).
    """

    __slots__ = (
        "adaptive",
        "beta",
        "capacity",
        "count",
        "d",
        "gamma",
        "gram",
        "initial_beta",
        "products",
        "slot",
        "wide",
    )

    def __init__(self, capacity: int, mixing: float | str = 1.0) -> None:
        self.capacity = capacity
        self.adaptive = mixing == ADAPTIVE
        self.initial_beta = 1.0 if isinstance(mixing, str) else float(mixing)
        self.d: Array | None = None  # (capacity, 2, n): d[i, 0] = dG_i, d[i, 1] = dF_i
        self.wide = False  # products of half-precision rows are taken in float32
        self.gram = [[0.0] * capacity for _ in range(capacity)]
        self.reset()

    def reset(self) -> None:
        """Forget every difference (the buffer is kept for reuse), and an adaptive ``beta``."""
        self.count = 0
        self.slot = -1
        self.beta = self.initial_beta
        self.gamma: list[float] | None = None
        self.products: list[float] = []  # dF f of the last transfer, in slot order

    @property
    def size(self) -> int:
        """How many differences are held."""
        return min(self.count, self.capacity)

    def newest(self) -> tuple[Array, Array]:
        """The newest differences ``(dG, dF)`` (views of the buffer)."""
        assert self.d is not None
        return self.d[self.slot, 0, :], self.d[self.slot, 1, :]

    def extend(self, ops: VectorOps, f: Array, G: Array, f_prev: Array, G_prev: Array) -> None:
        """Write the differences ``G - G_prev`` and ``f - f_prev`` into the next slot."""
        if self.d is None:
            xp = ops.xp
            # Uninitialised: rows are read only once written (as GMRES's basis).
            self.d = xp.empty((self.capacity, 2, f.shape[0]), dtype=f.dtype, device=array_api_compat.device(f))
            self.wide = widens(xp, f.dtype)
        self.slot = (self.slot + 1) % self.capacity
        self.d = ops.write_difference(self.d, (self.slot, 0), G, G_prev)
        self.d = ops.write_difference(self.d, (self.slot, 1), f, f_prev)
        self.count += 1
        self.gamma = None

    def mixed(self, ops: VectorOps, f: Array, G: Array) -> Array:
        """The next iterate ``x + beta f - (dG - (1 - beta) dF) gamma``, with ``x = G - f`` (flat).

        Written as ``G + (beta - 1) f - dG gamma + (1 - beta) dF gamma``: one matrix-vector product
        on the buffer's rows (``dG`` alone when ``beta = 1``), never a memory-sized temporary.
        """
        beta, k, gamma = self.beta, self.size, self.gamma
        x = G if beta == 1.0 else ops.axpy(beta - 1.0, f, G)
        if gamma is None or not k or self.d is None:
            return x
        if beta == 1.0:
            return ops.add_combination(x, [-g for g in gamma], self.d[:k, 0, :])
        c = [0.0] * (2 * k)
        c[0::2] = [-g for g in gamma]
        c[1::2] = [(1.0 - beta) * g for g in gamma]
        return ops.add_combination(x, c, ops.xp.reshape(self.d[:k, :, :], (2 * k, -1)))

    def transfer(self, ops: VectorOps, f: Array, extra: Sequence[Array] = ()) -> Array:
        """One 1-d array for the host: ``||f||^2``, the ``extra`` values, ``<dG_new, dF_new>``,
        ``||dF_new||^2``, then ``dF f``.

        One pass over the residual differences: the new row of the Gram matrix is
        ``dF (f - f_prev)``, and ``dF f_prev`` came to the host in the previous transfer (the rows
        other than the new one are unchanged), so the host forms it by a difference, and only the
        new diagonal entry is computed here.
        """
        xp = ops.xp
        sq = ops.sqnorm(f)
        scalars = xp.stack([sq, *(e if e.dtype == sq.dtype else xp.astype(e, sq.dtype) for e in extra)])
        k = self.size
        if not k or self.d is None:
            return scalars
        newest = self.d[self.slot, :, :]  # (2, n): dG_new, dF_new
        products = [self._product(newest, newest[1, :]), self._product(self.d[:k, 1, :], f)]
        return xp.concat([scalars, *(p if p.dtype == sq.dtype else xp.astype(p, sq.dtype) for p in products)])

    def _product(self, rows: Array, v: Array) -> Array:
        """``rows @ v``, in float32 for half precisions (the rule of :func:`~rbp_core._norms.summable`)."""
        if self.wide:
            xp = array_api_compat.array_namespace(rows)
            return xp.astype(rows, xp.float32) @ xp.astype(v, xp.float32)
        return rows @ v

    def update(self, values: Sequence[float], regularization: float) -> bool:
        """The Gram matrix updated from a transfer's values (after ``extra``), and ``gamma`` solved.

        ``values`` are ``<dG_new, dF_new>``, ``||dF_new||^2`` then ``dF f`` (``size`` values in slot
        order). False when the regularised system cannot be factored (the caller restarts the memory).

        The adaptive ``beta = 1 - <dG, dF> / <dF, dF>`` of the newest pair is the scalar that best
        inverts ``I - J`` along it (``1 / (1 - lambda)`` for ``J = lambda I``), kept within
        :data:`ADAPTIVE_BOUNDS`: the step along the new direction then follows the map's own scale.
        """
        k = self.size
        if k == 0:
            self.gamma = None
            return True
        cross, diagonal = values[0], values[1]
        if self.adaptive and diagonal > 0.0 and math.isfinite(cross / diagonal):
            low, high = ADAPTIVE_BOUNDS
            self.beta = min(max(1.0 - cross / diagonal, low), high)
        slot, gram, previous = self.slot, self.gram, self.products
        b = list(values[2 : 2 + k])
        row = gram[slot]
        for i in range(k):
            v = diagonal if i == slot else b[i] - previous[i]
            row[i] = v
            gram[i][slot] = v
        self.products = b
        lam = regularization * max(gram[i][i] for i in range(k))
        H = [gram[i][:k] for i in range(k)]
        for i in range(k):
            H[i][i] += lam
        self.gamma = _cholesky_solve(H, b)
        return self.gamma is not None


def _cholesky_solve(H: list[list[float]], b: list[float]) -> list[float] | None:
    """``H x = b`` for a small symmetric positive semi-definite ``H``; None if it is not positive definite."""
    k = len(b)
    L: list[list[float]] = []
    for i in range(k):
        Hi = H[i]
        Li: list[float] = []
        for j in range(i):
            Lj = L[j]
            Li.append((Hi[j] - sum(map(mul, Li, Lj))) / Lj[j])  # map stops at len(Li) == j
        d = Hi[i] - sum(map(mul, Li, Li))
        if not 0.0 < d < math.inf:
            return None
        Li.append(math.sqrt(d))
        L.append(Li)
    y: list[float] = []
    for i in range(k):
        Li = L[i]
        y.append((b[i] - sum(map(mul, Li, y))) / Li[i])
    x = [0.0] * k
    for i in range(k - 1, -1, -1):
        s = y[i]
        for t in range(i + 1, k):
            s -= L[t][i] * x[t]
        x[i] = s / L[i][i]
    return x if all(map(math.isfinite, x)) else None

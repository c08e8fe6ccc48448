"""Anderson mixing, written once: the memory of differences, the transfer, the host solve.

Used by the adjoint method :class:`~rbp_core.AndersonRBP` (mixing ``z <- J^T z + g``) and the
forward solver :class:`~rbp_core.Anderson` (mixing ``h <- F(h)``): both iterate a map ``G`` with
residual ``f = G(x) - x`` and take ``x + beta f - (dG - (1 - beta) dF) gamma`` next, ``gamma``
minimising ``||f - dF gamma||^2 + lambda ||gamma||^2`` with ``lambda`` relative to the Gram
matrix's scale.

The differences live in two ``(memory, n)`` buffers written in place, as a ring (the method's own
arrays, never the caller's), and the Gram matrix ``dF dF^T`` lives on the host, where each step
adds one row: a step reads the memory twice (one product for the host, one for the mixing) and
transfers ``memory + 2`` numbers, not the whole Gram matrix. The mixing is invariant to the order of the differences, so the ring's
order needs no bookkeeping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import mul

import array_api_compat

from .._checks import check_int, check_nonnegative
from .._ops import VectorOps
from .._typing import Array, Namespace

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
    """The ring buffers of differences (rows of flat arrays), the host's Gram matrix of the rows,
    and the coefficients ``gamma`` for the next step.

    Mutable and owned by one solve: the buffers are written in place, and the host's bookkeeping is
    updated in place too (a copy of the state per iteration cost more than the host solve).
    """

    __slots__ = (
        "adaptive",
        "beta",
        "capacity",
        "count",
        "df",
        "dg",
        "gamma",
        "gram",
        "initial_beta",
        "products",
        "slot",
    )

    def __init__(self, capacity: int, mixing: float | str = 1.0) -> None:
        self.capacity = capacity
        self.adaptive = mixing == ADAPTIVE
        self.initial_beta = 1.0 if isinstance(mixing, str) else float(mixing)
        self.df: Array | None = None
        self.dg: Array | None = None
        self.gram = [[0.0] * capacity for _ in range(capacity)]
        self.reset()

    def reset(self) -> None:
        """Forget every difference (the buffers are kept for reuse), and an adaptive ``beta``."""
        self.count = 0
        self.slot = -1
        self.beta = self.initial_beta
        self.gamma: list[float] | None = None
        self.products: list[float] = []  # dF f of the last transfer, in slot order

    @property
    def size(self) -> int:
        """How many differences are held."""
        return min(self.count, self.capacity)

    def extend(self, xp: Namespace, f: Array, G: Array, f_prev: Array, G_prev: Array) -> None:
        """Write the differences ``f - f_prev`` and ``G - G_prev`` into the next slot."""
        if self.df is None or self.dg is None:
            self.df = xp.zeros((self.capacity, f.shape[0]), dtype=f.dtype, device=array_api_compat.device(f))
            self.dg = xp.zeros_like(self.df)
        self.slot = (self.slot + 1) % self.capacity
        self.df[self.slot, :] = f - f_prev
        self.dg[self.slot, :] = G - G_prev
        self.count += 1
        self.gamma = None

    def mixed(self, ops: VectorOps, f: Array, G: Array) -> Array:
        """The next iterate ``x + beta f - (dG - (1 - beta) dF) gamma``, with ``x = G - f`` (flat).

        Written as ``G - dG gamma - (1 - beta) (f - dF gamma)``: matrix-vector products on the
        buffers' rows, never a memory-sized temporary (forming ``dG - (1 - beta) dF`` cost 1.2 ms
        a step at memory 10, n = 16384, against 40 us for the products); ``beta = 1`` reads ``dG`` only.
        """
        beta = self.beta
        k = self.size
        if self.gamma is None or not k or self.df is None or self.dg is None:
            return G if beta == 1.0 else ops.axpy(beta - 1.0, f, G)
        gamma = ops.xp.asarray(self.gamma, dtype=self.df.dtype, device=array_api_compat.device(self.df))
        x_next = G - gamma @ self.dg[:k, :]
        if beta == 1.0:
            return x_next
        return ops.axpy(beta - 1.0, f - gamma @ self.df[:k, :], x_next)

    def transfer(self, ops: VectorOps, f: Array, extra: Sequence[Array] = ()) -> Array:
        """One 1-d array for the host: ``||f||^2``, the ``extra`` values, ``||dF_new||^2``
        (and ``<dG_new, dF_new>`` for an adaptive ``beta``), then ``dF f``.

        One pass over the memory: the new row of the Gram matrix is ``dF (f - f_prev)``, and
        ``dF f_prev`` came to the host in the previous transfer (the rows other than the new one
        are unchanged), so the host forms it by a difference, and only the new diagonal entry is
        computed here.
        """
        xp = ops.xp
        sq = ops.sqnorm(f)
        parts = [sq, *extra]
        k = self.size
        if k and self.df is not None and self.dg is not None:
            df_new = self.df[self.slot, :]
            parts.append(ops.sqnorm(df_new))
            if self.adaptive:
                parts.append(ops.dot(self.dg[self.slot, :], df_new))
        scalars = xp.stack([p if p.dtype == sq.dtype else xp.astype(p, sq.dtype) for p in parts])
        if not k or self.df is None:
            return scalars
        products = self.df[:k, :] @ f  # a matrix-vector product on contiguous rows
        return xp.concat([scalars, products if products.dtype == sq.dtype else xp.astype(products, sq.dtype)])

    def update(self, values: Sequence[float], regularization: float) -> bool:
        """The Gram matrix updated from a transfer's values (after ``extra``), and ``gamma`` solved.

        ``values`` are ``||dF_new||^2`` (and ``<dG_new, dF_new>`` for an adaptive ``beta``) then
        ``dF f`` (``size`` values in slot order). False when the regularised system cannot be
        factored (the caller restarts the memory).

        The adaptive ``beta = 1 - <dG, dF> / <dF, dF>`` of the newest pair is the scalar that best
        inverts ``I - J`` along it (``1 / (1 - lambda)`` for ``J = lambda I``), kept within
        :data:`ADAPTIVE_BOUNDS`: the step along the new direction then follows the map's own scale.
        """
        k = self.size
        if k == 0:
            self.gamma = None
            return True
        slot, gram, previous = self.slot, self.gram, self.products
        start = 1
        if self.adaptive:
            start = 2
            if values[0] > 0.0 and math.isfinite(values[1] / values[0]):
                low, high = ADAPTIVE_BOUNDS
                self.beta = min(max(1.0 - values[1] / values[0], low), high)
        b = list(values[start : start + k])
        row = gram[slot]
        for i in range(k):
            v = values[0] if i == slot else b[i] - previous[i]
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

"""Anderson mixing, written once: the memory of differences, the transfer of its Gram matrix, the host solve.

Used by the adjoint method :class:`~rbp_core.AndersonRBP` (mixing ``z <- J^T z + g``) and the
forward solver :class:`~rbp_core.Anderson` (mixing ``h <- F(h)``): both iterate a map ``G`` with
residual ``f = G(x) - x`` and take ``x + beta f - (dG - (1 - beta) dF) gamma`` next, ``gamma``
minimising ``||f - dF gamma||^2 + lambda ||gamma||^2`` with ``lambda`` relative to the Gram
matrix's scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import array_api_compat

from .._ops import VectorOps
from .._typing import Array, Namespace

__all__ = ["Memory", "coefficients", "extend", "mixed", "transfer"]


@dataclass(frozen=True)
class Memory:
    """Differences of consecutive residuals and images (rows of flat arrays, oldest first), and the
    host's coefficients ``gamma`` for the next step (None: a plain step)."""

    df_rows: Array | None = None
    dg_rows: Array | None = None
    gamma: tuple[float, ...] | None = None

    @property
    def size(self) -> int:
        """How many differences are held."""
        return 0 if self.df_rows is None else int(self.df_rows.shape[0])


def _push(xp: Namespace, rows: Array | None, row: Array, memory: int) -> Array:
    """``rows`` with ``row`` appended, keeping the last ``memory`` rows."""
    if rows is None or memory == 1:
        return row
    start = max(0, int(rows.shape[0]) - (memory - 1))  # the standard allows no out-of-range slice starts
    return xp.concat([rows[start:, :], row], axis=0)


def extend(xp: Namespace, mem: Memory, f: Array, G: Array, f_prev: Array, G_prev: Array, memory: int) -> Memory:
    """The memory with the differences ``f - f_prev`` and ``G - G_prev`` appended (flat arrays)."""
    df, dg = xp.reshape(f - f_prev, (1, -1)), xp.reshape(G - G_prev, (1, -1))
    return Memory(_push(xp, mem.df_rows, df, memory), _push(xp, mem.dg_rows, dg, memory))


def mixed(ops: VectorOps, f: Array, G: Array, mem: Memory, beta: float) -> Array:
    """The next iterate ``x + beta f - (dG - (1 - beta) dF) gamma``, with ``x = G - f`` (flat)."""
    xp = ops.xp
    x_next = G if beta == 1.0 else ops.axpy(beta, f, ops.axpy(-1.0, f, G))
    if mem.gamma is not None and mem.df_rows is not None and mem.dg_rows is not None:
        gamma = xp.asarray(mem.gamma, dtype=mem.df_rows.dtype, device=array_api_compat.device(mem.df_rows))
        mix = mem.dg_rows if beta == 1.0 else mem.dg_rows - (1.0 - beta) * mem.df_rows
        x_next = x_next - gamma @ mix
    return x_next


def transfer(ops: VectorOps, f: Array, mem: Memory, extra: Sequence[Array] = ()) -> Array:
    """One 1-d array for the host: ``||f||^2``, the ``extra`` 0-d values, then ``dF dF^T`` and ``dF f``."""
    xp = ops.xp
    sq = xp.reshape(ops.sqnorm(f), (1,))
    parts = [sq, *(xp.astype(xp.reshape(e, (1,)), sq.dtype) for e in extra)]
    if mem.df_rows is not None:
        gram = xp.reshape(mem.df_rows @ xp.permute_dims(mem.df_rows, (1, 0)), (-1,))
        proj = mem.df_rows @ f
        if gram.dtype != sq.dtype:  # half precisions: the norm comes in float32, one transfer needs one dtype
            gram, proj = xp.astype(gram, sq.dtype), xp.astype(proj, sq.dtype)
        parts += [gram, proj]
    return xp.concat(parts)


def coefficients(values: Sequence[float], k: int, regularization: float) -> tuple[float, ...] | None:
    """``gamma`` from the host values ``dF dF^T`` (``k * k``, row-major) and ``dF f`` (``k``); None if unsolvable."""
    if k == 0:
        return None
    H = [list(values[i * k : (i + 1) * k]) for i in range(k)]
    b = list(values[k * k : k * k + k])
    lam = regularization * max(H[i][i] for i in range(k))
    for i in range(k):
        H[i][i] += lam
    gamma = _cholesky_solve(H, b)
    return None if gamma is None else tuple(gamma)


def _cholesky_solve(H: list[list[float]], b: list[float]) -> list[float] | None:
    """``H x = b`` for a small symmetric positive semi-definite ``H``; None if it is not positive definite."""
    k = len(b)
    L = [[0.0] * k for _ in range(k)]
    for i in range(k):
        for j in range(i + 1):
            acc = H[i][j] - math.fsum(L[i][t] * L[j][t] for t in range(j))
            if i == j:
                if not acc > 0.0 or not math.isfinite(acc):
                    return None
                L[i][i] = math.sqrt(acc)
            else:
                L[i][j] = acc / L[j][j]
    y = [0.0] * k
    for i in range(k):
        y[i] = (b[i] - math.fsum(L[i][t] * y[t] for t in range(i))) / L[i][i]
    x = [0.0] * k
    for i in reversed(range(k)):
        x[i] = (y[i] - math.fsum(L[t][i] * x[t] for t in range(i + 1, k))) / L[i][i]
    return x if all(math.isfinite(v) for v in x) else None

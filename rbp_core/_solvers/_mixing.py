"""Anderson mixing, written once: the memory of differences, the transfer, the host solve.

Used by the adjoint method :class:`~rbp_core.AndersonRBP` (mixing ``z <- J^T z + g``) and the
forward solver :class:`~rbp_core.Anderson` (mixing ``h <- F(h)``): both iterate a map ``G`` with
residual ``f = G(x) - x`` and take ``x + beta f - (dG - (1 - beta) dF) gamma`` next, ``gamma``
minimising ``||f - dF gamma||^2 + lambda ||gamma||^2`` with ``lambda`` relative to the Gram
matrix's scale.

The differences live in two ``(memory, n)`` buffers written in place, as a ring (the method's own
arrays, never the caller's), and the Gram matrix ``dF dF^T`` lives on the host, where each step
adds one row: a step costs ``O(memory * n)`` on the device and transfers ``2 memory + 1`` numbers,
not the whole Gram matrix. The mixing is invariant to the order of the differences, so the ring's
order needs no bookkeeping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import array_api_compat

from .._checks import check_int, check_nonnegative
from .._ops import VectorOps
from .._typing import Array, Namespace

__all__ = ["Memory", "check_settings", "coefficients", "extend", "mixed", "reset", "transfer"]


def check_settings(memory: object, mixing: object, regularization: object) -> None:
    """``memory`` >= 1, ``mixing`` in (0, 1], ``regularization`` >= 0."""
    check_int(memory, "memory", 1)
    if not 0.0 < check_nonnegative(mixing, "mixing") <= 1.0:
        msg = f"mixing must lie in (0, 1], got {mixing!r}"
        raise ValueError(msg)
    check_nonnegative(regularization, "regularization")


@dataclass(frozen=True)
class Memory:
    """The ring buffers of differences (rows of flat arrays), how many rows hold data, the newest
    row's slot, the host's Gram matrix of the rows, and the coefficients ``gamma`` for the next step."""

    df: Array | None = None
    dg: Array | None = None
    count: int = 0
    slot: int = -1
    gram: tuple[tuple[float, ...], ...] = ()
    gamma: tuple[float, ...] | None = None

    @property
    def size(self) -> int:
        """How many differences are held."""
        return 0 if self.df is None else min(self.count, int(self.df.shape[0]))


def reset(mem: Memory) -> Memory:
    """An empty memory that keeps the buffers for reuse."""
    return Memory(df=mem.df, dg=mem.dg)


def extend(xp: Namespace, mem: Memory, f: Array, G: Array, f_prev: Array, G_prev: Array, memory: int) -> Memory:
    """The memory with the differences ``f - f_prev`` and ``G - G_prev`` written into the next slot."""
    df, dg = mem.df, mem.dg
    if df is None or dg is None:
        df = xp.zeros((memory, f.shape[0]), dtype=f.dtype, device=array_api_compat.device(f))
        dg = xp.zeros_like(df)
    slot = (mem.slot + 1) % memory
    df[slot, :] = f - f_prev
    dg[slot, :] = G - G_prev
    return replace(mem, df=df, dg=dg, count=mem.count + 1, slot=slot, gamma=None)


def mixed(ops: VectorOps, f: Array, G: Array, mem: Memory, beta: float) -> Array:
    """The next iterate ``x + beta f - (dG - (1 - beta) dF) gamma``, with ``x = G - f`` (flat)."""
    xp = ops.xp
    x_next = G if beta == 1.0 else ops.axpy(beta, f, ops.axpy(-1.0, f, G))
    k = mem.size
    if mem.gamma is not None and k and mem.df is not None and mem.dg is not None:
        gamma = xp.asarray(mem.gamma, dtype=mem.df.dtype, device=array_api_compat.device(mem.df))
        mix = mem.dg[:k, :] if beta == 1.0 else mem.dg[:k, :] - (1.0 - beta) * mem.df[:k, :]
        x_next = x_next - gamma @ mix
    return x_next


def transfer(ops: VectorOps, f: Array, mem: Memory, extra: Sequence[Array] = ()) -> Array:
    """One 1-d array for the host: ``||f||^2``, the ``extra`` values, then ``dF dF_new`` and ``dF f``."""
    xp = ops.xp
    sq = xp.reshape(ops.sqnorm(f), (1,))
    parts = [sq, *(xp.astype(xp.reshape(e, (1,)), sq.dtype) for e in extra)]
    k = mem.size
    if k and mem.df is not None:
        rows = mem.df[:k, :]
        both = rows @ xp.stack([mem.df[mem.slot, :], f], axis=1)  # (k, 2): one product for both columns
        parts.append(xp.astype(xp.reshape(xp.permute_dims(both, (1, 0)), (-1,)), sq.dtype))
    return xp.concat(parts)


def coefficients(
    values: Sequence[float], mem: Memory, regularization: float
) -> tuple[Memory, tuple[float, ...] | None]:
    """The memory with its Gram matrix updated from the host values, and ``gamma`` (None if unsolvable).

    ``values`` are ``dF dF_new`` then ``dF f``, ``size`` each, in slot order.
    """
    k = mem.size
    if k == 0:
        return mem, None
    new_row, b = list(values[:k]), list(values[k : 2 * k])
    gram = [list(row) + [0.0] * (k - len(row)) for row in mem.gram[:k]]
    gram += [[0.0] * k for _ in range(k - len(gram))]
    for i in range(k):
        gram[mem.slot][i] = gram[i][mem.slot] = new_row[i]
    mem = replace(mem, gram=tuple(tuple(row) for row in gram))
    H = [row[:] for row in gram]
    lam = regularization * max(H[i][i] for i in range(k))
    for i in range(k):
        H[i][i] += lam
    gamma = _cholesky_solve(H, b)
    return mem, None if gamma is None else tuple(gamma)


def _cholesky_solve(H: list[list[float]], b: list[float]) -> list[float] | None:
    """``H x = b`` for a small symmetric positive semi-definite ``H``; None if it is not positive definite."""
    k = len(b)
    L = [[0.0] * k for _ in range(k)]
    for i in range(k):
        Li = L[i]
        for j in range(i + 1):
            Lj = L[j]
            acc = H[i][j] - sum(Li[t] * Lj[t] for t in range(j))
            if i == j:
                if not acc > 0.0 or not math.isfinite(acc):
                    return None
                Li[i] = math.sqrt(acc)
            else:
                Li[j] = acc / Lj[j]
    y = [0.0] * k
    for i in range(k):
        y[i] = (b[i] - sum(L[i][t] * y[t] for t in range(i))) / L[i][i]
    x = [0.0] * k
    for i in reversed(range(k)):
        x[i] = (y[i] - sum(L[t][i] * x[t] for t in range(i + 1, k))) / L[i][i]
    return x if all(math.isfinite(v) for v in x) else None

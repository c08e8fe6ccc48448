"""Anderson acceleration of a batch of independent fixed points: every sample its own mixing, on the device.

:class:`~rbp_core.Anderson` solves its small least-squares problem on the host, once per solve;
with ``batch_axis`` each sample needs its own. :class:`AndersonRows` (what ``Anderson.per_sample()``
gives the per-sample driver) keeps each sample's memory of differences, Gram matrix, coefficients,
mixing ``beta``, safeguard and best iterate as rows of device arrays, and solves the ``b`` small
systems in one batched solve, so a step costs a fixed number of array operations whatever the
batch size, and the one host transfer per step stays the driver's. The method is the same
(type-II mixing, regularisation relative to each sample's Gram scale, rejection of a step whose
residual grows past ``safeguard`` times the sample's smallest, a restart on rejection or on a
system that cannot be solved). One difference: the Gram matrix is formed afresh each step from
the stored differences (``memory`` products per row), where the host version updates one row.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import array_api_compat

from .._typing import Array, FixedPointMap, Namespace
from ._mixing import ADAPTIVE_BOUNDS
from ._rows import BestRowsForm, Pairs, PerSampleForm, RowState

if TYPE_CHECKING:
    from .._operator import AdjointOperator
    from .._samples import RowOps
    from .anderson import Anderson
    from .anderson_rbp import AndersonRBP

__all__ = ["AndersonRBPRows", "AndersonRows"]


class _Rows(RowState):
    """The state of the samples still iterating: every array has one row per sample."""

    __slots__ = (
        "G",
        "best_f",
        "best_h",
        "best_img",
        "best_res",
        "best_scale",
        "beta",
        "d_img",
        "d_res",
        "f",
        "fallback",
        "g",
        "gamma",
        "h0",
        "pairs",
        "reject",
        "slot",
        "valid",
    )

    G: Array | None  # F at the last evaluated points (None before the first)
    f: Array | None  # F(h) - h there
    h0: Array
    best_img: Array
    best_f: Array
    best_h: Array
    best_res: Array  # (b,) the smallest residual norm of each row, and the norm of its F
    best_scale: Array
    beta: Array  # (b,) each row's mixing
    d_res: Array  # (b, memory, n) each row's differences of residuals and of images
    d_img: Array
    gamma: Array  # (b, memory) each row's coefficients
    valid: Array  # (b, memory) which slots each row holds
    reject: Array  # (b,) the next point is the plain step from the row's best
    fallback: Array  # (b,) the last point was that plain step
    slot: int
    pairs: Pairs | None  # None: no contraction claimed, no secants taken
    g: Array | None  # (b, n) the right-hand sides, for the adjoint use


@dataclass(frozen=True)
class AndersonRows(BestRowsForm):
    """:class:`~rbp_core.Anderson`'s method for the per-sample driver: one mixing per row, all on the device."""

    settings: Anderson | AndersonRBP
    name: ClassVar[str] = "anderson"
    differentiable_step: ClassVar[bool] = False

    @property
    def _beta0(self) -> float:
        mixing = self.settings.mixing
        return 1.0 if isinstance(mixing, str) else float(mixing)

    @property
    def _safeguard(self) -> float:
        """The rejection factor; none (inf) for a method without safeguard (Anderson-RBP)."""
        return float(getattr(self.settings, "safeguard", math.inf))

    def start(self, h0: Array) -> _Rows:
        """The state before the first evaluation."""
        st = _Rows()
        st.h0, st.G, st.f = h0, None, None
        return st

    def step(self, f: FixedPointMap, st: _Rows, ops: RowOps) -> tuple[_Rows, Array, list[Array], Any]:
        """Evaluate ``F`` at each row's next point; keep each row's best; solve each row's mixing."""
        xp = ops.xp
        if st.G is None or st.f is None:
            h = st.h0
            G = f(h)
            res_sq, scale_sq = self.first_evaluation(ops, st, h, G)
            return st, st.best_h, [res_sq, scale_sq], ((st.f, None), (G, None))
        h = xp.where(xp.reshape(st.reject, (-1, 1)), st.best_img, self._mixed(xp, st))
        G = f(h)
        r = G - h
        res_sq, scale_sq = ops.sqnorm(r), ops.sqnorm(G)
        res = xp.sqrt(res_sq)
        self._remember(xp, ops, st, r, G, h)
        # Reject a step whose residual grew past the safeguard (not the plain step from the best,
        # which is taken whatever its residual), restarting that row's memory.
        fallback = st.reject
        reject = (res > self._safeguard * st.best_res) & ~fallback
        better = (res < st.best_res) & ~reject
        col = xp.reshape(better, (-1, 1))
        st.best_h = xp.where(col, h, st.best_h)
        st.best_f = xp.where(col, r, st.best_f)
        st.best_img = xp.where(col, G, st.best_img)
        st.best_res = xp.where(better, res, st.best_res)
        st.best_scale = xp.where(better, xp.sqrt(scale_sq), st.best_scale)
        st.valid = st.valid & ~xp.reshape(reject, (-1, 1))
        st.beta = xp.where(reject, xp.full_like(st.beta, self._beta0), st.beta)
        st.reject, st.fallback = reject, fallback
        st.f, st.G = r, G
        self._solve(xp, st)
        return st, st.best_h, [res_sq, scale_sq], ((r, None), (G, None))

    def first_evaluation(self, ops: RowOps, st: _Rows, h: Array, G: Array) -> tuple[Array, Array]:
        """The first evaluation ``G = F(h)``, already made: the buffers, and ``h`` as every row's best.

        Returns the rows' squared norms of ``F(h) - h`` and of ``F(h)``, the step's monitored norms.
        """
        xp, k = ops.xp, self.settings.memory
        b, n = h.shape
        device = array_api_compat.device(h)
        st.d_img = xp.zeros((b, k, n), dtype=h.dtype, device=device)
        st.d_res = xp.zeros_like(st.d_img)
        st.valid = xp.zeros((b, k), dtype=xp.bool, device=device)
        r = G - h
        res_sq, scale_sq = ops.sqnorm(r), ops.sqnorm(G)
        res = xp.sqrt(res_sq)  # in the norms' precision: the coefficients' too
        st.gamma = xp.zeros((b, k), dtype=res.dtype, device=device)
        st.beta = xp.full((b,), self._beta0, dtype=res.dtype, device=device)
        st.reject = xp.zeros((b,), dtype=xp.bool, device=device)
        st.fallback = st.reject
        st.slot = -1
        st.best_h, st.best_f, st.best_img = h, r, G
        st.best_res, st.best_scale = res, xp.sqrt(scale_sq)
        st.f, st.G = r, G
        return res_sq, scale_sq

    def _remember(self, xp: Namespace, ops: RowOps, st: _Rows, r: Array, G: Array, h: Array) -> None:
        """Write the newest differences (from the last point, or from the best after a rejection)."""
        del h
        col = xp.reshape(st.reject, (-1, 1))
        f_prev = xp.where(col, st.best_f, st.f)
        G_prev = xp.where(col, st.best_img, st.G)
        d_img, d_res = G - G_prev, r - f_prev
        st.slot = (st.slot + 1) % self.settings.memory
        st.d_img = ops.put(st.d_img, (slice(None), st.slot, slice(None)), d_img)
        st.d_res = ops.put(st.d_res, (slice(None), st.slot, slice(None)), d_res)
        st.valid = ops.put(st.valid, (slice(None), st.slot), True)
        if st.pairs is not None:
            st.pairs.items.append((ops.sqnorm(d_img), ops.sqnorm(d_img - d_res)))
        if self.settings.mixing == "adaptive":
            cross, diagonal = ops.dot(d_img, d_res), ops.sqnorm(d_res)
            ok = (diagonal > 0) & xp.isfinite(cross / xp.where(diagonal > 0, diagonal, xp.ones_like(diagonal)))
            low, high = ADAPTIVE_BOUNDS
            beta = xp.clip(1.0 - cross / xp.where(ok, diagonal, xp.ones_like(diagonal)), min=low, max=high)
            st.beta = xp.where(ok, beta, st.beta)

    def _mixed(self, xp: Namespace, st: _Rows) -> Array:
        """Each row's ``G + (beta - 1) f - (d_img - (1 - beta) d_res) gamma``."""
        dtype = st.d_img.dtype  # the coefficients may be wider (float32 for half precisions)
        bm1 = xp.astype(st.beta - 1.0, dtype)
        combined = st.d_img + xp.reshape(bm1, (-1, 1, 1)) * st.d_res  # (b, memory, n)
        gamma = xp.astype(st.gamma, dtype)
        mix = xp.matmul(xp.reshape(gamma, (gamma.shape[0], 1, -1)), combined)[:, 0, :]
        return st.G + xp.reshape(bm1, (-1, 1)) * st.f - mix

    def _solve(self, xp: Namespace, st: _Rows) -> None:
        """Each row's ``gamma`` minimising ``||f - d_res gamma||^2 + lambda ||gamma||^2`` over its valid slots."""
        k = self.settings.memory
        assert st.f is not None
        # The small problem in the precision of the norms: float32 for half precisions.
        wide = st.best_res.dtype
        d_res, f, valid = xp.astype(st.d_res, wide), xp.astype(st.f, wide), st.valid
        eye = xp.eye(k, dtype=wide, device=array_api_compat.device(d_res))
        gram = xp.matmul(d_res, xp.permute_dims(d_res, (0, 2, 1)))
        rhs = xp.matmul(d_res, xp.reshape(f, (f.shape[0], -1, 1)))[:, :, 0]
        both = xp.reshape(valid, (-1, k, 1)) & xp.reshape(valid, (-1, 1, k))
        gram = xp.where(both, gram, eye)
        rhs = xp.where(valid, rhs, xp.zeros_like(rhs))
        diag = xp.where(valid, xp.sum(gram * eye, axis=-1), xp.zeros_like(rhs))
        lam = self.settings.regularization * xp.max(diag, axis=-1)
        gamma = _solve_spd(xp, gram + xp.reshape(lam, (-1, 1, 1)) * eye, rhs)
        bad = ~xp.all(xp.isfinite(gamma), axis=-1)  # the system could not be solved: restart that row
        st.gamma = xp.where(xp.reshape(bad, (-1, 1)), xp.zeros_like(gamma), gamma)
        st.valid = valid & ~xp.reshape(bad, (-1, 1))

    def stats(self, state: Any) -> dict[str, object]:  # noqa: ARG002 - part of the protocol
        """``memory_vectors``: state-sized arrays per sample."""
        return {"memory_vectors": 2 * self.settings.memory + 8}


def _solve_spd(xp: Namespace, H: Array, b: Array) -> Array:
    """``H x = b`` for a batch of small symmetric positive definite ``H`` (NaN where one is not)."""
    linalg = getattr(xp, "linalg", None)
    if linalg is not None and hasattr(linalg, "solve"):
        # A singular matrix in the batch raises (NumPy's LinAlgError is a ValueError, torch's a
        # RuntimeError): the factorisation below then marks it with NaN.
        with contextlib.suppress(ValueError, RuntimeError):
            return linalg.solve(H, xp.reshape(b, (*b.shape, 1)))[..., 0]
    # Cholesky by columns with array operations only (no linalg extension): NaN marks a failure.
    k = b.shape[1]
    L = xp.zeros_like(H)
    for j in range(k):
        s = H[:, j, j] - xp.sum(L[:, j, :j] * L[:, j, :j], axis=-1)
        d = xp.sqrt(xp.where(s > 0, s, xp.full_like(s, math.nan)))
        L[:, j, j] = d
        if j + 1 < k:
            below = H[:, j + 1 :, j] - xp.sum(L[:, j + 1 :, :j] * L[:, j : j + 1, :j], axis=-1)
            L[:, j + 1 :, j] = below / xp.reshape(d, (-1, 1))
    y = xp.zeros_like(b)
    for i in range(k):
        y[:, i] = (b[:, i] - xp.sum(L[:, i, :i] * y[:, :i], axis=-1)) / L[:, i, i]
    x = xp.zeros_like(b)
    for i in range(k - 1, -1, -1):
        x[:, i] = (y[:, i] - xp.sum(L[:, i + 1 :, i] * x[:, i + 1 :], axis=-1)) / L[:, i, i]
    return x


@dataclass(frozen=True)
class AndersonRBPRows(PerSampleForm):
    """:class:`~rbp_core.AndersonRBP`'s method for the per-sample driver: Anderson rows on ``z <- J^T z + g``.

    The same mixing as :class:`AndersonRows` without a safeguard (as the host version), starting
    from the free image ``g`` of ``z = 0``. Each sample's value is its iterate with the smallest
    residual (the host version returns its last; they agree whenever a sample converges).
    """

    settings: AndersonRBP
    name: ClassVar[str] = "anderson_rbp"
    needs_jvp: ClassVar[bool] = False
    supports_warm_start: ClassVar[bool] = True
    successive_images: ClassVar[bool] = False

    @property
    def _rows(self) -> AndersonRows:
        return AndersonRows(self.settings)

    def init(self, A: AdjointOperator, g: Array, z0: Array | None, ops: RowOps) -> tuple[_Rows, Array, Any]:
        """``z0`` (one VJP for its image) or 0 (whose image ``g`` is free); its residual is the reference."""
        z = ops.xp.zeros_like(g) if z0 is None else z0
        G = g if z0 is None else A.vjp(z0) + g
        st = _Rows()
        st.h0, st.g, st.pairs = z, g, None
        res_sq, _ = self._rows.first_evaluation(ops, st, z, G)
        return st, z, ((res_sq,), ((st.f, None),))

    def step(self, A: AdjointOperator, st: _Rows, ops: RowOps) -> tuple[_Rows, Array, list[Array], Any]:
        """One mixed step of every row; monitors each row's ``||J^T z + g - z||``."""
        g = st.g
        st, best, sqs, vectors = self._rows.step(lambda z: A.vjp(z) + g, st, ops)
        return st, best, sqs[:1], vectors[:1]

    def stats(self, state: Any) -> dict[str, object]:  # noqa: ARG002 - part of the protocol
        """``memory_vectors``: state-sized arrays per sample."""
        return {"memory_vectors": 2 * self.settings.memory + 8}

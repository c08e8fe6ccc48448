"""Problem descriptors for the property tests, and the dense float64 oracle.

Hypothesis draws small descriptors (size, contraction, seed, steps, batch
shape); the matrices are built from ``numpy.random.default_rng(seed)``, so a
failing example is reproducible from its descriptor alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st


@dataclass(frozen=True)
class Problem:
    """A linear adjoint system ``(I - J^T) z = g`` with a known ``||J||_2`` or spectrum."""

    n: int
    shape: tuple[int, ...]
    seed: int
    mu: float  # ||J||_2 for contractive problems, the spectral radius for expansive ones
    kind: str  # "contractive" or "expansive"

    def build(self) -> tuple[np.ndarray, np.ndarray]:
        """``(J, g)`` in float64; ``g`` has the state shape."""
        rng = np.random.default_rng(self.seed)
        n = self.n
        if self.kind == "contractive":
            A = rng.standard_normal((n, n))
            J = self.mu * A / np.linalg.norm(A, 2)
        else:
            # Symmetric J with an eigenvalue -mu (|mu| > 1) and the rest in [-mu, 0.5]:
            # spectral radius mu > 1, while I - J has eigenvalues in [0.5, 1 + mu].
            Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
            lam = rng.uniform(-self.mu, 0.5, size=n)
            lam[0] = -self.mu
            J = (Q * lam) @ Q.T
        g = rng.standard_normal(self.shape)
        return J, g

    def exact(self, J: np.ndarray, g: np.ndarray) -> np.ndarray:
        """The float64 dense solution of ``(I - J^T) z = g``."""
        z = np.linalg.solve(np.eye(self.n) - J.T, g.reshape(self.n))
        return z.reshape(self.shape)


def _shapes(n: int) -> st.SearchStrategy[tuple[int, ...]]:
    """The flat state, or a (batch, features) state with the same number of elements."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return st.one_of(st.just((n,)), st.sampled_from(divisors).map(lambda d: (d, n // d)))


@st.composite
def problems(draw: st.DrawFn, kind: str = "contractive", max_n: int = 24) -> Problem:
    n = draw(st.integers(1, max_n))
    shape = draw(_shapes(n))
    seed = draw(st.integers(0, 2**32 - 1))
    if kind == "contractive":
        mu = draw(st.floats(0.05, 0.95))
    else:
        mu = draw(st.floats(1.3, 3.0))
        n = max(n, 2)
        shape = (n,)
    return Problem(n=n, shape=shape, seed=seed, mu=mu, kind=kind)


def eps(dtype: str) -> float:
    return float(np.finfo(dtype).eps)


def rounding(n: int, steps: int, dtype: str, scale: float) -> float:
    """First-order rounding allowance: each of ``steps`` products with an n x n matrix and each
    addition contributes at most about ``n * eps * scale`` (``scale`` bounds the vectors' norms)."""
    return 4.0 * (steps + 1) * max(n, 1) * eps(dtype) * scale


def norm(x: np.ndarray) -> float:
    return float(math.sqrt(np.sum(np.asarray(x, dtype=np.float64) ** 2)))

"""The backend matrix: every test that takes ``backend`` runs once per array library.

``RBP_BACKENDS`` (comma-separated) selects backends; a requested backend that
cannot run here is an error. A name ending in ``?`` (``cupy?``) is optional:
it runs where it can and shows as a skip with its reason where it cannot. Unset,
every backend whose library is installed runs, and the GPU backends (cupy,
torch-cuda) appear as visible skips when no CUDA device exists.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import rbp_core

# A script for the wheel check of ``nox -s build`` (and test_packaging.py), not a test module.
collect_ignore = ["packaging_check.py", "ddp_worker.py", "ddp_problem.py"]

# --- Hypothesis profiles ------------------------------------------------------------------------
# The backend fixture is immutable for the duration of a test, so sharing it across examples is fine.
_common = {"suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=25, derandomize=True, deadline=None, print_blob=True, **_common)
settings.register_profile("thorough", max_examples=400, deadline=None, print_blob=True, **_common)
settings.register_profile("dev", max_examples=10, deadline=None, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# --- Backends -----------------------------------------------------------------------------------
@dataclass
class Backend:
    """One array library as the tests see it."""

    name: str
    xp: Any
    device: Any = None
    readonly: bool = False
    context: Callable[[], contextlib.AbstractContextManager[Any]] = field(default=contextlib.nullcontext)

    def asarray(self, a: Any, dtype: str = "float64") -> Any:
        """A backend array from a NumPy array (or nested sequence), in ``dtype``."""
        a = np.asarray(a, dtype=dtype)
        if self.name.startswith("numpy"):
            out = np.array(a)
            if self.readonly:
                out.flags.writeable = False
            return out
        if self.name.startswith("torch"):
            import torch

            return torch.asarray(a.copy(), device=self.device)
        if self.name == "cupy":
            import cupy

            return cupy.asarray(a)
        return self.xp.asarray(a, dtype=getattr(self.xp, dtype))

    def to_numpy(self, x: Any) -> np.ndarray:
        """A float64 NumPy copy of a backend array."""
        if self.name.startswith("torch"):
            return x.detach().cpu().numpy().astype(np.float64)
        if self.name == "cupy":
            return x.get().astype(np.float64)
        if self.name.startswith("array-api-strict"):
            x = x.to_device(self.xp.Device("CPU_DEVICE"))  # from its second device too
        return np.asarray(x, dtype=np.float64)

    def dtype(self, name: str) -> Any:
        return getattr(self.xp, name)

    @property
    def other_device(self) -> Any:
        """A device other than this backend's arrays' own, or None where the library has just one here.

        array-api-strict's second device runs every computation; torch's meta device holds no
        values, so it serves as the wrong device of a callback's output, checked before any value is read.
        """
        if self.name.startswith("array-api-strict"):
            return self.xp.Device("device1")
        if self.name == "torch":
            import torch

            return torch.device("meta")
        return None

    def on(self, x: Any, device: Any) -> Any:
        """``x`` moved to ``device``."""
        import array_api_compat

        return array_api_compat.to_device(x, device)

    def matrix_callbacks(self, J: np.ndarray, shape: tuple[int, ...], dtype: str) -> tuple[Callable[..., Any], ...]:
        """``vjp`` and ``jvp`` for the dense matrix ``J`` acting on the flattened state."""
        xp = self.xp
        JT_b = self.asarray(np.ascontiguousarray(J.T), dtype)
        J_b = self.asarray(J, dtype)
        n = J.shape[0]

        def vjp(v: Any) -> Any:
            return xp.reshape(xp.matmul(JT_b, xp.reshape(v, (n,))), shape)

        def jvp(v: Any) -> Any:
            return xp.reshape(xp.matmul(J_b, xp.reshape(v, (n,))), shape)

        return vjp, jvp


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _cuda_available() -> bool:
    if _have("cupy"):
        try:
            import cupy

            return bool(cupy.cuda.runtime.getDeviceCount() > 0)
        except Exception:  # noqa: BLE001 - any failure means no usable device
            return False
    if _have("torch"):
        import torch

        return bool(torch.cuda.is_available())
    return False


def _strict_context(extensions: tuple[str, ...] | None) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    def ctx() -> contextlib.AbstractContextManager[Any]:
        import array_api_strict

        if extensions is None:
            return contextlib.nullcontext()
        return array_api_strict.ArrayAPIStrictFlags(enabled_extensions=extensions)

    return ctx


def _make(name: str) -> Backend:
    import array_api_compat

    if name in ("numpy", "numpy-readonly"):
        return Backend(name, array_api_compat.array_namespace(np.empty(0)), "cpu", readonly=name.endswith("readonly"))
    if name in ("array-api-strict", "array-api-strict-noext"):
        import array_api_strict

        return Backend(name, array_api_strict, context=_strict_context(() if name.endswith("noext") else None))
    if name in ("torch", "torch-cuda"):
        import torch

        device = torch.device("cuda" if name == "torch-cuda" else "cpu")
        return Backend(name, array_api_compat.array_namespace(torch.empty(0)), device)
    if name == "cupy":
        import cupy

        return Backend(name, array_api_compat.array_namespace(cupy.empty(0)), "cuda")
    if name == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)  # float64 arrays, as every other backend has
        import jax.numpy as jnp

        return Backend(name, array_api_compat.array_namespace(jnp.empty(0)), jax.devices("cpu")[0])
    msg = f"unknown backend {name!r}"
    raise ValueError(msg)


ALL = ("numpy", "numpy-readonly", "array-api-strict", "array-api-strict-noext", "torch", "torch-cuda", "cupy", "jax")
GPU = {"torch-cuda", "cupy"}
REQUIRES = {
    "numpy": "numpy",
    "numpy-readonly": "numpy",
    "array-api-strict": "array_api_strict",
    "array-api-strict-noext": "array_api_strict",
    "torch": "torch",
    "torch-cuda": "torch",
    "cupy": "cupy",
    "jax": "jax",
}


def _selected() -> list[Any]:
    """pytest params for the backend fixture."""
    requested = os.environ.get("RBP_BACKENDS", "").strip()
    cuda = _cuda_available()
    params = []
    if requested:
        names = [n.strip() for n in requested.split(",") if n.strip()]
        for name in names:
            n = name.rstrip("?")
            optional = name.endswith("?")
            if n not in ALL:
                msg = f"RBP_BACKENDS names unknown backend {n!r}; known: {', '.join(ALL)}"
                raise pytest.UsageError(msg)
            missing = None
            if not _have(REQUIRES[n]):
                missing = f"{REQUIRES[n]} is not installed"
            elif n in GPU and not cuda:
                missing = "no CUDA device is available"
            if missing is not None and optional:
                reason = f"{n}: {missing}"
                params.append(pytest.param(n, id=n, marks=[pytest.mark.gpu, pytest.mark.skip(reason=reason)]))
                continue
            if missing is not None:
                msg = f"RBP_BACKENDS requests {n!r} but {missing}"
                raise pytest.UsageError(msg)
            params.append(pytest.param(n, id=n, marks=[pytest.mark.gpu] if n in GPU else []))
        return params
    for n in ALL:
        if n in GPU:
            if cuda and _have(REQUIRES[n]):
                params.append(pytest.param(n, id=n, marks=pytest.mark.gpu))
            else:
                reason = f"{n}: needs a CUDA device and {REQUIRES[n]}; none here"
                params.append(pytest.param(n, id=n, marks=[pytest.mark.gpu, pytest.mark.skip(reason=reason)]))
        elif _have(REQUIRES[n]):
            params.append(pytest.param(n, id=n))
    return params


BACKEND_PARAMS = _selected()


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    b = _make(request.param)
    with b.context():
        yield b


@pytest.fixture(params=["float32", "float64"])
def dtype(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- Assertions on results ----------------------------------------------------------------------
def assert_like(result: Any, reference: Any) -> None:
    """``result`` is an array of ``reference``'s library (namespace), shape, dtype and device."""
    import array_api_compat

    assert array_api_compat.array_namespace(result) is array_api_compat.array_namespace(reference)
    assert tuple(result.shape) == tuple(reference.shape)
    assert result.dtype == reference.dtype
    assert array_api_compat.device(result) == array_api_compat.device(reference)


# --- Solver registries: a new solver joins every registry-driven test with one line here ---------
def _neumann_steps(rtol: float, mu: float) -> int:
    """Steps K with ``mu^(K+1) / (1 - mu) <= rtol``: the truncation error of the series, relative to ``||g||``."""
    return max(0, math.ceil(math.log(rtol * (1.0 - mu)) / math.log(mu)) - 1) if mu > 0.0 else 0


@dataclass(frozen=True)
class SolverCase:
    """How the tests build one solver: a fixed budget of ``k`` iterations, or a solve to ``rtol``.

    ``converged(rtol, mu)`` reaches a relative residual ``rtol`` on problems with ``||J||_2 <= mu``;
    ``contraction_only`` is False for methods that converge whenever ``I - J`` is invertible.
    """

    budget: Callable[[int], Any]
    converged: Callable[[float, float], Any]
    contraction_only: bool = True


ADJOINT_METHODS: dict[str, SolverCase] = {
    "neumann": SolverCase(
        lambda k: rbp_core.Neumann(steps=k, divergence_factor=None),
        lambda rtol, mu: rbp_core.Neumann(steps=_neumann_steps(rtol, mu), divergence_factor=None),
    ),
    "original": SolverCase(
        lambda k: rbp_core.OriginalRBP(rtol=0.0, max_iter=k, divergence_factor=None),
        lambda rtol, mu: rbp_core.OriginalRBP(rtol=rtol, max_iter=20_000),
    ),
    "cg": SolverCase(
        lambda k: rbp_core.CGRBP(rtol=0.0, max_iter=k),
        lambda rtol, mu: rbp_core.CGRBP(rtol=rtol, max_iter=20_000),
        contraction_only=False,
    ),
    "gmres": SolverCase(
        lambda k: rbp_core.GMRES(restart=4, rtol=0.0, max_iter=k),
        lambda rtol, mu: rbp_core.GMRES(rtol=rtol, max_iter=20_000),
        contraction_only=False,
    ),
    "bicgstab": SolverCase(
        lambda k: rbp_core.BiCGSTAB(rtol=0.0, max_iter=k),
        lambda rtol, mu: rbp_core.BiCGSTAB(rtol=rtol, max_iter=20_000),
        contraction_only=False,
    ),
    "anderson": SolverCase(
        lambda k: rbp_core.AndersonRBP(rtol=0.0, max_iter=k, divergence_factor=None),
        lambda rtol, mu: rbp_core.AndersonRBP(rtol=rtol, max_iter=20_000),
    ),
}
"""Every adjoint method, by name."""

FORWARD_SOLVERS: dict[str, SolverCase] = {
    "iteration": SolverCase(
        lambda k: rbp_core.FixedPointIteration(rtol=0.0, max_iter=k, divergence_factor=None),
        lambda rtol, mu: rbp_core.FixedPointIteration(rtol=rtol, max_iter=20_000),
    ),
    "damped": SolverCase(
        lambda k: rbp_core.FixedPointIteration(rtol=0.0, max_iter=k, damping=0.7, divergence_factor=None),
        lambda rtol, mu: rbp_core.FixedPointIteration(rtol=rtol, max_iter=20_000, damping=0.7),
    ),
    "anderson": SolverCase(
        lambda k: rbp_core.Anderson(rtol=0.0, max_iter=k, divergence_factor=None),
        lambda rtol, mu: rbp_core.Anderson(rtol=rtol, max_iter=20_000),
        contraction_only=False,
    ),
    "broyden": SolverCase(
        lambda k: rbp_core.Broyden(rtol=0.0, max_iter=k, divergence_factor=None),
        lambda rtol, mu: rbp_core.Broyden(rtol=rtol, max_iter=20_000),
        contraction_only=False,
    ),
}
"""Every forward solver, by name (settings that change the iteration count as separate entries)."""


@pytest.fixture(params=list(ADJOINT_METHODS))
def adjoint(request: pytest.FixtureRequest) -> SolverCase:
    """Each registered adjoint method in turn."""
    return ADJOINT_METHODS[request.param]


@pytest.fixture(params=list(FORWARD_SOLVERS))
def forward(request: pytest.FixtureRequest) -> SolverCase:
    """Each registered forward solver in turn."""
    return FORWARD_SOLVERS[request.param]

"""CuPy adapter: VJP/JVP callbacks on the GPU, the helper for CuPy simulators, and fused kernels.

For simulators written in CuPy with hand-written derivatives:

- :func:`jacobian_callbacks` turns a Jacobian given as a dense ``cupy.ndarray``, a
  ``cupyx.scipy.sparse`` matrix or a ``cupyx.scipy.sparse.linalg.LinearOperator``
  into the ``vjp`` and ``jvp`` callbacks the solvers take, for states of any shape;
- :func:`implicit_gradient` runs the forward solve, the backward method and the
  parameter VJP in one call, on the device of the inputs;
- the solvers' vector updates run as fused kernels on CuPy arrays (each update and
  the norm the stopping test needs in one pass over memory). The core picks them
  automatically for CuPy inputs; :func:`fused_kernels` turns them off and on (for
  comparisons).

Everything stays on the device of the state: each iteration brings one scalar
(the residual norm of the stopping test) to the host, and the fixed-point
iteration two in one transfer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

try:
    import cupy
    import cupyx.scipy.sparse as cusparse
    import cupyx.scipy.sparse.linalg as cusparse_linalg
except ImportError as exc:  # pragma: no cover - exercised where CuPy is missing (tests/test_cupy_backend.py)
    msg = (
        "rbp_core.backends.cupy needs CuPy, which is not installed. Install the CuPy build that "
        "matches your CUDA version, for example `pip install cupy-cuda12x` (or the extra: "
        "`pip install 'rbp-core[cupy]'`) or `pip install cupy-cuda13x`; see "
        "https://docs.cupy.dev/en/stable/install.html"
    )
    raise ImportError(msg) from exc

import numpy as np

import rbp_core
from rbp_core import BackwardMethod, FixedPointIteration, ImplicitGradient
from rbp_core._vector import VectorOps

__all__ = ["Callbacks", "as_state", "fused_kernels", "fused_vector_ops", "implicit_gradient", "jacobian_callbacks"]


class Callbacks(NamedTuple):
    """The pair of callbacks built from a Jacobian."""

    vjp: Callable[[Any], Any]
    """``v -> J^T v``."""
    jvp: Callable[[Any], Any]
    """``v -> J v``."""


def jacobian_callbacks(J: Any, shape: tuple[int, ...] | None = None) -> Callbacks:
    """Build ``vjp`` and ``jvp`` from the Jacobian ``J = dF/dh`` of the flattened state, on the GPU.

    Parameters
    ----------
    J : cupy.ndarray, cupyx.scipy.sparse matrix, or cupyx.scipy.sparse.linalg.LinearOperator
        Square, ``(n, n)``, real. A sparse ``J`` is converted to CSR once for
        each direction (``J`` and ``J^T``), so both products are row-parallel.
    shape : tuple of int, optional
        The state's shape (any shape with ``n`` elements, C order); default ``(n,)``.

    Returns
    -------
    Callbacks
        ``vjp(v) = J^T v`` and ``jvp(v) = J v``, each returning a CuPy array of
        ``v``'s shape and dtype on ``v``'s device. A ``v`` on another device
        than a dense or sparse ``J`` is refused with ``ValueError`` (no silent
        peer-to-peer traffic).
    """
    device = None
    promote = False
    if isinstance(J, cusparse_linalg.LinearOperator):
        matvec, rmatvec = J.matvec, J.rmatvec
    elif cusparse.issparse(J):
        J_csr, JT_csr = J.tocsr(), J.T.tocsr()
        matvec, rmatvec = J_csr.__matmul__, JT_csr.__matmul__
        device = J_csr.data.device
        promote = True
    elif isinstance(J, cupy.ndarray):
        if J.ndim != 2:
            msg = f"J must be a 2-d Jacobian, got an array of shape {J.shape}"
            raise ValueError(msg)
        JT = J.T
        matvec, rmatvec = J.__matmul__, JT.__matmul__
        device = J.device
    else:
        msg = (
            "J must be a cupy.ndarray, a cupyx.scipy.sparse matrix or a "
            f"cupyx.scipy.sparse.linalg.LinearOperator, got {type(J).__module__}.{type(J).__name__}"
            + (" (a NumPy/SciPy Jacobian goes to rbp_core.backends.numpy)" if isinstance(J, np.ndarray) else "")
        )
        raise TypeError(msg)
    n, m = J.shape
    if n != m:
        msg = f"J must be square (the Jacobian of a map from the state to itself), got shape {J.shape}"
        raise ValueError(msg)
    kind = np.dtype(J.dtype).kind
    if kind not in "fiu":
        msg = f"J must be real, got dtype {J.dtype}"
        raise TypeError(msg)
    state_shape = (n,) if shape is None else tuple(int(s) for s in shape)
    if math.prod(state_shape) != n:
        msg = f"shape {state_shape} has {math.prod(state_shape)} elements but J is {n} x {n}"
        raise ValueError(msg)

    def _apply(op: Callable[[Any], Any], name: str) -> Callable[[Any], Any]:
        def apply(v: Any) -> Any:
            if not isinstance(v, cupy.ndarray):
                msg = f"{name} got a {type(v).__module__}.{type(v).__name__}; expected a cupy.ndarray"
                raise TypeError(msg)
            if v.shape != state_shape:
                msg = f"{name} got a vector of shape {v.shape}; the state shape is {state_shape}"
                raise ValueError(msg)
            if device is not None and v.device != device:
                msg = f"{name} got a vector on {v.device}; J is on {device}"
                raise ValueError(msg)
            with v.device:
                flat = v.reshape(n)
                if promote and flat.dtype != J.dtype:  # cuSPARSE wants one dtype: compute in the wider one
                    flat = flat.astype(np.promote_types(flat.dtype, J.dtype))
                out = op(flat)
                return cupy.asarray(out).reshape(state_shape).astype(v.dtype, copy=False)

        apply.__name__ = name
        return apply

    return Callbacks(vjp=_apply(rmatvec, "vjp"), jvp=_apply(matvec, "jvp"))


def as_state(x: Any, name: str = "state") -> Any:
    """Convert ``x`` to a floating CuPy array (on the current device if it is not one already).

    Integers and bools become float64; complex input is refused.
    """
    a = x if isinstance(x, cupy.ndarray) else cupy.asarray(x)
    kind = a.dtype.kind
    if kind in "iub":
        return a.astype(cupy.float64)
    if kind != "f":
        msg = f"{name} must be real, got dtype {a.dtype}"
        raise TypeError(msg)
    return a


def implicit_gradient(
    f: Callable[[Any], Any],
    h0: Any,
    loss_grad: Any,
    *,
    vjp_state: Callable[[Any, Any], Any],
    vjp_params: Callable[[Any, Any], Any],
    method: BackwardMethod,
    jvp_state: Callable[[Any, Any], Any] | None = None,
    forward: FixedPointIteration | None = None,
    contraction: float | None = None,
    throw: bool = True,
) -> ImplicitGradient:
    """:func:`rbp_core.implicit_gradient` for CuPy: ``h0`` and ``loss_grad`` may be array-likes.

    Everything runs on the device of ``h0`` (a host array is moved to the
    current device once, at the start). See :func:`rbp_core.implicit_gradient`
    for the parameters.
    """
    h0_arr = as_state(h0, "h0")
    with h0_arr.device:
        g: Any = loss_grad if callable(loss_grad) else as_state(loss_grad, "loss_grad")
        return rbp_core.implicit_gradient(
            f,
            h0_arr,
            g,
            vjp_state=vjp_state,
            vjp_params=vjp_params,
            method=method,
            jvp_state=jvp_state,
            forward=forward,
            contraction=contraction,
            throw=throw,
        )


# --- fused kernels ----------------------------------------------------------------------------
# Each kernel makes one pass over its arrays: the element-wise update plus per-block partial sums
# of the squared norm (accumulated in double, also for float32), which one small CuPy reduction then
# adds up in a fixed order. No atomics: the result is the same from run to run.
_THREADS = 256
_SOURCE = r"""
#define THREADS 256

__device__ double block_sum(double acc) {
    __shared__ double warp_sums[THREADS / 32];
    __syncthreads();  // the shared buffer may still be read by a previous call
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = acc;
    __syncthreads();
    acc = 0.0;
    if (warp == 0) {
        acc = lane < THREADS / 32 ? warp_sums[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    }
    return acc;  // the block's sum, in thread 0
}

#define GRID_STRIDE_LOOP(i, n) \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

// out = a + b; sum of b^2 (Neumann: z + v and ||v||^2)
template <typename T>
__global__ void add_sq(const T* a, const T* b, T* out, long long n, double* partial) {
    double acc = 0.0;
    GRID_STRIDE_LOOP(i, n) {
        const T bi = b[i];
        out[i] = a[i] + bi;
        acc += (double)bi * (double)bi;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// out = a + b; sum of (out - c)^2 (original RBP: J^T z + g and ||z_new - z||^2)
template <typename T>
__global__ void add_diff_sq(const T* a, const T* b, const T* c, T* out, long long n, double* partial) {
    double acc = 0.0;
    GRID_STRIDE_LOOP(i, n) {
        const T y = a[i] + b[i];
        out[i] = y;
        const T d = y - c[i];
        acc += (double)d * (double)d;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// out = a - b; sum of out^2 (CG: p - J^T p, r - J r)
template <typename T>
__global__ void sub_sq(const T* a, const T* b, T* out, long long n, double* partial) {
    double acc = 0.0;
    GRID_STRIDE_LOOP(i, n) {
        const T d = a[i] - b[i];
        out[i] = d;
        acc += (double)d * (double)d;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// alpha = gamma / delta; z_out = z + alpha p; r_out = r - alpha q; sum of r_out^2 (one CG step)
template <typename T>
__global__ void cg_update(const T* z, const T* p, const T* r, const T* q, const double* gamma,
                          const double* delta, T* z_out, T* r_out, long long n, double* partial) {
    const T alpha = (T)(gamma[0] / delta[0]);
    double acc = 0.0;
    GRID_STRIDE_LOOP(i, n) {
        z_out[i] = z[i] + alpha * p[i];
        const T ri = r[i] - alpha * q[i];
        r_out[i] = ri;
        acc += (double)ri * (double)ri;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// out = s + (gamma_new / gamma) p (CG's next direction)
template <typename T>
__global__ void xpby(const T* s, const T* p, const double* gamma_new, const double* gamma, T* out,
                     long long n) {
    const T beta = (T)(gamma_new[0] / gamma[0]);
    GRID_STRIDE_LOOP(i, n) { out[i] = s[i] + beta * p[i]; }
}

// sums of (a - b)^2 and a^2 (the fixed-point iteration's step and state norms), partial[0, :] and [1, :]
template <typename T>
__global__ void step_sqs(const T* a, const T* b, long long n, double* partial) {
    double acc_d = 0.0, acc_a = 0.0;
    GRID_STRIDE_LOOP(i, n) {
        const T ai = a[i];
        const T d = ai - b[i];
        acc_d += (double)d * (double)d;
        acc_a += (double)ai * (double)ai;
    }
    acc_d = block_sum(acc_d);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc_d;
    acc_a = block_sum(acc_a);
    if (threadIdx.x == 0) partial[gridDim.x + blockIdx.x] = acc_a;
}
"""
_KERNELS = ("add_sq", "add_diff_sq", "sub_sq", "cg_update", "xpby", "step_sqs")
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_ENABLED = True


@contextlib.contextmanager
def fused_kernels(enabled: bool) -> Iterator[None]:
    """Use (``True``, the default) or bypass (``False``) the fused kernels inside the ``with`` block.

    The generic Array-API updates give the same results up to rounding (the
    fused kernels accumulate norms in double precision); this switch exists for
    measuring the gain and for isolating a suspected kernel problem.
    """
    global _ENABLED  # noqa: PLW0603 - a process-wide switch, restored on exit
    old, _ENABLED = _ENABLED, bool(enabled)
    try:
        yield
    finally:
        _ENABLED = old


class _Module:
    """The compiled kernels, per device (NVRTC compiles once per process; CuPy caches on disk)."""

    def __init__(self) -> None:
        self._functions: dict[tuple[int, str, str], Any] = {}
        self._modules: dict[int, Any] = {}
        self._grid: dict[int, int] = {}

    def function(self, name: str, ctype: str) -> Any:
        dev = cupy.cuda.runtime.getDevice()
        key = (dev, name, ctype)
        fn = self._functions.get(key)
        if fn is None:
            module = self._modules.get(dev)
            if module is None:
                module = cupy.RawModule(
                    code=_SOURCE,
                    name_expressions=[f"{k}<{t}>" for k in _KERNELS for t in _CTYPES.values()],
                )
                self._modules[dev] = module
            fn = module.get_function(f"{name}<{ctype}>")
            self._functions[key] = fn
        return fn

    def blocks(self, n: int) -> int:
        """Enough blocks to fill the device (8 per multiprocessor), fewer for small arrays."""
        dev = cupy.cuda.runtime.getDevice()
        cap = self._grid.get(dev)
        if cap is None:
            cap = 8 * int(cupy.cuda.runtime.getDeviceProperties(dev)["multiProcessorCount"])
            self._grid[dev] = cap
        return max(1, min(cap, -(-n // _THREADS)))


_MODULE = _Module()


class FusedOps(VectorOps):
    """The solvers' vector updates as one-pass CUDA kernels, for C-contiguous float32/float64 CuPy arrays.

    Anything else (another dtype, a strided array from a callback, an empty
    state, or :func:`fused_kernels` turned off) goes to the generic updates.
    """

    fused = True

    def _ctype(self, *arrays: Any) -> str | None:
        if not _ENABLED:
            return None
        first = arrays[0]
        ctype = _CTYPES.get(first.dtype)
        if ctype is None or first.size == 0:
            return None
        for a in arrays:
            if not isinstance(a, cupy.ndarray) or a.dtype != first.dtype or not a.flags.c_contiguous:
                return None
            if a.size != first.size:
                return None
        return ctype

    def _launch(self, name: str, ctype: str, n: int, args: tuple[Any, ...], sums: int = 1) -> Any:
        blocks = _MODULE.blocks(n)
        partial = cupy.empty(sums * blocks, dtype=cupy.float64)
        _MODULE.function(name, ctype)((blocks,), (_THREADS,), (*args, np.int64(n), partial))
        return partial if sums == 1 else partial.reshape(sums, blocks)

    def _update_sq(self, name: str, ctype: str, *inputs: Any) -> tuple[Any, Any]:
        """Run kernel ``name``: one output like ``inputs[0]`` and its squared-norm partials, summed."""
        first = inputs[0]
        with first.device:
            out = cupy.empty_like(first)
            partial = self._launch(name, ctype, first.size, (*inputs, out))
            return out, partial.sum()

    def add_sq(self, a: Any, b: Any) -> tuple[Any, Any]:
        ctype = self._ctype(a, b)
        if ctype is None:
            return super().add_sq(a, b)
        return self._update_sq("add_sq", ctype, a, b)

    def add_diff_sq(self, a: Any, b: Any, c: Any) -> tuple[Any, Any]:
        ctype = self._ctype(a, b, c)
        if ctype is None:
            return super().add_diff_sq(a, b, c)
        return self._update_sq("add_diff_sq", ctype, a, b, c)

    def sub_sq(self, a: Any, b: Any) -> tuple[Any, Any]:
        ctype = self._ctype(a, b)
        if ctype is None:
            return super().sub_sq(a, b)
        return self._update_sq("sub_sq", ctype, a, b)

    def cg_update(self, z: Any, p: Any, r: Any, q: Any, gamma: Any, delta: Any) -> tuple[Any, Any, Any]:
        ctype = self._ctype(z, p, r, q)
        if ctype is None or not _device_scalars(gamma, delta):
            return super().cg_update(z, p, r, q, float(gamma), float(delta))
        with z.device:
            z_out, r_out = cupy.empty_like(z), cupy.empty_like(r)
            partial = self._launch("cg_update", ctype, z.size, (z, p, r, q, gamma, delta, z_out, r_out))
            return z_out, r_out, partial.sum()

    def xpby(self, s: Any, p: Any, gamma_new: Any, gamma: Any) -> Any:
        ctype = self._ctype(s, p)
        if ctype is None or not _device_scalars(gamma_new, gamma):
            return super().xpby(s, p, float(gamma_new), float(gamma))  # Python floats keep s's dtype
        with s.device:
            out = cupy.empty_like(s)
            n = s.size
            _MODULE.function("xpby", ctype)(
                (_MODULE.blocks(n),), (_THREADS,), (s, p, gamma_new, gamma, out, np.int64(n))
            )
            return out

    def step_sqs(self, new: Any, old: Any) -> tuple[float, float]:
        ctype = self._ctype(new, old)
        if ctype is None:
            return super().step_sqs(new, old)
        with new.device:
            sums = self._launch("step_sqs", ctype, new.size, (new, old), sums=2).sum(axis=1).get()
        return float(sums[0]), float(sums[1])


def _device_scalars(*xs: Any) -> bool:
    """Whether each of ``xs`` is a 0-d float64 CuPy array (the partial-sum results the kernels read)."""
    return all(isinstance(x, cupy.ndarray) and x.ndim == 0 and x.dtype == np.float64 for x in xs)


def fused_vector_ops(xp: Any) -> VectorOps:
    """The vector updates the core uses for CuPy arrays (namespace ``xp``): :class:`FusedOps`."""
    return FusedOps(xp)

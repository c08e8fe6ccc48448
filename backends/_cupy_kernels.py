"""One-pass CUDA kernels for the core's vector operations on CuPy arrays (registered by ``rbp_core.backends.cupy``).

Each kernel makes one pass over its arrays: the element-wise update plus per-block partial sums
of the squared norm it returns (accumulated in double, also for float32), which one small CuPy
reduction then adds up in a fixed order. No atomics: the result is the same from run to run.
The operations are those of :class:`rbp_core.VectorOps`, named by their mathematics; anything a
kernel cannot take (another dtype, a strided array, an empty state, or :func:`fused_kernels`
turned off) goes to the generic code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import cupy
import numpy as np

from rbp_core import VectorOps

__all__ = ["FusedOps", "fused_kernels"]

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

// The scalar alpha: a device value (a ratio of squared norms, never brought to the host) or a host one.
#define ALPHA (use_dev ? alpha_dev[0] : alpha_host)

// w = y + alpha x; sum of w^2
template <typename T>
__global__ void axpy_sqnorm(const double* alpha_dev, double alpha_host, int use_dev, const T* x, const T* y,
                            T* w, long long n, double* partial) {
    const T a = (T)ALPHA;
    double acc = 0.0;
    GRID_STRIDE_LOOP(i, n) {
        const T wi = y[i] + a * x[i];
        w[i] = wi;
        acc += (double)wi * (double)wi;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// w = y + alpha x
template <typename T>
__global__ void axpy(const double* alpha_dev, double alpha_host, int use_dev, const T* x, const T* y, T* w,
                     long long n) {
    const T a = (T)ALPHA;
    GRID_STRIDE_LOOP(i, n) { w[i] = y[i] + a * x[i]; }
}

// w = y + x; sum of x^2
template <typename T>
__global__ void add_sqnorm(const T* x, const T* y, T* w, long long n, double* partial) {
    double acc = 0.0;
    GRID_STRIDE_LOOP(i, n) {
        const T xi = x[i];
        w[i] = y[i] + xi;
        acc += (double)xi * (double)xi;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// w = x + y; sum of (w - c)^2
template <typename T>
__global__ void add_sqdist(const T* x, const T* y, const T* c, T* w, long long n, double* partial) {
    double acc = 0.0;
    GRID_STRIDE_LOOP(i, n) {
        const T wi = x[i] + y[i];
        w[i] = wi;
        const T d = wi - c[i];
        acc += (double)d * (double)d;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// sums of (a - b)^2 and a^2, in partial[0, :] and partial[1, :]
template <typename T>
__global__ void step_sqnorms(const T* a, const T* b, long long n, double* partial) {
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
_KERNELS = ("axpy_sqnorm", "axpy", "add_sqnorm", "add_sqdist", "step_sqnorms")
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_ENABLED = True


@contextlib.contextmanager
def fused_kernels(enabled: bool) -> Iterator[None]:
    """Use (``True``, the default) or bypass (``False``) the fused kernels inside the ``with`` block.

    The generic Array-API operations give the same results up to rounding (the fused kernels
    accumulate norms in double precision); this switch exists for measuring the gain and for
    isolating a suspected kernel problem.
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
        self._dummy: dict[int, Any] = {}

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

    def alpha(self, alpha: Any) -> tuple[Any, np.float64, np.int32] | None:
        """The kernel arguments for ``alpha``: a device float64 scalar, or a host value; None if neither."""
        if isinstance(alpha, float):
            dev = cupy.cuda.runtime.getDevice()
            dummy = self._dummy.get(dev)
            if dummy is None:
                dummy = self._dummy[dev] = cupy.zeros(1, dtype=cupy.float64)
            return dummy, np.float64(alpha), np.int32(0)
        if isinstance(alpha, cupy.ndarray) and alpha.ndim == 0:
            a = alpha if alpha.dtype == np.float64 else alpha.astype(np.float64)
            return a, np.float64(0.0), np.int32(1)
        return None


_MODULE = _Module()


class FusedOps(VectorOps):
    """The core's vector operations as one-pass CUDA kernels, for C-contiguous float32/float64 CuPy arrays."""

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
            if a.size != first.size or a.device != first.device:
                return None
        return ctype

    def _launch(self, name: str, ctype: str, n: int, args: tuple[Any, ...], sums: int = 1) -> Any:
        blocks = _MODULE.blocks(n)
        partial = cupy.empty(sums * blocks, dtype=cupy.float64)
        _MODULE.function(name, ctype)((blocks,), (_THREADS,), (*args, np.int64(n), partial))
        return partial if sums == 1 else partial.reshape(sums, blocks)

    def axpy(self, alpha: Any, x: Any, y: Any) -> Any:
        ctype = self._ctype(x, y)
        scalar = None if ctype is None else _MODULE.alpha(alpha)
        if ctype is None or scalar is None:
            return super().axpy(alpha, x, y)
        with x.device:
            w = cupy.empty_like(y)
            n = x.size
            _MODULE.function("axpy", ctype)((_MODULE.blocks(n),), (_THREADS,), (*scalar, x, y, w, np.int64(n)))
            return w

    def axpy_sqnorm(self, alpha: Any, x: Any, y: Any) -> tuple[Any, Any]:
        ctype = self._ctype(x, y)
        scalar = None if ctype is None else _MODULE.alpha(alpha)
        if ctype is None or scalar is None:
            return super().axpy_sqnorm(alpha, x, y)
        with x.device:
            w = cupy.empty_like(y)
            return w, self._launch("axpy_sqnorm", ctype, x.size, (*scalar, x, y, w)).sum()

    def add_sqnorm(self, x: Any, y: Any) -> tuple[Any, Any]:
        ctype = self._ctype(x, y)
        if ctype is None:
            return super().add_sqnorm(x, y)
        with x.device:
            w = cupy.empty_like(y)
            return w, self._launch("add_sqnorm", ctype, x.size, (x, y, w)).sum()

    def add_sqdist(self, x: Any, y: Any, c: Any) -> tuple[Any, Any]:
        ctype = self._ctype(x, y, c)
        if ctype is None:
            return super().add_sqdist(x, y, c)
        with x.device:
            w = cupy.empty_like(y)
            return w, self._launch("add_sqdist", ctype, x.size, (x, y, c, w)).sum()

    def step_sqnorms(self, new: Any, old: Any) -> Any:
        ctype = self._ctype(new, old)
        if ctype is None:
            return super().step_sqnorms(new, old)
        with new.device:
            return self._launch("step_sqnorms", ctype, new.size, (new, old), sums=2).sum(axis=1)

    def to_host(self, values: Sequence[Any]) -> tuple[float, ...]:
        if isinstance(values, cupy.ndarray):  # the sums of one kernel, in one array
            return tuple(float(v) for v in values.get().tolist())
        return super().to_host(values)

"""CuPy adapter: VJP/JVP callbacks on the GPU, the helper for CuPy simulators, and fused kernels.

For simulators written in CuPy with hand-written derivatives:

- :func:`jacobian_callbacks` turns a Jacobian given as a dense ``cupy.ndarray``, a
  ``cupyx.scipy.sparse`` matrix or a ``cupyx.scipy.sparse.linalg.LinearOperator``
  into the ``vjp`` and ``jvp`` callbacks the solvers take, for states of any shape;
- :func:`implicit_gradient` runs the forward solve, the backward method and the
  parameter VJP in one call, on the device of the inputs;
- importing this module registers fused kernels for the core's vector operations on
  CuPy arrays (each update and the norm the stopping test needs in one pass over
  memory; ``rbp_core.backends._cupy_kernels``); :func:`fused_kernels` turns them off
  and on (for comparisons).

Everything stays on the device of the state: each iteration brings one scalar
(the residual norm of the stopping test) to the host, and the fixed-point
iteration two in one transfer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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

import array_api_compat
import numpy as np

import rbp_core

from ._cupy_kernels import FusedOps, fused_kernels
from ._shared import Callbacks, make_callbacks
from ._shared import implicit_gradient as _implicit_gradient

__all__ = ["Callbacks", "as_state", "fused_kernels", "implicit_gradient", "jacobian_callbacks"]


def jacobian_callbacks(J: Any, shape: tuple[int, ...] | None = None) -> Callbacks:
    r"""Build ``vjp`` and ``jvp`` from the Jacobian :math:`J = \partial F / \partial h` of the flattened state, on the GPU.

    Parameters
    ----------
    J : cupy.ndarray, cupyx.scipy.sparse matrix, or cupyx.scipy.sparse.linalg.LinearOperator
        Square, ``(n, n)``, real. A sparse ``J`` is converted to CSR once for
        each direction (:math:`J` and :math:`J^T`), so both products are row-parallel.
    shape : tuple of int, optional
        The state's shape (any shape with ``n`` elements, C order); default ``(n,)``.

    Returns
    -------
    Callbacks
        ``vjp(v)`` :math:`= J^T v` and ``jvp(v)`` :math:`= J v`, each returning a CuPy array of
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

    def check(v: Any, name: str) -> None:
        if not isinstance(v, cupy.ndarray):
            msg = f"{name} got a {type(v).__module__}.{type(v).__name__}; expected a cupy.ndarray"
            raise TypeError(msg)
        if device is not None and v.device != device:
            msg = f"{name} got a vector on {v.device}; J is on {device}"
            raise ValueError(msg)

    def run(product: Callable[[Any], Any], v: Any, n: int, state_shape: tuple[int, ...]) -> Any:
        with v.device:
            flat = v.reshape(n)
            if promote and flat.dtype != J.dtype:  # cuSPARSE wants one dtype: compute in the wider one
                flat = flat.astype(np.promote_types(flat.dtype, J.dtype))
            return cupy.asarray(product(flat)).reshape(state_shape).astype(v.dtype, copy=False)

    return make_callbacks(J, shape, matvec, rmatvec, run, check)


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


def implicit_gradient(f: Callable[[Any], Any], h0: Any, loss_grad: Any, **options: Any) -> rbp_core.ImplicitGradient:
    """:func:`rbp_core.implicit_gradient` for CuPy: ``h0`` and ``loss_grad`` may be array-likes.

    Everything runs on the device of ``h0`` (a host array is moved to the current device once,
    at the start); ``options`` are the keywords of :func:`rbp_core.implicit_gradient`. A
    ``loss_grad`` that is not a CuPy array takes the state's dtype.

    Returns
    -------
    rbp_core.ImplicitGradient
        The fixed point, the gradient and both Solutions.
    """
    return _implicit_gradient(
        f, h0, loss_grad, options, as_state=as_state, native=cupy.ndarray, context=lambda a: a.device
    )


def _cupy(xp: Any) -> bool:
    return bool(array_api_compat.is_cupy_namespace(xp))


rbp_core.register_ops(_cupy, FusedOps)

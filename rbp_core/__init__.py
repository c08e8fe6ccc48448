"""rbp-core: gradients through fixed points by recurrent back-propagation, on any Array API library.

The solvers take explicit callbacks, ``vjp`` (``v -> J^T v``) and ``jvp``
(``v -> J v``), and arrays of any library that array-api-compat supports
(NumPy, CuPy, PyTorch, array-api-strict, ...). Importing this package imports
no array framework.
"""

from __future__ import annotations

from ._cg import cg_rbp
from ._errors import ContractionViolation, ConvergenceError, RBPError
from ._fixed_point import fixed_point
from ._implicit import ImplicitGradient, implicit_backward, implicit_gradient
from ._methods import CGRBP, BackwardMethod, FixedPointIteration, Neumann, OriginalRBP
from ._neumann import neumann_rbp
from ._original import original_rbp
from ._solution import Solution, Status

__version__ = "0.1.0"

__all__ = [
    "CGRBP",
    "BackwardMethod",
    "ContractionViolation",
    "ConvergenceError",
    "FixedPointIteration",
    "ImplicitGradient",
    "Neumann",
    "OriginalRBP",
    "RBPError",
    "Solution",
    "Status",
    "__version__",
    "cg_rbp",
    "fixed_point",
    "implicit_backward",
    "implicit_gradient",
    "neumann_rbp",
    "original_rbp",
]

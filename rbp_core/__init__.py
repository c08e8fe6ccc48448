"""rbp-core: gradients through fixed points by recurrent back-propagation, on any Array API library.

Solvers are objects (:class:`FixedPointIteration` forward; :class:`Neumann`,
:class:`OriginalRBP`, :class:`CGRBP` for the adjoint equation) that one driver
runs: :func:`fixed_point` and :func:`solve_adjoint` take explicit callbacks,
``f``, ``vjp`` (``v -> J^T v``) and ``jvp`` (``v -> J v``), and arrays of any
library that array-api-compat supports (NumPy, CuPy, PyTorch, array-api-strict,
...). Importing this package imports no array framework.
"""

from __future__ import annotations

from ._adjoint import implicit_backward, solve_adjoint
from ._errors import BackwardFailureWarning, ContractionViolation, ConvergenceError, RBPError
from ._forward import ImplicitGradient, fixed_point, implicit_gradient
from ._ops import VectorOps, register_ops
from ._protocols import AdjointMethod, ForwardSolver
from ._shortcuts import cg_rbp, neumann_rbp, original_rbp
from ._solution import Solution, Status
from ._solvers.anderson import Anderson
from ._solvers.anderson_rbp import AndersonRBP
from ._solvers.bicgstab import BiCGSTAB
from ._solvers.broyden import Broyden
from ._solvers.cg_rbp import CGRBP
from ._solvers.fixed_point_iteration import FixedPointIteration
from ._solvers.gmres import GMRES
from ._solvers.neumann import Neumann
from ._solvers.original_rbp import OriginalRBP

__version__ = "0.2.0.dev0"

__all__ = [
    "CGRBP",
    "GMRES",
    "AdjointMethod",
    "Anderson",
    "AndersonRBP",
    "BackwardFailureWarning",
    "BiCGSTAB",
    "Broyden",
    "ContractionViolation",
    "ConvergenceError",
    "FixedPointIteration",
    "ForwardSolver",
    "ImplicitGradient",
    "Neumann",
    "OriginalRBP",
    "RBPError",
    "Solution",
    "Status",
    "VectorOps",
    "__version__",
    "cg_rbp",
    "fixed_point",
    "implicit_backward",
    "implicit_gradient",
    "neumann_rbp",
    "original_rbp",
    "register_ops",
    "solve_adjoint",
]

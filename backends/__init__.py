"""Thin adapters that bind rbp-core's solvers to one array library each.

Installed as ``rbp_core.backends``: ``rbp_core.backends.numpy`` (NumPy and
SciPy operators, the helper for simulators) and ``rbp_core.backends.torch``
(autograd fixed points with RBP, CG-RBP, Neumann-RBP, BPTT and TBPTT
gradients). Each module imports its library; ``import rbp_core`` alone imports
none of them. No solver logic lives here.
"""

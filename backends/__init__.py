"""Thin adapters that bind rbp-core's solvers to one array library each.

Installed as ``rbp_core.backends``: ``rbp_core.backends.numpy`` (NumPy and
SciPy operators). Each module imports its library; ``import rbp_core`` alone
imports none of them. No solver logic lives here.
"""

"""Doctest collection of the documentation pages that need an optional library.

pytest reads ``collect_ignore`` from the nearest conftest.py only, so this one lists every page of
docs/ that needs PyTorch, CuPy or JAX, including the two that the root conftest.py lists as well.
Without the library (the ``core`` session of the test matrix has no torch) there is nothing to
run on them.
"""

import importlib.util

_NEEDS = {
    "torch": ("quickstart.md", "training.md", "torch.md"),
    "cupy": ("cupy.md",),
    "jax": ("jax.md",),
}

collect_ignore = [page for name, pages in _NEEDS.items() if importlib.util.find_spec(name) is None for page in pages]

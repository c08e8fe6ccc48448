"""Sphinx configuration of the rbp-core documentation (MyST Markdown, numpydoc, autodoc).

Built by ``nox -s docs`` with ``sphinx-build -W -n --keep-going``: every warning is an error
and every cross-reference must resolve. The build is offline, so there is no intersphinx.
"""

from __future__ import annotations

import rbp_core

project = "rbp-core"
author = "rbp-core developers"
copyright = "rbp-core developers"
version = rbp_core.__version__
release = rbp_core.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
]

# The pages are Markdown; ".rst" is listed because numpydoc loads autosummary, which
# warns when the reStructuredText suffix is missing (no .rst page exists).
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"

# MyST: $...$ and $$...$$ for maths; anchors on headings so that pages can link to sections.
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

# autodoc: the numpydoc sections document the types, so signatures show names and defaults
# only (the annotations are typing aliases such as ``Array = Any`` that would not resolve).
autodoc_typehints = "none"
autodoc_member_order = "bysource"
# The CuPy adapter's reference is built without CuPy (the docs build has no GPU): its imports are mocked.
autodoc_mock_imports = ["cupy", "cupyx"]

# numpydoc: no automatic member tables (api.md names the members it documents), and the
# types in Parameters/Returns/Attributes become cross-references to rbp-core's own objects.
numpydoc_show_class_members = False
numpydoc_xref_param_type = True

# Words of the numpydoc type vocabulary. numpydoc's default aliases send several of them
# to the Python and NumPy inventories, which an offline build does not have: map them to
# themselves and leave them as plain text. "adjoint method" and "forward solver", the types of
# the solver arguments in words, are split at the space by numpydoc: their words are plain too.
_DESCRIPTIVE_WORDS = {"array", "ndarray", "matrix", "callable", "object", "optional", "of", "or"}
_DESCRIPTIVE_WORDS |= {"adjoint", "method", "forward", "solver"}
_BUILTIN_TYPES = {"None", "bool", "int", "float", "str", "tuple", "list", "dict"}
_PLAIN_TYPE_WORDS = _DESCRIPTIVE_WORDS | _BUILTIN_TYPES
numpydoc_xref_aliases = {word: word for word in _PLAIN_TYPE_WORDS} | {
    "Solution": "rbp_core.Solution",
    "Status": "rbp_core.Status",
    "AdjointMethod": "rbp_core.AdjointMethod",
    "ForwardSolver": "rbp_core.ForwardSolver",
    "FixedPointIteration": "rbp_core.FixedPointIteration",
    "Neumann": "rbp_core.Neumann",
    "OriginalRBP": "rbp_core.OriginalRBP",
    "CGRBP": "rbp_core.CGRBP",
    "GMRES": "rbp_core.GMRES",
    "Anderson": "rbp_core.Anderson",
    "Broyden": "rbp_core.Broyden",
    "BiCGSTAB": "rbp_core.BiCGSTAB",
    "AndersonRBP": "rbp_core.AndersonRBP",
    "VectorOps": "rbp_core.VectorOps",
    "ImplicitGradient": "rbp_core.ImplicitGradient",
    "Callbacks": "rbp_core.backends.numpy.Callbacks",
    "FixedPointInfo": "rbp_core.backends.torch.FixedPointInfo",
    "BPTT": "rbp_core.backends.torch.BPTT",
    "TBPTT": "rbp_core.backends.torch.TBPTT",
    # PyTorch's own types (the torch adapter's docstrings); PyTorch's inventory is not loaded.
    "Tensor": "torch.Tensor",
    "nn.Module": "torch.nn.Module",
}
numpydoc_xref_ignore = _PLAIN_TYPE_WORDS

# Objects of other projects named as types in docstrings (jacobian_callbacks, the torch adapter).
nitpick_ignore = [
    ("py:obj", "scipy.sparse"),
    ("py:obj", "scipy.sparse.linalg.LinearOperator"),
    ("py:obj", "torch.Tensor"),
    ("py:obj", "torch.nn.Module"),
    ("py:obj", "cupy.ndarray"),
    ("py:obj", "cupyx.scipy.sparse"),
    ("py:obj", "cupyx.scipy.sparse.linalg.LinearOperator"),
    # A private helper that VectorOps.sqnorm's docstring names; the reference documents no private module.
]

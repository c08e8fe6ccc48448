"""Sphinx configuration of the rbp-core documentation (MyST Markdown, numpydoc, autodoc).

Built by ``nox -s docs`` with ``sphinx-build -W -n --keep-going``: every warning is an error
and every cross-reference must resolve. The build is offline, so there is no intersphinx, and so
is the site: MathJax comes from the ``sphinx-mathjax-offline`` package and is copied into
``_static/``, and :func:`check_offline` fails the build when a generated page would load a script,
a stylesheet, an image or a frame from another host.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import rbp_core

project = "rbp-core"
author = "rbp-core developers"
copyright = "rbp-core developers"
version = rbp_core.__version__
release = rbp_core.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    # MathJax 3 shipped in a Python package: it sets mathjax_path to a file it copies into _static/.
    "sphinx-mathjax-offline",
    "numpydoc",
    "myst_parser",
]

# The pages are Markdown; ".rst" is listed because numpydoc loads autosummary, which
# warns when the reStructuredText suffix is missing (no .rst page exists).
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]
# furo: a content column that scrolls wide code blocks sideways (with a visible scroll bar) instead
# of clipping them, light and dark colours, and no web fonts. custom.css widens the column so that
# lines of about 115 characters fit without scrolling in a 1280-pixel window (125 on wider screens).
html_theme = "furo"
html_title = f"rbp-core {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]

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
_DESCRIPTIVE_WORDS |= {"adjoint", "method", "forward", "solver", "pytree"}
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


# --- the offline check ----------------------------------------------------------------------------
# Tags and attributes through which a page loads something by itself (links to other sites are fine).
_LOADED = {("script", "src"), ("img", "src"), ("iframe", "src"), ("source", "src"), ("embed", "src")}
_LOADED_LINKS = {"stylesheet", "preload", "modulepreload", "icon", "shortcut", "apple-touch-icon", "manifest"}


def _external(url: str) -> bool:
    """Whether ``url`` points at another host: a scheme with a network location, or ``//host``."""
    url = url.strip().lower()
    return url.startswith(("//", "http:", "https:", "ftp:", "ws:", "wss:"))


class _Resources(HTMLParser):
    """Collects the URLs a page loads by itself: script, image, frame sources and loaded links."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.urls: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        for name, value in values.items():
            if (tag, name) in _LOADED:
                self.urls.append((tag, value))
        if tag == "link" and _LOADED_LINKS & set(values.get("rel", "").lower().split()):
            self.urls.append((tag, values.get("href", "")))


def loaded_resources(html: str) -> list[tuple[str, str]]:
    """The ``(tag, url)`` pairs of what the page ``html`` loads when it is opened."""
    parser = _Resources()
    parser.feed(html)
    parser.close()
    return parser.urls


# A stylesheet's own loads: url(...) and @import "...", with or without quotes.
_CSS_URL = re.compile(r"""(?:@import\s+(?:url\(\s*)?|url\(\s*)['"]?([^'")\s;]+)""")


def offline_problems(outdir: str | Path) -> list[str]:
    """Every reference of a page under ``outdir`` to another host, or to a local file that is missing.

    The pages' scripts, images, frames and loaded links are checked, and the ``url()`` and
    ``@import`` of every stylesheet (a web font from a CDN, say).
    """
    root = Path(outdir)
    problems = []
    for sheet in sorted(root.rglob("*.css")):
        for url in _CSS_URL.findall(sheet.read_text(encoding="utf-8", errors="replace")):
            if _external(url):
                problems.append(f"{sheet.relative_to(root).as_posix()}: loads {url} from another host")
    for page in sorted(root.rglob("*.html")):
        for tag, url in loaded_resources(page.read_text(encoding="utf-8")):
            name = page.relative_to(root).as_posix()
            if _external(url):
                problems.append(f"{name}: <{tag}> loads {url} from another host")
            elif url and not url.startswith("data:"):
                target = (page.parent / url.split("?")[0].split("#")[0]).resolve()
                if not target.is_file():
                    problems.append(f"{name}: <{tag}> loads {url}, which the build did not write")
    return problems


def check_offline(app: Any, exception: BaseException | None) -> None:
    """``build-finished``: fail the HTML build if a page would load anything from the network.

    The site must work with no network (a laptop on a train, an air-gapped cluster): MathJax, the
    theme's scripts and stylesheets all come from the build's own ``_static/``. Each offending page
    is reported as an error, with the URL, and the build's exit status is 1 with or without ``-W``.
    """
    if exception is not None or app.builder.format != "html":
        return
    problems = offline_problems(app.outdir)
    if problems:
        from sphinx.util import logging  # noqa: PLC0415 - tests import this file without Sphinx

        logger = logging.getLogger(__name__)
        for problem in problems:
            logger.error("offline check: %s", problem)
        app.statuscode = 1


def setup(app: Any) -> dict[str, Any]:
    """Connect the offline check, after the extensions' own build-finished steps (MathJax's copy)."""
    app.connect("build-finished", check_offline, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

"""The API reference, docs/api.md, documents every public name, and only public names.

The public names are ``rbp_core.__all__`` and the ``__all__`` of the four adapters, read from
their source so that neither PyTorch, CuPy nor JAX has to be installed. A name is documented by an
object directive (``autofunction``, ``autoclass``, ``autoexception``, ``autodata``, or the
``py:`` directives with their ``:module:`` option) in one of the page's ``{eval-rst}`` blocks.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import rbp_core

ROOT = Path(__file__).resolve().parent.parent
API_PAGE = ROOT / "docs" / "api.md"
ADAPTERS = {
    "rbp_core.backends.numpy": ROOT / "backends" / "numpy.py",
    "rbp_core.backends.torch": ROOT / "backends" / "torch.py",
    "rbp_core.backends.cupy": ROOT / "backends" / "cupy.py",
    "rbp_core.backends.jax": ROOT / "backends" / "jax.py",
}

_BLOCK = re.compile(r"^```\{eval-rst\}\n(.*?)^```", re.DOTALL | re.MULTILINE)
_DIRECTIVE = re.compile(r"^\.\. (?:py:)?(auto)?(\w+)::\s*([\w.]+)")
_OBJECTS = {"function", "class", "exception", "data", "attribute", "method"}
_MODULES = {"module", "currentmodule"}


def source_all(path: Path) -> list[str]:
    """The ``__all__`` list assigned at the top level of a module's source."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    msg = f"{path} has no __all__"
    raise AssertionError(msg)


def documented_names(text: str) -> set[str]:
    """The fully qualified names of the objects that the page's rst blocks document."""
    names = set()
    for block in _BLOCK.findall(text):
        lines = block.splitlines()
        module = None
        for i, line in enumerate(lines):
            match = _DIRECTIVE.match(line)  # top-level directives only: members are not names
            if match is None:
                continue
            _, kind, name = match.groups()
            if kind in _MODULES:
                module = name
                continue
            if kind not in _OBJECTS:
                continue
            options = []
            for option in lines[i + 1 :]:
                if option and not option.startswith(" "):
                    break
                options.append(option.strip())
            owner = next((o.split(None, 1)[1] for o in options if o.startswith(":module:")), module)
            if not name.startswith("rbp_core") and owner is not None:
                name = f"{owner}.{name}"
            names.add(name)
    return names


def public_names() -> set[str]:
    names = {f"rbp_core.{n}" for n in rbp_core.__all__}
    for module, path in ADAPTERS.items():
        names |= {f"{module}.{n}" for n in source_all(path)}
    return names


def test_the_parser_reads_directives_and_their_modules() -> None:
    page = (
        "```{eval-rst}\n.. module:: rbp_core\n\n.. py:data:: __version__\n\n   Text.\n\n"
        ".. autoclass:: rbp_core.AdjointMethod()\n   :members: limits\n\n   .. py:attribute:: name\n\n"
        ".. py:class:: Callbacks\n   :module: rbp_core.backends.cupy\n```\n"
        "```python\n.. autofunction:: not_rst\n```\n"
    )
    assert documented_names(page) == {
        "rbp_core.__version__",
        "rbp_core.AdjointMethod",
        "rbp_core.backends.cupy.Callbacks",
    }


def test_the_adapters_all_is_read_from_source() -> None:
    import rbp_core.backends.numpy

    assert source_all(ADAPTERS["rbp_core.backends.numpy"]) == rbp_core.backends.numpy.__all__
    assert "FixedPoint" in source_all(ADAPTERS["rbp_core.backends.torch"])
    assert "fused_kernels" in source_all(ADAPTERS["rbp_core.backends.cupy"])


def test_every_public_name_is_documented() -> None:
    missing = sorted(public_names() - documented_names(API_PAGE.read_text(encoding="utf-8")))
    assert not missing, f"docs/api.md does not document: {', '.join(missing)}"


def test_only_public_names_are_documented() -> None:
    extra = sorted(documented_names(API_PAGE.read_text(encoding="utf-8")) - public_names())
    assert not extra, f"docs/api.md documents names that no __all__ exports: {', '.join(extra)}"


def test_every_status_is_explained() -> None:
    page = (ROOT / "docs" / "failures.md").read_text(encoding="utf-8")
    unexplained = [s.name for s in rbp_core.Status if f"| `{s.name}` |" not in page]
    assert not unexplained, f"docs/failures.md has no row for: {', '.join(unexplained)}"

"""The documentation works with no network: docs/conf.py fails the build on a page that would load
anything from another host (MathJax from a CDN, say), and its MathJax comes from a local package."""

from __future__ import annotations

import importlib.util
import io
import types
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _load_conf() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("rbp_docs_conf", DOCS / "conf.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


conf = _load_conf()


class _App:
    """What check_offline and setup use of a Sphinx application."""

    def __init__(self, outdir: Path, fmt: str = "html") -> None:
        self.outdir = outdir
        self.builder = types.SimpleNamespace(format=fmt)
        self.connected: list[tuple[str, object, int]] = []

    def connect(self, event: str, handler: object, priority: int = 500) -> None:
        self.connected.append((event, handler, priority))


def test_setup_connects_the_check_after_the_mathjax_copy() -> None:
    app = _App(Path())
    metadata = conf.setup(app)
    assert app.connected == [("build-finished", conf.check_offline, 900)]
    assert metadata["parallel_read_safe"]


def test_mathjax_is_served_from_the_build() -> None:
    assert "sphinx-mathjax-offline" in conf.extensions
    assert not hasattr(conf, "mathjax_path"), "mathjax_path is set by sphinx-mathjax-offline, to a local file"
    assert "intersphinx" not in " ".join(conf.extensions)


@pytest.mark.parametrize(
    "html",
    [
        '<script src="https://cdn.jsdelivr.net/npm/mathjax@4/tex-mml-chtml.js"></script>',
        '<script defer="defer" src="//cdn.example.org/x.js"></script>',
        "<script src='HTTP://example.org/x.js'></script>",
        '<link rel="stylesheet" href="https://fonts.example.org/font.css">',
        '<link rel="preload" as="font" href="http://example.org/f.woff2">',
        '<img src="https://example.org/logo.png">',
        '<iframe src="https://example.org/embed"></iframe>',
    ],
)
def test_external_loads_are_found(html: str) -> None:
    (url,) = (u for _, u in conf.loaded_resources(html) if conf._external(u))
    assert "example.org" in url or "cdn.jsdelivr.net" in url


@pytest.mark.parametrize(
    "html",
    [
        '<script src="_static/mathjax/tex-chtml.js"></script>',
        '<a href="https://github.com/">a link is not a load</a>',
        '<link rel="canonical" href="https://example.org/page.html">',
        "<script>window.MathJax = {}</script>",
        "<p>https://example.org/x.js in the text</p>",
    ],
)
def test_local_loads_and_links_pass(html: str) -> None:
    assert not [u for _, u in conf.loaded_resources(html) if conf._external(u)]


def test_the_hook_fails_naming_the_page(tmp_path: Path) -> None:
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "local.js").write_text("")
    (tmp_path / "good.html").write_text('<script src="_static/local.js?v=1"></script>')
    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "bad.html").write_text('<script src="https://cdn.example.org/mathjax.js"></script>')
    (tmp_path / "missing.html").write_text('<script src="_static/mathjax/tex-chtml.js"></script>')
    problems = conf.offline_problems(tmp_path)
    assert problems == [
        "api/bad.html: <script> loads https://cdn.example.org/mathjax.js from another host",
        "missing.html: <script> loads _static/mathjax/tex-chtml.js, which the build did not write",
    ]
    pytest.importorskip("sphinx", reason="the docs build dependencies are not installed")
    app = _App(tmp_path)
    conf.check_offline(app, None)
    assert app.statuscode == 1  # the build fails, with or without -W
    failed, latex = _App(tmp_path), _App(tmp_path, fmt="latex")
    conf.check_offline(failed, RuntimeError("the build failed already"))  # nothing more to say
    conf.check_offline(latex, None)  # not a web page
    assert not hasattr(failed, "statuscode")
    assert not hasattr(latex, "statuscode")


def test_stylesheets_that_load_from_another_host_are_found(tmp_path: Path) -> None:
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "theme.css").write_text(
        '@import url("https://fonts.example.org/a.css");\n'
        "a { src: url(../fonts/local.woff2), url(data:font/woff2;base64,AAAA) }\n"
        "b { background: url( '//cdn.example.org/b.png' ) }\n"
    )
    assert conf.offline_problems(tmp_path) == [
        "_static/theme.css: loads https://fonts.example.org/a.css from another host",
        "_static/theme.css: loads //cdn.example.org/b.png from another host",
    ]


def _build(tmp_path: Path, conf_lines: str) -> tuple[Path, int, str]:
    """A one-page Sphinx project with a formula, built with docs/conf.py's check connected."""
    pytest.importorskip("sphinx", reason="the docs build dependencies are not installed")
    from sphinx.application import Sphinx

    src = tmp_path / "src"
    src.mkdir()
    (src / "index.rst").write_text("Title\n=====\n\n:math:`h^* = F(h^*)`\n")
    (src / "conf.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('rbp_docs_conf_tiny', {str(DOCS / 'conf.py')!r})\n"
        "docs_conf = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(docs_conf)\n"
        "def setup(app):\n"
        "    app.connect('build-finished', docs_conf.check_offline, priority=900)\n" + conf_lines
    )
    out = tmp_path / "out"
    warnings = io.StringIO()
    app = Sphinx(src, src, out, tmp_path / "doctrees", "html", status=None, warning=warnings, freshenv=True)
    app.build()
    return out, app.statuscode, warnings.getvalue()


def test_a_build_with_mathjax_from_a_cdn_fails(tmp_path: Path) -> None:
    _, status, warnings = _build(
        tmp_path, "extensions = ['sphinx.ext.mathjax']\nmathjax_path = 'https://cdn.example.org/tex.js'\n"
    )
    assert status == 1
    assert "offline check: index.html: <script> loads https://cdn.example.org/tex.js from another host" in warnings


def test_a_build_with_offline_mathjax_passes(tmp_path: Path) -> None:
    pytest.importorskip("sphinx-mathjax-offline", reason="the docs build dependencies are not installed")
    out, status, warnings = _build(tmp_path, "extensions = ['sphinx.ext.mathjax', 'sphinx-mathjax-offline']\n")
    assert status == 0, warnings
    assert (out / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert 'src="_static/mathjax/tex-chtml.js"' in (out / "index.html").read_text()

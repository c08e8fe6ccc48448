"""Development sessions. ``nox -s tests lint typecheck`` is what CI runs (plus docs, build and pre-commit).

What each session installs is a dependency group of ``pyproject.toml`` (read with
``nox.project.dependency_groups``; no list is repeated here), with torch pinned to a CPU build by
``constraints.txt``. The virtualenv backend is used because uv does not see locally provided wheels.

Environments are reused, and a reused environment whose requirements, ``pyproject.toml`` and
``constraints.txt`` are unchanged since it was made installs nothing; ``nox --reuse-venv=no`` (or
``-N``) rebuilds them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import nox

nox.needs_version = ">=2025.2.9"  # nox.project.dependency_groups
nox.options.default_venv_backend = "virtualenv"
nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_venv = "yes"

ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
CONSTRAINTS = ("-c", str(ROOT / "constraints.txt"))

# Backend sets the suite runs against, and the dependency group each needs. "core" has no torch
# installed at all, which also proves that rbp_core works without any framework; "torch" adds
# PyTorch on the CPU, and CUDA torch and CuPy where a GPU exists (elsewhere the suite prints one
# line saying which GPU backends are missing and why). JAX has a session of its own, below.
BACKEND_SETS = {
    "core": ("numpy,numpy-readonly,array-api-strict,array-api-strict-noext", "test"),
    "torch": ("torch,torch-cuda?,cupy?", "test-torch"),
}


def group(*names: str) -> tuple[str, ...]:
    """The requirements of pyproject's dependency groups ``names`` (included groups resolved)."""
    return nox.project.dependency_groups(PYPROJECT, *names)


def _install(session: nox.Session, *args: str) -> None:
    """``pip install -c constraints.txt ARGS``, unless this reused environment already has exactly them."""
    inputs = "\n".join([*args, (ROOT / "pyproject.toml").read_text(), (ROOT / "constraints.txt").read_text()])
    key = hashlib.sha256(inputs.encode()).hexdigest()
    location = getattr(session.virtualenv, "location", None)
    marker = Path(location) / ".rbp-installed" if location else None
    if marker is not None and marker.is_file() and marker.read_text() == key:
        session.log("requirements unchanged since this environment was made: nothing to install")
        return
    session.install(*CONSTRAINTS, *args)
    if marker is not None:
        marker.write_text(key)


@nox.session
@nox.parametrize("backends", list(BACKEND_SETS))
def tests(session: nox.Session, backends: str) -> None:
    """Run the test suite (Hypothesis profile "ci") against one backend set."""
    selection, deps = BACKEND_SETS[backends]
    _install(session, "-e", ".", *group(deps))
    # One intra-op thread unless told otherwise: torch's default of one per core slows the many small
    # solves of the suite several-fold when the cores are shared.
    env = {
        "RBP_BACKENDS": selection,
        "HYPOTHESIS_PROFILE": "ci",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    session.run("pytest", *session.posargs, env=env)


@nox.session
def jax(session: nox.Session) -> None:
    """The JAX adapter's tests and the whole suite on JAX arrays (the backend matrix's jax entry).

    About seven minutes on 2 cores: JAX dispatches each eager operation of the core's host drivers
    on its own. CI runs it after the README's test command, which it would make three times as
    long. XLA's compilations are cached in the session's folder, so a second run compiles less.
    """
    _install(session, "-e", ".", *group("test-jax"))
    env = {
        "RBP_BACKENDS": "jax",
        "HYPOTHESIS_PROFILE": "ci",
        "JAX_COMPILATION_CACHE_DIR": str(Path(session.create_tmp()).resolve() / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    session.run("pytest", *session.posargs, env=env)


@nox.session
def property(session: nox.Session) -> None:
    """The property tests with the long "thorough" Hypothesis profile, on every available backend."""
    _install(session, "-e", ".", *group("test-torch"))
    session.run("pytest", "tests", "-m", "not gpu", *session.posargs, env={"HYPOTHESIS_PROFILE": "thorough"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    _install(session, *group("lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def precommit(session: nox.Session) -> None:
    """The pre-commit hooks on every file: ruff check, the format check, typos, validate-pyproject."""
    _install(session, *group("precommit"))
    session.run("pre-commit", "run", "--all-files", "--show-diff-on-failure", *session.posargs)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on rbp_core and backends."""
    _install(session, "-e", ".", *group("typecheck"))
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the Sphinx site with warnings as errors (-W -n); the build fails if a page loads anything
    from another host. Then the docs' own tests, which need Sphinx (the offline check on real builds)."""
    _install(session, "-e", ".", *group("docs", "test"))
    out = ROOT / "docs" / "_build" / "html"
    shutil.rmtree(out, ignore_errors=True)
    session.run("sphinx-build", "-W", "-n", "--keep-going", "-b", "html", "docs", str(out))
    session.run("pytest", "-q", "tests/test_docs_offline.py", "tests/test_docs_api.py", "tests/test_docs_blocks.py")


@nox.session
def build(session: nox.Session) -> None:
    """Build sdist and wheel, install the wheel in a fresh virtualenv and check what it ships."""
    _install(session, *group("build"))
    dist = ROOT / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", str(dist))
    wheel = next(dist.glob("rbp_core-*.whl"))
    tmp = Path(session.create_tmp()).resolve()
    venv = tmp / "wheel-venv"
    shutil.rmtree(venv, ignore_errors=True)
    session.run(sys.executable, "-m", "venv", str(venv), external=True)
    py = venv / "bin" / "python"
    session.run(str(py), "-m", "pip", "install", "-q", str(wheel), "numpy", external=True)
    check = ROOT / "tests" / "packaging_check.py"
    # From a folder outside the source tree, with a safe sys.path: only the installed wheel counts.
    with session.chdir(tmp):
        session.run(str(py), "-P", str(check), external=True)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: solver overhead, the Krylov methods' products against SciPy, the PyTorch adapter and its peers.

    ``nox -s bench -- ARGS`` passes ARGS to ``bench_core.py``; ``bench_krylov.py``, ``bench_forward.py``,
    ``bench_torch.py``, ``bench_deq.py``, ``bench_train.py``, ``bench_batch.py``, ``bench_warm.py`` and ``bench_jax.py``
    run with their defaults (torch pinned by ``constraints.txt``; TorchDEQ, TorchOpt, optimistix and jaxopt
    are the peers they compare with). One intra-op thread, as the timing scripts expect.
    """
    _install(session, "-e", ".", *group("bench"))
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    session.run("python", "benchmarks/bench_core.py", *session.posargs, env=env)
    session.run("python", "benchmarks/bench_krylov.py", env=env)
    session.run("python", "benchmarks/bench_forward.py", env=env)
    session.run("python", "benchmarks/bench_torch.py", env=env)
    session.run("python", "benchmarks/bench_deq.py", env=env)
    session.run("python", "benchmarks/bench_train.py", env=env)
    session.run("python", "benchmarks/bench_batch.py", env=env)
    session.run("python", "benchmarks/bench_warm.py", env=env)
    session.run("python", "benchmarks/bench_jax.py", env=env)


@nox.session
def gpu(session: nox.Session) -> None:
    """The GPU check on a machine with a CUDA device: CuPy and CUDA-torch tests, then the GPU benchmarks.

    Runs benchmarks/gpu_check.py with everything installed here (CuPy from ``RBP_CUPY``, default
    ``cupy-cuda12x``; torch as pinned in constraints.txt). On a GPU machine without nox or network,
    run ``python3 benchmarks/gpu_check.py`` directly (see its docstring).
    """
    cupy_pkg = os.environ.get("RBP_CUPY", "cupy-cuda12x")
    _install(session, "-e", ".", *group("test-torch"), cupy_pkg)
    session.run("python", "benchmarks/gpu_check.py", "--installed", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Run the README demo (the quick Hopfield comparison) and the NumPy demo in a fresh environment."""
    _install(session, "-e", ".[examples]")
    session.run("python", "examples/hopfield.py", "--quick", "--out", str(Path(session.create_tmp()) / "hopfield-out"))
    session.run("python", "examples/demo.py")

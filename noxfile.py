"""Development sessions. ``nox -s tests lint typecheck`` is what CI runs (plus docs and build).

torch is installed from ``constraints.txt`` (a CPU build pinned there); the
virtualenv backend is used because uv does not see locally provided wheels.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import nox

nox.options.default_venv_backend = "virtualenv"
nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = False

ROOT = Path(__file__).parent
CONSTRAINTS = ("-c", str(ROOT / "constraints.txt"))
TEST_DEPS = ("pytest>=8", "hypothesis>=6.100", "numpy>=1.26", "scipy>=1.11", "array-api-strict>=2.3")

# Backend sets the suite runs against. "core" has no torch installed at all, which also proves that
# rbp_core works without any framework; "torch" adds PyTorch on the CPU, and CUDA torch and CuPy
# where a GPU exists (elsewhere they show as skipped, with the reason).
BACKEND_SETS = {
    "core": ("numpy,numpy-readonly,array-api-strict,array-api-strict-noext", ()),
    "torch": (
        "torch,torch-cuda?,cupy?",
        ("torch", "matplotlib>=3.7", "tqdm>=4.60", "scikit-learn>=1.3", "networkx>=3"),
    ),
}


def _install(session: nox.Session, *packages: str) -> None:
    session.install(*CONSTRAINTS, *packages)


@nox.session
@nox.parametrize("backends", list(BACKEND_SETS))
def tests(session: nox.Session, backends: str) -> None:
    """Run the test suite (Hypothesis profile "ci") against one backend set."""
    selection, extra = BACKEND_SETS[backends]
    _install(session, "-e", ".", *TEST_DEPS, *extra)
    session.run("pytest", *session.posargs, env={"RBP_BACKENDS": selection, "HYPOTHESIS_PROFILE": "ci"})


@nox.session
def property(session: nox.Session) -> None:
    """The property tests with the long "thorough" Hypothesis profile, on every available backend."""
    _install(session, "-e", ".", *TEST_DEPS, "torch")
    session.run("pytest", "tests", "-m", "not gpu", *session.posargs, env={"HYPOTHESIS_PROFILE": "thorough"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on rbp_core and backends."""
    _install(session, "-e", ".", "mypy>=1.11", "numpy>=1.26", "scipy>=1.11", "torch")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the Sphinx site with warnings as errors (-W -n)."""
    _install(session, "-e", ".", "sphinx>=7", "myst-parser>=3", "numpydoc>=1.7", "numpy>=1.26", "scipy>=1.11", "torch")
    out = ROOT / "docs" / "_build" / "html"
    shutil.rmtree(out, ignore_errors=True)
    session.run("sphinx-build", "-W", "-n", "--keep-going", "-b", "html", "docs", str(out))


@nox.session
def build(session: nox.Session) -> None:
    """Build sdist and wheel, install the wheel in a fresh virtualenv and check what it ships."""
    session.install("build")
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
    ``bench_torch.py``, ``bench_deq.py``, ``bench_train.py``, ``bench_batch.py`` and ``bench_warm.py`` run with their defaults (torch pinned by ``constraints.txt``; TorchDEQ and
    TorchOpt are the peers they compare with). One intra-op thread, as the timing scripts expect.
    """
    _install(session, "-e", ".", "numpy>=1.26", "scipy>=1.11", "torch", "torchdeq", "torchopt")
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    session.run("python", "benchmarks/bench_core.py", *session.posargs, env=env)
    session.run("python", "benchmarks/bench_krylov.py", env=env)
    session.run("python", "benchmarks/bench_forward.py", env=env)
    session.run("python", "benchmarks/bench_torch.py", env=env)
    session.run("python", "benchmarks/bench_deq.py", env=env)
    session.run("python", "benchmarks/bench_train.py", env=env)
    session.run("python", "benchmarks/bench_batch.py", env=env)
    session.run("python", "benchmarks/bench_warm.py", env=env)


@nox.session
def gpu(session: nox.Session) -> None:
    """The GPU check on a machine with a CUDA device: CuPy and CUDA-torch tests, then the GPU benchmarks.

    Runs benchmarks/gpu_check.py with everything installed here (CuPy from ``RBP_CUPY``, default
    ``cupy-cuda12x``; torch as pinned in constraints.txt). On a GPU machine without nox or network,
    run ``python3 benchmarks/gpu_check.py`` directly (see its docstring).
    """
    cupy_pkg = os.environ.get("RBP_CUPY", "cupy-cuda12x")
    _install(session, "-e", ".", *TEST_DEPS, "torch", cupy_pkg)
    session.run("python", "benchmarks/gpu_check.py", "--installed", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Run the README demo (the quick Hopfield comparison) and the NumPy demo in a fresh environment."""
    _install(session, "-e", ".[examples]")
    session.run("python", "examples/hopfield.py", "--quick", "--out", str(Path(session.create_tmp()) / "hopfield-out"))
    session.run("python", "examples/demo.py")

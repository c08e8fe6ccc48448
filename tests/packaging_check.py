"""Run in a fresh environment with the built wheel installed (``nox -s build``), from outside the repo.

Checks what the wheel ships: ``rbp_core.backends`` maps to the ``backends/`` folder, a bare
``backends`` is not importable, ``py.typed`` is present, and ``import rbp_core`` loads no framework.
"""

import importlib
import importlib.resources
import sys

import rbp_core

assert not {"torch", "cupy", "jax"} & set(sys.modules), sorted(set(sys.modules) & {"torch", "cupy", "jax"})
backend = importlib.import_module("rbp_core.backends.numpy")
assert hasattr(backend, "jacobian_callbacks")
assert importlib.resources.files("rbp_core").joinpath("py.typed").is_file()
try:
    importlib.import_module("backends")
except ModuleNotFoundError:
    pass
else:
    message = "a bare top-level 'backends' package is importable; it must not be"
    raise SystemExit(message)
print(f"rbp-core {rbp_core.__version__}: wheel layout ok ({backend.__file__})")

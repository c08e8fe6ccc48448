"""Collection rules for doctests that need an optional library (tests/conftest.py holds the backend matrix)."""

import importlib.util

# An adapter's module and its documentation page import the library; without it there is nothing to run.
collect_ignore = [
    path
    for name, paths in {
        "torch": (
            "backends/torch.py",
            "backends/_torch_hook.py",
            "backends/_torch_state.py",
            "backends/_torch_training.py",
            "docs/torch.md",
        ),
        "cupy": ("backends/cupy.py", "backends/_cupy_kernels.py", "docs/cupy.md"),
    }.items()
    if importlib.util.find_spec(name) is None
    for path in paths
]

"""Collection rules for the doctests of optional adapters (tests/conftest.py holds the backend matrix)."""

import importlib.util

# An adapter's module imports its library; without the library there is nothing to doctest.
collect_ignore = [f"backends/{name}.py" for name in ("torch", "cupy") if importlib.util.find_spec(name) is None]

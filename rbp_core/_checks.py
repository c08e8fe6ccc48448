"""Validation of settings: each names the setting and what it must be."""

from __future__ import annotations

import math
import numbers

__all__ = [
    "check_contraction",
    "check_damping",
    "check_divergence_factor",
    "check_instance",
    "check_int",
    "check_nonnegative",
    "check_optional_nonnegative",
    "check_tolerances",
]


def check_int(value: object, name: str, minimum: int) -> int:
    """An integer option ``>= minimum`` (bools are refused, NumPy integers accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        msg = f"{name} must be an integer, got {value!r}"
        raise TypeError(msg)
    if value < minimum:
        msg = f"{name} must be >= {minimum}, got {value!r}"
        raise ValueError(msg)
    return int(value)


def check_nonnegative(value: object, name: str) -> float:
    """A finite, non-negative real option such as a tolerance."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"{name} must be a real number, got {value!r}"
        raise TypeError(msg)
    v = float(value)
    if not (math.isfinite(v) and v >= 0.0):
        msg = f"{name} must be finite and >= 0, got {value!r}"
        raise ValueError(msg)
    return v


def check_optional_nonnegative(value: object, name: str) -> float | None:
    """None, or :func:`check_nonnegative`."""
    return None if value is None else check_nonnegative(value, name)


def check_tolerances(rtol: object, atol: object, max_iter: object) -> None:
    """The stopping settings every tolerance-driven solver has: ``rtol`` (None or >= 0), ``atol`` (>= 0), ``max_iter`` (>= 1)."""
    check_optional_nonnegative(rtol, "rtol")
    check_nonnegative(atol, "atol")
    check_int(max_iter, "max_iter", 1)


def check_contraction(value: object) -> float | None:
    """A contraction bound: None, or a real number in [0, 1)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"contraction must be None or a real number in [0, 1), got {value!r}"
        raise TypeError(msg)
    v = float(value)
    if not 0.0 <= v < 1.0:
        msg = f"contraction must lie in [0, 1) (a bound on ||J||_2 below 1), got {value!r}"
        raise ValueError(msg)
    return v


def check_damping(value: object, name: str = "damping") -> float:
    """A damping factor in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"{name} must be a real number in (0, 1], got {value!r}"
        raise TypeError(msg)
    d = float(value)
    if not 0.0 < d <= 1.0:
        msg = f"{name} must lie in (0, 1], got {value!r}"
        raise ValueError(msg)
    return d


def check_divergence_factor(value: object) -> float | None:
    """None (no divergence test) or a real number > 1."""
    if value is None:
        return None
    v = check_nonnegative(value, "divergence_factor")
    if v <= 1.0:
        msg = f"divergence_factor must be > 1 or None, got {value!r}"
        raise ValueError(msg)
    return v


def check_instance(obj: object, name: str) -> None:
    """Refuse a class where an instance is wanted (``rbp_core.OriginalRBP`` for ``rbp_core.OriginalRBP()``).

    A solver class has the protocol's attributes too, so a protocol check alone lets it through
    and it fails later, deep inside a backward pass.
    """
    if isinstance(obj, type):
        module = obj.__module__
        public = "rbp_core" if module.startswith("rbp_core._") else module
        msg = f"{name} must be an instance, not the class {obj.__name__}: pass {public}.{obj.__name__}() (with its settings)"
        raise TypeError(msg)

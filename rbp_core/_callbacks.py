"""User callbacks and inputs, checked: a bad output fails loudly and names the callback."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import array_api_compat

from ._typing import Array, Namespace

__all__ = ["CheckedCallback", "check_arity", "namespace_of", "same_kind"]


def check_arity(fn: object, called_as: str) -> None:
    """Refuse a callback that cannot be called as ``called_as`` (such as ``"vjp_state(h, v)"``), naming both.

    The check binds as many positional arguments as ``called_as`` names to the callback's signature,
    before any solve runs; a callable without an inspectable signature (some built-ins) is left to
    its call.
    """
    name, _, rest = called_as.partition("(")
    n = len([a for a in rest.rstrip(")").split(",") if a.strip()])
    try:
        signature = inspect.signature(fn)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*range(n))
    except TypeError:
        what = getattr(fn, "__qualname__", None) or type(fn).__name__
        arguments = f"{n} positional argument{'' if n == 1 else 's'}"
        msg = f"{name} is called as {called_as}, with {arguments}, but the callback given ({what}) has the signature {signature}"
        raise TypeError(msg) from None


def namespace_of(x: Array, name: str) -> Namespace:
    """Return the Array-API namespace of ``x``; check it is a real floating array."""
    try:
        xp = array_api_compat.array_namespace(x)
    except TypeError as exc:
        msg = f"{name} must be an array of a library supported by array-api-compat, got {type(x).__name__}"
        raise TypeError(msg) from exc
    if not xp.isdtype(x.dtype, "real floating"):
        msg = f"{name} must have a real floating dtype, got {x.dtype}"
        raise TypeError(msg)
    return xp


class CheckedCallback:
    """Wrap a user callback so that a bad output fails loudly, naming the callback.

    The output must be an array of the same library, shape and dtype as the
    reference array (and on the same device). The full namespace check runs on
    the first call and whenever the output's type changes; later calls compare
    type, shape and dtype attributes, which costs nanoseconds.
    """

    __slots__ = ("_device", "_dtype", "_fn", "_name", "_ok_type", "_shape", "_verb", "_xp", "calls")

    def __init__(
        self,
        fn: object,
        name: str,
        like: Array,
        xp: Namespace,
        *,
        verb: str = "returned",
        shape: tuple[int, ...] | None = None,
        called_as: str | None = None,
    ) -> None:
        if not callable(fn):
            msg = f"{name} must be callable, got {type(fn).__name__}"
            raise TypeError(msg)
        if called_as is not None:
            check_arity(fn, called_as)
        self._fn: Callable[[Array], Array] = fn
        self._name = name
        self._verb = verb
        self._xp = xp
        self._shape = tuple(like.shape) if shape is None else shape  # a batch's subset of samples: fewer
        self._dtype = like.dtype
        self._device = array_api_compat.device(like)
        self._ok_type: Any = None  # Any, not "type | None": no narrowing of out in __call__
        self.calls = 0

    def __call__(self, v: Array) -> Array:
        self.calls += 1
        out = self._fn(v)
        # One combined test on the hot path; the details only when something is off.
        if type(out) is not self._ok_type or out.shape != self._shape or out.dtype != self._dtype:
            self._check(out)
        return out

    def _check(self, out: Array) -> None:
        if type(out) is not self._ok_type:
            self._check_library(out)
        if out.shape != self._shape:
            msg = (
                f"{self._name} {self._verb} an array of shape {tuple(out.shape)}; "
                f"expected shape {self._shape} (the shape of the state)"
            )
            raise ValueError(msg)
        if out.dtype != self._dtype:
            msg = f"{self._name} {self._verb} dtype {out.dtype}; expected {self._dtype} (the dtype of the state)"
            raise TypeError(msg)

    def _check_library(self, out: Array) -> None:
        try:
            xp = array_api_compat.array_namespace(out)
        except TypeError:
            xp = None
        if xp is not self._xp:
            got = type(out).__module__ + "." + type(out).__name__
            msg = (
                f"{self._name} {self._verb} a {got}; expected an array of the same library as the "
                f"state ({self._xp.__name__}), with shape {self._shape}"
            )
            raise TypeError(msg)
        device = array_api_compat.device(out)
        if device != self._device:
            msg = f"{self._name} {self._verb} an array on device {device}; expected {self._device}"
            raise ValueError(msg)
        self._ok_type = type(out)


def same_kind(xp: Namespace, x: Array, like: Array, name: str) -> None:
    """Check that ``x`` (e.g. a warm start) matches ``like`` in library, shape, dtype and device."""
    CheckedCallback(lambda v: v, name, like, xp, verb="is")(x)

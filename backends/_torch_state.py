"""The torch adapter's states: tuple and batched states packed into rows, the inputs of the active samples.

:class:`_Packing` turns a state (a tensor, or a tuple of tensors such as an LSTM's ``(h, c)``)
into the one flat tensor, or with a batch axis the ``(b, m)`` rows, that the core's solvers see,
and back; :class:`_Gather` indexes a layer's inputs with the active samples; and
:func:`_has_other_leaves` says whether a recorded step reaches a tensor that requires grad.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeAlias, cast

import torch

from rbp_core._samples import check_batch_axis

__all__ = ["State"]

State: TypeAlias = torch.Tensor | tuple[torch.Tensor, ...]


# --- states: one tensor, or a tuple of tensors packed into one flat vector ----------------------
class _Packing:
    """Pack a tuple state into one flat tensor (views back on unpack); a single tensor passes.

    With ``batch_axis`` every part keeps its batch axis: the state packs into rows ``(b, m)``, one
    per sample (each part's elements of that sample, part after part), and rows of any number of
    samples unpack into parts with ``b`` samples on their batch axis.
    """

    def __init__(self, state: State, batch_axis: int | None = None) -> None:
        self.is_tuple = isinstance(state, tuple)
        parts = state if isinstance(state, tuple) else (state,)
        if not parts or not all(isinstance(p, torch.Tensor) for p in parts):
            msg = f"the state must be a tensor or a non-empty tuple of tensors, got {type(state).__name__}"
            raise TypeError(msg)
        first = parts[0]
        for i, p in enumerate(parts):
            if not p.is_floating_point():
                msg = f"state[{i}] must be a floating tensor, got dtype {p.dtype}"
                raise TypeError(msg)
            if p.dtype != first.dtype or p.device != first.device:
                msg = (
                    f"all parts of a tuple state must share dtype and device; state[{i}] is "
                    f"{p.dtype} on {p.device}, state[0] is {first.dtype} on {first.device}"
                )
                raise TypeError(msg)
        self.shapes = [tuple(p.shape) for p in parts]
        self.sizes = [p.numel() for p in parts]
        self.dtype, self.device = first.dtype, first.device
        self.axes: list[int] | None = None
        if batch_axis is not None:
            self.axes = [self._axis(batch_axis, p, i) for i, p in enumerate(parts)]
            sizes = {p.shape[a] for p, a in zip(parts, self.axes, strict=True)}
            if len(sizes) > 1:
                msg = f"batch_axis={batch_axis}: the parts of the state have different batch sizes {sorted(sizes)}"
                raise ValueError(msg)
            self.batch = sizes.pop()
            self.row_shapes = [s[:a] + s[a + 1 :] for s, a in zip(self.shapes, self.axes, strict=True)]
            self.row_sizes = [math.prod(s) for s in self.row_shapes]

    def _axis(self, batch_axis: int, part: torch.Tensor, i: int) -> int:
        return check_batch_axis(batch_axis, part, f"state[{i}]" if self.is_tuple else "the state")

    def pack(self, state: State, name: str) -> torch.Tensor:
        """``state`` (``f``'s output) as one flat tensor, each part checked like the state's own.

        A part of another shape, dtype or device, or not a tensor at all, is refused naming ``name``
        and the part: ``torch.cat`` would promote a float32 part of a float64 state silently.
        """
        if self.axes is not None:
            return self._pack_rows(state, name)
        if not self.is_tuple:
            self._check_part(state, 0, name, "")
            return cast("torch.Tensor", state)
        if not isinstance(state, tuple) or len(state) != len(self.shapes):
            msg = (
                f"{name} returned {type(state).__name__}; expected a tuple of {len(self.shapes)} tensors like the state"
            )
            raise TypeError(msg)
        for i, p in enumerate(state):
            self._check_part(p, i, name, f"state[{i}]")
        return torch.cat([p.reshape(-1) for p in state])

    def _check_part(self, part: object, i: int, name: str, label: str) -> None:
        shape, what = self.shapes[i], label or "an array"
        if not isinstance(part, torch.Tensor):
            msg = f"{name} returned {label or 'a'} {type(part).__name__}; expected a tensor of shape {shape} like the state"
            raise TypeError(msg)
        if tuple(part.shape) != shape:
            msg = (
                f"{name} returned {what} of shape {tuple(part.shape)}; expected shape {shape} (the shape of the state)"
            )
            raise ValueError(msg)
        if part.dtype != self.dtype or part.device != self.device:
            got = f"{label} of dtype" if label else "dtype"
            msg = (
                f"{name} returned {got} {part.dtype} on {part.device}; expected {self.dtype} on "
                f"{self.device} (the dtype and device of the state)"
            )
            raise TypeError(msg)

    def unpack(self, flat: torch.Tensor) -> State:
        if self.axes is not None:
            b = flat.shape[0]
            pieces = torch.split(flat, self.row_sizes, dim=1) if self.is_tuple else (flat,)
            out = tuple(
                p.reshape(b, *s).movedim(0, a) for p, s, a in zip(pieces, self.row_shapes, self.axes, strict=True)
            )
            return out if self.is_tuple else out[0]
        if not self.is_tuple:
            return flat
        parts = torch.split(flat, self.sizes)
        return tuple(p.reshape(s) for p, s in zip(parts, self.shapes, strict=True))

    def _pack_rows(self, state: State, name: str) -> torch.Tensor:
        """A state with ``b`` samples on each part's batch axis as rows ``(b, m)``, each part checked."""
        assert self.axes is not None
        parts = state if isinstance(state, tuple) else (state,)
        if isinstance(state, tuple) != self.is_tuple or len(parts) != len(self.shapes):
            what = f"a tuple of {len(self.shapes)} tensors" if self.is_tuple else "a tensor"
            msg = f"{name} returned {type(state).__name__}; expected {what} like the state"
            raise TypeError(msg)
        rows: list[torch.Tensor] = []
        for i, (p, a, row) in enumerate(zip(parts, self.axes, self.row_shapes, strict=True)):
            label = f"state[{i}]" if self.is_tuple else ""
            if not isinstance(p, torch.Tensor) or p.ndim != len(row) + 1:
                self._check_part(p, i, name, label)  # says what is wrong
            b = p.shape[a]
            if tuple(p.shape[:a] + p.shape[a + 1 :]) != row or (rows and b != rows[0].shape[0]):
                expected = list(row)
                expected.insert(a, b if not rows else rows[0].shape[0])
                msg = (
                    f"{name} returned {label or 'an array'} of shape {tuple(p.shape)}; expected shape "
                    f"{tuple(expected)} (the state's, with its samples on batch axis {a})"
                )
                raise ValueError(msg)
            if p.dtype != self.dtype or p.device != self.device:
                self._check_part(p, i, name, label)
            rows.append(p.movedim(a, 0).reshape(b, -1))
        return torch.cat(rows, dim=1) if self.is_tuple else rows[0]


def _has_other_leaves(out: torch.Tensor, leaf: torch.Tensor) -> bool:
    """Whether ``out``'s graph reaches a tensor that requires grad other than ``leaf``."""
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf
        if variable is not None:
            if variable is not leaf:
                return True
            continue
        stack.extend(n for n, _ in node.next_functions)
    return False


class _Gather:
    """The inputs of the active samples: tensors with the batch size on the batch axis, indexed once per index array."""

    def __init__(self, inputs: Sequence[Any], axis: int, batch: int) -> None:
        self.inputs = inputs
        self.axis = axis
        self.batch = batch
        self.last: tuple[torch.Tensor | None, Sequence[Any]] = (None, inputs)

    def _batched(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and -t.ndim <= self.axis < t.ndim and t.shape[self.axis] == self.batch

    def __call__(self, idx: torch.Tensor) -> Sequence[Any]:
        if idx.shape[0] == self.batch:
            return self.inputs
        if self.last[0] is not idx:
            taken = [t.index_select(self.axis, idx) if self._batched(t) else t for t in self.inputs]
            self.last = (idx, taken)
        return self.last[1]

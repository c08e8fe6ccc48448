"""Small helpers shared by the example scripts: IDX files, saved-tensor memory, JSON and progress bars.

The scripts put their own folder on ``sys.path`` (``python examples/NAME.py`` does this by itself) and
``import _common``. Nothing here is part of the library.
"""

from __future__ import annotations

import contextlib
import gzip
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

METHODS = ("BPTT", "TBPTT", "RBP", "CG-RBP", "Neumann-RBP")

# --- IDX files (MNIST format) --------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (plain or gzip-compressed, told apart by the gzip magic bytes)."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        msg = f"{path}: not an IDX file (magic bytes {raw[:4]!r})"
        raise ValueError(msg)
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    count = math.prod(dims)
    if len(raw) - offset != count * dtype.itemsize:
        msg = f"{path}: header says {dims} ({count * dtype.itemsize} bytes), the file holds {len(raw) - offset}"
        raise ValueError(msg)
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    msg = f"{directory}: neither {stem} nor {stem}.gz found"
    raise FileNotFoundError(msg)


def load_idx_dir(directory: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The images (N, rows, cols) uint8 and labels (N,) of one split of an MNIST-format IDX directory.

    ``split="train"`` reads ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte``; ``split="t10k"``
    the test files. Each may be plain or have ``.gz``.
    """
    d = Path(directory)
    images = read_idx(_find_idx(d, f"{split}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(d, f"{split}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        msg = f"{d}: images of shape {images.shape} do not match labels of shape {labels.shape}"
        raise ValueError(msg)
    return images, labels


# --- memory --------------------------------------------------------------------------------------
class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward while active.

    ``exclude``: tensors whose storage is not counted (for example a weight that every method saves
    once). Counted with ``torch.autograd.graph.saved_tensors_hooks``; CPU or CUDA alike.
    """

    def __init__(self, exclude: Iterable[Any] = ()) -> None:
        import torch

        self.seen: set[int] = {t.untyped_storage().data_ptr() for t in exclude}
        self.total = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Any) -> Any:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.seen:
            self.seen.add(key)
            self.total += storage.nbytes()
        return t

    def __enter__(self) -> Self:
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


class Diverged(Exception):  # noqa: N818 - a result, not an error
    """A method's training blew up: a legitimate result, recorded, not a bug."""


# --- output --------------------------------------------------------------------------------------
def finite_or_null(obj: Any) -> Any:
    """NaN and infinities become null: metrics.json stays standard JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_null(v) for v in obj]
    return obj


def parse_methods(text: str) -> list[str]:
    """A comma-separated subset of :data:`METHODS`; unknown names raise ``ValueError``."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        msg = f"unknown methods {unknown}; choose from {', '.join(METHODS)}"
        raise ValueError(msg)
    return methods


def progress(it: Iterable[Any], **kw: Any) -> Any:
    """A tqdm progress bar (shown on a terminal, silent when output is not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(it, disable=None, **kw)


def legend(ax: Any) -> None:
    """``ax.legend()`` when the axes have labelled artists (a method that failed in its first epoch has no curve)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table, columns right-aligned except the first."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = []
    for row in (header, *rows):
        cells = [str(row[0]).ljust(widths[0])] + [str(c).rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
    return "\n".join(lines)


# --- methods and outcomes ------------------------------------------------------------------------
def backward_method(name: str, T: int, divergence_factor: float | None = None) -> Any:
    """The ``backward=`` argument of ``rbp_core.backends.torch.fixed_point`` for method ``name``, truncation ``T``.

    The truncation convention of all the experiments: T backward terms. TBPTT(steps=T) records T
    updates; original RBP and CG-RBP stop after at most T iterations (original RBP starts from
    z_0 = 0, so z_1 = g costs no VJP and T iterations sum T terms); Neumann(steps=T - 1) makes T - 1
    VJPs, the T terms g, J^T g, ..., (J^T)^(T-1) g, which equals TBPTT(steps=T) at an exact fixed point.

    ``divergence_factor``, when given, replaces the library's defaults of original RBP (1e4) and
    Neumann-RBP (10): a backward solve whose monitored norm (a residual, a series term) exceeds that
    factor times the smallest so far is DIVERGED. CG-RBP has no such test (its residuals need not decrease).
    """
    import rbp_core
    from rbp_core.backends.torch import BPTT, TBPTT

    kw = {} if divergence_factor is None else {"divergence_factor": divergence_factor}
    makers: dict[str, Callable[[], Any]] = {
        "BPTT": BPTT,
        "TBPTT": lambda: TBPTT(steps=T),
        "RBP": lambda: rbp_core.OriginalRBP(max_iter=T, **kw),
        "CG-RBP": lambda: rbp_core.CGRBP(max_iter=T),
        "Neumann-RBP": lambda: rbp_core.Neumann(steps=T - 1, **kw),
    }
    return makers[name]()


def report_outcomes(results: Sequence[Any], where: Callable[[Any], str]) -> int:
    """Print each method that failed with an error or diverged (``where(r)``: when); the exit status.

    A divergence is a result of the experiment; an error is a bug: status 1.
    """
    failed = [r for r in results if r.status == "error"]
    for r in failed:
        print(f"ERROR in {r.method}: {r.reason}")
    for r in results:
        if r.status == "diverged":
            print(f"{r.method} diverged at {where(r)}: {r.reason}")
    return 1 if failed else 0


def check_forward(info: Any) -> None:
    """Raise :class:`Diverged` if the forward solve of ``fixed_point`` went non-finite."""
    import rbp_core

    if info.forward.status is rbp_core.Status.NONFINITE:
        msg = f"forward solve: {info.forward.describe()}"
        raise Diverged(msg)


def finite_loss(loss: Any) -> float:
    """The loss as a float; :class:`Diverged` if it is not finite."""
    value = float(loss.detach())
    if not math.isfinite(value):
        msg = f"non-finite loss {value}"
        raise Diverged(msg)
    return value


@contextlib.contextmanager
def divergence_is_a_result() -> Iterator[None]:
    """Turn the adapter's failed backward solves into :class:`Diverged` inside the ``with`` block.

    A FloatingPointError (a non-finite backward solve) or a ConvergenceError whose status is NONFINITE
    or DIVERGED becomes :class:`Diverged`; anything else propagates unchanged.
    """
    import rbp_core

    try:
        yield
    except FloatingPointError as err:
        raise Diverged(str(err)) from err
    except rbp_core.ConvergenceError as err:
        if err.status in (rbp_core.Status.NONFINITE, rbp_core.Status.DIVERGED):
            raise Diverged(str(err)) from err
        raise


def backward_through(loss: Any, info: Any, statuses: dict[str, int]) -> None:
    """``loss.backward()`` through a fixed point, sorting its failures into results and bugs.

    A non-finite backward solve (the adapter's FloatingPointError), a ConvergenceError whose status
    is NONFINITE or DIVERGED, and a recorded backward solve with either status raise
    :class:`Diverged`; any other exception propagates (a bug). Each backward solve's status is
    counted in ``statuses``.
    """
    import rbp_core

    failed = (rbp_core.Status.NONFINITE, rbp_core.Status.DIVERGED)
    with divergence_is_a_result():
        loss.backward()
    for sol in info.backward:
        statuses[sol.status.name] = statuses.get(sol.status.name, 0) + 1
        if sol.status in failed:
            msg = f"backward solve: {sol.describe()}"
            raise Diverged(msg)


def check_grads(params: Iterable[Any]) -> None:
    """:class:`Diverged` if any parameter's gradient has a NaN or an infinity.

    Tested on the gradient's sum, one pass with no boolean copy (40x cheaper than ``isfinite(g).all()``
    on a CPU): a NaN or an infinity makes the sum non-finite; so does a sum that overflows, which only
    entries near the dtype's largest value can cause, and those are reported too.
    """
    import torch

    if not all(bool(torch.isfinite(p.grad.sum())) for p in params if p.grad is not None):
        msg = "non-finite gradient"
        raise Diverged(msg)

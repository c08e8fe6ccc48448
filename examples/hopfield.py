"""Associative memory with a continuous Hopfield network: the five backward methods side by side.

The first experiment of Liao et al., "Reviving and Improving Recurrent Back-Propagation" (ICML 2018),
section 3(a) of the paper notes. A Hopfield network of 784 observed, 1024 hidden and 784 output
units (2592 in all) runs the update

    h_{t+1} = clamp((1 - a) h_t + W sigma(b h_t)),     a = 1, b = 0.5, sigma the logistic sigmoid,

where clamp sets the observed units to the image after every update, and W = (W0 + W0^T) * (1 - I)
(symmetric, no self loops) with W0 ~ N(0, 1e-3^2) the trained parameter. The map f(h) = clamp(update(h))
is what rbp_core.backends.torch.fixed_point iterates, from h_0 = (image, 0, 0) (observed units
clamped, hidden and output units zero): FixedPointIteration(rtol=0.0, max_iter=50,
divergence_factor=None) with throw=False, so 50 updates run: rtol=0 is met only when two iterates are
bitwise equal, an exact fixed point where more updates would change nothing, and the solve then stops
early (metrics.json records the number of updates as "forward_updates"; early in training, when W is
small and f a strong contraction, this happens after as few as 7 updates in float32, so BPTT's graph
then holds those updates only). The divergence test is off so that a growing step does not stop the
loop early. The output units are read from the state that fixed_point returns: the last forward
iterate for BPTT, the last of its T extra updates for TBPTT, and f(h*), one update past the forward
solution, for the three RBP methods (the step autograd is attached to; docs/torch.md).

The loss is the L1 distance (mean absolute error per pixel) between the output units and the
image; Adam, lr 1e-3, batch 1, on the ten clean binarised images (the first of each class of
Fashion-MNIST's training set). The test sets a random 50% of each image's non-zero pixels to zero,
clamps the observed units to that corrupted image, runs 50 updates and measures the L1 recall error
of the output units against the clean image.

Backward methods and the truncation convention (``--truncation T``, default 20, the paper's
"truncation 20": T backward steps, i.e. T terms of the series sum_t (J^T)^t g):

- "BPTT":        rbp_core.backends.torch.BPTT(), through all 50 updates;
- "TBPTT":       TBPTT(steps=T), T recorded updates after the forward solve (T terms);
- "RBP":         rbp_core.OriginalRBP(rtol=None, max_iter=T): at most T iterations z_i = J^T z_{i-1} + g
                 from z_0 = 0 (z_1 = g, so at most T - 1 VJPs and T terms), stopping early at its
                 default relative tolerance; rbp-core's adapter starts from zero, not from the paper's
                 random z_0;
- "CG-RBP":      rbp_core.CGRBP(rtol=None, max_iter=T), at most T CG iterations, each one VJP and one JVP
                 (the adapter's default double-backward JVP);
- "Neumann-RBP": rbp_core.Neumann(steps=T - 1): T - 1 VJPs give T series terms, so at an exact fixed
                 point it equals TBPTT(steps=T) (docs/torch.md).

A truncated RBP or CG-RBP solve that ends at its budget (MAX_STEPS) is expected and counted. A solve
whose status is DIVERGED or NONFINITE (the adapter raises FloatingPointError for the latter, and
rbp_core.ConvergenceError where asked to raise), a forward solve that goes non-finite, or a
non-finite loss is a *result*, the instability the paper reports for original RBP: the method is
recorded as diverged at that (1-based) epoch, its curve ends with the last completed epoch, and the
other methods go on. Any other exception is a bug: the script reports it and exits with status 1.

Memory: "backward_saved_kb" is the size of the distinct tensors that autograd saves for backward
during one training step (the forward graph, plus the one-step graphs that the RBP methods record
inside their backward solve), counted with torch.autograd.graph.saved_tensors_hooks in every training
step (the largest is reported), leaving out the weight matrix W (10 MB to 27 MB, saved once by
every method). It is the part of memory that grows with the number of recorded updates (BPTT: 50, TBPTT: T) and
stays at one step for the RBP methods; it is not the process RSS (torch allocations are not visible
to tracemalloc, and ru_maxrss only ever grows).

Outputs in ``--out DIR``: metrics.json (per method: status, final and best training loss, test recall
error, wall time, backward_saved_kb, the training curve, backward-solve statuses, how many forward
updates ran, the forward difference norms, and per epoch the largest growth ||r_K|| / ||r_1|| of
the backward solves: "backward_term_growth", above 1 when a Neumann series or an RBP iteration
grew), loss_curves.png, forward_difference.png and recall.png
(clean, corrupted and recalled images); a table of the methods is printed at the end.

Run: ``python examples/hopfield.py [--quick] [--out DIR] [--data DIR] [--epochs N] [--truncation T]
[--seed S] [--device cuda] [--time-limit S] [--divergence-factor F]`` (``--data DIR``: an MNIST-format IDX
directory instead of the shipped ten images; ``--write-data``: with ``--data``, regenerate
examples/data/fashion_mnist_first10.npz from it; ``--divergence-factor F``: original RBP's and
Neumann-RBP's backward solves are DIVERGED once their monitored norm exceeds F times the smallest so
far, instead of the library's defaults (1e4 for original RBP, 10 for Neumann-RBP); ``--merge DIR...``: combine runs of single methods, e.g. run
side by side, into one output; runs of BPTT alone merge with runs of any truncation, since BPTT does
not use it; ``--on-diverged skip``: a backward solve reported DIVERGED skips that training step, the
gradient being the partial sum of a diverging series, instead of stopping the method; metrics.json
lists the epoch of each skipped step as "skipped_steps").

Run time. ``--quick`` (five images, 128 hidden units, gain b = 4, 30 epochs, learning rate 2e-4, 30
updates; see ``QUICK_EPOCHS``): about 35 s for the five methods on 2 idle CPU cores with one torch
thread (``--threads``, default 1; two threads on busy cores made BPTT 3x slower), about 60 s with
both cores busy with other processes. Every method ends at a recall error of about 0.195, 38% below an all-zeros
output (0.3145), with each recalled image nearest to its own stored image (5 of 5).
The full setting (1024 hidden units, 1000 epochs of 10 steps, batch 1) is latency-bound: on 2 CPU
cores, two runs side by side with one torch thread each (``OMP_NUM_THREADS=1``), 1000 epochs took
25 minutes for Neumann-RBP, original RBP about as long, and BPTT about 65 (200 epochs in 13 minutes);
with three runs sharing the two cores for part of the time, 1000 epochs of BPTT took 94 minutes and
of TBPTT(10) 59.
On an NVIDIA H200 (``--device cuda``) three methods running side by side
managed 2.4 epochs per second each (about 7 minutes per method for 1000 epochs), seven side by side
0.8. docs/results.md lists the runs behind it (CPU, and GPU runs stopped by ``--time-limit``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    METHODS,
    Diverged,
    SavedBytes,
    backward_method,
    backward_through,
    check_forward,
    check_grads,
    finite_loss,
    finite_or_null,
    legend,
    load_idx_dir,
    read_idx,  # noqa: F401 - part of this script's interface (the tests use it)
    report_outcomes,
)

HERE = Path(__file__).resolve().parent
DATA_FILE = HERE / "data" / "fashion_mnist_first10.npz"
SHIPPED_DATA = "examples/data/fashion_mnist_first10.npz"  # how metrics.json names the shipped file
N_VISIBLE = 784
QUICK_EPOCHS, QUICK_HIDDEN, QUICK_IMAGES, QUICK_GAIN, QUICK_LR, QUICK_UPDATES = 30, 128, 5, 4.0, 2e-4, 30
"""``--quick``'s setting: 30 epochs of the first five images, 128 hidden units, gain b = 4, Adam at 2e-4,
30 updates per forward pass.

The gain decides whether a short run can learn each image rather than their mean. At the paper's
b = 0.5 a clamped pixel of 0 or 1 feeds sigma(0) = 0.5 or sigma(0.5) = 0.62 to the network, a
contrast of 0.12; at b = 4, 0.5 or 0.98. With b = 0.5, 12 epochs of the ten images (Adam at 3e-5;
at 1e-3 the outputs overshoot) end at a recall error of 0.278, the recalled images all the mean of
the ten, and 1000 epochs of the paper's setting reach 0.288 (docs/results.md). With b = 4 and five
images, 30 epochs recall each image: every recalled image is nearest to its own stored image.
At b = 4 the state reaches its fixed point well within 30 updates. Against 50: original RBP,
Neumann-RBP and TBPTT end with the same recall errors to four digits, CG-RBP 0.003 lower, and BPTT,
whose backward pass through every update is the demo's largest cost, 0.0005 higher in about two
thirds of its time."""


# --- data ---------------------------------------------------------------------------------------
def first_of_each_class(images: np.ndarray, labels: np.ndarray, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The first image of each class 0..num_classes-1, binarised at > 0.5 after scaling to [0, 1].

    Returns ``(binary uint8 images (num_classes, rows, cols) of 0 and 1, their indices)``.
    """
    idx = []
    for c in range(num_classes):
        hits = np.flatnonzero(labels == c)
        if hits.size == 0:
            msg = f"no image of class {c}"
            raise ValueError(msg)
        idx.append(int(hits[0]))
    chosen = images[np.array(idx)].astype(np.float64) / 255.0
    return (chosen > 0.5).astype(np.uint8), np.array(idx, dtype=np.int64)


def write_data_file(idx_dir: str | Path, out: str | Path = DATA_FILE) -> Path:
    """Regenerate the shipped data file from an IDX directory (e.g. /usr/share/datasets/fashion-mnist)."""
    images, labels = load_idx_dir(idx_dir)
    binary, idx = first_of_each_class(images, labels)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out, bits=np.packbits(binary.reshape(len(binary), -1), axis=1), shape=np.array(binary.shape), index=idx
    )
    return out


def load_data_file(path: str | Path = DATA_FILE) -> np.ndarray:
    """The ten binary images, as uint8 (10, 28 * 28) of 0 and 1."""
    with np.load(path, allow_pickle=False) as z:
        n, rows, cols = (int(s) for s in z["shape"])
        return np.unpackbits(z["bits"], axis=1, count=rows * cols)[:n].astype(np.uint8)


def load_images(data_dir: str | Path | None) -> np.ndarray:
    """Binary images (10, 784): the shipped file, or the first of each class of ``data_dir``."""
    if data_dir is None:
        return load_data_file()
    images, labels = load_idx_dir(data_dir)
    binary, _ = first_of_each_class(images, labels)
    return binary.reshape(len(binary), -1)


def corrupt(images: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Set a random ``fraction`` of each image's non-zero pixels to zero."""
    out = images.copy()
    for row in out:
        nz = np.flatnonzero(row)
        off = rng.choice(nz, size=round(fraction * nz.size), replace=False)
        row[off] = 0
    return out


# --- the model ----------------------------------------------------------------------------------
def hopfield_update(W: Any, h: Any, a: float, b: float) -> Any:
    """One unclamped update ``(1 - a) h + W sigma(b h)`` of a state ``h`` (shape (n,))."""
    import torch

    return (1.0 - a) * h + W @ torch.sigmoid(b * h)


def hopfield_step(W: Any, h: Any, x: Any, a: float, b: float) -> Any:
    """``f(h) = clamp(update(h))``: the update, then the first ``len(x)`` (observed) units set to ``x``."""
    import torch

    u = hopfield_update(W, h, a, b)
    return torch.cat([x, u[x.shape[0] :]])


def hopfield_jvp(W: Any, h: Any, v: Any, a: float, b: float, n_clamped: int = 0) -> Any:
    """Hand-written forward-mode derivative ``J v`` of :func:`hopfield_step` at ``h``.

    ``d/dh [(1 - a) h + W sigma(b h)] v = (1 - a) v + W (b sigma'(b h) * v)`` with
    ``sigma' = sigma (1 - sigma)``: a diagonal term and a W term. The clamp makes the first
    ``n_clamped`` rows of J zero. (The paper's reference code got this derivative wrong.)
    """
    import torch

    s = torch.sigmoid(b * h)
    jv = (1.0 - a) * v + W @ (b * s * (1.0 - s) * v)
    if n_clamped:
        jv = torch.cat([torch.zeros_like(jv[:n_clamped]), jv[n_clamped:]])
    return jv


def make_model(n_hidden: int, seed: int, std: float = 1e-3, device: str = "cpu") -> tuple[Any, Any]:
    """``W0`` (a trainable parameter, N(0, std^2)) and the off-diagonal mask of a network with ``n_hidden`` units.

    The weights are drawn on the CPU, so every device starts from the same ``W0`` for a seed.
    """
    import torch

    n = 2 * N_VISIBLE + n_hidden
    gen = torch.Generator().manual_seed(seed)
    W0 = torch.nn.Parameter((std * torch.randn(n, n, generator=gen)).to(device))
    mask = 1.0 - torch.eye(n, device=device)
    return W0, mask


def symmetric_weight(W0: Any, mask: Any) -> Any:
    """``W = (W0 + W0^T) * (1 - I)``."""
    return (W0 + W0.T) * mask


# --- training -----------------------------------------------------------------------------------
@dataclass
class Settings:
    epochs: int = 1000
    truncation: int = 20
    seed: int = 0
    n_hidden: int = 1024
    n_images: int = 10
    updates: int = 50
    a: float = 1.0
    b: float = 0.5
    lr: float = 1e-3
    time_limit: float | None = None  # seconds per method; training stops at the first epoch boundary past it
    divergence_factor: float | None = None  # of RBP's and Neumann-RBP's backward solves; None: the library's defaults
    on_diverged: str = "stop"  # a DIVERGED backward solve: "stop" the method, or "skip" that training step


@dataclass
class Result:
    method: str
    status: str = "ok"  # "ok", "diverged" or "error"
    diverged_epoch: int | None = None
    reason: str | None = None
    curve: list[float] = field(default_factory=list)
    test_error: float | None = None
    wall_s: float = 0.0
    saved_kb: float | None = None
    forward_steps: list[int] = field(default_factory=list)
    backward_statuses: dict[str, int] = field(default_factory=dict)
    forward_difference: list[float] = field(default_factory=list)
    term_growth: list[float] = field(default_factory=list)  # per epoch: the largest last/first residual ratio
    recalled: Any = None
    own_nearest: int | None = None  # recalled images nearer (L1) to their own stored image than to any other
    forward_summary: dict[str, Any] | None = None  # set by merge_runs: min/max/mean of forward_steps
    stopped_by_time_limit: bool = False
    skipped_steps: list[int] = field(default_factory=list)  # with on_diverged="skip": the epoch of each skipped step

    def to_json(self) -> dict[str, Any]:
        finite = [c for c in self.curve if math.isfinite(c)]
        return {
            "status": self.status,
            "epochs_completed": len(self.curve),
            "stopped_by_time_limit": self.stopped_by_time_limit,
            "diverged_epoch": self.diverged_epoch,
            "reason": self.reason,
            "final_train_loss": self.curve[-1] if self.curve else None,
            "best_train_loss": min(finite) if finite else None,
            "test_recall_error": self.test_error,
            "recalled_nearest_own_image": self.own_nearest,
            "wall_time_s": self.wall_s,
            "backward_saved_kb": self.saved_kb,
            "forward_updates": self.forward_summary
            or {
                "min": min(self.forward_steps, default=None),
                "max": max(self.forward_steps, default=None),
                "mean": float(np.mean(self.forward_steps)) if self.forward_steps else None,
            },
            "backward_statuses": self.backward_statuses,
            "train_curve": self.curve,
            "forward_difference_norms": self.forward_difference,
            "backward_term_growth": self.term_growth,
            "skipped_steps": self.skipped_steps,
        }


def _growth(sol: Any) -> float:
    """``||r_K|| / ||r_1||`` of a backward solve: above 1 when its terms (Neumann) or steps (RBP) grew."""
    r = sol.residual_norms
    return r[-1] / r[0] if len(r) >= 2 and r[0] > 0 else 0.0


def run_forward(W: Any, x: Any, n: int, s: Settings) -> tuple[Any, list[float]]:
    """50 plain updates without autograd, with the difference norms ||h_t - h_{t-1}||."""
    import torch

    h = torch.cat([x, x.new_zeros(n - x.shape[0])])
    norms = []
    with torch.no_grad():
        for _ in range(s.updates):
            new = hopfield_step(W, h, x, s.a, s.b)
            norms.append(float(torch.linalg.vector_norm(new - h)))
            h = new
    return h, norms


def backward_or_skip(loss: Any, info: Any, statuses: dict[str, int], on_diverged: str) -> bool:
    """:func:`backward_through`; with ``on_diverged="skip"``, True instead of :class:`Diverged` for a DIVERGED solve.

    The caller then skips that training step (its gradient is the partial sum of a diverging series).
    A non-finite solve, loss or gradient still stops the method.
    """
    import rbp_core

    try:
        backward_through(loss, info, statuses)
    except Diverged:
        if on_diverged == "skip" and any(sol.status is rbp_core.Status.DIVERGED for sol in info.backward):
            return True
        raise
    return False


def train_method(name: str, images: Any, corrupted: Any, s: Settings, progress: Callable[..., Any]) -> Result:
    import torch

    import rbp_core
    from rbp_core.backends.torch import fixed_point

    res = Result(name)
    torch.manual_seed(s.seed)
    W0, mask = make_model(s.n_hidden, s.seed, device=str(images.device))
    n = W0.shape[0]
    opt = torch.optim.Adam([W0], lr=s.lr, fused=True)  # one kernel per step: 4x faster than the loop on a CPU
    method = backward_method(name, s.truncation, divergence_factor=s.divergence_factor)
    forward = rbp_core.FixedPointIteration(rtol=0.0, max_iter=s.updates, divergence_factor=None)
    order_rng = np.random.default_rng(s.seed)
    start = time.perf_counter()
    current_epoch = 0
    epochs = progress(range(s.epochs), desc=f"{name:>11}", leave=False)
    try:
        for epoch in epochs:
            current_epoch = epoch
            total = 0.0
            growth = 0.0
            for i in order_rng.permutation(len(images)):
                x = images[i]
                h0 = torch.cat([x, x.new_zeros(n - x.shape[0])])
                W = symmetric_weight(W0, mask)
                meter = SavedBytes(exclude=(W,))
                with meter:
                    h, info = fixed_point(
                        lambda h, W=W, x=x: hopfield_step(W, h, x, s.a, s.b),
                        h0,
                        backward=method,
                        solver=forward,
                        throw=False,
                        on_backward_failure="ignore",
                    )
                    res.forward_steps.append(info.forward.num_steps)
                    check_forward(info)
                    loss = torch.nn.functional.l1_loss(h[n - N_VISIBLE :], x)
                    loss_value = finite_loss(loss)
                    opt.zero_grad()
                    skip = backward_or_skip(loss, info, res.backward_statuses, s.on_diverged)
                growth = max([growth, *(_growth(sol) for sol in info.backward)])
                res.saved_kb = max(res.saved_kb or 0.0, meter.total / 2**10)
                total += loss_value
                if skip:
                    res.skipped_steps.append(epoch + 1)
                    continue
                check_grads([W0])
                opt.step()
            res.curve.append(total / len(images))
            if info.backward:
                res.term_growth.append(growth)
            if hasattr(epochs, "set_postfix"):
                epochs.set_postfix(loss=f"{res.curve[-1]:.4f}")
            if s.time_limit is not None and time.perf_counter() - start > s.time_limit and epoch + 1 < s.epochs:
                res.stopped_by_time_limit = True
                break
    except Diverged as err:
        res.status, res.diverged_epoch, res.reason = "diverged", current_epoch + 1, str(err)
    except Exception as err:  # noqa: BLE001 - a bug: reported with its traceback, the script exits non-zero
        res.status, res.reason = "error", f"{type(err).__name__}: {err}"
        traceback.print_exc()
        if getattr(epochs, "close", None):
            epochs.close()
        res.wall_s = time.perf_counter() - start
        return res
    if getattr(epochs, "close", None):
        epochs.close()
    res.wall_s = time.perf_counter() - start
    with torch.no_grad():
        W = symmetric_weight(W0, mask)
        errors, recalled, diffs = [], [], []
        for x, xc in zip(images, corrupted, strict=True):
            h, _ = run_forward(W, xc, n, s)
            out = h[n - N_VISIBLE :]
            errors.append(float((out - x).abs().mean()))
            recalled.append(out.cpu().numpy().copy())
            diffs.append(run_forward(W, x, n, s)[1])
        res.test_error = float(np.mean(errors)) if all(math.isfinite(e) for e in errors) else math.nan
        res.recalled = np.array(recalled)
        res.own_nearest = own_nearest(res.recalled, images.cpu().numpy())
        res.forward_difference = [float(v) for v in np.mean(np.array(diffs), axis=0)]
    return res


def own_nearest(recalled: np.ndarray, images: np.ndarray) -> int | None:
    """How many of the recalled images are nearer (mean absolute difference) to their own stored image
    than to every other; None if a recalled image is not finite."""
    if not np.isfinite(recalled).all():
        return None
    distance = np.abs(recalled[:, None, :] - images[None, :, :]).mean(axis=-1)
    return int((distance.argmin(axis=1) == np.arange(len(images))).sum())


# --- output -------------------------------------------------------------------------------------
LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)))
MARKERS = ("o", "s", "^", "v", "x")


def plot(results: Sequence[Result], images: np.ndarray, corrupted: np.ndarray, out: Path) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # mpl.ticker below

    # One panel per method (the curves of methods that compute the same gradient lie on top of each
    # other): the method in colour with markers, the others in grey behind it.
    drawn = [r for r in results if r.curve]
    fig, axes = plt.subplots(1, max(len(drawn), 1), figsize=(2.6 * max(len(drawn), 1), 3.2), sharey=True, squeeze=False)
    for k, (r, ax) in enumerate(zip(drawn, axes[0], strict=False)):
        for other in drawn:
            if other is not r:
                ax.plot(np.arange(1, len(other.curve) + 1), other.curve, color="0.8", lw=1)
        ax.plot(np.arange(1, len(r.curve) + 1), r.curve, color=f"C{k}", marker="o", ms=3, lw=1.5)
        ax.set_title(r.method + (" (diverged)" if r.status == "diverged" else ""), fontsize=9)
        ax.set(xlabel="epoch", yscale="log")
        ax.yaxis.set_major_formatter(mpl.ticker.FormatStrFormatter("%.3g"))  # plain numbers, not 3.4 x 10^-1
        ax.yaxis.set_minor_formatter(mpl.ticker.FormatStrFormatter("%.3g"))
    axes[0][0].set_ylabel("training L1 loss (lower is better)")
    fig.suptitle("Hopfield associative memory: training loss per method (others in grey)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, r in enumerate(results):
        if r.forward_difference:
            ax.plot(
                np.arange(1, len(r.forward_difference) + 1),
                np.maximum(r.forward_difference, 1e-30),
                label=r.method,
                linestyle=LINE_STYLES[k % len(LINE_STYLES)],
                marker=MARKERS[k % len(MARKERS)],
                markevery=(k, 7),
                ms=4,
            )
    ax.set(
        xlabel="update t",
        ylabel=r"$\|h_t - h_{t-1}\|$ (mean over images)",
        yscale="log",
        title="forward difference norm",
    )
    legend(ax)
    fig.tight_layout()
    fig.savefig(out / "forward_difference.png", dpi=100)
    plt.close(fig)

    rows = [("clean", images), ("corrupted", corrupted)] + [
        (r.method, r.recalled) for r in results if r.recalled is not None
    ]
    fig, axes = plt.subplots(len(rows), len(images), figsize=(len(images), len(rows) + 0.3), squeeze=False)
    for (label, imgs), line in zip(rows, axes, strict=True):
        for img, ax in zip(imgs, line, strict=True):
            ax.imshow(
                np.clip(np.nan_to_num(np.asarray(img, dtype=float)), 0, 1).reshape(28, 28), cmap="gray", vmin=0, vmax=1
            )
            ax.set_xticks([])
            ax.set_yticks([])
        line[0].set_ylabel(label, fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "recall.png", dpi=100)
    plt.close(fig)


def progress_line(r: Result, epochs: int) -> str:
    """One line per method as it finishes (also when the output is not a terminal)."""
    loss = f"loss {r.curve[-1]:.4f}" if r.curve else "no epoch completed"
    status = r.status if r.status != "diverged" else f"diverged at epoch {r.diverged_epoch}"
    return f"{r.method:>11}: {status}, {len(r.curve)}/{epochs} epochs, {loss}, {r.wall_s:.1f} s"


def table(results: Sequence[Result], zeros: float | None) -> str:
    """The methods side by side, a baseline (an all-zeros output), what the columns mean, and a conclusion."""

    def fmt(v: float | None, spec: str = ".4f") -> str:
        return "-" if v is None else format(v, spec)

    header = (
        f"{'method':<12} {'status':<14} {'final loss':>10} {'best loss':>10} {'recall err':>10} {'own image':>9} "
        f"{'time s':>8} {'saved KiB':>9}"
    )
    lines = [header]
    own = "-" if not results or results[0].recalled is None else f"/{len(results[0].recalled)}"
    for r in results:
        d = r.to_json()
        status = r.status if r.status != "diverged" else f"diverged@{r.diverged_epoch}"
        if r.stopped_by_time_limit:
            status += f" (t@{len(r.curve)})"
        if r.skipped_steps:
            status += f" ({len(r.skipped_steps)} skipped)"
        lines.append(
            f"{r.method:<12} {status:<14} {fmt(d['final_train_loss']):>10} {fmt(d['best_train_loss']):>10} "
            f"{fmt(d['test_recall_error']):>10} {'-' if r.own_nearest is None else f'{r.own_nearest}{own}':>9} "
            f"{r.wall_s:>8.1f} {fmt(r.saved_kb, '.1f'):>9}"
        )
    if zeros is not None:
        lines.append(
            f"{'all zeros':<12} {'baseline':<14} {'-':>10} {'-':>10} {zeros:>10.4f} {'-':>9} {'-':>8} {'-':>9}"
        )
    lines += [
        "loss, recall err: mean absolute error per pixel (0 to 1), lower is better; recall err: on the images with half their pixels off;",
        "own image: recalled images nearer to their own stored image than to any other, higher is better;",
        "saved KiB: what autograd saves for the backward pass of one training step, W aside; lower is better.",
    ]
    conclusion = _conclusion(results, zeros)
    if conclusion:
        lines.append(conclusion)
    return "\n".join(lines)


def _conclusion(results: Sequence[Result], zeros: float | None) -> str:
    """One line: how the RBP methods compare with BPTT in recall error and saved memory."""
    ok = [r for r in results if r.status == "ok" and r.test_error is not None and r.saved_kb]
    bptt = next((r for r in ok if r.method == "BPTT"), None)
    rbp = [r for r in ok if r.method in ("RBP", "CG-RBP", "Neumann-RBP")]
    if bptt is None or not rbp or not bptt.saved_kb or bptt.test_error is None:
        return ""
    errors = [r.test_error for r in rbp if r.test_error is not None]
    ratios = [bptt.saved_kb / r.saved_kb for r in rbp if r.saved_kb]
    span = (
        f"{min(errors):.4f}"
        if f"{min(errors):.4f}" == f"{max(errors):.4f}"
        else f"{min(errors):.4f} to {max(errors):.4f}"
    )
    vs_zeros = f"; an all-zeros output scores {zeros:.4f}" if zeros else ""
    return (
        f"=> {', '.join(r.method for r in rbp)}: recall error {span} against BPTT's {bptt.test_error:.4f}{vs_zeros}; "
        f"{min(ratios):.0f} to {max(ratios):.0f}x less memory saved for backward than BPTT."
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a reduced run: {QUICK_EPOCHS} epochs, {QUICK_HIDDEN} hidden units, {QUICK_IMAGES} images, gain "
        f"{QUICK_GAIN:g}, learning rate {QUICK_LR:g}, {QUICK_UPDATES} updates",
    )
    p.add_argument("--out", type=Path, default=Path("hopfield-out"), help="output directory")
    p.add_argument(
        "--data", type=Path, default=None, help="an MNIST-format IDX directory (default: the shipped ten images)"
    )
    p.add_argument("--write-data", action="store_true", help="with --data: regenerate the shipped data file and exit")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (default 1000, --quick {QUICK_EPOCHS})")
    p.add_argument(
        "--truncation", type=int, default=20, help="T: backward steps of TBPTT/RBP/CG-RBP, terms of Neumann-RBP"
    )
    p.add_argument(
        "--updates", type=int, default=None, help=f"updates per forward pass (default 50, --quick {QUICK_UPDATES})"
    )
    p.add_argument("--hidden", type=int, default=None, help=f"hidden units (default 1024, --quick {QUICK_HIDDEN})")
    p.add_argument(
        "--images",
        type=int,
        default=None,
        help=f"how many of the ten images to use (default 10, --quick {QUICK_IMAGES})",
    )
    p.add_argument(
        "--gain",
        type=float,
        default=None,
        help=f"b, the gain of the sigmoid sigma(b h) (default 0.5, the paper's; --quick {QUICK_GAIN:g})",
    )
    p.add_argument(
        "--lr", type=float, default=None, help=f"Adam's learning rate (default 1e-3, the paper's; --quick {QUICK_LR:g})"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch's intra-op threads (default 1: the steps are small matrix-vector products, which more "
        "threads slow down on shared cores; 0 keeps torch's default)",
    )
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="S",
        help="stop each method's training at the first epoch boundary after S seconds (recorded in metrics.json)",
    )
    p.add_argument(
        "--divergence-factor",
        type=float,
        default=None,
        metavar="F",
        help="RBP and Neumann-RBP: a backward solve whose norm grows past F times its smallest is "
        "DIVERGED (default: the library's, 1e4 for original RBP and 10 for Neumann-RBP)",
    )
    p.add_argument(
        "--on-diverged",
        choices=("stop", "skip"),
        default="stop",
        help="a backward solve reported DIVERGED stops the method (default; a result) or skips that training "
        "step (counted in metrics.json as skipped_steps)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        metavar="DIR",
        help="combine the outputs of runs of single methods (same settings otherwise) into --out, and exit",
    )
    return p.parse_args(argv)


def write_outputs(
    metrics: dict[str, Any], results: Sequence[Result], binary: np.ndarray, corrupted: np.ndarray, out: Path
) -> None:
    """metrics.json, the plots, and recalled.npz (the images, for :func:`merge_runs`)."""
    (out / "metrics.json").write_text(json.dumps(finite_or_null(metrics), indent=1, allow_nan=False))
    arrays = {f"recalled_{r.method}": r.recalled for r in results if r.recalled is not None}
    np.savez_compressed(out / "recalled.npz", clean=binary, corrupted=corrupted, **arrays)
    plot(results, binary, corrupted, out)


def _comparable_settings(run: dict[str, Any]) -> dict[str, Any]:
    """The settings that runs must share to be merged, truncation aside (see :func:`merge_runs`).

    Keys that a run's script predates take their defaults; the time limit is per method (each method
    records whether it stopped it); the shipped data file counts as one whatever the checkout's path.
    """
    s = {**Settings().__dict__, **run["settings"]}
    del s["time_limit"], s["truncation"]
    if str(s["data"]).replace("\\", "/").endswith(SHIPPED_DATA):
        s["data"] = SHIPPED_DATA
    return s


def merge_runs(dirs: Sequence[Path], out: Path) -> list[Result]:
    """Combine runs of single methods (e.g. run side by side) into one output, as one run would write it.

    The runs must have the same settings (:func:`_comparable_settings`) and, except runs of BPTT alone
    (BPTT does not use it), the same truncation. The merged metrics.json lists the methods in the usual
    order, records the sum of the runs' wall times, and in "merged_runs" each run's directory, methods,
    time limit and truncation.
    """
    runs = [json.loads((d / "metrics.json").read_text()) for d in dirs]
    comparable = [_comparable_settings(r) for r in runs]
    for d, c in zip(dirs, comparable, strict=True):
        differ = sorted(k for k in comparable[0].keys() | c.keys() if comparable[0].get(k) != c.get(k))
        if differ:
            detail = ", ".join(f"{k}: {c.get(k)!r} vs {comparable[0].get(k)!r}" for k in differ)
            msg = f"{d}: settings differ from those of {dirs[0]} ({detail})"
            raise ValueError(msg)
    truncations = {r["settings"]["truncation"] for r in runs if set(r["methods"]) - {"BPTT"}}
    if len(truncations) > 1:
        msg = f"the runs have different settings: truncations {sorted(truncations)}"
        raise ValueError(msg)
    limits = {r["settings"].get("time_limit") for r in runs}
    settings = {
        **comparable[0],
        "truncation": truncations.pop() if truncations else runs[0]["settings"]["truncation"],
        "time_limit": limits.pop() if len(limits) == 1 else "per run, see merged_runs",
    }
    results: dict[str, Result] = {}
    binary = corrupted = None
    for d, run in zip(dirs, runs, strict=True):
        with np.load(d / "recalled.npz") as z:
            binary, corrupted = z["clean"], z["corrupted"]
            recalled = {k.removeprefix("recalled_"): z[k] for k in z.files if k.startswith("recalled_")}
        for name, m in run["methods"].items():
            if name in results:
                msg = f"{name} appears in more than one run"
                raise ValueError(msg)
            fwd = m["forward_updates"]
            results[name] = Result(
                name,
                status=m["status"],
                diverged_epoch=m["diverged_epoch"],
                reason=m["reason"],
                curve=[math.nan if v is None else v for v in m["train_curve"]],
                test_error=m["test_recall_error"],
                own_nearest=m.get("recalled_nearest_own_image"),
                wall_s=m["wall_time_s"],
                saved_kb=m["backward_saved_kb"],
                forward_summary=fwd,
                stopped_by_time_limit=m.get("stopped_by_time_limit", False),
                backward_statuses=m["backward_statuses"],
                forward_difference=m["forward_difference_norms"],
                term_growth=m.get("backward_term_growth", []),
                skipped_steps=m.get("skipped_steps", []),
                recalled=recalled.get(name),
            )
    ordered = [results[m] for m in METHODS if m in results]
    assert binary is not None
    assert corrupted is not None
    out.mkdir(parents=True, exist_ok=True)
    metrics = {
        **{k: v for k, v in runs[0].items() if k not in ("methods", "total_wall_time_s", "settings")},
        "settings": settings,
        "merged_from": [str(d) for d in dirs],
        "merged_runs": [
            {
                "dir": str(d),
                "methods": list(r["methods"]),
                "time_limit": r["settings"].get("time_limit"),
                "truncation": r["settings"]["truncation"],
            }
            for d, r in zip(dirs, runs, strict=True)
        ],
        "total_wall_time_s": sum(r["total_wall_time_s"] for r in runs),
        "methods": {r.method: r.to_json() for r in ordered},
    }
    write_outputs(metrics, ordered, binary, corrupted, out)
    return ordered


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        merged = merge_runs(args.merge, Path(args.out))
        print(table(merged, zeros=None))
        return 0
    if args.write_data:
        if args.data is None:
            print("--write-data needs --data DIR", file=sys.stderr)
            return 2
        print(f"wrote {write_data_file(args.data)}")
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or args.truncation < 2:
        print(f"unknown methods {unknown} or truncation < 2", file=sys.stderr)
        return 2
    if args.updates is not None and args.updates < 1:
        print(f"--updates must be >= 1, got {args.updates}", file=sys.stderr)
        return 2
    if args.divergence_factor is not None and not args.divergence_factor > 1:
        print(f"--divergence-factor must be > 1, got {args.divergence_factor}", file=sys.stderr)
        return 2

    import torch
    from tqdm.auto import tqdm

    if args.threads < 0:
        print(f"--threads must be >= 0, got {args.threads}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Settings(
        epochs=args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else 1000),
        truncation=args.truncation,
        seed=args.seed,
        n_hidden=args.hidden if args.hidden is not None else (QUICK_HIDDEN if args.quick else 1024),
        n_images=args.images if args.images is not None else (QUICK_IMAGES if args.quick else 10),
        updates=args.updates if args.updates is not None else (QUICK_UPDATES if args.quick else 50),
        b=args.gain if args.gain is not None else (QUICK_GAIN if args.quick else 0.5),
        lr=args.lr if args.lr is not None else (QUICK_LR if args.quick else 1e-3),
        time_limit=args.time_limit,
        divergence_factor=args.divergence_factor,
        on_diverged=args.on_diverged,
    )
    binary = load_images(args.data)[: s.n_images]
    corrupted_np = corrupt(binary, 0.5, np.random.default_rng(s.seed + 1))
    images = torch.from_numpy(binary.astype(np.float32)).to(args.device)
    corrupted = torch.from_numpy(corrupted_np.astype(np.float32)).to(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def progress(it: Any, **kw: Any) -> Any:
        return tqdm(it, disable=None, **kw)

    start = time.perf_counter()
    results = []
    for m in methods:
        r = train_method(m, images, corrupted, s, progress)
        print(progress_line(r, s.epochs), flush=True)
        results.append(r)
    total = time.perf_counter() - start
    metrics = {
        "settings": {**s.__dict__, "quick": args.quick, "data": str(args.data) if args.data else SHIPPED_DATA},
        "memory_measure": "backward_saved_kb: KiB of the distinct storages that autograd saves for backward in "
        "one training step (torch.autograd.graph.saved_tensors_hooks; the largest over all steps), not counting the weight "
        "matrix W that every method saves once",
        "total_wall_time_s": total,
        "methods": {r.method: r.to_json() for r in results},
    }
    if args.device != "cpu":
        metrics["settings"]["device"] = args.device
    metrics["zeros_recall_error"] = float(binary.mean())
    write_outputs(metrics, results, binary, corrupted_np, out)
    print(table(results, zeros=float(binary.mean())))
    print(f"total {total:.1f} s; outputs in {out}")
    return report_outcomes(results, lambda r: f"epoch {r.diverged_epoch}")


if __name__ == "__main__":
    sys.exit(main())

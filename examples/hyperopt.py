"""Hyper-parameter optimisation through training: the five backward methods side by side.

The third experiment of Liao et al., "Reviving and Improving Recurrent Back-Propagation" (ICML 2018).
The "recurrent network" is one step of SGD with momentum on an MLP n_in-50-50-50-10 with tanh hidden
units (n_in = 64 for scikit-learn's 8x8 digits, the default; 784 for MNIST-format data, ``--data``).
Its state is (theta, m), the 8 weight and bias tensors and their momenta, and one step on a
mini-batch (x, y) is

    m' = beta m - (1 - beta) grad_theta l(theta; x, y),     theta' = theta + alpha m',

with l the cross-entropy (plus ``weight_decay/2 ||theta||^2``; 0 by default, as in the paper, whose
code used exp(-100)). The tuned hyper-parameters are a learning rate alpha = exp(a) and a momentum
beta = sigmoid(b) per tensor: 8 tensors, 16 hyper-parameters, started at a = -1 and b = 0 (alpha
0.368, beta 0.5, as in the paper's code, lrjconan/RBP config/hypergrad.yaml). The initial weights
and biases are N(0, 1) * exp(-3), drawn from ``--seed``.

Inner loop: ``--inner-steps N`` (100) steps from the same initial weights and zero momenta; steps
1..N-1 on mini-batches of 200 (reshuffled every epoch, the same order in every meta step and for
every method), step N on the full training set. Meta objective: cross-entropy of theta_N on the
validation split. Meta optimiser: Adam on (a, b), lr 0.05, multiplied by 0.1 after half of the meta
steps (at meta step 50 of the default 100). Truncation ``--truncation T`` (50).

How each method gets d(meta loss)/d(a, b):

- "BPTT": a plain differentiable unrolled loop in this script, every one of the N steps recorded
  (each inner gradient taken with ``create_graph=True``), then ``torch.autograd.grad``. The inner
  loop's map changes every step (another mini-batch), so rbp_core.backends.torch.BPTT, which unrolls
  one fixed map, does not apply.
- "TBPTT": the same loop with the first N - T steps under ``torch.no_grad()`` and the last T recorded
  (T terms of the back-propagated series).
- "RBP", "CG-RBP", "Neumann-RBP": as in the paper, the final training state is treated as an
  approximate fixed point of the last step's map f, the full-batch step. Steps 1..N-1 run without a
  graph; then ``rbp_core.backends.torch.fixed_point(f, h_{N-1}, backward=..., solver=
  FixedPointIteration(rtol=0.0, max_iter=1, divergence_factor=None), throw=False,
  on_backward_failure="ignore")``. Its forward solve is the one call h* = f(h_{N-1}) = h_N, the
  same final state as BPTT's (the reported meta loss is the validation loss at h*, for every method
  the loss of theta_N). The adapter returns f(h*), one more full-batch step, whose autograd graph
  reaches the hyper-parameters that f closes over (alpha and beta are computed from a and b before
  the call; the adapter needs no list of parameters: ordinary autograd through that one step
  carries the adjoint z to every tensor f uses); the gradient is that of the validation loss at
  f(h*), with the adjoint z = (I - J^T)^{-1} dL/dh solved at h* by
  rbp_core.OriginalRBP(max_iter=T), rbp_core.CGRBP(max_iter=T) or rbp_core.Neumann(steps=T - 1)
  (T - 1 VJPs give T series terms: the ``backward_method`` convention of examples/hopfield.py).
  The paper's code (which differentiates the full training loss, not a validation loss) linearises
  at h_{N-1} and differentiates the loss at h_N: the adapter's forward solve makes at least one call
  of f, so here the linearisation point is h_N and the output one step further (its validation loss
  differs from that at h_N by the last step's change). The adapter's original RBP starts from z = 0,
  so OriginalRBP(max_iter=T), unless its tolerance stops it early, sums the same T terms as
  Neumann(steps=T - 1): "RBP" and "Neumann-RBP" give the same hyper-gradients up to rounding (the
  paper's code started original RBP from a random z).
  f computes its inner gradient with ``torch.autograd.grad(loss, theta, create_graph=True)`` when
  theta requires grad (in the adapter's backward solve, where h* does), and on detached leaves
  otherwise (the forward solve, the attached step), so that step keeps no second-order graph.
- CG-RBP needs J v as well as J^T v. It uses the adapter's default ``jvp_mode="double-backward"``: the
  gradient of <J^T u, v> with respect to u, a third-order reverse pass through the SGD step
  (:func:`step_jvp` is the same product, checked against finite differences in the tests). The
  forward-mode alternative, ``jvp_mode="forward"`` (torch.func.jvp), fails on this f with a RuntimeError
  (``requires_grad_``/``torch.autograd.grad`` inside a functorch transform); a step written with
  ``torch.func.grad`` instead works with both modes (checked by hand: the same J v to 1e-10).

Beware what RBP computes here. The step's derivatives with respect to the hyper-parameters are
dm'/dbeta = m + grad, dtheta'/dbeta = alpha (m + grad) and dtheta'/dalpha = m'; at an exact fixed
point grad = 0 and m = 0, so all of them vanish: the implicit gradient of a learning rate or a
momentum is zero at a true fixed point, since the minimiser does not depend on them (the tests check
this on a strongly convex problem). The RBP methods give non-zero
hyper-gradients only because h_N is not a fixed point: the truncated series sum_t (J^T)^t g at h*
back-propagates through T copies of the last full-batch step instead of the N actual steps. The
relative residual ||f(h*) - h*|| / ||h*|| (all of (theta, m)) and the last step's change
||h_N - h_{N-1}|| / ||h_{N-1}|| say how far from a fixed point the inner loop ends; both are in
metrics.json (per meta step for the RBP methods, at the final hyper-parameters for every method).

Divergence: a non-finite meta loss or hyper-gradient, a non-finite forward state, or a backward solve
whose status is DIVERGED or NONFINITE (the adapter raises FloatingPointError for the latter) is a
*result*: the method is recorded as diverged at that (1-based) meta step, its curve ends with the last
completed step, and the other methods go on. A truncated RBP or CG-RBP solve that ends at its budget
(MAX_STEPS) is expected and counted in "backward_statuses". Any other exception is a bug: the script
reports it and exits with status 1.

Float32 throughout. main() runs torch on one intra-op thread (``--threads``) with denormal numbers
flushed to zero: denormals deep in BPTT's backward pass made it up to 100 times slower on CPU, and the
flush applies to the calling thread only.

Memory: "backward_saved_kb" is the size (KiB) of the distinct tensors that autograd saves for backward
during one meta step (the forward graph of the inner loop and the meta loss, plus the one-step graphs
that the RBP methods record inside their backward solve), counted with
torch.autograd.graph.saved_tensors_hooks (_common.SavedBytes) in every meta step (the largest is
reported), leaving out the data tensors (training set, mini-batches, validation set) that every method
reads. It is the part of memory that grows with the recorded steps (BPTT: N, TBPTT: T) and stays at
about one full-batch step (two for CG-RBP's double-backward products) for the RBP methods; it is not
the process RSS.

Outputs in ``--out DIR``: metrics.json (settings; per method: status, initial/final/best meta loss,
validation and test loss/accuracy of the network trained with the final hyper-parameters, the final
alpha and beta per tensor, wall time, backward_saved_kb, the meta-loss curve (entry k: the meta loss
after k meta updates, the last from the final evaluation) with the cumulative wall time of each
entry, backward-solve statuses, fixed-point residuals), meta_loss.png (against meta steps) and
meta_loss_time.png (against wall time); a table of the methods is printed at the end.

Run: ``python examples/hyperopt.py [--quick] [--out DIR] [--data DIR] [--meta-steps N] [--inner-steps N]
[--truncation T] [--methods ...] [--seed S]`` (more: ``--help``). Digits split 1000/397/400
(train/validation/test) by ``--seed``; with ``--data DIR`` 5000 training and 1000 validation images
from the IDX training split and the t10k split as test set (or 1000 more held-out training images when
there is none). ``--quick``: 20 meta steps of 50 inner steps, truncation 20; about 15 s for all five
methods (20 s with start-up) on 2 shared CPU cores. The default (the paper's settings on digits: 100
meta steps of 100 inner steps, truncation 50) took 2.4 minutes on 2 shared CPU cores (BPTT 28 s,
TBPTT 16 s, RBP 25 s, CG-RBP 44 s, Neumann-RBP 24 s). With ``--data`` (5000 training images of 784
pixels) 2 meta steps of all five methods took 15 s on random MNIST-shaped images, so the default run
there should take about 10 minutes (RBP and Neumann-RBP about 2.5 each, CG-RBP about 4.5).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    METHODS,
    Diverged,
    SavedBytes,
    backward_method,
    divergence_is_a_result,
    finite_or_null,
    format_table,
    legend,
    load_idx_dir,
    parse_methods,
    progress,
    report_outcomes,
)

RBP_METHODS = ("RBP", "CG-RBP", "Neumann-RBP")
N_CLASSES = 10


# --- settings -----------------------------------------------------------------------------------
@dataclass
class Settings:
    meta_steps: int = 100
    inner_steps: int = 100
    truncation: int = 50
    batch_size: int = 200
    hidden: tuple[int, ...] = (50, 50, 50)
    meta_lr: float = 0.05
    meta_lr_decay: float = 0.1  # multiplies the meta lr from meta step decay_at on
    init_log_lr: float = -1.0
    init_logit_momentum: float = 0.0
    init_scale: float = math.exp(-3.0)
    weight_decay: float = 0.0
    seed: int = 0
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None

    @property
    def decay_at(self) -> int:
        """The 0-based meta step from which the meta lr is decayed: half of the meta steps (50 of 100)."""
        return max(self.meta_steps // 2, 1)


# --- data ---------------------------------------------------------------------------------------
DIGITS_SPLIT = (1000, 397, 400)
IDX_SPLIT = (5000, 1000, 1000)


def _split(n: int, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Disjoint index sets of the given sizes from a permutation of range(n) drawn from ``seed``."""
    if sum(sizes) > n:
        msg = f"cannot take {list(sizes)} (sum {sum(sizes)}) from {n} samples"
        raise ValueError(msg)
    perm = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for k in sizes:
        out.append(perm[start : start + k])
        start += k
    return out


def load_digits_arrays(seed: int, sizes: Sequence[int | None] = (None, None, None)) -> dict[str, np.ndarray]:
    """scikit-learn's digits (1797 images 8x8), scaled to [0, 1], split train/val/test by ``seed``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    n_tr, n_va, n_te = (d if s is None else s for s, d in zip(sizes, DIGITS_SPLIT, strict=True))
    tr, va, te = _split(len(x), (n_tr, n_va, n_te), seed)
    return {"x_train": x[tr], "y_train": y[tr], "x_val": x[va], "y_val": y[va], "x_test": x[te], "y_test": y[te]}


def load_idx_arrays(
    directory: str | Path, seed: int, sizes: Sequence[int | None] = (None, None, None)
) -> dict[str, np.ndarray]:
    """An MNIST-format IDX directory: training and validation images from the training split (disjoint,
    chosen by ``seed``), test images from the t10k split if present (its first ``n_test``, default all),
    else held-out training images. Pixels scaled to [0, 1] and flattened. The defaults (5000, 1000, 1000)
    shrink for small files: validation and held-out test at most 1/6 of the training split each."""
    images, labels = load_idx_dir(directory, "train")
    x = images.reshape(len(images), -1).astype(np.float32) / 255.0
    y = labels.astype(np.int64)
    has_t10k = any((Path(directory) / f"t10k-images-idx3-ubyte{gz}").is_file() for gz in ("", ".gz"))
    n_va = min(IDX_SPLIT[1], len(x) // 6) if sizes[1] is None else sizes[1]
    n_held = 0 if has_t10k else (min(IDX_SPLIT[2], len(x) // 6) if sizes[2] is None else sizes[2])
    n_tr = min(IDX_SPLIT[0], len(x) - n_va - n_held) if sizes[0] is None else sizes[0]
    if has_t10k:
        tr, va = _split(len(x), (n_tr, n_va), seed)
        test_images, test_labels = load_idx_dir(directory, "t10k")
        n_te = len(test_images) if sizes[2] is None else min(sizes[2], len(test_images))
        x_te = test_images[:n_te].reshape(n_te, -1).astype(np.float32) / 255.0
        y_te = test_labels[:n_te].astype(np.int64)
        if x_te.shape[1] != x.shape[1]:
            msg = f"{directory}: t10k images have {x_te.shape[1]} pixels, train images {x.shape[1]}"
            raise ValueError(msg)
    else:
        tr, va, te = _split(len(x), (n_tr, n_va, n_held), seed)
        x_te, y_te = x[te], y[te]
    return {"x_train": x[tr], "y_train": y[tr], "x_val": x[va], "y_val": y[va], "x_test": x_te, "y_test": y_te}


def minibatch_schedule(n_train: int, batch_size: int, steps: int, seed: int) -> list[np.ndarray]:
    """Index arrays of the ``steps - 1`` mini-batch steps (the last step uses the full training set),
    reshuffled every epoch from ``seed``; the last batch of an epoch may be smaller."""
    batch_size = min(batch_size, n_train)
    per_epoch = math.ceil(n_train / batch_size)
    rng = np.random.default_rng(seed + 1)
    out: list[np.ndarray] = []
    perm = np.arange(n_train)
    for i in range(steps - 1):
        if i % per_epoch == 0:
            perm = rng.permutation(n_train)
        start = (i % per_epoch) * batch_size
        out.append(perm[start : start + batch_size])
    return out


@dataclass
class Problem:
    """Tensors of one experiment: data, the N batches of the inner loop (the last is the full training
    set), the initial weights and the layer sizes."""

    x_train: Any
    y_train: Any
    x_val: Any
    y_val: Any
    x_test: Any
    y_test: Any
    batches: list[tuple[Any, Any]]
    theta0: list[Any]
    sizes: list[int]
    weight_decay: float = 0.0

    def data_tensors(self) -> list[Any]:
        return [self.x_train, self.y_train, self.x_val, self.y_val, *(t for b in self.batches for t in b)]


def make_problem(arrays: dict[str, np.ndarray], s: Settings, dtype: Any = None) -> Problem:
    import torch

    dtype = torch.float32 if dtype is None else dtype
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    x_train, y_train = t["x_train"].to(dtype), t["y_train"]
    schedule = minibatch_schedule(len(x_train), s.batch_size, s.inner_steps, s.seed)
    batches = [(x_train[idx], y_train[idx]) for idx in (torch.from_numpy(i) for i in schedule)]
    batches.append((x_train, y_train))
    sizes = [x_train.shape[1], *s.hidden, N_CLASSES]
    return Problem(
        x_train=x_train,
        y_train=y_train,
        x_val=t["x_val"].to(dtype),
        y_val=t["y_val"],
        x_test=t["x_test"].to(dtype),
        y_test=t["y_test"],
        batches=batches,
        theta0=init_params(sizes, s.seed, s.init_scale, dtype),
        sizes=sizes,
        weight_decay=s.weight_decay,
    )


# --- the model and one SGD-with-momentum step ---------------------------------------------------
def init_params(sizes: Sequence[int], seed: int, scale: float, dtype: Any) -> list[Any]:
    """Weights (in, out) and biases (out,) of each layer, N(0, 1) * scale."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    theta = []
    for a, b in itertools.pairwise(sizes):
        theta.append(scale * torch.randn(a, b, generator=gen, dtype=dtype))
        theta.append(scale * torch.randn(b, generator=gen, dtype=dtype))
    return theta


def tensor_names(n_tensors: int) -> list[str]:
    return [f"{kind}{i // 2 + 1}" for i, kind in zip(range(n_tensors), ("W", "b") * n_tensors, strict=False)]


def mlp(theta: Sequence[Any], x: Any) -> Any:
    """The logits of the MLP: tanh hidden layers, a linear output layer."""
    import torch

    h = x
    n_layers = len(theta) // 2
    for i in range(n_layers):
        h = h @ theta[2 * i] + theta[2 * i + 1]
        if i < n_layers - 1:
            h = torch.tanh(h)
    return h


def cross_entropy(theta: Sequence[Any], x: Any, y: Any) -> Any:
    import torch

    return torch.nn.functional.cross_entropy(mlp(theta, x), y)


def inner_loss(theta: Sequence[Any], x: Any, y: Any, weight_decay: float = 0.0) -> Any:
    loss = cross_entropy(theta, x, y)
    if weight_decay:
        loss = loss + 0.5 * weight_decay * sum((t * t).sum() for t in theta)
    return loss


def inner_gradient(theta: Sequence[Any], x: Any, y: Any, weight_decay: float = 0.0) -> list[Any]:
    """grad_theta l: differentiable (``create_graph=True``) when theta requires grad under grad mode,
    otherwise computed on detached leaves and returned detached (no graph is kept)."""
    import torch

    if torch.is_grad_enabled() and any(t.requires_grad for t in theta):
        return list(torch.autograd.grad(inner_loss(theta, x, y, weight_decay), list(theta), create_graph=True))
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in theta]
        grads = torch.autograd.grad(inner_loss(leaves, x, y, weight_decay), leaves)
    return [g.detach() for g in grads]


def sgd_momentum_step(
    theta: Sequence[Any], m: Sequence[Any], x: Any, y: Any, alpha: Any, beta: Any, weight_decay: float = 0.0
) -> tuple[list[Any], list[Any]]:
    """``m' = beta m - (1 - beta) grad l(theta)``, ``theta' = theta + alpha m'`` with one alpha, beta per tensor."""
    grads = inner_gradient(theta, x, y, weight_decay)
    new_m = [beta[i] * m[i] - (1.0 - beta[i]) * g for i, g in enumerate(grads)]
    new_theta = [theta[i] + alpha[i] * new_m[i] for i in range(len(theta))]
    return new_theta, new_m


def hyper_values(raw_lr: Any, raw_mom: Any) -> tuple[Any, Any]:
    """alpha = exp(a), beta = sigmoid(b)."""
    import torch

    return torch.exp(raw_lr), torch.sigmoid(raw_mom)


def full_batch_map(problem: Problem, alpha: Any, beta: Any) -> Any:
    """The last step's map on the packed-as-tuple state ``(*theta, *m)``: the f of the RBP methods."""
    x, y = problem.batches[-1]
    n = len(problem.theta0)

    def f(state: tuple[Any, ...]) -> tuple[Any, ...]:
        theta, m = sgd_momentum_step(state[:n], state[n:], x, y, alpha, beta, problem.weight_decay)
        return (*theta, *m)

    return f


def step_jvp(f: Any, state: tuple[Any, ...], v: tuple[Any, ...]) -> tuple[Any, ...]:
    """``J v`` of a step ``f`` at ``state`` by double backward, the product CG-RBP gets from the adapter
    (``jvp_mode="double-backward"``): J^T u is linear in u, so the gradient of <J^T u, v> in u is J v."""
    import torch

    with torch.enable_grad():
        h_in = tuple(t.detach().requires_grad_() for t in state)
        out = f(h_in)
        u = tuple(torch.zeros_like(t, requires_grad=True) for t in out)
        jtu = torch.autograd.grad(out, h_in, u, create_graph=True)
        return tuple(torch.autograd.grad(jtu, u, v))


def unroll(
    problem: Problem,
    alpha: Any,
    beta: Any,
    steps: int | None = None,
    record_from: int = 0,
    theta: Sequence[Any] | None = None,
) -> tuple[list[Any], list[Any]]:
    """The first ``steps`` (default all) steps of the inner loop from theta0 and zero momenta; steps
    before ``record_from`` run under ``torch.no_grad()``, the others are recorded by autograd."""
    import torch

    theta = list(problem.theta0 if theta is None else theta)
    m = [torch.zeros_like(t) for t in theta]
    batches = problem.batches if steps is None else problem.batches[:steps]
    for i, (x, y) in enumerate(batches):
        if i < record_from:
            with torch.no_grad():
                theta, m = sgd_momentum_step(theta, m, x, y, alpha, beta, problem.weight_decay)
        else:
            theta, m = sgd_momentum_step(theta, m, x, y, alpha, beta, problem.weight_decay)
    return theta, m


def _flat(parts: Sequence[Any]) -> Any:
    import torch

    return torch.cat([p.detach().reshape(-1) for p in parts])


def _rel(a: Any, b: Any) -> float:
    import torch

    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# --- meta-gradients -----------------------------------------------------------------------------
@dataclass
class MetaStep:
    loss: float  # the validation loss of theta_N
    grads: tuple[Any, Any]  # d/da, d/db
    residual: float | None = None  # RBP methods: ||f(h*) - h*|| / ||h*||
    last_change: float | None = None  # RBP methods: ||h_N - h_{N-1}|| / ||h_{N-1}||


def _backward(loss: Any, raw: Sequence[Any]) -> tuple[Any, ...]:
    import torch

    with divergence_is_a_result():
        return tuple(torch.autograd.grad(loss, list(raw)))


def meta_gradient(
    name: str, problem: Problem, raw_lr: Any, raw_mom: Any, s: Settings, statuses: dict[str, int] | None = None
) -> MetaStep:
    """The meta loss (validation loss after the inner loop) and its gradient by method ``name``.

    ``statuses`` counts the backward solves' statuses (RBP methods), also when the solve diverges.
    Raises :class:`Diverged` for a non-finite loss, state or gradient or a diverged backward solve.
    """
    import torch

    import rbp_core
    from rbp_core.backends.torch import fixed_point

    alpha, beta = hyper_values(raw_lr, raw_mom)
    N, T = s.inner_steps, s.truncation
    if name in ("BPTT", "TBPTT"):
        record_from = 0 if name == "BPTT" else max(N - T, 0)
        theta, _ = unroll(problem, alpha, beta, record_from=record_from)
        loss = cross_entropy(theta, problem.x_val, problem.y_val)
        value = float(loss.detach())
        if not math.isfinite(value):
            msg = f"non-finite meta loss {value}"
            raise Diverged(msg)
        grads = _backward(loss, (raw_lr, raw_mom))
        return MetaStep(value, (grads[0], grads[1]))

    if name not in RBP_METHODS:
        msg = f"unknown method {name!r}"
        raise ValueError(msg)
    n = len(problem.theta0)
    with torch.no_grad():
        theta, m = unroll(problem, alpha, beta, steps=N - 1)
    start = (*theta, *m)
    out, info = fixed_point(
        full_batch_map(problem, alpha, beta),
        start,
        backward=backward_method(name, T),
        solver=rbp_core.FixedPointIteration(rtol=0.0, max_iter=1, divergence_factor=None),
        throw=False,
        on_backward_failure="ignore",
    )
    if info.forward.status is rbp_core.Status.NONFINITE:
        msg = f"forward solve: {info.forward.describe()}"
        raise Diverged(msg)
    h_star = info.forward.value  # packed: h_N = f(h_{N-1})
    with torch.no_grad():
        sizes = [t.numel() for t in start]
        theta_star = [p.reshape(t.shape) for p, t in zip(torch.split(h_star, sizes), start, strict=True)][:n]
        value = float(cross_entropy(theta_star, problem.x_val, problem.y_val))
        residual = _rel(_flat(out), h_star)
        last_change = info.forward.residual_norms[0] / float(torch.linalg.vector_norm(_flat(start)))
    loss = cross_entropy(out[:n], problem.x_val, problem.y_val)  # differentiated: at f(h*)
    if not (math.isfinite(value) and math.isfinite(float(loss.detach()))):
        msg = f"non-finite meta loss {value}"
        raise Diverged(msg)
    try:
        grads = _backward(loss, (raw_lr, raw_mom))
    finally:
        if statuses is not None:
            for sol in info.backward:
                statuses[sol.status.name] = statuses.get(sol.status.name, 0) + 1
    for sol in info.backward:
        if sol.status in (rbp_core.Status.DIVERGED, rbp_core.Status.NONFINITE):
            msg = f"backward solve: {sol.describe()}"
            raise Diverged(msg)
    return MetaStep(value, (grads[0], grads[1]), residual, last_change)


def evaluate(problem: Problem, raw_lr: Any, raw_mom: Any) -> dict[str, float]:
    """Train with the given hyper-parameters (no graph) and measure validation and test loss/accuracy and
    how far the final state is from a fixed point of the last (full-batch) step."""
    import torch

    with torch.no_grad():
        alpha, beta = hyper_values(raw_lr, raw_mom)
        theta_prev, m_prev = unroll(problem, alpha, beta, steps=len(problem.batches) - 1)
        x, y = problem.batches[-1]
        theta, m = sgd_momentum_step(theta_prev, m_prev, x, y, alpha, beta, problem.weight_decay)
        theta_next, m_next = sgd_momentum_step(theta, m, x, y, alpha, beta, problem.weight_decay)
        h_prev, h, h_next = _flat([*theta_prev, *m_prev]), _flat([*theta, *m]), _flat([*theta_next, *m_next])
        out: dict[str, float] = {}
        for split, xs, ys in (("val", problem.x_val, problem.y_val), ("test", problem.x_test, problem.y_test)):
            logits = mlp(theta, xs)
            out[f"{split}_loss"] = float(torch.nn.functional.cross_entropy(logits, ys))
            out[f"{split}_accuracy"] = float((logits.argmax(dim=1) == ys).double().mean())
        out["fixed_point_residual"] = _rel(h_next, h)
        out["last_step_change"] = _rel(h, h_prev)
    return out


# --- training -----------------------------------------------------------------------------------
@dataclass
class Result:
    method: str
    status: str = "ok"  # "ok", "diverged" or "error"
    diverged_meta_step: int | None = None
    reason: str | None = None
    curve: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    saved_kb: float | None = None
    backward_statuses: dict[str, int] = field(default_factory=dict)
    residuals: list[float] = field(default_factory=list)
    last_changes: list[float] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    hyper: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        finite = [c for c in self.curve if math.isfinite(c)]
        return {
            "status": self.status,
            "diverged_meta_step": self.diverged_meta_step,
            "reason": self.reason,
            "initial_meta_loss": self.curve[0] if self.curve else None,
            "final_meta_loss": self.curve[-1] if self.curve else None,
            "best_meta_loss": min(finite) if finite else None,
            "val_accuracy": self.final.get("val_accuracy"),
            "test_loss": self.final.get("test_loss"),
            "test_accuracy": self.final.get("test_accuracy"),
            "hyperparameters": self.hyper,
            "wall_time_s": self.wall_s,
            "backward_saved_kb": self.saved_kb,
            "backward_statuses": self.backward_statuses,
            "fixed_point_residual": self.final.get("fixed_point_residual"),
            "last_step_change": self.final.get("last_step_change"),
            "meta_loss_curve": self.curve,
            "cumulative_wall_time_s": self.times,
            "fixed_point_residual_per_meta_step": self.residuals,
            "last_step_change_per_meta_step": self.last_changes,
        }


def train_method(name: str, problem: Problem, s: Settings) -> Result:
    """Meta-train the 16 hyper-parameters with method ``name``; the curve has the meta loss after each
    number of meta updates (the last value from the final evaluation)."""
    import torch

    res = Result(name)
    dtype = problem.theta0[0].dtype
    n = len(problem.theta0)
    raw_lr = torch.full((n,), s.init_log_lr, dtype=dtype, requires_grad=True)
    raw_mom = torch.full((n,), s.init_logit_momentum, dtype=dtype, requires_grad=True)
    opt = torch.optim.Adam([raw_lr, raw_mom], lr=s.meta_lr)
    exclude = problem.data_tensors()
    start = time.perf_counter()
    step = 0
    bar = progress(range(s.meta_steps), desc=f"{name:>11}", leave=False)
    try:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = s.meta_lr * (s.meta_lr_decay if step >= s.decay_at else 1.0)
            meter = SavedBytes(exclude=exclude)
            with meter:
                ms = meta_gradient(name, problem, raw_lr, raw_mom, s, res.backward_statuses)
            res.saved_kb = max(res.saved_kb or 0.0, meter.total / 2**10)
            if not all(bool(torch.isfinite(g).all()) for g in ms.grads):
                msg = "non-finite hyper-gradient"
                raise Diverged(msg)
            res.curve.append(ms.loss)
            res.times.append(time.perf_counter() - start)
            if ms.residual is not None and ms.last_change is not None:
                res.residuals.append(ms.residual)
                res.last_changes.append(ms.last_change)
            opt.zero_grad()
            raw_lr.grad, raw_mom.grad = ms.grads[0].detach().clone(), ms.grads[1].detach().clone()
            opt.step()
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(meta_loss=f"{ms.loss:.4f}")
    except Diverged as err:
        res.status, res.diverged_meta_step, res.reason = "diverged", step + 1, str(err)
    except Exception as err:  # noqa: BLE001 - a bug: reported with its traceback, the script exits non-zero
        res.status, res.reason = "error", f"{type(err).__name__}: {err}"
        traceback.print_exc()
    finally:
        if getattr(bar, "close", None):
            bar.close()
    if res.status == "error":
        res.wall_s = time.perf_counter() - start
        return res
    res.final = evaluate(problem, raw_lr, raw_mom)
    if res.status == "ok":  # the loss after the last update
        res.curve.append(res.final["val_loss"])
        res.times.append(time.perf_counter() - start)
    res.wall_s = time.perf_counter() - start
    with torch.no_grad():
        alpha, beta = hyper_values(raw_lr, raw_mom)
        res.hyper = {
            tname: {"learning_rate": float(a), "momentum": float(b)}
            for tname, a, b in zip(tensor_names(n), alpha, beta, strict=True)
        }
    return res


# --- output -------------------------------------------------------------------------------------
def plot(results: Sequence[Result], out: Path) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    for fname, xlabel, use_time in (
        ("meta_loss.png", "meta step (hyper-parameter updates)", False),
        ("meta_loss_time.png", "wall time (s)", True),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in results:
            if r.curve:
                xs = r.times if use_time else np.arange(len(r.curve))
                label = r.method + (" (diverged)" if r.status == "diverged" else "")
                ax.plot(xs, r.curve, label=label, marker="." if len(r.curve) < 30 else None)
        ax.set(
            xlabel=xlabel,
            ylabel="meta loss (validation cross-entropy)",
            yscale="log",
            title="hyper-parameter optimisation",
        )
        legend(ax)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)


def table(results: Sequence[Result]) -> str:
    def fmt(v: float | None, spec: str = ".4f") -> str:
        return "-" if v is None or not math.isfinite(v) else format(v, spec)

    header = (
        "method",
        "status",
        "initial",
        "final",
        "best",
        "test loss",
        "test acc",
        "time s",
        "saved KiB",
        "fp resid",
    )
    rows = []
    for r in results:
        d = r.to_json()
        status = r.status if r.status != "diverged" else f"diverged@{r.diverged_meta_step}"
        rows.append(
            (
                r.method,
                status,
                fmt(d["initial_meta_loss"]),
                fmt(d["final_meta_loss"]),
                fmt(d["best_meta_loss"]),
                fmt(d["test_loss"]),
                fmt(d["test_accuracy"], ".3f"),
                f"{r.wall_s:.1f}",
                fmt(r.saved_kb, ".0f"),
                fmt(d["fixed_point_residual"], ".2e"),
            )
        )
    return format_table(header, rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a reduced run: 20 meta steps of 50 inner steps, truncation 20")
    p.add_argument("--out", type=Path, default=Path("hyperopt-out"), help="output directory")
    p.add_argument("--data", type=Path, default=None, help="an MNIST-format IDX directory (default: sklearn digits)")
    p.add_argument("--meta-steps", type=int, default=None, help="meta steps (default 100, --quick 20)")
    p.add_argument(
        "--inner-steps", type=int, default=None, help="SGD steps of the inner loop (default 100, --quick 50)"
    )
    p.add_argument("--truncation", type=int, default=None, help="T: TBPTT steps, RBP/CG-RBP iterations, Neumann terms")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--hidden", default="50,50,50", help="hidden layer sizes (default 50,50,50)")
    p.add_argument("--train-size", type=int, default=None, help="inner training set size (digits 1000, IDX 5000)")
    p.add_argument("--val-size", type=int, default=None, help="validation set size (digits 397, IDX 1000)")
    p.add_argument("--test-size", type=int, default=None, help="test set size (digits 400, IDX: t10k or 1000)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; see main())")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        methods = parse_methods(args.methods)
        hidden = tuple(int(h) for h in args.hidden.split(",") if h.strip())
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    s = Settings(
        meta_steps=args.meta_steps if args.meta_steps is not None else (20 if args.quick else 100),
        inner_steps=args.inner_steps if args.inner_steps is not None else (50 if args.quick else 100),
        truncation=args.truncation if args.truncation is not None else (20 if args.quick else 50),
        batch_size=args.batch_size,
        hidden=hidden,
        seed=args.seed,
        n_train=args.train_size,
        n_val=args.val_size,
        n_test=args.test_size,
    )
    if s.truncation < 2 or s.inner_steps < 1 or s.meta_steps < 1 or not hidden:
        print("need --truncation >= 2, --inner-steps >= 1, --meta-steps >= 1 and hidden layers", file=sys.stderr)
        return 2

    import torch

    sizes = (s.n_train, s.n_val, s.n_test)
    arrays = load_digits_arrays(s.seed, sizes) if args.data is None else load_idx_arrays(args.data, s.seed, sizes)
    problem = make_problem(arrays, s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # Denormal float32 numbers appear deep in BPTT's backward pass and made it up to 100 times slower on
    # CPU. Flushing them to zero (values below 1.2e-38; the hyper-gradients agreed to 5 digits) works on
    # the calling thread only, so the run uses one intra-op thread (--threads), which on these small
    # matrices is also faster than two.
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    flushed = torch.set_flush_denormal(True)
    start = time.perf_counter()
    try:
        results = [train_method(m, problem, s) for m in methods]
    finally:
        if flushed:
            torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    total = time.perf_counter() - start
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()}
    settings.update(
        quick=args.quick,
        data=str(args.data) if args.data else "sklearn.datasets.load_digits",
        layer_sizes=problem.sizes,
        n_train=len(problem.x_train),
        n_val=len(problem.x_val),
        n_test=len(problem.x_test),
        meta_lr_decay_at_step=s.decay_at,
        neumann_steps=s.truncation - 1,
        cg_rbp_jvp="double-backward (the adapter's default)",
    )
    metrics = {
        "settings": settings,
        "memory_measure": "backward_saved_kb: KiB of the distinct storages that autograd saves for backward in one "
        "meta step, forward and backward (torch.autograd.graph.saved_tensors_hooks; the largest over all meta steps), "
        "not counting the data tensors (training set, mini-batches, validation set) that every method reads",
        "total_wall_time_s": total,
        "methods": {r.method: r.to_json() for r in results},
    }
    (out / "metrics.json").write_text(json.dumps(finite_or_null(metrics), indent=1, allow_nan=False))
    plot(results, out)
    print(table(results))
    print(f"total {total:.1f} s; outputs in {out}")
    return report_outcomes(results, lambda r: f"meta step {r.diverged_meta_step}")


if __name__ == "__main__":
    sys.exit(main())

"""The PyTorch adapter against its baselines and peers: memory, backward time, gradient accuracy.

What is measured, and why
-------------------------
The paper's case for Neumann-RBP is that it costs the time of truncated BPTT
but the memory of one step of the network, whatever the truncation ``K`` or
the number of forward iterations ``T``; and that the implicit gradient it
computes is the one other implicit-differentiation libraries compute. This
script checks those claims on :func:`rbp_core.backends.torch.fixed_point`,
on one problem family: ``f(h) = tanh(h @ W^T + x)`` (plus a bias ``b`` in part
3), a contraction with ``||W||_2 = mu``.

1. Memory (CPU).
   Peak resident memory of one training step, forward then ``h.backward(g)``,
   on a float32 state of shape 512 x 1024 (``mu = 0.5``), for
   ``rbp_core.Neumann(steps=K)`` and ``TBPTT(steps=K)`` at K = 5, 20, 100 and
   for ``BPTT`` with exactly T = 10, 30, 60 forward iterations
   (``FixedPointIteration(rtol=0, max_iter=T)``, ``throw=False``). Reported per
   configuration: the forward peak, what the forward leaves held (the autograd
   graph), and the backward peak, all as RSS above the RSS just before the
   forward. The headline: Neumann's growth of the backward peak from K = 5 to
   K = 100 against TBPTT's over the same range (target: below 5 % of it), and
   BPTT's growth with T.

   How: every configuration runs in a fresh interpreter (this script with a
   hidden ``--memory-worker`` flag), so nothing from one configuration (cached
   allocator blocks, a grown heap) leaks into another. The worker sets glibc's
   ``MALLOC_MMAP_THRESHOLD_`` to a fixed 128 KiB, which also turns off glibc's
   dynamic threshold, so every tensor buffer larger than that is its own
   ``mmap`` and goes back to the OS when freed: the RSS then follows the live
   tensors instead of the heap's history. The high-water mark is read from
   ``VmHWM`` in ``/proc/self/status`` after resetting it to the current RSS by
   writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), once before the
   forward and once before the backward. Each worker first runs one step of
   the same kind with K (or T) at most 5, unmeasured (warm-up: thread pools,
   the kernels' buffers for these shapes), then measures ``--memory-repeats``
   steps (default 2) and reports the median and the spread. Where
   ``clear_refs`` cannot be written the script falls back to
   ``getrusage(RUSAGE_SELF).ru_maxrss`` (a high-water mark that cannot be
   reset): one fresh process per configuration and phase, no warm-up step, and
   the peak read as ``ru_maxrss`` after the phase minus the RSS before it (the
   output says which method ran).

2. Time of one Neumann backward pass against raw autograd VJPs.
   ``torch.autograd.grad(h, [W], g)`` through ``fixed_point(...,
   backward=Neumann(steps=K))`` (K = 20, float32 state 64 x 1024, where one VJP
   takes ~1-2 ms on 2 cores) against the same ``K`` VJPs written by hand:
   ``out = f(h_in)``; ``v = z = g``; K times ``v = autograd.grad(out, h_in, v,
   retain_graph=True)[0]; z = z + v``; then ``autograd.grad(out, [W], z)``.
   Both sides differentiate one step ``out = f(h_in)`` recorded before the
   timed region: the adapter records it at forward time (so that the backward
   differentiates ``f`` as it was evaluated then), and the hand-written side
   records its own once and retains it, as the adapter's is retained across the
   repeated backward passes.
   Paired ABBA timing as in ``bench_core.py`` (its :func:`paired_times` is
   reused): the headline is the median over repeats of the per-repeat ratio
   (target <= 1.05, printed as PASS/FAIL). As in ``bench_core.py``, a second,
   low-noise estimator times the state VJPs themselves on both sides (the
   adapter's through the method its backward hook calls, wrapped at run time)
   and reports the *bookkeeping ratio* ``(VJPs + rbp-core's time outside them)
   / (VJPs + the raw loop's time outside them)``, medians per call: the ratio
   without the VJPs' own jitter, informational. An informational second row times
   ``h.backward(g)`` instead of ``autograd.grad`` (the usual ``loss.backward()``
   of a training loop) against the hand loop finished by
   ``torch.autograd.backward(out, z, inputs=[W])`` (both sides with
   ``inputs=[W]``, so that both accumulate the same gradients).

3. Peers on one problem: float64 state 64 x 256, ``mu = 0.9``, parameters
   ``W`` (256 x 256) and ``b`` (256), loss gradient ``g`` fixed (random).
   The forward fixed point ``h*`` is computed once, with rbp-core's
   ``FixedPointIteration(rtol=1e-12)``, and every method starts its forward from
   it (each library's own forward then stops after a step or two), so all
   backward passes differentiate at the same point. The reference is the dense
   implicit gradient: ``J`` by :func:`torch.autograd.functional.jacobian`,
   ``z = solve(I - J^T, g)``, then the parameter VJP ``z^T dF/d(W, b)``. Row
   ``i`` of ``f(h)`` depends on row ``i`` of ``h`` only, so the Jacobian of the
   flattened map is block diagonal; the reference builds and solves the 64
   diagonal 256 x 256 blocks (the script checks on the first rows that the
   off-diagonal blocks of the full flattened Jacobian are exactly zero), which
   is the same dense solve as with the 16384 x 16384 matrix at 1/4096 of its
   cost. Per method: the median time of one backward pass (the forward is
   outside the timing; the graph is kept with ``retain_graph=True`` and the
   backward repeated, all methods interleaved round-robin), the numbers of
   products with ``J^T`` (and ``J``) where known, and the relative error of
   the parameter gradient against the reference. Methods: rbp-core
   ``OriginalRBP`` and ``CGRBP`` at relative tolerance 1e-8, ``Neumann`` with
   the ``K`` that the a-priori bound ``mu^(K+1) / (1 - mu) <= 1e-8`` certifies
   (and with the paper's K = 20, for contrast), TorchDEQ's implicit backward
   (fixed-point iteration) and TorchOpt's ``custom_root`` (normal-equation CG,
   and plain CG). A peer that is not installed or fails is reported with its
   exception, not allowed to stop the run. The tolerance each one applies is
   printed next to it: they are not the same quantity.

Run ``python benchmarks/bench_torch.py [--quick] [--json PATH]`` (``nox -s
bench`` runs it after ``bench_core.py``). The defaults take about two minutes
on 2 cores (the memory part, which runs the full 512 x 1024 problem nine times,
about half of that), longer when other processes compete for the cores. The
exit status is 0 unless something fails; targets are reported as PASS or FAIL,
not enforced.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import rbp_core
from rbp_core.backends.torch import BPTT, TBPTT, fixed_point

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import paired_times  # a sibling script, not a package

Tensor = torch.Tensor
SEED = 0
MEMORY_TARGET = 0.05
"""Neumann's growth of the backward peak from the smallest to the largest K, as a fraction of TBPTT's."""
TIME_TARGET = 1.05
"""Neumann backward over K hand-written autograd VJPs: median paired ratio."""
MIB = 1024.0 * 1024.0
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
"""A fixed mmap threshold: freed tensor buffers go back to the OS at once, so the RSS tracks live tensors."""


# =========================================================================== the problem


def scaled_matrix(n: int, mu: float, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    """An ``n x n`` Gaussian matrix scaled to spectral norm ``mu``."""
    A = torch.randn(n, n, generator=gen, dtype=dtype)
    scaled: Tensor = A * (mu / torch.linalg.matrix_norm(A, ord=2))
    return scaled


@dataclass
class TanhProblem:
    """``f(h) = tanh(h @ W^T + x)``: ``W`` requires grad, ``x`` is a fixed input, ``g`` a fixed cotangent."""

    W: Tensor
    x: Tensor
    g: Tensor

    def f(self, h: Tensor) -> Tensor:
        return torch.tanh(h @ self.W.T + self.x)

    def h0(self) -> Tensor:
        return torch.zeros_like(self.x)


def make_tanh_problem(batch: int, n: int, mu: float, dtype: torch.dtype) -> TanhProblem:
    gen = torch.Generator().manual_seed(SEED)
    W = scaled_matrix(n, mu, dtype, gen).requires_grad_()
    x = torch.randn(batch, n, generator=gen, dtype=dtype)
    g = torch.randn(batch, n, generator=gen, dtype=dtype)
    return TanhProblem(W=W, x=x, g=g)


# =========================================================================== helpers


def quartiles(xs: Sequence[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q3


def rel_error(got: Sequence[Tensor], want: Sequence[Tensor]) -> float:
    num = math.sqrt(sum(float(torch.sum((a.detach() - b) ** 2)) for a, b in zip(got, want, strict=True)))
    den = math.sqrt(sum(float(torch.sum(b**2)) for b in want))
    return num / den


def short(exc: BaseException, limit: int = 160) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def package_version(name: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python >= 3.8 has it
        return None
    try:
        return version(name)
    except PackageNotFoundError:
        return None


# =========================================================================== 1. memory


def _proc_status_kib(key: str) -> int:
    with Path("/proc/self/status").open(encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    msg = f"{key} not found in /proc/self/status"
    raise OSError(msg)


def rss_mib() -> float:
    """Current resident set size (``VmRSS``)."""
    return _proc_status_kib("VmRSS") / 1024.0


def hwm_mib() -> float:
    """High-water mark of the resident set size since the last reset (``VmHWM``)."""
    return _proc_status_kib("VmHWM") / 1024.0


def reset_hwm() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: write 5 to ``/proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5", encoding="ascii")


def maxrss_mib() -> float:
    """``ru_maxrss`` of this process: KiB on Linux, bytes on macOS."""
    raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return raw / MIB if sys.platform == "darwin" else raw / 1024.0


def clear_refs_works() -> tuple[bool, str]:
    """Whether ``VmHWM`` can be reset here: allocate 64 MiB, free it, reset, and look."""
    try:
        buf = torch.ones(16 * 1024 * 1024)  # 64 MiB
        float(buf[-1])
        del buf
        before = hwm_mib()
        reset_hwm()
        after = hwm_mib()
        now = rss_mib()
    except OSError as exc:
        return False, short(exc)
    if after <= now + 1.0 and before - after > 32.0:
        return True, "ok"
    return False, f"VmHWM {before:.0f} -> {after:.0f} MiB after the reset, RSS {now:.0f} MiB"


@dataclass(frozen=True)
class MemorySpec:
    """One memory configuration: ``kind`` in neumann, tbptt, bptt; ``k`` is K or T."""

    kind: str
    k: int
    batch: int
    n: int
    repeats: int
    method: str  # "clear_refs" or "ru_maxrss"
    phase: str = "both"  # ru_maxrss only: "forward" or "step"


def _memory_backward(spec: MemorySpec) -> tuple[Any, rbp_core.FixedPointIteration, bool]:
    if spec.kind == "neumann":
        return rbp_core.Neumann(steps=spec.k), rbp_core.FixedPointIteration(rtol=1e-5, max_iter=500), True
    if spec.kind == "tbptt":
        return TBPTT(steps=spec.k), rbp_core.FixedPointIteration(rtol=1e-5, max_iter=500), True
    if spec.kind == "bptt":
        # Exactly T forward iterations: tolerance 0 (never met unless a step is exactly zero), no divergence test.
        fwd = rbp_core.FixedPointIteration(rtol=0.0, max_iter=spec.k, divergence_factor=None)
        return BPTT(), fwd, False
    msg = f"unknown memory configuration {spec.kind!r}"
    raise ValueError(msg)


def memory_worker(spec: MemorySpec) -> dict[str, Any]:
    """Run in a fresh process: peak RSS of forward and backward for one configuration."""
    torch.manual_seed(SEED)
    problem = make_tanh_problem(spec.batch, spec.n, 0.5, torch.float32)
    backward, forward, throw = _memory_backward(spec)
    h0 = problem.h0()
    g = problem.g

    def run_forward() -> tuple[Tensor, Any]:
        h, info = fixed_point(problem.f, h0, backward=backward, solver=forward, throw=throw)
        assert isinstance(h, Tensor)
        return h, info

    def cleanup() -> None:
        problem.W.grad = None
        gc.collect()

    # Warm-up: one small step initialises the thread pool and the kernels without touching ru_maxrss much.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = make_tanh_problem(8, spec.n, 0.5, torch.float32)
        hs, _ = fixed_point(small.f, small.h0(), backward=rbp_core.Neumann(steps=2))
        assert isinstance(hs, Tensor)
        torch.autograd.backward(hs, small.g)
        del hs, small
    gc.collect()

    out: dict[str, Any] = {"spec": spec.__dict__}
    if spec.method == "ru_maxrss":
        base = rss_mib()
        peak_before = maxrss_mib()
        h, info = run_forward()
        fwd = maxrss_mib()
        retained = rss_mib() - base
        if spec.phase == "forward":
            out.update(forward_peak=[fwd - base], retained=[retained], valid=fwd > peak_before)
        else:
            torch.autograd.backward(h, g)
            step = maxrss_mib()
            out.update(backward_peak=[step - base], retained=[retained], valid=step > peak_before)
        out.update(forward_steps=info.forward.num_steps, forward_status=info.forward.status.name)
        return out

    # clear_refs: warm up with one full step of the same kind at K (or T) <= 5 (same shapes and kernels,
    # a fraction of the compute), then measure `repeats` steps.
    warm_backward, warm_forward, _ = _memory_backward(MemorySpec(spec.kind, min(spec.k, 5), 1, 1, 1, spec.method))
    hw, _ = fixed_point(problem.f, h0, backward=warm_backward, solver=warm_forward, throw=throw)
    assert isinstance(hw, Tensor)
    torch.autograd.backward(hw, g)
    del hw
    cleanup()
    forward_peak: list[float] = []
    retained_l: list[float] = []
    backward_peak: list[float] = []
    backward_extra: list[float] = []
    steps = -1
    status = ""
    for _ in range(spec.repeats):
        reset_hwm()
        base = rss_mib()
        h, info = run_forward()
        forward_peak.append(hwm_mib() - base)
        after_forward = rss_mib()
        retained_l.append(after_forward - base)
        reset_hwm()
        torch.autograd.backward(h, g)
        peak = hwm_mib()
        backward_peak.append(peak - base)
        backward_extra.append(peak - after_forward)
        steps, status = info.forward.num_steps, info.forward.status.name
        if spec.kind == "neumann":
            status += f", backward {info.backward[-1].num_vjp} VJP"
        del h, info
        cleanup()
    out.update(
        forward_peak=forward_peak,
        retained=retained_l,
        backward_peak=backward_peak,
        backward_extra=backward_extra,
        forward_steps=steps,
        forward_status=status,
        valid=True,
    )
    return out


def run_memory_worker(spec: MemorySpec) -> dict[str, Any]:
    """This script in a fresh interpreter, with the fixed mmap threshold; returns the worker's JSON."""
    env = dict(os.environ, **MALLOC_ENV)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", json.dumps(spec.__dict__)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    msg = f"memory worker {spec.kind} K={spec.k} failed (exit {proc.returncode}): {' | '.join(tail)}"
    raise RuntimeError(msg)


@dataclass
class MemoryRow:
    kind: str
    k: int
    forward_peak: float
    retained: float
    backward_peak: float
    backward_extra: float | None
    spread: float
    forward_steps: int
    forward_status: str

    @property
    def label(self) -> str:
        return {"neumann": "Neumann", "tbptt": "TBPTT", "bptt": "BPTT"}[self.kind]


def measure_memory(
    batch: int, n: int, ks: Sequence[int], ts: Sequence[int], repeats: int, method: str
) -> list[MemoryRow]:
    rows: list[MemoryRow] = []
    configs = [("neumann", k) for k in ks] + [("tbptt", k) for k in ks] + [("bptt", t) for t in ts]
    for kind, k in configs:
        if method == "clear_refs":
            res = run_memory_worker(MemorySpec(kind, k, batch, n, repeats, method))
            bwd = res["backward_peak"]
            rows.append(
                MemoryRow(
                    kind=kind,
                    k=k,
                    forward_peak=statistics.median(res["forward_peak"]),
                    retained=statistics.median(res["retained"]),
                    backward_peak=statistics.median(bwd),
                    backward_extra=statistics.median(res["backward_extra"]),
                    spread=max(bwd) - min(bwd),
                    forward_steps=res["forward_steps"],
                    forward_status=res["forward_status"],
                )
            )
        else:
            fwd = run_memory_worker(MemorySpec(kind, k, batch, n, 1, method, phase="forward"))
            step = run_memory_worker(MemorySpec(kind, k, batch, n, 1, method, phase="step"))
            status = fwd["forward_status"] + ("" if fwd["valid"] and step["valid"] else " (peak below setup peak!)")
            rows.append(
                MemoryRow(
                    kind=kind,
                    k=k,
                    forward_peak=fwd["forward_peak"][0],
                    retained=step["retained"][0],
                    backward_peak=step["backward_peak"][0],
                    backward_extra=None,
                    spread=math.nan,
                    forward_steps=fwd["forward_steps"],
                    forward_status=status,
                )
            )
    return rows


@dataclass
class MemorySummary:
    neumann_growth: float
    tbptt_growth: float
    ratio: float
    passed: bool
    bptt_growth: float
    k_range: tuple[int, int]
    t_range: tuple[int, int]
    rbp_forward_peak: float
    bptt_forward_peaks: dict[int, float]


def summarise_memory(rows: Sequence[MemoryRow]) -> MemorySummary:
    def by(kind: str) -> list[MemoryRow]:
        return sorted((r for r in rows if r.kind == kind), key=lambda r: r.k)

    neu, tb, bp = by("neumann"), by("tbptt"), by("bptt")
    neumann_growth = neu[-1].backward_peak - neu[0].backward_peak
    tbptt_growth = tb[-1].backward_peak - tb[0].backward_peak
    ratio = neumann_growth / tbptt_growth if tbptt_growth > 0 else math.inf
    return MemorySummary(
        neumann_growth=neumann_growth,
        tbptt_growth=tbptt_growth,
        ratio=ratio,
        passed=ratio < MEMORY_TARGET,
        bptt_growth=bp[-1].backward_peak - bp[0].backward_peak,
        k_range=(neu[0].k, neu[-1].k),
        t_range=(bp[0].k, bp[-1].k),
        rbp_forward_peak=max(r.forward_peak for r in neu),
        bptt_forward_peaks={r.k: r.forward_peak for r in bp},
    )


def format_memory(rows: Sequence[MemoryRow]) -> str:
    header = (
        f"{'method':<8} {'K or T':>6} {'fwd iters':>9} {'forward peak':>13} {'held after':>11} "
        f"{'backward peak':>14} {'backward adds':>14} {'spread':>7}"
    )
    sub = f"{'':<8} {'':>6} {'':>9} {'(MiB)':>13} {'fwd (MiB)':>11} {'(MiB)':>14} {'(MiB)':>14} {'(MiB)':>7}"
    lines = [header, sub, "-" * len(header)]
    for r in rows:
        extra = "-" if r.backward_extra is None else f"{r.backward_extra:.1f}"
        spread = "-" if math.isnan(r.spread) else f"{r.spread:.1f}"
        lines.append(
            f"{r.label:<8} {r.k:>6} {r.forward_steps:>9} {r.forward_peak:>13.1f} {r.retained:>11.1f} "
            f"{r.backward_peak:>14.1f} {extra:>14} {spread:>7}"
        )
    return "\n".join(lines)


# =========================================================================== 2. time


@dataclass
class TimeComparison:
    """Paired samples, seconds per call: in total, and inside the timed VJPs (empty when not measured)."""

    name: str
    candidate: tuple[float, ...]
    baseline: tuple[float, ...]
    number: int
    candidate_inside: tuple[float, ...] = ()
    baseline_inside: tuple[float, ...] = ()

    @property
    def ratios(self) -> list[float]:
        return [c / b for c, b in zip(self.candidate, self.baseline, strict=True)]

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def ratio_of_medians(self) -> float:
        return statistics.median(self.candidate) / statistics.median(self.baseline)

    @property
    def has_inside(self) -> bool:
        return bool(self.candidate_inside) and bool(self.baseline_inside)

    @property
    def vjp_time(self) -> float:
        """Median time inside the K state VJPs per call, over the samples of both sides."""
        return statistics.median(self.candidate_inside + self.baseline_inside)

    @property
    def candidate_outside(self) -> float:
        return statistics.median(a - i for a, i in zip(self.candidate, self.candidate_inside, strict=True))

    @property
    def baseline_outside(self) -> float:
        return statistics.median(a - i for a, i in zip(self.baseline, self.baseline_inside, strict=True))

    @property
    def bookkeeping_ratio(self) -> float:
        """``(VJPs + candidate outside) / (VJPs + baseline outside)``: the ratio without the VJPs' jitter."""
        cb = self.vjp_time
        return (cb + self.candidate_outside) / (cb + self.baseline_outside)

    def as_dict(self) -> dict[str, Any]:
        q1, q3 = quartiles(self.ratios)
        out: dict[str, Any] = {
            "name": self.name,
            "calls_per_sample": self.number,
            "median_candidate_s": statistics.median(self.candidate),
            "median_baseline_s": statistics.median(self.baseline),
            "median_paired_ratio": self.median_ratio,
            "paired_ratio_q1": q1,
            "paired_ratio_q3": q3,
            "ratio_of_medians": self.ratio_of_medians,
            "candidate_s": list(self.candidate),
            "baseline_s": list(self.baseline),
        }
        if self.has_inside:
            out.update(
                vjps_s=self.vjp_time,
                candidate_outside_s=self.candidate_outside,
                baseline_outside_s=self.baseline_outside,
                bookkeeping_ratio=self.bookkeeping_ratio,
                candidate_inside_s=list(self.candidate_inside),
                baseline_inside_s=list(self.baseline_inside),
            )
        return out


def calls_per_sample(fn: Callable[[], object], min_sample: float) -> int:
    t0 = time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    return max(1, math.ceil(min_sample / t)) if t > 0.0 else 100


class VJPClock:
    """Accumulates the time spent in the state VJPs, on both sides of a comparison alike.

    ``elapsed`` is what :func:`bench_core.paired_times` reads from its ``clocks``. The adapter's
    VJPs are timed by wrapping the method its backward hook calls (``_ImplicitHook._vjp``, looked
    up at run time and restored afterwards); where that method is not found, the comparison runs
    without this second estimator.
    """

    __slots__ = ("elapsed",)

    def __init__(self) -> None:
        self.elapsed = 0.0

    def timed(self, fn: Callable[..., Tensor], *args: Any) -> Tensor:
        t0 = time.perf_counter()
        out = fn(*args)
        self.elapsed += time.perf_counter() - t0
        return out


def _adapter_hook_class() -> Any:
    module = importlib.import_module("rbp_core.backends.torch")
    cls = getattr(module, "_ImplicitHook", None)
    return cls if cls is not None and callable(getattr(cls, "_vjp", None)) else None


def measure_time(
    batch: int, n: int, steps: int, *, repeats: int, warmup: int, min_sample: float
) -> tuple[list[TimeComparison], dict[str, Any]]:
    """Neumann(K) through the adapter against K raw autograd VJPs, paired ABBA."""
    problem = make_tanh_problem(batch, n, 0.5, torch.float32)
    W, g = problem.W, problem.g
    h, info = fixed_point(
        problem.f,
        problem.h0(),
        backward=rbp_core.Neumann(steps=steps),
        solver=rbp_core.FixedPointIteration(rtol=1e-6, max_iter=500),
    )
    assert isinstance(h, Tensor)
    h_star = info.forward.value.detach()
    clock = VJPClock()

    def record() -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            h_in = h_star.clone().requires_grad_()
            return h_in, problem.f(h_in)

    def raw_vjps(h_in: Tensor, out: Tensor) -> Tensor:
        def raw_vjp(v: Tensor) -> Tensor:
            grad: Tensor = torch.autograd.grad(out, h_in, v, retain_graph=True)[0]
            return grad

        v = g
        z = g
        for _ in range(steps):
            v = clock.timed(raw_vjp, v)
            z = z + v
        return z

    def candidate() -> object:
        grads = torch.autograd.grad(h, [W], g, retain_graph=True)
        info.backward.clear()  # keep the record list from growing over thousands of passes
        return grads

    h_in0, out0 = record()  # the baseline's recorded step, retained like the adapter's

    def baseline() -> object:
        return torch.autograd.grad(out0, [W], raw_vjps(h_in0, out0), retain_graph=True)

    def candidate_backward() -> object:
        torch.autograd.backward(h, g, retain_graph=True, inputs=[W])
        W.grad = None
        info.backward.clear()
        return None

    def baseline_backward() -> object:
        torch.autograd.backward(out0, raw_vjps(h_in0, out0), retain_graph=True, inputs=[W])
        W.grad = None
        return None

    # Check first: same gradient, K VJPs.
    (got,) = torch.autograd.grad(h, [W], g, retain_graph=True)
    sol = info.backward[-1]
    (want,) = torch.autograd.grad(out0, [W], raw_vjps(h_in0, out0), retain_graph=True)
    err = rel_error([got], [want])
    if sol.num_vjp != steps or err > 1e-4:
        msg = f"Neumann and the raw VJP loop disagree: {sol.num_vjp} VJPs (want {steps}), relative difference {err:.2e}"
        raise RuntimeError(msg)
    info.backward.clear()

    # One VJP on its own, for scale.
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        torch.autograd.grad(out0, h_in0, g, retain_graph=True)
    vjp_ms = 1e3 * (time.perf_counter() - t0) / reps

    hook_cls = _adapter_hook_class()
    original_vjp: Any = hook_cls._vjp if hook_cls is not None else None
    clocks: Sequence[Any] = (clock,) if hook_cls is not None else ()
    comparisons: list[TimeComparison] = []

    def timed_vjp(self: Any, v: Tensor) -> Tensor:
        return clock.timed(original_vjp, self, v)

    try:
        if hook_cls is not None:
            hook_cls._vjp = timed_vjp
        for name, cand, base, reps_here in (
            ("autograd.grad(h, [W], g)", candidate, baseline, repeats),
            ("h.backward(g) [info]", candidate_backward, baseline_backward, max(5, repeats // 2)),
        ):
            number = calls_per_sample(base, min_sample)
            times = paired_times(cand, base, clocks, repeats=reps_here, warmup=warmup, number=number)
            comparisons.append(
                TimeComparison(
                    name,
                    times.candidate_total,
                    times.baseline_total,
                    number,
                    times.candidate_inside if clocks else (),
                    times.baseline_inside if clocks else (),
                )
            )
    finally:
        if hook_cls is not None:
            hook_cls._vjp = original_vjp

    extra = {
        "vjp_ms": vjp_ms,
        "gradient_rel_difference": err,
        "vjps_timed_inside": hook_cls is not None,
    }
    return comparisons, extra


def format_time(comparisons: Sequence[TimeComparison], steps: int) -> str:
    header = (
        f"{'rbp-core call':<26} {'calls':>6} {'rbp-core ms':>12} {'raw VJPs ms':>12} "
        f"{'median paired':>14} {'paired IQR':>17} {'ratio of':>9} {'extra per':>10}"
    )
    sub = (
        f"{'':<26} {'/sample':>6} {'(median)':>12} {'(median)':>12} {'ratio':>14} {'':>17} "
        f"{'medians':>9} {'VJP (us)':>10}"
    )
    lines = [header, sub, "-" * len(header)]
    for c in comparisons:
        q1, q3 = quartiles(c.ratios)
        mc, mb = statistics.median(c.candidate), statistics.median(c.baseline)
        lines.append(
            f"{c.name:<26} {c.number:>6} {1e3 * mc:>12.3f} {1e3 * mb:>12.3f} {c.median_ratio:>14.4f} "
            f"{f'[{q1:.4f}, {q3:.4f}]':>17} {c.ratio_of_medians:>9.4f} {1e6 * (mc - mb) / steps:>10.1f}"
        )
    timed = [c for c in comparisons if c.has_inside]
    if timed:
        header2 = (
            f"{'rbp-core call':<26} {'VJPs ms':>9} {'VJPs ms':>9} {'VJPs ms':>9} {'rbp-core outside':>17} "
            f"{'raw outside':>12} {'bookkeeping':>12}"
        )
        sub2 = f"{'':<26} {'(both)':>9} {'rbp-core':>9} {'raw':>9} {'VJPs (us/VJP)':>17} {'(us/VJP)':>12}"
        sub2 += f" {'ratio':>12}"
        lines += ["", header2, sub2, "-" * len(header2)]
        for c in timed:
            lines.append(
                f"{c.name:<26} {1e3 * c.vjp_time:>9.3f} {1e3 * statistics.median(c.candidate_inside):>9.3f} "
                f"{1e3 * statistics.median(c.baseline_inside):>9.3f} {1e6 * c.candidate_outside / steps:>17.1f} "
                f"{1e6 * c.baseline_outside / steps:>12.1f} {c.bookkeeping_ratio:>12.4f}"
            )
    return "\n".join(lines)


# =========================================================================== 3. peers


@dataclass
class PeerProblem:
    """``F(h, W, b) = tanh(h @ W^T + b + x)`` in float64; ``h_star`` its fixed point to 1e-12."""

    W: Tensor
    b: Tensor
    x: Tensor
    g: Tensor
    h_star: Tensor
    mu: float
    forward_steps: int

    @property
    def params(self) -> tuple[Tensor, Tensor]:
        return self.W, self.b

    def F(self, h: Tensor, W: Tensor, b: Tensor) -> Tensor:
        return torch.tanh(h @ W.T + b + self.x)

    def f(self, h: Tensor) -> Tensor:
        return self.F(h, self.W, self.b)


def make_peer_problem(
    batch: int, n: int, mu: float, *, symmetric: bool = False, input_scale: float = 1.0
) -> PeerProblem:
    """``tanh(h W^T + b + x)`` with ``||W||_2 = mu`` (``symmetric``: spectral radius ``mu`` too).

    ``input_scale`` multiplies ``b`` and ``x``: small inputs keep ``tanh`` near its linear range,
    so that the Jacobian at the fixed point is close to ``W`` itself.
    """
    gen = torch.Generator().manual_seed(SEED + 1)
    dt = torch.float64
    W = scaled_matrix(n, mu, dt, gen)
    if symmetric:
        W = W + W.T
        W = W * (mu / torch.linalg.matrix_norm(W, ord=2))
    W = W.requires_grad_()
    b = (0.1 * input_scale * torch.randn(n, generator=gen, dtype=dt)).requires_grad_()
    x = input_scale * torch.randn(batch, n, generator=gen, dtype=dt)
    g = torch.randn(batch, n, generator=gen, dtype=dt)
    with torch.no_grad():
        sol = rbp_core.fixed_point(
            lambda h: torch.tanh(h @ W.T + b + x),
            torch.zeros(batch, n, dtype=dt),
            rbp_core.FixedPointIteration(rtol=1e-12, max_iter=50_000),
            contraction=mu,
        )
    return PeerProblem(W=W, b=b, x=x, g=g, h_star=sol.value.detach(), mu=mu, forward_steps=sol.num_steps)


def dense_reference(p: PeerProblem) -> tuple[list[Tensor], dict[str, Any]]:
    """Dense implicit gradient: per-row Jacobian blocks, ``solve(I - J^T, g)``, parameter VJP."""
    Wd, bd = p.W.detach(), p.b.detach()
    batch, n = p.h_star.shape
    jac = importlib.import_module("torch.autograd.functional").jacobian
    blocks = []
    for i in range(batch):
        xi = p.x[i]
        blocks.append(jac(lambda hi, xi=xi: torch.tanh(hi @ Wd.T + bd + xi), p.h_star[i], vectorize=True))
    J = torch.stack(blocks)  # (batch, n, n), J[i] = d f(h)_i / d h_i
    eye = torch.eye(n, dtype=J.dtype)
    z = torch.linalg.solve(eye - J.transpose(-1, -2), p.g.unsqueeze(-1)).squeeze(-1)
    # The block structure, checked on the full flattened map over the first few rows.
    rows = min(batch, 4)
    xs = p.x[:rows]

    def flat_map(hf: Tensor) -> Tensor:
        return torch.tanh(hf.reshape(rows, n) @ Wd.T + bd + xs).reshape(-1)

    full = jac(flat_map, p.h_star[:rows].reshape(-1), vectorize=True)
    off = 0.0
    diag = 0.0
    for r in range(rows):
        for c in range(rows):
            blk = full[r * n : (r + 1) * n, c * n : (c + 1) * n]
            if r == c:
                diag = max(diag, float(torch.max(torch.abs(blk - J[r]))))
            else:
                off = max(off, float(torch.max(torch.abs(blk))))
    with torch.enable_grad():
        out = p.F(p.h_star, p.W, p.b)
        grads = list(torch.autograd.grad(out, p.params, z))
    residual = float(torch.linalg.vector_norm(p.g - (z - torch.einsum("bji,bj->bi", J, z))))
    check = {
        "rows_checked": rows,
        "max_abs_off_diagonal_block": off,
        "max_abs_diagonal_block_difference": diag,
        "adjoint_residual_rel": residual / float(torch.linalg.vector_norm(p.g)),
        "jacobian_norm_max": float(torch.linalg.matrix_norm(J, ord=2).max()),
    }
    return grads, check


@dataclass
class PeerSetup:
    backward: Callable[[], Sequence[Tensor]]
    products: Callable[[], str]
    vjp_count: Callable[[], int | None]
    details: Callable[[], str] = lambda: ""


@dataclass
class PeerResult:
    name: str
    tolerance: str
    error: str | None = None
    times: list[float] = field(default_factory=list)
    products: str = ""
    vjps: int | None = None
    rel_error: float | None = None
    details: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times) if self.times else math.nan

    def as_dict(self) -> dict[str, Any]:
        q1, q3 = quartiles(self.times) if self.times else (math.nan, math.nan)
        return {
            "name": self.name,
            "tolerance": self.tolerance,
            "error": self.error,
            "median_backward_ms": self.median_ms,
            "backward_ms_q1": 1e3 * q1,
            "backward_ms_q3": 1e3 * q3,
            "products": self.products,
            "vjps": self.vjps,
            "rel_gradient_error": self.rel_error,
            "details": self.details,
            "warnings": self.warnings,
            "times_s": self.times,
        }


class LeafVJPCounter:
    """Counts gradients computed for a leaf state that requires grad: one per VJP through ``f``.

    ``wrap(f)`` registers a hook on every leaf input that requires grad; the hook fires each time
    autograd computes the gradient with respect to that leaf (``torch.autograd.grad`` included).
    """

    def __init__(self) -> None:
        self.count = 0

    def _hook(self, _grad: Tensor) -> None:
        self.count += 1

    def wrap(self, f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        def counted(h: Tensor) -> Tensor:
            if h.requires_grad and h.is_leaf:
                h.register_hook(self._hook)  # type: ignore[no-untyped-call]
            return f(h)

        return counted


def rbp_peer(p: PeerProblem, method: Any, jvp: str = "double-backward") -> PeerSetup:
    counter = LeafVJPCounter()
    h, info = fixed_point(
        counter.wrap(p.f),
        p.h_star,
        backward=method,
        solver=rbp_core.FixedPointIteration(rtol=1e-12, max_iter=100),
        contraction=p.mu,
        jvp_mode="double-backward" if jvp == "double-backward" else "forward",
        on_backward_failure="warn",
    )
    assert isinstance(h, Tensor)

    def backward() -> Sequence[Tensor]:
        counter.count = 0
        grads = torch.autograd.grad(h, p.params, p.g, retain_graph=True)
        del info.backward[:-1]  # keep the last Solution only
        return grads

    def products() -> str:
        sol = info.backward[-1]
        text = f"{sol.num_vjp} VJP"
        if sol.num_jvp:
            text += f" + {sol.num_jvp} JVP" + (" (fwd-mode)" if jvp == "forward" else " (2nd-order)")
        return text

    def details() -> str:
        sol = info.backward[-1]
        bound = "-" if sol.error_bound is None else f"{sol.error_bound:.1e}"
        res = sol.residual_norms[-1] / float(torch.linalg.vector_norm(p.g)) if sol.residual_norms else math.nan
        return f"status {sol.status.name}, last monitored norm/||g|| {res:.1e}, certified ||z - z*|| <= {bound}"

    return PeerSetup(backward, products, lambda: info.backward[-1].num_vjp, details)


def torchdeq_peer(p: PeerProblem, tol: float, max_iter: int, b_solver: str = "fixed_point_iter") -> PeerSetup:
    torchdeq = importlib.import_module("torchdeq")
    counter = LeafVJPCounter()
    deq = torchdeq.get_deq(
        core="indexing",
        ift=True,
        f_solver="fixed_point_iter",
        b_solver=b_solver,
        f_max_iter=100,
        f_tol=1e-12,
        f_stop_mode="rel",
        b_max_iter=max_iter,
        b_tol=tol,
        b_stop_mode="rel",
    )
    deq.train()
    stats: list[Any] = []
    z_out, _ = deq(counter.wrap(p.f), p.h_star, backward_writer=stats.append)
    h = z_out[-1]

    def backward() -> Sequence[Tensor]:
        counter.count = 0
        stats.clear()
        return torch.autograd.grad(h, p.params, p.g, retain_graph=True)

    def products() -> str:
        return f"{counter.count} VJP + 1 f eval"

    def details() -> str:
        if not stats:
            return ""
        s = stats[-1]
        return (
            f"best step {int(s['nstep'].max())}, max row rel step {float(s['rel_lowest'].max()):.1e}, "
            f"max row abs step {float(s['abs_lowest'].max()):.1e}"
        )

    return PeerSetup(backward, products, lambda: counter.count, details)


def torchopt_peer(p: PeerProblem, tol: float, max_iter: int, solver: str) -> PeerSetup:
    linear_solve = importlib.import_module("torchopt.linear_solve")
    implicit = importlib.import_module("torchopt.diff.implicit")
    inner = getattr(linear_solve, solver)(rtol=tol, maxiter=max_iter)
    calls = [0]

    def solve(matvec: Callable[[Any], Any], rhs: Any) -> Any:
        def counted(u: Any) -> Any:
            calls[0] += 1
            return matvec(u)

        return inner(counted, rhs)

    def optimality(h: Tensor, W: Tensor, b: Tensor) -> Tensor:
        return p.F(h, W, b) - h

    def root(h0: Tensor, W: Tensor, b: Tensor) -> Tensor:
        with torch.no_grad():
            sol = rbp_core.fixed_point(
                lambda h: p.F(h, W, b), h0, rbp_core.FixedPointIteration(rtol=1e-12, max_iter=100)
            )
        value: Tensor = sol.value
        return value

    solver_fn = implicit.custom_root(optimality, argnums=(1, 2), solve=solve)(root)
    h = solver_fn(p.h_star, p.W, p.b)

    def backward() -> Sequence[Tensor]:
        calls[0] = 0
        return torch.autograd.grad(h, p.params, p.g, retain_graph=True)

    def products() -> str:
        if solver == "solve_normal_cg":
            return f"{calls[0]} VJP + {calls[0]} VJP^T (2nd-order)"
        return f"{calls[0]} VJP"

    return PeerSetup(backward, products, lambda: calls[0])


def neumann_steps_for(tol: float, mu: float) -> int:
    """Smallest K with ``mu^(K+1) / (1 - mu) <= tol``: a-priori ``||z_K - z*|| <= tol ||g||``."""
    return max(0, math.ceil(math.log(tol * (1.0 - mu)) / math.log(mu)) - 1)


def measure_peers(
    batch: int, n: int, mu: float, tol: float, max_iter: int, *, repeats: int, min_sample: float
) -> tuple[list[PeerResult], dict[str, Any]]:
    p = make_peer_problem(batch, n, mu)
    t0 = time.perf_counter()
    ref, check = dense_reference(p)
    check["reference_s"] = time.perf_counter() - t0
    check["forward_steps_to_1e-12"] = p.forward_steps
    k_cert = neumann_steps_for(tol, mu)
    check["neumann_certified_steps"] = k_cert

    rel = f"rel {tol:g}"
    specs: list[tuple[str, str, Callable[[], PeerSetup]]] = [
        (
            "rbp-core OriginalRBP",
            f"||g-(I-J^T)z|| <= {tol:g}||g||",
            lambda: rbp_peer(p, rbp_core.OriginalRBP(rtol=tol, max_iter=max_iter)),
        ),
        (
            "rbp-core CGRBP (jvp=double-backward)",
            f"||g-(I-J^T)z|| <= {tol:g}||g||",
            lambda: rbp_peer(p, rbp_core.CGRBP(rtol=tol, max_iter=max_iter), jvp="double-backward"),
        ),
        (
            "rbp-core CGRBP jvp=forward",
            f"||g-(I-J^T)z|| <= {tol:g}||g||",
            lambda: rbp_peer(p, rbp_core.CGRBP(rtol=tol, max_iter=max_iter), jvp="forward"),
        ),
        (
            f"rbp-core Neumann K={k_cert}",
            f"a priori: mu^(K+1)/(1-mu) <= {tol:g}",
            lambda: rbp_peer(p, rbp_core.Neumann(steps=k_cert)),
        ),
        ("rbp-core Neumann K=20", "none (paper's truncation)", lambda: rbp_peer(p, rbp_core.Neumann(steps=20))),
        (
            "TorchDEQ IFT (fixed_point_iter)",
            f"per row ||dz||/||z|| < {tol:g}",
            lambda: torchdeq_peer(p, tol, max_iter),
        ),
        (
            "TorchOpt custom_root normal_cg",
            f"normal eq: ||A^T r|| <= {rel}",
            lambda: torchopt_peer(p, tol, max_iter, "solve_normal_cg"),
        ),
        (
            "TorchOpt custom_root cg",
            f"CG residual ||r|| <= {rel}",
            lambda: torchopt_peer(p, tol, max_iter, "solve_cg"),
        ),
    ]

    return run_peers(specs, ref, repeats=repeats, min_sample=min_sample), check


def run_peers(
    specs: Sequence[tuple[str, str, Callable[[], PeerSetup]]],
    ref: Sequence[Tensor],
    *,
    repeats: int,
    min_sample: float,
) -> list[PeerResult]:
    """Each spec's backward checked against ``ref``, then all timed round-robin (rotating order, gc off)."""
    results: list[PeerResult] = []
    setups: list[tuple[PeerResult, PeerSetup, int]] = []
    for name, tol_text, make in specs:
        res = PeerResult(name=name, tolerance=tol_text)
        results.append(res)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                setup = make()
                grads = setup.backward()  # first backward: check accuracy and count products
                res.rel_error = rel_error(grads, ref)
                res.products = setup.products()
                res.vjps = setup.vjp_count()
                res.details = setup.details()
                number = max(1, math.ceil(min_sample / _time_call(setup.backward)))
                setups.append((res, setup, number))
            except Exception as exc:  # noqa: BLE001 - a failing peer is a result, not a crash
                res.error = short(exc, 300)
        seen: list[str] = []
        for w in caught:
            text = f"{w.category.__name__}: {str(w.message).splitlines()[0][:140]}"
            if text not in seen:
                seen.append(text)
        res.warnings = seen

    # Timing: all working methods interleaved round-robin (rotating order), gc off.
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for r in range(repeats):
                order = setups[r % len(setups) :] + setups[: r % len(setups)] if setups else []
                for res, setup, number in order:
                    t_start = time.perf_counter()
                    for _ in range(number):
                        setup.backward()
                    res.times.append((time.perf_counter() - t_start) / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    return results


def _time_call(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return max(time.perf_counter() - t0, 1e-6)


def format_peers(results: Sequence[PeerResult]) -> str:
    header = (
        f"{'method':<35} {'tolerance (what it bounds)':<34} {'ms/backward':>11} {'IQR (ms)':>17} "
        f"{'products with J':<34} {'rel grad error':>14}"
    )
    sub = f"{'':<35} {'':<34} {'(median)':>11} {'':>17} {'':<34} {'vs dense':>14}"
    lines = [header, sub, "-" * len(header)]
    for r in results:
        if r.error is not None:
            lines.append(f"{r.name:<35} {r.tolerance:<34} unavailable: {r.error}")
            continue
        q1, q3 = quartiles(r.times) if r.times else (math.nan, math.nan)
        err = "-" if r.rel_error is None else f"{r.rel_error:.2e}"
        lines.append(
            f"{r.name:<35} {r.tolerance:<34} {r.median_ms:>11.2f} {f'[{1e3 * q1:.2f}, {1e3 * q3:.2f}]':>17} "
            f"{r.products:<34} {err:>14}"
        )
    notes = [f"  {r.name}: {r.details}" for r in results if r.details]
    for r in results:
        notes.extend(f"  {r.name}: warning {w}" for w in r.warnings)
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(lines)


# =========================================================================== main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The PyTorch adapter: memory against TBPTT/BPTT, backward time against raw VJPs, peers.",
    )
    parser.add_argument("--quick", action="store_true", help="a reduced run (smaller memory state, fewer repeats)")
    parser.add_argument(
        "--parts", default="memory,time,peers", help="comma-separated subset of memory,time,peers (default all)"
    )
    parser.add_argument("--memory-batch", type=int, default=None, help="rows of the memory state (default 512)")
    parser.add_argument("--memory-repeats", type=int, default=None, help="measured steps per memory worker (2)")
    parser.add_argument(
        "--memory-method",
        choices=("auto", "clear_refs", "ru_maxrss"),
        default="auto",
        help="how peaks are read (default auto: clear_refs where VmHWM can be reset)",
    )
    parser.add_argument("--time-batch", type=int, default=64, help="rows of the timing state (default 64)")
    parser.add_argument("--steps", type=int, default=20, help="K of the timed Neumann backward (default 20)")
    parser.add_argument("--repeats", type=int, default=None, help="paired timing repeats (default 25)")
    parser.add_argument("--min-sample", type=float, default=None, help="seconds per timing sample (default 0.25)")
    parser.add_argument("--peer-batch", type=int, default=64, help="rows of the peer state (default 64)")
    parser.add_argument("--peer-n", type=int, default=256, help="columns of the peer state (default 256)")
    parser.add_argument("--peer-repeats", type=int, default=None, help="round-robin rounds of the peers (15)")
    parser.add_argument("--tol", type=float, default=1e-8, help="relative tolerance given to the peers (1e-8)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    q = args.quick
    args.memory_batch = args.memory_batch or (128 if q else 512)
    args.memory_repeats = args.memory_repeats or (1 if q else 2)
    args.repeats = args.repeats or (7 if q else 25)
    args.min_sample = args.min_sample if args.min_sample is not None else (0.1 if q else 0.25)
    args.peer_repeats = args.peer_repeats or (5 if q else 15)
    parts = {s.strip() for s in args.parts.split(",") if s.strip()}
    if not parts <= {"memory", "time", "peers"}:
        parser.error("--parts takes a comma-separated subset of memory,time,peers")
    args.part_set = parts
    return args


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "rbp_core": rbp_core.__version__,
        "torchdeq": package_version("torchdeq"),
        "torchopt": package_version("torchopt"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load_average(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_worker is not None:
        spec = MemorySpec(**json.loads(args.memory_worker))
        print("RESULT " + json.dumps(memory_worker(spec)), flush=True)
        return 0

    env = environment()
    t_start = time.perf_counter()
    result: dict[str, Any] = {"environment": env, "argv": sys.argv[1:] if argv is None else list(argv)}
    print("rbp-core PyTorch adapter: memory, backward time and peers" + (" (quick run)" if args.quick else ""))
    print(
        f"torch {env['torch']} ({env['torch_threads']} threads), Python {env['python']}, rbp_core {env['rbp_core']}, "
        f"torchdeq {env['torchdeq']}, torchopt {env['torchopt']}, {env['cpu_count']} CPUs"
    )
    if env["load_average_at_start"] is not None:
        print("load average (1, 5, 15 min) at start: " + ", ".join(f"{x:.2f}" for x in env["load_average_at_start"]))

    mem_summary: MemorySummary | None = None
    time_results: list[TimeComparison] = []
    peer_results: list[PeerResult] = []
    peer_check: dict[str, Any] = {}

    # ---------------------------------------------------------------- 1. memory
    if "memory" in args.part_set:
        ks, ts = (5, 20, 100), (10, 30, 60)
        method = args.memory_method
        why = ""
        if method == "auto":
            ok, why = clear_refs_works()
            method = "clear_refs" if ok else "ru_maxrss"
        print()
        print(
            f"1. memory: f(h) = tanh(h W^T + x), float32 state {args.memory_batch} x 1024, ||W||_2 = 0.5; "
            f"peaks of one step (forward, then h.backward(g)) as RSS above the RSS before the forward"
        )
        if method == "clear_refs":
            print(
                f"   method: fresh process per configuration, MALLOC_MMAP_THRESHOLD_={MALLOC_ENV['MALLOC_MMAP_THRESHOLD_']}, "
                f"VmHWM reset through /proc/self/clear_refs before the forward and before the backward; "
                f"one warm-up step (K or T <= 5), then the median of {args.memory_repeats} steps"
            )
        else:
            print(
                "   method: ru_maxrss (VmHWM cannot be reset here"
                + (f": {why}" if why else "")
                + "); one fresh process per configuration and phase, no warm-up step"
            )
        try:
            rows = measure_memory(args.memory_batch, 1024, ks, ts, args.memory_repeats, method)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            print(f"   memory part failed: {short(exc, 400)}")
            result["memory"] = {"error": short(exc, 400)}
        else:
            print(format_memory(rows))
            print(
                "   backward peak = highest RSS during the backward above the RSS before the forward (it includes "
                "the graph the forward left); backward adds = the same peak above the RSS after the forward"
            )
            mem_summary = summarise_memory(rows)
            s = mem_summary
            print(
                f"   growth of the backward peak from K = {s.k_range[0]} to {s.k_range[1]}: Neumann "
                f"{s.neumann_growth:+.1f} MiB, TBPTT {s.tbptt_growth:+.1f} MiB, ratio {s.ratio:+.4f} "
                f"(target < {MEMORY_TARGET}): {'PASS' if s.passed else 'FAIL'}"
            )
            print(
                f"   BPTT: backward peak grows {s.bptt_growth:+.1f} MiB from T = {s.t_range[0]} to {s.t_range[1]} "
                f"forward iterations; forward peak RBP (Neumann, any K) <= {s.rbp_forward_peak:.1f} MiB vs BPTT "
                + ", ".join(f"T={t}: {v:.1f}" for t, v in s.bptt_forward_peaks.items())
                + " MiB"
            )
            result["memory"] = {
                "method": method,
                "batch": args.memory_batch,
                "n": 1024,
                "repeats": args.memory_repeats,
                "malloc_env": MALLOC_ENV,
                "rows": [r.__dict__ for r in rows],
                "summary": s.__dict__,
            }

    # ---------------------------------------------------------------- 2. time
    time_extra: dict[str, Any] = {}
    if "time" in args.part_set:
        print()
        print(
            f"2. time: Neumann(steps={args.steps}) backward through fixed_point against {args.steps} raw autograd "
            f"VJPs + the parameter VJP; float32 state {args.time_batch} x 1024, ||W||_2 = 0.5"
        )
        print(
            f"   paired ABBA (bench_core.paired_times): {args.repeats} repeats, samples >= {args.min_sample:g} s, "
            "gc off; headline: median of per-repeat ratios"
        )
        time_results, time_extra = measure_time(
            args.time_batch, 1024, args.steps, repeats=args.repeats, warmup=2, min_sample=args.min_sample
        )
        print(f"   one VJP through f: {time_extra['vjp_ms']:.3f} ms")
        print(format_time(time_results, args.steps))
        main_t = time_results[0]
        time_pass = main_t.median_ratio <= TIME_TARGET
        print(
            f"   Neumann / raw VJPs (autograd.grad): median paired ratio {main_t.median_ratio:.4f} "
            f"(target <= {TIME_TARGET}): {'PASS' if time_pass else 'FAIL'}"
        )
        if main_t.has_inside:
            print(
                f"   bookkeeping ratio (informational, against the same {TIME_TARGET}): "
                f"{main_t.bookkeeping_ratio:.4f}: the {args.steps} state VJPs take {1e3 * main_t.vjp_time:.3f} ms "
                f"(median, both sides); outside them rbp-core spends "
                f"{1e6 * main_t.candidate_outside / args.steps:.1f} us per VJP, the raw loop "
                f"{1e6 * main_t.baseline_outside / args.steps:.1f} us (the parameter VJP included on both sides)"
            )
        result["time"] = {
            "batch": args.time_batch,
            "n": 1024,
            "steps": args.steps,
            "repeats": args.repeats,
            "min_sample_s": args.min_sample,
            "comparisons": [c.as_dict() for c in time_results],
            "target": TIME_TARGET,
            "passed": time_pass,
            **time_extra,
        }

    # ---------------------------------------------------------------- 3. peers
    if "peers" in args.part_set:
        print()
        print(
            f"3. peers: F(h) = tanh(h W^T + b + x), float64 state {args.peer_batch} x {args.peer_n}, "
            f"||W||_2 = 0.9 (a contraction: mu = 0.9), gradient with respect to W and b; tolerance {args.tol:g}"
        )
        print(
            "   one forward fixed point h* (rbp-core, relative step <= 1e-12) fed to every method as its start; "
            "times are one backward pass (graph retained, repeated), round-robin"
        )
        peer_results, peer_check = measure_peers(
            args.peer_batch,
            args.peer_n,
            0.9,
            args.tol,
            1000,
            repeats=args.peer_repeats,
            min_sample=0.05 if args.quick else 0.1,
        )
        print(
            f"   dense reference ({peer_check['reference_s']:.1f} s): per-row Jacobian blocks by "
            f"torch.autograd.functional.jacobian; on the first {peer_check['rows_checked']} rows the flattened map's "
            f"Jacobian has off-diagonal blocks max |.| = {peer_check['max_abs_off_diagonal_block']:.1e} and "
            f"diagonal blocks equal to the per-row ones to {peer_check['max_abs_diagonal_block_difference']:.1e}; "
            f"adjoint residual {peer_check['adjoint_residual_rel']:.1e}; max ||J_i||_2 = "
            f"{peer_check['jacobian_norm_max']:.3f}"
        )
        print(format_peers(peer_results))
        print(
            "   tolerances: rbp-core's OriginalRBP and CGRBP bound the residual of (I - J^T) z = g over the whole "
            "state, relative to ||g||; Neumann has none (K is fixed; the K above is what mu = 0.9 certifies); "
            "TorchDEQ stops when, in every batch row, the step of the iteration z <- J^T z + g (from z = 0) is "
            "below tol times that row's ||z||; TorchOpt's CG tests the residual of the system it runs CG on "
            "(normal_cg: the normal equations A^T A u = A^T v with A = J^T - I; cg: A u = v itself, though A "
            "is not symmetric), relative to its right-hand side; every method also makes one parameter VJP"
        )
        result["peers"] = {
            "batch": args.peer_batch,
            "n": args.peer_n,
            "mu": 0.9,
            "tol": args.tol,
            "repeats": args.peer_repeats,
            "reference": peer_check,
            "results": [r.as_dict() for r in peer_results],
        }

    # ---------------------------------------------------------------- summary
    elapsed = time.perf_counter() - t_start
    print()
    print("summary")
    if mem_summary is not None:
        s = mem_summary
        print(
            f"  memory: Neumann backward-peak growth K={s.k_range[0]}->{s.k_range[1]}: {s.neumann_growth:+.1f} MiB; "
            f"TBPTT: {s.tbptt_growth:+.1f} MiB; ratio {s.ratio:+.4f} (target < {MEMORY_TARGET}: "
            f"{'PASS' if s.passed else 'FAIL'}); BPTT T={s.t_range[0]}->{s.t_range[1]}: {s.bptt_growth:+.1f} MiB; "
            f"forward peak RBP <= {s.rbp_forward_peak:.1f} MiB, BPTT "
            + "/".join(f"{v:.1f}" for v in s.bptt_forward_peaks.values())
            + f" MiB at T = {'/'.join(str(t) for t in s.bptt_forward_peaks)}"
        )
    if time_results:
        t = time_results[0]
        q1, q3 = quartiles(t.ratios)
        print(
            f"  time: Neumann(K={args.steps}) / raw VJPs = {t.median_ratio:.4f} [IQR {q1:.4f}, {q3:.4f}] "
            f"(target <= {TIME_TARGET}: {'PASS' if t.median_ratio <= TIME_TARGET else 'FAIL'}); "
            f"with h.backward(g): {time_results[1].median_ratio:.4f}"
            + (f"; bookkeeping ratio {t.bookkeeping_ratio:.4f}" if t.has_inside else "")
        )
    if peer_results:
        print("  peers (median ms per backward; products; relative gradient error vs dense):")
        for r in peer_results:
            if r.error is not None:
                print(f"    {r.name}: unavailable ({r.error})")
            else:
                err = "-" if r.rel_error is None else f"{r.rel_error:.1e}"
                print(f"    {r.name}: {r.median_ms:.2f} ms; {r.products}; error {err}")
    load_end = load_average()
    print(
        f"total time {elapsed:.1f} s"
        + ("" if load_end is None else ", load average at end: " + ", ".join(f"{x:.2f}" for x in load_end))
    )
    result["elapsed_s"] = elapsed
    result["load_average_at_end"] = load_end
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

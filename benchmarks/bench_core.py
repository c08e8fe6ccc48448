"""Overhead of the rbp_core solvers over bare NumPy callback loops.

What is measured
----------------
Each solver is timed against a hand-written NumPy loop that makes the same
number of callback calls and does the same vector updates, and nothing else:

``neumann_rbp``
    ``solve_adjoint(vjp, g, Neumann(K))`` against ``v = g; z = g; K times: v = vjp(v); z = z + v``.
    Both make ``K`` VJPs.
``original_rbp``
    ``solve_adjoint(vjp, g, OriginalRBP(rtol=0, max_iter=K + 1), throw=False)`` (``K`` VJPs:
    the first of the ``K + 1`` iterations, ``z_1 = g``, costs none) against
    ``z = g; K times: z_new = vjp(z) + g; r = z_new - z; z = z_new``.
    Reported per VJP, with the solver's count taken from ``Solution.num_vjp``.
``cg_rbp``
    ``solve_adjoint(vjp, g, CGRBP(rtol=0, max_iter=K), jvp=jvp, throw=False)`` (``rtol=0`` runs
    the whole budget: ``K`` VJPs and ``K`` JVPs) against a bare CGLS loop with
    the same numbers of VJPs and JVPs and only the two inner products CGLS
    needs per iteration. Reported per (VJP + JVP).
``fixed_point``
    ``fixed_point(F, g, FixedPointIteration(rtol=0, max_iter=K, divergence_factor=None), throw=False)``
    for ``F(h) = vjp(h) + g`` against ``h = g; K times: h = F(h)``. Reported per call of ``F``.

Targets, for every method: a median paired ratio <= 1.05 at the main size (``--n``, default
2000) and <= 1.30 at the small size (``--small-n``, default 64), each reported as PASS or FAIL.
``--numpy-adapter`` imports ``rbp_core.backends.numpy`` first, whose registered operations take
the sums of squares with ``ndarray.dot``; without it the core's generic Array API operations run.

The baselines do not compute the residual norm that the solvers monitor at
every iteration (one reduction and one conversion to a Python float); that
norm, the callback output checks and the termination bookkeeping are exactly
the overhead this benchmark is meant to expose.

The problem is dense float64: ``J = mu A / ||A||_2`` with ``mu = 0.9`` and
``A`` drawn by ``numpy.random.default_rng(0)``, ``vjp = v -> J^T v`` (with
``J^T`` stored C-contiguous beforehand) and ``jvp = v -> J v``. At the
default ``n = 2000`` one VJP is a ~30 MB matrix-vector product, the regime
of a real backward pass, where the solvers should cost next to nothing over
the callbacks. A second run at small ``n`` (default 200, informational, no
target) shows the per-iteration bookkeeping, which matters more there.

How it is measured
------------------
Each solver and its baseline are timed with :func:`time.perf_counter` in the
same loop, after warm-up runs and with the garbage collector off (as
:mod:`timeit` does). A repeat times the pair in ABBA order (BAAB on odd
repeats) and keeps each side's mean of its two samples. Each sample runs the
function ``number`` times, ``number`` chosen so that a baseline sample lasts
at least ``--min-sample`` seconds (default 0.25 s: at ``n = 2000`` a sample
then averages several solves); the main run makes ``--repeats`` (default 25)
such repeats. The informational small-``n`` run has its own, cheaper
settings (``--small-repeats``, default 15, and ``--small-min-sample``, default
0.05 s). On a small, noisy machine drift in CPU clock or BLAS scheduling then
hits both sides of a pair alike, so the headline is the median over repeats
of the per-repeat ratio ``candidate / baseline`` (each side per unit of work);
the ratio of the two medians and the interquartile range of the paired ratios
are shown as well.

Time outside the callbacks: a second, low-noise estimator
----------------------------------------------------------
At ``n = 2000`` a solve is almost all callback time (one VJP is a ~30 MB
matrix-vector product), and on a shared 2-core VM that product's own run-to-run
jitter (memory bandwidth, cache and scheduling contention from other
processes) is a few percent of a sample or more: as large as the difference the 1.05
target is about. The end-to-end paired ratio then wanders by several percent
between runs (the same Neumann comparison has read anywhere from 1.02 to 1.07)
whatever the solver does. What the solver adds happens *outside* the
callbacks, and that part can be measured directly and with far less noise.

So the VJP and JVP are wrapped in a :class:`TimedCallback`, which accumulates
the :func:`time.perf_counter` time spent inside each call, and the *same*
wrapped callbacks are passed to the solver and to its baseline loop. For each
sample the benchmark records the total time and the time inside the
callbacks; their difference is the time outside the callbacks. Per
comparison (medians over repeats, per unit of work as above) it reports

* the callback time per unit (median over the samples of both sides, which
  make the same callback calls),
* the solver's time outside the callbacks per unit, in microseconds,
* the baseline's time outside the callbacks per unit, in microseconds,
* the *bookkeeping ratio*
  ``(callback + solver outside) / (callback + baseline outside)``, all per
  unit: the end-to-end ratio the solver would show if both sides' callbacks
  took exactly that median time.

The wrapper itself costs two clock reads and one Python call per callback
call; that cost lands, almost all of it in the time outside the callbacks, on
both sides alike (both make the same callback calls), so it cancels from the
difference of the outside times and dilutes the ratios only negligibly. The end-to-end median paired
ratio stays the headline the 1.05 target is judged on (PASS or FAIL); the
bookkeeping ratio is printed next to it, on its own informational line against
the same 1.05, and both go into the ``--json`` output.

Before timing, each pair is run once untimed to check that the solver and the
baseline agree on the result and that the solver made the expected numbers of
callback calls.

Run ``python benchmarks/bench_core.py [--n N] [--steps K] [--repeats R] [--json PATH]``
(or ``nox -s bench -- ARGS``). The exit status is 0 unless something fails;
the Neumann target is reported as PASS or FAIL, not enforced. The defaults
take about two minutes on 2 cores, longer when other processes compete for
them.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import array_api_compat
import numpy as np
import numpy.typing as npt

import rbp_core

Vec = npt.NDArray[np.float64]
Op = Callable[[Vec], Vec]

MU = 0.9
NEUMANN_TARGET = 1.05
TARGETS = (1.05, 1.30)
"""The median paired ratio each method must stay within: at the main size, and at the small size."""
NOISY_IQR = 0.05
"""A paired-ratio interquartile range wider than this fraction of its median marks a comparison as noisy."""
SEED = 0


# --------------------------------------------------------------------------- problem


@dataclass(frozen=True)
class Problem:
    """A dense contraction ``J`` with its VJP and JVP callbacks and a cotangent ``g``."""

    n: int
    vjp: Op
    jvp: Op
    g: Vec


def make_problem(n: int, mu: float = MU) -> Problem:
    """``J = mu A / ||A||_2`` with ``A ~ N(0, 1)`` from ``default_rng(0)``; ``g ~ N(0, 1)``."""
    rng = np.random.default_rng(SEED)
    A = rng.standard_normal((n, n))
    J = mu * A / np.linalg.norm(A, 2)
    JT = np.ascontiguousarray(J.T)
    g = rng.standard_normal(n)

    def vjp(v: Vec) -> Vec:
        return JT @ v

    def jvp(v: Vec) -> Vec:
        return J @ v

    return Problem(n=n, vjp=vjp, jvp=jvp, g=g)


# --------------------------------------------------------------------------- baselines


def neumann_baseline(vjp: Op, g: Vec, steps: int) -> Vec:
    """``steps`` bare VJPs and additions: the Neumann partial sum."""
    v = g
    z = g
    for _ in range(steps):
        v = vjp(v)
        z = z + v
    return z


def original_baseline(vjp: Op, g: Vec, steps: int) -> tuple[Vec, Vec]:
    """``z_1 = g``, then ``steps`` iterations ``z <- J^T z + g``; returns ``z`` and the last difference."""
    z = g
    r = g
    for _ in range(steps):
        z_new = vjp(z) + g
        r = z_new - z
        z = z_new
    return z, r


def fixed_point_baseline(f: Op, h0: Vec, steps: int) -> Vec:
    """``steps`` bare applications of ``f`` from ``h0``."""
    h = h0
    for _ in range(steps):
        h = f(h)
    return h


def cgls_baseline(vjp: Op, jvp: Op, g: Vec, iters: int) -> tuple[Vec, Vec]:
    """CGLS for ``(I - J^T) z = g`` from ``z = 0``: ``iters`` VJPs and ``iters`` JVPs, no residual norms.

    Written for any array library (bench_gpu.py runs it on CuPy arrays).
    """
    z = array_api_compat.array_namespace(g).zeros_like(g)
    r = g
    s = r - jvp(r)  # A^T r with A = I - J^T
    gamma = s @ s
    p = s
    for k in range(iters):
        q = p - vjp(p)  # A p
        alpha = gamma / (q @ q)
        z = z + alpha * p
        r = r - alpha * q
        if k == iters - 1:
            break
        s = r - jvp(r)
        gamma_new = s @ s
        p = s + (gamma_new / gamma) * p
        gamma = gamma_new
    return z, r


# --------------------------------------------------------------------------- timing


class TimedCallback:
    """A callback that adds the wall time spent inside each call to :attr:`elapsed`.

    The solver and its baseline get the same instances, so the wrapper's own
    cost (one Python call and two clock reads per call) is the same on both
    sides and falls, for the most part, into the time outside the callbacks.
    """

    __slots__ = ("elapsed", "fn")

    def __init__(self, fn: Op) -> None:
        self.fn = fn
        self.elapsed = 0.0

    def __call__(self, v: Vec) -> Vec:
        t0 = time.perf_counter()
        out = self.fn(v)
        self.elapsed += time.perf_counter() - t0
        return out


@dataclass(frozen=True)
class PairedTimes:
    """Seconds per function call, one entry per repeat: total, and inside the timed callbacks."""

    candidate_total: tuple[float, ...]
    candidate_inside: tuple[float, ...]
    baseline_total: tuple[float, ...]
    baseline_inside: tuple[float, ...]


def _quartiles(xs: Sequence[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q3


@dataclass(frozen=True)
class Comparison:
    """Paired timings of one solver against its baseline at one size."""

    name: str
    unit: str
    candidate_work: int
    baseline_work: int
    number: int
    times: PairedTimes
    expected_counts: str
    counts_ok: bool

    @property
    def candidate_times(self) -> tuple[float, ...]:
        return self.times.candidate_total

    @property
    def baseline_times(self) -> tuple[float, ...]:
        return self.times.baseline_total

    @property
    def paired_ratios(self) -> list[float]:
        """Per repeat: (candidate time / its work) / (baseline time / its work)."""
        scale = self.baseline_work / self.candidate_work
        return [c / b * scale for c, b in zip(self.candidate_times, self.baseline_times, strict=True)]

    @property
    def median_candidate(self) -> float:
        return statistics.median(self.candidate_times)

    @property
    def median_baseline(self) -> float:
        return statistics.median(self.baseline_times)

    @property
    def ratio_of_medians(self) -> float:
        return (self.median_candidate / self.candidate_work) / (self.median_baseline / self.baseline_work)

    @property
    def median_paired_ratio(self) -> float:
        return statistics.median(self.paired_ratios)

    @property
    def paired_ratio_iqr(self) -> tuple[float, float]:
        return _quartiles(self.paired_ratios)

    @property
    def noisy(self) -> bool:
        q1, q3 = self.paired_ratio_iqr
        return q3 - q1 > NOISY_IQR * self.median_paired_ratio

    @property
    def overhead_per_unit_us(self) -> float:
        """Median extra time per unit of work (per VJP, or per VJP + JVP), in microseconds."""
        return 1e6 * (self.median_candidate / self.candidate_work - self.median_baseline / self.baseline_work)

    # ---- time inside and outside the callbacks, per unit of work, in seconds

    @property
    def candidate_callback_per_unit(self) -> list[float]:
        return [t / self.candidate_work for t in self.times.candidate_inside]

    @property
    def baseline_callback_per_unit(self) -> list[float]:
        return [t / self.baseline_work for t in self.times.baseline_inside]

    @property
    def candidate_outside_per_unit(self) -> list[float]:
        t = self.times
        return [(a - i) / self.candidate_work for a, i in zip(t.candidate_total, t.candidate_inside, strict=True)]

    @property
    def baseline_outside_per_unit(self) -> list[float]:
        t = self.times
        return [(a - i) / self.baseline_work for a, i in zip(t.baseline_total, t.baseline_inside, strict=True)]

    @property
    def callback_per_unit(self) -> float:
        """Median callback time per unit over the samples of both sides (they make the same calls)."""
        return statistics.median(self.candidate_callback_per_unit + self.baseline_callback_per_unit)

    @property
    def candidate_outside(self) -> float:
        """Median time per unit the solver spends outside the callbacks."""
        return statistics.median(self.candidate_outside_per_unit)

    @property
    def baseline_outside(self) -> float:
        """Median time per unit the baseline spends outside the callbacks."""
        return statistics.median(self.baseline_outside_per_unit)

    @property
    def bookkeeping_ratio(self) -> float:
        """``(callback + solver outside) / (callback + baseline outside)``, all per unit (medians)."""
        cb = self.callback_per_unit
        return (cb + self.candidate_outside) / (cb + self.baseline_outside)

    def as_dict(self) -> dict[str, Any]:
        q1, q3 = self.paired_ratio_iqr
        cand_out_q1, cand_out_q3 = _quartiles(self.candidate_outside_per_unit)
        base_out_q1, base_out_q3 = _quartiles(self.baseline_outside_per_unit)
        return {
            "name": self.name,
            "unit": self.unit,
            "candidate_work": self.candidate_work,
            "baseline_work": self.baseline_work,
            "calls_per_sample": self.number,
            "expected_counts": self.expected_counts,
            "counts_ok": self.counts_ok,
            "median_candidate_s": self.median_candidate,
            "median_baseline_s": self.median_baseline,
            "ratio_of_medians": self.ratio_of_medians,
            "median_paired_ratio": self.median_paired_ratio,
            "paired_ratio_q1": q1,
            "paired_ratio_q3": q3,
            "noisy": self.noisy,
            "overhead_per_unit_us": self.overhead_per_unit_us,
            "callback_per_unit_us": 1e6 * self.callback_per_unit,
            "candidate_callback_per_unit_us_median": 1e6 * statistics.median(self.candidate_callback_per_unit),
            "baseline_callback_per_unit_us_median": 1e6 * statistics.median(self.baseline_callback_per_unit),
            "candidate_outside_per_unit_us": 1e6 * self.candidate_outside,
            "candidate_outside_per_unit_us_q1": 1e6 * cand_out_q1,
            "candidate_outside_per_unit_us_q3": 1e6 * cand_out_q3,
            "baseline_outside_per_unit_us": 1e6 * self.baseline_outside,
            "baseline_outside_per_unit_us_q1": 1e6 * base_out_q1,
            "baseline_outside_per_unit_us_q3": 1e6 * base_out_q3,
            "bookkeeping_ratio": self.bookkeeping_ratio,
            "candidate_times_s": list(self.candidate_times),
            "baseline_times_s": list(self.baseline_times),
            "candidate_inside_callbacks_s": list(self.times.candidate_inside),
            "baseline_inside_callbacks_s": list(self.times.baseline_inside),
            "paired_ratios": self.paired_ratios,
        }


def _time_once(fn: Callable[[], object], number: int, clocks: Sequence[TimedCallback] = ()) -> tuple[float, float]:
    """Seconds per call of ``fn``: in total, and inside the ``clocks``' callbacks."""
    inside0 = sum(c.elapsed for c in clocks)
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    total = time.perf_counter() - t0
    inside = sum(c.elapsed for c in clocks) - inside0
    return total / number, inside / number


def calls_per_sample(fn: Callable[[], object], min_sample: float) -> int:
    """How many calls of ``fn`` make a sample of at least ``min_sample`` seconds."""
    t, _ = _time_once(fn, 1)
    return max(1, math.ceil(min_sample / t)) if t > 0.0 else 1000


def paired_times(
    candidate: Callable[[], object],
    baseline: Callable[[], object],
    clocks: Sequence[TimedCallback],
    *,
    repeats: int,
    warmup: int,
    number: int,
) -> PairedTimes:
    """Time both in one loop; seconds per call, total and inside ``clocks``, one entry per repeat.

    Each repeat runs the pair in ABBA order (candidate, baseline, baseline,
    candidate; BAAB on odd repeats) and keeps the mean of each side's two
    samples, so a linear drift within a repeat cancels from the pair.
    """
    for _ in range(warmup):
        candidate()
        baseline()
    cand: list[tuple[float, float]] = []
    base: list[tuple[float, float]] = []
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(repeats):
            first, second = (candidate, baseline) if i % 2 == 0 else (baseline, candidate)
            a1 = _time_once(first, number, clocks)
            b1 = _time_once(second, number, clocks)
            b2 = _time_once(second, number, clocks)
            a2 = _time_once(first, number, clocks)
            a = ((a1[0] + a2[0]) / 2, (a1[1] + a2[1]) / 2)
            b = ((b1[0] + b2[0]) / 2, (b1[1] + b2[1]) / 2)
            cand.append(a if first is candidate else b)
            base.append(b if first is candidate else a)
    finally:
        if gc_was_enabled:
            gc.enable()
    return PairedTimes(
        candidate_total=tuple(t for t, _ in cand),
        candidate_inside=tuple(i for _, i in cand),
        baseline_total=tuple(t for t, _ in base),
        baseline_inside=tuple(i for _, i in base),
    )


# --------------------------------------------------------------------------- checks


def _check_close(name: str, got: Vec, want: Vec, *, exact: bool) -> None:
    """Fail when the solver and its baseline did not compute the same thing."""
    if exact:
        ok = bool(np.array_equal(got, want))
    else:
        ok = bool(np.allclose(got, want, rtol=1e-8, atol=1e-12 * float(np.linalg.norm(want))))
    if not ok:
        err = float(np.linalg.norm(got - want))
        msg = f"{name}: solver and baseline disagree (||difference|| = {err:.3e}); the comparison would be unfair"
        raise RuntimeError(msg)


# --------------------------------------------------------------------------- one size


def run_size(problem: Problem, steps: int, *, repeats: int, warmup: int, min_sample: float) -> list[Comparison]:
    """The three comparisons at one problem size.

    Solver and baseline call the same :class:`TimedCallback` instances, so
    both sides' time inside the callbacks is measured the same way.
    """
    vjp, jvp, g = TimedCallback(problem.vjp), TimedCallback(problem.jvp), problem.g
    clocks = (vjp, jvp)
    out: list[Comparison] = []

    # Neumann-RBP: exactly `steps` VJPs on both sides.
    neumann = rbp_core.Neumann(steps)
    sol = rbp_core.solve_adjoint(vjp, g, neumann)
    _check_close("neumann_rbp", sol.value, neumann_baseline(vjp, g, steps), exact=True)
    counts_ok = sol.num_vjp == steps and sol.num_jvp == 0

    def neumann_candidate() -> object:
        return rbp_core.solve_adjoint(vjp, g, neumann)

    def neumann_base() -> object:
        return neumann_baseline(vjp, g, steps)

    number = calls_per_sample(neumann_base, min_sample)
    times = paired_times(neumann_candidate, neumann_base, clocks, repeats=repeats, warmup=warmup, number=number)
    out.append(Comparison("neumann_rbp", "VJP", sol.num_vjp, steps, number, times, f"{steps} VJP", counts_ok))

    # Original RBP: steps + 1 iterations from z0 = None, i.e. `steps` VJPs.
    original = rbp_core.OriginalRBP(rtol=0.0, max_iter=steps + 1)
    sol = rbp_core.solve_adjoint(vjp, g, original, throw=False)
    z_ref, r_ref = original_baseline(vjp, g, steps)
    counts_ok = sol.num_vjp == steps and sol.num_steps == steps + 1
    if counts_ok:
        _check_close("original_rbp", sol.value, z_ref, exact=True)
        _check_close(
            "original_rbp residual norm",
            np.asarray([sol.residual_norms[-1]]),
            np.asarray([np.linalg.norm(r_ref)]),
            exact=False,
        )

    def original_candidate() -> object:
        return rbp_core.solve_adjoint(vjp, g, original, throw=False)

    def original_base() -> object:
        return original_baseline(vjp, g, steps)

    number = calls_per_sample(original_base, min_sample)
    times = paired_times(original_candidate, original_base, clocks, repeats=repeats, warmup=warmup, number=number)
    out.append(Comparison("original_rbp", "VJP", sol.num_vjp, steps, number, times, f"{steps} VJP", counts_ok))

    # CG-RBP: `steps` iterations, `steps` VJPs and `steps` JVPs.
    cg = rbp_core.CGRBP(rtol=0.0, max_iter=steps)
    sol = rbp_core.solve_adjoint(vjp, g, cg, jvp=jvp, throw=False)
    z_ref, _ = cgls_baseline(vjp, jvp, g, steps)
    counts_ok = sol.num_vjp == steps and sol.num_jvp == steps and sol.num_steps == steps
    if counts_ok:
        _check_close("cg_rbp", sol.value, z_ref, exact=False)

    def cg_candidate() -> object:
        return rbp_core.solve_adjoint(vjp, g, cg, jvp=jvp, throw=False)

    def cg_base() -> object:
        return cgls_baseline(vjp, jvp, g, steps)

    number = calls_per_sample(cg_base, min_sample)
    times = paired_times(cg_candidate, cg_base, clocks, repeats=repeats, warmup=warmup, number=number)
    out.append(
        Comparison(
            "cg_rbp",
            "VJP+JVP",
            sol.num_vjp + sol.num_jvp,
            2 * steps,
            number,
            times,
            f"{steps} VJP + {steps} JVP",
            counts_ok,
        )
    )

    # The forward fixed-point iteration of F(h) = J^T h + g: `steps` calls of F on both sides.
    F = TimedCallback(lambda h: problem.vjp(h) + g)
    forward = rbp_core.FixedPointIteration(rtol=0.0, max_iter=steps, divergence_factor=None)
    sol = rbp_core.fixed_point(F, g, forward, throw=False)
    _check_close("fixed_point", sol.value, fixed_point_baseline(F, g, steps), exact=True)
    counts_ok = sol.num_f_evals == steps

    def fixed_candidate() -> object:
        return rbp_core.fixed_point(F, g, forward, throw=False)

    def fixed_base() -> object:
        return fixed_point_baseline(F, g, steps)

    number = calls_per_sample(fixed_base, min_sample)
    times = paired_times(fixed_candidate, fixed_base, (F,), repeats=repeats, warmup=warmup, number=number)
    out.append(Comparison("fixed_point", "call of F", sol.num_f_evals, steps, number, times, f"{steps} F", counts_ok))
    return out


# --------------------------------------------------------------------------- reporting


def environment() -> dict[str, Any]:
    """Versions, CPU count, BLAS threads (threadpoolctl, when installed) and thread variables as set."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "rbp_core": rbp_core.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": _load_average(),
        "env": {
            k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
        },
    }
    try:
        threadpoolctl = importlib.import_module("threadpoolctl")  # optional: not a dependency
    except ImportError:
        info["blas"] = None
    else:
        info["blas"] = [
            {k: pool.get(k) for k in ("internal_api", "version", "num_threads", "prefix")}
            for pool in threadpoolctl.threadpool_info()
            if pool.get("user_api") == "blas"
        ]
    return info


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (a busy machine makes every ratio noisy), where the OS has them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _blas_line(blas: list[dict[str, Any]] | None) -> str:
    if blas is None:
        return "BLAS threads: unknown (threadpoolctl not installed)"
    if not blas:
        return "BLAS threads: no BLAS found by threadpoolctl"
    parts = [f"{b['internal_api']} {b['version']} ({b['num_threads']} threads)" for b in blas]
    return "BLAS: " + ", ".join(parts)


def format_table(comparisons: Sequence[Comparison]) -> str:
    header = (
        f"{'solver':<13} {'ratio per':<9} {'calls':>10} {'solver ms':>10} {'base ms':>9} "
        f"{'ratio of':>9} {'median paired':>13} {'paired IQR':>15} {'extra/unit':>11}"
    )
    sub = f"{'':<13} {'':<9} {'(solver)':>10} {'(median)':>10} {'(median)':>9} {'medians':>9} {'ratio':>13} {'':>15} {'(us)':>11}"
    lines = [header, sub, "-" * len(header)]
    for c in comparisons:
        q1, q3 = c.paired_ratio_iqr
        calls = f"{c.candidate_work}" + ("" if c.counts_ok else "!")
        lines.append(
            f"{c.name:<13} {c.unit:<9} {calls:>10} {1e3 * c.median_candidate:>10.3f} "
            f"{1e3 * c.median_baseline:>9.3f} {c.ratio_of_medians:>9.4f} {c.median_paired_ratio:>13.4f} "
            f"{f'[{q1:.4f}, {q3:.4f}]':>15} {c.overhead_per_unit_us:>11.2f}"
        )
    for c in comparisons:
        q1, q3 = c.paired_ratio_iqr
        if not c.counts_ok:
            lines.append(
                f"  ! {c.name}: made {c.candidate_work} calls, expected {c.expected_counts}; ratios are per call"
            )
        if c.noisy:
            lines.append(
                f"  ~ {c.name}: paired ratios spread widely (IQR width {q3 - q1:.3f} > {NOISY_IQR:.0%} of the median); "
                "the machine was busy, rerun for a firmer number"
            )
    return "\n".join(lines)


def format_outside_table(comparisons: Sequence[Comparison]) -> str:
    """The second estimator: time inside and outside the callbacks, per unit, and the bookkeeping ratio."""
    header = (
        f"{'solver':<13} {'per':<9} {'callback':>10} {'solver outside':>15} {'base outside':>13} {'bookkeeping':>12}"
    )
    sub = f"{'':<13} {'':<9} {'(us)':>10} {'(us)':>15} {'(us)':>13} {'ratio':>12}"
    lines = [header, sub, "-" * len(header)]
    for c in comparisons:
        lines.append(
            f"{c.name:<13} {c.unit:<9} {1e6 * c.callback_per_unit:>10.2f} {1e6 * c.candidate_outside:>15.3f} "
            f"{1e6 * c.baseline_outside:>13.3f} {c.bookkeeping_ratio:>12.4f}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Overhead of rbp_core's solvers over bare NumPy callback loops (paired timings, ratios).",
    )
    parser.add_argument("--n", type=int, default=2000, help="state size of the main run (default 2000)")
    parser.add_argument("--steps", type=int, default=100, help="VJPs per solve (default 100)")
    parser.add_argument(
        "--repeats", type=int, default=25, help="paired samples per comparison in the main run (default 25)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each side first (default 2)")
    parser.add_argument(
        "--min-sample",
        type=float,
        default=0.25,
        help="seconds a baseline sample of the main run lasts at least; calls are repeated within a sample "
        "(default 0.25)",
    )
    parser.add_argument("--small-n", type=int, default=64, help="state size of the small run (default 64; 0 skips it)")
    parser.add_argument(
        "--small-repeats", type=int, default=15, help="paired samples per comparison at --small-n (default 15)"
    )
    parser.add_argument(
        "--small-min-sample",
        type=float,
        default=0.05,
        help="seconds a baseline sample at --small-n lasts at least (default 0.05)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--numpy-adapter",
        action="store_true",
        help="import rbp_core.backends.numpy first (its registered ops reduce with ndarray.dot)",
    )
    args = parser.parse_args(argv)
    if (
        args.n < 1
        or args.steps < 1
        or args.repeats < 1
        or args.small_repeats < 1
        or args.warmup < 0
        or args.small_n < 0
        or not args.min_sample >= 0
        or not args.small_min_sample >= 0
    ):
        parser.error(
            "--n, --steps, --repeats and --small-repeats must be >= 1; "
            "--warmup, --small-n, --min-sample and --small-min-sample >= 0"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.numpy_adapter:
        importlib.import_module("rbp_core.backends.numpy")  # registers its faster reductions
    env = environment()
    env["ops"] = "rbp_core.backends.numpy (ndarray.dot)" if args.numpy_adapter else "the core's generic Array API ops"
    t_start = time.perf_counter()

    print("rbp-core solver overhead over bare NumPy callback loops")
    print(
        f"numpy {env['numpy']}, Python {env['python']}, rbp_core {env['rbp_core']}, "
        f"{env['cpu_count']} CPUs; {_blas_line(env['blas'])}"
    )
    if env["load_average_at_start"] is not None:
        print("load average (1, 5, 15 min) at start: " + ", ".join(f"{x:.2f}" for x in env["load_average_at_start"]))
    if env["env"]:
        print("thread variables: " + ", ".join(f"{k}={v}" for k, v in env["env"].items()))
    print(
        f"problem: dense float64, J = {MU} A / ||A||_2 (default_rng({SEED})), vjp = J^T v, jvp = J v, "
        f"{args.steps} steps; {args.warmup} warm-up runs, gc off while timing"
    )
    print("ratio = (solver time / its calls) / (baseline time / its calls); headline: median paired ratio")
    print("extra/unit = median solver time per call minus median baseline time per call; '!' = unexpected call count")
    print(
        "second table: the same samples split into time inside the (timed) callbacks and outside them, per unit; "
        "bookkeeping ratio = (callback + solver outside) / (callback + base outside), low-noise, informational"
    )

    sizes = [(args.n, f"n = {args.n}", args.repeats, args.min_sample)]
    if args.small_n:
        sizes.append(
            (
                args.small_n,
                f"small n: n = {args.small_n}",
                args.small_repeats,
                args.small_min_sample,
            )
        )

    runs: list[dict[str, Any]] = []
    main_results: list[Comparison] = []
    sized_results: list[tuple[int, list[Comparison]]] = []
    for i, (n, label, repeats, min_sample) in enumerate(sizes):
        problem = make_problem(n)
        comparisons = run_size(problem, args.steps, repeats=repeats, warmup=args.warmup, min_sample=min_sample)
        if i == 0:
            main_results = comparisons
        sized_results.append((n, comparisons))
        print()
        print(
            label + f"  ({repeats} paired repeats, samples >= {min_sample:g} s; "
            f"calls per sample: {', '.join(str(c.number) for c in comparisons)})"
        )
        print(format_table(comparisons))
        print()
        print(format_outside_table(comparisons))
        runs.append(
            {
                "n": n,
                "label": label,
                "repeats": repeats,
                "min_sample_s": min_sample,
                "comparisons": [c.as_dict() for c in comparisons],
            }
        )

    elapsed = time.perf_counter() - t_start
    verdicts = []
    print()
    print(f"vector operations: {env['ops']}")
    for (n, results), target in zip(sized_results, TARGETS, strict=False):
        for c in results:
            ok = c.median_paired_ratio <= target
            verdicts.append(
                {
                    "n": n,
                    "name": c.name,
                    "target": target,
                    "median_paired_ratio": c.median_paired_ratio,
                    "bookkeeping_ratio": c.bookkeeping_ratio,
                    "passed": ok,
                    "noisy": c.noisy,
                }
            )
            print(
                f"target n = {n:5d} {c.name:13s} <= {target:.2f}: {'PASS' if ok else 'FAIL'} "
                f"(median paired ratio {c.median_paired_ratio:.4f}, bookkeeping {c.bookkeeping_ratio:.4f})"
                + (" [noisy measurement]" if c.noisy else "")
            )
    neumann = next(c for c in main_results if c.name == "neumann_rbp")
    passed = neumann.median_paired_ratio <= NEUMANN_TARGET
    bookkeeping_within = neumann.bookkeeping_ratio <= NEUMANN_TARGET
    load_end = _load_average()
    load_text = "" if load_end is None else ", load average at end: " + ", ".join(f"{x:.2f}" for x in load_end)
    print(f"total time {elapsed:.1f} s{load_text}")

    if args.json is not None:
        result = {
            "config": {
                "n": args.n,
                "small_n": args.small_n,
                "steps": args.steps,
                "repeats": args.repeats,
                "small_repeats": args.small_repeats,
                "warmup": args.warmup,
                "min_sample_s": args.min_sample,
                "small_min_sample_s": args.small_min_sample,
                "mu": MU,
                "seed": SEED,
                "argv": sys.argv[1:] if argv is None else list(argv),
            },
            "environment": env,
            "runs": runs,
            "targets": verdicts,
            "neumann_target": {
                "target": NEUMANN_TARGET,
                "median_paired_ratio": neumann.median_paired_ratio,
                "ratio_of_medians": neumann.ratio_of_medians,
                "passed": passed,
                "bookkeeping_ratio": neumann.bookkeeping_ratio,
                "bookkeeping_ratio_within_target": bookkeeping_within,
                "callback_per_vjp_us": 1e6 * neumann.callback_per_unit,
                "solver_outside_per_vjp_us": 1e6 * neumann.candidate_outside,
                "baseline_outside_per_vjp_us": 1e6 * neumann.baseline_outside,
            },
            "elapsed_s": elapsed,
            "load_average_at_end": load_end,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

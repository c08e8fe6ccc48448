"""GPU benchmarks: the solvers' vector work on CuPy against the card's memory bandwidth, and CUDA memory.

Part 1, CuPy (``--n`` elements, default 10**7 float32): for ``neumann_rbp``,
``original_rbp`` and ``cg_rbp`` it times a solve of ``K`` iterations (``rtol=0``
so the budget runs out), the same callbacks alone, and a hand-written CuPy loop
that makes the same callback calls and updates without any norm. The VJP (and
JVP) is a diagonal Jacobian, ``v -> d * v`` with ``d`` in [0.5, 0.9]: one
element-wise kernel, as cheap as a VJP gets, so the solver's own work is as
visible as it can be. Reported per iteration:

- ``own us``: (solve time - callback time) / K, the solver's own time: its vector
  updates, the norm, the one host transfer and the Python bookkeeping;
- ``GB/s``: the bytes the solver's updates must move (Neumann: read z and v, write
  z = 3 vectors; original RBP: read J^T z, g and z, write z = 4; CG: 15, namely
  p - J^T p and r - J r at 3 each, the z/r update at 6 and the new direction at 3)
  divided by ``own us``, and as a fraction of a device-to-device copy
  (``cupy.copyto``, 2 vectors moved) measured in the same run;
- ``vs VJPs``: solve time / callback time, the solver's overhead over its VJPs;
- ``vs loop``: solve time / the hand-written loop's time;

each with the fused kernels (the default for CuPy) and with the generic Array-API
updates (``fused_kernels(False)``), and the gain of fusing.

Part 2, PyTorch on CUDA: ``torch.cuda.max_memory_allocated`` above the memory
held before the step, for one training step (forward solve + backward) of
``tanh(h W^T + x)`` with a 512 x 1024 float32 state (``||W||_2 = 0.5``):
Neumann-RBP for K = 5, 20, 100, TBPTT for the same K and BPTT through T = 10,
20, 60 forward iterations.

Run: ``python benchmarks/bench_gpu.py [--n N] [--steps K] [--json FILE]``; it needs
CuPy and/or CUDA torch and skips a part whose library or device is missing.
``nox -s gpu`` (benchmarks/gpu_check.py) runs it after the GPU tests.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rbp_core

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import cgls_baseline, neumann_baseline, original_baseline

BYTES_PER_ITER = {"neumann_rbp": 3, "original_rbp": 4, "cg_rbp": 15}  # vectors moved by the solver's updates


def _median_time(fn: Callable[[], object], sync: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up (kernel compilation, memory pool)
    sync()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_cupy(n: int, steps: int, repeats: int, dtype_name: str) -> dict[str, Any]:
    import cupy

    from rbp_core.backends.cupy import fused_kernels

    dtype = getattr(cupy, dtype_name)
    itemsize = cupy.dtype(dtype).itemsize
    sync = cupy.cuda.Device().synchronize
    rs = cupy.random.RandomState(0)
    d = rs.uniform(0.5, 0.9, n).astype(dtype)
    g = rs.standard_normal(n).astype(dtype)

    def vjp(v: Any) -> Any:
        return d * v

    src, dst = cupy.empty_like(g), cupy.empty_like(g)
    src[...] = g
    t_copy = _median_time(lambda: cupy.copyto(dst, src), sync, 3 * repeats)
    copy_gbs = 2 * n * itemsize / t_copy / 1e9

    def callbacks_only(calls: int) -> Callable[[], object]:
        def run() -> object:
            v = g
            for _ in range(calls):
                v = vjp(v)
            return v

        return run

    # the bare loops of bench_core.py: the same callback calls and updates, no norms
    def loop_neumann() -> object:
        return neumann_baseline(vjp, g, steps)

    def loop_original() -> object:
        return original_baseline(vjp, g, steps)

    def loop_cg() -> object:
        return cgls_baseline(vjp, vjp, g, steps)

    solvers: dict[str, tuple[Callable[[], rbp_core.Solution], Callable[[], object]]] = {
        "neumann_rbp": (lambda: rbp_core.neumann_rbp(vjp, g, steps=steps), loop_neumann),
        "original_rbp": (
            lambda: rbp_core.original_rbp(vjp, g, rtol=0.0, max_iter=steps + 1, throw=False),
            loop_original,
        ),
        "cg_rbp": (lambda: rbp_core.cg_rbp(vjp, vjp, g, rtol=0.0, max_iter=steps, throw=False), loop_cg),
    }
    rows = []
    for name, (solve, loop) in solvers.items():
        sol = solve()
        if sol.num_steps < steps:
            msg = f"{name} stopped after {sol.num_steps} of {steps} iterations ({sol.status.name})"
            raise RuntimeError(msg)
        calls = sol.num_vjp + sol.num_jvp  # the callbacks the solve made, timed alone below
        t_cb = _median_time(callbacks_only(calls), sync, repeats)
        t_loop = _median_time(loop, sync, repeats)
        row: dict[str, Any] = {"solver": name, "iterations": steps, "callbacks": calls, "t_callbacks_s": t_cb}
        row["t_loop_s"] = t_loop
        for fused in (True, False):
            with fused_kernels(fused):
                t = _median_time(solve, sync, repeats)
            own = max(t - t_cb, 1e-12) / steps
            gbs = BYTES_PER_ITER[name] * n * itemsize / own / 1e9
            key = "fused" if fused else "generic"
            row[key] = {
                "t_solve_s": t,
                "own_us_per_iter": own * 1e6,
                "gb_per_s": gbs,
                "fraction_of_copy": gbs / copy_gbs,
                "vs_vjps": t / t_cb,
                "vs_loop": t / t_loop,
            }
        row["fusion_speedup_own"] = row["generic"]["own_us_per_iter"] / row["fused"]["own_us_per_iter"]
        row["fusion_speedup_total"] = row["generic"]["t_solve_s"] / row["fused"]["t_solve_s"]
        rows.append(row)
    return {"n": n, "dtype": dtype_name, "copy_gb_per_s": copy_gbs, "t_copy_s": t_copy, "solvers": rows}


def format_cupy(res: dict[str, Any]) -> str:
    lines = [
        (
            f"CuPy, n = {res['n']:,} {res['dtype']}, K = {res['solvers'][0]['iterations']} iterations; "
            f"device-to-device copy: {res['copy_gb_per_s']:.0f} GB/s"
        ),
        f"{'solver':<13} {'kernels':<8} {'own us/it':>10} {'GB/s':>7} {'of copy':>8} {'vs VJPs':>8} {'vs loop':>8}",
    ]
    for row in res["solvers"]:
        for key in ("fused", "generic"):
            r = row[key]
            lines.append(
                f"{row['solver']:<13} {key:<8} {r['own_us_per_iter']:>10.1f} {r['gb_per_s']:>7.0f} "
                f"{r['fraction_of_copy']:>8.2f} {r['vs_vjps']:>8.2f} {r['vs_loop']:>8.2f}"
            )
        lines.append(
            f"{'':<13} fusion: own time x{row['fusion_speedup_own']:.2f} faster, "
            f"whole solve x{row['fusion_speedup_total']:.2f}"
        )
    return "\n".join(lines)


def bench_torch_memory(batch: int, n: int) -> dict[str, Any]:
    import torch

    from rbp_core.backends.torch import BPTT, TBPTT, fixed_point

    dev = torch.device("cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    A = torch.randn(n, n, generator=gen)
    W = (A * (0.5 / torch.linalg.matrix_norm(A, ord=2))).to(dev).requires_grad_()
    x = torch.randn(batch, n, generator=gen).to(dev)
    g = torch.randn(batch, n, generator=gen).to(dev)

    def f(h: Any) -> Any:
        return torch.tanh(h @ W.T + x)

    def step(backward: Any, forward: Any) -> tuple[float | None, int | str]:
        W.grad = None
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        h, info = fixed_point(f, torch.zeros_like(x), backward=backward, solver=forward, throw=False)
        try:
            torch.autograd.backward(h, g)
        except (FloatingPointError, rbp_core.ConvergenceError) as exc:  # reported in the table, not hidden
            return None, f"{type(exc).__name__}: {exc}"
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        steps = info.forward.num_steps
        del h, info
        return peak / 2**20, steps

    converge = rbp_core.FixedPointIteration(rtol=1e-5, max_iter=500)
    step(rbp_core.Neumann(steps=2), converge)  # warm-up: cuBLAS workspace, caching allocator
    rows = []
    for k in (5, 20, 100):
        for name, method in (("Neumann", rbp_core.Neumann(steps=k)), ("TBPTT", TBPTT(steps=k))):
            peak, fwd = step(method, converge)
            rows.append({"method": name, "k": k, "peak_mib": peak, "forward_steps": fwd})
    for t in (10, 20, 60):
        exact = rbp_core.FixedPointIteration(rtol=0.0, max_iter=t, divergence_factor=None)
        peak, fwd = step(BPTT(), exact)
        rows.append({"method": "BPTT", "k": t, "peak_mib": peak, "forward_steps": fwd})
    state_mib = batch * n * 4 / 2**20
    return {"batch": batch, "n": n, "state_mib": state_mib, "rows": rows}


def format_torch(res: dict[str, Any]) -> str:
    lines = [
        (
            f"PyTorch CUDA, state {res['batch']} x {res['n']} float32 ({res['state_mib']:.0f} MiB): peak memory "
            "of one step above what was held before (torch.cuda.max_memory_allocated)"
        ),
        f"{'method':<8} {'K or T':>6} {'peak MiB':>9} {'forward its':>11}",
    ]
    for r in res["rows"]:
        if r["peak_mib"] is None:
            lines.append(f"{r['method']:<8} {r['k']:>6} FAILED {r['forward_steps']}")
        else:
            lines.append(f"{r['method']:<8} {r['k']:>6} {r['peak_mib']:>9.1f} {r['forward_steps']:>11}")
    peaks = {(r["method"], r["k"]): r["peak_mib"] for r in res["rows"]}
    if None in peaks.values():
        return "\n".join(lines)
    growth_neumann = peaks[("Neumann", 100)] - peaks[("Neumann", 5)]
    growth_tbptt = peaks[("TBPTT", 100)] - peaks[("TBPTT", 5)]
    lines.append(
        f"growth K = 5 -> 100: Neumann {growth_neumann:+.1f} MiB, TBPTT {growth_tbptt:+.1f} MiB; "
        f"BPTT T = 10 -> 60: {peaks[('BPTT', 60)] - peaks[('BPTT', 10)]:+.1f} MiB"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000_000, help="CuPy state size (default 10**7)")
    p.add_argument("--small-n", type=int, default=1_000_000, help="a second, smaller CuPy size (0: skip)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--steps", type=int, default=50, help="K, iterations per solve")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--part", choices=["all", "cupy", "torch"], default="all", help="run one part only")
    args = p.parse_args(argv)
    out: dict[str, Any] = {}
    have_cupy = False
    if args.part in ("all", "cupy"):
        try:
            import cupy

            have_cupy = cupy.cuda.runtime.getDeviceCount() > 0
        except Exception as exc:  # noqa: BLE001 - any failure: no CuPy part
            print(f"CuPy part skipped: {type(exc).__name__}: {exc}")
    if have_cupy:
        out["cupy"] = []
        for n in [args.n] + ([args.small_n] if args.small_n else []):
            res = bench_cupy(n, args.steps, args.repeats, args.dtype)
            cupy.get_default_memory_pool().free_all_blocks()
            out["cupy"].append(res)
            print(format_cupy(res), flush=True)
    have_cuda = False
    if args.part in ("all", "torch"):
        try:
            import torch

            have_cuda = torch.cuda.is_available()
        except ImportError:
            pass
    if have_cuda:
        res = bench_torch_memory(args.batch, args.hidden)
        out["torch_cuda_memory"] = res
        print(format_torch(res), flush=True)
    elif args.part in ("all", "torch"):
        print("PyTorch CUDA part skipped: no CUDA torch")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU check: the CuPy and CUDA-torch tests, then the GPU benchmarks, with a short summary.

Runs with a plain ``python3`` that has NumPy, CuPy and/or CUDA PyTorch, pytest and
Hypothesis, nothing else installed: without ``--installed`` it assembles rbp-core
from this source tree into a temporary folder (``rbp_core/`` plus ``backends/`` as
``rbp_core/backends``, the layout the wheel has) and unpacks the pure-Python wheels
it finds in ``--wheels`` (default ``.whl``: array-api-compat and array-api-strict)
for the packages that are missing, and puts that folder first on the path of the
processes it starts. Fetch those wheels where there is network, next to the checkout:
``pip download --no-deps --only-binary=:all: -d .whl array-api-compat array-api-strict``.
``nox -s gpu`` runs it with ``--installed`` in a virtualenv where everything is installed.

Steps, each with a time limit, the whole in under 5 minutes on one GPU:

1. the environment: Python, NumPy, CuPy, torch, the GPU;
2. ``pytest -m gpu`` over the backend matrix, the CuPy adapter's tests and the
   PyTorch adapter's CUDA tests, with ``RBP_BACKENDS=cupy,torch-cuda`` (a missing
   backend is an error, not a skip); pytest-xdist is used when present;
3. ``benchmarks/bench_gpu.py``.

The summary at the end gives the test counts and the benchmarks' headline figures;
``--out DIR`` keeps the JUnit XML, the logs and the benchmark JSON. Exit status 0 when
every step passed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SKIP_FILES = ("test_examples_", "test_packaging", "test_readme")


def assemble(site: Path, wheels: Path) -> list[str]:
    """rbp_core with its backends, and the missing pure-Python packages, into ``site``."""
    notes = []
    shutil.copytree(ROOT / "rbp_core", site / "rbp_core", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "backends", site / "rbp_core" / "backends", ignore=shutil.ignore_patterns("__pycache__"))
    for wheel in sorted(wheels.glob("*.whl")) if wheels.is_dir() else []:
        with zipfile.ZipFile(wheel) as zf:
            tops = {n.split("/")[0] for n in zf.namelist() if not n.split("/")[0].endswith((".dist-info", ".data"))}
            packages = {t.removesuffix(".py") for t in tops}
            if all(importlib.util.find_spec(p) is not None for p in packages):
                notes.append(f"{wheel.name}: installed already, not used")
                continue
            zf.extractall(site)
            notes.append(f"{wheel.name}: unpacked")
    return notes


def environment(env: dict[str, str]) -> str:
    code = r"""
import platform, sys
print("python", platform.python_version(), sys.executable)
import numpy; print("numpy", numpy.__version__)
import array_api_compat; print("array-api-compat", array_api_compat.__version__)
try:
    import array_api_strict; print("array-api-strict", array_api_strict.__version__)
except ImportError as e: print("array-api-strict: missing", e)
import rbp_core, rbp_core.backends; print("rbp_core", rbp_core.__version__, rbp_core.__file__)
try:
    import cupy
    print("cupy", cupy.__version__, "CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(),
          "devices", cupy.cuda.runtime.getDeviceCount())
    props = cupy.cuda.runtime.getDeviceProperties(0)
    print("gpu", props["name"].decode(), props["multiProcessorCount"], "SMs",
          round(props["totalGlobalMem"] / 2**30), "GiB")
except Exception as e: print("cupy: unavailable:", type(e).__name__, e)
try:
    import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())
except Exception as e: print("torch: unavailable:", type(e).__name__, e)
"""
    proc = subprocess.run(
        [sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    return (proc.stdout + proc.stderr).strip()


def run_tests(env: dict[str, str], out: Path, timeout: float, marker: str) -> dict[str, Any]:
    files = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "tests").glob("test_*.py"))
        if not p.name.startswith(SKIP_FILES)
    ]
    junit = out / "junit.xml"
    cmd = [sys.executable, "-P", "-m", "pytest", *files, "-m", marker, "-p", "no:cacheprovider", "-q"]
    # pytest-benchmark, where installed, warns under xdist, and the suite turns warnings into errors
    cmd += ["-p", "no:benchmark"]
    cmd += ["--junitxml", str(junit), "-o", "log_cli=false", "-o", "junit_family=xunit2"]
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "4"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        log, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        log = f"{exc.stdout or ''}{exc.stderr or ''}\nTIMEOUT after {timeout:.0f} s"
        rc = -1
    (out / "pytest.log").write_text(log)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    if junit.exists():
        for suite in ET.parse(junit).getroot().iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
        for case in ET.parse(junit).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    return {"rc": rc, "seconds": time.perf_counter() - start, "counts": counts, "failed": failed, "log": log}


def run_bench(env: dict[str, str], out: Path, timeout: float, extra: list[str]) -> dict[str, Any]:
    """bench_gpu.py, its PyTorch part and its CuPy part in separate processes; their JSON merged."""
    start = time.perf_counter()
    logs, rc, merged = [], 0, {}
    for part in ("torch", "cupy"):
        part_json = out / f"bench_gpu_{part}.json"
        cmd = [sys.executable, "-P", str(ROOT / "benchmarks" / "bench_gpu.py"), "--part", part]
        cmd += ["--json", str(part_json), *extra]
        left = timeout - (time.perf_counter() - start)
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left, check=False)
            logs.append(proc.stdout + proc.stderr)
            rc = rc or proc.returncode
        except subprocess.TimeoutExpired as exc:
            logs.append(f"{exc.stdout or ''}{exc.stderr or ''}\nTIMEOUT after {timeout:.0f} s")
            rc = rc or -1
        if part_json.exists():
            merged.update(json.loads(part_json.read_text()))
    (out / "bench_gpu.json").write_text(json.dumps(merged, indent=1))
    log = "\n".join(logs)
    (out / "bench_gpu.log").write_text(log)
    return {"rc": rc, "seconds": time.perf_counter() - start, "log": log}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--installed", action="store_true", help="use the installed rbp-core and packages as they are")
    p.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="pure-Python wheels for missing packages")
    p.add_argument("--out", type=Path, default=None, help="keep logs, JUnit XML and benchmark JSON here")
    p.add_argument("--test-timeout", type=float, default=200.0)
    p.add_argument("--bench-timeout", type=float, default=90.0)
    p.add_argument("--backends", default="cupy,torch-cuda", help="RBP_BACKENDS for the tests")
    p.add_argument("--marker", default="gpu", help="pytest -m expression (default: gpu)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("bench_args", nargs="*", help="passed to bench_gpu.py (after --)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = args.out or Path(tempfile.mkdtemp(prefix="rbp-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, RBP_BACKENDS=args.backends, HYPOTHESIS_PROFILE="ci", PYTHONUNBUFFERED="1")
    notes: list[str] = []
    if not args.installed:
        site = Path(tempfile.mkdtemp(prefix="rbp-gpu-site-"))
        notes = assemble(site, args.wheels)
        env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    print(f"== GPU check of rbp-core ({platform.node()}), outputs in {out}", flush=True)
    for n in notes:
        print("  ", n)
    print("== environment", flush=True)
    print(environment(env), flush=True)

    ok = True
    tests: dict[str, Any] | None = None
    if not args.skip_tests:
        print(f"== tests (pytest -m {args.marker!r}, RBP_BACKENDS={args.backends})", flush=True)
        tests = run_tests(env, out, args.test_timeout, args.marker)
        tail = tests["log"].strip().splitlines()
        print("\n".join(tail[-25:]), flush=True)
        ok &= tests["rc"] == 0
    bench: dict[str, Any] | None = None
    if not args.skip_bench:
        print("== benchmarks (benchmarks/bench_gpu.py)", flush=True)
        bench = run_bench(env, out, args.bench_timeout, args.bench_args)
        print(bench["log"].strip(), flush=True)
        ok &= bench["rc"] == 0

    print("== summary", flush=True)
    if tests is not None:
        c = tests["counts"]
        passed = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
        print(
            f"tests: {passed} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped "
            f"in {tests['seconds']:.0f} s (pytest exit {tests['rc']})"
        )
        for name in tests["failed"][:20]:
            print("  FAILED", name)
    if bench is not None:
        print(f"benchmarks: exit {bench['rc']} in {bench['seconds']:.0f} s")
        result_json = out / "bench_gpu.json"
        if result_json.exists():
            res = json.loads(result_json.read_text())
            for part in res.get("cupy", []):
                for row in part["solvers"]:
                    f, g = row["fused"], row["generic"]
                    print(
                        f"  cupy n={part['n']:.0e} {row['solver']:<13} own {f['own_us_per_iter']:.1f} us/it "
                        f"({f['fraction_of_copy']:.2f} of copy bandwidth), {f['vs_vjps']:.2f}x its VJPs; "
                        f"generic {g['own_us_per_iter']:.1f} us/it; fusion x{row['fusion_speedup_own']:.2f}"
                    )
            mem = res.get("torch_cuda_memory")
            if mem:
                pk = {(r["method"], r["k"]): r["peak_mib"] or math.nan for r in mem["rows"]}
                print(
                    f"  torch cuda peak MiB: Neumann K=5/20/100 {pk[('Neumann', 5)]:.0f}/{pk[('Neumann', 20)]:.0f}/"
                    f"{pk[('Neumann', 100)]:.0f}, TBPTT {pk[('TBPTT', 5)]:.0f}/{pk[('TBPTT', 20)]:.0f}/"
                    f"{pk[('TBPTT', 100)]:.0f}, BPTT T=10/20/60 {pk[('BPTT', 10)]:.0f}/{pk[('BPTT', 20)]:.0f}/"
                    f"{pk[('BPTT', 60)]:.0f}"
                )
    print(f"GPU check {'PASSED' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

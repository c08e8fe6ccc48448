"""Replay the Hopfield experiment's Neumann-RBP backward solves and measure how each series grows.

The evidence behind Neumann-RBP's default ``divergence_factor`` (docs/method.md). It runs
``examples/hopfield.py``'s training of Neumann-RBP with the divergence test off (so the trajectory
is the one the old default of 1e4 produced: every series is applied), records every backward
solve's term norms ``||g||, ||v_1||, ..., ||v_K||`` through a subclass of ``rbp_core.Neumann``
(any adjoint method plugs into the adapter), and
reports, per candidate factor F, which solves the test "a term exceeds F times the smallest
before it" would flag.

Run: ``OMP_NUM_THREADS=1 python examples/hopfield_replay.py [--epochs 145] [--truncation 10]
[--out DIR]`` (8 to 9 minutes for 145 epochs on one core); other options (``--quick``,
``--hidden``, ``--images``, ...) go to hopfield.py.
Writes ``DIR/terms.json`` (per solve: epoch, step, term norms) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import rbp_core

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hopfield

FACTORS = (2.0, 3.0, 5.0, 10.0, 20.0, 100.0, 1e4)


@dataclass(frozen=True)
class RecordingNeumann(rbp_core.Neumann):
    """``rbp_core.Neumann(steps, divergence_factor=None)`` that keeps every solve's term norms.

    The driver hands a successful solve's term norms (and ``||g||``) to the method's
    ``success_note``; this subclass records them there. With the divergence test off every
    finite series succeeds, so every solve but a non-finite one is recorded.
    """

    divergence_factor: float | None = None
    records: list[list[float]] = field(default_factory=list, compare=False)

    def success_note(self, norms: tuple[float, ...], reference: float) -> str:
        self.records.append([reference, *norms])
        return super().success_note(norms, reference)


def trips(terms: Sequence[float], factor: float) -> int | None:
    """The VJP at which a term first exceeds ``factor`` times the smallest before it (``||g||`` included)."""
    best = terms[0]
    for t, v in enumerate(terms[1:], start=1):
        if v > factor * best:
            return t
        best = min(best, v)
    return None


def growth(terms: Sequence[float]) -> float:
    """The largest ratio of a term to the smallest before it."""
    best, worst = terms[0], 0.0
    for v in terms[1:]:
        worst, best = max(worst, v / best), min(best, v)
    return worst


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=145)
    p.add_argument("--truncation", type=int, default=10)
    p.add_argument("--out", default="hopfield-replay")
    args, rest = p.parse_known_args(argv)  # the rest goes to hopfield.py: --quick, --hidden, --images, ...
    recorder = RecordingNeumann(steps=args.truncation - 1)
    out = Path(args.out)
    argv_h = ["--methods", "Neumann-RBP", "--truncation", str(args.truncation), "--epochs", str(args.epochs)]
    original = hopfield.backward_method
    hopfield.backward_method = lambda name, T, divergence_factor=None: recorder  # noqa: ARG005
    try:
        rc = hopfield.main([*argv_h, "--out", str(out), *rest])
    finally:
        hopfield.backward_method = original
    steps_per_epoch = len(recorder.records) // max(args.epochs, 1)
    rows = [
        {"epoch": i // steps_per_epoch + 1, "step": i % steps_per_epoch + 1, "terms": terms}
        for i, terms in enumerate(recorder.records)
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "terms.json").write_text(json.dumps(rows))
    print(f"\n{len(rows)} backward solves, {steps_per_epoch} per epoch")
    print(f"{'factor':>8}  {'first flagged solve (epoch, step, at VJP)':42}  flagged in all")
    for factor in FACTORS:
        flagged = [(r["epoch"], r["step"], trips(r["terms"], factor)) for r in rows if trips(r["terms"], factor)]
        first = str(flagged[0]) if flagged else "none"
        print(f"{factor:8g}  {first:42}  {len(flagged)}")
    grown = [r for r in rows if growth(r["terms"]) > 1.0]  # a term above the smallest before it
    if grown:
        first = grown[0]
        before = [growth(r["terms"]) for r in rows[: rows.index(first)]]
        print(
            f"first series that grew: epoch {first['epoch']}, step {first['step']}, by "
            f"{growth(first['terms']):.3g}; the largest ratio in the {len(before)} solves before it: "
            f"{max(before, default=0.0):.3g}"
        )
    return rc


if __name__ == "__main__":
    sys.exit(main())

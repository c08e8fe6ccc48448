"""The per-sample driver's screen of the common step: never lets pass a step at which a sample meets a test."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from rbp_core._sample_driver import _Screen

norms = st.lists(st.floats(1e-200, 1e200), min_size=1, max_size=8)


def _exact_forward(rs: list[float], hns: list[float], rtol: float, atol: float) -> bool:
    """The driver's exact per-sample tolerance test on norms: does any sample stop?"""
    return any(r <= max(rtol * hn, atol) for r, hn in zip(rs, hns, strict=True))


@given(norms, st.data(), st.floats(1e-14, 1e-1), st.sampled_from([0.0, 1e-300, 1e-8]))
def test_forward_screen_is_conservative(hns: list[float], data: st.DataObject, rtol: float, atol: float) -> None:
    # Residuals near each sample's threshold (within a few roundings either side) or far from it.
    rel = data.draw(
        st.lists(
            st.sampled_from([1 - 1e-15, 1.0, 1 + 1e-15, 1 + 1e-13, 2.0, 1e6]), min_size=len(hns), max_size=len(hns)
        )
    )
    rs = [max(rtol * hn, atol) * k for hn, k in zip(hns, rel, strict=True)]
    rs = [r for r in rs if 0.0 < r < math.inf] or [1.0]
    hns = hns[: len(rs)]
    cols = ([r * r for r in rs], [h * h for h in hns])
    if not all(0.0 < v < math.inf for c in cols for v in c):
        return
    screen = _Screen(forward=True, rtol=rtol, atol=atol, factor=math.inf, breakdown=False)
    if screen.passes(cols, [], [], [], 2):
        assert not _exact_forward([math.sqrt(v) for v in cols[0]], [math.sqrt(v) for v in cols[1]], rtol, atol)


def test_backward_divergence_and_breakdown_screens() -> None:
    sq = [4.0, 9.0]
    at_threshold = _Screen(forward=False, rtol=1e-8, atol=0.0, factor=math.inf, breakdown=False)
    assert not at_threshold.passes((sq,), [2.0, 1.0], [], [], 2)  # sample 0 is at its threshold 2
    below = _Screen(forward=False, rtol=1e-8, atol=0.0, factor=math.inf, breakdown=False)
    assert below.passes((sq,), [1.9, 2.9], [], [], 2)
    diverging = _Screen(forward=False, rtol=1e-8, atol=0.0, factor=10.0, breakdown=False)
    assert not diverging.passes((sq,), [0.1, 0.1], [0.3, 1.0], [], 2)  # 3 = 10 x its smallest 0.3
    growing = _Screen(forward=False, rtol=1e-8, atol=0.0, factor=math.inf, breakdown=True)
    assert not growing.passes((sq,), [0.1, 0.1], [], [2.0, 2.5], 2)  # sample 1 grew from 2.5 to 3
    assert growing.passes((sq,), [0.1, 0.1], [], [2.1, 3.1], 2)


def test_flush_records_the_waiting_steps() -> None:
    screen = _Screen(forward=True, rtol=1e-8, atol=0.0, factor=100.0, breakdown=False)
    steps = [([4.0, 16.0], [1.0, 4.0]), ([1.0, 9.0], [1.0, 9.0])]
    for cols in steps:
        assert screen.passes(cols, [], [5.0, 5.0], [], 2)
    hist: list[list[float]] = [[7.0], [8.0]]
    prev, best, before, scale = screen.flush(hist, [7.0, 8.0], [5.0, 5.0], [0.5, 0.5], [0.6, 0.6])
    assert hist == [[7.0, 2.0, 1.0], [8.0, 4.0, 3.0]]
    assert prev == [1.0, 3.0]
    assert best == [1.0, 3.0]
    assert before == [1.0, 2.0]
    assert scale == [1.0, 3.0]
    assert not screen.pending

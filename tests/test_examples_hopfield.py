"""Tests of examples/hopfield.py: the hand-written JVP, the IDX loader and a smoke run of the script."""

from __future__ import annotations

import gzip
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import rbp_core
from example_support import Amplified, Broken, loaded_example


@pytest.fixture(scope="module")
def hopfield():
    with loaded_example("hopfield") as module:
        yield module


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_idx_loader(hopfield, tmp_path, compress):
    rng = np.random.default_rng(0)
    labels = np.array([3, 1, 0, 2, 9, 4, 5, 1, 6, 7, 8, 0], dtype=np.uint8)
    images = rng.integers(0, 256, size=(len(labels), 5, 4), dtype=np.uint8)
    images[2, 0, 0], images[2, 0, 1] = 128, 127  # 128/255 > 0.5 >= 127/255
    suffix = ".gz" if compress else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, compress)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, compress)

    got_images, got_labels = hopfield.load_idx_dir(tmp_path)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)

    binary, index = hopfield.first_of_each_class(got_images, got_labels)
    np.testing.assert_array_equal(index, [2, 1, 3, 0, 5, 6, 8, 9, 10, 4])
    np.testing.assert_array_equal(binary, (images[index] / 255.0 > 0.5).astype(np.uint8))
    assert binary[0, 0, 0] == 1
    assert binary[0, 0, 1] == 0

    out = hopfield.write_data_file(tmp_path, tmp_path / "ten.npz")
    np.testing.assert_array_equal(hopfield.load_data_file(out), binary.reshape(10, -1))


def test_idx_loader_errors(hopfield, tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        hopfield.read_idx(tmp_path / "train-images-idx3-ubyte")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        hopfield.load_idx_dir(tmp_path / "empty")


def test_shipped_data(hopfield):
    assert hopfield.DATA_FILE.stat().st_size < 100_000
    images = hopfield.load_data_file()
    assert images.shape == (10, 784)
    assert set(np.unique(images)) == {0, 1}
    assert (images.sum(axis=1) > 0).all()


@pytest.mark.parametrize("a", [1.0, 0.3])
def test_hopfield_jvp_matches_finite_differences(hopfield, a):
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(1)
    n, n_clamped, b = 40, 12, 0.5
    W0 = torch.randn(n, n, generator=gen, dtype=torch.float64)
    W = hopfield.symmetric_weight(W0, 1.0 - torch.eye(n, dtype=torch.float64))
    h = 2.0 * torch.randn(n, generator=gen, dtype=torch.float64)
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    x = torch.rand(n_clamped, generator=gen, dtype=torch.float64)

    def f(state):
        return hopfield.hopfield_step(W, state, x, a, b)

    eps = 1e-6
    fd = (f(h + eps * v) - f(h - eps * v)) / (2 * eps)
    jv = hopfield.hopfield_jvp(W, h, v, a, b, n_clamped=n_clamped)
    assert torch.allclose(jv, fd, rtol=1e-7, atol=1e-8)
    assert torch.equal(jv[:n_clamped], torch.zeros(n_clamped, dtype=torch.float64))
    # both terms matter: dropping the diagonal factor sigma'(b h) or the (1 - a) term is caught
    s = torch.sigmoid(b * h)
    wrong = (1.0 - a) * v + W @ (s * (1.0 - s) * v)
    assert not torch.allclose(wrong[n_clamped:], fd[n_clamped:], rtol=1e-3)
    # and without the clamp
    u = hopfield.hopfield_update
    fd_free = (u(W, h + eps * v, a, b) - u(W, h - eps * v, a, b)) / (2 * eps)
    assert torch.allclose(hopfield.hopfield_jvp(W, h, v, a, b), fd_free, rtol=1e-7, atol=1e-8)


def test_smoke_run(hopfield, tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    out = tmp_path / "run"
    argv = ["--quick", "--epochs", "2", "--hidden", "16", "--images", "3", "--truncation", "5", "--out", str(out)]
    assert hopfield.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["methods"]) == ["BPTT", "TBPTT", "RBP", "CG-RBP", "Neumann-RBP"]
    for name, m in metrics["methods"].items():
        assert m["status"] in ("ok", "diverged"), (name, m["reason"])
        assert len(m["train_curve"]) >= 1
        assert m["wall_time_s"] > 0
        assert m["backward_saved_kb"] is not None
        if m["status"] == "ok":
            assert len(m["train_curve"]) == 2
            assert np.isfinite(m["test_recall_error"])
            assert len(m["forward_difference_norms"]) == metrics["settings"]["updates"] == hopfield.QUICK_UPDATES
            assert 0 <= m["recalled_nearest_own_image"] <= 3
        # the growth of each epoch's backward solves (none for BPTT and TBPTT, which make no solve)
        want = 0 if name in ("BPTT", "TBPTT") else len(m["train_curve"])
        assert len(m["backward_term_growth"]) == want
    # constant memory of the RBP methods, linear in the recorded steps for TBPTT
    kb = {name: m["backward_saved_kb"] for name, m in metrics["methods"].items()}
    assert kb["Neumann-RBP"] < kb["TBPTT"]
    for png in ("loss_curves.png", "forward_difference.png", "recall.png"):
        assert (out / png).stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "Neumann-RBP" in printed
    assert "recall err" in printed
    assert "all zeros" in printed
    assert "lower is better" in printed
    assert "own image" in printed
    assert "Neumann-RBP: ok, 2/2 epochs" in printed


def _small_run(hopfield, out: Path, methods: str) -> tuple[int, dict]:
    argv = ["--epochs", "2", "--hidden", "16", "--images", "2", "--truncation", "5", "--methods", methods]
    rc = hopfield.main([*argv, "--out", str(out)])
    return rc, json.loads((out / "metrics.json").read_text())


def _replace_rbp_backward(hopfield, monkeypatch, replacement) -> None:
    """Make the script's "RBP" use ``replacement``; the other methods stay as they are."""
    original = hopfield.backward_method
    monkeypatch.setattr(
        hopfield, "backward_method", lambda name, T, **kw: replacement if name == "RBP" else original(name, T, **kw)
    )


def test_divergence_is_a_result_and_a_bug_is_not(hopfield, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")

    _replace_rbp_backward(hopfield, monkeypatch, Amplified())
    rc, metrics = _small_run(hopfield, tmp_path / "diverged", "RBP,Neumann-RBP")
    assert rc == 0
    rbp = metrics["methods"]["RBP"]
    assert rbp["status"] == "diverged"
    assert rbp["diverged_epoch"] == 1
    assert "backward solve" in rbp["reason"]
    assert metrics["methods"]["Neumann-RBP"]["status"] == "ok"

    _replace_rbp_backward(hopfield, monkeypatch, Broken())
    rc, metrics = _small_run(hopfield, tmp_path / "broken", "RBP,Neumann-RBP")
    assert rc == 1
    assert metrics["methods"]["RBP"]["status"] == "error"
    assert "a bug in a backward method" in metrics["methods"]["RBP"]["reason"]
    assert metrics["methods"]["Neumann-RBP"]["status"] == "ok"


@dataclass(frozen=True)
class _NaNs(Amplified):
    """A backward solve that goes non-finite."""

    max_iter: int = 5
    factor: float = float("nan")


def test_skip_on_diverged_skips_the_step_and_nonfinite_still_stops(hopfield, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    _replace_rbp_backward(hopfield, monkeypatch, Amplified())
    argv = ["--epochs", "3", "--hidden", "16", "--images", "2", "--truncation", "5", "--on-diverged", "skip"]
    assert hopfield.main([*argv, "--methods", "RBP,Neumann-RBP", "--out", str(tmp_path / "a")]) == 0
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    rbp, neumann = metrics["methods"]["RBP"], metrics["methods"]["Neumann-RBP"]
    assert metrics["settings"]["on_diverged"] == "skip"
    # every backward solve diverges: every step is skipped, the weights never move, the loss stays put
    assert rbp["status"] == "ok"
    assert rbp["skipped_steps"] == [1, 1, 2, 2, 3, 3]
    assert rbp["backward_statuses"] == {"DIVERGED": 6}
    assert rbp["train_curve"][0] == rbp["train_curve"][1] == rbp["train_curve"][2]
    assert neumann["skipped_steps"] == []
    assert neumann["train_curve"][2] < neumann["train_curve"][0]
    # a non-finite solve is not skipped: it stops the method
    _replace_rbp_backward(hopfield, monkeypatch, _NaNs())
    assert hopfield.main([*argv, "--methods", "RBP", "--out", str(tmp_path / "b")]) == 0
    rbp = json.loads((tmp_path / "b" / "metrics.json").read_text())["methods"]["RBP"]
    assert rbp["status"] == "diverged"
    assert rbp["diverged_epoch"] == 1
    assert rbp["skipped_steps"] == []


def test_merge_of_single_method_runs_equals_one_run(hopfield, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    rc, both = _small_run(hopfield, tmp_path / "both", "BPTT,Neumann-RBP")
    assert rc == 0
    for m in ("Neumann-RBP", "BPTT"):
        assert _small_run(hopfield, tmp_path / m, m)[0] == 0
    assert (
        hopfield.main(["--merge", str(tmp_path / "Neumann-RBP"), str(tmp_path / "BPTT"), "--out", str(tmp_path / "m")])
        == 0
    )
    merged = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert list(merged["methods"]) == ["BPTT", "Neumann-RBP"]  # the usual order, whatever the order given
    for name, m in merged["methods"].items():
        ref = both["methods"][name]
        # same seeds: the same training, whether the methods run in one process or in two
        np.testing.assert_allclose(m["train_curve"], ref["train_curve"], rtol=1e-6)
        assert m["forward_updates"] == ref["forward_updates"]
        assert m["backward_saved_kb"] == ref["backward_saved_kb"]
    for png in ("loss_curves.png", "forward_difference.png", "recall.png"):
        assert (tmp_path / "m" / png).stat().st_size > 1000
    # runs with different settings are refused
    argv = ["--epochs", "1", "--hidden", "16", "--images", "2", "--truncation", "6", "--methods", "RBP"]
    assert hopfield.main([*argv, "--out", str(tmp_path / "other")]) == 0
    with pytest.raises(ValueError, match="epochs: 1 vs 2"):
        hopfield.merge_runs([tmp_path / "BPTT", tmp_path / "other"], tmp_path / "bad")


def _rewrite_settings(run: Path, **changes) -> None:
    path = run / "metrics.json"
    metrics = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            del metrics["settings"][k]
        else:
            metrics["settings"][k] = v
    path.write_text(json.dumps(metrics))


def test_merge_rules_for_truncation_time_limit_and_older_runs(hopfield, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    argv = ["--epochs", "2", "--hidden", "16", "--images", "2", "--methods"]
    assert hopfield.main([*argv, "BPTT", "--truncation", "9", "--out", str(tmp_path / "BPTT")]) == 0
    assert hopfield.main([*argv, "RBP", "--truncation", "5", "--out", str(tmp_path / "RBP")]) == 0
    assert hopfield.main([*argv, "TBPTT", "--truncation", "6", "--out", str(tmp_path / "TBPTT")]) == 0
    # BPTT does not use the truncation: its run joins runs of any truncation, which the merge keeps
    merged_runs = hopfield.merge_runs([tmp_path / "BPTT", tmp_path / "RBP"], tmp_path / "m")
    assert [r.method for r in merged_runs] == ["BPTT", "RBP"]
    merged = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert merged["settings"]["truncation"] == 5
    assert [r["truncation"] for r in merged["merged_runs"]] == [9, 5]
    # two methods that use it must share it
    with pytest.raises(ValueError, match=r"truncations \[5, 6\]"):
        hopfield.merge_runs([tmp_path / "RBP", tmp_path / "TBPTT"], tmp_path / "bad")
    # the time limit is per method; a run from before --divergence-factor existed, in another checkout,
    # has the same settings
    _rewrite_settings(tmp_path / "BPTT", time_limit=100.0, divergence_factor=None)
    _rewrite_settings(tmp_path / "RBP", data="/elsewhere/examples/data/fashion_mnist_first10.npz")
    hopfield.merge_runs([tmp_path / "BPTT", tmp_path / "RBP"], tmp_path / "m2")
    merged = json.loads((tmp_path / "m2" / "metrics.json").read_text())
    assert merged["settings"]["time_limit"] == "per run, see merged_runs"
    assert [r["time_limit"] for r in merged["merged_runs"]] == [100.0, None]
    assert merged["settings"]["data"] == "examples/data/fashion_mnist_first10.npz"
    # but a different divergence factor or data file is a different experiment
    _rewrite_settings(tmp_path / "RBP", divergence_factor=100.0)
    with pytest.raises(ValueError, match=r"divergence_factor: 100\.0 vs None"):
        hopfield.merge_runs([tmp_path / "BPTT", tmp_path / "RBP"], tmp_path / "bad")
    _rewrite_settings(tmp_path / "RBP", divergence_factor=None, data="/elsewhere/idx")
    with pytest.raises(ValueError, match="data: '/elsewhere/idx'"):
        hopfield.merge_runs([tmp_path / "BPTT", tmp_path / "RBP"], tmp_path / "bad")


def test_divergence_factor_reaches_the_rbp_methods(hopfield, tmp_path, monkeypatch):
    pytest.importorskip("torch")

    assert hopfield.main(["--divergence-factor", "1", "--out", str(tmp_path)]) == 2
    defaults = {
        "RBP": rbp_core.OriginalRBP().divergence_factor,
        "Neumann-RBP": rbp_core.Neumann(steps=1).divergence_factor,
    }
    for name, default in defaults.items():
        assert hopfield.backward_method(name, 5, divergence_factor=20.0).divergence_factor == 20.0
        assert hopfield.backward_method(name, 5).divergence_factor == default
    seen = []
    original = hopfield.backward_method

    def spy(name, T, **kw):
        seen.append(kw)
        return original(name, T, **kw)

    monkeypatch.setattr(hopfield, "backward_method", spy)
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    argv = ["--epochs", "1", "--hidden", "16", "--images", "2", "--methods", "Neumann-RBP", "--divergence-factor", "50"]
    assert hopfield.main([*argv, "--out", str(tmp_path)]) == 0
    assert seen == [{"divergence_factor": 50.0}]
    assert json.loads((tmp_path / "metrics.json").read_text())["settings"]["divergence_factor"] == 50.0


def test_time_limit_stops_at_an_epoch_boundary(hopfield, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    argv = ["--epochs", "50", "--hidden", "16", "--images", "2", "--truncation", "5", "--methods", "Neumann-RBP"]
    assert hopfield.main([*argv, "--time-limit", "0", "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())["methods"]["Neumann-RBP"]
    assert m["stopped_by_time_limit"] is True
    assert m["epochs_completed"] == len(m["train_curve"]) == 1
    assert np.isfinite(m["test_recall_error"])


def test_replay_records_every_series_and_reports_the_factors(tmp_path, capsys):
    pytest.importorskip("torch")
    with loaded_example("hopfield_replay") as replay:
        rc = replay.main(["--epochs", "2", "--hidden", "16", "--images", "3", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "terms.json").read_text())
    assert [(r["epoch"], r["step"]) for r in rows] == [(e, s) for e in (1, 2) for s in (1, 2, 3)]
    assert all(len(r["terms"]) == 10 for r in rows)  # ||g|| and the 9 VJPs of truncation 10
    out = capsys.readouterr().out
    assert "6 backward solves, 3 per epoch" in out
    assert out.count("none") == len(replay.FACTORS)  # so early in training no series grows
    assert replay.trips([1.0, 0.5, 6.0], 10.0) == 2
    assert replay.trips([1.0, 0.5, 4.0], 10.0) is None

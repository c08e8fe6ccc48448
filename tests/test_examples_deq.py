"""The DEQ classifier example: a quick run on small IDX files written here, and its missing-data message."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example():
    sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location("deq_classifier", EXAMPLES / "deq_classifier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_fashion(folder: Path, train: int = 96, test: int = 64) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, size=count)
        images = (rng.random((count, 28, 28)) * 40 + 20 * labels[:, None, None]).astype(np.uint8)
        _write_idx(folder / f"{split}-images-idx3-ubyte", images)
        _write_idx(folder / f"{split}-labels-idx1-ubyte", labels)


def test_quick_run_writes_its_metrics(tmp_path: Path) -> None:
    _fake_fashion(tmp_path)
    out = tmp_path / "out"
    args = ["--quick", "--data", str(tmp_path), "--out", str(out), "--no-progress", "--channels", "8", "--batch", "32"]
    assert _example().main(args) == 0
    result = json.loads((out / "metrics.json").read_text())
    (epoch,) = result["epochs"]
    assert 0.0 <= epoch["test_accuracy"] <= 1.0
    assert np.isfinite(epoch["train_loss"])
    assert epoch["forward_iterations"] >= 1
    assert epoch["backward_iterations"] >= 1
    assert set(epoch["samples_over_budget"]) == {"forward", "backward"}
    assert epoch["peak_rss_mib"] > 0
    assert (out / "curves.png").stat().st_size > 0


def test_jacobian_regularisation_enters_the_loss(tmp_path: Path) -> None:
    _fake_fashion(tmp_path)
    runs = {}
    for weight in ("0", "1"):
        out = tmp_path / f"out{weight}"
        args = ["--quick", "--data", str(tmp_path), "--out", str(out), "--no-progress", "--channels", "8"]
        assert _example().main([*args, "--batch", "32", "--jac-reg", weight]) == 0
        runs[weight] = json.loads((out / "metrics.json").read_text())["epochs"][0]
    assert runs["1"]["train_loss"] != runs["0"]["train_loss"]  # the penalty changed the parameters' path


def test_missing_data_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    module = _example()
    monkeypatch.setattr(module, "DEFAULT_DATA", ())
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        module.main(["--quick", "--no-progress"])

"""Tests of examples/hyperopt.py: the SGD step's J v, the hyper-gradients of the RBP methods and of BPTT
against dense and finite-difference references, the IDX data path and a smoke run of the script."""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from example_support import Amplified, Broken, loaded_example


@pytest.fixture(scope="module")
def hyperopt():
    with loaded_example("hyperopt") as module:
        yield module


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, as the script's main() uses: tiny matrices, and no OpenMP spinning against
    other jobs on a shared machine (which made these tests up to 20 times slower)."""
    try:
        import torch
    except ImportError:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _needs_run_deps():
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    pytest.importorskip("sklearn")


def _tiny_problem(hyperopt, *, inner_steps=5, batch_size=8, weight_decay=0.0, n_in=4, hidden=(3, 3, 3), seed=0):
    """A float64 problem with 20 training and 12 validation points of ``n_in`` features, 10 classes."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.random((20, n_in)),
        "y_train": rng.integers(0, 10, 20),
        "x_val": rng.random((12, n_in)),
        "y_val": rng.integers(0, 10, 12),
        "x_test": rng.random((6, n_in)),
        "y_test": rng.integers(0, 10, 6),
    }
    s = hyperopt.Settings(
        inner_steps=inner_steps,
        truncation=3,
        batch_size=batch_size,
        hidden=hidden,
        weight_decay=weight_decay,
        init_scale=0.5,
        seed=seed,
    )
    return hyperopt.make_problem(arrays, s, dtype=torch.float64), s


def _raw(torch, n, log_lr, logit_mom, seed=3):
    gen = torch.Generator().manual_seed(seed)
    a = log_lr + 0.2 * torch.randn(n, generator=gen, dtype=torch.float64)
    b = logit_mom + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    return a.requires_grad_(), b.requires_grad_()


def test_step_jvp_matches_finite_differences(hyperopt):
    torch = pytest.importorskip("torch")
    problem, _ = _tiny_problem(hyperopt)
    n = len(problem.theta0)
    assert n == 8
    raw_lr, raw_mom = _raw(torch, n, -1.0, 0.0)
    alpha, beta = (t.detach() for t in hyperopt.hyper_values(raw_lr, raw_mom))
    f = hyperopt.full_batch_map(problem, alpha, beta)
    gen = torch.Generator().manual_seed(5)
    state = tuple(t + 0.3 * torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in problem.theta0)
    state = (*state, *(0.1 * torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in problem.theta0))
    v = tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in state)

    jv = hyperopt.step_jvp(f, state, v)
    eps = 1e-6
    with torch.no_grad():
        plus = f(tuple(s + eps * d for s, d in zip(state, v, strict=True)))
        minus = f(tuple(s - eps * d for s, d in zip(state, v, strict=True)))
    fd = [(p - m) / (2 * eps) for p, m in zip(plus, minus, strict=True)]
    scale = max(float(t.abs().max()) for t in fd)
    for a, b in zip(jv, fd, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8 * scale)
    # the theta rows of J v hold the second-order term alpha (1 - beta) H v: dropping it is caught
    no_hessian = [beta[i] * alpha[i] * v[n + i] + v[i] for i in range(n)]
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(no_hessian, fd[:n], strict=True))


def _dense_implicit_gradient(hyperopt, problem, raw_lr, raw_mom, h_star_parts):
    """g^T (I - J)^{-1} dF/d(a, b) at h*, with g the gradient of the validation loss at F(h*)."""
    import torch

    n = len(problem.theta0)
    shapes = [t.shape for t in h_star_parts]
    sizes = [t.numel() for t in h_star_parts]
    h_star = torch.cat([t.reshape(-1) for t in h_star_parts]).detach()

    def F(h, raw):
        alpha, beta = hyperopt.hyper_values(raw[:n], raw[n:])
        parts = tuple(p.reshape(s) for p, s in zip(torch.split(h, sizes), shapes, strict=True))
        return torch.cat([t.reshape(-1) for t in hyperopt.full_batch_map(problem, alpha, beta)(parts)])

    raw = torch.cat([raw_lr, raw_mom]).detach()
    J = torch.autograd.functional.jacobian(lambda h: F(h, raw), h_star)
    dF = torch.autograd.functional.jacobian(lambda r: F(h_star, r), raw)
    y = F(h_star, raw).detach().requires_grad_()
    theta_y = [p.reshape(s) for p, s in zip(torch.split(y, sizes), shapes, strict=True)][:n]
    (g,) = torch.autograd.grad(hyperopt.cross_entropy(theta_y, problem.x_val, problem.y_val), y)
    eye = torch.eye(len(h_star), dtype=h_star.dtype)
    z = torch.linalg.solve((eye - J).T, g)
    spectral_radius = float(torch.linalg.eigvals(J).abs().max())
    return (z @ dF).detach(), spectral_radius, F, raw


def test_rbp_hypergradients_match_dense_implicit_gradient(hyperopt, monkeypatch):
    torch = pytest.importorskip("torch")
    import rbp_core

    problem, s = _tiny_problem(hyperopt, inner_steps=6, weight_decay=1.0)
    n = len(problem.theta0)
    raw_lr, raw_mom = _raw(torch, n, math.log(0.5), 0.0)
    tight = {
        "RBP": rbp_core.OriginalRBP(rtol=1e-13, max_iter=500),
        "CG-RBP": rbp_core.CGRBP(rtol=1e-13, max_iter=500),
        "Neumann-RBP": rbp_core.Neumann(steps=300),
    }
    monkeypatch.setattr(hyperopt, "backward_method", lambda name, T: tight[name])

    # h* = h_N, the state after the N steps (the adapter's one forward call is step N)
    with torch.no_grad():
        alpha, beta = hyperopt.hyper_values(raw_lr, raw_mom)
        theta, m = hyperopt.unroll(problem, alpha, beta)
    dense, rho, F, raw = _dense_implicit_gradient(hyperopt, problem, raw_lr, raw_mom, (*theta, *m))
    assert rho < 0.95  # weight decay and a small learning rate: the full-batch step is a contraction
    assert float(dense.abs().max()) > 1e-3
    for name in ("RBP", "CG-RBP", "Neumann-RBP"):
        statuses: dict[str, int] = {}
        ms = hyperopt.meta_gradient(name, problem, raw_lr, raw_mom, s, statuses)
        got = torch.cat(ms.grads)
        assert torch.allclose(got, dense, rtol=1e-6, atol=1e-9 * float(dense.abs().max())), name
        assert sum(statuses.values()) == 1
        assert ms.residual is not None
        assert ms.residual > 1e-3  # h_N is not a fixed point: that is why the gradient is not zero
        assert ms.loss == pytest.approx(float(hyperopt.cross_entropy(theta, problem.x_val, problem.y_val)), rel=1e-12)

    # at an exact fixed point (theta*, 0) the step does not depend on alpha and beta: zero hyper-gradient
    h = torch.cat([t.reshape(-1) for t in (*theta, *m)])
    with torch.no_grad():
        for _ in range(400):
            h = F(h, raw)
    sizes = [t.numel() for t in problem.theta0] * 2
    shapes = [t.shape for t in problem.theta0] * 2
    parts = tuple(p.reshape(sh) for p, sh in zip(torch.split(h, sizes), shapes, strict=True))
    at_fixed_point, _, _, _ = _dense_implicit_gradient(hyperopt, problem, raw_lr, raw_mom, parts)
    assert float(at_fixed_point.abs().max()) < 1e-10 * float(dense.abs().max()) + 1e-12


def test_bptt_matches_finite_differences(hyperopt):
    torch = pytest.importorskip("torch")
    problem, s = _tiny_problem(hyperopt, inner_steps=6, batch_size=8)
    n = len(problem.theta0)
    raw_lr, raw_mom = _raw(torch, n, -1.0, 0.0)

    def meta_loss(a, b):
        with torch.no_grad():
            alpha, beta = hyperopt.hyper_values(a, b)
            theta, _ = hyperopt.unroll(problem, alpha, beta)
            return float(hyperopt.cross_entropy(theta, problem.x_val, problem.y_val))

    bptt = hyperopt.meta_gradient("BPTT", problem, raw_lr, raw_mom, s)
    assert bptt.loss == pytest.approx(meta_loss(raw_lr, raw_mom), rel=1e-12)
    raw = torch.cat([raw_lr, raw_mom]).detach()
    eps = 1e-5
    fd = torch.zeros_like(raw)
    for i in range(len(raw)):
        plus, minus = raw.clone(), raw.clone()
        plus[i] += eps
        minus[i] -= eps
        fd[i] = (meta_loss(plus[:n], plus[n:]) - meta_loss(minus[:n], minus[n:])) / (2 * eps)
    got = torch.cat(bptt.grads)
    assert float(fd.abs().max()) > 1e-3
    assert torch.allclose(got, fd, rtol=1e-6, atol=1e-8 * float(fd.abs().max()))

    # TBPTT through at least all N steps is BPTT; through fewer it is not
    s_long = hyperopt.Settings(**{**s.__dict__, "truncation": s.inner_steps})
    long = torch.cat(hyperopt.meta_gradient("TBPTT", problem, raw_lr, raw_mom, s_long).grads)
    assert torch.allclose(long, got, rtol=1e-12, atol=1e-14)
    short = torch.cat(hyperopt.meta_gradient("TBPTT", problem, raw_lr, raw_mom, s).grads)
    assert not torch.allclose(short, got, rtol=1e-3)


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def _write_split(directory: Path, split: str, n: int, rng: np.random.Generator, compress: bool = False):
    images = rng.integers(0, 256, size=(n, 6, 5), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    suffix = ".gz" if compress else ""
    _write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images, compress)
    _write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", labels, compress)
    return images, labels


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_idx_data(hyperopt, tmp_path, compress):
    rng = np.random.default_rng(0)
    images, labels = _write_split(tmp_path, "train", 60, rng, compress)

    # no t10k: validation and test held out of the training split (1/6 each by default), disjoint
    arrays = hyperopt.load_idx_arrays(tmp_path, seed=1)
    assert [len(arrays[k]) for k in ("x_train", "x_val", "x_test")] == [40, 10, 10]
    assert arrays["x_train"].shape[1] == 30
    assert arrays["x_train"].dtype == np.float32
    flat = images.reshape(60, -1)
    seen = [tuple(np.rint(r * 255).astype(int)) for k in ("x_train", "x_val", "x_test") for r in arrays[k]]
    assert len(set(seen)) == 60  # disjoint, and together all of the training split
    assert set(seen) == {tuple(int(v) for v in r) for r in flat}
    assert 0.0 <= arrays["x_train"].min() <= arrays["x_train"].max() <= 1.0
    i = int(np.flatnonzero(np.all(flat == np.rint(arrays["x_val"][0] * 255), axis=1))[0])
    assert arrays["y_val"][0] == labels[i]

    # with t10k: the test set is t10k, and sizes can be given
    test_images, test_labels = _write_split(tmp_path, "t10k", 15, rng, compress)
    arrays = hyperopt.load_idx_arrays(tmp_path, seed=1, sizes=(30, 12, None))
    assert [len(arrays[k]) for k in ("x_train", "x_val", "x_test")] == [30, 12, 15]
    np.testing.assert_allclose(arrays["x_test"], test_images.reshape(15, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(arrays["y_test"], test_labels)


def test_idx_run(hyperopt, tmp_path):
    _needs_run_deps()
    rng = np.random.default_rng(2)
    data = tmp_path / "idx"
    data.mkdir()
    _write_split(data, "train", 48, rng)
    _write_split(data, "t10k", 12, rng)
    out = tmp_path / "run"
    argv = ["--data", str(data), "--meta-steps", "1", "--inner-steps", "4", "--truncation", "2"]
    argv += ["--hidden", "4,4,4", "--batch-size", "10", "--methods", "BPTT,Neumann-RBP", "--out", str(out)]
    assert hyperopt.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    st = metrics["settings"]
    assert st["layer_sizes"] == [30, 4, 4, 4, 10]
    assert (st["n_train"], st["n_val"], st["n_test"]) == (40, 8, 12)
    assert st["data"] == str(data)
    for m in metrics["methods"].values():
        assert m["status"] == "ok"
        assert len(m["meta_loss_curve"]) == 2


def test_smoke_run(hyperopt, tmp_path, capsys):
    _needs_run_deps()
    out = tmp_path / "run"
    argv = ["--meta-steps", "2", "--inner-steps", "8", "--truncation", "3", "--hidden", "8,8,8", "--batch-size", "20"]
    argv += ["--train-size", "100", "--val-size", "50", "--test-size", "50", "--out", str(out)]
    assert hyperopt.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["meta_steps"] == 2
    assert "memory_measure" in metrics
    assert list(metrics["methods"]) == ["BPTT", "TBPTT", "RBP", "CG-RBP", "Neumann-RBP"]
    keys = {
        "status",
        "initial_meta_loss",
        "final_meta_loss",
        "best_meta_loss",
        "test_loss",
        "test_accuracy",
        "hyperparameters",
        "wall_time_s",
        "backward_saved_kb",
        "meta_loss_curve",
        "cumulative_wall_time_s",
        "backward_statuses",
        "fixed_point_residual",
        "last_step_change",
    }
    initial = set()
    for name, m in metrics["methods"].items():
        assert keys <= set(m), name
        assert m["status"] == "ok", (name, m["reason"])
        assert len(m["meta_loss_curve"]) == 3
        assert len(m["cumulative_wall_time_s"]) == 3
        assert np.all(np.diff(m["cumulative_wall_time_s"]) >= 0)
        assert m["wall_time_s"] > 0
        assert np.isfinite(m["test_loss"])
        assert 0.0 <= m["test_accuracy"] <= 1.0
        assert m["fixed_point_residual"] > 0
        assert sorted(m["hyperparameters"]) == ["W1", "W2", "W3", "W4", "b1", "b2", "b3", "b4"]
        for hp in m["hyperparameters"].values():
            assert hp["learning_rate"] > 0
            assert 0 < hp["momentum"] < 1
        initial.add(m["initial_meta_loss"])
        if name in ("RBP", "CG-RBP", "Neumann-RBP"):
            assert sum(m["backward_statuses"].values()) == 2
            assert len(m["fixed_point_residual_per_meta_step"]) == 2
    assert len(initial) == 1  # the same initial weights and mini-batches for every method
    kb = {name: m["backward_saved_kb"] for name, m in metrics["methods"].items()}
    assert kb["Neumann-RBP"] < kb["BPTT"]
    for png in ("meta_loss.png", "meta_loss_time.png"):
        assert (out / png).stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "Neumann-RBP" in printed
    assert "test acc" in printed


def test_bad_arguments(hyperopt, tmp_path):
    assert hyperopt.main(["--methods", "BPTT,nope", "--out", str(tmp_path)]) == 2
    assert hyperopt.main(["--truncation", "1", "--out", str(tmp_path)]) == 2


def test_divergence_is_a_result_and_a_bug_is_not(hyperopt, tmp_path, monkeypatch):
    _needs_run_deps()

    original = hyperopt.backward_method
    argv = ["--meta-steps", "2", "--inner-steps", "4", "--truncation", "3", "--hidden", "4,4,4", "--batch-size", "20"]
    argv += ["--train-size", "60", "--val-size", "30", "--test-size", "30", "--methods", "RBP,Neumann-RBP"]

    monkeypatch.setattr(hyperopt, "backward_method", lambda n, T: Amplified() if n == "RBP" else original(n, T))
    assert hyperopt.main([*argv, "--out", str(tmp_path / "diverged")]) == 0
    metrics = json.loads((tmp_path / "diverged" / "metrics.json").read_text())
    rbp = metrics["methods"]["RBP"]
    assert rbp["status"] == "diverged"
    assert rbp["diverged_meta_step"] == 1
    assert "backward" in rbp["reason"] or "non-finite" in rbp["reason"]
    assert set(rbp["backward_statuses"]) <= {"DIVERGED", "NONFINITE"}
    assert metrics["methods"]["Neumann-RBP"]["status"] == "ok"

    monkeypatch.setattr(hyperopt, "backward_method", lambda n, T: Broken() if n == "RBP" else original(n, T))
    assert hyperopt.main([*argv, "--out", str(tmp_path / "broken")]) == 1
    metrics = json.loads((tmp_path / "broken" / "metrics.json").read_text())
    assert metrics["methods"]["RBP"]["status"] == "error"
    assert "a bug in a backward method" in metrics["methods"]["RBP"]["reason"]
    assert metrics["methods"]["Neumann-RBP"]["status"] == "ok"

"""Tests of examples/graph.py: the data (generator, Planetoid loader, karate), the model's derivatives and a smoke run."""

from __future__ import annotations

import collections
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from example_support import Amplified, Broken, loaded_example


@pytest.fixture(scope="module")
def graph():
    with loaded_example("graph") as module:
        yield module


@pytest.fixture(scope="module")
def cora_like(graph):
    pytest.importorskip("scipy")
    return graph.csbm(0)


# --- data ---------------------------------------------------------------------------------------
def test_csbm_statistics(graph, cora_like):
    g = cora_like
    assert g.num_nodes == 2708
    assert g.num_classes == 7
    np.testing.assert_array_equal(np.bincount(g.labels), graph.CORA_CLASS_SIZES)
    assert abs(g.edges.shape[1] - 5429) <= 0.02 * 5429
    assert 0.78 <= g.homophily() <= 0.84
    assert g.features.shape == (2708, 1433)
    assert set(np.unique(g.features.data)) == {1.0}
    assert 16.0 <= g.features.sum(axis=1).mean() <= 20.0
    assert (len(g.train), len(g.val), len(g.test)) == (27, 1326, 1355)
    everything = np.concatenate([g.train, g.val, g.test])
    assert len(np.unique(everything)) == 2708
    assert np.bincount(g.labels[g.train], minlength=7).min() >= 3
    degree = np.bincount(g.edges.ravel(), minlength=g.num_nodes)
    assert degree.min() >= 1
    assert degree.max() > 30  # a heavy tail, like Cora's
    # features are informative: the class-mean word vectors differ
    means = np.stack([np.asarray(g.features[g.labels == c].mean(axis=0)).ravel() for c in range(7)])
    assert np.abs(means - means.mean(axis=0)).max() > 0.05


def test_csbm_adjacency_and_determinism(graph, cora_like):
    torch = pytest.importorskip("torch")
    g = cora_like
    assert (g.edges[0] < g.edges[1]).all()  # canonical: each undirected edge once, no self loops
    assert len(np.unique(g.edges, axis=1)[0]) == g.edges.shape[1]
    dense = graph.Adjacency(g.edges, g.num_nodes).dense()
    assert torch.equal(dense, dense.T)
    assert float(dense.diagonal().abs().sum()) == 0.0
    assert float(dense.sum()) == 2 * g.edges.shape[1]

    again = graph.csbm(0)
    np.testing.assert_array_equal(again.edges, g.edges)
    np.testing.assert_array_equal(again.labels, g.labels)
    np.testing.assert_array_equal(again.train, g.train)
    np.testing.assert_array_equal(again.test, g.test)
    assert (again.features != g.features).nnz == 0
    other = graph.csbm(1)
    assert not np.array_equal(other.labels, g.labels)


def test_csbm_scaled(graph):
    pytest.importorskip("scipy")
    params = graph.CSBMParams().scaled(0.25)
    g = graph.csbm(3, params)
    assert g.num_nodes == sum(params.class_sizes)
    assert 600 < g.num_nodes < 750
    assert g.edges.shape[1] == params.n_edges
    assert len(g.train) == 27
    assert len(g.train) + len(g.val) + len(g.test) == g.num_nodes
    assert abs(len(g.val) - len(g.test)) <= 0.05 * g.num_nodes


def test_karate(graph):
    pytest.importorskip("networkx")
    g = graph.karate(0)
    assert g.num_nodes == 34
    assert g.edges.shape[1] == 78
    assert g.num_classes == 2
    np.testing.assert_array_equal(g.features, np.eye(34))
    assert (len(g.train), len(g.val), len(g.test)) == (4, 15, 15)
    np.testing.assert_array_equal(np.bincount(g.labels[g.train]), [2, 2])
    assert graph.state_dim(g) == 33
    h0 = graph.pca_states(g.features, graph.state_dim(g))
    assert h0.shape == (34, 33)
    assert h0.dtype == np.float32


def _write_planetoid(directory: Path, name: str) -> dict:
    """A toy Planetoid data set: 3 training nodes, 7 in allx, test indices 9, 7, 10 (unsorted, 8 missing)."""
    sp = pytest.importorskip("scipy.sparse")
    rng = np.random.default_rng(0)
    n_feat, n_cls = 5, 3
    allx = sp.csr_matrix((rng.random((7, n_feat)) < 0.5).astype(np.float32))
    ally = np.eye(n_cls)[[0, 1, 2, 0, 1, 2, 0]]
    tx = sp.csr_matrix(rng.random((3, n_feat)).astype(np.float32) + 1.0)  # all non-zero, unlike row 8
    ty = np.eye(n_cls)[[2, 0, 1]]
    graph_dict = collections.defaultdict(list, {0: [1, 2, 0], 1: [0], 2: [0, 9], 7: [10], 9: [2], 10: [7, 7]})
    parts = {"x": allx[:3], "y": ally[:3], "allx": allx, "ally": ally, "tx": tx, "ty": ty, "graph": graph_dict}
    for key, value in parts.items():  # protocol 0 for one file: the copy_reg/__builtin__ names of old pickles
        protocol = 0 if key == "tx" else 2
        (directory / f"ind.{name}.{key}").write_bytes(pickle.dumps(value, protocol=protocol))
    (directory / f"ind.{name}.test.index").write_text("9\n7\n10\n")
    return parts


def test_planetoid_loader(graph, tmp_path):
    parts = _write_planetoid(tmp_path, "toy")
    assert graph.find_planetoid_name(tmp_path) == "toy"
    g = graph.load_planetoid(tmp_path, "toy")
    assert g.num_nodes == 11  # 7 in allx, then the test range 7..10 (8 is a gap)
    features = g.features.toarray()
    np.testing.assert_array_equal(features[:7], parts["allx"].toarray())
    for k, node in enumerate([9, 7, 10]):  # node test_index[k] gets row k of tx and ty
        np.testing.assert_allclose(features[node], parts["tx"].toarray()[k])
        assert g.labels[node] == parts["ty"][k].argmax()
    np.testing.assert_array_equal(features[8], 0.0)
    assert g.labels[8] == -1
    np.testing.assert_array_equal(g.labels[:7], parts["ally"].argmax(axis=1))
    np.testing.assert_array_equal(g.train, [0, 1, 2])
    np.testing.assert_array_equal(g.val, [3, 4, 5, 6, 7, 9, 10])  # range(3, 503), inside the graph, labelled
    np.testing.assert_array_equal(g.test, [7, 9, 10])
    # undirected, deduplicated, no self loops
    np.testing.assert_array_equal(g.edges, [[0, 0, 2, 7], [1, 2, 9, 10]])


def test_planetoid_refuses_other_pickles(graph, tmp_path):
    (tmp_path / "evil").write_bytes(pickle.dumps(os.getcwd))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        graph.restricted_load(tmp_path / "evil")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"ind\.NAME\.x"):
        graph.find_planetoid_name(tmp_path / "empty")


# --- the model's derivatives ----------------------------------------------------------------------
def _tiny(graph, torch, weight_scale: float = 1.0):
    """A 10-node ring with chords, a float64 model with 4-dim states and 3 classes."""
    n = 10
    rows = [*range(n), 0, 2, 5]
    cols = [*((i + 1) % n for i in range(n)), 5, 7, 9]
    edges = graph.canonical_edges(np.array(rows), np.array(cols))
    adj = graph.Adjacency(edges, n, dtype=torch.float64)
    model = graph.make_model(4, 3, seed=0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # scaled weights; random biases, so that the fixed point is not h = 0
        for name, p in model["cell"].named_parameters():
            if name.startswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
            else:
                p.mul_(weight_scale)
    h = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    return adj, model, h, labels, gen


def test_forward_mode_derivative_matches_finite_differences(graph):
    torch = pytest.importorskip("torch")
    adj, model, h, _, gen = _tiny(graph, torch)
    v = torch.randn(h.shape, generator=gen, dtype=torch.float64)

    def f(state):
        return graph.propagation_step(model["cell"], adj, state)

    eps = 1e-6
    with torch.no_grad():
        fd = (f(h + eps * v) - f(h - eps * v)) / (2 * eps)
    _, jv = torch.func.jvp(f, (h,), (v,))
    assert torch.allclose(jv.detach(), fd, rtol=1e-6, atol=1e-8)
    from torch.autograd import forward_ad

    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(f(forward_ad.make_dual(h, v))).tangent
    assert torch.allclose(tangent.detach(), fd, rtol=1e-6, atol=1e-8)
    # the aggregation matters: a step without the messages' derivative is caught
    with torch.no_grad():
        wrong = model["cell"](adj.aggregate(h), h + eps * v) - model["cell"](adj.aggregate(h), h - eps * v)
    assert not torch.allclose(wrong / (2 * eps), fd, rtol=1e-3)


def test_implicit_gradient_matches_dense_solve(graph):
    torch = pytest.importorskip("torch")
    import rbp_core
    from rbp_core.backends.torch import BPTT, fixed_point

    adj, model, h0, labels, _ = _tiny(graph, torch, weight_scale=0.15)
    cell, readout = model["cell"], model["readout"]
    params = list(model.parameters())

    def f(state):
        return graph.propagation_step(cell, adj, state)

    def loss_of(state):
        return torch.nn.functional.cross_entropy(readout(state[:6]), labels[:6])

    h_star, _ = graph.propagate(cell, adj, h0, 400)
    J = torch.autograd.functional.jacobian(f, h_star).reshape(h_star.numel(), h_star.numel())
    assert float(torch.linalg.matrix_norm(J, 2)) < 0.95  # a contraction: the implicit gradient exists
    state = h_star.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss_of(state), state)
    z = torch.linalg.solve(torch.eye(J.shape[0], dtype=J.dtype) - J.T, g.reshape(-1)).reshape(h_star.shape)
    out = f(h_star)
    dense = torch.autograd.grad(out, params[: len(list(cell.parameters()))], z)
    dense = [*dense, *torch.autograd.grad(loss_of(h_star), list(readout.parameters()))]
    assert min(float(d.abs().max()) for d in dense) > 1e-3  # a non-trivial gradient

    tight = rbp_core.FixedPointIteration(rtol=1e-14, max_iter=2000)
    methods = {
        "RBP": (rbp_core.OriginalRBP(rtol=1e-13, max_iter=2000), "double-backward"),
        "CG-RBP": (rbp_core.CGRBP(rtol=1e-13, max_iter=2000), "double-backward"),
        "CG-RBP forward-mode": (rbp_core.CGRBP(rtol=1e-13, max_iter=2000), "forward"),
        "Neumann-RBP": (rbp_core.Neumann(steps=600), "double-backward"),
        "BPTT": (BPTT(), "double-backward"),
    }
    for name, (method, jvp) in methods.items():
        state, info = fixed_point(f, h0, backward=method, solver=tight, jvp_mode=jvp, on_backward_failure="raise")
        grads = torch.autograd.grad(loss_of(state), params)
        assert info.forward.converged, name
        for got, want in zip(grads, dense, strict=True):
            assert torch.allclose(got, want, rtol=1e-7, atol=1e-10), name
        if name.startswith("CG"):
            sol = info.backward[0]
            assert sol.converged, name
            assert sol.num_jvp > 0, name


# --- the script ---------------------------------------------------------------------------------
def _needs_script_deps():
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    pytest.importorskip("networkx")


def test_smoke_run(graph, tmp_path, capsys):
    _needs_script_deps()
    out = tmp_path / "run"
    assert graph.main(["--dataset", "karate", "--epochs", "2", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["methods"]) == ["BPTT", "TBPTT", "RBP", "CG-RBP", "Neumann-RBP"]
    assert metrics["settings"]["steps"] == 100
    assert metrics["settings"]["truncation"] == 5
    assert metrics["data"]["nodes"] == 34
    assert "saved_tensors_hooks" in metrics["memory_measure"]
    for name, m in metrics["methods"].items():
        assert m["status"] in ("ok", "diverged"), (name, m["reason"])
        assert m["wall_time_s"] > 0
        assert m["backward_saved_kb"] is not None
        if m["status"] == "ok":
            assert len(m["train_loss_curve"]) == 2
            assert len(m["val_acc_curve"]) == 2
            assert 0.0 <= m["best_val_acc"] <= 1.0
            assert 0.0 <= m["test_acc_at_best_val"] <= 1.0
            assert m["final_forward_rel_diff"] is not None
            assert len(m["forward_rel_diff_steps"]) == 100
            assert sum(m["forward_statuses"].values()) == 2
    for name in ("RBP", "CG-RBP", "Neumann-RBP"):
        if metrics["methods"][name]["status"] == "ok":
            assert sum(metrics["methods"][name]["backward_statuses"].values()) == 2
    kb = {name: m["backward_saved_kb"] for name, m in metrics["methods"].items()}
    assert kb["Neumann-RBP"] < kb["TBPTT"] < kb["BPTT"]
    for png in ("curves.png", "memory.png", "forward_difference.png"):
        assert (out / png).stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "Neumann-RBP" in printed
    assert "saved KiB" in printed


def test_planetoid_run_and_bad_arguments(graph, tmp_path):
    _needs_script_deps()
    _write_planetoid(tmp_path, "toy")
    out = tmp_path / "run"
    argv = ["--data", str(tmp_path), "--dataset", "planetoid", "--epochs", "1", "--methods", "Neumann-RBP"]
    assert graph.main([*argv, "--steps", "10", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["name"] == "toy"
    assert metrics["data"]["state_dim"] == 5
    assert graph.main(["--methods", "BPTT,nope", "--out", str(out)]) == 2
    assert graph.main(["--dataset", "cora", "--out", str(out)]) == 2  # a Planetoid name needs --data


def test_divergence_is_a_result_and_a_bug_is_not(graph, tmp_path, monkeypatch):
    _needs_script_deps()

    original = graph.backward_method

    def run(out: Path, replacement) -> tuple[int, dict]:
        monkeypatch.setattr(graph, "backward_method", lambda n, T: replacement() if n == "RBP" else original(n, T))
        argv = ["--dataset", "karate", "--epochs", "2", "--steps", "20", "--methods", "RBP,Neumann-RBP"]
        rc = graph.main([*argv, "--out", str(out)])
        return rc, json.loads((out / "metrics.json").read_text())

    rc, metrics = run(tmp_path / "diverged", Amplified)
    assert rc == 0
    rbp = metrics["methods"]["RBP"]
    assert rbp["status"] == "diverged"
    assert rbp["diverged_epoch"] == 1
    assert "backward solve" in rbp["reason"]
    assert metrics["methods"]["Neumann-RBP"]["status"] == "ok"

    rc, metrics = run(tmp_path / "broken", Broken)
    assert rc == 1
    assert metrics["methods"]["RBP"]["status"] == "error"
    assert "a bug in a backward method" in metrics["methods"]["RBP"]["reason"]
    assert metrics["methods"]["Neumann-RBP"]["status"] == "ok"

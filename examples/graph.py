"""Semi-supervised node classification with a recurrent graph neural network: the five backward methods.

The second experiment of Liao et al., "Reviving and Improving Recurrent Back-Propagation" (ICML 2018):
a gated graph neural network whose node states are propagated to (near) a fixed point, trained on a
handful of labelled nodes, with its gradient computed by BPTT, truncated BPTT, original RBP, CG-RBP
and Neumann-RBP, all from the same seed, data and hyper-parameters.

Model (the paper's settings). With A the symmetric 0/1 adjacency matrix (no self loops) and H_t the
(N, d) matrix of node states,

    H_{t+1} = f(H_t) = GRUCell(input = A H_t, hidden = H_t)      (torch.nn.GRUCell(d, d))

i.e. the message to a node is the sum of its neighbours' states (a sparse matrix product, see
:class:`SparseMatmul`) and the update is a GRU cell. H_0 is the PCA of the bag-of-words features
(d = 64 components, or fewer when the features or nodes are fewer: d = min(64, features, nodes - 1)),
the unscaled component scores as in the paper's code (sklearn's PCA.fit_transform). The GRU weights
and the readout weights are Kaiming-normal, the biases zero, also as in the paper's code (in a
150-epoch trial of Neumann-RBP on the quarter-size graph, PyTorch's default GRU initialisation gave
a lower and noisier validation accuracy). f is iterated 100 times (``--steps``) by
rbp_core.backends.torch.fixed_point with FixedPointIteration(rtol=0.0, max_iter=100,
divergence_factor=None) and throw=False: rtol=0 is met only by two bitwise equal iterates, so all 100
updates run unless an exact fixed point is reached earlier. A linear readout of the final state
gives the class scores; the loss is the mean cross-entropy over the labelled training nodes, and
every training step uses the full graph (one step per epoch). Optimiser: SGD with momentum 0.9,
weight decay 5e-4, learning rate ``--lr``. The paper's learning rate is 1e-3 for 2000 epochs (its
code's config); the default here is 1e-2 for 300 epochs, because at 1e-3 the training loss had
barely moved after 150 full-graph steps (each epoch is one step) and 2000 epochs of the five methods
do not fit the run time of this example. At 150 epochs Neumann-RBP's validation accuracy was still
rising, hence 300. Every method gets the same settings.

The state each method reads out is the one fixed_point returns: the last forward iterate H_100 for
BPTT, the last of its T extra updates (H_{100+T}) for TBPTT, and f(H_100) = H_101 for the three RBP
methods (docs/torch.md). The validation and test accuracies are evaluated after every training step
by a separate run of exactly ``--steps`` updates without autograd, identical for all methods. That
evaluation also records the forward convergence: the relative difference ||H_t - H_{t-1}|| / ||H_t||
(Frobenius norms) at the last update, after every epoch, and for every update t at the end of
training. RBP assumes the propagation reaches a fixed point; these numbers say how nearly it does.

Backward methods and the truncation convention (``--truncation T``, default 5, the paper's
"truncation 5": T backward steps, i.e. T terms of the series sum_t (J^T)^t g):

- "BPTT":        rbp_core.backends.torch.BPTT(), through all 100 updates;
- "TBPTT":       TBPTT(steps=T), T recorded updates after the forward solve (T terms);
- "RBP":         rbp_core.OriginalRBP(max_iter=T): at most T iterations z_i = J^T z_{i-1} + g from
                 z_0 = 0 (z_1 = g, so at most T - 1 VJPs and T terms), stopping early at its default
                 relative tolerance; rbp-core's adapter starts from zero, not from the paper's random z_0;
- "CG-RBP":      rbp_core.CGRBP(max_iter=T), at most T CG iterations, each one VJP and one JVP (the
                 adapter's default double-backward JVP; the forward-mode JVP works too and is tested);
- "Neumann-RBP": rbp_core.Neumann(steps=T - 1): T - 1 VJPs give T series terms, so at an exact fixed
                 point it equals TBPTT(steps=T) (docs/torch.md).

A truncated RBP or CG-RBP solve that ends at its budget (MAX_STEPS) is expected and counted. A solve
whose status is DIVERGED or NONFINITE (the adapter raises FloatingPointError for the latter), a forward
solve that goes non-finite, a non-finite loss or gradient is a *result*, the instability the paper
reports for original RBP: the method is recorded as diverged at that (1-based) epoch, its curves end
with the last completed epoch, and the other methods go on. Any other exception is a bug: the script
reports it and exits with status 1.

Data (nothing is downloaded):

- ``--dataset csbm`` (default): a degree-corrected contextual stochastic block model with Cora's size
  and statistics, generated from ``--seed`` by :func:`csbm` with the parameters of :class:`CSBMParams`:
  2708 nodes in 7 classes of Cora's sizes (351, 217, 418, 818, 426, 298, 180), labels assigned to a
  random permutation of the nodes; 5429 undirected edges (Cora's citation count), each drawn as
  (u, v) with u chosen with probability proportional to a degree propensity theta_u = 1 + Pareto(2)
  (a heavy-tailed degree distribution like Cora's) and v, with probability 0.81 (Cora's edge
  homophily), from u's class, else from the other classes, in both cases proportionally to theta;
  duplicates and self loops are redrawn, and every node left isolated gets one edge drawn the same way
  (an edge between two nodes of degree >= 2 is removed for each, so the count stays 5429).
  Bag-of-words features: 1433 binary words; each class owns 60 topic words (420 in all, disjoint) and
  every node has max(1, Poisson(18.7)) word draws (about 18 distinct words per node), each from its
  class's topic words with probability 0.2 and otherwise from a shared Zipf-like distribution over
  the whole vocabulary (ranks in a random order, weight 1/(rank + 10)), so words carry class
  information but are noisy; repeated draws of a word collapse (binary features). Topic words are
  drawn Zipf-like within the topic, too. With these settings a logistic regression on the words of
  the 27 training nodes reaches about 35% test accuracy, and one on two-hop smoothed PCA features
  (SGC-like) about 70%: informative, noisy features.
  Split of the paper's 1%-labelled setting: 27 training nodes (27 // 7 = 3 per class, plus one more
  for each of the 6 largest classes), 1326 validation and 1355 test nodes, at random from the rest.
  ``--scale s`` multiplies the class sizes and the edge count (and scales the validation set; the
  training set stays at 27), e.g. for ``--quick``.
- ``--dataset karate``: networkx.karate_club_graph() (34 nodes, 78 edges), 2 classes from the 'club'
  attribute, identity features (so d = 33), 2 labelled nodes per class, the other 30 split 15/15
  between validation and test.
- ``--data DIR --dataset NAME`` (or ``--dataset planetoid``, the name then read from the single
  ``ind.*.x`` in DIR): the Planetoid files of Cora, Citeseer and Pubmed, ``ind.NAME.{x,y,tx,ty,allx,
  ally,graph}`` (Python pickles; read with an unpickler that only admits numpy arrays, scipy.sparse
  matrices and plain builtin containers, see :func:`restricted_load`) and ``ind.NAME.test.index``.
  Loaded like the standard loader (Kipf & Welling's): tx/ty are placed at the sorted test indices,
  indices missing from the test range (Citeseer) get zero features and no label (-1), and the
  standard split is train = range(len(y)), val = range(len(y), len(y) + 500), test = the test indices.

Memory: "backward_saved_kb" is the size of the distinct tensors that autograd saves for backward during
one training step (the forward graph, plus the one-step graphs that the RBP methods record inside
their backward solve), counted with torch.autograd.graph.saved_tensors_hooks (_common.SavedBytes) in
every training step (the largest is reported), leaving out the parameters, which every method saves.
The adjacency matrix is a constant that :class:`SparseMatmul` keeps on its context rather than saving
it, so it is not counted either. It is the part of memory that grows with the recorded updates (BPTT:
100, TBPTT: T) and stays at one step for the RBP methods; it is not a process peak (torch's CPU
allocations are not visible to tracemalloc, and ru_maxrss only ever grows).

Outputs in ``--out DIR``: metrics.json (settings; per method: status, final and best validation
accuracy, test accuracy at the best-validation epoch and at the end, final and best training loss,
wall time, backward_saved_kb, the curves of loss, validation and test accuracy and forward relative
difference per epoch, the per-update forward differences at the end, forward and backward-solve
statuses), curves.png (training loss and validation accuracy against epochs), memory.png (backward
memory per method) and forward_difference.png; a table of the methods is printed at the end.

Run: ``python examples/graph.py [--quick] [--out DIR] [--dataset {csbm,karate,planetoid,NAME}]
[--data DIR] [--epochs N] [--truncation T] [--steps 100] [--lr LR] [--methods ...] [--seed S]``.
The script runs torch on one thread (on two shared cores, intra-op threads made each step about
ten times slower). The default run (Cora-sized CSBM, 300 epochs, all five methods) took 19 minutes
on two shared CPU cores (150 epochs: 11 minutes), BPTT a third of it (its 100 recorded steps save
about 530 MB for backward); ``--quick`` (a quarter-size graph of 675 nodes, 30 epochs) about 40 s.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import pickle
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    METHODS,
    Diverged,
    SavedBytes,
    backward_method,
    backward_through,
    check_forward,
    check_grads,
    finite_loss,
    finite_or_null,
    format_table,
    legend,
    parse_methods,
    progress,
    report_outcomes,
)

CORA_CLASS_SIZES = (351, 217, 418, 818, 426, 298, 180)
MAX_DIM = 64
QUICK_EPOCHS = 30
QUICK_SCALE = 0.25


# --- data -----------------------------------------------------------------------------------------
@dataclass
class Graph:
    """A node-classification data set: features, labels (-1: unlabelled), undirected edges and a split."""

    name: str
    features: Any  # (N, F) numpy array or scipy.sparse matrix
    labels: np.ndarray  # (N,) int64, -1 where a node has no label
    edges: np.ndarray  # (2, E) int64, each undirected edge once, i < j, no self loops, sorted
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def num_nodes(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def homophily(self) -> float:
        """The fraction of edges whose two ends have the same label (edges with an unlabelled end left out)."""
        a, b = self.labels[self.edges[0]], self.labels[self.edges[1]]
        known = (a >= 0) & (b >= 0)
        return float(np.mean(a[known] == b[known]))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "nodes": self.num_nodes,
            "edges": int(self.edges.shape[1]),
            "features": int(self.features.shape[1]),
            "classes": self.num_classes,
            "edge_homophily": self.homophily(),
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test),
        }


def canonical_edges(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Undirected edges (2, E): each pair once as (min, max), self loops dropped, sorted."""
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    keep = rows != cols
    lo, hi = np.minimum(rows[keep], cols[keep]), np.maximum(rows[keep], cols[keep])
    pairs = np.unique(np.stack([lo, hi], axis=1), axis=0)
    return pairs.T.copy() if len(pairs) else np.zeros((2, 0), dtype=np.int64)


@dataclass(frozen=True)
class CSBMParams:
    """The parameters of :func:`csbm` (defaults: Cora's size and statistics; see the module docstring)."""

    class_sizes: tuple[int, ...] = CORA_CLASS_SIZES
    n_edges: int = 5429
    homophily: float = 0.81
    degree_tail: float = 2.0  # Pareto shape of the degree propensities theta = 1 + Pareto(degree_tail)
    n_features: int = 1433
    word_draws: float = 18.7  # Poisson mean of the word draws per node: about 18 distinct words after repeats
    topic_words: int = 60  # class-specific words per class
    topic_fraction: float = 0.2  # probability that a word draw comes from the node's class topic
    zipf_offset: float = 10.0  # word weights 1 / (rank + zipf_offset)
    n_train: int = 27
    n_val: int = 1326  # the rest is the test set: 1355 at Cora's size

    def scaled(self, scale: float) -> CSBMParams:
        """Class sizes and edge count times ``scale``; validation set in proportion; training set kept."""
        if scale == 1.0:
            return self
        sizes = tuple(max(3, round(scale * s)) for s in self.class_sizes)
        n = sum(sizes)
        full = sum(self.class_sizes)
        return CSBMParams(
            class_sizes=sizes,
            n_edges=max(n, round(scale * self.n_edges)),
            homophily=self.homophily,
            degree_tail=self.degree_tail,
            n_features=self.n_features,
            word_draws=self.word_draws,
            topic_words=self.topic_words,
            topic_fraction=self.topic_fraction,
            zipf_offset=self.zipf_offset,
            n_train=self.n_train,
            n_val=round((n - self.n_train) * self.n_val / (full - self.n_train)),
        )


def _zipf(n: int, offset: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf-like probabilities 1 / (rank + offset) over ``n`` items, ranks in a random order."""
    w = 1.0 / (rng.permutation(n) + offset)
    return w / w.sum()


def _draw_partner(
    u: np.ndarray, labels: np.ndarray, same: np.ndarray, theta: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """For each u, a node v of u's class (where ``same``) or of another class, chosen proportionally to theta."""
    v = np.empty_like(u)
    for c in np.unique(labels):
        for intra in (True, False):
            sel = np.flatnonzero((labels[u] == c) & (same == intra))
            if sel.size == 0:
                continue
            pool = np.flatnonzero((labels == c) == intra)
            p = theta[pool] / theta[pool].sum()
            v[sel] = pool[rng.choice(pool.size, size=sel.size, p=p)]
    return v


def csbm(seed: int = 0, params: CSBMParams | None = None) -> Graph:
    """A contextual stochastic block model graph with Cora's statistics (see the module docstring)."""
    import scipy.sparse as sp

    p = params or CSBMParams()
    rng = np.random.default_rng(seed)
    n = sum(p.class_sizes)
    n_classes = len(p.class_sizes)
    labels = np.empty(n, dtype=np.int64)
    labels[rng.permutation(n)] = np.repeat(np.arange(n_classes), p.class_sizes)
    theta = 1.0 + rng.pareto(p.degree_tail, size=n)

    # edges: degree-corrected, homophilous
    edges: set[tuple[int, int]] = set()
    while len(edges) < p.n_edges:
        batch = 2 * (p.n_edges - len(edges)) + 16
        u = rng.choice(n, size=batch, p=theta / theta.sum())
        v = _draw_partner(u, labels, rng.random(batch) < p.homophily, theta, rng)
        for a, b in zip(u.tolist(), v.tolist(), strict=True):
            if a != b:
                edges.add((min(a, b), max(a, b)))
                if len(edges) == p.n_edges:
                    break
    degree = np.zeros(n, dtype=np.int64)
    for a, b in edges:
        degree[a] += 1
        degree[b] += 1
    for a in np.flatnonzero(degree == 0).tolist():  # no isolated nodes (Cora has none)
        added = False
        while not added:
            b = int(_draw_partner(np.array([a]), labels, rng.random(1) < p.homophily, theta, rng)[0])
            pair = (min(a, b), max(a, b))
            added = pair not in edges
        edges.add(pair)
        degree[a] += 1
        degree[b] += 1
        # keep the edge count: remove an edge whose two ends keep at least one edge each
        removable = [e for e in sorted(edges) if degree[e[0]] >= 2 and degree[e[1]] >= 2 and a not in e]
        e = removable[int(rng.integers(len(removable)))]
        edges.remove(e)
        degree[e[0]] -= 1
        degree[e[1]] -= 1
    pairs = np.array(sorted(edges), dtype=np.int64).T

    # bag-of-words features
    shared = _zipf(p.n_features, p.zipf_offset, rng)
    topic_ids = rng.permutation(p.n_features)[: n_classes * p.topic_words].reshape(n_classes, p.topic_words)
    topic_p = [_zipf(p.topic_words, p.zipf_offset, rng) for _ in range(n_classes)]
    counts = np.maximum(1, rng.poisson(p.word_draws, size=n))
    rows, cols = [], []
    for i in range(n):
        k_topic = rng.binomial(counts[i], p.topic_fraction)
        words = np.concatenate(
            [
                topic_ids[labels[i]][rng.choice(p.topic_words, size=k_topic, p=topic_p[labels[i]])],
                rng.choice(p.n_features, size=counts[i] - k_topic, p=shared),
            ]
        )
        words = np.unique(words)
        rows.append(np.full(words.size, i))
        cols.append(words)
    r, c = np.concatenate(rows), np.concatenate(cols)
    features = sp.csr_matrix((np.ones(r.size, dtype=np.float32), (r, c)), shape=(n, p.n_features))

    # split: n_train // C per class, one more for each of the largest classes, then val / test at random
    per_class = np.full(n_classes, p.n_train // n_classes)
    per_class[np.argsort(-np.asarray(p.class_sizes), kind="stable")[: p.n_train % n_classes]] += 1
    train = np.concatenate([rng.permutation(np.flatnonzero(labels == k))[: per_class[k]] for k in range(n_classes)])
    rest = rng.permutation(np.setdiff1d(np.arange(n), train))
    return Graph(
        name="csbm",
        features=features,
        labels=labels,
        edges=pairs,
        train=np.sort(train),
        val=np.sort(rest[: p.n_val]),
        test=np.sort(rest[p.n_val :]),
    )


def karate(seed: int = 0, per_class: int = 2) -> Graph:
    """Zachary's karate club: 2 classes ('club'), identity features, ``per_class`` labelled nodes per class."""
    import networkx as nx

    g = nx.karate_club_graph()
    nodes = sorted(g.nodes)
    clubs = sorted({g.nodes[v]["club"] for v in nodes})
    labels = np.array([clubs.index(g.nodes[v]["club"]) for v in nodes], dtype=np.int64)
    e = np.array(list(g.edges), dtype=np.int64).T
    rng = np.random.default_rng(seed)
    train = np.concatenate([rng.permutation(np.flatnonzero(labels == k))[:per_class] for k in range(len(clubs))])
    rest = rng.permutation(np.setdiff1d(np.arange(len(nodes)), train))
    half = len(rest) // 2
    return Graph(
        name="karate",
        features=np.eye(len(nodes), dtype=np.float32),
        labels=labels,
        edges=canonical_edges(e[0], e[1]),
        train=np.sort(train),
        val=np.sort(rest[:half]),
        test=np.sort(rest[half:]),
    )


# --- Planetoid files --------------------------------------------------------------------------------
_SPARSE_CLASSES = {
    f"{kind}_{suffix}" for kind in ("csr", "csc", "coo", "lil", "dok", "bsr", "dia") for suffix in ("matrix", "array")
}
_BUILTINS = {
    "dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes", "bytearray",
    "bool", "slice", "range", "object",
}  # fmt: skip
_NUMPY = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
}


class RestrictedUnpickler(pickle.Unpickler):
    """Admits numpy arrays and dtypes, scipy.sparse matrices and plain builtin containers, nothing else.

    The Planetoid files are pickles (written by Python 2); an arbitrary pickle can run any code when
    loaded, so every global the file names is checked against this list.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            import builtins

            return getattr(builtins, name)
        if (module, name) in _NUMPY:
            if module == "_codecs":
                import codecs

                return codecs.encode
            if name in ("ndarray", "dtype"):
                return getattr(np, name)
            import importlib

            try:  # numpy >= 2 names it numpy._core, numpy 1 numpy.core
                mod = importlib.import_module(module.replace("numpy.core", "numpy._core"))
            except ImportError:
                mod = importlib.import_module(module.replace("numpy._core", "numpy.core"))
            return getattr(mod, name)
        if module.split(".")[:2] == ["scipy", "sparse"] and name in _SPARSE_CLASSES:
            import scipy.sparse

            return getattr(scipy.sparse, name)
        if module in ("copyreg", "copy_reg") and name == "_reconstructor":
            import copyreg

            return copyreg._reconstructor  # type: ignore[attr-defined]
        if module == "collections" and name in ("defaultdict", "OrderedDict"):
            import collections

            return getattr(collections, name)
        msg = f"refusing to unpickle {module}.{name}: not a numpy, scipy.sparse or builtin container class"
        raise pickle.UnpicklingError(msg)


def restricted_load(path: str | Path) -> Any:
    """Unpickle ``path`` (latin1 for Python 2 pickles) with :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(Path(path).read_bytes()), encoding="latin1").load()


def find_planetoid_name(directory: str | Path) -> str:
    """The NAME of the single ``ind.NAME.x`` file in ``directory``."""
    names = sorted(p.name[len("ind.") : -len(".x")] for p in Path(directory).glob("ind.*.x"))
    if len(names) != 1:
        msg = f"{directory}: expected one ind.NAME.x file, found {names or 'none'}; pass --dataset NAME"
        raise FileNotFoundError(msg)
    return names[0]


def _dense_rows(m: Any) -> np.ndarray:
    import scipy.sparse as sp

    return np.asarray(m.toarray() if sp.issparse(m) else m)


def load_planetoid(directory: str | Path, name: str) -> Graph:
    """Cora / Citeseer / Pubmed from the Planetoid files, as the standard loader reads them.

    tx and ty are placed at the sorted test indices and reordered so that node ``test_index[k]`` gets
    row k of tx/ty; indices in the test range that the index file lacks (Citeseer's gaps) get zero
    features and label -1. Labels are the argmax of the one-hot rows, -1 for all-zero rows. The split
    is train = range(len(y)), val = range(len(y), len(y) + 500), test = the sorted test indices.
    """
    import scipy.sparse as sp

    d = Path(directory)
    parts = {key: restricted_load(d / f"ind.{name}.{key}") for key in ("x", "y", "tx", "ty", "allx", "ally", "graph")}
    test_index = np.array([int(line) for line in (d / f"ind.{name}.test.index").read_text().split()], dtype=np.int64)
    test_sorted = np.sort(test_index)
    y, tx, ty, allx, ally = (parts[k] for k in ("y", "tx", "ty", "allx", "ally"))
    lo, hi = int(test_sorted[0]), int(test_sorted[-1])
    if lo != allx.shape[0] or len(np.unique(test_index)) != len(test_index):
        msg = f"{d}: allx has {allx.shape[0]} rows, but the test indices start at {lo} (or repeat)"
        raise ValueError(msg)
    tx_ext = sp.lil_matrix((hi - lo + 1, tx.shape[1]), dtype=np.float64)
    tx_ext[test_sorted - lo, :] = sp.csr_matrix(tx) if not sp.issparse(tx) else tx
    ty_ext = np.zeros((hi - lo + 1, np.asarray(ty).shape[1]))
    ty_ext[test_sorted - lo, :] = np.asarray(ty)
    features = sp.vstack([sp.csr_matrix(allx) if not sp.issparse(allx) else allx, tx_ext]).tolil()
    features[test_index, :] = features[test_sorted, :]
    onehot = np.vstack([np.asarray(ally), ty_ext])
    onehot[test_index, :] = onehot[test_sorted, :]
    labels = np.where(onehot.sum(axis=1) > 0, onehot.argmax(axis=1), -1).astype(np.int64)
    n = features.shape[0]
    rows, cols = [], []
    for node, neighbours in parts["graph"].items():
        for other in neighbours:
            rows.append(int(node))
            cols.append(int(other))
    edges = canonical_edges(np.array(rows), np.array(cols))
    if edges.size and int(edges.max()) >= n:
        msg = f"{d}: the graph names node {int(edges.max())} but there are {n} feature rows"
        raise ValueError(msg)
    n_train = np.asarray(y).shape[0]
    val = np.arange(n_train, n_train + 500)
    val = val[(val < n) & (labels[np.minimum(val, n - 1)] >= 0)]
    test = test_sorted[labels[test_sorted] >= 0]
    return Graph(
        name=name,
        features=features.tocsr(),
        labels=labels,
        edges=edges,
        train=np.arange(n_train),
        val=val,
        test=test,
    )


def load_graph(dataset: str, data: Path | None, seed: int, scale: float = 1.0) -> Graph:
    if data is not None:
        name = find_planetoid_name(data) if dataset in ("planetoid", "csbm") else dataset
        return load_planetoid(data, name)
    if dataset == "csbm":
        return csbm(seed, CSBMParams().scaled(scale))
    if dataset == "karate":
        return karate(seed)
    msg = f"--dataset {dataset} needs --data DIR (a directory of Planetoid files)"
    raise ValueError(msg)


def pca_states(features: Any, dim: int) -> np.ndarray:
    """The scores of the first ``dim`` principal components of the features, (N, dim) float32, unscaled.

    As sklearn.decomposition.PCA(dim).fit_transform (the paper's code) up to signs; deterministic: each
    component's sign makes its largest-magnitude entry positive.
    """
    import scipy.sparse as sp

    x = features.toarray() if sp.issparse(features) else np.asarray(features)
    x = x.astype(np.float64)
    x -= x.mean(axis=0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    z = u[:, :dim] * s[:dim]
    signs = np.sign(z[np.abs(z).argmax(axis=0), np.arange(z.shape[1])])
    z *= np.where(signs == 0, 1.0, signs)
    return z.astype(np.float32)


def state_dim(graph: Graph) -> int:
    return min(MAX_DIM, int(graph.features.shape[1]), graph.num_nodes - 1)


# --- the model ------------------------------------------------------------------------------------
def _sparse_matmul_class() -> Any:
    import torch

    class SparseMatmul(torch.autograd.Function):
        """``A @ h`` for a constant sparse ``A`` (with its transpose ``At``), differentiable to any order.

        torch.sparse.mm's own autograd saves ``A`` (a sparse tensor, which has no storage that the
        saved-tensor meter could read) and has no forward-mode derivative; here the backward is
        ``At @ g`` and the JVP ``A @ v``, both through this same function, so double backward
        (CG-RBP's default JVP) and forward-mode AD (``jvp_mode="forward"``, torch.func.jvp) both work.
        The constant A is kept on the context, not saved: it is not part of the backward memory.
        """

        @staticmethod
        def forward(A: Any, _At: Any, h: Any) -> Any:
            return torch.sparse.mm(A, h)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:  # noqa: ARG004
            ctx.A, ctx.At = inputs[0], inputs[1]

        @staticmethod
        def backward(ctx: Any, g: Any) -> tuple[None, None, Any]:
            return None, None, SparseMatmul.apply(ctx.At, ctx.A, g)

        @staticmethod
        def jvp(ctx: Any, _tA: Any, _tAt: Any, th: Any) -> Any:
            return SparseMatmul.apply(ctx.A, ctx.At, th)

    return SparseMatmul


_SPARSE_MATMUL: Any = None


def sparse_matmul(A: Any, At: Any, h: Any) -> Any:
    """``A @ h`` by :class:`SparseMatmul` (created on first use, so that the module imports without torch)."""
    global _SPARSE_MATMUL  # noqa: PLW0603 - a lazily created class
    if _SPARSE_MATMUL is None:
        _SPARSE_MATMUL = _sparse_matmul_class()
    return _SPARSE_MATMUL.apply(A, At, h)


class Adjacency:
    """The symmetric sparse adjacency matrix (COO, both directions of every edge) and its aggregation."""

    def __init__(self, edges: np.ndarray, num_nodes: int, dtype: Any = None) -> None:
        import torch

        dtype = dtype or torch.float32
        rows = np.concatenate([edges[0], edges[1]])
        cols = np.concatenate([edges[1], edges[0]])
        index = torch.from_numpy(np.stack([rows, cols]).astype(np.int64))
        values = torch.ones(index.shape[1], dtype=dtype)
        self.A = torch.sparse_coo_tensor(index, values, (num_nodes, num_nodes), check_invariants=True).coalesce()
        self.At = self.A.t().coalesce()

    def aggregate(self, h: Any) -> Any:
        """The messages: row i is the sum of the states of i's neighbours."""
        return sparse_matmul(self.A, self.At, h)

    def dense(self) -> Any:
        return self.A.to_dense()


def make_model(dim: int, num_classes: int, seed: int, dtype: Any = None) -> Any:
    """The GRU cell (``dim`` -> ``dim``) and the linear readout, initialised from ``seed``.

    As the paper's code: Kaiming-normal weights (std sqrt(2 / fan_in)), zero biases.
    """
    import torch

    torch.manual_seed(seed)
    model = torch.nn.ModuleDict(
        {"cell": torch.nn.GRUCell(dim, dim, dtype=dtype), "readout": torch.nn.Linear(dim, num_classes, dtype=dtype)}
    )
    cell, readout = model["cell"], model["readout"]
    for weight in (cell.weight_ih, cell.weight_hh, readout.weight):
        torch.nn.init.kaiming_normal_(weight)
    for bias in (cell.bias_ih, cell.bias_hh, readout.bias):
        torch.nn.init.zeros_(bias)
    return model


def propagation_step(cell: Any, adj: Adjacency, h: Any) -> Any:
    """One update ``f(H) = GRUCell(A H, H)``."""
    return cell(adj.aggregate(h), h)


def propagate(cell: Any, adj: Adjacency, h0: Any, steps: int) -> tuple[Any, list[float]]:
    """``steps`` updates without autograd, with the relative differences ||H_t - H_{t-1}|| / ||H_t||."""
    import torch

    h, rel = h0, []
    with torch.no_grad():
        for _ in range(steps):
            new = propagation_step(cell, adj, h)
            rel.append(float(torch.linalg.vector_norm(new - h) / torch.linalg.vector_norm(new).clamp_min(1e-30)))
            h = new
    return h, rel


# --- training -------------------------------------------------------------------------------------
@dataclass
class Settings:
    dataset: str = "csbm"
    epochs: int = 300
    truncation: int = 5
    steps: int = 100
    seed: int = 0
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scale: float = 1.0


@dataclass
class Result:
    method: str
    status: str = "ok"  # "ok", "diverged" or "error"
    diverged_epoch: int | None = None
    reason: str | None = None
    loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    forward_rel_diff: list[float] = field(default_factory=list)  # at the last update, per epoch
    forward_rel_diff_steps: list[float] = field(default_factory=list)  # per update, after training
    wall_s: float = 0.0
    saved_kb: float | None = None
    backward_statuses: dict[str, int] = field(default_factory=dict)
    forward_statuses: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        finite = [c for c in self.loss if math.isfinite(c)]
        best = int(np.argmax(self.val_acc)) if self.val_acc else None
        return {
            "status": self.status,
            "diverged_epoch": self.diverged_epoch,
            "reason": self.reason,
            "final_val_acc": self.val_acc[-1] if self.val_acc else None,
            "best_val_acc": self.val_acc[best] if best is not None else None,
            "best_val_epoch": best + 1 if best is not None else None,
            "test_acc_at_best_val": self.test_acc[best] if best is not None else None,
            "final_test_acc": self.test_acc[-1] if self.test_acc else None,
            "final_train_loss": self.loss[-1] if self.loss else None,
            "best_train_loss": min(finite) if finite else None,
            "wall_time_s": self.wall_s,
            "backward_saved_kb": self.saved_kb,
            "final_forward_rel_diff": self.forward_rel_diff_steps[-1] if self.forward_rel_diff_steps else None,
            "backward_statuses": self.backward_statuses,
            "forward_statuses": self.forward_statuses,
            "train_loss_curve": self.loss,
            "val_acc_curve": self.val_acc,
            "test_acc_curve": self.test_acc,
            "forward_rel_diff_curve": self.forward_rel_diff,
            "forward_rel_diff_steps": self.forward_rel_diff_steps,
        }


def _count(d: dict[str, int], key: str) -> None:
    d[key] = d.get(key, 0) + 1


def train_method(name: str, graph: Graph, h0_np: np.ndarray, s: Settings, bar: Callable[..., Any] = progress) -> Result:
    import torch

    import rbp_core
    from rbp_core.backends.torch import fixed_point

    res = Result(name)
    adj = Adjacency(graph.edges, graph.num_nodes)
    h0 = torch.from_numpy(h0_np)
    labels = torch.from_numpy(graph.labels)
    train, val, test = (torch.from_numpy(ix) for ix in (graph.train, graph.val, graph.test))
    model = make_model(h0.shape[1], graph.num_classes, s.seed)
    cell, readout = model["cell"], model["readout"]
    opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    method = backward_method(name, s.truncation)
    forward = rbp_core.FixedPointIteration(rtol=0.0, max_iter=s.steps, divergence_factor=None)

    def f(h: Any) -> Any:
        return propagation_step(cell, adj, h)

    def evaluate() -> None:
        h, rel = propagate(cell, adj, h0, s.steps)
        with torch.no_grad():
            pred = readout(h).argmax(dim=1)
        res.val_acc.append(float((pred[val] == labels[val]).float().mean()))
        res.test_acc.append(float((pred[test] == labels[test]).float().mean()))
        res.forward_rel_diff.append(rel[-1])

    start = time.perf_counter()
    current_epoch = 0
    epochs = bar(range(s.epochs), desc=f"{name:>11}", leave=False)
    try:
        for epoch in epochs:
            current_epoch = epoch
            meter = SavedBytes(exclude=list(model.parameters()))
            with meter:
                h, info = fixed_point(f, h0, backward=method, solver=forward, throw=False, on_backward_failure="ignore")
                _count(res.forward_statuses, info.forward.status.name)
                check_forward(info)
                loss = torch.nn.functional.cross_entropy(readout(h[train]), labels[train])
                loss_value = finite_loss(loss)
                opt.zero_grad()
                backward_through(loss, info, res.backward_statuses)
            res.saved_kb = max(res.saved_kb or 0.0, meter.total / 2**10)
            check_grads(model.parameters())
            opt.step()
            res.loss.append(loss_value)
            evaluate()
            if hasattr(epochs, "set_postfix"):
                epochs.set_postfix(loss=f"{loss_value:.3f}", val=f"{res.val_acc[-1]:.3f}")
    except Diverged as err:
        res.status, res.diverged_epoch, res.reason = "diverged", current_epoch + 1, str(err)
    except Exception as err:  # noqa: BLE001 - a bug: reported with its traceback, the script exits non-zero
        res.status, res.reason = "error", f"{type(err).__name__}: {err}"
        traceback.print_exc()
    finally:
        if getattr(epochs, "close", None):
            epochs.close()
        res.wall_s = time.perf_counter() - start
    if res.status != "error":
        res.forward_rel_diff_steps = propagate(cell, adj, h0, s.steps)[1]
    return res


# --- output ---------------------------------------------------------------------------------------
def plot(results: Sequence[Result], out: Path, title: str) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        label = r.method + (f" (diverged @{r.diverged_epoch})" if r.status == "diverged" else "")
        if r.loss:
            ax_loss.plot(np.arange(1, len(r.loss) + 1), r.loss, label=label)
        if r.val_acc:
            ax_acc.plot(np.arange(1, len(r.val_acc) + 1), r.val_acc, label=label)
    ax_loss.set(xlabel="epoch (one full-graph step)", ylabel="training cross-entropy", yscale="log", title=title)
    ax_acc.set(xlabel="epoch (one full-graph step)", ylabel="validation accuracy", title=title)
    legend(ax_loss)
    legend(ax_acc)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    names = [r.method for r in results]
    kb = [r.saved_kb if r.saved_kb is not None else 0.0 for r in results]
    bars = ax.bar(names, kb, color="tab:blue")
    for b, v in zip(bars, kb, strict=True):
        ax.annotate(f"{v:,.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="KiB saved for backward (largest step)", yscale="log", title="backward memory")
    positive = [v for v in kb if v > 0]
    if positive:
        ax.set_ylim(bottom=min(positive) / 4, top=max(positive) * 3)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        if r.forward_rel_diff_steps:
            d = np.maximum(np.asarray(r.forward_rel_diff_steps), 1e-30)
            ax.plot(np.arange(1, len(d) + 1), d, label=r.method)
    ax.set(
        xlabel="update t",
        ylabel=r"$\|H_t - H_{t-1}\| / \|H_t\|$",
        yscale="log",
        title="forward convergence after training",
    )
    legend(ax)
    fig.tight_layout()
    fig.savefig(out / "forward_difference.png", dpi=100)
    plt.close(fig)


def table(results: Sequence[Result]) -> str:
    def fmt(v: float | None, spec: str = ".3f") -> str:
        return "-" if v is None else format(v, spec)

    header = (
        "method",
        "status",
        "final loss",
        "best loss",
        "final val",
        "best val",
        "test@best",
        "final test",
        "time s",
        "saved KiB",
        "fwd rel diff",
    )
    rows = []
    for r in results:
        d = r.to_json()
        rows.append(
            (
                r.method,
                r.status if r.status != "diverged" else f"diverged@{r.diverged_epoch}",
                fmt(d["final_train_loss"], ".4f"),
                fmt(d["best_train_loss"], ".4f"),
                fmt(d["final_val_acc"]),
                fmt(d["best_val_acc"]),
                fmt(d["test_acc_at_best_val"]),
                fmt(d["final_test_acc"]),
                f"{r.wall_s:.1f}",
                fmt(r.saved_kb, ",.0f"),
                fmt(d["final_forward_rel_diff"], ".1e"),
            )
        )
    return format_table(header, rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Planetoid files (--data) are Python pickles; they are read with a restricted unpickler that "
        "admits only numpy arrays, scipy.sparse matrices and builtin containers.",
    )
    p.add_argument(
        "--quick", action="store_true", help=f"a reduced run: CSBM graph scaled by {QUICK_SCALE}, {QUICK_EPOCHS} epochs"
    )
    p.add_argument("--out", type=Path, default=Path("graph-out"), help="output directory")
    p.add_argument(
        "--dataset",
        default="csbm",
        help="csbm (generated, default), karate, or with --data: planetoid (name from the files) or the "
        "Planetoid NAME (cora, citeseer, pubmed)",
    )
    p.add_argument("--data", type=Path, default=None, help="a directory of Planetoid files ind.NAME.* (pickles)")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"training epochs, one full-graph step each (default {Settings.epochs}, --quick {QUICK_EPOCHS})",
    )
    p.add_argument(
        "--truncation", type=int, default=5, help="T: backward steps of TBPTT/RBP/CG-RBP, terms of Neumann-RBP"
    )
    p.add_argument("--steps", type=int, default=100, help="propagation steps (forward updates)")
    p.add_argument("--lr", type=float, default=1e-2, help="SGD learning rate (the paper: 1e-3; see the docstring)")
    p.add_argument("--scale", type=float, default=None, help="CSBM size factor (default 1, --quick 0.25)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        methods = parse_methods(args.methods)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    if args.truncation < 2 or args.steps < 1:
        print("--truncation must be >= 2 and --steps >= 1", file=sys.stderr)
        return 2

    s = Settings(
        dataset=args.dataset,
        epochs=args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else Settings.epochs),
        truncation=args.truncation,
        steps=args.steps,
        seed=args.seed,
        lr=args.lr,
        scale=args.scale if args.scale is not None else (QUICK_SCALE if args.quick else 1.0),
    )
    try:
        graph = load_graph(args.dataset, args.data, s.seed, s.scale)
    except (ValueError, FileNotFoundError, pickle.UnpicklingError) as err:
        print(f"cannot load the data: {err}", file=sys.stderr)
        return 2
    h0 = pca_states(graph.features, state_dim(graph))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = graph.describe()
    print(
        f"{data['name']}: {data['nodes']} nodes, {data['edges']} edges, {data['features']} features, "
        f"{data['classes']} classes, homophily {data['edge_homophily']:.2f}, "
        f"split {data['train']}/{data['val']}/{data['test']}, state dim {h0.shape[1]}"
    )

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on two shared cores, intra-op threads made each step ~10x slower
    start = time.perf_counter()
    try:
        results = [train_method(m, graph, h0, s) for m in methods]
    finally:
        torch.set_num_threads(threads)
    total = time.perf_counter() - start
    metrics = {
        "settings": {**asdict(s), "quick": args.quick, "data": str(args.data) if args.data else None},
        "data": {**data, "state_dim": int(h0.shape[1])},
        "memory_measure": "backward_saved_kb: KiB of the distinct storages that autograd saves for backward in one "
        "training step (torch.autograd.graph.saved_tensors_hooks; the largest over all steps), not counting the "
        "parameters (saved by every method) nor the constant adjacency matrix; torch's CPU peak memory is not "
        "available, so this is the measure",
        "forward_convergence": "forward_rel_diff: ||H_t - H_{t-1}|| / ||H_t|| at the last of the propagation steps, "
        "in the evaluation run after each epoch (curve) and per update at the end of training (steps)",
        "total_wall_time_s": total,
        "methods": {r.method: r.to_json() for r in results},
    }
    (out / "metrics.json").write_text(json.dumps(finite_or_null(metrics), indent=1, allow_nan=False))
    plot(results, out, f"{data['name']} ({data['nodes']} nodes)")
    print(table(results))
    print(f"total {total:.1f} s; outputs in {out}")
    return report_outcomes(results, lambda r: f"epoch {r.diverged_epoch}")


if __name__ == "__main__":
    sys.exit(main())

"""A convolutional deep equilibrium classifier on Fashion-MNIST, trained with rbp-core (or TorchDEQ, to compare).

The model: a strided convolution stem (1 -> C channels, 28x28 -> 14x14), a DEQ layer whose cell is
the ResNet-style cell of the DEQ papers, ``z -> GN(relu(z + GN(x + conv2(GN(relu(conv1(z)))))))``
(C -> 2C -> C channels, GroupNorm), solved to its fixed point, then global average pooling and a
linear read-out. With rbp-core (the default) the layer is :class:`rbp_core.backends.torch.FixedPoint`
with the forward solver and backward method given on the command line, per sample
(``batch_axis=0``: converged samples leave the batch); with ``--peer torchdeq`` the same model uses
TorchDEQ's ``get_deq()`` defaults.

Data: the full Fashion-MNIST (60k training and 10k test images) from IDX files, as Debian's
``dataset-fashion-mnist`` package installs them (``apt-get install dataset-fashion-mnist``); pass
``--data DIR`` for another folder. Nothing is downloaded. ``--quick`` trains on a subset for one
epoch (the tests' setting).

``--jac-reg W`` adds W times the Jacobian penalty (Bai et al. 2021; one Hutchinson probe of
``||df/dz||_F^2`` per element at the fixed point, :func:`rbp_core.backends.torch.jacobian_penalty`)
to the loss.

Writes ``metrics.json`` (per epoch: train loss, test accuracy, forward and backward iterations per
step, seconds, and the process's peak resident memory so far, ``peak_rss_mib``) and ``curves.png``
to ``--out``. Run ``python examples/deq_classifier.py --epochs 10 --out deq-out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from _common import load_idx_dir, progress

import rbp_core
from rbp_core.backends.torch import JFB, FixedPoint, PhantomGradient, jacobian_penalty

DEFAULT_DATA = ("/usr/share/datasets/fashion-mnist",)  # where Debian's dataset-fashion-mnist puts them


class Cell(torch.nn.Module):
    """The DEQ cell: ``GN(relu(z + GN(x + conv2(GN(relu(conv1(z)))))))``."""

    def __init__(self, channels: int, groups: int = 4) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, 2 * channels, 3, padding=1, bias=False)
        self.conv2 = torch.nn.Conv2d(2 * channels, channels, 3, padding=1, bias=False)
        self.gn1 = torch.nn.GroupNorm(groups, 2 * channels)
        self.gn2 = torch.nn.GroupNorm(groups, channels)
        self.gn3 = torch.nn.GroupNorm(groups, channels)
        with torch.no_grad():  # a contraction at the start: the DEQ papers scale the weights down
            self.conv1.weight.mul_(0.5)
            self.conv2.weight.mul_(0.5)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.gn1(torch.relu(self.conv1(z)))
        return self.gn3(torch.relu(z + self.gn2(x + self.conv2(y))))


class Net(torch.nn.Module):
    """Stem, DEQ layer, pooling and read-out; ``deq(z, x)`` is the fixed-point layer (rbp-core's or TorchDEQ's)."""

    def __init__(self, channels: int, peer: str, solver: Any, backward: Any) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(1, channels, 3, stride=2, padding=1, bias=False), torch.nn.GroupNorm(4, channels)
        )
        self.cell = Cell(channels)
        # The read-out sees a 7x7 map per channel: a global average of a group-normalised map keeps
        # little of it (16 numbers, summing to zero per group), and a full epoch then reached 33 %.
        self.head = torch.nn.Sequential(torch.nn.AvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(channels * 49, 10))
        self.peer = peer
        if peer == "rbp-core":
            # A sample whose solve ends by its budget keeps its last iterate (forward) or its
            # unconverged adjoint (backward): counted in the metrics, not warned about each step.
            self.deq = FixedPoint(
                self.cell, backward=backward, solver=solver, batch_axis=0, throw=False, on_backward_failure="ignore"
            )
        else:
            torchdeq = __import__("torchdeq")
            self.torchdeq = torchdeq.get_deq()
        self.last: dict[str, float] = {}
        self.penalty: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None  # in eval mode: each sample's ||f(z) - z|| / ||f(z)|| at the output z

    def forward(self, images: torch.Tensor, jac_reg: bool = False) -> torch.Tensor:
        x = self.stem(images)
        z0 = torch.zeros_like(x)
        if self.peer == "rbp-core":
            z = self.deq(x, z0)
            # Bai et al.'s Jacobian regularisation: a one-probe estimate of ||df/dz||_F^2 per element at z*.
            self.penalty = jacobian_penalty(lambda h: self.cell(h, x), z) if jac_reg else None
            info = self.deq.info
            assert info is not None
            self.last = {
                "forward_iterations": float(info.forward.num_steps),
                "forward_failures": float(len(info.forward.failed_samples)),
            }
        else:
            zs, info = self.torchdeq(lambda z: self.cell(z, x), z0)
            z = zs[-1]
            self.last = {"forward_iterations": float(info["nstep"].max()), "forward_failures": 0.0}
        if not self.training:  # the accuracy the layer reached, measured the same way for both libraries
            fz = self.cell(z, x)
            self.residual = torch.linalg.vector_norm((fz - z).flatten(1), dim=1) / torch.linalg.vector_norm(
                fz.flatten(1), dim=1
            )
        return self.head(z)


def load(data: str | None, quick: bool, train_size: int | None = None) -> tuple[torch.Tensor, ...]:
    """Train and test images (N, 1, 28, 28) in [0, 1] with their labels; a subset with ``quick`` or ``train_size``."""
    folders = [data] if data else [d for d in DEFAULT_DATA if Path(d).is_dir()]
    if not folders:
        msg = (
            "Fashion-MNIST not found: install Debian's package (apt-get install dataset-fashion-mnist) or "
            "pass --data DIR with its IDX files (train-images-idx3-ubyte, ...)"
        )
        raise SystemExit(msg)
    folder = Path(folders[0])
    out = []
    for split in ("train", "t10k"):
        images, labels = load_idx_dir(folder, split)
        if quick:
            images, labels = images[: 2048 if split == "train" else 1024], labels[: 2048 if split == "train" else 1024]
        elif train_size is not None and split == "train":
            images, labels = images[:train_size], labels[:train_size]
        out += [torch.tensor(images[:, None].astype(np.float32) / 255.0), torch.tensor(labels.astype(np.int64))]
    return tuple(out)


def make_methods(args: argparse.Namespace) -> tuple[Any, Any]:
    """The forward solver and backward method named on the command line."""
    solvers = {
        "anderson": rbp_core.Anderson(rtol=args.tol, max_iter=args.max_iter, memory=args.memory),
        "broyden": rbp_core.Broyden(rtol=args.tol, max_iter=args.max_iter),
        "iteration": rbp_core.FixedPointIteration(rtol=args.tol, max_iter=args.max_iter, damping=args.damping),
    }
    backwards = {
        "gmres": rbp_core.GMRES(rtol=args.tol, max_iter=args.max_iter),
        "original": rbp_core.OriginalRBP(rtol=args.tol, max_iter=args.max_iter),
        "phantom": PhantomGradient(steps=5, damping=0.8),
        "jfb": JFB(),
    }
    return solvers[args.solver], backwards[args.backward]


def evaluate(net: Net, images: torch.Tensor, labels: torch.Tensor, batch: int) -> tuple[float, float]:
    """Test accuracy, and the median over test images of the forward solve's relative residual
    ``||f(z) - z|| / ||f(z)||`` at the layer's output (the same measure for rbp-core and TorchDEQ)."""
    net.eval()
    correct, residuals = 0, []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            correct += int((net(images[i : i + batch]).argmax(1) == labels[i : i + batch]).sum())
            assert net.residual is not None
            residuals.append(net.residual)
    net.train()
    return correct / len(images), float(torch.cat(residuals).median())


def train(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load(args.data, args.quick, args.train_size)
    solver, backward = make_methods(args)
    net = Net(args.channels, args.peer, solver, backward)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(args.seed)
    epochs = []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        losses, forward_its, backward_its = [], [], []
        failures = {"forward": 0, "backward": 0}
        batches = torch.randperm(len(x_train), generator=order).split(args.batch)
        steps = batches if args.no_progress else progress(batches, desc=f"epoch {epoch + 1}/{args.epochs}")
        for idx in steps:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x_train[idx], jac_reg=args.jac_reg > 0), y_train[idx])
            total = loss if net.penalty is None else loss + args.jac_reg * net.penalty
            total.backward()
            opt.step()
            losses.append(float(loss.detach()))
            forward_its.append(net.last["forward_iterations"])
            failures["forward"] += int(net.last["forward_failures"])
            if args.peer == "rbp-core" and net.deq.info is not None and net.deq.info.backward:
                backward_its.append(float(net.deq.info.backward[-1].num_steps))
                failures["backward"] += len(net.deq.info.backward[-1].failed_samples)
        seconds = time.perf_counter() - t0
        accuracy, residual = evaluate(net, x_test, y_test, 512)
        epochs.append(
            {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)),
                "test_accuracy": accuracy,
                "test_forward_residual": residual,
                "forward_iterations": float(np.mean(forward_its)),
                "backward_iterations": float(np.mean(backward_its)) if backward_its else None,
                "samples_over_budget": failures,
                "seconds": seconds,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
        print(
            f"epoch {epoch + 1}: loss {epochs[-1]['train_loss']:.4f}, test accuracy {100 * accuracy:.2f} %, "
            f"{epochs[-1]['forward_iterations']:.1f} forward iterations per step, test residual {residual:.2e}, "
            f"{seconds:.0f} s, "
            f"peak RSS {epochs[-1]['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
    return {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "epochs": epochs}


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    epochs = result["epochs"]
    e = [r["epoch"] for r in epochs]
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.5))
    panels = (
        ("test accuracy (%)", [100 * r["test_accuracy"] for r in epochs]),
        ("train loss", [r["train_loss"] for r in epochs]),
        ("forward iterations per step", [r["forward_iterations"] for r in epochs]),
        ("backward iterations per step", [r["backward_iterations"] or float("nan") for r in epochs]),
        ("seconds per epoch", [r["seconds"] for r in epochs]),
    )
    for ax, (title, values) in zip(axes, panels, strict=True):
        ax.plot(e, values, marker="o")
        ax.set_title(title)
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, default=Path("deq-out"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--max-iter", type=int, default=30)
    parser.add_argument("--solver", choices=("anderson", "broyden", "iteration"), default="anderson")
    parser.add_argument("--backward", choices=("gmres", "original", "phantom", "jfb"), default="gmres")
    parser.add_argument("--damping", type=float, default=0.5, help="of --solver iteration (default 0.5)")
    parser.add_argument("--memory", type=int, default=10, help="of --solver anderson (default 10)")
    parser.add_argument("--peer", choices=("rbp-core", "torchdeq"), default="rbp-core")
    parser.add_argument(
        "--jac-reg", type=float, default=0.0, help="weight of the Jacobian penalty (rbp-core only; default 0: none)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--quick", action="store_true", help="2048 training and 1024 test images, 1 epoch")
    parser.add_argument("--train-size", type=int, default=None, help="train on the first N training images only")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 1
    torch.set_num_threads(args.threads)
    result = train(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out)
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

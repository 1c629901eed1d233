"""Matplotlib figures of runs: samples against the target, trajectories, the loss curve."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fmjax.sampling import Trajectory  # noqa: E402

__all__ = ["samples", "samples_by_class", "trajectories", "loss_curve", "image_grid"]


def samples(filename: str, generated: np.ndarray, target: np.ndarray, *, title: str = "") -> None:
    """Scatter generated 2D points over target points and save the figure as PNG."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(target[:, 0], target[:, 1], s=1, alpha=0.3, c="tab:gray", label="target")
    ax.scatter(generated[:, 0], generated[:, 1], s=1, alpha=0.5, c="tab:blue", label="generated")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)


def samples_by_class(filename: str, panels: list, *, title: str = "") -> None:
    """One scatter per class: ``panels`` is a list of ``(generated [n, 2], target [n, 2], caption)``;
    generated points (blue) are drawn over the class's target points (grey), on shared axes."""
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), sharex=True, sharey=True)
    axes = np.atleast_1d(axes).ravel()
    for ax, (generated, target, caption) in zip(axes, panels, strict=False):
        ax.scatter(target[:, 0], target[:, 1], s=1, alpha=0.3, c="tab:gray", label="target")
        ax.scatter(generated[:, 0], generated[:, 1], s=1, alpha=0.5, c="tab:blue", label="generated")
        ax.set_aspect("equal")
        ax.set_title(caption, fontsize=8)
        ax.set_xlabel("$x_1$", fontsize=8)
        ax.set_ylabel("$x_2$", fontsize=8)
    for ax in axes[len(panels) :]:
        ax.axis("off")
    axes[0].legend(loc="upper right", markerscale=8, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)


def trajectories(filename: str, trajectory: Trajectory, *, count: int = 300) -> None:
    """Plot the paths of ``count`` 2D points from t=0 (black) to t=1 (blue) and save as PNG."""
    xs = np.asarray(trajectory.xs)[:, :count]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(xs[:, :, 0], xs[:, :, 1], c="olive", alpha=0.2, lw=0.5)
    ax.scatter(xs[0, :, 0], xs[0, :, 1], s=2, c="black", label="t = 0")
    ax.scatter(xs[-1, :, 0], xs[-1, :, 1], s=2, c="tab:blue", label="t = 1")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=4)
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)


def loss_curve(filename: str, metrics_file: str) -> None:
    """Plot the training loss recorded in a run's metrics.jsonl and save as PNG."""
    steps, losses = [], []
    with open(metrics_file) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                steps.append(record["step"])
                losses.append(record["loss"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses)
    ax.set_xlabel("step")
    ax.set_ylabel("CFM loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)


def image_grid(filename: str, images: np.ndarray, *, title: str = "") -> None:
    """Save uint8 images [n, H, W, C] as a square grid PNG."""
    n = len(images)
    side = int(np.ceil(np.sqrt(n)))
    fig, axes = plt.subplots(side, side, figsize=(side * 0.8, side * 0.8))
    for k, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if k < n:
            image = images[k]
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)

"""Matplotlib figures of runs: samples against the target, trajectories, the loss curve, densities and
points on the sphere as longitude/latitude maps."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fmjax.data.earth import to_lat_lon  # noqa: E402
from fmjax.sampling import Trajectory  # noqa: E402

__all__ = [
    "samples",
    "samples_by_class",
    "trajectories",
    "loss_curve",
    "image_grid",
    "sphere_density",
]


def samples(filename: str, generated: np.ndarray, target: np.ndarray, *, title: str = "") -> None:
    """Generated and target 2D points side by side on the same axes, and both overlaid (target on top, as
    outlines, so the generated points never hide it); saved as PNG. ``title`` says what was drawn."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2), sharex=True, sharey=True)
    panels = (("target", target, "tab:gray"), ("generated", generated, "tab:blue"))
    for ax, (name, points, colour) in zip(axes, panels, strict=False):
        ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.4, c=colour, linewidths=0)
        ax.set_title(f"{name} ({len(points)} points)", fontsize=9)
    overlay = axes[2]
    overlay.scatter(
        generated[:, 0], generated[:, 1], s=2, alpha=0.4, c="tab:blue", linewidths=0, label="generated"
    )
    overlay.scatter(
        target[:, 0], target[:, 1], s=6, facecolors="none", edgecolors="black", linewidths=0.3, alpha=0.5,
        label="target",
    )  # fmt: skip
    overlay.set_title("overlaid", fontsize=9)
    overlay.legend(loc="upper right", markerscale=3, fontsize=7)
    for ax in axes:
        ax.set_aspect("equal")
        ax.set_xlabel("$x_1$")
    axes[0].set_ylabel("$x_2$")
    fig.suptitle(title, fontsize=10)
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


def trajectories(filename: str, trajectory: Trajectory, *, count: int = 300, title: str = "") -> None:
    """Plot the paths of ``count`` 2D points through every saved time (a line per point, from t=0 in black
    to t=1 in blue) and save as PNG; ``title`` says how they were solved."""
    xs = np.asarray(trajectory.xs)[:, :count]
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot(xs[:, :, 0], xs[:, :, 1], c="olive", alpha=0.25, lw=0.5)
    ax.scatter(xs[0, :, 0], xs[0, :, 1], s=3, c="black", label="t = 0 (source)")
    ax.scatter(xs[-1, :, 0], xs[-1, :, 1], s=3, c="tab:blue", label="t = 1 (generated)")
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.legend(loc="upper right", markerscale=3, fontsize=8)
    ax.set_title(title or f"{xs.shape[1]} trajectories, {xs.shape[0]} saved times", fontsize=9)
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)


def loss_curve(filename: str, metrics_file: str, *, title: str = "") -> None:
    """Plot the training loss recorded in a run's metrics.jsonl (one point per logged interval: the mean
    loss of its steps) and save as PNG. Lines that are not training records (cut short, garbled, events)
    are skipped."""
    steps, losses = [], []
    with open(metrics_file) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "event" not in record and "loss" in record and "step" in record:
                steps.append(record["step"])
                losses.append(record["loss"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, marker="." if len(steps) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over each logged interval)")
    if losses and min(losses) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title(title or "training loss", fontsize=9)
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


def sphere_density(
    filename: str,
    points: np.ndarray,
    *,
    density: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    generated: np.ndarray | None = None,
    title: str = "",
) -> None:
    """Points on S^2 as longitude/latitude maps (equirectangular), saved as PNG: ``points`` [n, 3] (unit
    vectors, e.g. test points) over a learned density ``(lat, lon, log_density)`` (degrees; log_density
    [len(lat), len(lon)]) when given, and ``generated`` points [m, 3] beside them in a panel of their own
    when given."""
    panels = [name for name, value in (("density", density), ("generated", generated)) if value is not None]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(7.5 * max(len(panels), 1), 4))
    axes = np.atleast_1d(axes)
    shown = to_lat_lon(np.asarray(points))
    for ax, panel in zip(axes, panels or ["points"], strict=True):
        if panel == "density":
            lat, lon, log_density = density
            image = ax.pcolormesh(lon, lat, log_density, shading="auto", cmap="viridis")
            fig.colorbar(image, ax=ax, label="log density (nats, area measure)")
            ax.set_title("learned density and data (red)", fontsize=9)
        elif panel == "generated":
            drawn = to_lat_lon(np.asarray(generated))
            ax.scatter(drawn[:, 1], drawn[:, 0], s=2, alpha=0.5)
            ax.set_title("generated points (blue) and data (red)", fontsize=9)
        ax.scatter(shown[:, 1], shown[:, 0], s=2, c="red", alpha=0.5)
        ax.set_xlim(-180, 180)
        ax.set_ylim(-90, 90)
        ax.set_xlabel("longitude")
        ax.set_ylabel("latitude")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)

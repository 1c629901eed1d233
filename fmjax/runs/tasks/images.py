"""Image runs (``fmjax train --dataset digits``): a UNet CFM from Gaussian noise to images, its evaluation,
bits/dim and sampling; the data are a ``sources.ImageSource`` over a tfds dataset.

Images x in {0..255} are dequantised and mapped to [-1, 1) as z = 2 (x + u) / 256 - 1 with u ~ U[0, 1), the
space in which ``bits_per_dim`` evaluates the density. The source is N(0, I); the path is CondOT with
sigma_min = 1e-4 unless the config says otherwise. A run directory holds what a 2D run holds, with
``samples.png`` a grid of generated images; the summary has bits/dim on test images.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import plotting
from fmjax._checks import check_int
from fmjax.data.sources import ImageSource
from fmjax.data.tfds_sources import data_source, read_batch
from fmjax.likelihood import bits_per_dim
from fmjax.metrics import frechet_distance
from fmjax.models import UNet, functional
from fmjax.runs.config import EULER_STEPS, RunConfig
from fmjax.runs.rundir import METRICS_FILE, SUMMARY_FILE, append_record, write_atomic
from fmjax.runs.streams import stream_key
from fmjax.runs.velocity import check_class, run_velocity
from fmjax.sampling import sample

__all__ = [
    "ImageTask",
    "unet",
    "evaluate_images",
    "image_bits_per_dim",
    "generate_images",
    "image_shape",
    "class_labels_for",
]

IMAGE_SHAPES = {"digits": (8, 8, 1), "mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


class ImageTask:
    """What an image run's model, data and evaluation are (``fmjax.runs.tasks.Task``)."""

    name = "images"
    default_reflow_pairs = 4_096

    def point_shape(self, config: RunConfig) -> tuple[int, ...]:
        """[H, W, C] of one image of the dataset."""
        return image_shape(config)

    def model(self, config: RunConfig) -> tuple[Callable[..., jax.Array], Any]:
        """The UNet (``unet``)."""
        return unet(config)

    def source(self, config: RunConfig, data_dir: str | None) -> ImageSource:
        """The dataset's training images (each process reads its rows), with Gaussian noise as x0."""
        return ImageSource(
            data_source(config.dataset, split="train", data_dir=data_dir),
            batch_size=config.batch_size,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            labels=config.conditional,
            hflip=config.hflip,
        )

    def source_points(self, config: RunConfig, key: jax.Array, n: int) -> jax.Array:
        """``n`` images of Gaussian noise."""
        return jax.random.normal(key, (n, *image_shape(config)))

    def scans(self, backend: str) -> bool:
        """Scanned steps everywhere but XLA:CPU, which gives the convolutions of a UNet's backward pass
        non-canonical layouts inside a loop body and runs them on its slow generic path: a scanned digits
        step takes 0.5 s against 0.02 s for the same step dispatched alone (benchmarks/scan_cpu.py)."""
        return backend != "cpu"

    def evaluate(self, run: Any, run_dir: str, *, plots: bool, data_dir: str | None, say) -> dict[str, Any]:
        """``evaluate_images``, appended to the run's metrics."""
        summary = evaluate_images(
            run.config, run.apply_fn, run.state, os.fspath(run_dir), data_dir=data_dir, plots=plots,
            environment=run.environment, log=say,
        )  # fmt: skip
        append_record(os.path.join(os.fspath(run_dir), METRICS_FILE), {"event": "eval", **summary})
        return summary


def image_shape(config) -> tuple[int, int, int]:
    """The [H, W, C] of one image of the run's dataset."""
    return IMAGE_SHAPES[config.dataset]


def unet(config: RunConfig) -> tuple[Callable[..., jax.Array], Any]:
    """The UNet of an image run: its ``apply_fn`` and initial parameters.

    Raises ValueError naming ``width`` (and the UNet's reason) when the UNet cannot be built with the
    configuration's fields: its GroupNorms need channel counts that ``groups`` divides (multiples of 8
    do for the default 8 groups), an attention resolution must be a level's side, heads must divide
    the channels.
    """
    shape = image_shape(config)
    try:
        model = UNet(
            in_channels=shape[-1],
            channels=config.width,
            channel_mults=config.channel_mults,
            num_res_blocks=config.num_res_blocks,
            groups=config.groups,
            image_size=shape[0] if config.attention_resolutions else None,
            attention_resolutions=config.attention_resolutions,
            num_heads=config.num_heads,
            num_head_channels=config.num_head_channels,
            dropout=config.dropout,
            num_classes=config.num_classes,
            seed=config.seed,
        )
    except ValueError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        ints = lambda values: ",".join(map(str, values))  # noqa: E731
        attention = config.attention_resolutions
        raise ValueError(
            f"width {config.width}, channel_mults {ints(config.channel_mults)}, groups {config.groups}"
            + (f", attention_resolutions {ints(attention)}" if attention else "")
            + f" cannot make a UNet for {config.dataset!r} ({shape[0]}x{shape[1]} images): {reason}"
        ) from None
    return functional(model)


def image_bits_per_dim(
    config,
    apply_fn,
    params,
    *,
    n: int,
    divergence: str,
    num_probes: int,
    data_dir,
    probe="rademacher",
    seed=0,
    solver="dopri5",
):
    """Bits/dim of the first ``n`` test images (uniform dequantisation, K = 1); of a conditional run,
    bits/dim of each image given its label, -log2 p(x | y) / D. The dequantisation and probes draw from
    the ``bits_per_dim`` stream of ``seed``; the ODE is integrated with the adaptive ``solver``."""
    source = data_source(config.dataset, split="test", data_dir=data_dir)
    n = min(n, len(source))
    images = jnp.asarray(np.stack([source[i]["image"] for i in range(n)]))
    labels = np.asarray([source[i]["label"] for i in range(n)], np.int32) if config.conditional else None
    kwargs = {"divergence": divergence, "solver": solver}
    if divergence == "hutchinson":
        kwargs.update(num_probes=num_probes, probe=probe)
    velocity = run_velocity(config, apply_fn, params, labels=labels)
    bpd = bits_per_dim(velocity, images, key=stream_key(seed, "bits_per_dim"), **kwargs)
    values = np.asarray(bpd, np.float64)
    return {
        "bits_per_dim": float(values.mean()),
        "bits_per_dim_stderr": float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "n": n,
        "divergence": divergence,
    }


def class_labels_for(config, n: int, label: int | None = None) -> np.ndarray | None:
    """The labels of ``n`` images to draw from a conditional run: all ``label``, or without it the
    classes in turn, ``n // num_classes`` (rounded up) of each in a row (a grid row per class when n
    is num_classes^2); None for an unconditional run."""
    if not config.conditional:
        return None
    if label is not None:
        return np.full(n, label, np.int32)
    per_class = -(-n // config.num_classes)
    return (np.arange(n) // per_class).astype(np.int32)


def generate_images(
    run,
    *,
    n: int,
    solver: str = "dopri5",
    steps: int | None = None,
    seed: int = 0,
    label: int | None = None,
    guidance: float = 1.0,
):
    """``n`` generated uint8 images of a trained image run and the NFE of the solve.

    Conditional runs: all of class ``label``, or the classes in turn (``class_labels_for``);
    ``guidance`` w is classifier-free guidance (``fmjax.runs.run_velocity``).
    """
    check_int("n", n, low=1)
    if label is not None:
        label = check_class(run.config, label)
    params = run.state.ema_params if run.config.eval_ema else run.state.params
    x0 = jax.random.normal(stream_key(seed, "generate"), (n, *image_shape(run.config)))
    labels = class_labels_for(run.config, n, label)
    velocity = run_velocity(run.config, run.apply_fn, params, labels=labels, guidance=guidance)
    result = sample(velocity, x0, solver=solver, steps=steps)
    return np.clip(np.asarray((result.x1 + 1.0) * 127.5), 0, 255).astype(np.uint8), int(result.nfe)


def few_step_frechet(config, velocity_fn, *, data_dir: str | None) -> dict[str, Any]:
    """The pixel-space Fréchet distance between images generated with 1, 2, 4 and 8 Euler steps and the
    test images (both in [-1, 1]; test images at the centre of their dequantisation bins), on
    ``min(eval_samples, test images)`` of each. A conditional run draws the test images' own labels.
    ``velocity_fn(labels)`` gives the field (labels None for an unconditional run)."""
    source = data_source(config.dataset, split="test", data_dir=data_dir)
    n = min(config.eval_samples, len(source))
    images, labels = read_batch(source, np.arange(n))
    reference = (images.reshape(n, -1).astype(np.float64) + 0.5) / 128.0 - 1.0
    velocity = velocity_fn(labels if config.conditional else None)
    x0 = jax.random.normal(stream_key(config.seed, "few_step"), (n, *image_shape(config)))
    distances = {}
    for steps in EULER_STEPS:
        generated = np.clip(np.asarray(sample(velocity, x0, solver="euler", steps=steps).x1), -1.0, 1.0)
        distances[str(steps)] = frechet_distance(generated.reshape(n, -1), reference)
    return {"fd_euler_steps": distances, "fd_test_images": n}


def evaluate_images(
    config, apply_fn, state, run_dir: str, *, data_dir: str | None, plots: bool, environment=None, log=None
) -> dict[str, Any]:
    """Sample a grid of images (dopri5) and measure bits/dim on test images (Hutchinson, 4 probes).

    A conditional run's grid has a row per class and its bits/dim are of each image given its label.
    ``log`` hears what each stage is doing.
    """
    say = log or (lambda message: None)
    params = state.ema_params if config.eval_ema else state.params
    shape = image_shape(config)
    count = config.num_classes**2 if config.conditional else 64
    x0 = jax.random.normal(stream_key(config.seed, "eval"), (count, *shape))
    velocity = run_velocity(config, apply_fn, params, labels=class_labels_for(config, count))
    say(f"evaluating: sampling a grid of {count} images ({config.eval_solver})")
    result = sample(velocity, x0, solver=config.eval_solver)
    images = np.clip(np.asarray((result.x1 + 1.0) * 127.5), 0, 255).astype(np.uint8)
    n_bpd = min(config.eval_samples, 128)
    say(f"evaluating: bits/dim of {n_bpd} test images (Hutchinson, 4 probes, {config.eval_solver})")
    bpd = image_bits_per_dim(
        config, apply_fn, params, n=n_bpd, divergence="hutchinson", num_probes=4,
        data_dir=data_dir, solver=config.eval_solver,
    )  # fmt: skip
    summary = {"step": int(state.step), "nfe": int(result.nfe), "solver": config.eval_solver, **bpd}
    say("evaluating: pixel Fréchet distance to test images after 1, 2, 4, 8 Euler steps")
    summary.update(
        few_step_frechet(
            config,
            velocity_fn=lambda labels: run_velocity(config, apply_fn, params, labels=labels),
            data_dir=data_dir,
        )
    )
    if config.conditional:
        summary["conditional"] = True
    if environment:
        summary["environment"] = environment
    write_atomic(os.path.join(run_dir, SUMMARY_FILE), json.dumps(summary, indent=2))
    if plots:
        plotting.image_grid(os.path.join(run_dir, "samples.png"), images, title=f"NFE = {summary['nfe']}")
    return summary

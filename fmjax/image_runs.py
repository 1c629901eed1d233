"""Image runs (``fmjax train --dataset digits``): a UNet CFM from Gaussian noise to images.

Images x in {0..255} are dequantised and mapped to [-1, 1) as z = 2 (x + u) / 256 - 1 with u ~ U[0, 1), the
space in which ``bits_per_dim`` evaluates the density. The source is N(0, I); the path is CondOT with
sigma_min = 1e-4 unless the config says otherwise. A run directory holds what a 2D run holds, with
``samples.png`` a grid of generated images; the summary has bits/dim on test images.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fmjax.checkpoint import Checkpointer
from fmjax.data.tfds_sources import batches, data_source
from fmjax.likelihood import bits_per_dim
from fmjax.models import UNet, functional
from fmjax.sampling import as_velocity, sample
from fmjax.training import TrainState

__all__ = ["build", "train_images", "evaluate_images", "image_bits_per_dim", "generate_images"]


def _shape(config) -> tuple[int, int, int]:
    return {"digits": (8, 8, 1), "mnist": (28, 28, 1), "cifar10": (32, 32, 3)}[config.dataset]


def _mults(config) -> tuple[int, ...]:
    return {"digits": (1, 2), "mnist": (1, 2, 2), "cifar10": (1, 2, 2, 2)}[config.dataset]


def build(config) -> tuple[Callable, optax.GradientTransformation, TrainState]:
    """UNet apply_fn, optimiser and initial state of an image run."""
    model = UNet(
        in_channels=_shape(config)[-1], channels=config.width, channel_mults=_mults(config), seed=config.seed
    )
    apply_fn, params = functional(model)
    optimizer = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
    return apply_fn, optimizer, TrainState.create(params=params, optimizer=optimizer, key=key)


def _dequantise(key: jax.Array, images: jax.Array) -> jax.Array:
    u = jax.random.uniform(key, images.shape)
    return 2.0 * (images.astype(jnp.float32) + u) / 256.0 - 1.0


def train_images(config, run_dir: str, *, data_dir: str | None, progress=None, log=None, metrics_path=None):
    """Train an image run from its latest checkpoint (if any) to ``config.steps``; returns the final state.

    Training records go to ``metrics_path`` (JSON lines, process 0 only); on resume the records past the
    resumed step are dropped first, as those steps are recomputed identically.
    """
    from fmjax.runs import first_nonfinite, resume_metrics

    say = log or (lambda message: None)
    apply_fn, optimizer, state = build(config)
    processes, rank = jax.process_count(), jax.process_index()
    # several processes: data parallel over every device, each process reading its own share
    mesh = Mesh(np.array(jax.devices()), ("data",)) if processes > 1 else None
    if config.batch_size % processes:
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of the {processes} processes")
    step = config.make_step(apply_fn, optimizer, mesh=mesh)
    if mesh is not None:
        state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    source = data_source(config.dataset, split="train", data_dir=data_dir)
    local_batch = config.batch_size // processes
    per_epoch = (len(source) // processes) // local_batch
    noise_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)

    def draw_pair(step_index, images):
        key = jax.random.fold_in(noise_key, step_index)
        k_noise, k_deq = jax.random.split(key)
        x1 = _dequantise(k_deq, images)
        return jax.random.normal(k_noise, x1.shape), x1

    draw = (
        jax.jit(draw_pair)
        if mesh is None
        else jax.jit(draw_pair, out_shardings=(data_sharding, data_sharding))
    )

    with contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(
            Checkpointer(os.path.join(run_dir, "checkpoints"), max_to_keep=config.keep_checkpoints)
        )
        state, resumed, skipped = ckpt.restore_latest_good(state)
        for bad, reason in skipped:
            say(f"checkpoint {bad} is unreadable ({reason}); set aside as {bad}.corrupt")
        done = 0 if resumed is None else int(state.step)
        writer = metrics_path is not None and rank == 0
        if writer:
            resume_metrics(metrics_path, done)
        metrics_log = open(metrics_path if writer else os.devnull, "a")
        stack.callback(metrics_log.close)
        if resumed is not None:
            say(f"resuming from checkpoint {resumed}")
            if progress is not None:
                progress(done)
        stream = batches(
            source,
            batch_size=local_batch,
            seed=config.seed,
            start_epoch=done // per_epoch,
            skip_batches=done % per_epoch,
            process_index=rank,
            process_count=processes,
        )
        losses, skips, start = [], [], time.perf_counter()
        for _, images, _ in stream:
            if done >= config.steps:
                break
            if mesh is not None:
                images = jax.make_array_from_process_local_data(data_sharding, images)
            x0, x1 = draw(done, jnp.asarray(images))
            state, metrics = step(state, x0, x1)
            done += 1
            losses.append(metrics["loss"])
            skips.append(metrics.get("skipped", 0))
            log_now = done % config.log_every == 0 or done == config.steps
            save_now = done % config.checkpoint_every == 0 or done == config.steps
            if log_now or save_now:  # a non-finite step is found before anything is saved
                values, skipped = np.asarray(jnp.stack(losses)), np.asarray(skips)
                bad = first_nonfinite(values, skipped)
                if bad is not None:
                    last = ckpt.latest_step()
                    raise FloatingPointError(
                        f"loss became {values[bad]} at step {done - len(values) + bad + 1}; training "
                        f"stopped; the last good checkpoint is {last}"
                    )
            if log_now:
                applied = skipped == 0
                record = {
                    "step": done,
                    "loss": float(values[applied].mean()) if applied.any() else math.nan,
                    "time": round(time.perf_counter() - start, 3),
                }
                if skipped.any():
                    record["skipped"] = int(skipped.sum())
                    say(f"skipped {record['skipped']} non-finite step(s) up to step {done}")
                losses, skips = [], []
                metrics_log.write(json.dumps(record) + "\n")
                metrics_log.flush()
            if save_now:
                ckpt.save(done, state)
            if progress is not None:
                progress(1)
    if mesh is not None:  # a host copy of the replicated state, for evaluation on one process
        state = jax.tree.map(lambda a: jnp.asarray(a.addressable_data(0)), state)
    return apply_fn, state


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
):
    """Bits/dim of the first ``n`` test images (uniform dequantisation, K = 1)."""
    source = data_source(config.dataset, split="test", data_dir=data_dir)
    n = min(n, len(source))
    images = jnp.asarray(np.stack([source[i]["image"] for i in range(n)]))
    kwargs = {"divergence": divergence}
    if divergence == "hutchinson":
        kwargs.update(num_probes=num_probes, probe=probe)
    bpd = bits_per_dim(as_velocity(apply_fn, params), images, key=jax.random.PRNGKey(seed), **kwargs)
    values = np.asarray(bpd, np.float64)
    return {
        "bits_per_dim": float(values.mean()),
        "bits_per_dim_stderr": float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "n": n,
        "divergence": divergence,
    }


def generate_images(run, *, n: int, solver: str = "dopri5", steps: int | None = None, seed: int = 0):
    """``n`` generated uint8 images of a trained image run and the NFE of the solve."""
    from fmjax._checks import check_int

    check_int("n", n, low=1)
    params = run.state.ema_params if run.config.eval_ema else run.state.params
    x0 = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), 4), (n, *_shape(run.config)))
    result = sample(as_velocity(run.apply_fn, params), x0, solver=solver, steps=steps)
    return np.clip(np.asarray((result.x1 + 1.0) * 127.5), 0, 255).astype(np.uint8), int(result.nfe)


def evaluate_images(
    config, apply_fn, state, run_dir: str, *, data_dir: str | None, plots: bool
) -> dict[str, Any]:
    """Sample a grid of images (dopri5) and measure bits/dim on test images (Hutchinson, 4 probes)."""
    params = state.ema_params if config.eval_ema else state.params
    shape = _shape(config)
    x0 = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(config.seed), 3), (64, *shape))
    result = sample(as_velocity(apply_fn, params), x0, solver=config.eval_solver)
    images = np.clip(np.asarray((result.x1 + 1.0) * 127.5), 0, 255).astype(np.uint8)
    bpd = image_bits_per_dim(
        config, apply_fn, params, n=min(config.eval_samples, 128), divergence="hutchinson", num_probes=4,
        data_dir=data_dir,
    )  # fmt: skip
    summary = {"step": int(state.step), "nfe": int(result.nfe), "solver": config.eval_solver, **bpd}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if plots:
        from fmjax import plotting

        plotting.image_grid(os.path.join(run_dir, "samples.png"), images, title=f"NFE = {summary['nfe']}")
    return summary

"""2D runs: an MLP between two toy samplers (``fmjax.data.toy``), judged by exact W2 against the target."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from fmjax import plotting
from fmjax._checks import check_int
from fmjax.data.sources import ToySource
from fmjax.data.toy import log_density, sample_labeled
from fmjax.data.toy import sample as toy_sample
from fmjax.likelihood import log_likelihood
from fmjax.metrics import normalized_path_energy, path_energy, wasserstein2
from fmjax.models import MLP, functional
from fmjax.runs.config import EULER_STEPS, RunConfig
from fmjax.runs.rundir import METRICS_FILE, SUMMARY_FILE, append_record, write_atomic
from fmjax.runs.streams import stream_key
from fmjax.runs.velocity import check_class, check_finite_params, run_velocity
from fmjax.sampling import sample

__all__ = ["ToyTask", "class_points", "generate", "negative_log_likelihood"]

Say = Callable[[str], Any]


class ToyTask:
    """What a 2D run's model, data and evaluation are (``fmjax.runs.tasks.Task``)."""

    name = "toy"
    default_reflow_pairs = 20_000

    def point_shape(self, config: RunConfig) -> tuple[int, ...]:
        """A point of the 2D samplers."""
        return (2,)

    def model(self, config: RunConfig) -> tuple[Callable[..., jax.Array], Any]:
        """The MLP (``width`` x ``depth``, ``activation``; a class embedding in conditional runs)."""
        model = MLP(
            dim=2,
            width=config.width,
            depth=config.depth,
            activation=config.activation,
            num_classes=config.num_classes,
            seed=config.seed,
        )
        return functional(model)

    def source(self, config: RunConfig, data_dir: str | None) -> ToySource:
        """Both batches drawn on the device from the step's key."""
        del data_dir
        return ToySource(source=config.source, target=config.target, batch_size=config.batch_size)

    def source_points(self, config: RunConfig, key: jax.Array, n: int) -> jax.Array:
        """``n`` points of the source distribution."""
        return toy_sample(config.source, key, n)

    def scans(self, backend: str) -> bool:
        """A 2D step is scanned (several steps per dispatch) on every backend."""
        return True

    def evaluate(
        self, run: Any, run_dir: str, *, plots: bool, data_dir: str | None, say: Say
    ) -> dict[str, Any]:
        """W2 (exact, POT) of ``eval_samples`` points sampled with the adaptive ``eval_solver`` against fresh
        target points; path energy and NPE from a 100-step Euler solve; W2 after few Euler steps; the
        W2 floor of two target samples; plots. Writes ``summary.json`` and appends it to the metrics."""
        del data_dir
        config = run.config
        key = stream_key(config.seed, "eval")
        k_source, k_target, k_floor = jax.random.split(key, 3)
        x0 = toy_sample(config.source, k_source, config.eval_samples)
        labels = None
        if config.conditional:  # the target points' own labels: the conditional model draws their classes
            x1_true, labels = sample_labeled(config.target, k_target, config.eval_samples)
        else:
            x1_true = toy_sample(config.target, k_target, config.eval_samples)
        params = run.state.ema_params if config.eval_ema else run.state.params
        velocity = run_velocity(config, run.apply_fn, params, labels=labels)

        say(f"evaluating: sampling {config.eval_samples} points ({config.eval_solver}, then 100 Euler steps)")
        adaptive = sample(velocity, x0, solver=config.eval_solver)
        euler = sample(velocity, x0, solver="euler", steps=100, save_trajectory=True)
        say(
            f"evaluating: exact W2 to {config.eval_samples} target points (POT), and after 1, 2, 4, 8 Euler"
            " steps"
        )
        w2 = wasserstein2(adaptive.x1, x1_true)
        w2_euler = wasserstein2(euler.x1, x1_true)
        w2_source = wasserstein2(x0, x1_true)
        w2_floor = wasserstein2(toy_sample(config.target, k_floor, config.eval_samples), x1_true)
        w2_few = {
            str(steps): wasserstein2(sample(velocity, x0, solver="euler", steps=steps).x1, x1_true)
            for steps in EULER_STEPS
        }
        energy = float(path_energy(euler.trajectory))
        summary = {
            "step": int(run.state.step),
            "w2": w2,
            "nfe": int(adaptive.nfe),
            "solver": config.eval_solver,
            "w2_euler100": w2_euler,
            "w2_euler_steps": w2_few,
            "path_energy": energy,
            "npe": normalized_path_energy(energy, w2_source),
            "w2_source_target": w2_source,
            "w2_target_floor": w2_floor,
            "params": "ema" if config.eval_ema else "raw",
            "eval_samples": config.eval_samples,
            **(per_class_w2(adaptive.x1, x1_true, labels, config.num_classes) if config.conditional else {}),
            **({"environment": run.environment} if run.environment else {}),
        }
        run_dir = os.fspath(run_dir)
        write_atomic(os.path.join(run_dir, SUMMARY_FILE), json.dumps(summary, indent=2))
        append_record(os.path.join(run_dir, METRICS_FILE), {"event": "eval", **summary})
        if plots:
            say("evaluating: plots")
            params_used = "EMA parameters" if config.eval_ema else "raw parameters"
            plotting.samples(
                os.path.join(run_dir, "samples.png"),
                np.asarray(adaptive.x1),
                np.asarray(x1_true),
                title=f"{config.source} -> {config.target}, step {summary['step']} ({params_used}): "
                f"{config.eval_solver}, NFE = {summary['nfe']}, W2 = {w2:.3f} (floor {w2_floor:.3f})",
            )
            plotting.trajectories(
                os.path.join(run_dir, "trajectories.png"),
                euler.trajectory,
                count=300,
                title=f"300 trajectories, 100 Euler steps ({params_used}); NPE = {summary['npe']:.3f}",
            )
            plotting.loss_curve(
                os.path.join(run_dir, "loss.png"),
                os.path.join(run_dir, METRICS_FILE),
                title=(
                    f"training loss: path {config.path}, coupling {config.coupling},"
                    f" batch {config.batch_size}"
                ),
            )
        return summary


def class_points(name: str, key: jax.Array, label: int, n: int) -> np.ndarray:
    """``n`` points [n, 2] of toy distribution ``name`` drawn from class ``label`` alone (the labelled
    draws of ``fmjax.data.toy.sample_labeled`` whose label is ``label``, in order)."""
    kept, have, draw = [], 0, 0
    while have < n:
        points, labels = sample_labeled(name, jax.random.fold_in(key, draw), 4 * n)
        mine = np.asarray(points)[np.asarray(labels) == label]
        kept.append(mine)
        have += len(mine)
        draw += 1
    return np.concatenate(kept)[:n]


def per_class_w2(generated, target, labels, num_classes: int) -> dict[str, Any]:
    """W2 between the generated and the target points of each class (they share the labels)."""
    generated, target, labels = np.asarray(generated), np.asarray(target), np.asarray(labels)
    per_class = [
        wasserstein2(generated[labels == k], target[labels == k]) if (labels == k).sum() > 1 else math.nan
        for k in range(num_classes)
    ]
    return {"conditional": True, "w2_per_class": per_class}


def generate(
    run: Any,
    *,
    n: int,
    solver: str = "dopri5",
    steps: int | None = None,
    seed: int = 0,
    label: int | None = None,
    guidance: float = 1.0,
) -> tuple[np.ndarray, int, float]:
    """Draw ``n`` samples from a trained run; return (samples, nfe, W2 to fresh target samples).

    Conditional runs: ``label`` K draws every sample of class K and compares with target points of
    class K; without it the classes are drawn as the target's are (and compared with the whole
    target). ``guidance`` w is classifier-free guidance (see ``run_velocity``).
    """
    check_int("n", n, low=1)
    config = run.config
    if label is not None:
        label = check_class(config, label)
    key = stream_key(seed, "generate")
    k_source, k_target = jax.random.split(key)
    params = check_finite_params(run)
    x0 = toy_sample(config.source, k_source, n)
    labels = None
    if label is not None:
        labels = np.full(n, label, np.int32)
        target = class_points(config.target, k_target, label, n)
    elif config.conditional:
        target, labels = sample_labeled(config.target, k_target, n)
    else:
        target = toy_sample(config.target, k_target, n)
    velocity = run_velocity(config, run.apply_fn, params, labels=labels, guidance=guidance)
    result = sample(velocity, x0, solver=solver, steps=steps)
    x1 = np.asarray(result.x1)
    return x1, int(result.nfe), wasserstein2(x1, target)


def negative_log_likelihood(
    run: Any,
    *,
    n: int,
    divergence: str = "exact",
    num_probes: int = 1,
    probe: str = "rademacher",
    solver: str = "dopri5",
    seed: int = 0,
) -> dict[str, float]:
    """Mean negative log-likelihood (nats per point) of ``n`` fresh target points under the trained flow.

    Needs a source with a closed-form density (``fmjax.data.TOY_LOG_DENSITIES``). A conditional run's
    is of each point given its label, -log p(x | y).
    """
    check_int("n", n, low=2)
    log_p0 = log_density(run.config.source)
    key = stream_key(seed, "nll")
    k_target, k_probe = jax.random.split(key)
    labels = None
    if run.config.conditional:
        x1, labels = sample_labeled(run.config.target, k_target, n)
    else:
        x1 = toy_sample(run.config.target, k_target, n)
    params = check_finite_params(run)
    result = log_likelihood(
        run_velocity(run.config, run.apply_fn, params, labels=labels),
        x1,
        log_p0=log_p0,
        divergence=divergence,
        num_probes=num_probes,
        probe=probe,
        key=k_probe if divergence == "hutchinson" else None,
        solver=solver,
    )
    nll = -np.asarray(result.log_p, np.float64)
    return {
        "nll": float(nll.mean()),
        "nll_stderr": float(nll.std(ddof=1) / math.sqrt(n)),
        "bits_per_dim": float(nll.mean() / (2 * math.log(2))),
        "nfe": int(result.nfe),
        "divergence": divergence,
        "n": n,
        **({"conditional": True} if run.config.conditional else {}),
    }

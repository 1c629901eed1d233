"""Sphere runs: a tangent MLP on S^2 from the uniform distribution to an Earth dataset (``fmjax.data.earth``),
judged by the exact negative log-likelihood of the held-out points (nats, w.r.t. the sphere's area)."""

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
from fmjax.data import earth
from fmjax.data.sources import PointSource
from fmjax.likelihood import log_likelihood
from fmjax.manifolds import Sphere
from fmjax.models import MLP, TangentField, functional
from fmjax.runs.config import RunConfig
from fmjax.runs.rundir import METRICS_FILE, SUMMARY_FILE, append_record, write_atomic
from fmjax.runs.streams import stream_key
from fmjax.runs.velocity import check_finite_params, run_velocity
from fmjax.sampling import sample

__all__ = ["SphereTask", "sphere_nll", "generate_points", "UNIFORM_NLL"]

Say = Callable[[str], Any]
SPHERE = Sphere()
UNIFORM_NLL = math.log(4 * math.pi)
"""The NLL of the uniform distribution on S^2, log(4 pi) = 2.531 nats: where every run starts."""
GRID = (90, 180)  # latitude x longitude cells of the density map


class SphereTask:
    """What a sphere run's model, data and evaluation are (``fmjax.runs.tasks.Task``)."""

    name = "sphere"
    default_reflow_pairs = 10_000

    def point_shape(self, config: RunConfig) -> tuple[int, ...]:
        """A unit vector of R^3."""
        return (3,)

    def model(self, config: RunConfig) -> tuple[Callable[..., jax.Array], Any]:
        """``TangentField(MLP(dim=3, width, depth, activation), Sphere())``: evaluated at x/|x|, its output
        projected onto the tangent plane."""
        mlp = MLP(
            dim=3, width=config.width, depth=config.depth, activation=config.activation, seed=config.seed
        )
        return functional(TangentField(mlp, SPHERE))

    def source(self, config: RunConfig, data_dir: str | None) -> PointSource:
        """The training split of the dataset (``seed``'s 80/10/10 split), uniform points as x0."""
        del data_dir
        return PointSource(
            earth.load(config.dataset, split="train", seed=config.seed),
            base_sample=SPHERE.base_sample,
            batch_size=config.batch_size,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def source_points(self, config: RunConfig, key: jax.Array, n: int) -> jax.Array:
        """``n`` uniform points of S^2."""
        return SPHERE.base_sample(key, (n, 3))

    def scans(self, backend: str) -> bool:
        """A sphere step is scanned (several steps per dispatch) on every backend."""
        return True

    def evaluate(
        self, run: Any, run_dir: str, *, plots: bool, data_dir: str | None, say: Say
    ) -> dict[str, Any]:
        """The exact NLL (nats per point, ``eval_solver``) of the validation and test points, and a density
        map with the test points and ``eval_samples`` generated points. Writes ``summary.json`` and appends it
        to the metrics."""
        del data_dir
        config = run.config
        params = run.state.ema_params if config.eval_ema else run.state.params
        say(
            f"evaluating: exact NLL of the validation and test points of {config.dataset} "
            f"({config.eval_solver})"
        )
        validation = sphere_nll(config, run.apply_fn, params, split="validation", solver=config.eval_solver)
        test = sphere_nll(config, run.apply_fn, params, split="test", solver=config.eval_solver)
        summary = {
            "step": int(run.state.step),
            "dataset": config.dataset,
            "test_nll": test["nll"],
            "test_nll_stderr": test["nll_stderr"],
            "val_nll": validation["nll"],
            "n_test": test["n"],
            "n_val": validation["n"],
            "nfe": test["nfe"],
            "solver": config.eval_solver,
            "uniform_nll": UNIFORM_NLL,
            "params": "ema" if config.eval_ema else "raw",
            **({"environment": run.environment} if run.environment else {}),
        }
        run_dir = os.fspath(run_dir)
        write_atomic(os.path.join(run_dir, SUMMARY_FILE), json.dumps(summary, indent=2))
        append_record(os.path.join(run_dir, METRICS_FILE), {"event": "eval", **summary})
        if plots:
            say(f"evaluating: the density on a {GRID[0]}x{GRID[1]} latitude/longitude grid, and plots")
            generated, _ = generate_points(
                run, n=config.eval_samples, solver=config.eval_solver, seed=config.seed
            )
            lat, lon, log_density = density_grid(config, run.apply_fn, params)
            params_used = "EMA parameters" if config.eval_ema else "raw parameters"
            plotting.sphere_density(
                os.path.join(run_dir, "density.png"),
                earth.load(config.dataset, split="test", seed=config.seed),
                density=(lat, lon, log_density),
                generated=generated,
                title=f"{config.dataset}, step {summary['step']} ({params_used}): test NLL "
                f"{test['nll']:.3f} nats (uniform {UNIFORM_NLL:.3f})",
            )
            plotting.loss_curve(
                os.path.join(run_dir, "loss.png"),
                os.path.join(run_dir, METRICS_FILE),
                title=f"training loss: {config.dataset}, geodesic path, coupling {config.coupling}",
            )
        return summary


def sphere_nll(
    config: RunConfig,
    apply_fn: Callable[..., jax.Array],
    params: Any,
    *,
    split: str = "test",
    n: int | None = None,
    divergence: str = "exact",
    num_probes: int = 1,
    probe: str = "rademacher",
    seed: int = 0,
    solver: str = "dopri5",
) -> dict[str, Any]:
    """Mean NLL in nats per point (w.r.t. the area of S^2) of the first ``n`` points (all: None) of the
    dataset's ``split`` (the run's seeded split), by the Riemannian change of variables from the uniform
    source; Hutchinson probes draw from the ``nll`` stream of ``seed``."""
    points = earth.load(config.dataset, split=split, seed=config.seed)
    if n is not None:
        points = points[: check_int("n", n, low=1)]
    options = {"divergence": divergence, "solver": solver}
    if divergence == "hutchinson":
        options.update(num_probes=num_probes, probe=probe, key=stream_key(seed, "nll"))
    velocity = run_velocity(config, apply_fn, params)
    result = log_likelihood(velocity, jnp.asarray(points), manifold=SPHERE, **options)
    nll = -np.asarray(result.log_p, np.float64)
    return {
        "nll": float(nll.mean()),
        "nll_stderr": float(nll.std(ddof=1) / math.sqrt(len(nll))) if len(nll) > 1 else float("nan"),
        "n": len(nll),
        "split": split,
        "nfe": int(result.nfe),
        "divergence": divergence,
    }


def density_grid(config: RunConfig, apply_fn, params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lat, lon, log density [len(lat), len(lon)]) of the trained flow on the centres of a ``GRID`` of
    latitude/longitude cells (degrees), by the exact divergence."""
    lat = np.linspace(-90, 90, GRID[0], endpoint=False) + 90 / GRID[0]
    lon = np.linspace(-180, 180, GRID[1], endpoint=False) + 180 / GRID[1]
    grid = np.stack(np.meshgrid(lat, lon, indexing="ij"), axis=-1)  # [len(lat), len(lon), (lat, lon)]
    points = earth.from_lat_lon(grid).reshape(-1, 3)
    velocity = run_velocity(config, apply_fn, params)
    result = log_likelihood(
        velocity, jnp.asarray(points, jnp.float32), manifold=SPHERE, solver=config.eval_solver
    )
    return lat, lon, np.asarray(result.log_p).reshape(GRID)


def generate_points(
    run: Any, *, n: int, solver: str = "dopri5", steps: int | None = None, seed: int = 0
) -> tuple[np.ndarray, int]:
    """``n`` points [n, 3] drawn from a trained sphere run (uniform points of the ``generate`` stream of
    ``seed`` pushed through the flow on S^2) and the solve's NFE."""
    check_int("n", n, low=1)
    params = check_finite_params(run)
    x0 = SPHERE.base_sample(stream_key(seed, "generate"), (n, 3))
    result = sample(
        run_velocity(run.config, run.apply_fn, params), x0, manifold=SPHERE, solver=solver, steps=steps
    )
    return np.asarray(result.x1), int(result.nfe)

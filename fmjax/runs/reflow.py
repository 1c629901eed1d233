"""Reflow (rectified flow): a new run trained on the (x0, x1) pairs of a trained run's flow."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import jax

from fmjax._checks import ArgumentError, check_choice, check_int
from fmjax.data.pairs import load_pairs, save_pairs
from fmjax.reflow import reflow_pairs
from fmjax.runs.config import RunConfig
from fmjax.runs.run import Run, load_run
from fmjax.runs.rundir import PAIRS_FILE, check_run_dir, pairs_path
from fmjax.runs.streams import stream_key
from fmjax.runs.tasks import task_of
from fmjax.runs.velocity import check_finite_params
from fmjax.sampling import SOLVERS, as_velocity
from fmjax.training import TrainState

__all__ = ["prepare_reflow", "REFLOW_INITS"]

REFLOW_INITS = ("scratch", "teacher")


def prepare_reflow(
    teacher_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    pairs: int | None = None,
    solver: str = "dopri5",
    solver_steps: int | None = None,
    init: str = "scratch",
    overrides: dict[str, Any] | None = None,
    log: Callable[[str], Any] | None = None,
) -> tuple[RunConfig, TrainState | None]:
    """Prepare a reflow run (rectified flow's k-th reflow, k = the teacher's + 1) in ``run_dir``.

    Solves the teacher's flow (``fmjax.reflow.reflow_pairs``, with its EMA parameters unless it
    evaluates raw ones) from ``pairs`` fresh source points, drawn from the configuration's ``reflow``
    stream (by default 20 000 for a 2D teacher, 4 096 for an image run),
    and stores the pairs as ``run_dir/pairs.npz`` with their provenance. The student's configuration
    is the teacher's with the straight path without noise (``linear``, sigma 0: rectified flow's
    interpolation of deterministic pairs; a sphere run's geodesic path, the same on S^2), the independent
    coupling (which keeps the pairing) and
    ``pairs`` set, then ``overrides`` (e.g. ``{"steps": 5000}``). Returns it and the state to start
    from: None (``init="scratch"``, the configuration's own initialisation) or the teacher's
    parameters with a fresh optimiser (``init="teacher"``); pass both to ``train``.

    Prepared again (the same command after an interruption), the stored pairs are used if they come
    from the same teacher and settings; other pairs are refused. ValueError names a bad argument, a
    conditional teacher (pairs carry no labels) or a ``run_dir`` that cannot hold the run.
    """
    say = log or (lambda message: None)
    run_dir = os.fspath(run_dir)
    init = check_choice("init", init, REFLOW_INITS)
    teacher = load_run(teacher_dir, log=log)
    tconfig = teacher.config
    if tconfig.conditional:
        raise ValueError(
            "teacher is a conditional run: reflow pairs carry no labels (reflow an unconditional run)"
        )
    task = task_of(tconfig)
    if pairs is None:
        pairs = task.default_reflow_pairs
    n = check_int("pairs", pairs, low=1)
    sphere = tconfig.manifold() is not None
    fields = {
        **tconfig.to_json(),
        "path": "geodesic" if sphere else "linear",
        "sigma": None if sphere else 0.0,
        "coupling": "independent",
        "pairs": PAIRS_FILE,
        **(overrides or {}),
    }
    config = RunConfig(**fields)
    if config.batch_size > n:
        raise ArgumentError(
            lambda n_: f"{n_('pairs')} must be at least the batch size {config.batch_size}; got {n}"
        )
    if solver_steps is not None:
        check_int("solver_steps", solver_steps, low=1)
    check_choice("solver", solver, SOLVERS)
    check_run_dir(config, run_dir)
    provenance = {
        "teacher": os.path.abspath(os.fspath(teacher_dir)),
        "teacher_step": int(teacher.state.step),
        "pairs": n,
        "solver": solver,
        "solver_steps": solver_steps,
        "seed": config.seed,
    }
    path = pairs_path(config, run_dir)
    if os.path.isfile(path):
        stored = load_pairs(path)[2]
        differing = sorted(k for k, v in provenance.items() if stored.get(k) != v)
        if differing:
            raise ArgumentError(
                lambda n_: (
                    f"{n_('run_dir')} {run_dir!r} holds pairs of another reflow (differs in "
                    f"{', '.join(map(n_, differing))}); use a new {n_('run_dir')}"
                )
            )
        say(f"using the {n} pairs already solved in {path}")
    else:
        params = check_finite_params(teacher)
        x0 = task.source_points(tconfig, stream_key(config.seed, "reflow"), n)
        say(f"solving the teacher's flow ({solver}) from {n} source points for the reflow pairs")
        start = time.perf_counter()
        solved = reflow_pairs(
            as_velocity(teacher.apply_fn, params),
            x0,
            solver=solver,
            steps=solver_steps,
            batch_size=4096,
            manifold=tconfig.manifold(),
        )
        seconds = time.perf_counter() - start
        os.makedirs(run_dir, exist_ok=True)
        metadata = {**provenance, "nfe": int(solved.nfe.sum()), "seconds": round(seconds, 3)}
        save_pairs(path, solved.x0, solved.x1, metadata=metadata)
        say(f"solved {n} pairs in {seconds:.1f} s ({metadata['nfe']} field evaluations); wrote {path}")
    if init == "scratch":
        return config, None
    student = Run.build(config)
    if jax.tree.structure(student.state.params) != jax.tree.structure(teacher.state.params):
        raise ValueError(
            "init 'teacher' needs the teacher's architecture; leave width, depth and activation as they are"
        )
    params = teacher.state.ema_params if tconfig.eval_ema else teacher.state.params
    return config, TrainState.create(params=params, optimizer=student.optimizer, key=student.state.key)

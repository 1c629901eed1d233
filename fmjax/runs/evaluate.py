"""The evaluation of a trained run, for every kind of run (what it measures is the task's)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any

from fmjax.runs.run import Run
from fmjax.runs.sinks import log_to_sinks, metric_sinks
from fmjax.runs.tasks import task_of
from fmjax.runs.velocity import check_finite_params

__all__ = ["evaluate"]


def evaluate(
    run: Run,
    run_dir: str | os.PathLike,
    *,
    plots: bool = True,
    data_dir: str | None = None,
    tensorboard: bool = False,
    loggers: Sequence[Any] = (),
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Sample from the trained model and measure it against fresh target samples.

    Writes ``summary.json`` (and the plots) into ``run_dir`` and appends the result to the metrics.
    2D runs (``fmjax.runs.tasks.toy``): W2 is exact (POT) on ``eval_samples`` points with the adaptive
    ``eval_solver``; path energy and NPE come from a 100-step Euler solve, as in the OT-CFM papers;
    ``w2_euler_steps`` is the W2 after 1, 2, 4 and 8 Euler steps (what fewer steps cost);
    ``w2_target_floor`` is the W2 between two independent target samples of the same size: no model can
    be expected to go below it. Image runs (``fmjax.runs.tasks.images.evaluate_images``): a sample grid,
    bits/dim of test images and ``fd_euler_steps``, the pixel-space Fréchet distance to test images
    after few Euler steps. The summary's real scalars also go to ``run_dir/tensorboard``
    (``tensorboard``) and ``loggers`` as ``eval/<name>`` at the run's step. ``log`` hears what each
    stage is doing (a line before each). The parameters evaluated must be finite (ValueError).
    """
    check_finite_params(run)
    say = log or (lambda message: None)
    summary = task_of(run.config).evaluate(run, os.fspath(run_dir), plots=plots, data_dir=data_dir, say=say)
    with contextlib.ExitStack() as stack:
        sinks = metric_sinks(stack, os.fspath(run_dir), (tensorboard, tuple(loggers)), None)
        log_to_sinks(sinks, "eval", summary, summary["step"])
    return summary

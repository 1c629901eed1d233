"""What differs between the kinds of run, picked by name from the configuration (``RunConfig.kind``).

A task says what a run of its kind trains and how it is judged; the training loop, checkpoints,
devices and the run directory are the same for every kind. A new kind of run (token sequences) is a new
module here with a class of the ``Task`` protocol, registered in ``TASKS``, as ``sphere`` (points of an
Earth dataset on S^2) was.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

import jax

from fmjax.data.pairs import PairSource
from fmjax.runs.config import RunConfig
from fmjax.runs.rundir import pairs_path
from fmjax.runs.tasks.images import ImageTask
from fmjax.runs.tasks.sphere import SphereTask
from fmjax.runs.tasks.toy import ToyTask

__all__ = ["Task", "TASKS", "task_of", "make_source"]


class Task(Protocol):
    """A kind of run: its model, its data and its evaluation."""

    name: str
    default_reflow_pairs: int  # the source points ``fmjax reflow`` solves by default

    def point_shape(self, config: RunConfig) -> tuple[int, ...]:
        """The shape of one data point (the model's input and output without the batch axis)."""

    def model(self, config: RunConfig) -> tuple[Callable[..., jax.Array], Any]:
        """The model's ``apply_fn(params, t, x[, cond])`` and initial parameters (from the seed)."""

    def source(self, config: RunConfig, data_dir: str | None) -> Any:
        """The training data: a source of ``fmjax.data.sources`` (``host_spec``, ``host_batch``, ``pair``)."""

    def source_points(self, config: RunConfig, key: jax.Array, n: int) -> jax.Array:
        """``n`` points of the source distribution, shape [n, *point_shape]."""

    def scans(self, backend: str) -> bool:
        """Whether steps run several to a dispatch (``lax.scan``) on ``backend``, or one at a time."""

    def evaluate(self, run: Any, run_dir: str, *, plots: bool, data_dir: str | None, say) -> dict[str, Any]:
        """Judge the trained run; write ``summary.json`` (and plots), append it to the metrics, return it."""


TASKS: dict[str, Task] = {"toy": ToyTask(), "images": ImageTask(), "sphere": SphereTask()}
"""The kinds of run by name (``RunConfig.kind``)."""


def task_of(config: RunConfig) -> Task:
    """The task of ``config``'s kind of run."""
    return TASKS[config.kind]


def make_source(config: RunConfig, data_dir: str | None, run_dir: str) -> Any:
    """The data a run trains on: its stored pairs (a reflow run), else its task's source."""
    if config.pairs is None:
        return task_of(config).source(config, data_dir)
    path = pairs_path(config, run_dir)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pairs file {path!r} of this reflow run does not exist")
    source = PairSource(
        path,
        batch_size=config.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    dims, expected = tuple(source.host_spec()["x0"][0][1:]), task_of(config).point_shape(config)
    if dims != tuple(expected):
        raise ValueError(
            f"pairs file {path!r} holds points of shape {dims}; this run's model takes {expected}"
        )
    return source

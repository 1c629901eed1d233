"""A run's pieces (configuration, model, optimiser, state) built from its configuration or read back
from its directory."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmjax.checkpoint import Checkpointer
from fmjax.models import mixed_precision
from fmjax.runs.config import RunConfig
from fmjax.runs.rundir import CHECKPOINT_DIR, CONFIG_FILE, read_config
from fmjax.runs.streams import stream_key
from fmjax.runs.tasks import task_of
from fmjax.training import TrainState

__all__ = ["Run", "load_run", "holds_its_step"]


@dataclasses.dataclass
class Run:
    """The pieces of a run built from its configuration."""

    config: RunConfig
    apply_fn: Callable[[Any, jax.Array, jax.Array], jax.Array]
    optimizer: optax.GradientTransformation
    state: TrainState
    environment: dict[str, Any] | None = None  # devices it trained on, set by ``train``
    trained_steps: int = 0  # steps the last ``train`` call ran (0 when it found the run complete)

    @classmethod
    def build(cls, config: RunConfig) -> Run:
        """Model, optimiser and initial state for ``config``.

        With ``precision="bf16"`` the model computes in bfloat16 (parameters cast on the way in, the
        velocity returned as float32); parameters, optimiser state and EMA stay float32.
        """
        apply_fn, params = task_of(config).model(config)
        optimizer = config.make_optimizer()
        state = TrainState.create(params=params, optimizer=optimizer, key=stream_key(config.seed, "init"))
        if config.precision == "bf16":
            apply_fn = mixed_precision(apply_fn, jnp.bfloat16)
        return cls(config=config, apply_fn=apply_fn, optimizer=optimizer, state=state)


def holds_its_step(state: TrainState, step: int) -> str | None:
    """A checkpoint named ``step`` must hold the state of that step (not a copy of another's)."""
    held = int(np.asarray(state.step.addressable_data(0)))  # replicated: this process's copy
    return None if held == step else f"it holds the state of step {held}"


def load_run(run_dir: str | os.PathLike, *, log: Callable[[str], Any] | None = None) -> Run:
    """Rebuild a run from its directory: configuration and the newest checkpoint that reads back.

    Only reads (nothing is renamed or written, so it may run beside ``train``): a newer checkpoint that
    does not read back is reported through ``log`` ("checkpoint N in DIR is unreadable (...); using
    checkpoint M") and skipped.

    Raises:
      FileNotFoundError: ``run_dir`` is not a run, or has no checkpoint that reads back (one line naming
        the unreadable ones).
      ValueError: its configuration does not parse, or its ``checkpoints`` is not a directory.
    """
    run_dir = os.fspath(run_dir)
    config_path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{run_dir!r} is not an fmjax run: no {CONFIG_FILE}")
    config = read_config(run_dir)
    run = Run.build(config)
    directory = os.path.join(run_dir, CHECKPOINT_DIR)
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise ValueError(f"run {run_dir!r}: {CHECKPOINT_DIR} is not a directory")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"run {run_dir!r} has no checkpoint yet")
    with Checkpointer(directory, read_only=True) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"run {run_dir!r} has no checkpoint yet")
        state, step, skipped = ckpt.restore_latest_good(run.state, accept=holds_its_step)
    if step is None:
        unreadable = ", ".join(f"{s} ({reason})" for s, reason in skipped)
        raise FileNotFoundError(f"run {run_dir!r} has no checkpoint that reads back: {unreadable}"[:400])
    for bad, reason in skipped:
        if log is not None:
            log(f"checkpoint {bad} in {directory} is unreadable ({reason}); using checkpoint {step}")
    run.state = state
    return run

"""Where a run's metrics go besides ``metrics.jsonl``: TensorBoard event files and user loggers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

from fmjax.runs.rundir import TENSORBOARD_DIR
from fmjax.tensorboard import SummaryWriter, scalar_values

__all__ = ["metric_sinks", "log_to_sinks"]


def metric_sinks(stack: contextlib.ExitStack, run_dir: str, sinks, resumed: int | None) -> list:
    """The writers the records also go to (process 0): TensorBoard files when asked, and the loggers."""
    tensorboard, loggers = sinks
    out = list(loggers)
    if tensorboard:
        directory = os.path.join(run_dir, TENSORBOARD_DIR)
        # a resumed run's records after its checkpoint were logged by the run that stopped: TensorBoard drops
        # them (the records up to the checkpoint's step belong to it and stay)
        purge = None if resumed is None else resumed + 1
        out.append(stack.enter_context(SummaryWriter(directory, purge_step=purge)))
    return out


def log_to_sinks(sinks: Sequence[Any], prefix: str, record: dict[str, Any], step: int) -> None:
    """``record``'s real scalars as ``prefix/name`` at ``step`` to each sink (``scalars(dict, step)``)."""
    values = {f"{prefix}/{name}": value for name, value in scalar_values(record).items()}
    for sink in sinks:
        sink.scalars(values, step)

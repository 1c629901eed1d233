"""Several devices and processes: the data-parallel mesh, the processes' agreement at start-up, and
what a run records of the machine it trained on.

With several processes (``jax.distributed``) every process runs the same ``train`` call; these
functions make them agree (same run directory and configuration, one outcome) before any waits on
another, so a process that fails to start makes all fail in one line instead of hanging the others.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from fmjax._assignment import SOLVER_NAME
from fmjax._checks import ArgumentError, NamedMessage, check_int, from_template, message_template
from fmjax.checkpoint import from_process_0
from fmjax.runs.config import RunConfig

__all__ = ["make_mesh", "agree", "broadcast_outcome", "barrier", "stop_requested", "environment", "versions"]


def agree(run_dir: str, config: RunConfig, error: BaseException | None) -> None:
    """Every process of a multi-process run checks that it was given process 0's run directory and
    configuration, and started; if any did not, every process raises (one line) instead of waiting."""
    mine = {"run_dir": os.path.abspath(run_dir), "config": config.to_json()}
    first = from_process_0(mine if jax.process_index() == 0 else None)
    # compared as configurations: the broadcast's JSON turns tuple fields (channel_mults) into lists
    theirs = RunConfig.from_json(first["config"])
    code = (mine["run_dir"] != first["run_dir"]) * 1 + (config != theirs) * 2 + (error is not None) * 4
    codes = np.asarray(multihost_utils.process_allgather(np.int32(code))).reshape(-1)
    if not codes.any():
        return
    if error is not None:
        raise error
    wrong_dir, wrong_config = np.flatnonzero(codes & 1).tolist(), np.flatnonzero(codes & 2).tolist()
    failed = np.flatnonzero(codes & 4).tolist()
    differs = config.differing(theirs) if code & 2 else []

    def message(n: Callable[[str], str]) -> str:
        parts = []
        if wrong_dir:
            parts.append(
                f"process(es) {wrong_dir} got another {n('run_dir')} than process 0's {first['run_dir']!r}"
            )
        if wrong_config:
            parts.append(
                f"process(es) {wrong_config} got another configuration than process 0"
                + (f" (differs in {', '.join(map(n, differs))})" if differs else "")
            )
        if failed:
            parts.append(f"process(es) {failed} failed to start (see their output)")
        return (
            f"the processes of a multi-process run must be given the same {n('run_dir')} and configuration: "
            + "; ".join(parts)
        )

    raise ArgumentError(message)


def broadcast_outcome(error: BaseException | None) -> None:
    """Process 0's outcome (an error or none) on every process: the others raise it as one line too."""
    if jax.process_index() == 0:
        message = None
        if error is not None:  # its arguments marked, so that every process names them as its caller does
            message = (message_template(error).splitlines() or [type(error).__name__])[0]
        outcome = {"error": message, "value": isinstance(error, ValueError)}
        from_process_0(outcome)
        if error is not None:
            raise error
        return
    outcome = from_process_0(None)
    if outcome["error"] is not None:
        render = from_template(outcome["error"])
        raise (ArgumentError if outcome["value"] else NamedOSError)(lambda n: f"process 0: {render(n)}")


class NamedOSError(NamedMessage, OSError):
    """An OSError of another process, naming arguments as ``ArgumentError`` does."""


def make_mesh(devices: int | None = None) -> Mesh | None:
    """A data-parallel mesh (axis "data") over the first ``devices`` devices of the run (default: all).

    ``None`` when the run has a single device: the step then runs unsharded. With several processes
    (jax.distributed) every process must see the same count, and ``devices`` must use all of them.
    """
    available = jax.devices()
    if devices is None:
        devices = len(available)
    check_int("devices", devices, low=1)
    if devices > len(available):
        raise ArgumentError(
            lambda n: (
                f"{n('devices')} must be at most the {len(available)} devices this run sees; got {devices}"
            )
        )
    if jax.process_count() > 1 and devices != len(available):
        raise ArgumentError(
            lambda n: (
                f"{n('devices')} must be all {len(available)} devices of a multi-process run; got {devices}"
            )
        )
    if devices == 1:
        return None
    return Mesh(np.array(available[:devices]), ("data",))


VERSIONED = ("fmjax", "jax", "jaxlib", "flax", "optax", "diffrax", "ott-jax", "orbax-checkpoint")


def versions() -> dict[str, str]:
    """The installed versions of fmjax and the libraries a run's results depend on."""
    found = {}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def environment(mesh: Mesh | None) -> dict[str, Any]:
    """What the run trains on: device count, kind and platform, process count, the exact coupling's host
    solver and the versions of the libraries (``versions``)."""
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    return {
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "processes": jax.process_count(),
        "assignment_solver": SOLVER_NAME,
        "versions": versions(),
    }


def barrier(name: str) -> None:
    """Wait for every process of a multi-process run (jax.distributed) to get here; one process: no-op."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def stop_requested(stop: Callable[[], bool] | None) -> bool:
    """``stop()``, agreed by all processes (any of them asking stops all, at the same chunk)."""
    if stop is None:
        return False
    asked = bool(stop())
    if jax.process_count() == 1:
        return asked
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(asked))).any())

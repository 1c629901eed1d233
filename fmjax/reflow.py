"""Reflow: the (x0, x1) pairs of a flow, to train a straighter flow on (rectified flow, Liu et al.).

A flow ``v`` transports x0 ~ p0 to x1 = phi_1(x0) ~ p1 deterministically. Training a new flow on the fixed
pairs (x0, phi_1(x0)) with the straight conditional path x_t = (1 - t) x0 + t x1 and a coupling that keeps
the pairing (``fmjax.couplings.independent()``) gives a flow with the same marginals whose trajectories
are straighter (lower ``straightness``), so that few Euler steps suffice. The new flow is a velocity like
any other, so ``reflow_pairs`` applies to it again: k applications give the k-rectified flow.

>>> import jax.numpy as jnp
>>> from fmjax.reflow import reflow_pairs
>>> pairs = reflow_pairs(lambda t, x: -x, jnp.ones((4, 2)), batch_size=2)
>>> round(float(pairs.x1[3, 0]), 5), pairs.nfe.shape  # exp(-1), one solve per chunk of 2
(0.36788, (2,))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fmjax._checks import check_batch, check_finite, check_int
from fmjax.sampling import sample

__all__ = ["ReflowPairs", "reflow_pairs"]

DATA_AXIS = "data"


class ReflowPairs(NamedTuple):
    """Result of ``reflow_pairs``.

    Attributes:
      x0: the source points, shape [n, *dims] (numpy, on the host).
      x1: where the flow takes them, x1[k] = phi_1(x0[k]), shape [n, *dims], the dtype of x0.
      nfe: velocity evaluations of each chunk's solve, int array of shape [number of chunks]
        (``nfe.sum()`` batched evaluations in all; each evaluates one chunk).
    """

    x0: np.ndarray
    x1: np.ndarray
    nfe: np.ndarray


def _data_mesh(mesh: Mesh | None) -> Mesh | None:
    if mesh is None:
        devices = jax.local_devices()
        return Mesh(np.array(devices), (DATA_AXIS,)) if len(devices) > 1 else None
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None; got {type(mesh).__name__}")
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh must have an axis named {DATA_AXIS!r}; got axes {mesh.axis_names}")
    if mesh.is_multi_process:
        raise ValueError("mesh must hold only this process's devices (each process solves its own x0)")
    return mesh


def reflow_pairs(
    velocity: Callable[[jax.Array, jax.Array], jax.Array],
    x0: jax.Array | np.ndarray,
    *,
    solver: str = "dopri5",
    steps: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    batch_size: int | None = None,
    mesh: Mesh | None = None,
    max_steps: int = 4096,
    manifold: Any = None,
) -> ReflowPairs:
    """Solve dx/dt = v_t(x) from each source point: the pairs (x0[k], x1[k] = phi_1(x0[k])).

    The points are solved in chunks of ``batch_size`` (all at once by default), each chunk one call of
    ``fmjax.sampling.sample``, so device memory is bounded by one chunk; a chunk's x1 is copied to the
    host while the next one is solved. With ``mesh`` (or, by default, when this process sees several
    devices) every chunk is sharded over the mesh's "data" axis with a ``NamedSharding``, each device
    solving its rows; a chunk is padded (with copies of its own rows, dropped afterwards) to a multiple of
    the device count.

    With fixed steps the pairs do not depend on the chunking or the devices (up to the order of
    floating-point reductions inside the model). An adaptive solver picks its step sizes from the error
    norm over the whole chunk, as ``sample`` does for a batch, so x1 then depends on ``batch_size`` within
    the solver's tolerances.

    Args:
      velocity: ``velocity(t, x) -> dx/dt``, t a scalar array, x of shape [batch, *dims]; for a trained
        model ``fmjax.sampling.as_velocity(apply_fn, params)`` (a pytree: chunks reuse one compiled solve).
      x0: source points, shape [n, *dims], float32 or float64.
      solver, steps, rtol, atol, max_steps: as for ``fmjax.sampling.sample`` (dopri5, adaptive, by
        default; ``steps=N`` for a fixed grid of N steps).
      batch_size: points per solve (None: all n).
      mesh: a mesh with a "data" axis over this process's devices (None: all local devices when there
        are several, else no sharding).
      manifold: the manifold the points live on (``fmjax.sample``'s ``manifold``: x1 stays on it).

    Returns:
      ``ReflowPairs(x0, x1, nfe)``, host arrays.
    """
    if not callable(velocity):
        raise TypeError(f"velocity must be a callable velocity(t, x); got {type(velocity).__name__}")
    check_batch("x0", x0)
    check_finite("x0", x0)
    n = x0.shape[0]
    if n == 0:
        raise ValueError("x0 must hold at least one point; got an empty batch")
    batch_size = n if batch_size is None else min(check_int("batch_size", batch_size, low=1), n)
    mesh = _data_mesh(mesh)
    devices = 1 if mesh is None else mesh.shape[DATA_AXIS]
    padded = math.ceil(batch_size / devices) * devices
    sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    x0 = np.asarray(x0)

    x1_parts, nfe = [], []

    def collect(pending):
        result, count = pending
        x1_parts.append(np.asarray(result.x1)[:count])
        nfe.append(int(result.nfe))

    pending = None
    for start in range(0, n, batch_size):
        rows = x0[start : start + batch_size]
        chunk = rows[np.arange(padded) % len(rows)]  # padding rows repeat the chunk's own
        placed = jax.device_put(chunk, sharding)
        result = sample(
            velocity,
            placed,
            solver=solver,
            steps=steps,
            rtol=rtol,
            atol=atol,
            max_steps=max_steps,
            manifold=manifold,
        )
        if pending is not None:  # the previous chunk is fetched while this one runs
            collect(pending)
        pending = (result, len(rows))
    collect(pending)
    return ReflowPairs(x0=x0, x1=np.concatenate(x1_parts), nfe=np.asarray(nfe, np.int32))

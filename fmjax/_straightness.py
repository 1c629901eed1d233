"""How straight a flow is, and how much its conditional paths cross.

``straightness`` is Liu et al.'s measure of a flow's trajectories: 0 exactly when every trajectory is a
straight line run at constant speed, which is what one Euler step integrates without error.
``crossing_fraction`` measures the coupling a flow is trained on: the share of pairs of conditional
straight segments x0_k -> x1_k that cross, each crossing a point where the marginal field must average
two directions (and so bend its trajectories).

>>> import jax.numpy as jnp
>>> from fmjax._straightness import crossing_fraction, straightness
>>> float(straightness(lambda t, x: jnp.ones_like(x), jnp.zeros((4, 2)), steps=8))
0.0
>>> x0 = jnp.array([[0.0, 0.0], [0.0, 1.0]])
>>> crossing_fraction(x0, x0[::-1] + jnp.array([1.0, 0.0]))  # the two diagonals of a square
1.0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fmjax._checks import check_choice, check_finite, check_int, check_pair
from fmjax.sampling import sample

__all__ = ["straightness", "crossing_fraction"]

REDUCTIONS = ("mean", "none")


def straightness(
    velocity: Callable[[jax.Array, jax.Array], jax.Array],
    x0: jax.Array,
    *,
    solver: str = "euler",
    steps: int | None = 100,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    trajectory_points: int = 101,
    max_steps: int = 4096,
    reduction: str = "mean",
) -> jax.Array:
    """S = E_{x0} int_0^1 ||v_t(x_t) - (x_1 - x_0)||^2 dt along the flow's own trajectories.

    ``x_t`` solves dx/dt = v_t(x) from ``x_0 = x0`` and ``x_1`` is where it ends, so x_1 - x_0 is the
    mean velocity of the trajectory and S is, per point, the time-variance of its velocity: 0 exactly for
    straight trajectories run at constant speed, the ones a single Euler step integrates exactly
    (Liu et al., rectified flow). Equivalently S = E int_0^1 ||v_t(x_t)||^2 dt - E ||x_1 - x_0||^2, the
    path energy in excess of the squared displacement.

    Discretisation: the trajectory is solved with ``fmjax.sampling.sample`` (``solver``, ``steps``) and
    saved on its grid t_0 = 0 < ... < t_K = 1 (every step for ``steps=N``, K = N; ``trajectory_points``
    equally spaced times for adaptive solves, K = trajectory_points - 1), the velocity evaluated at the
    saved states, x_1 - x_0 taken as x_K - x_0, and the integral summed over the grid:

    - Euler: the left rule sum_k (t_{k+1} - t_k) ||v(t_k, x_k) - (x_K - x_0)||^2, which is the integral
      exactly for the Euler polyline itself (its velocity is v(t_k, x_k) on [t_k, t_{k+1}]), so S
      measures the trajectories the Euler sampler actually draws and converges to the flow's at first
      order in 1/N;
    - other solvers: the trapezoid rule on the saved points, second order in the grid spacing (for an
      adaptive solve, in 1 / trajectory_points, whatever the tolerances).

    A constant field gives S = 0 with no discretisation error; ``v_t(x) = A x`` gives
    S = E int_0^1 ||(A e^{tA} - e^A + I) x_0||^2 dt.

    Args:
      velocity: ``velocity(t, x) -> dx/dt``, t a scalar array, x of shape [batch, *dims]; it is also
        called under ``jax.vmap`` over the saved times (see ``fmjax.sampling.as_velocity`` for models).
      x0: source points, shape [batch, *dims].
      solver, steps, rtol, atol, trajectory_points, max_steps: as for ``fmjax.sampling.sample``.
      reduction: "mean" for the mean over the batch (a scalar), "none" for per-point values [batch].

    Returns:
      S, a scalar (``reduction="mean"``) or shape [batch], in the dtype of ``x0``.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    if not callable(velocity):
        raise TypeError(f"velocity must be a callable velocity(t, x); got {type(velocity).__name__}")
    result = sample(
        velocity,
        x0,
        solver=solver,
        steps=steps,
        rtol=rtol,
        atol=atol,
        save_trajectory=True,
        trajectory_points=trajectory_points,
        max_steps=max_steps,
    )
    ts, xs = result.trajectory
    displacement = xs[-1] - xs[0]
    velocities = jax.vmap(velocity)(ts, xs)  # [K + 1, batch, *dims]
    deviation = (velocities - displacement).reshape(*velocities.shape[:2], -1)
    squared = jnp.sum(jnp.square(deviation), axis=-1)  # [K + 1, batch]
    dt = jnp.diff(ts)[:, None]
    if solver == "euler":
        per_point = jnp.sum(dt * squared[:-1], axis=0)
    else:
        per_point = jnp.sum(dt * (squared[:-1] + squared[1:]) / 2, axis=0)
    return jnp.mean(per_point) if reduction == "mean" else per_point


def _orientation(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Sign of the cross product (q - p) x (r - p): +1 left turn, -1 right turn, 0 collinear."""
    return np.sign(
        (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])
    )


def _on_segment(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """For r collinear with the segment pq: whether r lies on it (inside its bounding box)."""
    return (
        (np.minimum(p[..., 0], q[..., 0]) <= r[..., 0])
        & (r[..., 0] <= np.maximum(p[..., 0], q[..., 0]))
        & (np.minimum(p[..., 1], q[..., 1]) <= r[..., 1])
        & (r[..., 1] <= np.maximum(p[..., 1], q[..., 1]))
    )


def _intersect(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Whether the closed segments [a, b] and [c, d] share a point (broadcasting over leading axes)."""
    o1, o2 = _orientation(a, b, c), _orientation(a, b, d)
    o3, o4 = _orientation(c, d, a), _orientation(c, d, b)
    proper = (o1 * o2 < 0) & (o3 * o4 < 0)
    touching = (
        ((o1 == 0) & _on_segment(a, b, c))
        | ((o2 == 0) & _on_segment(a, b, d))
        | ((o3 == 0) & _on_segment(c, d, a))
        | ((o4 == 0) & _on_segment(c, d, b))
    )
    return proper | touching


def crossing_fraction(x0: Any, x1: Any, *, chunk_size: int = 512) -> float:
    """Fraction of the n (n - 1) / 2 pairs of segments [x0_k, x1_k], [x0_l, x1_l] (k < l) that intersect.

    The segments are the conditional straight paths x_t = (1 - t) x0_k + t x1_k of a coupling's pairs
    (e.g. a batch after a coupling, or ``reflow_pairs``' output). Where two cross, the marginal velocity
    field averages two directions at that point, so its trajectories bend; a coupling whose segments never
    cross (one-dimensional monotone maps, the pairs of a flow that is already straight) gives 0, the
    independent coupling of two separated clouds a large share.

    The test is exact geometry on closed segments: orientation predicates (signs of 2x2 cross products
    in float64) detect proper crossings, and collinear overlaps or an endpoint lying on the other segment
    count as intersections too. It is defined for 2D points only. Cost: n^2 / 2 pair tests, computed
    ``chunk_size`` rows at a time (memory ~ 100 chunk_size n bytes).

    Args:
      x0: segment starts, shape [n, 2].
      x1: segment ends, shape [n, 2] (x0[k] is paired with x1[k]).
      chunk_size: rows of the pair matrix tested at once.

    Returns:
      The fraction of intersecting pairs, a Python float in [0, 1].
    """
    check_pair(x0, x1)
    check_finite("x0", x0)
    check_finite("x1", x1)
    if x0.ndim != 2 or x0.shape[1] != 2:
        raise ValueError(f"x0 and x1 must have shape [n, 2] (crossings are defined in 2D); got {x0.shape}")
    check_int("chunk_size", chunk_size, low=1)
    n = x0.shape[0]
    if n < 2:
        raise ValueError(f"x0 and x1 must hold at least 2 segments to form a pair; got {n}")
    a, b = np.asarray(x0, np.float64), np.asarray(x1, np.float64)
    crossing = 0
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        hits = _intersect(a[rows, None], b[rows, None], a[None], b[None])  # [rows, n]
        upper = np.arange(start, rows.stop)[:, None] < np.arange(n)[None]  # each pair once, k < l
        crossing += int(np.count_nonzero(hits & upper))
    return crossing / (n * (n - 1) / 2)

"""Sampling: integrate dx/dt = v_t(x) from t0 to t1 with diffrax.

>>> import jax.numpy as jnp
>>> from fmjax.sampling import sample
>>> result = sample(lambda t, x: -x, jnp.ones((3, 2)), solver="dopri5")
>>> round(float(result.x1[0, 0]), 5)  # exp(-1)
0.36788
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp

from fmjax._checks import check_batch, check_finite, check_int, check_real, lookup

__all__ = [
    "SOLVERS",
    "SolverSpec",
    "Trajectory",
    "SampleResult",
    "ModelVelocity",
    "as_velocity",
    "sample",
    "solve",
]

Velocity = Callable[[jax.Array, jax.Array], jax.Array]


class SolverSpec(NamedTuple):
    """A diffrax solver and what one step of it costs.

    Attributes:
      make: builds the diffrax solver.
      evals_per_step: velocity evaluations per step, accepted or rejected.
      initial_evals: evaluations before the first step (1 for first-same-as-last tableaux).
      adaptive: whether it has an embedded error estimate for adaptive step sizes.
      order: order of convergence of the solution.
    """

    make: Callable[[], diffrax.AbstractSolver]
    evals_per_step: int
    initial_evals: int
    adaptive: bool
    order: int


SOLVERS: dict[str, SolverSpec] = {
    "euler": SolverSpec(diffrax.Euler, 1, 0, False, 1),
    "midpoint": SolverSpec(diffrax.Midpoint, 2, 0, True, 2),
    "heun": SolverSpec(diffrax.Heun, 2, 0, True, 2),
    "ralston": SolverSpec(diffrax.Ralston, 2, 0, True, 2),
    "bosh3": SolverSpec(diffrax.Bosh3, 3, 1, True, 3),
    "dopri5": SolverSpec(diffrax.Dopri5, 6, 1, True, 5),
    "tsit5": SolverSpec(diffrax.Tsit5, 6, 1, True, 5),
    "dopri8": SolverSpec(diffrax.Dopri8, 13, 1, True, 8),
}
"""Solvers by name. The evaluation counts are those of diffrax's implementations and are checked
against a counting callback in the tests."""


class Trajectory(NamedTuple):
    """Saved states ``xs[k]`` (shape [num_times, batch, *dims]) at times ``ts[k]``."""

    ts: jax.Array
    xs: jax.Array


class SampleResult(NamedTuple):
    """Result of ``sample``.

    Attributes:
      x1: the state at t1, shape [batch, *dims].
      nfe: number of velocity evaluations the solve made (int32 scalar), rejected steps included.
      trajectory: a ``Trajectory`` when ``save_trajectory=True``, else None.
    """

    x1: jax.Array
    nfe: jax.Array
    trajectory: Trajectory | None


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"], meta_fields=["apply_fn"])
@dataclasses.dataclass(frozen=True)
class ModelVelocity:
    """``velocity(t, x) = apply_fn(params, broadcast(t, [batch]), x)``, a pytree over ``params``.

    Because ``params`` are leaves, not constants baked into a closure, a solve compiled for one set
    of parameters is reused for the next.
    """

    apply_fn: Callable[[Any, jax.Array, jax.Array], jax.Array]
    params: Any

    def __call__(self, t: jax.Array, x: jax.Array) -> jax.Array:
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        return self.apply_fn(self.params, t, x)


def as_velocity(apply_fn: Callable[[Any, jax.Array, jax.Array], jax.Array], params: Any) -> ModelVelocity:
    """Adapt a model ``apply_fn(params, t[batch], x)`` to the ``velocity(t, x)`` contract (t scalar)."""
    return ModelVelocity(apply_fn, params)


def _check_interval(t0: Any, t1: Any) -> tuple[float, float]:
    t0 = check_real("t0", t0, low=0.0, high=1.0)
    t1 = check_real("t1", t1, low=0.0, high=1.0)
    if t0 == t1:
        raise ValueError(f"t0 and t1 must differ; got t0 = t1 = {t0}")
    return t0, t1


def solve(
    vector_field: Callable[[jax.Array, Any, Any], Any],
    y0: Any,
    *,
    t0: float,
    t1: float,
    solver: str,
    steps: int | None,
    rtol: float,
    atol: float,
    max_steps: int,
    saveat: diffrax.SaveAt | None = None,
    args: Any = None,
) -> tuple[diffrax.Solution, jax.Array]:
    """Solve dy/dt = vector_field(t, y, args) with a named solver; return (solution, nfe).

    Pass arrays the field depends on through ``args`` (a pytree) and keep ``vector_field`` a fixed
    function: diffrax caches its compiled solve on the function's identity.

    ``steps=N`` uses a fixed grid of N equal steps; ``steps=None`` an adaptive PID controller with
    tolerances ``rtol``/``atol`` (only for solvers with an error estimate). Shared by ``sample`` and
    ``fmjax.likelihood``.
    """
    spec = lookup("solver", solver, SOLVERS)
    if steps is None:
        if not spec.adaptive:
            raise ValueError(
                f"steps is required for solver {solver!r}, which has no error estimate; "
                f"adaptive solvers: {', '.join(n for n, s in SOLVERS.items() if s.adaptive)}"
            )
        rtol = check_real("rtol", rtol, low=0.0, low_inclusive=False)
        atol = check_real("atol", atol, low=0.0, low_inclusive=False)
        controller = diffrax.PIDController(rtol=rtol, atol=atol)
        dt0 = None
    else:
        check_int("steps", steps, low=1)
        controller = diffrax.ConstantStepSize()
        dt0 = (t1 - t0) / steps
        max_steps = steps
    check_int("max_steps", max_steps, low=1)
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        spec.make(),
        t0=t0,
        t1=t1,
        dt0=dt0,
        y0=y0,
        args=args,
        stepsize_controller=controller,
        saveat=saveat if saveat is not None else diffrax.SaveAt(t1=True),
        max_steps=max_steps,
    )
    nfe = solution.stats["num_steps"] * spec.evals_per_step + spec.initial_evals
    return solution, jnp.asarray(nfe, jnp.int32)


def _velocity_term(t, x, velocity):
    return velocity(t, x)


def sample(
    velocity: Velocity,
    x0: jax.Array,
    *,
    solver: str = "dopri5",
    steps: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t0: float = 0.0,
    t1: float = 1.0,
    save_trajectory: bool = False,
    trajectory_points: int = 101,
    max_steps: int = 4096,
) -> SampleResult:
    """Push ``x0`` through the flow of ``velocity`` from ``t0`` to ``t1``.

    Args:
      velocity: ``velocity(t, x) -> dx/dt`` with t a scalar and x of shape [batch, *dims]; see
        ``as_velocity`` for models.
      x0: starting points, shape [batch, *dims].
      solver: a name from ``SOLVERS``.
      steps: None for adaptive steps; N for N equal steps.
      rtol, atol: tolerances of the adaptive controller (ignored for fixed steps).
      t0, t1: integration interval in [0, 1]; t1 < t0 integrates backwards (data to noise).
      save_trajectory: also return the states at ``trajectory_points`` equally spaced times (for
        fixed steps: at every grid point, steps + 1 of them).
      trajectory_points: number of saved times for adaptive solves.
      max_steps: step budget of adaptive solves.

    Returns:
      ``SampleResult(x1, nfe, trajectory)``.
    """
    check_batch("x0", x0)
    check_finite("x0", x0)
    t0, t1 = _check_interval(t0, t1)
    if save_trajectory:
        num = steps + 1 if steps is not None else check_int("trajectory_points", trajectory_points, low=2)
        ts = jnp.linspace(t0, t1, num, dtype=x0.dtype)
        saveat = diffrax.SaveAt(ts=ts)
    else:
        saveat = diffrax.SaveAt(t1=True)
    solution, nfe = solve(
        _velocity_term,
        x0,
        t0=t0,
        t1=t1,
        solver=solver,
        steps=steps,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        saveat=saveat,
        args=velocity,
    )
    if save_trajectory:
        return SampleResult(x1=solution.ys[-1], nfe=nfe, trajectory=Trajectory(ts=ts, xs=solution.ys))
    return SampleResult(x1=solution.ys[0], nfe=nfe, trajectory=None)

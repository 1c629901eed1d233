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
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fmjax._checks import (
    check_batch,
    check_bool,
    check_callable,
    check_finite,
    check_int,
    check_output,
    check_real,
    is_traced,
    lookup,
)
from fmjax.manifolds import resolve_manifold

__all__ = [
    "SOLVERS",
    "SOLVE_STATUS",
    "SolverSpec",
    "Trajectory",
    "SampleResult",
    "ModelVelocity",
    "TangentVelocity",
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


SOLVE_STATUS = ("ok", "non-finite", "stopped")
"""Meaning of ``SampleResult.status`` / ``LikelihoodResult.status`` (the index is the code):
0 "ok"; 1 "non-finite": the solve reached t1 but its result holds NaN or inf; 2 "stopped": the
solver stopped before t1 (max_steps reached: a field that is non-finite ahead, or too stiff for the
step budget), and the result is filled with NaN. Outside jit a nonzero status raises instead."""


class SampleResult(NamedTuple):
    """Result of ``sample``.

    Attributes:
      x1: the state at t1, shape [batch, *dims].
      nfe: number of velocity evaluations the solve made (int32 scalar), rejected steps included.
      trajectory: a ``Trajectory`` when ``save_trajectory=True``, else None.
      status: int32 scalar, a code of ``SOLVE_STATUS``; always 0 outside jit (a failure raises).
    """

    x1: jax.Array
    nfe: jax.Array
    trajectory: Trajectory | None
    status: jax.Array


_SHAPE_OF_X = "[batch, *dims], the shape of x"


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params", "cond"], meta_fields=["apply_fn"])
@dataclasses.dataclass(frozen=True)
class ModelVelocity:
    """``velocity(t, x) = apply_fn(params, broadcast(t, [batch]), x)``, a pytree over ``params``.

    With a ``cond`` (a conditional model), ``apply_fn(params, t, x, cond)``. Because ``params`` (and
    ``cond``) are leaves, not constants baked into a closure, a solve compiled for one set of
    parameters is reused for the next. ``apply_fn``'s output must be a real floating array of x's
    shape [batch, *dims] (checked at trace time: a ValueError/TypeError names ``apply_fn``).
    """

    apply_fn: Callable[..., jax.Array]
    params: Any
    cond: Any = None

    def __call__(self, t: jax.Array, x: jax.Array) -> jax.Array:
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        if self.cond is None:
            out = self.apply_fn(self.params, t, x)
            check_output("apply_fn(params, t, x)", out, x.shape, _SHAPE_OF_X)
        else:
            out = self.apply_fn(self.params, t, x, self.cond)
            check_output("apply_fn(params, t, x, cond)", out, x.shape, _SHAPE_OF_X)
        return out

    def per_sample_cond(self) -> Any:
        """The condition, one per sample (leaves [batch, ...]), or None (see ``with_cond``)."""
        return self.cond

    def with_cond(self, cond: Any) -> ModelVelocity:
        """This field with another condition (e.g. one sample's, for a per-sample divergence)."""
        return dataclasses.replace(self, cond=cond)


def as_velocity(apply_fn: Callable[..., jax.Array], params: Any, cond: Any = None) -> ModelVelocity:
    """Adapt a model ``apply_fn(params, t[batch], x)`` to the ``velocity(t, x)`` contract (t scalar).

    ``cond`` (optional): the condition of a conditional model ``apply_fn(params, t, x, cond)``, one per
    sample (leaves [batch, ...], as in ``cfm_loss``); for guidance see ``fmjax.guided_velocity``.

    >>> import jax.numpy as jnp
    >>> velocity = as_velocity(lambda params, t, x: params * t[:, None] * x, 2.0)
    >>> velocity(0.5, jnp.ones((3, 2))).tolist()[0]
    [1.0, 1.0]
    """
    if cond is None:
        check_callable("apply_fn", apply_fn, ("params", "t", "x"))
    else:
        check_callable("apply_fn", apply_fn, ("params", "t", "x", "cond"))
    return ModelVelocity(apply_fn, params, cond)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["velocity"], meta_fields=["manifold"])
@dataclasses.dataclass(frozen=True)
class TangentVelocity:
    """A field made tangent to a manifold M: ``velocity`` evaluated at projx(x), its output projected,

        v_M(t, x) = proju(projx(x), v(t, projx(x))).

    On M it is the tangent part of ``velocity``; off M (where a solver's stages land, within its
    tolerance) it is the field at the nearest point of M. Any ambient extension of a field on M gives
    the same ``v_M`` on M, hence the same flow and the same Riemannian divergence. ``sample`` and
    ``log_likelihood`` wrap their ``velocity`` this way when given ``manifold``. A pytree over
    ``velocity`` (a model's parameters stay leaves); per-sample conditions pass through
    (``per_sample_cond``, ``with_cond``).
    """

    velocity: Any
    manifold: Any

    def __call__(self, t: jax.Array, x: jax.Array) -> jax.Array:
        on = self.manifold.projx(x)
        return self.manifold.proju(on, call_velocity(self.velocity, t, on))

    def per_sample_cond(self) -> Any:
        """The wrapped field's per-sample condition, or None."""
        inner = getattr(self.velocity, "per_sample_cond", None)
        return inner() if inner is not None else None

    def with_cond(self, cond: Any) -> TangentVelocity:
        """This field with the wrapped field's condition replaced (see ``ModelVelocity.with_cond``)."""
        return dataclasses.replace(self, velocity=self.velocity.with_cond(cond))


def on_manifold(velocity: Any, x: jax.Array, manifold: Any, name: str) -> tuple[TangentVelocity, jax.Array]:
    """``velocity`` made tangent to ``manifold`` and the points ``x`` (argument ``name``) projected onto it;
    the manifold is checked (an ``fmjax.manifolds.Manifold``) and so is x's last axis where it has a size."""
    manifold = resolve_manifold(manifold, "manifold")
    manifold.check_points(name, x)
    return TangentVelocity(velocity, manifold), manifold.projx(x)


_VELOCITY_HINT = " (a model apply_fn(params, t, x)? wrap it: fmjax.as_velocity(apply_fn, params))"


def check_velocity(velocity: Any) -> None:
    """Raise a TypeError unless ``velocity`` can be called as ``velocity(t, x)``."""
    check_callable("velocity", velocity, ("t", "x"), hint=_VELOCITY_HINT)


def call_velocity(velocity: Velocity, t: jax.Array, x: jax.Array) -> jax.Array:
    """``velocity(t, x)``, checked at trace time to be a real floating array of x's shape, cast to
    x's dtype (a bfloat16 or float32 model output joins a float32 or float64 state)."""
    out = velocity(t, x)
    check_output("velocity(t, x)", out, x.shape, _SHAPE_OF_X)
    return out.astype(x.dtype)


def _check_interval(t0: Any, t1: Any) -> tuple[float, float]:
    t0 = check_real("t0", t0, low=0.0, high=1.0)
    t1 = check_real("t1", t1, low=0.0, high=1.0)
    if t0 == t1:
        raise ValueError(f"t0 and t1 must differ; got t0 = t1 = {t0}")
    return t0, t1


def colocate(args: Any, y0: Any) -> Any:
    """Replicate ``args``' committed arrays onto the devices of a ``y0`` sharded over a mesh.

    A model's parameters restored from a checkpoint sit on one device; a solve of points sharded
    over several devices needs them on each. Arrays already there, uncommitted arrays (placed by
    jit as needed) and tracers are left as they are.
    """
    placed = [leaf for leaf in jax.tree.leaves(y0) if isinstance(leaf, jax.Array)]
    if not placed or isinstance(placed[0], jax.core.Tracer):
        return args
    sharding = placed[0].sharding
    if not isinstance(sharding, NamedSharding) or len(sharding.device_set) < 2:
        return args
    replicated = NamedSharding(sharding.mesh, PartitionSpec())

    def place(leaf):
        if (
            isinstance(leaf, jax.Array)
            and not isinstance(leaf, jax.core.Tracer)
            and leaf.committed
            and leaf.sharding.device_set != sharding.device_set
        ):
            return jax.device_put(leaf, replicated)
        return leaf

    return jax.tree.map(place, args)


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
    ``fmjax.likelihood``. The solve never raises on failure (diffrax's ``throw=False``): read
    ``solution.result``, or use ``solve_status``.
    """
    spec = lookup("solver", solver, SOLVERS)
    rtol = check_real("rtol", rtol, low=0.0, low_inclusive=False)
    atol = check_real("atol", atol, low=0.0, low_inclusive=False)
    max_steps = check_int("max_steps", max_steps, low=1)
    if steps is None:
        if not spec.adaptive:
            raise ValueError(
                f"steps is required for solver {solver!r}, which has no error estimate; "
                f"adaptive solvers: {', '.join(n for n, s in SOLVERS.items() if s.adaptive)}"
            )
        controller = diffrax.PIDController(rtol=rtol, atol=atol)
        dt0 = None
    else:
        steps = check_int("steps", steps, low=1)
        controller = diffrax.ConstantStepSize()
        dt0 = (t1 - t0) / steps
        max_steps = steps
    args = colocate(args, y0)
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
        throw=False,
    )
    nfe = solution.stats["num_steps"] * spec.evals_per_step + spec.initial_evals
    return solution, jnp.asarray(nfe, jnp.int32)


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def solve_status(solution: diffrax.Solution, result: Any) -> jax.Array:
    """The ``SOLVE_STATUS`` code (int32 scalar) of a solve whose final value is the pytree ``result``."""
    finite = _all_finite(result)
    stopped = jnp.invert(diffrax.is_successful(solution.result))
    return jnp.where(stopped, 2, jnp.where(finite, 0, 1)).astype(jnp.int32)


def _kinds(nan: int, inf: int) -> str:
    return " and ".join(kind for kind, count in (("NaN", nan), ("inf", inf)) if count)


def explain_failure(
    vector_field: Callable[[jax.Array, Any, Any], Any],
    y0: Any,
    *,
    args: Any,
    names: tuple[str, ...],
    caller: str,
    t0: float,
    t1: float,
    solver: str,
    steps: int | None,
    rtol: float,
    atol: float,
    max_steps: int,
) -> Exception:
    """The exception to raise for a failed solve, found by solving again with an instrumented field.

    The field's outputs (one per name in ``names``, e.g. the velocity and its divergence) are checked
    at every evaluation; a host callback records the first time, in the direction of integration, at
    which an output was non-finite for a finite state, and the first time the state itself was
    non-finite. This second solve runs only after a failure, outside jit. Returns a
    FloatingPointError naming the output that went non-finite (or the overflowing state), else a
    RuntimeError for a solver that ran out of steps on a finite field.
    """
    field_hits, state_hits = [], []

    def record_field(t, counts):
        field_hits.append((float(t), np.asarray(counts)))

    def record_state(t):
        state_hits.append(float(t))

    def instrumented(t, y, args):
        out = vector_field(t, y, args)
        counts = jnp.stack(
            [jnp.stack([jnp.sum(jnp.isnan(leaf)), jnp.sum(jnp.isinf(leaf))]) for leaf in jax.tree.leaves(out)]
        )
        finite_in = _all_finite(y)
        jax.lax.cond(
            finite_in & (jnp.sum(counts) > 0),
            lambda: jax.debug.callback(record_field, t, counts),
            lambda: None,
        )
        jax.lax.cond(finite_in, lambda: None, lambda: jax.debug.callback(record_state, t))
        return out

    solution, _ = solve(
        instrumented,
        y0,
        t0=t0,
        t1=t1,
        solver=solver,
        steps=steps,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        args=args,
    )
    jax.block_until_ready(solution.ys)
    first = min if t1 > t0 else max
    how = f"{caller} with solver {solver!r}" + (f" and {steps} fixed steps" if steps is not None else "")
    if field_hits:
        t, counts = first(field_hits, key=lambda hit: hit[0])
        k = int(np.argmax(counts.sum(axis=1) > 0))
        nan, inf = (int(c) for c in counts[k])
        return FloatingPointError(
            f"{names[k]} returned {_kinds(nan, inf)} ({nan + inf} values) at t={t:.6g} for a finite "
            f"state; {how} cannot integrate past it (check the model's parameters for NaN and the "
            "field's domain)"
        )
    overflowed_last = bool(diffrax.is_successful(solution.result)) and not bool(_all_finite(solution.ys))
    if state_hits or overflowed_last:
        t = first(state_hits) if state_hits else t1  # no evaluation saw it: the last step overflowed
        return FloatingPointError(
            f"the state overflowed to inf/NaN at t={t:.6g} although {names[0]} stayed finite for finite "
            f"states: {how} took steps too large for how fast the field grows, or the solution blows "
            "up in finite time (use more steps or an adaptive solver)"
        )
    if not bool(diffrax.is_successful(solution.result)):
        stop = float(solution.ts[-1])
        return RuntimeError(
            f"{how} reached max_steps={max_steps} at t={stop:.6g} before t1={t1:g}, with {names[0]} "
            "finite: the field is stiff, changes fast or blows up there (raise max_steps, loosen "
            "rtol/atol, or use fixed steps)"
        )
    return FloatingPointError(
        f"{how} returned non-finite values, but a second solve did not (is the field random?)"
    )


def _velocity_term(t, x, velocity):
    return call_velocity(velocity, t, x)


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
    manifold: Any = None,
) -> SampleResult:
    """Push ``x0`` through the flow of ``velocity`` from ``t0`` to ``t1``: x1 = x0 + int_t0^t1 v_t(x_t) dt.

    Args:
      velocity: ``velocity(t, x) -> dx/dt`` with t a scalar and x of shape [batch, *dims]; it must
        return a real floating array of x's shape (checked once at trace time: a ValueError or
        TypeError names ``velocity``). See ``as_velocity`` for models.
      x0: starting points, shape [batch, *dims], batch >= 1, finite.
      solver: a name from ``SOLVERS``.
      steps: None for adaptive steps; N >= 1 for N equal steps.
      rtol, atol: tolerances (> 0) of the adaptive controller (ignored for fixed steps).
      t0, t1: integration interval in [0, 1]; t1 < t0 integrates backwards (data to noise).
      save_trajectory: also return the states at ``trajectory_points`` equally spaced times (for
        fixed steps: at every grid point, steps + 1 of them).
      trajectory_points: number of saved times for adaptive solves (>= 2).
      max_steps: step budget of adaptive solves.
      manifold: an ``fmjax.manifolds`` manifold M (None: Euclidean space). The field is then
        ``TangentVelocity(velocity, M)`` (evaluated at projx(x), projected onto the tangent space), x0
        is projected onto M, and x1 and the trajectory's states are projected back onto M, so they
        lie on M to rounding whatever the solver (the ambient solve drifts off M by at most its
        local error).

    Returns:
      ``SampleResult(x1, nfe, trajectory, status)``.

    Raises:
      FloatingPointError: outside jit, when the result is not finite; the message names the time at
        which ``velocity`` first returned NaN/inf for a finite state (found by a second,
        instrumented solve), or says that the state overflowed.
      RuntimeError: outside jit, when an adaptive solver ran out of ``max_steps`` on a finite field.

    Inside jit (or vmap, grad) nothing can raise: ``status`` says what happened (``SOLVE_STATUS``);
    for status 2 ``x1`` is all NaN, for status 1 it holds the NaN/inf the solve produced.
    """
    check_velocity(velocity)
    check_batch("x0", x0)
    check_finite("x0", x0)
    if manifold is not None:
        velocity, x0 = on_manifold(velocity, x0, manifold, "x0")
    t0, t1 = _check_interval(t0, t1)
    if steps is not None:
        steps = check_int("steps", steps, low=1)
    if check_bool("save_trajectory", save_trajectory):
        if steps is None:
            num = check_int("trajectory_points", trajectory_points, low=2)
        else:
            num = steps + 1
        ts = jnp.linspace(t0, t1, num, dtype=x0.dtype)
        saveat = diffrax.SaveAt(ts=ts)
    else:
        saveat = diffrax.SaveAt(t1=True)
    options = dict(t0=t0, t1=t1, solver=solver, steps=steps, rtol=rtol, atol=atol, max_steps=max_steps)
    solution, nfe = solve(_velocity_term, x0, saveat=saveat, args=velocity, **options)
    x1 = solution.ys[-1]
    status = solve_status(solution, x1)
    if not is_traced(status):
        if int(status):
            raise explain_failure(
                _velocity_term, x0, args=velocity, names=("velocity",), caller="sample", **options
            )
    else:
        x1 = jnp.where(status == 2, jnp.nan, x1)
    xs = solution.ys
    if manifold is not None:
        x1, xs = velocity.manifold.projx(x1), velocity.manifold.projx(xs)
    trajectory = Trajectory(ts=ts, xs=xs) if save_trajectory else None
    return SampleResult(x1=x1, nfe=nfe, trajectory=trajectory, status=status)

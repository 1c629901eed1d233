"""SDE sampling: integrate dx = f(t, x) dt + g(t) dW from t0 to t1 with diffrax.

The noise is additive: the diffusion g(t) depends on time only (a scalar, or one scale per
sample), so the Itô and Stratonovich solutions coincide and diffrax's additive-noise stochastic
Runge-Kutta methods apply. The Brownian motion is a ``diffrax.VirtualBrownianTree`` drawn from
one key. For [SF]²M models (``fmjax.losses.sf2m_loss``), ``sf2m_drift`` gives the bridge's drift
v + g^2 / 2 s and ``sf2m_velocity`` the ODE of the flow output alone (for ``fmjax.sample``).

>>> import jax, jax.numpy as jnp
>>> from fmjax.sde import sample_sde
>>> result = sample_sde(lambda t, x: -x, 0.0, jnp.ones((3, 2)), key=jax.random.key(0), steps=100)
>>> round(float(result.x1[0, 0]), 3)  # no noise: Euler's (1 - 1/100)^100, near exp(-1)
0.366
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax
import numpy as np

from fmjax._checks import (
    check_batch,
    check_bool,
    check_callable,
    check_finite,
    check_int,
    check_key,
    check_output,
    check_real,
    is_traced,
    lookup,
)
from fmjax.losses import check_flow_and_score
from fmjax.sampling import SampleResult, Trajectory, colocate, solve_status

__all__ = [
    "SDE_SOLVERS",
    "SDESolverSpec",
    "sample_sde",
    "SF2MDrift",
    "SF2MVelocity",
    "sf2m_drift",
    "sf2m_velocity",
]

Drift = Callable[[jax.Array, jax.Array], jax.Array]
Diffusion = Callable[[jax.Array], jax.Array] | float


class SDESolverSpec(NamedTuple):
    """A diffrax SDE solver, what one step of it costs and what it needs of the Brownian motion.

    Attributes:
      make: builds the diffrax solver.
      evals_per_step: drift evaluations per step.
      levy_area: what the Brownian tree generates: ``diffrax.BrownianIncrement`` (W) or
        ``diffrax.SpaceTimeLevyArea`` (W and its space-time Lévy area H, which ShARK and SRA1
        need; a tree of each kind is a different path for the same key).
      strong_order: strong order of convergence for additive noise.
    """

    make: Callable[[], diffrax.AbstractSolver]
    evals_per_step: int
    levy_area: type
    strong_order: float


SDE_SOLVERS: dict[str, SDESolverSpec] = {
    "euler_maruyama": SDESolverSpec(diffrax.Euler, 1, diffrax.BrownianIncrement, 1.0),
    "heun": SDESolverSpec(diffrax.Heun, 2, diffrax.BrownianIncrement, 1.0),
    "shark": SDESolverSpec(diffrax.ShARK, 2, diffrax.SpaceTimeLevyArea, 1.5),
    "sra1": SDESolverSpec(diffrax.SRA1, 2, diffrax.SpaceTimeLevyArea, 1.5),
}
"""SDE solvers by name, for ``sample_sde(solver=...)``.

"euler_maruyama" (diffrax.Euler): one drift evaluation per step, weak order 1 (strong order 1 for
additive noise). "heun" (diffrax.Heun): converges to the Stratonovich solution, which for additive
noise is the Itô one. "shark" (diffrax.ShARK, the recommended higher-order choice) and "sra1"
(diffrax.SRA1, Rößler's method): stochastic Runge-Kutta methods for additive noise, strong order
1.5 from two drift evaluations per step and the space-time Lévy area of the Brownian motion. The
evaluation counts are checked against a counting callback in the tests."""

_SHAPE_OF_X = "[batch, *dims], the shape of x"
_DRIFT_HINT = " (an [SF]²M model? fmjax.sde.sf2m_drift(apply_fn, params, sigma))"


def _diffusion_scale(diffusion: Diffusion, t: jax.Array, x: jax.Array) -> jax.Array:
    """g(t) as an array broadcastable against x, checked at trace time to have shape () or [batch]."""
    if not callable(diffusion):
        return jnp.asarray(diffusion, x.dtype)
    g = diffusion(t)
    if isinstance(g, int | float):
        g = jnp.asarray(g, x.dtype)
    shape = tuple(getattr(g, "shape", ()))
    check_output("diffusion(t)", g, shape, "()")
    if shape not in ((), x.shape[:1]):
        raise ValueError(
            f"diffusion(t) must return shape () (one scale) or [batch] = {x.shape[:1]} (one per "
            f"sample); got shape {shape}"
        )
    return g.reshape(g.shape + (1,) * (x.ndim - g.ndim)).astype(x.dtype)


def _drift_term(t, x, args):
    drift, _ = args
    out = drift(t, x)
    check_output("drift(t, x)", out, x.shape, _SHAPE_OF_X)
    return out.astype(x.dtype)


def _diffusion_term(t, x, args):
    _, diffusion = args
    return lineax.DiagonalLinearOperator(jnp.broadcast_to(_diffusion_scale(diffusion, t, x), x.shape))


@eqx.filter_jit
def _solve(
    drift, diffusion, x0, key, *, solver: str, t0: float, t1: float, steps: int, save_trajectory: bool
):
    """One diffrax solve on the grid of ``steps`` equal steps, compiled once per configuration (the
    callables and Python numbers are static, arrays traced): returns (ys, num_steps, status), ys
    the state at t1 ([1, batch, *dims]) or at every grid time ([steps + 1, batch, *dims])."""
    spec = SDE_SOLVERS[solver]
    ts = np.linspace(t0, t1, steps + 1)
    # The tree's finest level is the grid's dyadic refinement: for step counts that are powers of
    # two, the grid points are nodes of the tree, so a finer grid refines the same Brownian path.
    # Only the solvers that use it draw the Lévy area: it costs Euler-Maruyama 1.5x the Brownian
    # work and twice the compile time.
    tol = (t1 - t0) / 2 ** math.ceil(math.log2(steps))
    brownian = diffrax.VirtualBrownianTree(
        t0,
        t1,
        tol=tol,
        shape=jax.ShapeDtypeStruct(x0.shape, x0.dtype),
        key=key,
        levy_area=spec.levy_area,
    )
    terms = diffrax.MultiTerm(diffrax.ODETerm(_drift_term), diffrax.ControlTerm(_diffusion_term, brownian))
    solution = diffrax.diffeqsolve(
        terms,
        spec.make(),
        t0=t0,
        t1=t1,
        dt0=None,
        y0=x0,
        args=(drift, diffusion),
        saveat=diffrax.SaveAt(ts=ts) if save_trajectory else diffrax.SaveAt(t1=True),
        stepsize_controller=diffrax.StepTo(ts=ts),
        max_steps=steps,
        throw=False,
    )
    return solution.ys, solution.stats["num_steps"], solve_status(solution, solution.ys[-1])


def _explain_failure(drift, diffusion, x0, key, **options) -> FloatingPointError:
    """Solve again with an instrumented drift and say where the solve first went non-finite."""
    drift_hits, state_hits = [], []

    def instrumented(t, x):
        out = drift(t, x)
        finite_in = jnp.all(jnp.isfinite(x))
        bad = jnp.sum(~jnp.isfinite(out))
        jax.lax.cond(
            finite_in & (bad > 0),
            lambda: jax.debug.callback(lambda t: drift_hits.append(float(t)), t),
            lambda: None,
        )
        jax.lax.cond(
            finite_in, lambda: None, lambda: jax.debug.callback(lambda t: state_hits.append(float(t)), t)
        )
        return out

    jax.block_until_ready(_solve(instrumented, diffusion, x0, key, **options))
    how = f"sample_sde with solver {options['solver']!r} and {options['steps']} steps"
    if drift_hits:
        return FloatingPointError(
            f"drift(t, x) returned NaN or inf at t={min(drift_hits):.6g} for a finite state; {how} cannot "
            "integrate past it (check the model's parameters for NaN and the drift's domain)"
        )
    if state_hits:
        return FloatingPointError(
            f"the state overflowed to inf/NaN at t={min(state_hits):.6g} although drift(t, x) stayed "
            f"finite for finite states: {how} took steps too large for how fast the drift grows (use "
            "more steps)"
        )
    return FloatingPointError(
        f"{how} returned non-finite values from a finite drift: check diffusion(t) for NaN or inf"
    )


def sample_sde(
    drift: Drift,
    diffusion: Diffusion,
    x0: jax.Array,
    *,
    key: jax.Array,
    solver: str = "euler_maruyama",
    steps: int,
    t0: float = 0.0,
    t1: float = 1.0,
    save_trajectory: bool = False,
) -> SampleResult:
    """Integrate the Itô SDE dx = f(t, x) dt + g(t) dW from ``t0`` to ``t1`` in ``steps`` equal steps.

    W is a Brownian motion of x's shape (independent across samples and dimensions), a
    ``diffrax.VirtualBrownianTree`` drawn from ``key``: the same key gives the same path (for the
    solvers of one ``levy_area`` kind: euler_maruyama and heun, or shark and sra1), and for step
    counts that are powers of two a finer grid refines the same path. The noise is additive (g
    depends on t only), where Itô and Stratonovich agree, so every solver of ``SDE_SOLVERS``
    converges to this solution.

    Args:
      drift: ``drift(t, x) -> f`` with t a scalar and x of shape [batch, *dims]; it must return a
        real floating array of x's shape (checked once at trace time; the error names ``drift``).
        For an [SF]²M model: ``sf2m_drift(apply_fn, params, sigma)``.
      diffusion: the noise scale g: a function ``diffusion(t)`` returning a real array of shape
        () (one scale) or [batch] (one per sample; checked at trace time, the error names
        ``diffusion``), or a real number >= 0 for a constant g (sigma for [SF]²M).
      x0: starting points, shape [batch, *dims], batch >= 1, finite.
      key: one PRNG key for the Brownian motion.
      solver: a name from ``SDE_SOLVERS``: "euler_maruyama" (default), "heun", "shark", "sra1".
      steps: number of equal steps (>= 1).
      t0, t1: integration interval, finite with t0 < t1 (the drift and diffusion define the time
        axis: [0, 1] for a flow-matching model, any window for a general SDE).
      save_trajectory: also return the states at the steps + 1 grid times.

    Returns:
      ``SampleResult(x1, nfe, trajectory, status)`` as ``fmjax.sample`` returns: the state at t1,
      the number of drift evaluations (int32 scalar), the ``Trajectory`` or None, and a status code
      of ``fmjax.sampling.SOLVE_STATUS`` (0 "ok" or 1 "non-finite"; fixed steps always reach t1).

    Raises:
      FloatingPointError: outside jit, when the result is not finite; the message names the time
        at which ``drift`` first returned NaN/inf for a finite state (found by a second,
        instrumented solve of the same Brownian path), or says that the state overflowed.

    Inside jit nothing can raise: ``status`` says what happened.

    An Ornstein-Uhlenbeck process dx = -x dt + sqrt(2) dW from x0 = 1 reaches N(e^-1, 1 - e^-2):

    >>> import jax, jax.numpy as jnp
    >>> x1 = sample_sde(lambda t, x: -x, 2**0.5, jnp.ones((4000, 1)), key=jax.random.key(0),
    ...                 solver="shark", steps=32).x1
    >>> abs(float(jnp.mean(x1)) - 0.368) < 0.05, abs(float(jnp.var(x1)) - 0.865) < 0.06  # MC error
    (True, True)
    """
    check_callable("drift", drift, ("t", "x"), hint=_DRIFT_HINT)
    if callable(diffusion):
        check_callable("diffusion", diffusion, ("t",))
    else:
        try:
            diffusion = check_real("diffusion", diffusion, low=0.0)
        except TypeError:
            raise TypeError(
                "diffusion must be a function diffusion(t) -> g (shape () or [batch]) or a real number "
                f">= 0; got {type(diffusion).__name__}"
            ) from None
    check_batch("x0", x0)
    check_finite("x0", x0)
    check_key("key", key)
    lookup("solver", solver, SDE_SOLVERS)
    steps = check_int("steps", steps, low=1)
    t0 = check_real("t0", t0)
    t1 = check_real("t1", t1)
    if not t0 < t1:
        raise ValueError(f"t1 must be > t0 (the SDE runs forward in time); got t0={t0}, t1={t1}")
    save_trajectory = check_bool("save_trajectory", save_trajectory)
    options = dict(solver=solver, t0=t0, t1=t1, steps=steps, save_trajectory=save_trajectory)
    drift, diffusion = colocate((drift, diffusion), x0)
    ys, num_steps, status = _solve(drift, diffusion, x0, key, **options)
    if not is_traced(status) and int(status):
        raise _explain_failure(drift, diffusion, x0, key, **options)
    nfe = (num_steps * SDE_SOLVERS[solver].evals_per_step).astype(jnp.int32)
    trajectory = None
    if save_trajectory:
        trajectory = Trajectory(ts=jnp.linspace(t0, t1, steps + 1, dtype=x0.dtype), xs=ys)
    x1 = ys[-1]
    return SampleResult(x1=x1, nfe=nfe, trajectory=trajectory, status=status)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["params"], meta_fields=["apply_fn", "sigma"]
)
@dataclasses.dataclass(frozen=True)
class SF2MDrift:
    """``drift(t, x) = v + sigma^2 / 2 s`` with ``(v, s) = apply_fn(params, broadcast(t, [batch]), x)``.

    A pytree over ``params`` (see ``fmjax.sampling.ModelVelocity``); build it with ``sf2m_drift``.
    """

    apply_fn: Callable[..., Any]
    params: Any
    sigma: float

    def __call__(self, t: jax.Array, x: jax.Array) -> jax.Array:
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        velocity, score = check_flow_and_score(
            "apply_fn(params, t, x)", self.apply_fn(self.params, t, x), x.shape
        )
        return velocity + (0.5 * self.sigma * self.sigma) * score


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"], meta_fields=["apply_fn"])
@dataclasses.dataclass(frozen=True)
class SF2MVelocity:
    """``velocity(t, x) = v`` with ``(v, s) = apply_fn(params, broadcast(t, [batch]), x)``: the flow output.

    A pytree over ``params``; build it with ``sf2m_velocity``.
    """

    apply_fn: Callable[..., Any]
    params: Any

    def __call__(self, t: jax.Array, x: jax.Array) -> jax.Array:
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        velocity, _ = check_flow_and_score(
            "apply_fn(params, t, x)", self.apply_fn(self.params, t, x), x.shape
        )
        return velocity


def sf2m_drift(apply_fn: Callable[..., Any], params: Any, sigma: float) -> SF2MDrift:
    """The SDE drift of an [SF]²M model: f(t, x) = v_theta(t, x) + g^2 / 2 s_theta(t, x), g = sigma.

    ``apply_fn(params, t, x)`` returns the pair (velocity, score) (see ``fmjax.losses.sf2m_loss``).
    With ``sample_sde(sf2m_drift(apply_fn, params, sigma), sigma, x0, key=..., steps=...)`` it
    samples the Schrödinger bridge of ``SchrodingerBridge(sigma)``; any other g gives an SDE with
    the same marginals (sigma = 0 is the ODE of ``sf2m_velocity``).

    >>> import jax.numpy as jnp
    >>> drift = sf2m_drift(lambda params, t, x: (params * x, -x), 1.0, sigma=2.0)
    >>> drift(0.5, jnp.ones((1, 2))).tolist()  # x + 4 / 2 (-x)
    [[-1.0, -1.0]]
    """
    check_callable("apply_fn", apply_fn, ("params", "t", "x"))
    return SF2MDrift(apply_fn, params, check_real("sigma", sigma, low=0.0))


def sf2m_velocity(apply_fn: Callable[..., Any], params: Any) -> SF2MVelocity:
    """The ODE velocity of an [SF]²M model (its flow output), for ``fmjax.sample``.

    The flow head matches the probability flow of the bridge, so the ODE has the bridge's
    marginals: ``fmjax.sample(sf2m_velocity(apply_fn, params), x0)``.

    >>> import jax.numpy as jnp
    >>> sf2m_velocity(lambda params, t, x: (params * x, -x), 3.0)(0.5, jnp.ones((1, 2))).tolist()
    [[3.0, 3.0]]
    """
    check_callable("apply_fn", apply_fn, ("params", "t", "x"))
    return SF2MVelocity(apply_fn, params)

"""Sampling with diffrax against closed forms."""

import functools

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np
import pytest
from jax.experimental import io_callback

from fmjax.models import MLP, functional
from fmjax.sampling import SOLVE_STATUS, SOLVERS, as_velocity, sample

A = jnp.array([[-0.5, 1.0], [-1.0, -0.2]])
ADAPTIVE = [name for name, spec in SOLVERS.items() if spec.adaptive]


def linear_field(t, x):
    return x @ A.T


def _x0(dtype=jnp.float64):
    return jax.random.normal(jax.random.key(0), (8, 2), dtype)


@pytest.mark.parametrize("solver", ADAPTIVE)
def test_adaptive_solvers_solve_a_linear_ode(solver, x64):
    x0 = _x0()
    result = sample(linear_field, x0, solver=solver, rtol=1e-9, atol=1e-9, max_steps=100_000)
    expected = x0 @ jax.scipy.linalg.expm(A).T
    # global error ~ tolerance for the higher-order solvers; 2nd-order ones drift a little more
    np.testing.assert_allclose(result.x1, expected, rtol=1e-6, atol=1e-6)


def counted(field, calls):
    """``field``, appending to ``calls`` at each of its evaluations (an ordered host callback: none is
    dropped or merged by the compiler)."""

    def count():
        calls.append(1)
        return np.int32(0)

    def wrapped(t, x):
        io_callback(count, jax.ShapeDtypeStruct((), jnp.int32), ordered=True)
        return field(t, x)

    return wrapped


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_constant_field_is_exact_for_every_solver_and_nfe_counts_its_evaluations(solver, x64):
    x0 = _x0()
    shift = jnp.array([1.5, -0.25])
    calls = []
    result = sample(counted(lambda t, x: jnp.broadcast_to(shift, x.shape), calls), x0, solver=solver, steps=3)
    np.testing.assert_allclose(result.x1, x0 + shift, rtol=1e-12, atol=1e-12)
    # the same solve counts its velocity evaluations: nfe is every one of them (adaptive solves below)
    assert int(result.nfe) == len(calls)


def time_dependent_field(t, x):
    return x @ A.T + jnp.sin(3 * t)


@functools.cache
def time_dependent_reference():
    """x(1) of the time-dependent field from _x0() by dopri8 at tolerance 1e-13 (float64): solved once."""
    return sample(time_dependent_field, _x0(), solver="dopri8", rtol=1e-13, atol=1e-13, max_steps=100_000).x1


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun", "ralston", "bosh3", "dopri5"])
def test_fixed_step_convergence_order(solver, x64):
    # error(N) / error(2N) = 2^order for a smooth time-dependent field
    field = time_dependent_field
    x0 = _x0()
    reference = time_dependent_reference()
    order = SOLVERS[solver].order
    n = {1: 64, 2: 32, 3: 16, 5: 8}[order]
    errors = [
        float(jnp.max(jnp.abs(sample(field, x0, solver=solver, steps=k).x1 - reference))) for k in (n, 2 * n)
    ]
    assert np.log2(errors[0] / errors[1]) == pytest.approx(order, abs=0.3)


@pytest.mark.parametrize("solver", ADAPTIVE)
def test_nfe_counts_every_velocity_evaluation_of_an_adaptive_solve(solver):
    calls = []
    field = counted(lambda t, x: -x * jnp.cos(3 * t), calls)
    result = sample(field, _x0(jnp.float32), solver=solver, rtol=1e-4, atol=1e-4)
    jax.block_until_ready(result.x1)
    assert int(result.nfe) == len(calls)


def test_fixed_grid_trajectory(x64):
    x0 = _x0()
    result = sample(linear_field, x0, solver="heun", steps=10, save_trajectory=True)
    assert result.trajectory.xs.shape == (11, 8, 2)
    np.testing.assert_allclose(result.trajectory.ts, jnp.linspace(0, 1, 11))
    np.testing.assert_allclose(result.trajectory.xs[0], x0)
    np.testing.assert_allclose(result.trajectory.xs[-1], result.x1)
    assert int(result.nfe) == 20


def test_adaptive_trajectory_at_requested_points(x64):
    x0 = _x0()
    result = sample(linear_field, x0, save_trajectory=True, trajectory_points=5, rtol=1e-9, atol=1e-9)
    for t, xt in zip(result.trajectory.ts, result.trajectory.xs, strict=True):
        np.testing.assert_allclose(xt, x0 @ jax.scipy.linalg.expm(float(t) * A).T, rtol=1e-6, atol=1e-6)


def test_backward_solve_inverts_forward(x64):
    x0 = _x0()
    forward = sample(linear_field, x0, rtol=1e-10, atol=1e-10).x1
    back = sample(linear_field, forward, t0=1.0, t1=0.0, rtol=1e-10, atol=1e-10).x1
    np.testing.assert_allclose(back, x0, rtol=1e-7, atol=1e-7)


def test_jit_matches_eager():
    x0 = _x0(jnp.float32)
    eager = sample(linear_field, x0)
    jitted = jax.jit(lambda x: sample(linear_field, x))(x0)
    np.testing.assert_allclose(eager.x1, jitted.x1, rtol=1e-6, atol=1e-6)
    assert int(eager.status) == int(jitted.status) == 0 and int(eager.nfe) == int(jitted.nfe)


def test_a_failed_solve_raises_eagerly_and_reports_under_jit():
    # the field is NaN for t > 0.5: eagerly one line naming velocity and t; under jit a status
    field = lambda t, x: jnp.where(t > 0.5, jnp.nan, linear_field(t, x))
    x0 = _x0(jnp.float32)
    # midpoint evaluates at t = 0.5 and at the step's middle, t = 0.625: the first NaN
    with pytest.raises(FloatingPointError, match=r"^velocity returned NaN \(16 values\) at t=0.625 for"):
        sample(field, x0, solver="midpoint", steps=4)
    jitted = jax.jit(lambda x: sample(field, x, solver="midpoint", steps=4, save_trajectory=True))(x0)
    assert SOLVE_STATUS[int(jitted.status)] == "non-finite"
    # the trajectory is exact up to the last finite grid point, t = 0.5: midpoint steps of a linear field
    step = jnp.eye(2) + 0.25 * A + 0.5 * (0.25 * A) @ (0.25 * A)
    np.testing.assert_allclose(jitted.trajectory.xs[2], x0 @ (step @ step).T, rtol=1e-5, atol=1e-6)  # float32


def test_model_velocity_reuses_the_compiled_solve_for_new_params():
    model_apply, params = functional(MLP(dim=2, width=8, depth=1, seed=0))
    traces = []

    def apply_fn(p, t, x):
        traces.append(1)
        return model_apply(p, t, x)

    x0 = _x0(jnp.float32)
    first = sample(as_velocity(apply_fn, params), x0, solver="euler", steps=4)
    doubled = jax.tree.map(lambda p: 2 * p, params)
    second = sample(as_velocity(apply_fn, doubled), x0, solver="euler", steps=4)
    n_traces = len(traces)
    third = sample(as_velocity(apply_fn, doubled), x0, solver="euler", steps=4)
    assert len(traces) == n_traces  # the third call compiled nothing
    assert not np.allclose(first.x1, second.x1)
    np.testing.assert_array_equal(second.x1, third.x1)


def test_bad_arguments_are_named():
    x0 = _x0(jnp.float32)
    with pytest.raises(ValueError, match="solver must be one of 'bosh3', 'dopri5'"):
        sample(linear_field, x0, solver="rk45")
    with pytest.raises(ValueError, match="steps is required for solver 'euler'"):
        sample(linear_field, x0, solver="euler")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sample(linear_field, x0, solver="euler", steps=0)
    with pytest.raises(ValueError, match="t0 and t1 must differ"):
        sample(linear_field, x0, t0=0.5, t1=0.5)
    with pytest.raises(ValueError, match="t1 must be <= 1"):
        sample(linear_field, x0, t1=2.0)
    with pytest.raises(ValueError, match="rtol must be > 0"):
        sample(linear_field, x0, rtol=0.0)
    with pytest.raises(ValueError, match="rank >= 2"):
        sample(linear_field, jnp.zeros(3))

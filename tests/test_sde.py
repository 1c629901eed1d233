"""sample_sde against closed forms: the Ornstein-Uhlenbeck process dx = -x dt + sqrt(2) dW from a
point mass, Euler-Maruyama's exact discrete moments and weak order 1, the higher-order solvers
beating it at equal steps, reproducibility, and argument errors.

The OU runs share one Brownian path per solver kind (same key; dyadic grids refine the same path),
so the weak error E[x_h] - E[x] is estimated as the mean over paths of x_h - x_ref against a fine
solve of the same path: the Monte-Carlo noise of the two cancels and what is left is the
discretisation, with a noise of (strong error) / sqrt(paths).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax.sampling import SampleResult
from fmjax.sde import SDE_SOLVERS, sample_sde

A = 1.5  # the point mass the OU process starts from
PATHS = (4096, 2)  # 8192 independent coordinates
SQRT2 = math.sqrt(2.0)
KEY = jax.random.key(0)
CALLS = []


def ou_drift(t, x):
    """-x, counting its evaluations (one host callback per call of the drift)."""
    jax.debug.callback(lambda: CALLS.append(1))
    return -x


def run(solver, steps, key=KEY, **kwargs):
    CALLS.clear()
    result = sample_sde(ou_drift, SQRT2, jnp.full(PATHS, A), key=key, solver=solver, steps=steps, **kwargs)
    jax.block_until_ready(result)
    return result, len(CALLS)


@pytest.fixture(scope="module")
def ou():
    """Solves of the OU process on one key: references of each Brownian kind at 64 steps, and
    Euler-Maruyama at 8 and 16 steps (both with their trajectories: the dyadic-refinement test reads the
    Brownian path back from them) and ShARK at 8 (with the number of drift calls of each)."""
    runs = {
        "ref_w": run("heun", 64),  # W only: the path of euler_maruyama and heun
        "ref_levy": run("shark", 64),  # W and its Lévy area: the path of shark and sra1
        "em8": run("euler_maruyama", 8, save_trajectory=True),
        "em16": run("euler_maruyama", 16, save_trajectory=True),
        "shark8": run("shark", 8),
    }
    return {name: (result.x1, result, calls) for name, (result, calls) in runs.items()}


def em_moments(h, n):
    """Euler-Maruyama's exact moments after n steps: x_{k+1} = (1 - h) x_k + sqrt(2 h) xi_k."""
    mean = A * (1 - h) ** n
    var = 2 * h * (1 - (1 - h) ** (2 * n)) / (1 - (1 - h) ** 2)
    return mean, var


def test_ou_from_a_point_mass_reaches_its_gaussian(ou):
    """x_1 ~ N(a e^-1, 1 - e^-2): mean and variance within 4 Monte-Carlo standard errors."""
    x1, _, _ = ou["ref_levy"]
    n = x1.size
    mean, var = A * math.exp(-1), 1 - math.exp(-2)
    assert abs(float(jnp.mean(x1)) - mean) < 4 * math.sqrt(var / n)
    assert abs(float(jnp.var(x1)) - var) < 4 * var * math.sqrt(2 / n)
    # coordinates are independent paths: no correlation between the two columns
    assert abs(float(jnp.corrcoef(x1[:, 0], x1[:, 1])[0, 1])) < 4 / math.sqrt(PATHS[0])


def test_any_time_window_reaches_the_gaussian_of_its_length():
    """The OU process is time-homogeneous: on [0.5, 2.5] from a it reaches N(a e^-2, 1 - e^-4), and
    a saved trajectory is stamped with the window's grid."""
    result = sample_sde(
        ou_drift,
        SQRT2,
        jnp.full(PATHS, A),
        key=KEY,
        solver="shark",
        steps=32,
        t0=0.5,
        t1=2.5,
        save_trajectory=True,
    )
    x1, n = result.x1, result.x1.size
    mean, var = A * math.exp(-2), 1 - math.exp(-4)
    assert abs(float(jnp.mean(x1)) - mean) < 4 * math.sqrt(var / n)
    assert abs(float(jnp.var(x1)) - var) < 4 * var * math.sqrt(2 / n)
    np.testing.assert_allclose(result.trajectory.ts, np.linspace(0.5, 2.5, 33), rtol=1e-6)


def test_euler_maruyama_trajectory_has_its_exact_discrete_moments(ou):
    """At every grid time t_k = k h the EM iterates have mean a (1-h)^k and the variance of the
    recursion v_{k+1} = (1-h)^2 v_k + 2h (4 Monte-Carlo standard errors)."""
    _, result, _ = ou["em8"]
    trajectory = result.trajectory
    np.testing.assert_allclose(trajectory.ts, np.linspace(0, 1, 9), rtol=1e-6)
    assert trajectory.xs.shape == (9, *PATHS)
    np.testing.assert_array_equal(trajectory.xs[0], jnp.full(PATHS, A))
    np.testing.assert_array_equal(trajectory.xs[-1], result.x1)
    n = math.prod(PATHS)
    for k in range(1, 9):
        mean, var = em_moments(1 / 8, k)
        xs = trajectory.xs[k]
        assert abs(float(jnp.mean(xs)) - mean) < 4 * math.sqrt(var / n)
        assert abs(float(jnp.var(xs)) - var) < 4 * var * math.sqrt(2 / n)


def test_euler_maruyama_has_weak_order_one(ou):
    """The weak errors of E[x_1] and E[x_1^2] halve when the step halves (ratio 2 within 20%), and
    equal EM's closed-form bias within 5 standard errors of their estimates (the pathwise spread of
    x_h - x_ref over sqrt(paths), ~0.001) plus 0.001 for the reference's own error."""
    ref, _, _ = ou["ref_w"]
    exact_mean, exact_var = A * math.exp(-1), 1 - math.exp(-2)
    errors = {}
    for steps in (8, 16):
        x, _, _ = ou[f"em{steps}"]
        mean, var = em_moments(1 / steps, steps)
        closed_forms = (mean - exact_mean, mean**2 + var - exact_mean**2 - exact_var)
        differences = (x - ref, x**2 - ref**2)
        errors[steps] = [float(jnp.mean(d)) for d in differences]
        for error, closed_form, d in zip(errors[steps], closed_forms, differences, strict=True):
            standard_error = float(jnp.std(d)) / math.sqrt(d.size)
            assert abs(error - closed_form) < 5 * standard_error + 1e-3, (steps, error, closed_form)
    for moment in (0, 1):
        ratio = errors[8][moment] / errors[16][moment]
        assert 1.6 < ratio < 2.4, (moment, errors)
    # the common path is what makes this precise: the pathwise (strong) error is small
    assert float(jnp.mean(jnp.abs(ou["em8"][0] - ref))) < 0.1


def test_shark_beats_euler_maruyama_at_equal_steps(ou):
    """At 8 steps ShARK's weak error (of the mean) and strong error are far below EM's, each
    measured against the fine solve of its own Brownian path."""
    em, shark = ou["em8"][0], ou["shark8"][0]
    ref_w, ref_levy = ou["ref_w"][0], ou["ref_levy"][0]
    weak_em, weak_shark = abs(float(jnp.mean(em - ref_w))), abs(float(jnp.mean(shark - ref_levy)))
    strong_em = float(jnp.mean(jnp.abs(em - ref_w)))
    strong_shark = float(jnp.mean(jnp.abs(shark - ref_levy)))
    assert weak_shark < weak_em / 5, (weak_shark, weak_em)
    assert strong_shark < strong_em / 5, (strong_shark, strong_em)


@pytest.mark.parametrize("solver", sorted(SDE_SOLVERS))
def test_every_solver_converges_and_counts_its_drift_calls(ou, solver):
    """Each solver: finite, dtype kept, nfe = the drift calls made = steps x evals_per_step, and at
    8 steps at least as accurate in the mean as Euler-Maruyama's closed-form bias allows."""
    spec = SDE_SOLVERS[solver]
    name = {"euler_maruyama": "em8", "shark": "shark8"}.get(solver)
    if name is not None:  # solved already
        x, result, calls = ou[name]
    else:
        result, calls = run(solver, 8)
        x = result.x1
    assert isinstance(result, SampleResult)
    assert x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(x)))
    assert int(result.nfe) == calls == 8 * spec.evals_per_step
    assert int(result.status) == 0
    ref = ou["ref_levy" if spec.levy_area.__name__ == "SpaceTimeLevyArea" else "ref_w"][0]
    em_bias = abs(em_moments(1 / 8, 8)[0] - A * math.exp(-1))
    assert abs(float(jnp.mean(x - ref))) < 1.1 * em_bias


def _brownian_path(trajectory):
    """W at the grid times of an Euler-Maruyama trajectory of the OU process: each step is
    x_{k+1} = (1 - h) x_k + sqrt(2) dW_k, so the increments read back exactly."""
    h = 1.0 / (trajectory.xs.shape[0] - 1)
    increments = (trajectory.xs[1:] - (1 - h) * trajectory.xs[:-1]) / SQRT2
    return jnp.concatenate([jnp.zeros_like(increments[:1]), jnp.cumsum(increments, axis=0)])


def test_same_key_same_path_and_a_finer_dyadic_grid_refines_it(ou):
    """The Brownian path read back from Euler-Maruyama's 8- and 16-step solves (the fixture's, one
    compiled program each: the same key, solved again, and another key reuse them)."""
    coarse = _brownian_path(ou["em8"][1].trajectory)
    again = _brownian_path(run("euler_maruyama", 8, save_trajectory=True)[0].trajectory)
    fine = _brownian_path(ou["em16"][1].trajectory)
    other = _brownian_path(
        run("euler_maruyama", 8, key=jax.random.key(1), save_trajectory=True)[0].trajectory
    )
    np.testing.assert_array_equal(coarse, again)
    np.testing.assert_allclose(fine[::2], coarse, atol=2e-5)
    assert not np.allclose(other, coarse)
    # a real path: W_1 ~ N(0, 1) over the 8192 coordinates (4 standard errors)
    assert abs(float(jnp.var(coarse[-1])) - 1.0) < 4 * math.sqrt(2 / coarse[-1].size)


def test_jit_matches_eager_and_status_reports_a_non_finite_drift(ou):
    """One jitted program: Euler-Maruyama with per-sample noise scales c_i sqrt(2), c_i in {0, 1, 2}
    (diffusion(t) of shape [batch]), and a solve whose drift blows up. The scales multiply the noise
    of each sample: x_k - a (1-h)^k = c_i (eager x_k - a (1-h)^k) at every grid time, so the rows of
    scale 1 are the eager solve itself."""
    _, eager, _ = ou["em8"]

    def blows_up(t, x):
        return jnp.where(t > 0.5, jnp.nan, -x)

    scales = jnp.array([0.0, 1.0, 2.0])[jnp.arange(PATHS[0]) % 3]
    x0 = jnp.ones((2, 2))

    @jax.jit
    def solves(start, key, x0):
        scaled = sample_sde(ou_drift, lambda t: SQRT2 * scales, start, key=key, steps=8, save_trajectory=True)
        return scaled, sample_sde(blows_up, 1.0, x0, key=key, steps=8).status

    jitted, status = solves(jnp.full(PATHS, A), KEY, x0)
    mean = A * (1 - 1 / 8) ** np.arange(9)[:, None, None]
    np.testing.assert_allclose(
        jitted.trajectory.xs - mean, scales[:, None] * (eager.trajectory.xs - mean), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(jitted.x1[1::3], eager.x1[1::3], rtol=1e-5, atol=1e-6)  # scale 1: eager
    with pytest.raises(FloatingPointError, match=r"drift\(t, x\) returned NaN or inf at t=0.625"):
        sample_sde(blows_up, 1.0, x0, key=KEY, steps=8)
    assert int(status) == 1  # "non-finite"


def test_bad_arguments_name_the_argument():
    x0 = jnp.ones((4, 2))
    drift = lambda t, x: -x  # noqa: E731
    cases = [
        (TypeError, "drift must be a function", dict(drift=3)),
        (TypeError, r"drift must be callable as drift\(t, x\).*sf2m_drift", dict(drift=lambda p, t, x: x)),
        (TypeError, r"diffusion must be callable as diffusion\(t\)", dict(diffusion=lambda t, x: 1.0)),
        (TypeError, "diffusion must be a function diffusion", dict(diffusion="1.0")),
        (ValueError, "diffusion must be >= 0", dict(diffusion=-1.0)),
        (ValueError, "x0 must have shape", dict(x0=jnp.ones(4))),
        (TypeError, "x0 must be a float32", dict(x0=jnp.ones((4, 2), jnp.int32))),
        (ValueError, "x0 must be finite", dict(x0=jnp.full((4, 2), jnp.nan))),
        (TypeError, "key must be one PRNG key", dict(key=0)),
        (ValueError, "solver must be one of 'euler_maruyama', 'heun', 'shark', 'sra1'", dict(solver="rk4")),
        (ValueError, "steps must be >= 1", dict(steps=0)),
        (TypeError, "steps must be an int", dict(steps=8.0)),
        (ValueError, "t1 must be > t0", dict(t0=0.5, t1=0.5)),
        (ValueError, "t1 must be > t0", dict(t0=1.0, t1=0.0)),
        (ValueError, "t1 must be finite", dict(t1=float("inf"))),
        (TypeError, "t0 must be a real number", dict(t0="0")),
        (TypeError, "save_trajectory must be True or False", dict(save_trajectory="yes")),
        (ValueError, r"drift\(t, x\) must return shape", dict(drift=lambda t, x: x[:, :1])),
        (
            ValueError,
            r"diffusion\(t\) must return shape \(\) \(one scale\) or \[batch\]",
            dict(diffusion=lambda t: x0),
        ),
        (
            TypeError,
            r"diffusion\(t\) must return a real floating-point",
            dict(diffusion=lambda t: jnp.int32(1)),
        ),
    ]
    for error, match, change in cases:
        args = dict(drift=drift, diffusion=1.0, x0=x0, key=KEY, steps=4) | change
        with pytest.raises(error, match=match):
            sample_sde(args.pop("drift"), args.pop("diffusion"), args.pop("x0"), **args)
    with pytest.raises(TypeError, match="steps"):
        sample_sde(drift, 1.0, x0, key=KEY)  # steps is required


def test_top_level_name():
    assert fmjax.sample_sde is sample_sde and "sample_sde" in fmjax.__all__

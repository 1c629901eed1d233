"""Straightness and crossing measures against closed forms and independent computations."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from fmjax._straightness import crossing_fraction, straightness
from fmjax.metrics import path_energy
from fmjax.sampling import sample

A = np.array([[-0.5, 1.0], [-1.0, -0.2]])


def linear_field(t, x):
    return x @ jnp.asarray(A, x.dtype).T


def _x0(dtype=jnp.float64):
    return jax.random.normal(jax.random.key(0), (16, 2), dtype)


def _linear_closed_form(x0):
    """Per point int_0^1 ||(A e^{tA} - e^A + I) x0||^2 dt by 40-node Gauss-Legendre (float64)."""
    nodes, weights = np.polynomial.legendre.leggauss(40)
    ts, weights = (nodes + 1) / 2, weights / 2
    chord = scipy.linalg.expm(A) - np.eye(2)
    x0 = np.asarray(x0)
    integrand = [np.sum((x0 @ (A @ scipy.linalg.expm(t * A) - chord).T) ** 2, axis=1) for t in ts]
    return np.sum(weights[:, None] * np.array(integrand), axis=0)


def test_constant_field_is_exactly_straight(x64):
    # dyadic points, shift and 8 steps: every Euler sum is exact in binary, so S is 0.0, not just small
    shift = jnp.array([1.5, -0.25])
    field = lambda t, x: jnp.broadcast_to(shift, x.shape)
    dyadic = jnp.round(_x0() * 16) / 16
    assert float(straightness(field, dyadic, solver="euler", steps=8)) == 0.0
    # a higher-order tableau: only round-off in its summed weights
    assert float(straightness(field, _x0(), solver="dopri5", steps=4)) < 1e-24


def test_time_only_field_is_the_time_variance_of_its_velocity(x64):
    # v_t = (cos 2 pi t, 1): x_1 - x_0 = (0, 1), so S = int_0^1 cos^2(2 pi t) dt = 1/2 for every point
    field = lambda t, x: jnp.broadcast_to(jnp.stack([jnp.cos(2 * jnp.pi * t), jnp.ones_like(t)]), x.shape)
    per_point = straightness(field, _x0(), solver="dopri5", steps=200, reduction="none")
    assert per_point.shape == (16,)
    np.testing.assert_allclose(per_point, 0.5, rtol=1e-4)


def test_linear_field_matches_the_closed_form(x64):
    x0 = _x0()
    expected = _linear_closed_form(x0)
    # fixed-step dopri5 with the trapezoid rule: error ~ 2 h^2 relative here (h = 1/1000 -> 2e-6)
    got = np.asarray(straightness(linear_field, x0, solver="dopri5", steps=1000, reduction="none"))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # adaptive solve saved at 1001 points: the same quadrature error
    adaptive = straightness(
        linear_field, x0, solver="dopri5", steps=None, trajectory_points=1001, rtol=1e-10, atol=1e-10
    )
    assert float(adaptive) == pytest.approx(expected.mean(), rel=1e-5)


@pytest.mark.parametrize(("solver", "order"), [("euler", 1), ("dopri5", 2)])
def test_convergence_order_in_the_steps(solver, order, x64):
    # Euler: the polyline's own straightness -> the flow's at first order; trapezoid rule: second order
    x0 = _x0()
    expected = _linear_closed_form(x0).mean()
    errors = [
        abs(float(straightness(linear_field, x0, solver=solver, steps=n)) - expected) for n in (50, 100)
    ]
    assert np.log2(errors[0] / errors[1]) == pytest.approx(order, abs=0.15)


def test_euler_value_is_path_energy_minus_squared_displacement(x64):
    # for the Euler polyline, int ||v - (x1 - x0)||^2 = int ||v||^2 - ||x1 - x0||^2 exactly
    field = lambda t, x: jnp.sin(x[:, ::-1]) * (1 + t) - x
    x0 = _x0()
    solved = sample(field, x0, solver="euler", steps=30, save_trajectory=True)
    squared = jnp.mean(jnp.sum((solved.x1 - x0) ** 2, axis=-1))
    expected = float(path_energy(solved.trajectory) - squared)
    assert float(straightness(field, x0, solver="euler", steps=30)) == pytest.approx(expected, rel=1e-10)


def test_jit_matches_eager_and_keeps_float32():
    x0 = _x0(jnp.float32)
    eager = straightness(linear_field, x0, steps=20)
    jitted = jax.jit(lambda x: straightness(linear_field, x, steps=20))(x0)
    assert eager.dtype == jnp.float32
    np.testing.assert_allclose(eager, jitted, rtol=1e-6)


def test_straightness_bad_arguments_are_named():
    x0 = _x0(jnp.float32)
    with pytest.raises(ValueError, match="reduction must be one of 'mean', 'none'"):
        straightness(linear_field, x0, reduction="sum")
    with pytest.raises(TypeError, match="velocity must be a callable"):
        straightness(jnp.zeros(2), x0)
    with pytest.raises(ValueError, match="solver must be one of"):
        straightness(linear_field, x0, solver="rk4")
    with pytest.raises(ValueError, match="steps is required for solver 'euler'"):
        straightness(linear_field, x0, steps=None)
    with pytest.raises(ValueError, match="rank >= 2"):
        straightness(linear_field, jnp.zeros(3))


def _crosses_by_solving(p, q, r, s):
    """Independent test for segments in general position: solve p + a (q - p) = r + b (s - r)."""
    matrix = np.column_stack([q - p, r - s])
    a, b = np.linalg.solve(matrix, r - p)
    return 0 <= a <= 1 and 0 <= b <= 1


def test_parallel_translates_never_cross():
    x0 = np.random.default_rng(0).normal(size=(200, 2))
    assert crossing_fraction(x0, x0 + np.array([3.0, 1.0])) == 0.0


def test_diameters_all_cross_at_the_centre():
    # segments from angle theta to theta + pi on a circle: every pair meets at the origin
    theta = np.linspace(0, np.pi, 50, endpoint=False)
    x0 = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    assert crossing_fraction(x0, -x0, chunk_size=7) == 1.0


def test_a_known_count():
    # one vertical segment crosses two horizontal ones; the horizontal ones are parallel: 2 of 3 pairs
    x0 = np.array([[0.0, 0.0], [0.0, 1.0], [0.5, -1.0]])
    x1 = np.array([[1.0, 0.0], [1.0, 1.0], [0.5, 2.0]])
    assert crossing_fraction(x0, x1) == pytest.approx(2 / 3)


def test_touching_and_collinear_cases():
    # an endpoint on the other segment and a collinear overlap count; collinear but apart does not
    assert crossing_fraction(np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([[2.0, 0.0], [1.0, 1.0]])) == 1.0
    assert crossing_fraction(np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([[2.0, 0.0], [3.0, 0.0]])) == 1.0
    assert crossing_fraction(np.array([[0.0, 0.0], [3.0, 0.0]]), np.array([[2.0, 0.0], [4.0, 0.0]])) == 0.0


def test_random_segments_match_an_independent_solve():
    rng = np.random.default_rng(1)
    x0, x1 = rng.normal(size=(60, 2)), rng.normal(size=(60, 2)) + 0.5
    expected = np.mean(
        [_crosses_by_solving(x0[k], x1[k], x0[m], x1[m]) for k, m in itertools.combinations(range(60), 2)]
    )
    assert 0.1 < expected < 0.9  # a case with both answers present
    assert crossing_fraction(x0, x1, chunk_size=16) == pytest.approx(expected, abs=1e-15)
    assert crossing_fraction(jnp.asarray(x0, jnp.float32), jnp.asarray(x1, jnp.float32)) == pytest.approx(
        expected, abs=2 / (60 * 59)
    )  # float32 rounding may move a near-touching pair


def test_crossing_bad_input_is_named():
    with pytest.raises(ValueError, match=r"shape \[n, 2\]"):
        crossing_fraction(np.zeros((4, 3)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="same shape"):
        crossing_fraction(np.zeros((4, 2)), np.ones((5, 2)))
    with pytest.raises(ValueError, match="at least 2 segments"):
        crossing_fraction(np.zeros((1, 2)), np.ones((1, 2)))
    with pytest.raises(ValueError, match="x1 must be finite"):
        crossing_fraction(np.zeros((3, 2)), np.full((3, 2), np.nan))
    with pytest.raises(TypeError, match="x0 must be an array"):
        crossing_fraction([[0.0, 0.0]], np.ones((1, 2)))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        crossing_fraction(np.zeros((3, 2)), np.ones((3, 2)), chunk_size=0)

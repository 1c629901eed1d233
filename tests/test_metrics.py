"""Metrics against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest

from fmjax.metrics import normalized_path_energy, path_energy, wasserstein2
from fmjax.sampling import Trajectory, sample


def test_w2_of_a_translation_is_its_length():
    x = np.random.default_rng(0).normal(size=(300, 3))
    shift = np.array([1.0, -2.0, 0.5])
    assert wasserstein2(x, x + shift) == pytest.approx(np.linalg.norm(shift), rel=1e-9)


def test_w2_in_one_dimension_matches_sorted_matching():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(500, 1)), rng.exponential(size=(500, 1))
    expected = np.sqrt(np.mean((np.sort(x[:, 0]) - np.sort(y[:, 0])) ** 2))
    assert wasserstein2(x, y) == pytest.approx(expected, rel=1e-9)


def test_w2_accepts_image_shapes_and_unequal_sizes():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 2, 2))
    assert wasserstein2(x, x) == pytest.approx(0.0, abs=1e-7)  # sqrt of float64 round-off in emd2
    # one point against two: W2^2 = mean of the two squared distances
    assert wasserstein2(np.zeros((1, 1)), np.array([[1.0], [3.0]])) == pytest.approx(np.sqrt(5.0))


def test_w2_rejects_bad_input():
    with pytest.raises(ValueError, match="same dims"):
        wasserstein2(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="finite"):
        wasserstein2(np.array([[np.nan]]), np.zeros((1, 1)))
    with pytest.raises(ValueError, match="at least one point"):
        wasserstein2(np.zeros((0, 2)), np.zeros((3, 2)))


def test_path_energy_of_straight_lines(x64):
    # x_t = x0 + t c: the energy is ||c||^2 for every point, and NPE against W2 = ||c|| is 0
    x0 = jax.random.normal(jax.random.key(0), (50, 2), jnp.float64)
    c = jnp.array([3.0, 4.0])
    result = sample(
        lambda t, x: jnp.broadcast_to(c, x.shape), x0, solver="euler", steps=20, save_trajectory=True
    )
    energy = float(path_energy(result.trajectory))
    assert energy == pytest.approx(25.0, rel=1e-12)
    assert normalized_path_energy(energy, 5.0) == pytest.approx(0.0, abs=1e-12)
    assert normalized_path_energy(2 * energy, 5.0) == pytest.approx(1.0)


def test_path_energy_of_euler_steps_equals_integral_of_speed(x64):
    # for Euler the discrete energy is sum_k ||v(t_k, x_k)||^2 dt exactly
    field = lambda t, x: -x * (1 + t)
    x0 = jax.random.normal(jax.random.key(1), (10, 2), jnp.float64)
    result = sample(field, x0, solver="euler", steps=50, save_trajectory=True)
    ts, xs = result.trajectory
    speeds = [jnp.sum(field(t, x) ** 2, axis=-1) for t, x in zip(ts[:-1], xs[:-1], strict=True)]
    expected = float(jnp.mean(jnp.sum(jnp.stack(speeds), axis=0) / 50))
    assert float(path_energy(Trajectory(ts, xs))) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("n, dim", [(7, 1), (300, 2), (200, 40)])
def test_wasserstein2_equal_sizes_matches_pot(n, dim):
    # equal sizes go through the assignment solver; POT's emd2 is the independent reference
    rng = np.random.default_rng(n + dim)
    x, y = rng.normal(size=(n, dim)), 1.5 * rng.normal(size=(n, dim)) + 0.3
    a = np.full(n, 1 / n)
    expected = np.sqrt(ot.emd2(a, a, ot.dist(x, y, metric="sqeuclidean")))
    assert wasserstein2(x, y) == pytest.approx(expected, rel=1e-6)

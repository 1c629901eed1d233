"""2D toy samplers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.data import TOY_SAMPLERS, sample

N = 20_000


@pytest.mark.parametrize("name", list(TOY_SAMPLERS))
def test_shape_dtype_determinism(name):
    x = sample(name, jax.random.key(0), N)
    assert x.shape == (N, 2) and x.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(x)))
    np.testing.assert_array_equal(x, sample(name, jax.random.key(0), N))
    assert not np.array_equal(x, sample(name, jax.random.key(1), N))


@pytest.mark.parametrize("name", list(TOY_SAMPLERS))
def test_draws_are_iid_not_ordered(name):
    # any contiguous slice has the distribution's mean: halves agree within 6 standard errors
    x = np.asarray(sample(name, jax.random.key(2), N))
    first, second = x[: N // 2], x[N // 2 :]
    se = np.sqrt(x.var(axis=0) * 4 / N)
    assert np.all(np.abs(first.mean(axis=0) - second.mean(axis=0)) < 6 * se)


def test_gaussian_moments():
    x = np.asarray(sample("gaussian", jax.random.key(3), N))
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=6 / math.sqrt(N))
    np.testing.assert_allclose(np.cov(x.T), np.eye(2), atol=0.05)


def test_eight_gaussians_modes_and_spread():
    x = np.asarray(sample("8gaussians", jax.random.key(4), N))
    angles = np.arange(8) * np.pi / 4
    centers = 5 * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    nearest = np.argmin(((x[:, None] - centers[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(nearest, minlength=8) / N
    np.testing.assert_allclose(counts, 1 / 8, atol=0.015)
    residual = x - centers[nearest]
    np.testing.assert_allclose(residual.var(axis=0), math.sqrt(0.1), rtol=0.05)


def test_moons_mean():
    # unit moons have mean (1/2, 1/4); scaled 3 m - 1 that is (1/2, -1/4)
    x = np.asarray(sample("moons", jax.random.key(5), N))
    np.testing.assert_allclose(x.mean(axis=0), [0.5, -0.25], atol=0.05)


def test_checkerboard_lies_on_dark_squares():
    x = np.asarray(sample("checkerboard", jax.random.key(6), N))
    assert np.all(np.abs(x) <= 4.0)
    parity = (np.floor(x[:, 0] / 2) + np.floor(x[:, 1] / 2)) % 2
    assert np.all(parity == parity[0])
    quadrant_counts = np.histogram2d(x[:, 0], x[:, 1], bins=4, range=[[-4, 4], [-4, 4]])[0]
    assert (quadrant_counts > 0).sum() == 8


def test_scurve_lies_near_the_curve():
    x = np.asarray(sample("scurve", jax.random.key(7), N)) / 2
    a = np.linspace(-1.5 * np.pi, 1.5 * np.pi, 2001)
    curve = np.stack([np.sin(a), np.sign(a) * (np.cos(a) - 1)], axis=-1)
    distance = np.sqrt(((x[:2000, None] - curve[None]) ** 2).sum(-1)).min(axis=1)
    assert np.median(distance) < 0.15  # noise std 0.1 per coordinate


def test_bad_arguments():
    with pytest.raises(ValueError, match="name must be one of '8gaussians', 'checkerboard'"):
        sample("swiss", jax.random.key(0), 10)
    with pytest.raises(ValueError, match="n must be >= 1"):
        sample("moons", jax.random.key(0), 0)

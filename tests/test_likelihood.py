"""Log-likelihood against closed forms."""

import functools
import math

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np
import pytest

from fmjax.likelihood import bits_per_dim, divergence_exact, log_likelihood, standard_normal_log_density
from fmjax.manifolds import Sphere
from fmjax.models import MLP, functional
from fmjax.sampling import as_velocity, sample


@functools.cache  # one function per (dim, seed): a solve of it is compiled once for every test
def _linear_field(dim, seed=0):
    a = 0.3 * jax.random.normal(jax.random.key(seed), (dim, dim), jnp.float64) / math.sqrt(dim)
    a = a - 0.2 * jnp.eye(dim)
    return a, (lambda t, x: x @ a.T)


@pytest.mark.parametrize("dim", [2, 64])
def test_exact_likelihood_of_a_linear_flow(dim, x64):
    # x1 = expm(A) x0 with x0 ~ N(0, I): log p1(x1) = log N(expm(-A) x1) - tr(A)
    a, field = _linear_field(dim)
    x1 = jax.random.normal(jax.random.key(1), (6, dim), jnp.float64)
    result = log_likelihood(field, x1, rtol=1e-10, atol=1e-10)
    x0 = x1 @ jax.scipy.linalg.expm(-a).T
    np.testing.assert_allclose(result.x0, x0, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(
        result.log_p, standard_normal_log_density(x0) - jnp.trace(a), rtol=1e-5, atol=1e-5
    )
    assert result.log_p_stderr is None


def test_gaussian_to_gaussian_condot_marginal_field(x64):
    # CondOT (sigma_min = 0) between N(0, I) and N(m, s^2 I): the marginal field is affine in x,
    # v_t(x) = m + (s - 1) / (1 + (s - 1) t) (x - t m), and p1 = N(m, s^2 I) exactly.
    m, s, dim = jnp.array([1.0, -2.0, 0.5]), 1.7, 3
    field = lambda t, x: m + (s - 1) / (1 + (s - 1) * t) * (x - t * m)
    x1 = m + s * jax.random.normal(jax.random.key(2), (8, dim), jnp.float64)
    result = log_likelihood(field, x1, rtol=1e-10, atol=1e-10)
    expected = standard_normal_log_density((x1 - m) / s) - dim * math.log(s)
    np.testing.assert_allclose(result.log_p, expected, rtol=1e-6, atol=1e-6)


def test_divergence_exact_matches_the_jacobian_trace(x64):
    apply_fn, params = functional(MLP(dim=6, width=16, depth=2, seed=3))
    x = jax.random.normal(jax.random.key(4), (5, 2, 3), jnp.float64)
    velocity = as_velocity(apply_fn, jax.tree.map(lambda p: p.astype(jnp.float64), params))
    _, div = divergence_exact(velocity, jnp.asarray(0.3), x)
    per_sample = lambda xi: velocity(0.3, xi[None])[0].reshape(-1)
    expected = jax.jit(jax.vmap(lambda xi: jnp.trace(jax.jacfwd(per_sample)(xi).reshape(6, 6))))(x)
    np.testing.assert_allclose(div, expected, rtol=1e-10)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_with_honest_standard_errors(probe, x64):
    _, field = _linear_field(8, seed=5)
    x1 = jax.random.normal(jax.random.key(6), (4, 8), jnp.float64)
    exact = log_likelihood(field, x1, rtol=1e-9, atol=1e-9).log_p
    estimate = log_likelihood(
        field,
        x1,
        divergence="hutchinson",
        num_probes=400,
        probe=probe,
        key=jax.random.key(7),
        rtol=1e-9,
        atol=1e-9,
    )
    z = (estimate.log_p - exact) / estimate.log_p_stderr
    assert float(jnp.max(jnp.abs(z))) < 4.5  # 4.5 standard errors: a false alarm is a ~1e-5 event
    assert bool(jnp.all(estimate.log_p_stderr > 0))
    # the standard error shrinks like 1/sqrt(K)
    fewer = log_likelihood(
        field, x1, divergence="hutchinson", num_probes=100, probe=probe, key=jax.random.key(8)
    )
    ratio = float(jnp.mean(fewer.log_p_stderr) / jnp.mean(estimate.log_p_stderr))
    assert 1.4 < ratio < 2.9


def test_round_trip_with_sampling(x64):
    apply_fn, params = functional(MLP(dim=2, width=16, depth=2, seed=9))
    velocity = as_velocity(apply_fn, jax.tree.map(lambda p: p.astype(jnp.float64), params))
    x0 = jax.random.normal(jax.random.key(10), (16, 2), jnp.float64)
    x1 = sample(velocity, x0, rtol=1e-9, atol=1e-9).x1
    result = log_likelihood(velocity, x1, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(result.x0, x0, rtol=1e-6, atol=1e-6)


def test_fixed_steps_and_jit_agree_with_eager():
    a = 0.3 * jax.random.normal(jax.random.key(11), (3, 3))
    field32 = lambda t, x: x @ a.T
    x1 = jax.random.normal(jax.random.key(12), (4, 3))
    eager = log_likelihood(field32, x1, solver="heun", steps=20)
    jitted = jax.jit(lambda x: log_likelihood(field32, x, solver="heun", steps=20).log_p)(x1)
    np.testing.assert_allclose(eager.log_p, jitted, rtol=1e-5)
    assert int(eager.nfe) == 40


def zero_velocity(t, x):
    return jnp.zeros_like(x)


# every bits/dim test uses images of this shape: one compiled solve of zero_velocity serves them all
IMAGES = (3, 2, 4, 4)


def test_bits_per_dim_of_a_uniform_model_is_eight():
    # velocity 0 and a uniform source on [-1, 1]^D: p_z = 2^-D, so -log2 P(x) / D = 8 for 8-bit data
    images = jax.random.randint(jax.random.key(13), IMAGES, 0, 256)
    log_uniform = lambda z: jnp.full(z.shape[0], -z[0].size * math.log(2.0))
    bpd = bits_per_dim(zero_velocity, images, key=jax.random.key(14), log_p0=log_uniform)
    np.testing.assert_allclose(bpd, 8.0, rtol=1e-6)
    bpd_k = bits_per_dim(zero_velocity, images, key=jax.random.key(14), log_p0=log_uniform, num_samples=4)
    np.testing.assert_allclose(bpd_k, 8.0, rtol=1e-6)


def test_bits_per_dim_of_a_gaussian_model_by_hand():
    # velocity 0, standard-normal source: bpd = -(log N(z) + D log(2/256)) / (D log 2), same u draws
    images = jax.random.randint(jax.random.key(15), IMAGES, 0, 256)
    dims = images[0].size
    key = jax.random.key(16)
    bpd = bits_per_dim(zero_velocity, images, key=key)
    u = jax.random.uniform(jax.random.fold_in(jax.random.split(key)[0], 0), images.shape)
    z = 2.0 / 256 * (images + u) - 1.0
    expected = -(standard_normal_log_density(z) + dims * math.log(2 / 256)) / (dims * math.log(2))
    np.testing.assert_allclose(bpd, expected, rtol=1e-5)


def test_bad_arguments_are_named():
    x = jnp.zeros((2, 2))
    field = lambda t, x: x
    with pytest.raises(ValueError, match="key is required for divergence='hutchinson'"):
        log_likelihood(field, x, divergence="hutchinson")
    with pytest.raises(ValueError, match="divergence must be one of 'exact', 'hutchinson'"):
        log_likelihood(field, x, divergence="trace")
    with pytest.raises(ValueError, match="probe must be one of 'gaussian', 'rademacher'"):
        log_likelihood(field, x, divergence="hutchinson", probe="sphere", key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_probes must be >= 1"):
        log_likelihood(field, x, divergence="hutchinson", num_probes=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        bits_per_dim(field, jnp.zeros((2, 2), jnp.int32), key=jax.random.key(0), num_samples=0)
    with pytest.raises(ValueError, match=r"images must hold integers in \{0, ..., 255\}"):
        bits_per_dim(field, jnp.full((2, 2), 256), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"log_p0\(x\) must return shape \[batch\]"):
        log_likelihood(field, x, log_p0=lambda z: -0.5 * z**2)


def test_bits_per_dim_levels_set_the_default_scale():
    # 4-bit data (16 levels) under the uniform model on [-1, 1)^D: 4 bits per dimension
    images = jax.random.randint(jax.random.key(17), IMAGES, 0, 16).astype(jnp.uint8)
    log_uniform = lambda z: jnp.full(z.shape[0], -z[0].size * math.log(2.0))
    bpd = bits_per_dim(zero_velocity, images, key=jax.random.key(18), log_p0=log_uniform, num_levels=16)
    np.testing.assert_allclose(bpd, 4.0, rtol=1e-6)
    explicit = bits_per_dim(
        zero_velocity, images, key=jax.random.key(18), log_p0=log_uniform, num_levels=16, scale=2 / 16
    )
    np.testing.assert_array_equal(bpd, explicit)


# --- on a manifold: the Riemannian divergence against densities known in closed form on S^2 ---------------

NORTH = jnp.array([0.0, 0.0, 1.0])


def _sphere_points(n, seed, max_polar=None):
    """n points on S^2 (polar angles below ``max_polar`` if given), float64."""

    x = Sphere().base_sample(jax.random.key(seed), (4 * n, 3)).astype(jnp.float64)
    if max_polar is not None:
        x = x[jnp.arccos(jnp.clip(x[:, 2], -1, 1)) < max_polar]
    return x[:n]


CONTRACTION = 0.8  # v = a P_x(e_z): dz/dt = a (1 - z^2), z = cos(polar angle)


def _contraction_log_density(x1, a=CONTRACTION):
    # z1 = tanh(a + artanh z0) from the uniform density 1/(4 pi): p1 = (1 - z0^2) / ((1 - z1^2) 4 pi)
    z1 = x1[:, 2]
    z0 = jnp.tanh(jnp.arctanh(z1) - a)
    return jnp.log1p(-(z0**2)) - jnp.log1p(-(z1**2)) - jnp.log(4 * jnp.pi)


# the field as a user might write it: tangent (projected by hand), or a naive ambient extension
CONTRACTION_FIELDS = {
    "tangent": lambda t, x: CONTRACTION * (NORTH - x[:, 2:3] * x),
    "ambient": lambda t, x: CONTRACTION * jnp.broadcast_to(NORTH, x.shape),  # never projected
    "radial-extension": lambda t, x: (
        CONTRACTION * (NORTH - x[:, 2:3] * x) + 5.0 * x * jnp.sum(x * x, -1)[:, None]
    ),
}


@pytest.mark.parametrize("field", sorted(CONTRACTION_FIELDS))
def test_sphere_likelihood_of_a_contraction_toward_the_pole(field, x64):

    x1 = _sphere_points(8, seed=0)
    result = log_likelihood(
        CONTRACTION_FIELDS[field], x1, manifold=Sphere(), rtol=1e-9, atol=1e-9
    )  # log_p0 defaults to the uniform density of the sphere
    np.testing.assert_allclose(result.log_p, _contraction_log_density(x1), atol=1e-4)
    np.testing.assert_allclose(jnp.linalg.norm(result.x0, axis=-1), 1.0, atol=1e-6)


def test_sphere_likelihood_of_the_geodesic_flow_toward_a_point(x64):
    # x_T = exp_x0(T log_x0 n) from the uniform source: polar angles shrink by (1 - T), so
    # p_T(x) = sin(theta / (1 - T)) / (4 pi (1 - T) sin theta); the flow on [0, 1] is time-rescaled to [0, T]

    sphere, end = Sphere(), 0.5

    def field(s, x):
        return end * sphere.logmap(x, jnp.broadcast_to(NORTH, x.shape)) / (1 - end * s)

    x1 = _sphere_points(8, seed=1, max_polar=0.45 * jnp.pi)
    theta = jnp.arccos(x1[:, 2])
    expected = jnp.log(jnp.sin(theta / (1 - end)) / (4 * jnp.pi * (1 - end) * jnp.sin(theta)))
    result = log_likelihood(field, x1, manifold=sphere, log_p0=sphere.base_log_prob, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(result.log_p, expected, atol=1e-4)


def test_sphere_hutchinson_is_within_its_standard_error(x64):

    x1 = _sphere_points(16, seed=2)
    result = log_likelihood(
        CONTRACTION_FIELDS["ambient"], x1, manifold=Sphere(), divergence="hutchinson", num_probes=64,
        key=jax.random.key(3), rtol=1e-7, atol=1e-7,
    )  # fmt: skip
    error = (result.log_p - _contraction_log_density(x1)) / result.log_p_stderr
    assert float(jnp.max(jnp.abs(error))) < 4.5 and float(jnp.mean(result.log_p_stderr)) > 0


@pytest.mark.parametrize("solver, steps", [("dopri5", None), ("euler", 7), ("heun", 5)])
def test_samples_stay_on_the_sphere(solver, steps):

    x0 = Sphere().base_sample(jax.random.key(0), (64, 3))
    result = sample(CONTRACTION_FIELDS["ambient"], x0, manifold=Sphere(), solver=solver, steps=steps,
                    save_trajectory=True)  # fmt: skip
    np.testing.assert_allclose(jnp.linalg.norm(result.x1, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(result.trajectory.xs, axis=-1), 1.0, atol=1e-5)
    assert float(jnp.mean(result.x1[:, 2])) > float(jnp.mean(x0[:, 2])) + 0.3  # moved toward the pole


def test_manifold_arguments_are_checked():

    with pytest.raises(TypeError, match="manifold"):
        sample(lambda t, x: x, jnp.ones((2, 3)), manifold=3)
    with pytest.raises(ValueError, match=r"x1 must have shape \[batch, D\]"):
        log_likelihood(lambda t, x: x, jnp.ones((2, 1, 3)), manifold=Sphere())

"""Paths: every path in one registry through the same closed-form checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.manifolds import Euclidean, FlatTorus, Sphere
from fmjax.paths import (
    PATHS,
    CondOT,
    Geodesic,
    Linear,
    SchrodingerBridge,
    VariancePreserving,
    VPDiffusion,
    make_path,
)

_ALPHA1 = math.exp(-0.5 * (0.1 + 0.5 * (20.0 - 0.1)))  # VPDiffusion's alpha(1) for the defaults

# path, (a, b, s) at t=0, (a, b, s) at t=1, from the papers' definitions
REGISTRY = [
    (CondOT(sigma_min=0.0), (1, 0, 0), (0, 1, 0)),
    (CondOT(sigma_min=0.1), (1, 0, 0), (0.1, 1, 0)),
    (Linear(sigma=0.0), (1, 0, 0), (0, 1, 0)),
    (Linear(sigma=0.3), (1, 0, 0.3), (0, 1, 0.3)),
    (SchrodingerBridge(sigma=0.5), (1, 0, 0), (0, 1, 0)),
    (SchrodingerBridge(sigma=1.0), (1, 0, 0), (0, 1, 0)),
    (VariancePreserving(), (1, 0, 0), (0, 1, 0)),
    (VPDiffusion(), (math.sqrt(1 - _ALPHA1**2), _ALPHA1, 0), (0, 1, 0)),
]
PATH_IDS = [repr(p) for p, _, _ in REGISTRY]
ALL_PATHS = [p for p, _, _ in REGISTRY]
DETERMINISTIC = [p for p in ALL_PATHS if not p.stochastic]


def _data(dtype, shape=(16, 3, 2)):
    k0, k1 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k0, shape, dtype)
    x1 = 2.0 + jax.random.normal(k1, shape, dtype)
    t = jnp.linspace(0.03, 0.97, shape[0], dtype=dtype)
    return x0, x1, t


def test_registry_covers_every_path():
    assert {type(p) for p in ALL_PATHS} == set(PATHS.values())


@pytest.mark.parametrize("path", ALL_PATHS, ids=PATH_IDS)
def test_ut_is_the_time_derivative_of_xt(path, x64):
    x0, x1, t = _data(jnp.float64)
    key = jax.random.key(1)
    xt_of_t = lambda t: path.sample(key, x0, x1, t).xt  # same key: the noise eps is held fixed
    _, dxt_dt = jax.jvp(xt_of_t, (t,), (jnp.ones_like(t),))
    np.testing.assert_allclose(path.sample(key, x0, x1, t).ut, dxt_dt, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("path", "start", "end"), REGISTRY, ids=PATH_IDS)
def test_end_points(path, start, end, x64):
    x0, x1, _ = _data(jnp.float64)
    for t_value, (a, b, s) in ((0.0, start), (1.0, end)):
        t = jnp.full(x0.shape[:1], t_value)
        coef = path.schedule(t)
        np.testing.assert_allclose(coef.a, a, atol=1e-12)
        np.testing.assert_allclose(coef.b, b, atol=1e-12)
        np.testing.assert_allclose(coef.s, s, atol=1e-12)
        if s == 0:
            np.testing.assert_allclose(
                path.sample(jax.random.key(2), x0, x1, t).xt, a * x0 + b * x1, atol=1e-12
            )


@pytest.mark.parametrize("path", ALL_PATHS, ids=PATH_IDS)
def test_gaussian_to_gaussian_marginal(path):
    # x0 ~ N(-1, 0.5^2), x1 ~ N(2, 1.5^2) independent: x_t ~ N(a m0 + b m1, a^2 s0^2 + b^2 s1^2 + s^2)
    n, m0, s0, m1, s1 = 400_000, -1.0, 0.5, 2.0, 1.5
    k0, k1, kp = jax.random.split(jax.random.key(3), 3)
    x0 = m0 + s0 * jax.random.normal(k0, (n, 1))
    x1 = m1 + s1 * jax.random.normal(k1, (n, 1))
    for t_value in (0.2, 0.5, 0.8):
        t = jnp.full((n,), t_value)
        xt = path.sample(kp, x0, x1, t).xt[:, 0]
        coef = path.schedule(jnp.array([t_value]))
        mean = float(coef.a[0] * m0 + coef.b[0] * m1)
        var = float(coef.a[0] ** 2 * s0**2 + coef.b[0] ** 2 * s1**2 + coef.s[0] ** 2)
        # 6 standard errors of the sample mean and variance: a false alarm is a ~1e-9 event
        assert abs(float(jnp.mean(xt)) - mean) < 6 * math.sqrt(var / n)
        assert abs(float(jnp.var(xt)) - var) < 6 * var * math.sqrt(2 / n)


@pytest.mark.parametrize("path", ALL_PATHS, ids=PATH_IDS)
def test_jit_matches_eager(path):
    x0, x1, t = _data(jnp.float32)
    key = jax.random.key(4)
    eager = path.sample(key, x0, x1, t)
    jitted = jax.jit(path.sample)(key, x0, x1, t)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ALL_PATHS, ids=PATH_IDS)
def test_dtype_is_kept(path, x64):
    for dtype in (jnp.float32, jnp.float64):
        x0, x1, t = _data(dtype)
        sample = path.sample(jax.random.key(5), x0, x1, t.astype(jnp.float32))
        assert sample.xt.dtype == dtype and sample.ut.dtype == dtype and sample.t.dtype == dtype


def test_schrodinger_bridge_velocity_matches_published_form(x64):
    path = SchrodingerBridge(sigma=0.7)
    x0, x1, t = _data(jnp.float64)
    s = path.sample(jax.random.key(6), x0, x1, t)
    tt = t[:, None, None]
    mu = (1 - tt) * x0 + tt * x1
    expected = (1 - 2 * tt) / (2 * tt * (1 - tt)) * (s.xt - mu) + x1 - x0
    np.testing.assert_allclose(s.ut, expected, rtol=1e-10, atol=1e-10)


def test_vp_diffusion_velocity_matches_lipman(x64):
    # Lipman et al. (2023), eq. (19), with T = T(1 - t):
    # u_t(x|x1) = -T'/2 (e^{-T} x - e^{-T/2} x1) / (1 - e^{-T})
    path = VPDiffusion(beta_min=0.1, beta_max=20.0)
    x0, x1, t = _data(jnp.float64)
    s = path.sample(None, x0, x1, t)
    r = (1 - t)[:, None, None]
    big_t = 0.1 * r + 0.5 * (20.0 - 0.1) * r**2
    dbig_t = 0.1 + (20.0 - 0.1) * r
    expected = -0.5 * dbig_t * (jnp.exp(-big_t) * s.xt - jnp.exp(-0.5 * big_t) * x1) / (1 - jnp.exp(-big_t))
    np.testing.assert_allclose(s.ut, expected, rtol=1e-9, atol=1e-9)


def test_singular_derivatives_are_finite_at_the_end_points():
    x0, x1, _ = _data(jnp.float32)
    for path in (SchrodingerBridge(sigma=1.0), VPDiffusion()):
        for t_value in (0.0, 1.0):
            s = path.sample(jax.random.key(7), x0, x1, jnp.full(x0.shape[:1], t_value))
            assert bool(jnp.all(jnp.isfinite(s.ut)))


@pytest.mark.parametrize("path", DETERMINISTIC, ids=repr)
def test_conversions_recover_the_end_points(path, x64):
    x0, x1, t = _data(jnp.float64)
    s = path.sample(None, x0, x1, t)
    np.testing.assert_allclose(path.x1_from_velocity(t, s.xt, s.ut), x1, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(path.eps_from_velocity(t, s.xt, s.ut), x0, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(path.velocity_from_x1(t, s.xt, x1), s.ut, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(path.velocity_from_eps(t, s.xt, x0), s.ut, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(path.x1_from_eps(t, s.xt, x0), x1, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(path.eps_from_x1(t, s.xt, x1), x0, rtol=1e-9, atol=1e-9)
    # a scalar t broadcasts over the batch
    half = path.sample(None, x0, x1, jnp.full(x0.shape[:1], 0.5))
    np.testing.assert_allclose(path.x1_from_velocity(0.5, half.xt, half.ut), x1, rtol=1e-9, atol=1e-9)


def test_default_schedule_derivative_uses_autodiff(x64):
    class Quadratic(CondOT):
        def schedule(self, t):
            return super().schedule(t**2)

    path = Quadratic.__new__(Quadratic)
    object.__setattr__(path, "sigma_min", 0.0)
    t = jnp.array([0.3, 0.6])
    d = super(CondOT, path).schedule_derivative(t)
    np.testing.assert_allclose(d.a, -2 * t, rtol=1e-12)
    np.testing.assert_allclose(d.b, 2 * t, rtol=1e-12)


@pytest.mark.parametrize("path", [Linear(sigma=0.2), SchrodingerBridge(sigma=1.0)], ids=repr)
def test_stochastic_paths_refuse_conversions_and_need_a_key(path):
    x0, x1, t = _data(jnp.float32)
    with pytest.raises(ValueError, match="no conversion"):
        path.x1_from_velocity(t, x0, x1)
    with pytest.raises(ValueError, match="key is required"):
        path.sample(None, x0, x1, t)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: CondOT(sigma_min=-0.1), "sigma_min must be >= 0"),
        (lambda: CondOT(sigma_min=1.0), "sigma_min must be < 1"),
        (lambda: Linear(sigma=float("nan")), "sigma must be finite"),
        (lambda: SchrodingerBridge(sigma=-1.0), "sigma must be >= 0"),
        (lambda: SchrodingerBridge(sigma="1"), "sigma must be a real number"),
        (lambda: VPDiffusion(beta_min=5.0, beta_max=1.0), "beta_max must be >= beta_min"),
        (lambda: make_path("ot"), "path must be one of 'condot', 'linear', 'sb', 'vp', 'vp_diffusion'"),
        (lambda: make_path("vp", sigma=0.1), "sigma is not a parameter of path 'vp'"),
    ],
)
def test_bad_hyperparameters_are_named(factory, message):
    with pytest.raises((ValueError, TypeError), match=message):
        factory()


def test_bad_shapes_are_named():
    path = Linear()
    x = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="same shape"):
        path.sample(None, x, jnp.zeros((4, 3)), jnp.zeros(4))
    with pytest.raises(ValueError, match=r"t must have shape \[batch\]"):
        path.sample(None, x, x, jnp.zeros(3))
    with pytest.raises(ValueError, match="rank >= 2"):
        path.sample(None, jnp.zeros(4), jnp.zeros(4), jnp.zeros(4))
    with pytest.raises(TypeError, match="float32 or float64"):
        path.sample(None, x.astype(jnp.int32), x.astype(jnp.int32), jnp.zeros(4))


def test_paths_are_hashable_static_pytrees():
    assert jax.tree_util.tree_leaves(CondOT(sigma_min=0.1)) == []
    assert hash(Linear(sigma=0.1)) == hash(Linear(sigma=0.1))
    assert make_path("sb", sigma=0.5) == SchrodingerBridge(sigma=0.5)


# --- the geodesic path of a manifold ---------------------------------------------------------------------


def _geodesic_cases():

    key0, key1 = jax.random.split(jax.random.key(0))
    sphere = Sphere()
    return {
        "euclidean": (Euclidean(), jax.random.normal(key0, (5, 3)), jax.random.normal(key1, (5, 3))),
        "sphere": (sphere, sphere.base_sample(key0, (5, 3)), sphere.base_sample(key1, (5, 3))),
        "torus": (
            FlatTorus(),
            jax.random.uniform(key0, (5, 2)) * 6.28,
            jax.random.uniform(key1, (5, 2)) * 6.28,
        ),
    }


@pytest.mark.parametrize("name", ["euclidean", "sphere", "torus"])
def test_geodesic_ends_speed_and_derivative(name):
    manifold, x0, x1 = _geodesic_cases()[name]
    path = Geodesic(manifold=manifold)
    t = jnp.array([0.0, 0.2, 0.5, 0.7, 1.0])
    s = path.sample(None, x0, x1, t)
    np.testing.assert_allclose(s.xt[0], x0[0], atol=1e-5)  # t = 0
    np.testing.assert_allclose(manifold.dist(s.xt[-1], x1[-1]), 0.0, atol=1e-4)  # t = 1
    # constant speed |u_t|_g = d(x0, x1), and u_t tangent at x_t
    np.testing.assert_allclose(manifold.norm(s.xt, s.ut), manifold.dist(x0, x1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(manifold.proju(s.xt, s.ut), s.ut, atol=1e-5)
    # u_t is d/dt x_t: a central difference of the path
    h = 1e-3
    tm = jnp.array([0.2, 0.3, 0.4, 0.5, 0.6])
    ahead = path.sample(None, x0, x1, tm + h).xt
    behind = path.sample(None, x0, x1, tm - h).xt
    fd = manifold.logmap(behind, ahead) / (2 * h)
    np.testing.assert_allclose(path.sample(None, x0, x1, tm).ut, fd, atol=2e-2)
    assert not path.stochastic


def test_geodesic_on_euclidean_space_is_the_straight_line():

    _, x0, x1 = _geodesic_cases()["euclidean"]
    t = jnp.linspace(0, 1, 5)
    s, line = Geodesic(manifold=Euclidean()).sample(None, x0, x1, t), Linear().sample(None, x0, x1, t)
    np.testing.assert_allclose(s.xt, line.xt, atol=1e-6)
    np.testing.assert_allclose(s.ut, line.ut, atol=1e-6)


def test_torus_geodesic_wraps_through_zero():

    x0, x1 = jnp.full((3, 1), 0.1), jnp.full((3, 1), 2 * jnp.pi - 0.1)
    s = Geodesic(manifold=FlatTorus()).sample(None, x0, x1, jnp.array([0.25, 0.5, 0.75]))
    np.testing.assert_allclose(s.ut, -0.2, atol=1e-6)
    np.testing.assert_allclose(jnp.cos(s.xt[:, 0]), jnp.cos(jnp.array([0.05, 0.0, -0.05])), atol=1e-6)


def test_geodesic_takes_only_a_manifold():

    with pytest.raises(TypeError, match="manifold"):
        Geodesic(manifold=3)

"""Manifolds: every manifold in one registry through the same closed-form checks, then each one's maths."""

import functools
import math
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.manifolds import (
    MANIFOLDS,
    Euclidean,
    FlatTorus,
    Hyperbolic,
    Manifold,
    Product,
    Sphere,
    resolve_manifold,
)

# manifold, ambient size D of the test points
REGISTRY = [
    (Euclidean(dim=3), 3),
    (Sphere(), 3),
    (FlatTorus(), 2),
    (Hyperbolic(), 3),
    (Product(Sphere(dim=3), FlatTorus(dim=2)), 5),
    (Product(Hyperbolic(dim=3), Euclidean(dim=2), Sphere(dim=2)), 7),
]
IDS = [repr(m) for m, _ in REGISTRY]
N = 8


def _gaussians(shape, seed=0):
    """Standard normal draws as a float64 NumPy array (drawn outside jit: a jitted draw is a compilation)."""
    return np.random.default_rng(seed).normal(size=shape)


def _points(manifold, g):
    """From Gaussians g [4, n, D]: x, y on M (projected), a tangent vector u at x of length well inside the
    injectivity radius (|u| < pi with probability 1 - 1e-12) and an ambient vector."""
    x, y = manifold.projx(g[0]), manifold.projx(g[1])
    return x, y, manifold.proju(x, 0.4 * g[2]), g[3]


def _residual(manifold, x):
    """How far x is from M (0 on M), per point: the defining equations, factor by factor."""
    if isinstance(manifold, Product):
        parts, start = [], 0
        for factor in manifold.factors:
            parts.append(_residual(factor, x[..., start : start + factor.dim]))
            start += factor.dim
        return sum(parts)
    if isinstance(manifold, Sphere):
        return jnp.abs(jnp.linalg.norm(x, axis=-1) - 1)
    if isinstance(manifold, Hyperbolic):
        lorentz = -(x[..., 0] ** 2) + jnp.sum(x[..., 1:] ** 2, axis=-1)
        return jnp.abs(lorentz + 1) / x[..., 0] ** 2 + (x[..., 0] <= 0)
    if isinstance(manifold, FlatTorus):
        return jnp.sum((x < 0) | (x >= 2 * math.pi), axis=-1).astype(x.dtype)
    return jnp.zeros(x.shape[:-1], x.dtype)


@functools.cache
def _evaluated(manifold, size):
    """Everything the registry's checks read, in float64, from one jitted function per manifold (one
    compilation each keeps this file fast; jit == eager is checked on its own below)."""
    M = manifold

    def compute(gaussians, key):
        x, y, u, g = _points(M, gaussians)
        log_xy, exp_u, tangent = M.logmap(x, y), M.expmap(x, u), M.proju(x, g)
        shift = 7.0 if isinstance(M, FlatTorus) else 0.0  # leave [0, 2 pi) on the torus
        off = x + 0.3 * g + shift
        base = M.base_sample(key, (4, 5, size), jnp.float64)
        at_zero = jnp.zeros_like(x[:2])
        return {
            "x": x,
            "y": y,
            "u": u,
            "g": g,
            "exp_log": M.expmap(x, log_xy),
            "log_exp": M.logmap(x, exp_u),
            "log_xx": M.logmap(x, x),
            "dist": M.dist(x, y),
            "dist_yx": M.dist(y, x),
            "norm_log": M.norm(x, log_xy),
            "dist_exp": M.dist(x, exp_u),
            "norm_u": M.norm(x, u),
            "dist_matrix": M.dist(x[:, None], y[None, :3]),
            "dist_53": M.dist(x[5], y[1]),
            "tangent": tangent,
            "tangent_twice": M.proju(x, tangent),
            "normals": M.normals(x),
            "inner_tt": M.inner(x, tangent, tangent),
            "norm_t": M.norm(x, tangent),
            "projx_off": M.projx(off),
            "projx_twice": M.projx(M.projx(off)),
            "projx_x": M.projx(x),
            "residual_projx": _residual(M, M.projx(off)),
            "residual_base": _residual(M, base),
            "base_shape": jnp.zeros(base.shape),
            "base_log_prob": M.base_log_prob(base),
            # the degenerate points: y = x in dist^2 and log, u = 0 in exp
            "grad_dist2": jax.vmap(jax.grad(lambda a, b: M.dist(a, b) ** 2))(x[:2], x[:2]),
            "jvp_exp": jax.jvp(lambda v: M.expmap(x[:2], v), (at_zero,), (u[:2],))[1],
            "jvp_log": jax.jvp(M.logmap, (x[:2], x[:2]), (u[:2], 2 * u[:2]))[1],
        }

    return jax.device_get(jax.jit(compute)(_gaussians((4, N, size)), jax.random.key(0)))


@pytest.fixture
def evaluated(x64):
    return _evaluated


def test_registry_covers_every_manifold():
    assert {type(m) for m, _ in REGISTRY} == set(MANIFOLDS.values()) | {Product}


@pytest.mark.parametrize(("manifold", "size"), REGISTRY, ids=IDS)
def test_static_pytree_hashable_and_picklable(manifold, size):
    assert jax.tree.leaves(manifold) == []
    rebuilt = pickle.loads(pickle.dumps(manifold))
    assert rebuilt == manifold and hash(rebuilt) == hash(manifold)
    with pytest.raises(AttributeError):
        manifold.dim = 9  # frozen


@pytest.mark.parametrize(("manifold", "size"), REGISTRY, ids=IDS)
def test_exp_and_log_are_inverse(manifold, size, evaluated):
    out = evaluated(manifold, size)
    np.testing.assert_allclose(out["exp_log"], out["y"], atol=1e-10)
    np.testing.assert_allclose(out["log_exp"], out["u"], atol=1e-10)
    np.testing.assert_allclose(out["log_xx"], 0, atol=1e-7)  # sqrt(eps): |x|^2 = 1 + O(eps)


@pytest.mark.parametrize(("manifold", "size"), REGISTRY, ids=IDS)
def test_dist_is_symmetric_and_the_length_of_log(manifold, size, evaluated):
    out = evaluated(manifold, size)
    d = out["dist"]
    assert d.shape == (N,) and np.all(d > 0)
    np.testing.assert_allclose(d, out["dist_yx"], rtol=1e-10)
    np.testing.assert_allclose(d, out["norm_log"], rtol=1e-10)
    np.testing.assert_allclose(out["dist_exp"], out["norm_u"], rtol=1e-10)
    # broadcasting over leading axes: the [n, m] matrix of distances
    assert out["dist_matrix"].shape == (N, 3)
    np.testing.assert_allclose(np.diagonal(out["dist_matrix"][:3]), d[:3], rtol=1e-12)
    np.testing.assert_allclose(out["dist_matrix"][5, 1], out["dist_53"], rtol=1e-12)


@pytest.mark.parametrize(("manifold", "size"), REGISTRY, ids=IDS)
def test_proju_is_the_projection_the_normals_describe(manifold, size, evaluated):
    out = evaluated(manifold, size)
    g, u, (normals, covectors) = out["g"], out["tangent"], out["normals"]
    np.testing.assert_allclose(out["tangent_twice"], u, atol=1e-12)  # idempotent
    k = manifold.codimension
    assert normals.shape == covectors.shape == (N, k, size)
    np.testing.assert_allclose(np.einsum("nkd,nd->nk", covectors, u), 0, atol=1e-12)  # tangent
    np.testing.assert_allclose(
        np.einsum("nkd,njd->nkj", covectors, normals), np.broadcast_to(np.eye(k), (N, k, k)), atol=1e-12
    )
    np.testing.assert_allclose(u, g - np.einsum("nkd,nke,ne->nd", normals, covectors, g), atol=1e-12)
    # the metric is positive definite on tangent vectors
    assert np.all(out["inner_tt"] > 0)
    np.testing.assert_allclose(out["norm_t"] ** 2, out["inner_tt"], rtol=1e-12)


@pytest.mark.parametrize(("manifold", "size"), REGISTRY, ids=IDS)
def test_projx_lands_on_the_manifold_and_is_idempotent(manifold, size, evaluated):
    out = evaluated(manifold, size)
    np.testing.assert_allclose(out["residual_projx"], 0, atol=1e-12)
    np.testing.assert_allclose(out["projx_twice"], out["projx_off"], atol=1e-12)
    np.testing.assert_allclose(out["projx_x"], out["x"], atol=1e-12)  # points of M stay


@pytest.mark.parametrize(("manifold", "size"), REGISTRY, ids=IDS)
def test_base_sample_lies_on_the_manifold(manifold, size, evaluated):
    out = evaluated(manifold, size)
    assert out["base_shape"].shape == (4, 5, size)
    np.testing.assert_allclose(out["residual_base"], 0, atol=1e-12)
    assert out["base_log_prob"].shape == (4, 5) and np.all(np.isfinite(out["base_log_prob"]))


@pytest.mark.parametrize(("manifold", "size"), REGISTRY, ids=IDS)
def test_gradients_are_finite_at_the_degenerate_points(manifold, size, evaluated):
    out = evaluated(manifold, size)
    u = out["u"][:2]
    np.testing.assert_allclose(out["grad_dist2"], 0, atol=1e-7)  # d(x, y)^2 at y = x: gradient 0
    np.testing.assert_allclose(out["jvp_exp"], u, atol=1e-10)  # d exp_x(v) / dv at v = 0: identity on T_x
    # at y = x, d log_x(y) / dy is the identity on T_x and d log_x(y) / dx minus it (log_x(x) = 0 for all x):
    # moving x by u and y by 2 u moves log_x(y) by -u + 2 u = u
    np.testing.assert_allclose(out["jvp_log"], u, atol=1e-6)


@pytest.mark.parametrize(("manifold", "size"), REGISTRY, ids=IDS)
def test_jit_matches_eager_and_dtypes_are_kept(manifold, size, x64):
    def everything(x, y, u):
        return (
            manifold.expmap(x, u),
            manifold.logmap(x, y),
            manifold.projx(x),
            manifold.proju(x, u),
            manifold.dist(x, y),
            manifold.inner(x, u, u),
            manifold.norm(x, u),
            manifold.base_log_prob(x),
            *manifold.normals(x),
        )

    for dtype in (jnp.float32, jnp.float64):
        gaussians = jax.ShapeDtypeStruct((4, 2, size), dtype)
        points = jax.eval_shape(lambda g: _points(manifold, g)[:3], gaussians)
        assert all(out.dtype == dtype for out in jax.eval_shape(everything, *points))
        assert all(p.dtype == dtype for p in points)
        assert (
            jax.eval_shape(
                lambda k, dtype=dtype: manifold.base_sample(k, (2, size), dtype), jax.random.key(0)
            ).dtype
            == dtype
        )
    out = _evaluated(manifold, size)
    x, y, u = (out[name][:2] for name in ("x", "y", "u"))
    # the manifold passed to jit as an argument: a static pytree, part of the cache key; float64 because
    # float32 Lorentz coordinates far from the origin lose digits to cancellation, differently per order
    jitted = jax.jit(lambda m, x, y, u: jax.vmap(everything)(x, y, u))(manifold, x, y, u)
    for a, b in zip(jitted, everything(x, y, u), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_dimensions():
    assert (Sphere().intrinsic_dim(3), Sphere().ambient_dim(2)) == (2, 3)
    assert (Hyperbolic(dim=4).intrinsic_dim(), Hyperbolic().ambient_dim(3)) == (3, 4)
    assert (FlatTorus(dim=2).intrinsic_dim(), Euclidean().ambient_dim(5)) == (2, 5)
    product = Product(Sphere(dim=3), FlatTorus(dim=2), Hyperbolic(dim=3))
    assert (product.dim, product.codimension, product.intrinsic_dim(), product.ambient_dim(6)) == (8, 2, 6, 8)
    assert Product(Product(Sphere(dim=3), FlatTorus(dim=2)), Euclidean(dim=1)) == Product(
        Sphere(dim=3), FlatTorus(dim=2), Euclidean(dim=1)
    )  # nested products flatten
    assert repr(product) == "Product(Sphere(dim=3), FlatTorus(dim=2), Hyperbolic(dim=3))"


# ---------------------------------------------------------------------------------------------- Euclidean


def test_euclidean_closed_forms(x64):
    M = Euclidean()
    x, y = np.array([1.0, 2.0]), np.array([4.0, 6.0])
    out = jax.jit(lambda: (M.dist(x, y), M.logmap(x, y), M.expmap(x, y), M.base_log_prob(x)))()
    assert float(out[0]) == 5.0
    np.testing.assert_array_equal(out[1], y - x)
    np.testing.assert_array_equal(out[2], x + y)
    np.testing.assert_allclose(out[3], -2.5 - math.log(2 * math.pi), rtol=1e-14)


# ---------------------------------------------------------------------------------------------- Sphere


def test_sphere_closed_forms(x64):
    M = Sphere()
    e0, e1 = np.eye(3)[0], np.eye(3)[1]
    angles = np.array([1e-9, 1.0, math.pi - 1e-9])
    y = np.stack([np.cos(angles), np.sin(angles), 0 * angles], axis=-1)

    @jax.jit
    def compute():
        return {
            "right_angle": M.dist(e0, e1),
            "antipode": M.dist(e0, -e0),
            "log": M.logmap(e0, e1),
            "exp_pi": M.expmap(e0, math.pi * e1),
            "angles": M.dist(e0, y),
            "projx_0": M.projx(np.zeros(3)),
            "projx": M.projx(np.array([0.0, 3.0, 4.0])),
            "log_prob": [M.base_log_prob(np.eye(d)[0]) for d in (2, 3, 5)],
        }

    out = compute()
    np.testing.assert_allclose(out["right_angle"], math.pi / 2, rtol=1e-15)
    np.testing.assert_allclose(out["antipode"], math.pi, rtol=1e-15)
    np.testing.assert_allclose(out["log"], math.pi / 2 * e1, atol=1e-15)
    np.testing.assert_allclose(out["exp_pi"], -e0, atol=1e-15)
    np.testing.assert_allclose(out["angles"], angles, rtol=1e-12)  # atan2 keeps the digits arccos loses
    np.testing.assert_allclose(out["projx_0"], e0)  # the origin is as near to every point: e_0
    np.testing.assert_allclose(out["projx"], [0.0, 0.6, 0.8], rtol=1e-15)
    # uniform: minus the log of |S^{D-1}| = 2 pi^{D/2} / Gamma(D/2): 2 pi, 4 pi, 8 pi^2 / 3
    areas = [2 * math.pi, 4 * math.pi, 8 * math.pi**2 / 3]
    np.testing.assert_allclose(out["log_prob"], -np.log(areas), rtol=1e-15)


def test_sphere_base_samples_are_uniform(x64):
    many = jax.jit(lambda key: Sphere().base_sample(key, (20_000, 3)))(jax.random.key(1))
    # E[x] = 0 and E[x_i^2] = 1/3 under the uniform distribution (standard errors <= 0.0041)
    np.testing.assert_allclose(np.mean(many, axis=0), 0, atol=0.02)
    np.testing.assert_allclose(np.mean(many**2, axis=0), 1 / 3, atol=0.01)


@functools.partial(jax.jit, static_argnums=(0,))
def _divergence_via_identity(manifold, g, a, A):
    """At x = projx(g): the divergences trace(J) - sum_j c_j . (J n_j) of f = proju(x, a) and of
    f = proju(x, A x), J the ambient Jacobian of each; and x and the second J."""
    x = manifold.projx(g)
    normals, covectors = manifold.normals(x)
    out = [x]
    for field in (lambda p: manifold.proju(p, a), lambda p: manifold.proju(p, A @ p)):
        jac = jax.vmap(jax.jacfwd(field))(x)
        out.append(jnp.trace(jac, axis1=-2, axis2=-1) - jnp.einsum("nkd,nde,nke->n", covectors, jac, normals))
    return *out, jac


def test_sphere_divergence_from_the_normals(x64):
    M, d = Sphere(), 4
    a, A = _gaussians(d, seed=1), _gaussians((d, d), seed=2)
    x, div_a, div, jac = _divergence_via_identity(M, _gaussians((6, d)), a, A)
    # f(x) = proju(x, a) = a - <a, x> x is the gradient of <a, x> on S^{d-1}: div f = -(d - 1) <a, x>
    np.testing.assert_allclose(div_a, -(d - 1) * (x @ a), rtol=1e-12)
    # f(x) = proju(x, A x): against sum_i e_i . (J e_i) over an orthonormal basis e_i of T_x S^{d-1}
    for point, value, j in zip(x, np.asarray(div), np.asarray(jac), strict=True):
        basis = np.linalg.svd(point[None])[2][1:]  # rows: orthonormal, orthogonal to x
        np.testing.assert_allclose(value, np.trace(basis @ j @ basis.T), rtol=1e-10)


# ---------------------------------------------------------------------------------------------- FlatTorus


def test_flat_torus_wraps(x64):
    M = FlatTorus()

    @jax.jit
    def compute():
        return (
            M.logmap(np.array([0.1]), np.array([2 * math.pi - 0.1])),
            M.dist(np.array([0.1, 0.0]), np.array([2 * math.pi - 0.1, 0.0])),
            M.expmap(np.array([6.0]), np.array([1.0])),
            M.projx(np.array([-1e-30, -1.0])),
            M.base_log_prob(np.zeros((2, 3))),
        )

    log, dist, exp, projx, log_prob = compute()
    np.testing.assert_allclose(log, [-0.2], rtol=1e-12)  # the short way round
    np.testing.assert_allclose(dist, 0.2, rtol=1e-12)
    np.testing.assert_allclose(exp, [7.0 - 2 * math.pi], rtol=1e-12)
    np.testing.assert_allclose(projx, [0.0, 2 * math.pi - 1.0], rtol=1e-15)  # -1e-30 mod 2 pi rounds to 2 pi
    assert np.all(projx < 2 * math.pi)
    np.testing.assert_allclose(log_prob, -3 * math.log(2 * math.pi), rtol=1e-15)


# ---------------------------------------------------------------------------------------------- Hyperbolic


def _minkowski(u, v):
    return -u[..., 0] * v[..., 0] + np.sum(u[..., 1:] * v[..., 1:], axis=-1)


def test_hyperbolic_closed_forms(x64):
    M = Hyperbolic()
    origin = np.array([1.0, 0.0, 0.0])
    r = np.array([1e-6, 0.5, 5.0])
    on_axis = np.stack([np.cosh(r), 0 * r, np.sinh(r)], axis=-1)  # at distance r from the origin
    tangent = np.stack([0 * r, 0 * r, r], axis=-1)  # log_o of those points
    out = _evaluated(M, 3)
    x, y, u = out["x"], out["y"], out["u"]

    @jax.jit
    def compute():
        return {
            "dist": M.dist(origin, on_axis),
            "log": M.logmap(origin, on_axis),
            "exp": M.expmap(origin, tangent),
            "projx": M.projx(np.array([9.0, 3.0, 4.0])),
            "proju": M.proju(x, y),
            "inner": M.inner(x, u, y),
            "dist_xy": M.dist(x, y),
        }

    out = compute()
    np.testing.assert_allclose(out["dist"], r, rtol=1e-12)
    np.testing.assert_allclose(out["log"], tangent, rtol=1e-12)
    np.testing.assert_allclose(out["exp"], on_axis, rtol=1e-12)
    np.testing.assert_allclose(out["projx"], [math.sqrt(26), 3.0, 4.0], rtol=1e-15)
    np.testing.assert_allclose(_minkowski(x, out["proju"]), 0, atol=1e-12)  # tangent: <x, u>_L = 0
    np.testing.assert_allclose(out["inner"], _minkowski(u, y), rtol=1e-14)
    np.testing.assert_allclose(out["dist_xy"], np.arccosh(-_minkowski(x, y)), rtol=1e-10)


def test_hyperbolic_distance_keeps_its_digits_for_nearby_points():
    # float32: arccosh(-<x, y>_L) = arccosh(1 + 5e-9) rounds to 0; the chord form does not
    M = Hyperbolic()

    @jax.jit
    def compute(gaussians):
        x, _, u, _ = _points(M, gaussians)
        u = 1e-4 * u / M.norm(x, u)[:, None]
        return M.dist(x, M.expmap(x, u))

    np.testing.assert_allclose(compute(_gaussians((4, 4, 3)).astype(np.float32)), 1e-4, rtol=2e-2)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_hyperbolic_base_density_integrates_to_one_and_matches_the_samples(d, x64):
    # In geodesic polar coordinates about the origin the volume of H^d is sinh(r)^{d-1} dr dOmega and the
    # wrapped normal's density depends on r alone: integral p(r) sinh(r)^{d-1} |S^{d-1}| dr = 1, and
    # E[r^2] = E|v|^2 = d for v ~ N(0, I_d).
    M = Hyperbolic()
    r = np.linspace(0.0, 12.0, 24_001)
    x = np.zeros((r.size, d + 1))
    x[:, 0], x[:, 1] = np.cosh(r), np.sinh(r)
    sphere_area = 2 * math.pi ** (d / 2) / math.gamma(d / 2)

    @jax.jit
    def compute(key):
        samples = M.base_sample(key, (20_000, d + 1))
        return M.base_log_prob(x), M.dist(np.eye(d + 1)[0], samples) ** 2

    log_prob, r2 = compute(jax.random.key(d))
    weight = np.exp(log_prob) * np.sinh(r) ** (d - 1) * sphere_area
    np.testing.assert_allclose(np.trapezoid(weight, r), 1.0, rtol=1e-7)
    np.testing.assert_allclose(np.trapezoid(weight * r**2, r), d, rtol=1e-7)
    np.testing.assert_allclose(np.mean(r2), d, atol=0.1)  # chi^2_d: standard error sqrt(2 d / 20000) <= 0.025


def test_hyperbolic_base_density_closed_form(x64):
    near = np.array([math.cosh(1.0), 0.6 * math.sinh(1.0), 0.8 * math.sinh(1.0)])  # d = 2, |v| = r = 1
    far = np.array([math.cosh(200.0), math.sinh(200.0), 0.0])  # sinh(200) overflows nothing in logs
    log_prob = jax.jit(lambda: Hyperbolic().base_log_prob(np.stack([near, far])))()
    # log N(v; 0, I_2) - (d - 1) log(sinh r / r)
    expected = [
        -0.5 - math.log(2 * math.pi) - math.log(math.sinh(1.0)),
        -(200.0**2) / 2 - math.log(2 * math.pi) - (200.0 + math.log((1 - math.exp(-400)) / 400)),
    ]
    np.testing.assert_allclose(log_prob, expected, rtol=1e-14)


def test_hyperbolic_divergence_from_the_normals(x64):
    M, d = Hyperbolic(), 3  # H^3 in R^4
    a, A = _gaussians(d + 1, seed=1), _gaussians((d + 1, d + 1), seed=2)
    x, div_a, div, jac = _divergence_via_identity(M, _gaussians((6, d + 1)), a, A)
    # f(x) = proju(x, a) = a + <x, a>_L x is the gradient of h = <x, a>_L on H^d, and Delta h = d h
    np.testing.assert_allclose(div_a, d * _minkowski(x, a), rtol=1e-10)
    # f(x) = proju(x, A x): against sum_i <e_i, J e_i>_L over a Minkowski-orthonormal basis of T_x H^d
    for point, value, j in zip(x, np.asarray(div), np.asarray(jac), strict=True):
        basis = []
        for e in np.eye(d + 1)[1:]:  # Gram-Schmidt in <., .>_L on the tangent parts e + <x, e>_L x
            v = e + _minkowski(point, e) * point
            for b in basis:
                v = v - _minkowski(b, v) * b
            basis.append(v / math.sqrt(_minkowski(v, v)))
        np.testing.assert_allclose(value, sum(_minkowski(b, j @ b) for b in basis), rtol=1e-10)


# ---------------------------------------------------------------------------------------------- Product


def test_product_splits_into_its_factors(x64):
    sphere, torus = Sphere(dim=3), FlatTorus(dim=2)
    M = Product(sphere, torus)
    out = _evaluated(M, 5)
    x, y, u = out["x"], out["y"], out["u"]
    s, t = slice(0, 3), slice(3, 5)

    @jax.jit
    def compute():
        return {
            "log_prob": (M.base_log_prob(x), sphere.base_log_prob(x[:, s]) + torus.base_log_prob(x[:, t])),
            "dist2": (
                M.dist(x, y) ** 2,
                sphere.dist(x[:, s], y[:, s]) ** 2 + torus.dist(x[:, t], y[:, t]) ** 2,
            ),
            "exp": (
                M.expmap(x, u),
                jnp.concatenate([sphere.expmap(x[:, s], u[:, s]), torus.expmap(x[:, t], u[:, t])], -1),
            ),
            "inner": (M.inner(x, u, y), jnp.sum(u * y, -1)),
            "normals": (M.normals(x)[0], jnp.pad(x[:, None, s], ((0, 0), (0, 0), (0, 2)))),
        }

    for name, (product, factors) in compute().items():
        np.testing.assert_allclose(product, factors, rtol=1e-12, atol=1e-14, err_msg=name)
    # the log-densities add: -log(4 pi) on S^2 and -2 log(2 pi) on T^2
    np.testing.assert_allclose(out["base_log_prob"], -math.log(4 * math.pi) - 2 * math.log(2 * math.pi))


def test_product_divergence_from_the_normals(x64):
    M = Product(Sphere(dim=3), Hyperbolic(dim=3), FlatTorus(dim=2))
    a, A = _gaussians(8, seed=1), _gaussians((8, 8), seed=2)
    x, div, div_A, jac = _divergence_via_identity(M, _gaussians((5, 8)), a, A)
    # f = proju(x, a): the factors' divergences add, -2 <a_s, x_s> + 2 <a_h, x_h>_L + 0
    expected = -2 * (x[:, :3] @ a[:3]) + 2 * _minkowski(x[:, 3:6], a[3:6])
    np.testing.assert_allclose(div, expected, rtol=1e-10)


# ---------------------------------------------------------------------------------------------- errors


def test_wrong_last_axis_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"x must have a last axis of size 3 \(the ambient dimension of Sphere"
    ):
        Sphere(dim=3).projx(jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="x must have a last axis of size 5"):
        jax.jit(Product(Sphere(dim=3), FlatTorus(dim=2)).dist)(jnp.ones((4, 4)), jnp.ones((4, 4)))
    with pytest.raises(ValueError, match="u must have the last axis of x, of size 3"):
        Sphere().expmap(jnp.ones((4, 3)), jnp.ones((4, 1)))
    with pytest.raises(ValueError, match="size >= 2 for Hyperbolic"):
        Hyperbolic().projx(jnp.ones((4, 1)))
    with pytest.raises(ValueError, match="shape must have a last axis of size 3"):
        Sphere(dim=3).base_sample(jax.random.key(0), (4, 2))
    with pytest.raises(TypeError, match="x must be a floating-point array; got dtype int32"):
        Sphere().projx(jnp.ones((4, 3), jnp.int32))
    with pytest.raises(TypeError, match="x must be a floating-point array of shape"):
        Sphere().projx([1.0, 0.0])
    with pytest.raises(TypeError, match=r"shape must be a non-empty tuple of ints \[..., D\].*; got int 3"):
        Sphere().base_sample(jax.random.key(0), 3)
    with pytest.raises(TypeError, match="key must be one PRNG key"):
        Sphere().base_sample(0, (4, 3))
    with pytest.raises(ValueError, match="dim must be >= 2"):
        Sphere(dim=1)
    with pytest.raises(ValueError, match="ambient_dim is required"):
        Sphere().intrinsic_dim()
    with pytest.raises(ValueError, match="intrinsic_dim does not fit Sphere"):
        Sphere(dim=3).ambient_dim(3)


def test_product_of_a_non_manifold_is_a_clear_error():
    with pytest.raises(TypeError, match=r"factors\[1\] must be an fmjax manifold"):
        Product(Sphere(dim=3), "torus")
    with pytest.raises(TypeError, match=r"factors\[0\] must be a manifold, not a manifold class"):
        Product(Sphere)
    with pytest.raises(ValueError, match=r"factors\[1\] must have its ambient size dim set"):
        Product(Sphere(dim=3), FlatTorus())
    with pytest.raises(ValueError, match="factors must hold at least one manifold"):
        Product()


def test_resolve_manifold():
    assert resolve_manifold(Sphere()) == Sphere()
    assert resolve_manifold("hyperbolic") == Hyperbolic()
    with pytest.raises(ValueError, match="manifold must be one of 'euclidean', 'flat_torus'"):
        resolve_manifold("torus")
    with pytest.raises(TypeError, match="geometry must be a manifold, not a manifold class"):
        resolve_manifold(Sphere, "geometry")
    with pytest.raises(TypeError, match="manifold must be an fmjax manifold"):
        resolve_manifold(None)
    assert issubclass(Product, Manifold)

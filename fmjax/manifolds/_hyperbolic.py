"""Hyperbolic space H^{D-1} in the Lorentz (hyperboloid) model in R^D."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from fmjax.manifolds._base import _LOG_TWO_PI, Manifold, _dot, _of_square, _safe_norm, _safe_sqrt

__all__ = ["Hyperbolic"]


def _cosh(sq):
    return _of_square(sq, lambda s: 1 + s / 2 * (1 + s / 12 * (1 + s / 30)), jnp.cosh)


def _sinhc(sq):  # sinh(r) / r
    return _of_square(sq, lambda s: 1 + s / 6 * (1 + s / 20 * (1 + s / 42)), lambda r: jnp.sinh(r) / r)


def _log_sinhc(sq):  # log(sinh(r) / r) = r + log((1 - exp(-2r)) / (2r)): no overflow for large r
    return _of_square(
        sq,
        lambda s: s / 6 - s**2 / 180 + s**3 / 2835,
        lambda r: r + jnp.log(-jnp.expm1(-2 * r) / (2 * r)),
    )


def _minkowski(u: jax.Array, v: jax.Array) -> jax.Array:
    """⟨u, v⟩_L = -u_0 v_0 + sum_{i >= 1} u_i v_i over the last axis."""
    return _dot(u[..., 1:], v[..., 1:]) - u[..., 0] * v[..., 0]


@jax.tree_util.register_static  # a pytree without leaves: every field is static
@dataclasses.dataclass(frozen=True, kw_only=True)
class Hyperbolic(Manifold):
    """Hyperbolic space H^d (curvature -1) in the Lorentz (hyperboloid) model in R^{d+1}, D = d + 1.

    Points: x with ⟨x, x⟩_L = -1 and x_0 > 0, where ⟨u, v⟩_L = -u_0 v_0 + sum_{i>=1} u_i v_i is the
    Minkowski form; tangent vectors at x: ⟨x, u⟩_L = 0; the metric is ⟨u, v⟩_x = ⟨u, v⟩_L (positive
    definite on tangent vectors), |u|_L = sqrt(max(⟨u, u⟩_L, 0)).

    exp_x(u) = cosh|u|_L x + sinh|u|_L u / |u|_L,
    log_x(y) = d(x, y) w / |w|_L  with  w = y + ⟨x, y⟩_L x,  |w|_L = sinh d(x, y),
    d(x, y) = arccosh(-⟨x, y⟩_L) = 2 asinh(|y - x|_L / 2),
    projx(x) = (sqrt(1 + |x_{1:}|^2), x_{1:}),  proju(x, u) = u + ⟨x, u⟩_L x.

    The distance is computed in its second form, from the chord y - x, which stays accurate for
    nearby points where arccosh(1 + small) loses all digits (and has an infinite derivative).

    The base distribution is the wrapped standard normal at the origin o = (1, 0, ..., 0) (Nagano et
    al., "A Wrapped Normal Distribution on Hyperbolic Space for Gradient-Based Learning", ICML 2019):
    v ~ N(0, I_d), x = exp_o((0, v)). Its log density w.r.t. the Riemannian volume is

        log p(x) = log N(v; 0, I_d) - (d - 1) log(sinh r / r),   r = |v| = d(o, x) = asinh |x_{1:}|,

    the second term being the volume element sinh(r)^{d-1} of geodesic polar coordinates against the
    Euclidean r^{d-1}. It reads only x_{1:} (it is the density at projx(x)). ``normals``: n = x and
    c = (x_0, -x_1, ..., -x_d), so c . u = -⟨x, u⟩_L and c . n = 1.

    Args:
      dim: the ambient size D = d + 1 (>= 2), if fixed (checked by every method; needed in a ``Product``).

    >>> import jax.numpy as jnp
    >>> H = Hyperbolic()
    >>> origin, r = jnp.array([1.0, 0.0, 0.0]), 2.0
    >>> x = jnp.array([jnp.cosh(r), jnp.sinh(r), 0.0])  # at distance r from the origin
    >>> bool(jnp.isclose(H.dist(origin, x), r))
    True
    >>> bool(jnp.allclose(H.logmap(origin, x), jnp.array([0.0, r, 0.0])))
    True
    """

    codimension: ClassVar[int] = 1
    min_dim: ClassVar[int] = 2
    dim: int | None = None

    def _expmap(self, x, u):
        sq = _minkowski(u, u)[..., None]
        return _cosh(sq) * x + _sinhc(sq) * u

    def _logmap(self, x, y):
        w = y + _minkowski(x, y)[..., None] * x
        r = self._dist(x, y)[..., None]
        return w / _sinhc(r * r)  # d w / |w|_L with |w|_L = sinh d: smooth, 1 at x = y

    def _dist(self, x, y):
        chord = y - x
        return 2 * jnp.arcsinh(_safe_sqrt(_minkowski(chord, chord)) / 2)

    def _projx(self, x):
        space = x[..., 1:]
        return jnp.concatenate([jnp.sqrt(1 + _dot(space, space))[..., None], space], axis=-1)

    def _proju(self, x, u):
        return u + _minkowski(x, u)[..., None] * x

    def _inner(self, x, u, v):
        return _minkowski(u, v) + jnp.zeros(x.shape[:-1], x.dtype)

    def _normals(self, x):
        sign = jnp.ones(x.shape[-1], x.dtype).at[0].set(-1)
        return x[..., None, :], -(sign * x)[..., None, :]

    def _base_sample(self, key, shape, dtype):
        v = jax.random.normal(key, shape[:-1] + (shape[-1] - 1,), dtype)
        sq = _dot(v, v)[..., None]
        return jnp.concatenate([_cosh(sq), _sinhc(sq) * v], axis=-1)

    def _base_log_prob(self, x):
        d = x.shape[-1] - 1
        r = jnp.arcsinh(_safe_norm(x[..., 1:]))
        sq = r * r
        return -0.5 * sq - 0.5 * d * _LOG_TWO_PI - (d - 1) * _log_sinhc(sq)

"""The unit sphere S^{D-1} in R^D."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from fmjax.manifolds._base import Manifold, _dot, _of_square, _safe_norm

__all__ = ["Sphere"]


def _cos(sq):
    return _of_square(sq, lambda s: 1 - s / 2 * (1 - s / 12 * (1 - s / 30)), jnp.cos)


def _sinc(sq):  # sin(r) / r
    return _of_square(sq, lambda s: 1 - s / 6 * (1 - s / 20 * (1 - s / 42)), lambda r: jnp.sin(r) / r)


@jax.tree_util.register_static  # a pytree without leaves: every field is static
@dataclasses.dataclass(frozen=True, kw_only=True)
class Sphere(Manifold):
    """The unit sphere S^{D-1} = {x in R^D : |x| = 1} with the metric of R^D; base distribution uniform.

    exp_x(u) = cos|u| x + sin|u| u / |u|,
    log_x(y) = theta v / |v|  with  v = y - ⟨x, y⟩ x,  theta = d(x, y) = atan2(|v|, ⟨x, y⟩),
    projx(x) = x / |x|,  proju(x, u) = u - ⟨x, u⟩ x,  ⟨u, v⟩_x = u . v,
    log p(x) = -log |S^{D-1}|,  |S^{D-1}| = 2 pi^{D/2} / Gamma(D/2)  (S^2: -log(4 pi)).

    The atan2 form keeps d(x, y) accurate near 0 and near pi (where arccos(⟨x, y⟩) is not); log_x is
    undefined at the antipode y = -x. ``normals``: n = c = x.

    Args:
      dim: the ambient size D (>= 2), if fixed (checked by every method; needed in a ``Product``).

    >>> import jax, jax.numpy as jnp
    >>> x = Sphere().base_sample(jax.random.key(0), (4, 3))
    >>> bool(jnp.allclose(jnp.linalg.norm(x, axis=-1), 1.0))
    True
    >>> bool(jnp.allclose(Sphere().base_log_prob(x), -jnp.log(4 * jnp.pi)))
    True
    """

    codimension: ClassVar[int] = 1
    min_dim: ClassVar[int] = 2
    dim: int | None = None

    def _expmap(self, x, u):
        sq = _dot(u, u)[..., None]
        return _cos(sq) * x + _sinc(sq) * u

    def _angle(self, x, y):
        """(theta, v, |v|): the angle between x and y, and y's component v orthogonal to x."""
        cos_theta = _dot(x, y)[..., None]
        v = y - cos_theta * x
        sin_theta = _safe_norm(v)[..., None]
        return jnp.arctan2(sin_theta, cos_theta), v, sin_theta

    def _logmap(self, x, y):
        theta, v, sin_theta = self._angle(x, y)
        nonzero = sin_theta > 0
        return jnp.where(nonzero, theta / jnp.where(nonzero, sin_theta, 1), 1) * v

    def _dist(self, x, y):
        return self._angle(x, y)[0][..., 0]

    def _projx(self, x):
        norm = _safe_norm(x)[..., None]
        pole = jnp.zeros_like(x).at[..., 0].set(1)  # x = 0 is as near to every point: take e_0
        return jnp.where(norm > 0, x / jnp.where(norm > 0, norm, 1), pole)

    def _proju(self, x, u):
        return u - _dot(x, u)[..., None] * x

    def _normals(self, x):
        return x[..., None, :], x[..., None, :]

    def _base_sample(self, key, shape, dtype):
        return self._projx(jax.random.normal(key, shape, dtype))

    def _base_log_prob(self, x):
        d = x.shape[-1]
        log_area = math.log(2) + d / 2 * math.log(math.pi) - math.lgamma(d / 2)
        return jnp.full(x.shape[:-1], -log_area, x.dtype)

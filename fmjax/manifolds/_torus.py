"""The flat torus [0, 2 pi)^D of angles."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from fmjax.manifolds._base import _LOG_TWO_PI, _TWO_PI, Manifold, _broadcast

__all__ = ["FlatTorus"]


def _wrap(x: jax.Array) -> jax.Array:
    """x mod 2 pi in [0, 2 pi): a tiny negative x, whose mod rounds up to 2 pi, gives 0."""
    x = jnp.mod(x, _TWO_PI)
    return jnp.where(x >= _TWO_PI, x - _TWO_PI, x)


@jax.tree_util.register_static  # a pytree without leaves: every field is static
@dataclasses.dataclass(frozen=True, kw_only=True)
class FlatTorus(Manifold):
    """The flat torus [0, 2 pi)^D (angles, each coordinate mod 2 pi) with the metric of R^D; base
    distribution uniform.

    exp_x(u) = (x + u) mod 2 pi,  log_x(y) = (y - x) wrapped into [-pi, pi) per coordinate,
    projx(x) = x mod 2 pi,  proju(x, u) = u,  d(x, y) = |log_x(y)|,  ⟨u, v⟩_x = u . v,
    log p(x) = -D log(2 pi).

    Args:
      dim: the number D of angles, if fixed (checked by every method; needed in a ``Product``).

    >>> import jax.numpy as jnp
    >>> u = FlatTorus().logmap(jnp.array([0.1]), jnp.array([2 * jnp.pi - 0.1]))  # the short way round
    >>> bool(jnp.allclose(u, -0.2))
    True
    """

    dim: int | None = None

    def _expmap(self, x, u):
        return _wrap(x + u)

    def _logmap(self, x, y):
        return _wrap(y - x + math.pi) - math.pi

    def _projx(self, x):
        return _wrap(x)

    def _proju(self, x, u):
        return _broadcast(x, u)

    def _base_sample(self, key, shape, dtype):
        return _wrap(jax.random.uniform(key, shape, dtype, 0, _TWO_PI))

    def _base_log_prob(self, x):
        return jnp.full(x.shape[:-1], -x.shape[-1] * _LOG_TWO_PI, x.dtype)

"""Euclidean space R^D as a manifold."""

from __future__ import annotations

import dataclasses

import jax

from fmjax.manifolds._base import _LOG_TWO_PI, Manifold, _broadcast, _dot, _safe_norm

__all__ = ["Euclidean"]


@jax.tree_util.register_static  # a pytree without leaves: every field is static
@dataclasses.dataclass(frozen=True, kw_only=True)
class Euclidean(Manifold):
    """Euclidean space R^D with the standard metric; base distribution N(0, I).

    exp_x(u) = x + u,  log_x(y) = y - x,  d(x, y) = |y - x|,  ⟨u, v⟩_x = u . v,
    log p(x) = -|x|^2 / 2 - (D / 2) log(2 pi).

    Args:
      dim: the size D of the last axis, if fixed (checked by every method; needed in a ``Product``).

    >>> import jax.numpy as jnp
    >>> Euclidean().dist(jnp.zeros(2), jnp.array([3.0, 4.0])).tolist()
    5.0
    """

    dim: int | None = None

    def _expmap(self, x, u):
        return x + u

    def _logmap(self, x, y):
        return y - x

    def _projx(self, x):
        return x

    def _proju(self, x, u):
        return _broadcast(x, u)

    def _dist(self, x, y):
        return _safe_norm(y - x)

    def _base_sample(self, key, shape, dtype):
        return jax.random.normal(key, shape, dtype)

    def _base_log_prob(self, x):
        return -0.5 * _dot(x, x) - 0.5 * x.shape[-1] * _LOG_TWO_PI

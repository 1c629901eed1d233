"""What every probability path shares: the ``Path`` interface and the ``PathSample`` it returns."""

from __future__ import annotations

import abc
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fmjax._checks import check_pair, check_unit_interval

__all__ = ["PathSample", "Path"]


class PathSample(NamedTuple):
    """A draw from a conditional probability path.

    Attributes:
      t: times, shape [batch].
      x0: source points, shape [batch, *dims].
      x1: target points, shape [batch, *dims].
      xt: points on the path at time t, shape [batch, *dims].
      ut: conditional velocity d/dt x_t at (t, xt), shape [batch, *dims].
    """

    t: jax.Array
    x0: jax.Array
    x1: jax.Array
    xt: jax.Array
    ut: jax.Array


class Path(abc.ABC):
    """A conditional probability path: ``sample(key, x0, x1, t) -> PathSample(t, x0, x1, xt, ut)``.

    ``AffinePath`` (x_t = a_t x0 + b_t x1 + s_t eps) and ``Geodesic`` (x_t = exp_{x0}(t log_{x0} x1) on a
    manifold) are the two families. ``stochastic`` says whether ``sample`` draws noise from its key.
    """

    stochastic: bool = False

    @abc.abstractmethod
    def sample(self, key: jax.Array | None, x0: jax.Array, x1: jax.Array, t: jax.Array) -> PathSample:
        """Draw x_t and the conditional velocity u_t = d/dt x_t for paired end points x0, x1 [batch, *dims]
        at times t [batch] in [0, 1]."""


def check_times(t, shapes: str) -> jax.Array:
    """``t`` as an array after checking it is real (ints or floats); ``shapes`` says which shapes fit."""
    if not hasattr(t, "shape") and not isinstance(t, int | float):
        raise TypeError(f"t must be a real array of shape {shapes}; got {type(t).__name__}")
    t = jnp.asarray(t)
    if t.dtype == jnp.bool_ or not (
        jnp.issubdtype(t.dtype, jnp.floating) or jnp.issubdtype(t.dtype, jnp.integer)
    ):
        raise TypeError(f"t must be a real array of shape {shapes}; got dtype {t.dtype}")
    return t


def expand(t: jax.Array, x: jax.Array) -> jax.Array:
    """Reshape per-sample t of shape [batch] to broadcast against x of shape [batch, *dims]."""
    return t.reshape(t.shape + (1,) * (x.ndim - 1))


def checked_times(x0: jax.Array, x1: jax.Array, t) -> jax.Array:
    """``t`` checked against the pair (x0, x1): real, shape [batch], in [0, 1]; cast to x0's dtype."""
    check_pair(x0, x1)
    t = check_times(t, "[batch]")
    if t.shape != x0.shape[:1]:
        raise ValueError(f"t must have shape [batch] = {x0.shape[:1]}; got {t.shape}")
    check_unit_interval("t", t)
    return t.astype(x0.dtype)


def static_dataclass(cls):
    """A frozen, keyword-only dataclass registered as a pytree without leaves (all fields static)."""
    cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    jax.tree_util.register_static(cls)
    return cls

"""Time-conditioned MLP velocity field (Flax NNX)."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from fmjax._checks import check_int, lookup

__all__ = ["MLP", "ACTIVATIONS"]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "selu": jax.nn.selu,
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
    "elu": jax.nn.elu,
    "tanh": jnp.tanh,
}
"""Activation functions by name, as accepted by ``MLP(activation=...)``."""


def _rngs(rngs: nnx.Rngs | None, seed: int) -> nnx.Rngs:
    """``rngs`` if given (it must be an ``nnx.Rngs``), else ``nnx.Rngs(seed)`` for an int seed >= 0."""
    if rngs is not None:
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an nnx.Rngs (or None, to use seed); got {type(rngs).__name__}")
        return rngs
    return nnx.Rngs(check_int("seed", seed, low=0))


class MLP(nnx.Module):
    """v_theta(t, x): an MLP on the concatenation [x, t], as in the OT-CFM papers' 2D experiments.

    ``depth`` hidden layers of ``width`` units with ``activation`` after each; the papers' network is
    ``MLP(dim=2, width=64, depth=3, activation="selu")``. Inputs of any shape [batch, *dims] are
    flattened to [batch, dim] with dim = prod(dims) and the output is reshaped back.

    Args:
      dim: number of data dimensions, prod(dims).
      width: units per hidden layer.
      depth: number of hidden layers (>= 1).
      activation: a name from ``ACTIVATIONS``.
      seed: seed for the initial weights (or pass ``rngs``).
      rngs: an ``nnx.Rngs``; overrides ``seed``.
    """

    def __init__(
        self,
        *,
        dim: int,
        width: int = 64,
        depth: int = 3,
        activation: str = "selu",
        seed: int = 0,
        rngs: nnx.Rngs | None = None,
    ):
        dim = check_int("dim", dim, low=1)
        width = check_int("width", width, low=1)
        depth = check_int("depth", depth, low=1)
        self.activation_name = activation
        self.activation = lookup("activation", activation, ACTIVATIONS)
        rngs = _rngs(rngs, seed)
        sizes = [dim + 1] + [width] * depth
        self.hidden = nnx.List(
            [nnx.Linear(m, n, rngs=rngs) for m, n in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        self.out = nnx.Linear(width, dim, rngs=rngs)
        self.dim = dim

    def __call__(self, t: jax.Array, x: jax.Array) -> jax.Array:
        """Velocity at times t (shape [batch] or scalar) and points x (shape [batch, *dims])."""
        batch, dims = x.shape[0], x.shape[1:]
        if math.prod(dims) != self.dim:
            raise ValueError(f"x has {math.prod(dims)} data dimensions per sample, the MLP {self.dim}")
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (batch,))
        h = jnp.concatenate([x.reshape(batch, self.dim), t[:, None]], axis=-1)
        for layer in self.hidden:
            h = self.activation(layer(h))
        return self.out(h).reshape(x.shape)

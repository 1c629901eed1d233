"""Time-conditioned MLP velocity field (Flax NNX)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fmjax._checks import check_int, lookup
from fmjax.models.condition import Conditioned, check_condition_sizes

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


class MLP(Conditioned, nnx.Module):
    """v_theta(t, x): an MLP on the concatenation [x, t], as in the OT-CFM papers' 2D experiments.

    ``depth`` hidden layers of ``width`` units with ``activation`` after each; the papers' network is
    ``MLP(dim=2, width=64, depth=3, activation="selu")``. Inputs of any shape [batch, *dims] are
    flattened to [batch, dim] with dim = prod(dims) and the output is reshaped back.

    Conditional (``num_classes`` and/or ``cond_dim`` given): v_theta(t, x, cond), with the condition's
    embedding (``fmjax.models.condition.Condition``: a table of num_classes + 1 rows, the last, id
    ``num_classes``, being the null class; a linear map of the cond_dim features, or a learned null
    vector where ``cond["mask"]`` is 0) added to the first hidden layer's pre-activations.
    ``null_cond()`` is one sample's null condition. Without either, the model and its parameters are
    those of the unconditional MLP (the same seed gives the same weights either way).

    Args:
      dim: number of data dimensions, prod(dims).
      width: units per hidden layer.
      depth: number of hidden layers (>= 1).
      activation: a name from ``ACTIVATIONS``.
      num_classes: number of classes K of a class condition (ids 0..K-1; K is the null class).
      cond_dim: size of a continuous condition (features of shape [batch, cond_dim]).
      seed: seed for the initial weights (or pass ``rngs``).
      rngs: an ``nnx.Rngs``; overrides ``seed``.

    >>> import jax.numpy as jnp
    >>> model = MLP(dim=2, width=8, depth=1, num_classes=3)
    >>> model(jnp.zeros(4), jnp.ones((4, 2)), jnp.array([0, 1, 2, 3])).shape  # 3: the null class
    (4, 2)
    >>> int(model.null_cond())
    3
    """

    def __init__(
        self,
        *,
        dim: int,
        width: int = 64,
        depth: int = 3,
        activation: str = "selu",
        num_classes: int | None = None,
        cond_dim: int | None = None,
        seed: int = 0,
        rngs: nnx.Rngs | None = None,
    ):
        dim = check_int("dim", dim, low=1)
        num_classes, cond_dim = check_condition_sizes(num_classes, cond_dim)
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
        # built after the layers above, so their weights are those of the unconditional MLP
        self._add_condition(num_classes, cond_dim, width, rngs)

    def __call__(self, t: jax.Array, x: jax.Array, cond: Any = None) -> jax.Array:
        """Velocity at times t (shape [batch] or scalar) and points x (shape [batch, *dims]), given
        ``cond`` (batch-leading, see the class) for a conditional model."""
        batch, dims = x.shape[0], x.shape[1:]
        if math.prod(dims) != self.dim:
            raise ValueError(f"x has {math.prod(dims)} data dimensions per sample, the MLP {self.dim}")
        check_cond_given(self, cond)
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (batch,))
        h = jnp.concatenate([x.reshape(batch, self.dim), t[:, None]], axis=-1)
        for k, layer in enumerate(self.hidden):
            h = layer(h)
            if k == 0 and self.conditional:
                h = h + self.condition(cond, batch, h.dtype)
            h = self.activation(h)
        return self.out(h).reshape(x.shape)


def check_cond_given(model: nnx.Module, cond: Any) -> None:
    """Raise a TypeError when a conditional model gets no ``cond``, or an unconditional one gets one."""
    name = type(model).__name__
    if model.conditional and cond is None:
        raise TypeError(
            f"this {name} is conditional (num_classes={model.num_classes}, cond_dim={model.cond_dim}) and "
            f"needs cond: {model.condition.describe()}; for no condition pass model.null_cond() for "
            "every sample"
        )
    if not model.conditional and cond is not None:
        raise TypeError(
            f"cond is given, but this {name} is unconditional (built without num_classes or cond_dim); "
            f"build it with num_classes=K or cond_dim=D to condition it"
        )

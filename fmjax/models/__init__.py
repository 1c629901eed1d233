"""Flax NNX velocity fields (MLP, UNet), the bridge to the ``apply_fn(params, t, x)`` contract, and
mixed precision (bfloat16 activations, float32 parameters) for any such ``apply_fn``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from fmjax.models.mlp import ACTIVATIONS, MLP
from fmjax.models.precision import mixed_precision
from fmjax.models.unet import UNet

__all__ = ["MLP", "UNet", "ACTIVATIONS", "functional", "mixed_precision"]


def functional(model: nnx.Module) -> tuple[Callable[..., jax.Array], Any]:
    """Split an NNX model into ``(apply_fn, params)``.

    ``params`` is a plain nested dict of arrays (ready for optax and orbax); ``apply_fn(params, t, x)``
    rebuilds the module from them and calls it. Use it with ``cfm_loss``, ``make_train_step`` and
    ``fmjax.as_velocity``. For a conditional model (one whose ``conditional`` attribute is true, e.g.
    ``MLP(..., num_classes=10)``) it is ``apply_fn(params, t, x, cond)``; use it with ``cfm_loss(...,
    cond=...)`` and ``fmjax.guided_velocity``.

    >>> import jax.numpy as jnp
    >>> apply_fn, params = functional(MLP(dim=2, width=8, depth=1, num_classes=3))
    >>> apply_fn(params, jnp.zeros(2), jnp.ones((2, 2)), jnp.array([0, 3])).shape
    (2, 2)
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a Flax NNX module, e.g. MLP(dim=2); got {type(model).__name__}")
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)

    if getattr(model, "conditional", False):

        def conditional_apply_fn(params: Any, t: jax.Array, x: jax.Array, cond: Any) -> jax.Array:
            return nnx.merge(graphdef, params)(t, x, cond)

        return conditional_apply_fn, params

    def apply_fn(params: Any, t: jax.Array, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params)(t, x)

    return apply_fn, params

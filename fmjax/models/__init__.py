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


def functional(model: nnx.Module) -> tuple[Callable[[Any, jax.Array, jax.Array], jax.Array], Any]:
    """Split an NNX model into ``(apply_fn, params)``.

    ``params`` is a plain nested dict of arrays (ready for optax and orbax); ``apply_fn(params, t, x)``
    rebuilds the module from them and calls it. Use it with ``cfm_loss``, ``make_train_step`` and
    ``fmjax.as_velocity``.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a Flax NNX module, e.g. MLP(dim=2); got {type(model).__name__}")
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)

    def apply_fn(params: Any, t: jax.Array, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params)(t, x)

    return apply_fn, params

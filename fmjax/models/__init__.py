"""Flax NNX velocity fields (MLP, UNet; any network made tangent to a manifold: TangentField), the bridge
to the ``apply_fn(params, t, x)`` contract, and mixed precision (bfloat16 activations, float32
parameters) for any such ``apply_fn``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from fmjax.models.mlp import ACTIVATIONS, MLP
from fmjax.models.precision import mixed_precision
from fmjax.models.tangent import TangentField, embedded_size
from fmjax.models.unet import UNet

__all__ = ["MLP", "UNet", "TangentField", "embedded_size", "ACTIVATIONS", "functional", "mixed_precision"]


def functional(model: nnx.Module) -> tuple[Callable[..., jax.Array], Any]:
    """Split an NNX model into ``(apply_fn, params)``.

    ``params`` is a plain nested dict of arrays (ready for optax and orbax); ``apply_fn(params, t, x)``
    rebuilds the module from them and calls it. Use it with ``cfm_loss``, ``make_train_step`` and
    ``fmjax.as_velocity``. For a conditional model (one whose ``conditional`` attribute is true, e.g.
    ``MLP(..., num_classes=10)``) it is ``apply_fn(params, t, x, cond)``; use it with ``cfm_loss(...,
    cond=...)`` and ``fmjax.guided_velocity``.

    ``apply_fn`` is deterministic. For a model with dropout (``UNet(..., dropout=p)``) it also takes a
    keyword ``dropout_key`` (one PRNG key): ``apply_fn(params, t, x, dropout_key=key)`` is the training
    mode, with dropout masks drawn from ``key``. Such an ``apply_fn`` has the attribute
    ``takes_dropout_key`` set to True (False for models without dropout or with p = 0), and
    ``make_train_step`` then passes a fresh key at every step; sampling, likelihoods and evaluation
    call it without one.

    >>> import jax, jax.numpy as jnp
    >>> apply_fn, params = functional(MLP(dim=2, width=8, depth=1, num_classes=3))
    >>> apply_fn(params, jnp.zeros(2), jnp.ones((2, 2)), jnp.array([0, 3])).shape
    (2, 2)
    >>> apply_fn, params = functional(UNet(channels=4, groups=2, dropout=0.5))
    >>> t, x = jnp.zeros(2), jnp.ones((2, 8, 8, 1))
    >>> apply_fn.takes_dropout_key, bool((apply_fn(params, t, x) == apply_fn(params, t, x)).all())
    (True, True)
    >>> bool((apply_fn(params, t, x, dropout_key=jax.random.key(0)) == apply_fn(params, t, x)).all())
    False
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a Flax NNX module, e.g. MLP(dim=2); got {type(model).__name__}")
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    # models with a dropout rate whose call takes dropout_key= (UNet); others refuse a key
    has_dropout = isinstance(getattr(model, "dropout", None), float) and (
        "dropout_key" in inspect.signature(type(model).__call__).parameters
    )
    name = type(model).__name__

    def call(params: Any, args: tuple[Any, ...], dropout_key: jax.Array | None) -> jax.Array:
        module = nnx.merge(graphdef, params)
        if dropout_key is None:
            return module(*args)
        if not has_dropout:
            raise TypeError(
                f"dropout_key is for a model with dropout, e.g. UNet(dropout=0.1); {name} has none"
            )
        return module(*args, dropout_key=dropout_key)

    if getattr(model, "conditional", False):

        def conditional_apply_fn(
            params: Any, t: jax.Array, x: jax.Array, cond: Any, *, dropout_key: jax.Array | None = None
        ) -> jax.Array:
            return call(params, (t, x, cond), dropout_key)

        apply_fn = conditional_apply_fn
    else:

        def apply_fn(
            params: Any, t: jax.Array, x: jax.Array, *, dropout_key: jax.Array | None = None
        ) -> jax.Array:
            return call(params, (t, x), dropout_key)

    apply_fn.takes_dropout_key = has_dropout and model.dropout > 0
    return apply_fn, params

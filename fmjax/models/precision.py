"""Mixed precision for ``apply_fn(params, t, x, *rest)``: float32 parameters, low-precision activations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["mixed_precision"]


def mixed_precision(
    apply_fn: Callable[..., jax.Array], compute_dtype: Any = jnp.bfloat16
) -> Callable[..., jax.Array]:
    """Wrap ``apply_fn(params, t, x, *rest) -> v`` to compute in ``compute_dtype`` and return float32.

    The wrapped function casts every floating leaf of ``params`` (integer leaves are left alone), the
    times ``t`` (shape [batch] or scalar) and the points ``x`` (shape [batch, *dims]) to ``compute_dtype``,
    passes ``rest`` (e.g. a condition) and keyword arguments (e.g. ``dropout_key``) unchanged, calls
    ``apply_fn`` and returns ``v`` (shape of ``x``) cast to float32; ``apply_fn.takes_dropout_key`` is
    kept, so ``make_train_step`` still trains a model's dropout. Parameters, optimiser state and EMA
    stay float32 where they live (the train state); only the activations are low precision. The
    casts are differentiable, so gradients with respect to float32 parameters come back float32.

    bfloat16 keeps float32's exponent range with an 8-bit significand (relative rounding 2^-9), so
    outputs differ from the float32 model's by about 1% of their scale. Times in bfloat16 are
    quantised to steps of 2^-9..2^-8 near t = 1.

    Args:
      apply_fn: a model called as ``apply_fn(params, t, x, *rest)``, e.g. from ``functional``.
      compute_dtype: a floating dtype for the computation: bfloat16 (default) or float16.

    >>> import jax.numpy as jnp
    >>> from fmjax.models import MLP, functional
    >>> apply_fn, params = functional(MLP(dim=2, width=16, depth=2))
    >>> v = mixed_precision(apply_fn)(params, jnp.full(4, 0.5), jnp.ones((4, 2)))
    >>> v.shape, v.dtype, params["out"]["kernel"].dtype
    ((4, 2), dtype('float32'), dtype('float32'))
    """
    if not callable(apply_fn):
        raise TypeError(
            f"apply_fn must be a function apply_fn(params, t, x, ...); got {type(apply_fn).__name__}"
        )
    try:
        compute_dtype = jnp.dtype(compute_dtype)
    except TypeError:
        compute_dtype = None
    if compute_dtype is None or not jnp.issubdtype(compute_dtype, jnp.floating):
        raise TypeError(f"compute_dtype must be a floating dtype such as jnp.bfloat16; got {compute_dtype!r}")

    def cast(leaf: Any) -> Any:
        leaf = jnp.asarray(leaf)
        return leaf.astype(compute_dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

    def mixed_apply_fn(params: Any, t: jax.Array, x: jax.Array, *rest: Any, **kwargs: Any) -> jax.Array:
        x = jnp.asarray(x).astype(compute_dtype)
        v = apply_fn(jax.tree.map(cast, params), cast(t), x, *rest, **kwargs)
        return v.astype(jnp.float32)

    if hasattr(apply_fn, "takes_dropout_key"):
        mixed_apply_fn.takes_dropout_key = apply_fn.takes_dropout_key
    return mixed_apply_fn

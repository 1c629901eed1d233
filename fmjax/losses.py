"""The conditional flow matching loss, as a pure function.

    L(theta) = E_{t, (x0, x1) ~ pi, eps} || v_theta(t, x_t) - u_t(x_t | x0, x1) ||^2

with (x0, x1) drawn from a coupling pi of the two batches, t from a time sampler and (x_t, u_t) from a
probability path. The squared error is averaged over the batch and over every data dimension.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fmjax._checks import check_pair
from fmjax._time import uniform
from fmjax.couplings import Coupling, independent
from fmjax.paths import AffinePath, PathSample

__all__ = ["LossAux", "cfm_loss"]

ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


class LossAux(NamedTuple):
    """What ``cfm_loss`` computed on the way, for logging or for further loss terms.

    Attributes:
      sample: the ``PathSample`` (t, x0, x1, xt, ut) of the coupled pairs.
      velocity: the model's prediction v_theta(t, xt), shape [batch, *dims].
      pairs: the coupling's (i, j); the pairs are (x0[i], x1[j]) of the batches given to the loss.
    """

    sample: PathSample
    velocity: jax.Array
    pairs: tuple[jax.Array, jax.Array]


def _split_key(key: jax.Array, coupling_random: bool, path_random: bool):
    """Keys for the time sampler, the coupling and the path; split only as many as are drawn from."""
    if not (coupling_random or path_random):
        return key, None, None
    keys = list(jax.random.split(key, 1 + coupling_random + path_random))
    return keys.pop(0), keys.pop(0) if coupling_random else None, keys.pop(0) if path_random else None


def cfm_loss(
    apply_fn: ApplyFn,
    params: Any,
    key: jax.Array,
    x0: jax.Array,
    x1: jax.Array,
    *,
    path: AffinePath,
    coupling: Coupling = independent(),
    time_sampler: Callable[..., jax.Array] = uniform,
) -> tuple[jax.Array, LossAux]:
    """Conditional flow matching loss for one batch.

    Args:
      apply_fn: model, called as ``apply_fn(params, t, xt)`` with t of shape [batch].
      params: the model's parameters (any pytree).
      key: PRNG key for the times and, where they draw random numbers, the coupling and the path.
      x0: source batch, shape [batch, *dims].
      x1: target batch, same shape.
      path: a probability path, e.g. ``fmjax.paths.Linear(sigma=0.0)``.
      coupling: pairs the two batches (default: independent).
      time_sampler: ``time_sampler(key, n, dtype) -> t`` (default: uniform on [0, 1)).

    Returns:
      ``(loss, aux)``: the scalar mean squared error and a ``LossAux``.

    >>> import jax, jax.numpy as jnp
    >>> from fmjax.paths import Linear
    >>> apply_fn = lambda params, t, x: params * x
    >>> x = jnp.ones((8, 2))
    >>> loss, aux = cfm_loss(apply_fn, 0.0, jax.random.key(0), 0 * x, x, path=Linear())
    >>> float(loss)  # u_t = x1 - x0 = 1 and the model predicts 0
    1.0
    """
    check_pair(x0, x1)
    key_time, key_coupling, key_path = _split_key(key, coupling.uses_key, path.stochastic)
    x0, x1, pairs = coupling.apply(key_coupling, x0, x1)
    t = time_sampler(key_time, x0.shape[0], x0.dtype)
    sample = path.sample(key_path, x0, x1, t)
    velocity = apply_fn(params, sample.t, sample.xt)
    loss = jnp.mean(jnp.square(velocity - sample.ut))
    return loss, LossAux(sample=sample, velocity=velocity, pairs=pairs)

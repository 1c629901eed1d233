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

from fmjax._checks import (
    check_callable,
    check_key,
    check_output,
    check_pair,
    check_unit_interval,
    resolve_coupling,
    resolve_path,
    resolve_time_sampler,
)
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
      status: the coupling's status when it reports one (``coupling.apply_with_status``):
        ``"coupling_converged"`` (bool scalar) and ``"coupling_error"`` (float32 scalar); an empty
        dict for couplings without it. ``aux["coupling_converged"]`` reads the same entries.
    """

    sample: PathSample
    velocity: jax.Array
    pairs: tuple[jax.Array, jax.Array]
    status: dict[str, jax.Array]

    def __getitem__(self, key):
        """``aux["coupling_converged"]`` is ``aux.status["coupling_converged"]``; ints index the tuple."""
        if isinstance(key, str):
            return self.status[key]
        return tuple.__getitem__(self, key)


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
    path: AffinePath | str,
    coupling: Coupling | str = independent(),
    time_sampler: Callable[..., jax.Array] | str = uniform,
) -> tuple[jax.Array, LossAux]:
    """Conditional flow matching loss for one batch:

        L = mean_{k, d} (v_theta(t_k, x_t[k])_d - u_t[k]_d)^2

    over the coupled pairs k and every data dimension d, with t from ``time_sampler`` and
    (x_t, u_t) from ``path.sample``.

    Args:
      apply_fn: model, called as ``apply_fn(params, t, xt)`` with t of shape [batch]; it must return
        a real floating array of xt's shape [batch, *dims] (checked at trace time, the error names
        ``apply_fn``).
      params: the model's parameters (any pytree).
      key: one PRNG key for the times and, where they draw random numbers, the coupling and the path.
      x0: source batch, shape [batch, *dims], batch >= 1 (an empty batch raises: its mean is NaN).
      x1: target batch, same shape.
      path: a probability path, e.g. ``fmjax.paths.Linear(sigma=0.0)``, or a name of
        ``fmjax.paths.PATHS`` (e.g. ``"condot"``), built with its defaults by ``make_path``.
      coupling: pairs the two batches (default: independent), or a name of
        ``fmjax.couplings.COUPLINGS`` built with its defaults by ``make_coupling`` (e.g. ``"exact"``).
      time_sampler: ``time_sampler(key, n, dtype) -> t`` of shape [n] in [0, 1] (default: uniform on
        [0, 1)), or a name of ``TIME_SAMPLERS`` (e.g. ``"logit_normal"``).

    Returns:
      ``(loss, aux)``: the scalar mean squared error and a ``LossAux``; with a coupling that reports
      a status (``apply_with_status``), ``aux.status`` holds ``coupling_converged`` and
      ``coupling_error``.

    Times outside [0, 1] from ``time_sampler`` raise outside jit; under jit they are not checked.

    >>> import jax, jax.numpy as jnp
    >>> from fmjax.paths import Linear
    >>> apply_fn = lambda params, t, x: params * x
    >>> x = jnp.ones((8, 2))
    >>> loss, aux = cfm_loss(apply_fn, 0.0, jax.random.key(0), 0 * x, x, path=Linear())
    >>> float(loss)  # u_t = x1 - x0 = 1 and the model predicts 0
    1.0
    >>> float(cfm_loss(apply_fn, 0.0, jax.random.key(0), 0 * x, x, path="linear")[0])
    1.0
    """
    check_callable("apply_fn", apply_fn, ("params", "t", "x"))
    path = resolve_path(path)
    coupling = resolve_coupling(coupling)
    time_sampler = resolve_time_sampler(time_sampler)
    check_key("key", key)
    check_pair(x0, x1)
    key_time, key_coupling, key_path = _split_key(key, coupling.uses_key, path.stochastic)
    with_status = getattr(coupling, "apply_with_status", None)
    if with_status is not None:
        x0c, x1c, pairs, status = with_status(key_coupling, x0, x1)
        status = dict(status)
    else:
        (x0c, x1c, pairs), status = coupling.apply(key_coupling, x0, x1), {}
    for name, before, after in (("x0", x0, x0c), ("x1", x1, x1c)):
        if after.shape != before.shape:
            raise ValueError(
                f"coupling must return pairs of the batches' shape {before.shape}; its {name} has shape "
                f"{after.shape} (the index arrays (i, j) must have shape [batch])"
            )
    t = time_sampler(key_time, x0c.shape[0], x0c.dtype)
    check_output("time_sampler(key, n, dtype)", t, x0c.shape[:1], "[n], one time per sample,")
    check_unit_interval("time_sampler(key, n, dtype)", t)
    sample = path.sample(key_path, x0c, x1c, t)
    velocity = apply_fn(params, sample.t, sample.xt)
    check_output("apply_fn(params, t, x)", velocity, sample.xt.shape, "[batch, *dims], the shape of x")
    loss = jnp.mean(jnp.square(velocity - sample.ut))
    return loss, LossAux(sample=sample, velocity=velocity, pairs=pairs, status=status)

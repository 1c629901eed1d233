"""Time samplers: ``sampler(key, n, dtype=jnp.float32) -> t`` of shape [n] in [0, 1].

Re-exported from ``fmjax.training``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fmjax._checks import check_callable, check_int, check_key, check_real, lookup

__all__ = ["uniform", "LogitNormal", "logit_normal", "TIME_SAMPLERS", "resolve_time_sampler"]


def _check_draw(key: jax.Array, n: int, dtype) -> tuple[int, jnp.dtype]:
    """Check a sampler's arguments: one PRNG key, n >= 1, a floating dtype."""
    check_key("key", key)
    n = check_int("n", n, low=1)
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype such as jnp.float32; got {dtype!r}")
    return n, dtype


def uniform(key: jax.Array, n: int, dtype=jnp.float32) -> jax.Array:
    """Draw n >= 1 times i.i.d. from U[0, 1), shape [n] of the floating ``dtype``.

    >>> import jax
    >>> t = uniform(jax.random.key(0), 5)
    >>> t.shape, bool(((t >= 0) & (t < 1)).all())
    ((5,), True)
    """
    n, dtype = _check_draw(key, n, dtype)
    return jax.random.uniform(key, (n,), dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogitNormal:
    """Times t = sigmoid(z), z ~ N(mean, std^2) (Esser et al.): more weight in the middle of the path."""

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "mean", check_real("mean", self.mean))
        object.__setattr__(self, "std", check_real("std", self.std, low=0.0, low_inclusive=False))

    def __call__(self, key: jax.Array, n: int, dtype=jnp.float32) -> jax.Array:
        """Draw n >= 1 times, shape [n] of the floating ``dtype``, in (0, 1)."""
        n, dtype = _check_draw(key, n, dtype)
        z = self.mean + self.std * jax.random.normal(key, (n,), dtype)
        return jax.nn.sigmoid(z)


jax.tree_util.register_static(LogitNormal)


def logit_normal(*, mean: float = 0.0, std: float = 1.0) -> LogitNormal:
    """Return the logit-normal time sampler with location ``mean`` and scale ``std``."""
    return LogitNormal(mean=mean, std=std)


TIME_SAMPLERS = {"uniform": lambda: uniform, "logit_normal": logit_normal, "logit-normal": logit_normal}
"""Time-sampler factories by name, as accepted by the CLI's ``--time-sampler``."""


def resolve_time_sampler(time_sampler: Any, name: str = "time_sampler") -> Any:
    """A time sampler ``(key, n, dtype) -> t`` from a callable or a name in ``TIME_SAMPLERS``."""
    if isinstance(time_sampler, str):
        return lookup(name, time_sampler, TIME_SAMPLERS)()
    hint = " (a factory such as fmjax.logit_normal must be called first: fmjax.logit_normal())"
    check_callable(name, time_sampler, ("key", "n", "dtype"), hint=hint)
    return time_sampler

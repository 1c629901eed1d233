"""Time samplers: ``sampler(key, n, dtype=jnp.float32) -> t`` of shape [n] in [0, 1].

Re-exported from ``fmjax.training``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fmjax._checks import check_real

__all__ = ["uniform", "LogitNormal", "logit_normal", "TIME_SAMPLERS"]


def uniform(key: jax.Array, n: int, dtype=jnp.float32) -> jax.Array:
    """Draw n times i.i.d. from U[0, 1)."""
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
        z = self.mean + self.std * jax.random.normal(key, (n,), dtype)
        return jax.nn.sigmoid(z)


jax.tree_util.register_static(LogitNormal)


def logit_normal(*, mean: float = 0.0, std: float = 1.0) -> LogitNormal:
    """Return the logit-normal time sampler with location ``mean`` and scale ``std``."""
    return LogitNormal(mean=mean, std=std)


TIME_SAMPLERS = {"uniform": lambda: uniform, "logit_normal": logit_normal}
"""Time-sampler factories by name, as accepted by the CLI's ``--time-sampler``."""

"""Two-dimensional toy distributions, drawn i.i.d. in JAX.

Every sampler is ``sampler(key, n) -> [n, 2] float32``; points are independent draws, never an
ordered sweep, so any slice of a batch has the full distribution. Definitions:

- ``gaussian``: N(0, I).
- ``8gaussians``: mixture of 8 equal-weight Gaussians centred at 5 (cos k pi/4, sin k pi/4), each
  with covariance sqrt(0.1) I (std 0.562); the TorchCFM tutorial's source.
- ``moons``: two interleaved half circles, 3 m - 1 with m the unit moons (the outer (cos a, sin a)
  and the inner (1 - cos a, 0.5 - sin a), a ~ U[0, pi], moon chosen with probability 1/2) plus
  N(0, 0.2^2 I) noise before scaling; the TorchCFM tutorial's target.
- ``scurve``: the 2D S curve (sin a, sign(a) (cos a - 1)) with a ~ U[-3 pi/2, 3 pi/2], plus
  N(0, 0.1^2 I) noise, scaled by 2.
- ``checkerboard``: uniform on the 8 dark squares of a 4x4 board of side 2 over [-4, 4]^2.

Labelled draws (``sample_labeled``, for conditional training) give each point the class it was drawn
from: the mixture component 0..7 of ``8gaussians`` (component k centred at angle k pi/4), the moon of
``moons`` (0 outer, 1 inner) and the square of ``checkerboard`` (0..7, column-major over the dark
squares). The points are those ``sample`` draws from the same key.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fmjax._checks import check_int, lookup

__all__ = [
    "TOY_SAMPLERS",
    "TOY_LOG_DENSITIES",
    "TOY_NUM_CLASSES",
    "sample",
    "sample_labeled",
    "log_density",
]


def _gaussian(key, n):
    return jax.random.normal(key, (n, 2), jnp.float32)


def _eight_gaussians_labeled(key, n):
    k_mode, k_noise = jax.random.split(key)
    labels = jax.random.randint(k_mode, (n,), 0, 8)
    angles = labels * (math.pi / 4)
    centers = 5.0 * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    points = centers.astype(jnp.float32) + 0.1**0.25 * jax.random.normal(k_noise, (n, 2), jnp.float32)
    return points, labels.astype(jnp.int32)


def _eight_gaussians(key, n):
    return _eight_gaussians_labeled(key, n)[0]


def _moons_labeled(key, n):
    k_moon, k_angle, k_noise = jax.random.split(key, 3)
    a = jax.random.uniform(k_angle, (n,), jnp.float32, maxval=math.pi)
    outer = jnp.stack([jnp.cos(a), jnp.sin(a)], axis=-1)
    inner = jnp.stack([1 - jnp.cos(a), 0.5 - jnp.sin(a)], axis=-1)
    which = jax.random.bernoulli(k_moon, 0.5, (n, 1))
    points = jnp.where(which, inner, outer) + 0.2 * jax.random.normal(k_noise, (n, 2), jnp.float32)
    return 3.0 * points - 1.0, which[:, 0].astype(jnp.int32)


def _moons(key, n):
    return _moons_labeled(key, n)[0]


def _scurve(key, n):
    k_angle, k_noise = jax.random.split(key)
    a = jax.random.uniform(k_angle, (n,), jnp.float32, minval=-1.5 * math.pi, maxval=1.5 * math.pi)
    points = jnp.stack([jnp.sin(a), jnp.sign(a) * (jnp.cos(a) - 1)], axis=-1)
    return 2.0 * (points + 0.1 * jax.random.normal(k_noise, (n, 2), jnp.float32))


def _checkerboard(key, n):
    k_x, k_y, k_row = jax.random.split(key, 3)
    x = jax.random.uniform(k_x, (n,), jnp.float32, minval=-2.0, maxval=2.0)
    y = jax.random.uniform(k_y, (n,), jnp.float32) - 2.0 * jax.random.randint(k_row, (n,), 0, 2).astype(
        jnp.float32
    )
    y = y + jnp.floor(x) % 2
    return 2.0 * jnp.stack([x, y], axis=-1)


def _checkerboard_labeled(key, n):
    points = _checkerboard(key, n)
    # column 0..3 and row 0..3 of the board; each column holds two dark squares, one in each row pair
    column = jnp.clip(jnp.floor(points[:, 0] / 2.0) + 2, 0, 3).astype(jnp.int32)
    row = jnp.clip(jnp.floor(points[:, 1] / 2.0) + 2, 0, 3).astype(jnp.int32)
    return points, 2 * column + row // 2


TOY_SAMPLERS: dict[str, Callable[[jax.Array, int], jax.Array]] = {
    "gaussian": _gaussian,
    "8gaussians": _eight_gaussians,
    "moons": _moons,
    "scurve": _scurve,
    "checkerboard": _checkerboard,
}
"""The 2D samplers by name."""

_LABELED: dict[str, tuple[Callable[[jax.Array, int], tuple[jax.Array, jax.Array]], int]] = {
    "8gaussians": (_eight_gaussians_labeled, 8),
    "moons": (_moons_labeled, 2),
    "checkerboard": (_checkerboard_labeled, 8),
}

TOY_NUM_CLASSES: dict[str, int] = {name: classes for name, (_, classes) in _LABELED.items()}
"""The classes of the toy distributions that have labels (for conditional training)."""


def sample(name: str, key: jax.Array, n: int) -> jax.Array:
    """Draw ``n`` i.i.d. points [n, 2] (float32) from the toy distribution ``name``."""
    check_int("n", n, low=1)
    return lookup("name", name, TOY_SAMPLERS)(key, n)


def sample_labeled(name: str, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Draw ``n`` points [n, 2] (float32) of ``name`` with their class labels [n] (int32).

    The points are those ``sample(name, key, n)`` draws; ``name`` must be one of ``TOY_NUM_CLASSES``.

    >>> import jax
    >>> points, labels = sample_labeled("moons", jax.random.key(0), 4)
    >>> bool((points == sample("moons", jax.random.key(0), 4)).all()), labels.dtype.name
    (True, 'int32')
    """
    check_int("n", n, low=1)
    if name in TOY_SAMPLERS and name not in _LABELED:
        raise ValueError(f"{name!r} has no class labels; labelled: {', '.join(TOY_NUM_CLASSES)}")
    return lookup("name", name, {k: f for k, (f, _) in _LABELED.items()})(key, n)


def _gaussian_log_density(x):
    return -0.5 * jnp.sum(x * x, axis=-1) - math.log(2 * math.pi)


def _eight_gaussians_log_density(x):
    angles = jnp.arange(8) * (math.pi / 4)
    centers = 5.0 * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    var = 0.1**0.5
    sq = jnp.sum((x[:, None, :] - centers[None].astype(x.dtype)) ** 2, axis=-1)
    return jax.nn.logsumexp(-0.5 * sq / var, axis=1) - math.log(8) - math.log(2 * math.pi * var)


TOY_LOG_DENSITIES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gaussian": _gaussian_log_density,
    "8gaussians": _eight_gaussians_log_density,
}
"""Closed-form log densities (per point, for x of shape [n, 2]) of the toy distributions that have one."""


def log_density(name: str) -> Callable[[jax.Array], jax.Array]:
    """The log density of toy distribution ``name`` (one of ``TOY_LOG_DENSITIES``)."""
    if name in TOY_SAMPLERS and name not in TOY_LOG_DENSITIES:
        raise ValueError(
            f"{name!r} has no closed-form density; sources with one: {', '.join(sorted(TOY_LOG_DENSITIES))}"
        )
    return lookup("name", name, TOY_LOG_DENSITIES)

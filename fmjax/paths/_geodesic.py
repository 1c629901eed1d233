"""The geodesic path of Riemannian flow matching (Chen & Lipman, ICLR 2024) on a manifold."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fmjax.manifolds import Manifold, resolve_manifold
from fmjax.paths._base import Path, PathSample, checked_times, expand, static_dataclass

__all__ = ["Geodesic"]


@static_dataclass
class Geodesic(Path):
    """The geodesic from x0 to x1 on ``manifold``, travelled at constant speed over t in [0, 1]:

        x_t = exp_{x0}(t log_{x0}(x1)),        u_t = d/dt x_t,

    so |u_t|_g = d(x0, x1) for every t. On ``Euclidean()`` it is the straight line of ``Linear()``
    (u_t = x1 - x0); on ``FlatTorus()`` each angle moves the short way round (from 0.1 to 2 pi - 0.1 it
    passes through 0 with u_t = -0.2); on ``Sphere()`` it follows the great circle. u_t is the
    forward-mode derivative of ``manifold.expmap`` in t, a tangent vector at x_t. Where x1 is the cut
    point of x0 (antipodal points on a sphere) the geodesic is not unique and ``logmap`` picks one.

    ``cfm_loss`` takes it like any path and measures the model's error with the manifold's metric,
    |proju(x_t, v) - u_t|_g^2 (mean over the ambient dimensions); ``fmjax.sample(..., manifold=M)`` and
    ``fmjax.log_likelihood(..., manifold=M)`` integrate the trained field on the manifold.

    >>> import jax.numpy as jnp
    >>> from fmjax.manifolds import FlatTorus
    >>> path = Geodesic(manifold=FlatTorus())
    >>> x0, x1 = jnp.array([[0.1]]), jnp.array([[2 * jnp.pi - 0.1]])
    >>> s = path.sample(None, x0, x1, jnp.array([0.25]))
    >>> round(float(s.xt[0, 0]), 6), round(float(s.ut[0, 0]), 6)  # toward 0, the short way
    (0.05, -0.2)
    """

    manifold: Manifold

    def __post_init__(self):
        object.__setattr__(self, "manifold", resolve_manifold(self.manifold, "manifold"))

    def sample(self, key: Any, x0: jax.Array, x1: jax.Array, t: jax.Array) -> PathSample:
        """x_t and u_t at times t [batch] for end points x0, x1 [batch, *dims] on the manifold (the
        path draws no noise: ``key`` is unused and may be None)."""
        del key
        t = checked_times(x0, x1, t)
        direction = self.manifold.logmap(x0, x1)
        te = expand(t, x0)
        xt, ut = jax.jvp(lambda s: self.manifold.expmap(x0, s * direction), (te,), (jnp.ones_like(te),))
        return PathSample(t=t, x0=x0, x1=x1, xt=xt, ut=ut)

"""Probability paths and their conditional vector fields.

Two families. ``Geodesic(manifold)`` follows the manifold's geodesic from x0 to x1 (Riemannian flow
matching). Every other path is affine in its end points plus optional Gaussian noise:

    x_t = a_t x0 + b_t x1 + s_t eps,        eps ~ N(0, I)
    u_t = d/dt x_t = a'_t x0 + b'_t x1 + s'_t eps

with time running from the source x0 (often noise) at t=0 to the data x1 at t=1. A path is a frozen
dataclass that only has to say what ``schedule(t) = (a_t, b_t, s_t)`` and its time derivative are;
sampling and the conversions between velocity, x1-prediction and eps-prediction are derived.

Paths carry no arrays: they are static pytrees, hashable, and can be closed over or passed to jitted
functions freely.

>>> import jax, jax.numpy as jnp
>>> from fmjax.paths import CondOT
>>> path = CondOT(sigma_min=0.0)
>>> x0, x1 = jnp.zeros((4, 2)), jnp.ones((4, 2))
>>> s = path.sample(jax.random.key(0), x0, x1, jnp.full((4,), 0.25))
>>> s.xt[0].tolist(), s.ut[0].tolist()
([0.25, 0.25], [1.0, 1.0])
"""

from fmjax.paths._affine import (
    PATHS,
    SIGMA_FIELDS,
    AffinePath,
    CondOT,
    Linear,
    Schedule,
    SchrodingerBridge,
    VariancePreserving,
    VPDiffusion,
    make_path,
    resolve_path,
)
from fmjax.paths._base import Path, PathSample
from fmjax.paths._geodesic import Geodesic

__all__ = [
    "PathSample",
    "Path",
    "Schedule",
    "AffinePath",
    "CondOT",
    "Linear",
    "SchrodingerBridge",
    "VariancePreserving",
    "VPDiffusion",
    "Geodesic",
    "PATHS",
    "SIGMA_FIELDS",
    "make_path",
    "resolve_path",
]

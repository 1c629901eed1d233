"""Riemannian manifolds for flow matching: exponential and log maps, projections, base distributions.

A manifold M lives in an ambient space R^D: a point is an array whose LAST axis holds its D ambient
coordinates, and every method acts on that axis and broadcasts over the leading ones, so
``M.dist(x[:, None], y[None])`` is the [n, m] matrix of geodesic distances between two batches.

- ``Euclidean()``: R^D itself.
- ``Sphere()``: the unit sphere S^{D-1} in R^D.
- ``FlatTorus()``: [0, 2 pi)^D with the flat metric (angles).
- ``Hyperbolic()``: hyperbolic space H^{D-1} of curvature -1 in the Lorentz (hyperboloid) model in R^D.
- ``Product(*factors)``: a product of manifolds, each on a contiguous slice of the last axis.

D comes from the data unless a manifold is built with ``dim=D`` (its ambient size), which the
factors of a ``Product`` need and which every method then checks.

Riemannian flow matching (Chen & Lipman, "Flow Matching on General Geometries", ICLR 2024) moves a
point along the geodesic x_t = exp_{x0}(t log_{x0}(x1)); a velocity field is evaluated at
``projx(x)`` and projected onto the tangent space there with ``proju``. Densities (``base_log_prob``)
are with respect to the Riemannian volume, and ``normals`` gives what the likelihood needs to turn
the ambient divergence of a tangent field into the Riemannian one.

Manifolds carry no arrays: they are frozen dataclasses registered as static pytrees, hashable, and
can be closed over or passed to jitted functions. All maths is jit- and vmap-able, keeps the input's
dtype, and has finite gradients at the degenerate points (u = 0 in ``expmap``, x = y in ``logmap``
and ``dist``).

>>> import jax.numpy as jnp
>>> from fmjax.manifolds import Sphere
>>> sphere = Sphere()
>>> x, y = jnp.array([1.0, 0.0, 0.0]), jnp.array([0.0, 1.0, 0.0])
>>> u = sphere.logmap(x, y)  # the tangent vector at x pointing to y, of length pi / 2
>>> bool(jnp.isclose(sphere.norm(x, u), jnp.pi / 2)), bool(jnp.allclose(sphere.expmap(x, u), y, atol=1e-6))
(True, True)
>>> sphere.dist(jnp.stack([x, y])[:, None], jnp.stack([x, y, -x])[None]).shape
(2, 3)
"""

from __future__ import annotations

from typing import Any

from fmjax._checks import describe, lookup
from fmjax.manifolds._base import Manifold
from fmjax.manifolds._euclidean import Euclidean
from fmjax.manifolds._hyperbolic import Hyperbolic
from fmjax.manifolds._product import Product
from fmjax.manifolds._sphere import Sphere
from fmjax.manifolds._torus import FlatTorus

__all__ = [
    "Manifold",
    "Euclidean",
    "Sphere",
    "FlatTorus",
    "Hyperbolic",
    "Product",
    "MANIFOLDS",
    "resolve_manifold",
]

MANIFOLDS = {
    "euclidean": Euclidean,
    "sphere": Sphere,
    "flat_torus": FlatTorus,
    "hyperbolic": Hyperbolic,
}
"""Manifold classes by name, as ``resolve_manifold`` accepts them (``Product`` needs its factors)."""


def resolve_manifold(value: Any, name: str = "manifold") -> Manifold:
    """A ``Manifold`` from a manifold or a name in ``MANIFOLDS`` (built with its defaults).

    A manifold class instead of an instance, or anything else, raises a TypeError naming ``name``.

    >>> resolve_manifold("sphere"), resolve_manifold(FlatTorus(dim=2))
    (Sphere(dim=None), FlatTorus(dim=2))
    """
    if isinstance(value, Manifold):
        return value
    if isinstance(value, str):
        return lookup(name, value, MANIFOLDS)()
    if isinstance(value, type) and issubclass(value, Manifold):
        raise TypeError(f"{name} must be a manifold, not a manifold class: call it, e.g. {value.__name__}()")
    names = ", ".join(map(repr, sorted(MANIFOLDS)))
    raise TypeError(
        f"{name} must be an fmjax manifold (e.g. fmjax.manifolds.Sphere()) or one of the names {names}; "
        f"got {describe(value)}"
    )

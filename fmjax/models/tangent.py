"""Any velocity network made a tangent field of a manifold (Flax NNX)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fmjax.manifolds import FlatTorus, Manifold, Product, resolve_manifold

__all__ = ["TangentField", "embedded_size"]


def embedded_size(manifold: Manifold, size: int) -> int:
    """The network's input (and output) size for points of ``size`` coordinates on ``manifold``: twice
    the size on a ``FlatTorus`` (each angle as cos, sin), the factors' sum on a ``Product``, else ``size``."""
    if isinstance(manifold, FlatTorus):
        return 2 * size
    if isinstance(manifold, Product):
        return sum(embedded_size(factor, factor.dim) for factor in manifold.factors)
    return size


def _embed(manifold: Manifold, x: jax.Array) -> jax.Array:
    if isinstance(manifold, FlatTorus):
        return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=-1)
    if isinstance(manifold, Product):
        return jnp.concatenate(
            [_embed(f, part) for f, part in zip(manifold.factors, manifold.split(x), strict=True)], -1
        )
    return x


def _tangent(manifold: Manifold, x: jax.Array, out: jax.Array) -> jax.Array:
    """The network's output ``out`` (in the embedding's coordinates) as a tangent vector at x."""
    if isinstance(manifold, FlatTorus):
        size = x.shape[-1]  # d theta = the output's component along the circle's tangent (-sin, cos)
        return -jnp.sin(x) * out[..., :size] + jnp.cos(x) * out[..., size:]
    if isinstance(manifold, Product):
        sizes = [embedded_size(factor, factor.dim) for factor in manifold.factors]
        outs = jnp.split(out, np.cumsum(sizes)[:-1].tolist(), axis=-1)
        parts = manifold.split(x)
        return jnp.concatenate(
            [_tangent(f, p, o) for f, p, o in zip(manifold.factors, parts, outs, strict=True)], -1
        )
    return manifold.proju(x, out)


class TangentField(nnx.Module):
    """v(t, x) = a network's output made tangent to ``manifold`` M at the point projx(x):

        v(t, x) = T_p(f_theta(t, e(p))),    p = projx(x),

    with e the network's view of a point (the point itself; on a ``FlatTorus`` each angle as
    (cos theta, sin theta), so the field is periodic) and T_p the projection onto the tangent space at
    p (``proju``; on a ``FlatTorus`` the output's component along each circle's tangent
    (-sin theta, cos theta)). ``model`` is any bundled or NNX velocity network ``model(t, e[, cond])``
    whose input and output have ``embedded_size(manifold, D)`` numbers per point, e.g.
    ``MLP(dim=embedded_size(M, D))``. Conditions pass through (``conditional``, ``null_cond``).

    >>> import jax.numpy as jnp
    >>> from fmjax.manifolds import Sphere
    >>> from fmjax.models import MLP
    >>> field = TangentField(MLP(dim=3, width=8, depth=1), Sphere())
    >>> x = jnp.array([[0.0, 0.0, 1.0]])
    >>> float(field(jnp.zeros(1), x)[0, 2])  # tangent at the pole: no vertical component
    0.0
    """

    def __init__(self, model: nnx.Module, manifold: Manifold):
        if not isinstance(model, nnx.Module):
            raise TypeError(f"model must be a Flax NNX module, e.g. MLP(dim=3); got {type(model).__name__}")
        self.model = model
        self.manifold = resolve_manifold(manifold, "manifold")

    @property
    def conditional(self) -> bool:
        """Whether the wrapped network takes a condition."""
        return bool(getattr(self.model, "conditional", False))

    def null_cond(self) -> Any:
        """The wrapped network's null condition (see ``MLP.null_cond``)."""
        return self.model.null_cond()

    def __call__(self, t: jax.Array, x: jax.Array, cond: Any = None) -> jax.Array:
        """The tangent velocity at times t ([batch] or scalar) and points x [batch, D] (projected onto M)."""
        p = self.manifold.projx(x)
        features = _embed(self.manifold, p)
        out = self.model(t, features) if cond is None else self.model(t, features, cond)
        return _tangent(self.manifold, p, out)

"""Products of manifolds, each factor on a contiguous slice of the last axis."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fmjax._checks import describe
from fmjax.manifolds._base import Manifold, _safe_sqrt
from fmjax.manifolds._sphere import Sphere  # noqa: F401  (named by Product's doctest)
from fmjax.manifolds._torus import FlatTorus  # noqa: F401  (named by Product's doctest)

__all__ = ["Product"]


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class Product(Manifold):
    """The product M_1 x ... x M_k: factor i acts on its own contiguous slice of the last axis, in order.

    Every factor needs its ambient size, e.g. ``Product(Sphere(dim=3), FlatTorus(dim=2))`` for points
    of shape [..., 5] on S^2 x T^2. Each method splits x, applies the factors and joins the results:

    exp, log, projx, proju: concatenated;  ⟨u, v⟩_x = sum_i ⟨u_i, v_i⟩_{x_i};
    d(x, y) = sqrt(sum_i d_i(x_i, y_i)^2);  base = the product of the factors' bases,
    log p(x) = sum_i log p_i(x_i);  ``normals``: each factor's, zero outside its slice.

    A ``Product`` among the factors is flattened into its own factors.

    Attributes:
      factors: the factor manifolds, each with ``dim`` set.

    >>> import jax, jax.numpy as jnp
    >>> M = Product(Sphere(dim=3), FlatTorus(dim=2))
    >>> x = M.base_sample(jax.random.key(0), (4, 5))
    >>> bool(jnp.allclose(M.base_log_prob(x), -jnp.log(4 * jnp.pi) - 2 * jnp.log(2 * jnp.pi)))
    True
    """

    factors: tuple[Manifold, ...]

    def __init__(self, *factors: Manifold):
        if not factors:
            raise ValueError(
                "factors must hold at least one manifold, e.g. Product(Sphere(dim=3), FlatTorus(dim=2))"
            )
        flat = []
        for i, factor in enumerate(factors):
            if isinstance(factor, type) and issubclass(factor, Manifold):
                raise TypeError(
                    f"factors[{i}] must be a manifold, not a manifold class: call it with its ambient "
                    f"size, e.g. {factor.__name__}(dim=3)"
                )
            if not isinstance(factor, Manifold):
                raise TypeError(
                    f"factors[{i}] must be an fmjax manifold (e.g. Sphere(dim=3)); got {describe(factor)}"
                )
            if factor.dim is None:
                raise ValueError(
                    f"factors[{i}] must have its ambient size dim set, e.g. {type(factor).__name__}(dim=3): "
                    f"a Product splits the last axis by the factors' sizes; got {factor!r}"
                )
            flat.extend(factor.factors if isinstance(factor, Product) else (factor,))
        object.__setattr__(self, "factors", tuple(flat))

    def __repr__(self) -> str:
        return f"Product({', '.join(map(repr, self.factors))})"

    @property
    def dim(self) -> int:
        """The ambient size D, the sum of the factors' sizes."""
        return sum(factor.dim for factor in self.factors)

    @property
    def codimension(self) -> int:
        """The sum of the factors' codimensions."""
        return sum(factor.codimension for factor in self.factors)

    def _slices(self) -> list[slice]:
        ends = [0]
        for factor in self.factors:
            ends.append(ends[-1] + factor.dim)
        return [slice(a, b) for a, b in zip(ends[:-1], ends[1:], strict=True)]

    def split(self, x: jax.Array) -> list[jax.Array]:
        """Each factor's coordinates of ``x`` [..., D], in factor order."""
        return [x[..., part] for part in self._slices()]

    def _map(self, method: str, *arrays: jax.Array) -> list[jax.Array]:
        """Each factor's ``method`` on its slice of ``arrays``."""
        return [
            getattr(factor, method)(*(a[..., part] for a in arrays))
            for factor, part in zip(self.factors, self._slices(), strict=True)
        ]

    def _join(self, method: str, *arrays: jax.Array) -> jax.Array:
        return jnp.concatenate(self._map(method, *arrays), axis=-1)

    def _expmap(self, x, u):
        return self._join("_expmap", x, u)

    def _logmap(self, x, y):
        return self._join("_logmap", x, y)

    def _projx(self, x):
        return self._join("_projx", x)

    def _proju(self, x, u):
        return self._join("_proju", x, u)

    def _inner(self, x, u, v):
        return sum(self._map("_inner", x, u, v))

    def _dist(self, x, y):
        return _safe_sqrt(sum(jnp.square(d) for d in self._map("_dist", x, y)))

    def _normals(self, x):
        normals, covectors = [], []
        for factor, part in zip(self.factors, self._slices(), strict=True):
            pad = [(0, 0)] * x.ndim + [(part.start, x.shape[-1] - part.stop)]
            for out, vectors in zip((normals, covectors), factor._normals(x[..., part]), strict=True):
                out.append(jnp.pad(vectors, pad))
        return jnp.concatenate(normals, axis=-2), jnp.concatenate(covectors, axis=-2)

    def _base_sample(self, key, shape, dtype):
        keys = jax.random.split(key, len(self.factors))
        return jnp.concatenate(
            [
                factor._base_sample(k, shape[:-1] + (factor.dim,), dtype)
                for factor, k in zip(self.factors, keys, strict=True)
            ],
            axis=-1,
        )

    def _base_log_prob(self, x):
        return sum(self._map("_base_log_prob", x))


jax.tree_util.register_static(Product)

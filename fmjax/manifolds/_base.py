"""What every manifold shares: the ``Manifold`` interface, its argument checks, and the numerical helpers
that keep the maths exact and differentiable at degenerate points (u = 0, x = y)."""

from __future__ import annotations

import abc
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from fmjax._checks import check_int, check_key, describe

__all__ = ["Manifold"]

_TWO_PI = 2 * math.pi
_LOG_TWO_PI = math.log(_TWO_PI)

# Below this squared norm, sin(r)/r, cos(r), sinh(r)/r, ... are evaluated by their Taylor series in r^2
# (truncation error under 1e-20), so they and all their derivatives are exact at r = 0.
_SERIES_BELOW = 1e-4


def _dot(u: jax.Array, v: jax.Array) -> jax.Array:
    return jnp.sum(u * v, axis=-1)


def _safe_sqrt(sq: jax.Array) -> jax.Array:
    """sqrt(max(sq, 0)), with gradient 0 instead of inf or NaN where sq <= 0 (the double-where trick)."""
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1)), 0)


def _safe_norm(u: jax.Array) -> jax.Array:
    """|u| over the last axis, with gradient 0 at u = 0."""
    return _safe_sqrt(_dot(u, u))


def _of_square(sq: jax.Array, series: Callable, exact: Callable) -> jax.Array:
    """f(r) given r^2 = max(sq, 0): ``series(r^2)`` for small r, ``exact(r)`` otherwise.

    Each branch only ever sees inputs in its own range (the double-where trick), so neither can put a
    NaN or inf into the other's gradient.
    """
    sq = jnp.maximum(sq, 0)
    small = sq < _SERIES_BELOW
    return jnp.where(small, series(jnp.where(small, sq, 0)), exact(jnp.sqrt(jnp.where(small, 1, sq))))


def _default_float() -> jnp.dtype:
    """float64 when jax_enable_x64 is on, else float32."""
    return jnp.result_type(float)


def _broadcast(x: jax.Array, u: jax.Array) -> jax.Array:
    """u broadcast to the shape and dtype of x + u."""
    return jnp.broadcast_to(u, jnp.broadcast_shapes(x.shape, u.shape)).astype(jnp.result_type(x, u))


class Manifold(abc.ABC):
    """Base class of Riemannian manifolds embedded in an ambient R^D (points: arrays [..., D]).

    Every method acts on the last axis and broadcasts over the leading ones. The public methods check
    their arguments (floating arrays whose last axes agree and, where the manifold has ``dim`` set,
    equal ``dim``) and call the maths in the underscored methods, which a subclass implements:
    ``_expmap``, ``_logmap``, ``_projx``, ``_proju``, ``_base_sample`` and ``_base_log_prob``; the
    metric (``_inner``, Euclidean by default), ``_dist`` (|log_x(y)| by default) and ``_normals``
    (none by default: codimension 0) are overridden where they differ.

    Attributes:
      codimension: D minus the intrinsic dimension (the number of ``normals``).
      min_dim: the smallest ambient size D the manifold is defined for.
    """

    codimension: ClassVar[int] = 0
    min_dim: ClassVar[int] = 1
    dim: int | None = None  # the ambient size D, if fixed (a dataclass field in each subclass)

    def __post_init__(self) -> None:  # dataclass subclasses: their dim field checked once, here
        self._check_dim_field()

    def _check_dim_field(self) -> None:
        if self.dim is not None:
            object.__setattr__(self, "dim", check_int("dim", self.dim, low=self.min_dim))

    # ------------------------------------------------------------------ argument checks

    def _check_size(self, name: str, size: int, shape: tuple[int, ...]) -> None:
        if self.dim is not None and size != self.dim:
            raise ValueError(
                f"{name} must have a last axis of size {self.dim} (the ambient dimension of {self!r}); "
                f"got shape {shape}"
            )
        if size < self.min_dim:
            raise ValueError(
                f"{name} must have a last axis of size >= {self.min_dim} for {type(self).__name__}; "
                f"got shape {shape}"
            )

    def check_points(self, name: str, x: Any) -> None:
        """Raise a TypeError/ValueError naming ``name`` unless ``x`` is a floating array whose last axis
        this manifold accepts (``dim`` where fixed, at least ``min_dim``)."""
        self._check(**{name: x})

    def _check(self, **arrays: Any) -> list[jax.Array]:
        """The named arrays as jax arrays, after checking they are floating, have a last axis of a size
        this manifold accepts, and agree on it."""
        out, first = [], None
        for name, value in arrays.items():
            if not hasattr(value, "shape") or not hasattr(value, "dtype"):
                raise TypeError(
                    f"{name} must be a floating-point array of shape [..., D] (D ambient coordinates on the "
                    f"last axis); got {describe(value)}"
                )
            if not jnp.issubdtype(value.dtype, jnp.floating):
                raise TypeError(
                    f"{name} must be a floating-point array; got dtype {value.dtype}. Convert it first, "
                    f"e.g. {name}.astype(jnp.float32)"
                )
            shape = tuple(value.shape)
            if not shape:
                raise ValueError(
                    f"{name} must have shape [..., D] with the ambient coordinates on the last axis; "
                    "got a scalar"
                )
            if first is None:
                self._check_size(name, shape[-1], shape)
                first = (name, shape)
            elif shape[-1] != first[1][-1]:
                raise ValueError(
                    f"{name} must have the last axis of {first[0]}, of size {first[1][-1]}; "
                    f"got shape {shape} and {first[0]} of shape {first[1]}"
                )
            out.append(jnp.asarray(value))
        return out

    # ------------------------------------------------------------------ the public maths

    def expmap(self, x: jax.Array, u: jax.Array) -> jax.Array:
        """The exponential map exp_x(u): the end, at time 1, of the geodesic from x with velocity u.

        Args:
          x: points on M, shape [..., D].
          u: tangent vectors at x, shape [..., D] (leading axes broadcast against x's).

        Returns:
          Points on M, shape [..., D] (the broadcast leading shape).
        """
        x, u = self._check(x=x, u=u)
        return self._expmap(x, u)

    def logmap(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """The logarithmic map log_x(y): the tangent vector u at x with exp_x(u) = y and |u| = dist(x, y).

        Defined for y within the injectivity radius of x (everywhere on Euclidean and hyperbolic
        space, away from the antipode -x on the sphere, per coordinate within pi on the torus).

        Args:
          x, y: points on M, shape [..., D] (leading axes broadcast).

        Returns:
          Tangent vectors at x, shape [..., D].
        """
        x, y = self._check(x=x, y=y)
        return self._logmap(x, y)

    def projx(self, x: jax.Array) -> jax.Array:
        """The point of M nearest x (or the manifold's standard representative of x), shape [..., D]."""
        (x,) = self._check(x=x)
        return self._projx(x)

    def proju(self, x: jax.Array, u: jax.Array) -> jax.Array:
        """The projection of an ambient vector u onto the tangent space T_x M, orthogonal in the metric.

        Args:
          x: points on M, shape [..., D].
          u: ambient vectors, shape [..., D] (leading axes broadcast).

        Returns:
          Tangent vectors at x, shape [..., D].
        """
        x, u = self._check(x=x, u=u)
        return self._proju(x, u)

    def dist(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """The geodesic distance d(x, y) = |log_x(y)|_x between points of shape [..., D].

        Returns an array of the broadcast leading shape [...]; its gradient is finite (0) at x = y, so
        d(x, y)^2 can be a loss or an OT cost.
        """
        x, y = self._check(x=x, y=y)
        return self._dist(x, y)

    def inner(self, x: jax.Array, u: jax.Array, v: jax.Array) -> jax.Array:
        """The Riemannian metric ⟨u, v⟩_x of tangent vectors at x (all shape [..., D]); shape [...]."""
        x, u, v = self._check(x=x, u=u, v=v)
        return self._inner(x, u, v)

    def norm(self, x: jax.Array, u: jax.Array) -> jax.Array:
        """|u|_x = sqrt(⟨u, u⟩_x) of tangent vectors u at x (shape [..., D]); shape [...].

        The gradient is finite (0) at u = 0.
        """
        x, u = self._check(x=x, u=u)
        return self._norm(x, u)

    def normals(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Normal vectors n_j and their dual covectors c_j at points x of M, for divergences.

        The tangent projection is P = I - sum_j n_j c_j^T, i.e. ``proju(x, u) = u - sum_j n_j (c_j . u)``
        (Euclidean dot products), with c_j . n_k = delta_jk. For a tangent vector field f on M and J the
        ambient Jacobian at x of any extension of f to a neighbourhood in R^D, the Riemannian divergence
        is the trace of the covariant derivative P J restricted to T_x M, which equals its trace on R^D
        (P J maps into T_x M and kills no tangent component):

            div_M f(x) = trace(P J) = trace(J) - sum_j c_j . (J n_j).

        So an exact divergence needs k extra Jacobian-vector products J n_j (k = ``codimension``), and a
        Hutchinson estimate uses probes projected with P. Sphere: n = c = x (P = I - x x^T).
        Hyperbolic (Lorentz): n = x, c = (x_0, -x_1, ..., -x_d), so that c . u = -⟨x, u⟩_L and
        P u = u + ⟨x, u⟩_L x. Product: each factor's pairs, zero outside its slice.

        Args:
          x: points on M, shape [..., D].

        Returns:
          ``(normals, covectors)``, each of shape [..., k, D] (k = 0 for Euclidean and FlatTorus).
        """
        (x,) = self._check(x=x)
        return self._normals(x)

    def base_sample(self, key: jax.Array, shape: Sequence[int], dtype: Any = None) -> jax.Array:
        """Draw points from the manifold's base (source) distribution.

        Args:
          key: one PRNG key.
          shape: the FULL shape of the draw, [..., D], the last entry being the ambient size D
            (e.g. (n, 3) for n points on S^2).
          dtype: a floating dtype; by default float32, or float64 with jax_enable_x64.

        Returns:
          Points on M of shape ``shape`` and dtype ``dtype``.
        """
        check_key("key", key)
        try:
            sizes = tuple(operator.index(size) for size in shape)
        except TypeError:
            sizes = ()
        if not sizes:
            raise TypeError(
                "shape must be a non-empty tuple of ints [..., D] whose last entry is the ambient size D; "
                f"got {describe(shape)}"
            )
        shape = sizes
        if any(s < 0 for s in shape):
            raise ValueError(f"shape must hold sizes >= 0; got {shape}")
        self._check_size("shape", shape[-1], shape)
        dtype = _default_float() if dtype is None else jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"dtype must be a floating dtype (float32, float64); got {dtype}")
        return self._base_sample(key, shape, dtype)

    def base_log_prob(self, x: jax.Array) -> jax.Array:
        """Log density of the base distribution at points x (shape [..., D]) w.r.t. the Riemannian
        volume of M; shape [...]."""
        (x,) = self._check(x=x)
        return self._base_log_prob(x)

    def intrinsic_dim(self, ambient_dim: int | None = None) -> int:
        """The manifold's dimension when its points have ``ambient_dim`` coordinates (default: ``dim``)."""
        if ambient_dim is not None:
            ambient_dim = check_int("ambient_dim", ambient_dim, low=self.min_dim)
        return self._fixed("ambient_dim", ambient_dim) - self.codimension

    def ambient_dim(self, intrinsic_dim: int | None = None) -> int:
        """The ambient size D of points of an ``intrinsic_dim``-dimensional M (default: ``dim``)."""
        if intrinsic_dim is not None:
            intrinsic_dim = check_int("intrinsic_dim", intrinsic_dim, low=self.min_dim - self.codimension)
            intrinsic_dim += self.codimension
        return self._fixed("intrinsic_dim", intrinsic_dim)

    def _fixed(self, name: str, ambient: int | None) -> int:
        """The ambient size: ``ambient`` (which must agree with ``dim`` where that is set), else ``dim``."""
        if ambient is None:
            if self.dim is None:
                raise ValueError(f"{name} is required: {self!r} has no dim (ambient size) set")
            return self.dim
        if self.dim is not None and ambient != self.dim:
            raise ValueError(
                f"{name} does not fit {self!r}: its ambient size is {self.dim} and its dimension "
                f"{self.dim - self.codimension}"
            )
        return ambient

    # ------------------------------------------------------------------ what subclasses implement

    @abc.abstractmethod
    def _expmap(self, x: jax.Array, u: jax.Array) -> jax.Array: ...

    @abc.abstractmethod
    def _logmap(self, x: jax.Array, y: jax.Array) -> jax.Array: ...

    @abc.abstractmethod
    def _projx(self, x: jax.Array) -> jax.Array: ...

    @abc.abstractmethod
    def _proju(self, x: jax.Array, u: jax.Array) -> jax.Array: ...

    @abc.abstractmethod
    def _base_sample(self, key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array: ...

    @abc.abstractmethod
    def _base_log_prob(self, x: jax.Array) -> jax.Array: ...

    def _inner(self, x: jax.Array, u: jax.Array, v: jax.Array) -> jax.Array:
        return _dot(u, v) + jnp.zeros(x.shape[:-1], x.dtype)  # the broadcast leading shape

    def _norm(self, x: jax.Array, u: jax.Array) -> jax.Array:
        return _safe_sqrt(self._inner(x, u, u))

    def _dist(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return self._norm(x, self._logmap(x, y))

    def _normals(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        none = jnp.zeros(x.shape[:-1] + (0, x.shape[-1]), x.dtype)
        return none, none

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

import abc
import dataclasses
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from fmjax._checks import check_int, check_key, describe, lookup

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


def _cos(sq):
    return _of_square(sq, lambda s: 1 - s / 2 * (1 - s / 12 * (1 - s / 30)), jnp.cos)


def _sinc(sq):  # sin(r) / r
    return _of_square(sq, lambda s: 1 - s / 6 * (1 - s / 20 * (1 - s / 42)), lambda r: jnp.sin(r) / r)


def _cosh(sq):
    return _of_square(sq, lambda s: 1 + s / 2 * (1 + s / 12 * (1 + s / 30)), jnp.cosh)


def _sinhc(sq):  # sinh(r) / r
    return _of_square(sq, lambda s: 1 + s / 6 * (1 + s / 20 * (1 + s / 42)), lambda r: jnp.sinh(r) / r)


def _log_sinhc(sq):  # log(sinh(r) / r) = r + log((1 - exp(-2r)) / (2r)): no overflow for large r
    return _of_square(
        sq,
        lambda s: s / 6 - s**2 / 180 + s**3 / 2835,
        lambda r: r + jnp.log(-jnp.expm1(-2 * r) / (2 * r)),
    )


def _wrap(x: jax.Array) -> jax.Array:
    """x mod 2 pi in [0, 2 pi): a tiny negative x, whose mod rounds up to 2 pi, gives 0."""
    x = jnp.mod(x, _TWO_PI)
    return jnp.where(x >= _TWO_PI, x - _TWO_PI, x)


def _default_float() -> jnp.dtype:
    """float64 when jax_enable_x64 is on, else float32."""
    return jnp.result_type(float)


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
        """The Riemannian metric <u, v>_x of tangent vectors at x (all shape [..., D]); shape [...]."""
        x, u, v = self._check(x=x, u=u, v=v)
        return self._inner(x, u, v)

    def norm(self, x: jax.Array, u: jax.Array) -> jax.Array:
        """|u|_x = sqrt(<u, u>_x) of tangent vectors u at x (shape [..., D]); shape [...].

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
        Hyperbolic (Lorentz): n = x, c = (x_0, -x_1, ..., -x_d), so that c . u = -<x, u>_L and
        P u = u + <x, u>_L x. Product: each factor's pairs, zero outside its slice.

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


def _static_dataclass(cls):
    """A frozen, keyword-only dataclass registered as a pytree without leaves (all fields static)."""
    cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    jax.tree_util.register_static(cls)
    return cls


def _broadcast(x: jax.Array, u: jax.Array) -> jax.Array:
    """u broadcast to the shape and dtype of x + u."""
    return jnp.broadcast_to(u, jnp.broadcast_shapes(x.shape, u.shape)).astype(jnp.result_type(x, u))


@_static_dataclass
class Euclidean(Manifold):
    """Euclidean space R^D with the standard metric; base distribution N(0, I).

    exp_x(u) = x + u,  log_x(y) = y - x,  d(x, y) = |y - x|,  <u, v>_x = u . v,
    log p(x) = -|x|^2 / 2 - (D / 2) log(2 pi).

    Args:
      dim: the size D of the last axis, if fixed (checked by every method; needed in a ``Product``).

    >>> import jax.numpy as jnp
    >>> Euclidean().dist(jnp.zeros(2), jnp.array([3.0, 4.0])).tolist()
    5.0
    """

    dim: int | None = None

    def __post_init__(self):
        self._check_dim_field()

    def _expmap(self, x, u):
        return x + u

    def _logmap(self, x, y):
        return y - x

    def _projx(self, x):
        return x

    def _proju(self, x, u):
        return _broadcast(x, u)

    def _dist(self, x, y):
        return _safe_norm(y - x)

    def _base_sample(self, key, shape, dtype):
        return jax.random.normal(key, shape, dtype)

    def _base_log_prob(self, x):
        return -0.5 * _dot(x, x) - 0.5 * x.shape[-1] * _LOG_TWO_PI


@_static_dataclass
class Sphere(Manifold):
    """The unit sphere S^{D-1} = {x in R^D : |x| = 1} with the metric of R^D; base distribution uniform.

    exp_x(u) = cos|u| x + sin|u| u / |u|,
    log_x(y) = theta v / |v|  with  v = y - <x, y> x,  theta = d(x, y) = atan2(|v|, <x, y>),
    projx(x) = x / |x|,  proju(x, u) = u - <x, u> x,  <u, v>_x = u . v,
    log p(x) = -log |S^{D-1}|,  |S^{D-1}| = 2 pi^{D/2} / Gamma(D/2)  (S^2: -log(4 pi)).

    The atan2 form keeps d(x, y) accurate near 0 and near pi (where arccos(<x, y>) is not); log_x is
    undefined at the antipode y = -x. ``normals``: n = c = x.

    Args:
      dim: the ambient size D (>= 2), if fixed (checked by every method; needed in a ``Product``).

    >>> import jax, jax.numpy as jnp
    >>> x = Sphere().base_sample(jax.random.key(0), (4, 3))
    >>> bool(jnp.allclose(jnp.linalg.norm(x, axis=-1), 1.0))
    True
    >>> bool(jnp.allclose(Sphere().base_log_prob(x), -jnp.log(4 * jnp.pi)))
    True
    """

    codimension: ClassVar[int] = 1
    min_dim: ClassVar[int] = 2
    dim: int | None = None

    def __post_init__(self):
        self._check_dim_field()

    def _expmap(self, x, u):
        sq = _dot(u, u)[..., None]
        return _cos(sq) * x + _sinc(sq) * u

    def _angle(self, x, y):
        """(theta, v, |v|): the angle between x and y, and y's component v orthogonal to x."""
        cos_theta = _dot(x, y)[..., None]
        v = y - cos_theta * x
        sin_theta = _safe_norm(v)[..., None]
        return jnp.arctan2(sin_theta, cos_theta), v, sin_theta

    def _logmap(self, x, y):
        theta, v, sin_theta = self._angle(x, y)
        nonzero = sin_theta > 0
        return jnp.where(nonzero, theta / jnp.where(nonzero, sin_theta, 1), 1) * v

    def _dist(self, x, y):
        return self._angle(x, y)[0][..., 0]

    def _projx(self, x):
        norm = _safe_norm(x)[..., None]
        pole = jnp.zeros_like(x).at[..., 0].set(1)  # x = 0 is as near to every point: take e_0
        return jnp.where(norm > 0, x / jnp.where(norm > 0, norm, 1), pole)

    def _proju(self, x, u):
        return u - _dot(x, u)[..., None] * x

    def _normals(self, x):
        return x[..., None, :], x[..., None, :]

    def _base_sample(self, key, shape, dtype):
        return self._projx(jax.random.normal(key, shape, dtype))

    def _base_log_prob(self, x):
        d = x.shape[-1]
        log_area = math.log(2) + d / 2 * math.log(math.pi) - math.lgamma(d / 2)
        return jnp.full(x.shape[:-1], -log_area, x.dtype)


@_static_dataclass
class FlatTorus(Manifold):
    """The flat torus [0, 2 pi)^D (angles, each coordinate mod 2 pi) with the metric of R^D; base
    distribution uniform.

    exp_x(u) = (x + u) mod 2 pi,  log_x(y) = (y - x) wrapped into [-pi, pi) per coordinate,
    projx(x) = x mod 2 pi,  proju(x, u) = u,  d(x, y) = |log_x(y)|,  <u, v>_x = u . v,
    log p(x) = -D log(2 pi).

    Args:
      dim: the number D of angles, if fixed (checked by every method; needed in a ``Product``).

    >>> import jax.numpy as jnp
    >>> u = FlatTorus().logmap(jnp.array([0.1]), jnp.array([2 * jnp.pi - 0.1]))  # the short way round
    >>> bool(jnp.allclose(u, -0.2))
    True
    """

    dim: int | None = None

    def __post_init__(self):
        self._check_dim_field()

    def _expmap(self, x, u):
        return _wrap(x + u)

    def _logmap(self, x, y):
        return _wrap(y - x + math.pi) - math.pi

    def _projx(self, x):
        return _wrap(x)

    def _proju(self, x, u):
        return _broadcast(x, u)

    def _base_sample(self, key, shape, dtype):
        return _wrap(jax.random.uniform(key, shape, dtype, 0, _TWO_PI))

    def _base_log_prob(self, x):
        return jnp.full(x.shape[:-1], -x.shape[-1] * _LOG_TWO_PI, x.dtype)


def _minkowski(u: jax.Array, v: jax.Array) -> jax.Array:
    """<u, v>_L = -u_0 v_0 + sum_{i >= 1} u_i v_i over the last axis."""
    return _dot(u[..., 1:], v[..., 1:]) - u[..., 0] * v[..., 0]


@_static_dataclass
class Hyperbolic(Manifold):
    """Hyperbolic space H^d (curvature -1) in the Lorentz (hyperboloid) model in R^{d+1}, D = d + 1.

    Points: x with <x, x>_L = -1 and x_0 > 0, where <u, v>_L = -u_0 v_0 + sum_{i>=1} u_i v_i is the
    Minkowski form; tangent vectors at x: <x, u>_L = 0; the metric is <u, v>_x = <u, v>_L (positive
    definite on tangent vectors), |u|_L = sqrt(max(<u, u>_L, 0)).

    exp_x(u) = cosh|u|_L x + sinh|u|_L u / |u|_L,
    log_x(y) = d(x, y) w / |w|_L  with  w = y + <x, y>_L x,  |w|_L = sinh d(x, y),
    d(x, y) = arccosh(-<x, y>_L) = 2 asinh(|y - x|_L / 2),
    projx(x) = (sqrt(1 + |x_{1:}|^2), x_{1:}),  proju(x, u) = u + <x, u>_L x.

    The distance is computed in its second form, from the chord y - x, which stays accurate for
    nearby points where arccosh(1 + small) loses all digits (and has an infinite derivative).

    The base distribution is the wrapped standard normal at the origin o = (1, 0, ..., 0) (Nagano et
    al., "A Wrapped Normal Distribution on Hyperbolic Space for Gradient-Based Learning", ICML 2019):
    v ~ N(0, I_d), x = exp_o((0, v)). Its log density w.r.t. the Riemannian volume is

        log p(x) = log N(v; 0, I_d) - (d - 1) log(sinh r / r),   r = |v| = d(o, x) = asinh |x_{1:}|,

    the second term being the volume element sinh(r)^{d-1} of geodesic polar coordinates against the
    Euclidean r^{d-1}. It reads only x_{1:} (it is the density at projx(x)). ``normals``: n = x and
    c = (x_0, -x_1, ..., -x_d), so c . u = -<x, u>_L and c . n = 1.

    Args:
      dim: the ambient size D = d + 1 (>= 2), if fixed (checked by every method; needed in a ``Product``).

    >>> import jax.numpy as jnp
    >>> H = Hyperbolic()
    >>> origin, r = jnp.array([1.0, 0.0, 0.0]), 2.0
    >>> x = jnp.array([jnp.cosh(r), jnp.sinh(r), 0.0])  # at distance r from the origin
    >>> bool(jnp.isclose(H.dist(origin, x), r))
    True
    >>> bool(jnp.allclose(H.logmap(origin, x), jnp.array([0.0, r, 0.0])))
    True
    """

    codimension: ClassVar[int] = 1
    min_dim: ClassVar[int] = 2
    dim: int | None = None

    def __post_init__(self):
        self._check_dim_field()

    def _expmap(self, x, u):
        sq = _minkowski(u, u)[..., None]
        return _cosh(sq) * x + _sinhc(sq) * u

    def _logmap(self, x, y):
        w = y + _minkowski(x, y)[..., None] * x
        r = self._dist(x, y)[..., None]
        return w / _sinhc(r * r)  # d w / |w|_L with |w|_L = sinh d: smooth, 1 at x = y

    def _dist(self, x, y):
        chord = y - x
        return 2 * jnp.arcsinh(_safe_sqrt(_minkowski(chord, chord)) / 2)

    def _projx(self, x):
        space = x[..., 1:]
        return jnp.concatenate([jnp.sqrt(1 + _dot(space, space))[..., None], space], axis=-1)

    def _proju(self, x, u):
        return u + _minkowski(x, u)[..., None] * x

    def _inner(self, x, u, v):
        return _minkowski(u, v) + jnp.zeros(x.shape[:-1], x.dtype)

    def _normals(self, x):
        sign = jnp.ones(x.shape[-1], x.dtype).at[0].set(-1)
        return x[..., None, :], -(sign * x)[..., None, :]

    def _base_sample(self, key, shape, dtype):
        v = jax.random.normal(key, shape[:-1] + (shape[-1] - 1,), dtype)
        sq = _dot(v, v)[..., None]
        return jnp.concatenate([_cosh(sq), _sinhc(sq) * v], axis=-1)

    def _base_log_prob(self, x):
        d = x.shape[-1] - 1
        r = jnp.arcsinh(_safe_norm(x[..., 1:]))
        sq = r * r
        return -0.5 * sq - 0.5 * d * _LOG_TWO_PI - (d - 1) * _log_sinhc(sq)


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class Product(Manifold):
    """The product M_1 x ... x M_k: factor i acts on its own contiguous slice of the last axis, in order.

    Every factor needs its ambient size, e.g. ``Product(Sphere(dim=3), FlatTorus(dim=2))`` for points
    of shape [..., 5] on S^2 x T^2. Each method splits x, applies the factors and joins the results:

    exp, log, projx, proju: concatenated;  <u, v>_x = sum_i <u_i, v_i>_{x_i};
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

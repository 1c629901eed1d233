"""Affine probability paths: x_t = a_t x0 + b_t x1 + s_t eps."""

from __future__ import annotations

import abc
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fmjax._checks import (
    ArgumentError,
    check_batch,
    check_key,
    check_real,
    check_unit_interval,
    describe,
    lookup,
)
from fmjax.paths._base import Path, PathSample, check_times, checked_times, expand, static_dataclass

__all__ = [
    "Schedule",
    "AffinePath",
    "CondOT",
    "Linear",
    "SchrodingerBridge",
    "VariancePreserving",
    "VPDiffusion",
    "PATHS",
    "make_path",
]

# Where a schedule derivative is singular at an end point (SchrodingerBridge at t=0 and 1,
# VPDiffusion at t=1), t is clipped this far inside [0, 1] before the derivative is taken, so a time
# sampler that returns exactly 0 cannot turn the loss into inf. It changes nothing for t inside.
_T_CLIP = 1e-5


class Schedule(NamedTuple):
    """Coefficients of an affine path at times t: x_t = a x0 + b x1 + s eps (each shape of t)."""

    a: jax.Array
    b: jax.Array
    s: jax.Array


class AffinePath(Path):
    """Base class of paths x_t = a_t x0 + b_t x1 + s_t eps.

    Subclasses implement ``schedule(t)``; ``schedule_derivative(t)`` defaults to forward-mode
    differentiation of ``schedule`` and is overridden by the bundled paths with closed forms.
    ``stochastic`` is True when s_t is not identically zero, in which case the conversions between
    velocity and x1/eps predictions are not defined and raise.
    """

    stochastic: bool = False

    @abc.abstractmethod
    def schedule(self, t: jax.Array) -> Schedule:
        """Return the coefficients (a_t, b_t, s_t) at times ``t``."""

    def schedule_derivative(self, t: jax.Array) -> Schedule:
        """Return (a'_t, b'_t, s'_t), the time derivatives of ``schedule`` at times ``t``."""
        _, tangent = jax.jvp(self.schedule, (t,), (jnp.ones_like(t),))
        return tangent

    def sample(self, key: jax.Array | None, x0: jax.Array, x1: jax.Array, t: jax.Array) -> PathSample:
        """Draw x_t and the conditional velocity u_t for paired end points.

        Args:
          key: one PRNG key for the path's noise eps; may be None for deterministic paths.
          x0: source points, shape [batch, *dims].
          x1: target points, same shape as x0.
          t: times in [0, 1], shape [batch].

        Returns:
          A ``PathSample(t, x0, x1, xt, ut)`` with xt and ut of x0's shape and dtype.
        """
        return self.sample_with_noise(key, x0, x1, t)[0]

    def sample_with_noise(
        self, key: jax.Array | None, x0: jax.Array, x1: jax.Array, t: jax.Array
    ) -> tuple[PathSample, jax.Array | None]:
        """``sample`` and the noise eps it drew: x_t = a_t x0 + b_t x1 + s_t eps.

        Returns ``(PathSample, eps)``, eps of x0's shape and dtype (the same draw from ``key`` as
        ``sample`` makes), or None for a deterministic path. Score matching regresses on eps.
        """
        t = checked_times(x0, x1, t)
        coef = self.schedule(t)
        dcoef = self.schedule_derivative(t)
        a, b = expand(coef.a, x0), expand(coef.b, x0)
        da, db = expand(dcoef.a, x0), expand(dcoef.b, x0)
        xt = a * x0 + b * x1
        ut = da * x0 + db * x1
        eps = None
        if self.stochastic:
            if key is None:
                raise ValueError(f"key is required: {type(self).__name__} draws noise eps")
            check_key("key", key)
            eps = jax.random.normal(key, x0.shape, x0.dtype)
            xt = xt + expand(coef.s, x0) * eps
            ut = ut + expand(dcoef.s, x0) * eps
        return PathSample(t=t, x0=x0, x1=x1, xt=xt, ut=ut), eps

    def score(self, t: jax.Array, xt: jax.Array, x0: jax.Array, x1: jax.Array) -> jax.Array:
        """Score of the conditional path, grad_x log p_t(x | x0, x1) at x = xt.

        The conditional path is Gaussian, N(mu_t, s_t^2 I) with mu_t = a_t x0 + b_t x1, so

            grad_x log p_t(x | x0, x1) = -(x - mu_t) / s_t^2  (= -eps / s_t on the path).

        Where s_t = 0 at an end point (``SchrodingerBridge`` at t = 0 and 1) the variance is taken
        at t clipped 1e-5 inside [0, 1], so the score stays finite (it is 0 there for x = mu_t).

        Args:
          t: times in [0, 1], a scalar or shape [batch].
          xt: points, shape [batch, *dims].
          x0, x1: the end points, of xt's shape.

        Returns:
          The score, of xt's shape. A deterministic path (s_t = 0) has no density: ValueError.

        >>> import jax.numpy as jnp
        >>> path = SchrodingerBridge(sigma=2.0)  # s_t^2 = 4 t (1 - t) = 1 at t = 1/2
        >>> x0, x1 = jnp.zeros((1, 2)), jnp.ones((1, 2))
        >>> path.score(0.5, jnp.full((1, 2), 1.5), x0, x1).tolist()  # -(1.5 - 0.5) / 1
        [[-1.0, -1.0]]
        """
        if not self.stochastic:
            raise ValueError(
                f"{self!r} has no noise, so its conditional path has no density and no score; use a "
                "path with noise, e.g. SchrodingerBridge(sigma=1.0)"
            )
        check_batch("xt", xt)
        for name, value in (("x0", x0), ("x1", x1)):
            if not hasattr(value, "shape") or tuple(value.shape) != tuple(xt.shape):
                got = value.shape if hasattr(value, "shape") else type(value).__name__
                raise ValueError(f"{name} must have the shape of xt, {xt.shape}; got {got}")
        t = check_times(t, f"() or [batch] = {xt.shape[:1]}")
        if t.shape not in ((), xt.shape[:1]):
            raise ValueError(f"t must be a scalar or have shape [batch] = {xt.shape[:1]}; got {t.shape}")
        check_unit_interval("t", t)
        t = jnp.broadcast_to(t.astype(xt.dtype), xt.shape[:1])
        coef = self.schedule(t)
        variance = jnp.square(self.schedule(jnp.clip(t, _T_CLIP, 1 - _T_CLIP)).s)
        mean = expand(coef.a, xt) * x0 + expand(coef.b, xt) * x1
        return -(xt - mean) / expand(variance, xt)

    # Conversions between parametrisations, for deterministic paths (s_t = 0), where
    # xt = a x0 + b x1 and v = a' x0 + b' x1 determine x0 and x1 given any two of (xt, v, x0, x1).

    def _coefficients(self, t: jax.Array, x: jax.Array, **predictions: jax.Array):
        if self.stochastic:
            raise ValueError(
                f"{type(self).__name__} with nonzero noise has no conversion between velocity and "
                "x1/eps predictions; use a deterministic path (sigma=0)"
            )
        check_batch("xt", x)
        t = check_times(t, f"() or [batch] = {x.shape[:1]}")
        if t.shape not in ((), x.shape[:1]):
            raise ValueError(f"t must be a scalar or have shape [batch] = {x.shape[:1]}; got {t.shape}")
        for name, value in predictions.items():
            if not hasattr(value, "shape") or tuple(value.shape) != tuple(x.shape):
                got = value.shape if hasattr(value, "shape") else type(value).__name__
                raise ValueError(f"{name} must have the shape of xt, {x.shape}; got {got}")
        t = jnp.broadcast_to(t.astype(x.dtype), x.shape[:1])
        coef, dcoef = self.schedule(t), self.schedule_derivative(t)
        return (expand(c, x) for c in (coef.a, coef.b, dcoef.a, dcoef.b))

    def velocity_from_x1(self, t: jax.Array, xt: jax.Array, x1_pred: jax.Array) -> jax.Array:
        """Velocity implied by a prediction of x1 at (t, xt): v = a' x0 + b' x1, x0 = (xt - b x1)/a."""
        a, b, da, db = self._coefficients(t, xt, x1_pred=x1_pred)
        return da * (xt - b * x1_pred) / a + db * x1_pred

    def velocity_from_eps(self, t: jax.Array, xt: jax.Array, eps_pred: jax.Array) -> jax.Array:
        """Velocity implied by a prediction of the source point x0 (eps): x1 = (xt - a x0)/b."""
        a, b, da, db = self._coefficients(t, xt, eps_pred=eps_pred)
        return da * eps_pred + db * (xt - a * eps_pred) / b

    def x1_from_velocity(self, t: jax.Array, xt: jax.Array, velocity: jax.Array) -> jax.Array:
        """x1 implied by a velocity at (t, xt): x1 = (a v - a' xt) / (a b' - a' b)."""
        a, b, da, db = self._coefficients(t, xt, velocity=velocity)
        return (a * velocity - da * xt) / (a * db - da * b)

    def eps_from_velocity(self, t: jax.Array, xt: jax.Array, velocity: jax.Array) -> jax.Array:
        """Source point x0 (eps) implied by a velocity at (t, xt): x0 = (b' xt - b v) / (a b' - a' b)."""
        a, b, da, db = self._coefficients(t, xt, velocity=velocity)
        return (db * xt - b * velocity) / (a * db - da * b)

    def x1_from_eps(self, t: jax.Array, xt: jax.Array, eps_pred: jax.Array) -> jax.Array:
        """x1 implied by a prediction of the source point: x1 = (xt - a x0) / b."""
        a, b, _, _ = self._coefficients(t, xt, eps_pred=eps_pred)
        return (xt - a * eps_pred) / b

    def eps_from_x1(self, t: jax.Array, xt: jax.Array, x1_pred: jax.Array) -> jax.Array:
        """Source point implied by a prediction of x1: x0 = (xt - b x1) / a."""
        a, b, _, _ = self._coefficients(t, xt, x1_pred=x1_pred)
        return (xt - b * x1_pred) / a


@static_dataclass
class CondOT(AffinePath):
    """Lipman et al.'s conditional OT path with minimum noise level ``sigma_min``.

    x_t = (1 - (1 - sigma_min) t) x0 + t x1,   u_t = x1 - (1 - sigma_min) x0.

    With x0 ~ N(0, I) the marginal at t=1 is N(x1, sigma_min^2 I). Lipman et al. use 0.1 on 2D toy
    data and 1e-4 on images; 0 gives the rectified-flow line.
    """

    sigma_min: float = 0.0

    def __post_init__(self):
        object.__setattr__(
            self,
            "sigma_min",
            check_real("sigma_min", self.sigma_min, low=0.0, high=1.0, high_inclusive=False),
        )

    def schedule(self, t):
        zero = jnp.zeros_like(t)
        return Schedule(a=1 - (1 - self.sigma_min) * t, b=t, s=zero)

    def schedule_derivative(self, t):
        zero = jnp.zeros_like(t)
        return Schedule(a=jnp.full_like(t, -(1 - self.sigma_min)), b=jnp.ones_like(t), s=zero)


@static_dataclass
class Linear(AffinePath):
    """I-CFM / rectified-flow path with constant Gaussian noise ``sigma`` (Tong et al.).

    x_t = (1 - t) x0 + t x1 + sigma eps,   u_t = x1 - x0.
    """

    sigma: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "sigma", check_real("sigma", self.sigma, low=0.0))

    @property
    def stochastic(self) -> bool:
        return self.sigma > 0

    def schedule(self, t):
        return Schedule(a=1 - t, b=t, s=jnp.full_like(t, self.sigma))

    def schedule_derivative(self, t):
        return Schedule(a=-jnp.ones_like(t), b=jnp.ones_like(t), s=jnp.zeros_like(t))


@static_dataclass
class SchrodingerBridge(AffinePath):
    """Brownian-bridge path of SB-CFM (Tong et al.) with diffusion scale ``sigma``.

    x_t = (1 - t) x0 + t x1 + sigma sqrt(t (1 - t)) eps,
    u_t = (1 - 2t) / (2 t (1 - t)) (x_t - mu_t) + x1 - x0,   mu_t = (1 - t) x0 + t x1.

    Paired with the entropic OT coupling at epsilon = 2 sigma^2 it matches the Schrödinger bridge
    between the end-point distributions. u_t is singular at t = 0 and 1; there t is clipped 1e-5
    inside the interval for the noise term's derivative.

    Its conditional score is ``score`` = -(x - mu_t) / (sigma^2 t (1 - t)) = -eps / sigma_t, with
    sigma_t = sigma sqrt(t (1 - t)); [SF]²M (``fmjax.losses.sf2m_loss``) learns it beside u_t, with
    the weighting ``score_weight`` = 2 sigma_t / sigma^2, and samples the bridge's SDE
    dx = (v + sigma^2 / 2 score) dt + sigma dW (``fmjax.sde``).
    """

    sigma: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "sigma", check_real("sigma", self.sigma, low=0.0))

    @property
    def stochastic(self) -> bool:
        return self.sigma > 0

    def schedule(self, t):
        return Schedule(a=1 - t, b=t, s=self.sigma * jnp.sqrt(t * (1 - t)))

    def schedule_derivative(self, t):
        tc = jnp.clip(t, _T_CLIP, 1 - _T_CLIP)
        ds = self.sigma * (1 - 2 * tc) / (2 * jnp.sqrt(tc * (1 - tc)))
        return Schedule(a=-jnp.ones_like(t), b=jnp.ones_like(t), s=ds)

    def score_weight(self, t: jax.Array) -> jax.Array:
        """[SF]²M's score-loss weighting lambda(t) = 2 sigma_t / sigma^2, sigma_t = sigma sqrt(t (1 - t)).

        It is the factor with lambda(t) (sigma^2 / 2) grad log p_t(x | x0, x1) = -eps: the score in
        the units of the SDE drift (g^2 / 2 times it, g = sigma) scaled to unit noise.
        ``fmjax.losses.sf2m_loss`` weights its score error by it (Tong et al., AISTATS 2024).

        >>> import jax.numpy as jnp
        >>> SchrodingerBridge(sigma=2.0).score_weight(jnp.array([0.0, 0.5])).tolist()  # 2 (2 / 2) / 4
        [0.0, 0.5]
        """
        if not self.stochastic:
            raise ValueError("score_weight needs sigma > 0: lambda(t) = 2 sigma_t / sigma^2")
        t = check_times(t, "() or [batch]")
        check_unit_interval("t", t)
        return 2 * self.schedule(t.astype(jnp.result_type(t, float))).s / (self.sigma * self.sigma)


@static_dataclass
class VariancePreserving(AffinePath):
    """Trigonometric variance-preserving interpolant (Albergo & Vanden-Eijnden).

    x_t = cos(pi t / 2) x0 + sin(pi t / 2) x1,   u_t = (pi / 2) (cos(pi t / 2) x1 - sin(pi t / 2) x0).

    For independent standard-normal x0 and x1 every marginal is standard normal.
    """

    def schedule(self, t):
        angle = 0.5 * math.pi * t
        return Schedule(a=jnp.cos(angle), b=jnp.sin(angle), s=jnp.zeros_like(t))

    def schedule_derivative(self, t):
        angle = 0.5 * math.pi * t
        half_pi = 0.5 * math.pi
        return Schedule(a=-half_pi * jnp.sin(angle), b=half_pi * jnp.cos(angle), s=jnp.zeros_like(t))


@static_dataclass
class VPDiffusion(AffinePath):
    """Lipman et al.'s conditional path for the variance-preserving diffusion (time reversed so t=1 is data).

    With T(s) = beta_min s + (beta_max - beta_min) s^2 / 2 and alpha(s) = exp(-T(s) / 2):
      x_t = alpha(1 - t) x1 + sqrt(1 - alpha(1 - t)^2) x0.
    At t=0 the path is only approximately the source (alpha(1) = 0.0066 for the defaults); the
    derivative of the noise coefficient is singular at t=1, where t is clipped 1e-5 inside.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0

    def __post_init__(self):
        object.__setattr__(self, "beta_min", check_real("beta_min", self.beta_min, low=0.0))
        object.__setattr__(self, "beta_max", check_real("beta_max", self.beta_max, low=0.0))
        if self.beta_max < self.beta_min:
            raise ValueError(
                f"beta_max must be >= beta_min; got beta_min={self.beta_min}, beta_max={self.beta_max}"
            )
        if self.beta_max == 0:
            raise ValueError("beta_max must be > 0 (beta_min = beta_max = 0 never reaches noise)")

    def _beta(self, s):
        return self.beta_min + (self.beta_max - self.beta_min) * s

    def _integral(self, s):
        return self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s**2

    def schedule(self, t):
        integral = self._integral(1 - t)
        # 1 - alpha^2 = -expm1(-T): no cancellation near t = 1
        return Schedule(a=jnp.sqrt(-jnp.expm1(-integral)), b=jnp.exp(-0.5 * integral), s=jnp.zeros_like(t))

    def schedule_derivative(self, t):
        db = 0.5 * self._beta(1 - t) * jnp.exp(-0.5 * self._integral(1 - t))
        # a = sqrt(1 - e^{-T(1-t)}) has a' = -T'(1-t) e^{-T} / (2a), singular at t = 1
        sc = 1 - jnp.minimum(t, 1 - _T_CLIP)
        integral = self._integral(sc)
        da = -0.5 * self._beta(sc) * jnp.exp(-integral) / jnp.sqrt(-jnp.expm1(-integral))
        return Schedule(a=da, b=db, s=jnp.zeros_like(t))


PATHS = {
    "condot": CondOT,
    "linear": Linear,
    "sb": SchrodingerBridge,
    "vp": VariancePreserving,
    "vp_diffusion": VPDiffusion,
}
"""Paths by name, as accepted by ``make_path`` and the CLI's ``--path``."""


SIGMA_FIELDS = {"condot": "sigma_min", "linear": "sigma", "sb": "sigma"}
"""The paths with a noise level, and the name of their field that ``make_path``'s ``sigma`` sets."""


def make_path(name: str, *, sigma: float | None = None) -> AffinePath:
    """Build a path by name (see ``PATHS``); ``sigma`` sets sigma_min / sigma where the path has one.

    Errors name ``sigma`` and ``path`` (``ArgumentError``), whichever field of the path it sets.
    """
    cls = lookup("path", name, PATHS)
    if sigma is None:
        return cls()
    field = SIGMA_FIELDS.get(name)
    if field is None:
        with_sigma = ", ".join(SIGMA_FIELDS)
        raise ArgumentError(
            lambda n: f"{n('sigma')} is not a parameter of {n('path')} {name!r}; paths with one: {with_sigma}"
        )
    return cls(**{field: check_real("sigma", sigma, low=0.0)})


def resolve_path(path: Any, name: str = "path") -> Path:
    """A path (an ``AffinePath``, a ``Geodesic``) from a path or a name in ``PATHS`` (e.g. "condot").

    A name builds the path with its defaults (``make_path(name)``). A path class instead of an
    instance, or anything else, raises a TypeError naming ``name`` and how to build one.
    """
    if isinstance(path, str):
        return make_path(path)
    if isinstance(path, Path):
        return path
    names = ", ".join(map(repr, sorted(PATHS)))
    if isinstance(path, type) and issubclass(path, Path):
        raise TypeError(f"{name} must be a path, not a path class: call it, e.g. {path.__name__}()")
    raise TypeError(
        f"{name} must be an fmjax path (e.g. fmjax.Linear(), fmjax.CondOT(sigma_min=1e-4)) or one of "
        f"the names {names}; got {describe(path)}"
    )

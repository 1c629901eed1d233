"""Conditional flow matching, ``cfm_loss``: the model regresses the path's conditional velocity.

    loss_k = w(t_k) mean_d (f_theta(t_k, x_t[k], c_k)_d - y_k,d)^2,    L = mean_k loss_k

The model may predict x1 or the source point instead of the velocity (``target``). On a manifold path
(``fmjax.paths.Geodesic(M)``) the squared error is the manifold's metric of the tangent error,
mean_d -> |proju(x_t, f_theta) - u_t|_g^2 / D (D the ambient size of a point).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fmjax._checks import check_choice, check_output
from fmjax._time import uniform
from fmjax.couplings import Coupling, independent
from fmjax.losses.common import (
    ApplyFn,
    Options,
    call_model,
    check_arguments,
    couple,
    status_or_index,
    weigh_and_reduce,
)
from fmjax.paths import AffinePath, Geodesic, Path, PathSample

__all__ = ["TARGETS", "LossAux", "cfm_loss", "cfm_terms", "check_target"]

TARGETS = ("velocity", "x1", "eps")
"""What the model predicts, for ``cfm_loss(target=...)``: the velocity u_t, the data point x1, or the
source point x0 ("eps": the noise when the source is Gaussian)."""


class LossAux(NamedTuple):
    """What ``cfm_loss`` computed on the way, for logging or for further loss terms.

    Attributes:
      sample: the ``PathSample`` (t, x0, x1, xt, ut) of the coupled pairs.
      velocity: the model's velocity v_theta(t, xt), shape [batch, *dims]: its output, or with
        ``target="x1"``/``"eps"`` the velocity that prediction implies through the path's conversion
        (``path.velocity_from_x1``/``velocity_from_eps``; singular where the conversion divides by 0,
        e.g. at t = 1 for x1 on ``CondOT(sigma_min=0)``).
      pairs: the coupling's (i, j); the pairs are (x0[i], x1[j]) of the batches given to the loss.
      status: the coupling's status when it reports one (``coupling.apply_with_status``):
        ``"coupling_converged"`` (bool scalar) and ``"coupling_error"`` (float32 scalar); an empty
        dict for couplings without it. ``aux["coupling_converged"]`` reads the same entries.
      prediction: the model's output, shape [batch, *dims] (what ``target`` names).
      cond: the condition the model was given (moved with x1 by the coupling, with the dropped
        samples' replaced by ``null_cond``), or None without ``cond``.
    """

    sample: PathSample
    velocity: jax.Array
    pairs: tuple[jax.Array, jax.Array]
    status: dict[str, jax.Array]
    prediction: jax.Array | None = None
    cond: Any = None

    __getitem__ = status_or_index


def cfm_loss(
    apply_fn: ApplyFn,
    params: Any,
    key: jax.Array,
    x0: jax.Array,
    x1: jax.Array,
    *,
    cond: Any = None,
    path: Path | str,
    coupling: Coupling | str = independent(),
    time_sampler: Callable[..., jax.Array] | str = uniform,
    reduction: str = "mean",
    weight: Callable[[jax.Array], jax.Array] | None = None,
    target: str = "velocity",
    cond_dropout: float = 0.0,
    null_cond: Any = None,
) -> tuple[jax.Array, LossAux]:
    """Conditional flow matching loss for one batch:

        loss_k = w(t_k) mean_d (f_theta(t_k, x_t[k], c_k)_d - y_k,d)^2,    L = mean_k loss_k

    over the coupled pairs k and every data dimension d, with t from ``time_sampler``, (x_t, u_t) from
    ``path.sample`` and the regression target y = u_t (``target="velocity"``), x1 (``"x1"``) or x0
    (``"eps"``). For a deterministic path the three are the same loss up to a weight: with
    x_t = a x0 + b x1 and u_t = a' x0 + b' x1, the x1 error is a / (a b' - a' b) times the velocity
    error and the x0 error -b / (a b' - a' b) times it (CondOT with sigma_min = 0: (1 - t) and -t).

    Args:
      apply_fn: model, called as ``apply_fn(params, t, xt)`` with t of shape [batch], or
        ``apply_fn(params, t, xt, cond)`` when ``cond`` is given; it must return a real floating
        array of xt's shape [batch, *dims] (checked at trace time, the error names ``apply_fn``).
      params: the model's parameters (any pytree).
      key: one PRNG key for the times and, where they draw random numbers, the coupling, the path
        and the condition dropout.
      x0: source batch, shape [batch, *dims], batch >= 1 (an empty batch raises: its mean is NaN).
      x1: target batch, same shape.
      cond: an optional condition paired with x1: any pytree whose leaves have the batch as leading
        axis (class labels [batch], features [batch, k], a dict of them). The coupling moves it with
        x1 (the model sees ``cond[j]`` beside x1[j]). A ``by_label`` coupling takes x1's labels from
        it (``class_labels``: cond itself when it is an integer array [batch], else cond["label"]).
      path: a probability path, e.g. ``fmjax.paths.Linear(sigma=0.0)``, or a name of
        ``fmjax.paths.PATHS`` (e.g. ``"condot"``), built with its defaults by ``make_path``. With a
        ``Geodesic(manifold)`` path the model's output is projected onto the tangent space at x_t
        (``manifold.proju``) and its error measured with the manifold's metric (``manifold.inner``),
        divided by the ambient size of a point so that on ``Euclidean()`` it is the loss above.
      coupling: pairs the two batches (default: independent), or a name of
        ``fmjax.couplings.COUPLINGS`` built with its defaults by ``make_coupling`` (e.g. ``"exact"``).
      time_sampler: ``time_sampler(key, n, dtype) -> t`` of shape [n] in [0, 1] (default: uniform on
        [0, 1)), or a name of ``TIME_SAMPLERS`` (e.g. ``"logit_normal"``).
      reduction: "mean" (a scalar) or "none" (the per-sample losses loss_k, shape [batch]; their
        mean is the "mean" loss).
      weight: an optional time weighting ``weight(t) -> w`` ([batch] -> [batch]) multiplying each
        sample's loss.
      target: what the model predicts, one of ``TARGETS``: "velocity", "x1" or "eps" (the source
        point x0). Not "velocity" needs a deterministic path (its conversions, used for
        ``aux.velocity``; sample from such a model through ``path.velocity_from_x1`` /
        ``velocity_from_eps``).
      cond_dropout: probability in [0, 1] with which each sample's condition is replaced by
        ``null_cond`` (classifier-free guidance training), drawn from ``key``; needs ``cond``.
      null_cond: the null condition of one sample, with cond's structure (see ``drop_cond``); needed
        when ``cond_dropout > 0``. Bundled models: ``model.null_cond()``.

    Returns:
      ``(loss, aux)``: the scalar mean loss (or the [batch] losses with ``reduction="none"``) and a
      ``LossAux``; with a coupling that reports a status (``apply_with_status``), ``aux.status``
      holds ``coupling_converged`` and ``coupling_error``.

    Times outside [0, 1] from ``time_sampler`` raise outside jit; under jit they are not checked.

    >>> import jax, jax.numpy as jnp
    >>> from fmjax.paths import Linear
    >>> apply_fn = lambda params, t, x: params * x
    >>> x = jnp.ones((8, 2))
    >>> loss, aux = cfm_loss(apply_fn, 0.0, jax.random.key(0), 0 * x, x, path=Linear())
    >>> float(loss)  # u_t = x1 - x0 = 1 and the model predicts 0
    1.0
    >>> float(cfm_loss(apply_fn, 0.0, jax.random.key(0), 0 * x, x, path="linear")[0])
    1.0

    CFM plus a regulariser, here the kinetic energy of the model's field, in a few lines:

    >>> def loss_fn(params, key):
    ...     losses, aux = cfm_loss(apply_fn, params, key, 0 * x, x, path=Linear(), reduction="none")
    ...     kinetic = jnp.mean(jnp.sum(jnp.square(aux.velocity), axis=-1))
    ...     return jnp.mean(losses) + 0.1 * kinetic
    >>> float(loss_fn(0.0, jax.random.key(0)))  # a zero field: CFM loss 1, no kinetic energy
    1.0
    >>> grads = jax.grad(loss_fn)(0.0, jax.random.key(0))  # differentiable as any loss
    """

    options = check_arguments(
        apply_fn, key, x0, x1, cond=cond, path=path, coupling=coupling, time_sampler=time_sampler,
        reduction=reduction, weight=weight, cond_dropout=cond_dropout, null_cond=null_cond,
        check_path=lambda path: check_target(target, path),
    )  # fmt: skip
    return cfm_terms(apply_fn, params, key, x0, x1, cond, options, null_cond, weight, target, reduction)


def check_target(target: str, path: Path) -> None:
    """``target`` is one of ``TARGETS``; x1 and eps predictions need a deterministic affine path."""
    check_choice("target", target, TARGETS)
    if target != "velocity" and not isinstance(path, AffinePath):
        raise ValueError(
            f"target={target!r} needs an affine path, whose conversions relate {target} and velocity "
            f"predictions; {path!r} has none (use target='velocity')"
        )
    if target != "velocity" and path.stochastic:
        raise ValueError(
            f"target={target!r} needs a deterministic path (no noise), whose conversions relate "
            f"{target} and velocity predictions; {path!r} draws noise (use target='velocity')"
        )


def cfm_terms(
    apply_fn: ApplyFn,
    params: Any,
    key: jax.Array,
    x0: jax.Array,
    x1: jax.Array,
    cond: Any,
    options: Options,
    null_cond: Any,
    weight: Callable[[jax.Array], jax.Array] | None,
    target: str,
    reduction: str,
) -> tuple[jax.Array, LossAux]:
    """``cfm_loss`` from checked arguments (``check_arguments``'s ``options``)."""
    coupled = couple(key, x0, x1, cond, options, null_cond)
    path, cond = options.path, coupled.cond
    sample = path.sample(coupled.key_path, coupled.x0, coupled.x1, coupled.t)
    prediction, call = call_model(apply_fn, params, sample, cond)
    check_output(call, prediction, sample.xt.shape, "[batch, *dims], the shape of x")
    if isinstance(path, Geodesic):
        return _manifold_loss(path.manifold, prediction, sample, coupled, cond, weight, reduction)
    if target == "velocity":
        regressed, velocity = sample.ut, prediction
    elif target == "x1":
        regressed, velocity = sample.x1, path.velocity_from_x1(sample.t, sample.xt, prediction)
    else:
        regressed, velocity = sample.x0, path.velocity_from_eps(sample.t, sample.xt, prediction)
    if reduction == "mean" and weight is None:
        loss = jnp.mean(jnp.square(prediction - regressed))
    else:
        axes = tuple(range(1, prediction.ndim))
        loss = weigh_and_reduce(
            jnp.mean(jnp.square(prediction - regressed), axis=axes), sample.t, weight, reduction
        )
    aux = LossAux(
        sample=sample,
        velocity=velocity,
        pairs=coupled.pairs,
        status=coupled.status,
        prediction=prediction,
        cond=cond,
    )
    return loss, aux


def _manifold_loss(manifold, prediction, sample, coupled, cond, weight, reduction) -> tuple[jax.Array, Any]:
    """The CFM loss of a geodesic path: |proju(x_t, f) - u_t|_g^2 / D per sample (D ambient sizes)."""
    velocity = manifold.proju(sample.xt, prediction)
    error = velocity - sample.ut
    size = math.prod(prediction.shape[1:])
    squared = manifold.inner(sample.xt, error, error)
    per_sample = jnp.sum(squared.reshape(squared.shape[0], -1), axis=1) / size
    if reduction == "mean" and weight is None:
        loss = jnp.mean(per_sample)
    else:
        loss = weigh_and_reduce(per_sample, sample.t, weight, reduction)
    aux = LossAux(sample=sample, velocity=velocity, pairs=coupled.pairs, status=coupled.status,
                  prediction=prediction, cond=cond)  # fmt: skip
    return loss, aux

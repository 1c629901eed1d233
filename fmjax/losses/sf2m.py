"""Score and flow matching ([SF]²M, Tong et al., AISTATS 2024), ``sf2m_loss``: a flow and a score,
regressed on a path with noise, for the Schrödinger bridge's SDE and its probability-flow ODE.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fmjax._checks import check_callable, check_output
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
from fmjax.paths import AffinePath, PathSample

__all__ = ["SF2MAux", "two_networks", "check_flow_and_score", "sf2m_loss", "sf2m_terms", "check_noise"]


class SF2MAux(NamedTuple):
    """What ``sf2m_loss`` computed on the way, for logging or for further loss terms.

    Attributes:
      sample: the ``PathSample`` (t, x0, x1, xt, ut) of the coupled pairs.
      velocity: the model's flow output v_theta(t, xt), shape [batch, *dims].
      score: the model's score output s_theta(t, xt), shape [batch, *dims].
      score_target: the conditional score grad log p_t(xt | x0, x1) = -eps / s_t (``path.score``;
        finite at t = 0 and 1, where s_t = 0, see there), shape [batch, *dims].
      flow_loss: each sample's flow term mean_d (v_theta - u_t)^2, shape [batch] (unweighted).
      score_loss: each sample's score term mean_d (s_t s_theta + eps)^2, shape [batch] (unweighted).
      pairs: the coupling's (i, j); the pairs are (x0[i], x1[j]) of the batches given to the loss.
      status: the coupling's status when it reports one (see ``LossAux.status``); else empty.
        ``aux["coupling_converged"]`` reads its entries.
      cond: the condition the model was given (moved with x1, dropped ones replaced by
        ``null_cond``), or None without ``cond``.
    """

    sample: PathSample
    velocity: jax.Array
    score: jax.Array
    score_target: jax.Array
    flow_loss: jax.Array
    score_loss: jax.Array
    pairs: tuple[jax.Array, jax.Array]
    status: dict[str, jax.Array]
    cond: Any = None

    __getitem__ = status_or_index


def two_networks(flow_fn: ApplyFn, score_fn: ApplyFn) -> ApplyFn:
    """One ``apply_fn`` for ``sf2m_loss`` (and ``fmjax.sde``) from a flow network and a score network.

    Returns ``apply_fn(params, t, x, *cond) -> (flow_fn(params["flow"], t, x, *cond),
    score_fn(params["score"], t, x, *cond))``: the parameters are a dict with the two networks'
    parameters under "flow" and "score". A single network with two heads needs no adapter: its
    ``apply_fn`` returns the pair itself.

    >>> import jax.numpy as jnp
    >>> apply_fn = two_networks(lambda p, t, x: p * x, lambda p, t, x: -p * x)
    >>> v, s = apply_fn({"flow": 2.0, "score": 3.0}, jnp.zeros(1), jnp.ones((1, 2)))
    >>> v.tolist(), s.tolist()
    ([[2.0, 2.0]], [[-3.0, -3.0]])
    """
    for name, network in (("flow_fn", flow_fn), ("score_fn", score_fn)):
        try:
            check_callable(name, network, ("params", "t", "x"))
        except TypeError:  # a conditional network, network(params, t, x, cond), is the other form
            try:
                check_callable(name, network, ("params", "t", "x", "cond"))
            except TypeError:
                check_callable(name, network, ("params", "t", "x"))  # raise the plain form's error

    def apply_fn(params: Any, t: jax.Array, x: jax.Array, *cond: Any) -> tuple[jax.Array, jax.Array]:
        if not isinstance(params, Mapping) or set(params) != {"flow", "score"}:
            got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
            raise TypeError(
                "params of a two_networks model must be a dict with keys 'flow' and 'score' (each "
                f"network's parameters); got {got}"
            )
        return flow_fn(params["flow"], t, x, *cond), score_fn(params["score"], t, x, *cond)

    return apply_fn


def check_flow_and_score(call: str, out: Any, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Check that a model returned a pair (velocity, score) of real floating arrays of ``shape``.

    ``call`` names the model as the user wrote it (``"apply_fn(params, t, x)"``). Runs at trace
    time; the error says how to build such a model.
    """
    if not isinstance(out, tuple | list) or len(out) != 2:
        got = (
            f"a {type(out).__name__} of {len(out)} items"
            if isinstance(out, tuple | list)
            else f"an array of shape {tuple(out.shape)}"
            if hasattr(out, "shape")
            else type(out).__name__
        )
        raise TypeError(
            f"{call} must return a pair (velocity, score) of arrays of shape [batch, *dims] = "
            f"{tuple(shape)}: one network with two heads, or two networks joined by "
            f"fmjax.losses.two_networks(flow_fn, score_fn); got {got}"
        )
    for index, (part, name) in enumerate(zip(out, ("velocity", "score"), strict=True)):
        check_output(f"{call}[{index}] (the {name})", part, shape, "[batch, *dims], the shape of x")
    return out[0], out[1]


def sf2m_loss(
    apply_fn: ApplyFn,
    params: Any,
    key: jax.Array,
    x0: jax.Array,
    x1: jax.Array,
    *,
    cond: Any = None,
    path: AffinePath | str,
    coupling: Coupling | str = independent(),
    time_sampler: Callable[..., jax.Array] | str = uniform,
    reduction: str = "mean",
    weight: Callable[[jax.Array], jax.Array] | None = None,
    cond_dropout: float = 0.0,
    null_cond: Any = None,
) -> tuple[jax.Array, SF2MAux]:
    """Score and flow matching ([SF]²M, Tong et al., AISTATS 2024) for one batch:

        loss_k = w(t_k) [ mean_d (v_theta - u_t)_d^2 + mean_d (s_t s_theta + eps)_d^2 ],
        L = mean_k loss_k

    where the model returns a flow v_theta(t, x) and a score s_theta(t, x) at x = x_t, and
    x_t = a_t x0 + b_t x1 + s_t eps is drawn from a path with noise (s_t > 0). The score term is
    s_t^2 || s_theta - grad log p_t(x_t | x0, x1) ||^2, the conditional score being -eps / s_t
    (``path.score``). For ``SchrodingerBridge(sigma)``, s_t = sigma_t = sigma sqrt(t (1 - t)) and it
    is the paper's lambda(t)^2 || (sigma^2 / 2)(s_theta - grad log p_t) ||^2 with lambda(t) =
    2 sigma_t / sigma^2 (``path.score_weight``): TorchCFM's || lambda(t) s~ + eps ||^2 for its score
    network s~ = (sigma^2 / 2) s_theta, which outputs the drift's score term. Here the model's
    second output is the score itself; at t = 0 and 1 (s_t = 0) the term is eps^2, constant.

    With ``SchrodingerBridge(sigma)`` and ``fmjax.couplings.schrodinger_bridge(sigma)`` (entropic
    OT at epsilon = 2 sigma^2; ``exact()`` is its sigma -> 0 limit) the flow matches the
    probability flow of the Schrödinger bridge with reference process sigma W, and the SDE
    dx = (v_theta + sigma^2 / 2 s_theta) dt + sigma dW samples the bridge
    (``fmjax.sde.sample_sde(fmjax.sde.sf2m_drift(apply_fn, params, sigma), sigma, x0, ...)``);
    ``fmjax.sde.sf2m_velocity`` gives the ODE of the flow output alone for ``fmjax.sample``.

    Args:
      apply_fn: model, called as ``apply_fn(params, t, xt)`` with t of shape [batch] (or
        ``apply_fn(params, t, xt, cond)`` with ``cond``); it must return a pair ``(v, s)``: the
        velocity and the score, each a real floating array of xt's shape (checked at trace time,
        the error names ``apply_fn``). One network with two heads returns the pair itself; for two
        networks see ``two_networks``.
      params, key, x0, x1, cond, coupling, time_sampler, cond_dropout, null_cond: as for
        ``cfm_loss``.
      path: a path with noise, e.g. ``fmjax.paths.SchrodingerBridge(sigma=1.0)`` (or "sb"); a
        deterministic path has no score and raises a ValueError.
      reduction: "mean" (a scalar) or "none" (the per-sample losses loss_k, shape [batch]; their
        mean is the "mean" loss).
      weight: an optional time weighting ``weight(t) -> w`` ([batch] -> [batch]) multiplying each
        sample's loss (both terms; ``aux.flow_loss`` and ``aux.score_loss`` weigh them apart).

    Returns:
      ``(loss, aux)``: the scalar mean loss (or the [batch] losses with ``reduction="none"``) and an
      ``SF2MAux``.

    >>> import jax, jax.numpy as jnp
    >>> from fmjax.paths import SchrodingerBridge
    >>> x = jnp.ones((8, 2))
    >>> def bridge(params, t, x):  # flow and score of the bridge from 0 to 1, in closed form
    ...     t = t[:, None]
    ...     return (1 - 2 * t) / (2 * t * (1 - t)) * (x - t) + 1, -(x - t) / (0.25 * t * (1 - t))
    >>> loss, aux = sf2m_loss(bridge, None, jax.random.key(0), 0 * x, x, path=SchrodingerBridge(sigma=0.5))
    >>> round(float(loss), 4)
    0.0
    >>> zero = lambda params, t, x: (0 * x, 0 * x)  # the score term is then mean_d eps^2
    >>> loss, aux = sf2m_loss(zero, None, jax.random.key(0), 0 * x, x, path=SchrodingerBridge(sigma=0.5))
    >>> bool(jnp.allclose(loss, jnp.mean(aux.flow_loss + aux.score_loss)))
    True
    """

    options = check_arguments(
        apply_fn, key, x0, x1, cond=cond, path=path, coupling=coupling, time_sampler=time_sampler,
        reduction=reduction, weight=weight, cond_dropout=cond_dropout, null_cond=null_cond,
        check_path=check_noise,
    )  # fmt: skip
    return sf2m_terms(apply_fn, params, key, x0, x1, cond, options, null_cond, weight, reduction)


def check_noise(path: AffinePath) -> None:
    """[SF]²M needs a path with noise (its conditional path has a score)."""
    if not path.stochastic:
        raise ValueError(
            f"sf2m_loss needs a path with noise, whose conditional path has a score; {path!r} has "
            "none (use e.g. SchrodingerBridge(sigma=1.0), or cfm_loss for the flow alone)"
        )


def sf2m_terms(
    apply_fn: ApplyFn,
    params: Any,
    key: jax.Array,
    x0: jax.Array,
    x1: jax.Array,
    cond: Any,
    options: Options,
    null_cond: Any,
    weight: Callable[[jax.Array], jax.Array] | None,
    reduction: str,
) -> tuple[jax.Array, SF2MAux]:
    """``sf2m_loss`` from checked arguments (``check_arguments``'s ``options``)."""
    coupled = couple(key, x0, x1, cond, options, null_cond)
    path, cond = options.path, coupled.cond
    sample, eps = path.sample_with_noise(coupled.key_path, coupled.x0, coupled.x1, coupled.t)
    out, call = call_model(apply_fn, params, sample, cond)
    velocity, score = check_flow_and_score(call, out, sample.xt.shape)
    axes = tuple(range(1, sample.xt.ndim))
    noise_scale = path.schedule(sample.t).s.reshape(sample.t.shape + (1,) * len(axes))
    flow_loss = jnp.mean(jnp.square(velocity - sample.ut), axis=axes)
    score_loss = jnp.mean(jnp.square(noise_scale * score + eps), axis=axes)
    loss = weigh_and_reduce(flow_loss + score_loss, sample.t, weight, reduction)
    aux = SF2MAux(
        sample=sample,
        velocity=velocity,
        score=score,
        score_target=path.score(sample.t, sample.xt, sample.x0, sample.x1),
        flow_loss=flow_loss,
        score_loss=score_loss,
        pairs=coupled.pairs,
        status=coupled.status,
        cond=cond,
    )
    return loss, aux

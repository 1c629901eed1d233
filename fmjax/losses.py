"""The conditional flow matching loss, as a pure function.

    L(theta) = E_{t, (x0, x1) ~ pi, eps} w(t) || v_theta(t, x_t, c) - u_t(x_t | x0, x1) ||^2

with (x0, x1) drawn from a coupling pi of the two batches, t from a time sampler and (x_t, u_t) from a
probability path; c is an optional condition paired with x1, and w(t) an optional time weighting. The
squared error is averaged over every data dimension, then over the batch (or kept per sample). The
model may predict x1 or the source point instead of the velocity (``target``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fmjax._checks import (
    check_callable,
    check_choice,
    check_key,
    check_output,
    check_pair,
    check_real,
    check_unit_interval,
    resolve_path,
    resolve_time_sampler,
)
from fmjax._time import uniform
from fmjax.couplings import Coupling, check_cond, independent, resolve_coupling
from fmjax.paths import AffinePath, PathSample

__all__ = [
    "LossAux",
    "SF2MAux",
    "cfm_loss",
    "sf2m_loss",
    "two_networks",
    "class_labels",
    "drop_cond",
    "REDUCTIONS",
    "TARGETS",
]

ApplyFn = Callable[..., jax.Array]

REDUCTIONS = ("mean", "none")
"""``cfm_loss``'s reductions: the mean over the batch, or one loss per sample."""

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

    def __getitem__(self, key):
        """``aux["coupling_converged"]`` is ``aux.status["coupling_converged"]``; ints index the tuple."""
        if isinstance(key, str):
            return self.status[key]
        return tuple.__getitem__(self, key)


def _split_key(key: jax.Array, coupling_random: bool, path_random: bool, dropout: bool = False):
    """Keys for the time sampler, the coupling, the path and the condition dropout; split only as
    many as are drawn from (without dropout, exactly as before it existed)."""
    key_drop = None
    if dropout:
        key, key_drop = jax.random.split(key)
    if not (coupling_random or path_random):
        return key, None, None, key_drop
    keys = list(jax.random.split(key, 1 + coupling_random + path_random))
    key_coupling = keys.pop(1) if coupling_random else None
    key_path = keys.pop(1) if path_random else None
    return keys[0], key_coupling, key_path, key_drop


def class_labels(cond: Any, name: str = "cond") -> jax.Array:
    """The integer class labels held by a condition: ``cond`` itself when it is an integer array of
    shape [batch], or ``cond["label"]`` when it is a mapping with a ``"label"`` entry.

    This is how ``cfm_loss`` finds the labels for a ``by_label`` coupling (as x1's labels). Anything
    else raises a TypeError naming ``name``.

    >>> import jax.numpy as jnp
    >>> class_labels({"label": jnp.array([2, 0]), "features": jnp.zeros((2, 3))}).tolist()
    [2, 0]
    """
    labels = cond["label"] if isinstance(cond, Mapping) and "label" in cond else cond
    where = f"{name}['label']" if labels is not cond else name
    dtype = getattr(labels, "dtype", None)
    if dtype is None or isinstance(labels, Mapping):
        raise TypeError(
            f"a by_label coupling takes x1's class labels from {name}: it must be an integer array of "
            f"shape [batch] or a dict with a 'label' entry; got {type(cond).__name__}"
        )
    if jnp.dtype(dtype) == jnp.bool_ or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"{where} must hold integer class labels for a by_label coupling; got dtype {dtype} "
            "(convert class ids with .astype(jnp.int32))"
        )
    if len(labels.shape) != 1:
        raise ValueError(f"{where} must be class labels of shape [batch]; got shape {tuple(labels.shape)}")
    return labels


def drop_cond(key: jax.Array, cond: Any, null_cond: Any, rate: float) -> Any:
    """Classifier-free guidance's condition dropout: each sample's condition becomes ``null_cond``
    with probability ``rate``, independently, drawn from ``key``.

    ``cond`` is a pytree with batch-leading leaves; ``null_cond`` has its structure, each leaf one
    sample's null value (no batch axis; a scalar broadcasts), cast to the leaf's dtype. For the
    bundled models ``model.null_cond()`` gives it (class labels: the null class id ``num_classes``).

    >>> import jax, jax.numpy as jnp
    >>> drop_cond(jax.random.key(0), jnp.array([0, 1, 2]), jnp.int32(3), 1.0).tolist()
    [3, 3, 3]
    """
    leaves, tree = jax.tree.flatten(cond)
    null_leaves, null_tree = jax.tree.flatten(null_cond)
    if null_tree != tree:
        raise ValueError(
            f"null_cond must have the structure of cond, {tree}; got {null_tree} "
            "(for a bundled model use model.null_cond())"
        )
    n = leaves[0].shape[0]
    dropped = jax.random.bernoulli(key, rate, (n,))
    out = []
    for (where, leaf), null in zip(jax.tree_util.tree_leaves_with_path(cond), null_leaves, strict=True):
        null = jnp.asarray(null)
        try:
            null = jnp.broadcast_to(null.astype(leaf.dtype), leaf.shape)
        except ValueError:
            raise ValueError(
                f"null_cond{jax.tree_util.keystr(where)} must be one sample's null value, of shape "
                f"{tuple(leaf.shape[1:])} (or broadcastable to it); got shape {tuple(null.shape)}"
            ) from None
        out.append(jnp.where(dropped.reshape((n,) + (1,) * (leaf.ndim - 1)), null, leaf))
    return jax.tree.unflatten(tree, out)


class _Coupled(NamedTuple):
    """What the losses share: the checked path, the coupled pairs, their condition and times."""

    path: AffinePath
    x0: jax.Array
    x1: jax.Array
    cond: Any
    pairs: tuple[jax.Array, jax.Array]
    status: dict[str, jax.Array]
    t: jax.Array
    key_path: jax.Array | None


def _couple(
    apply_fn: ApplyFn,
    key: jax.Array,
    x0: jax.Array,
    x1: jax.Array,
    *,
    cond: Any,
    path: AffinePath | str,
    coupling: Coupling | str,
    time_sampler: Callable[..., jax.Array] | str,
    reduction: str,
    weight: Callable[[jax.Array], jax.Array] | None,
    cond_dropout: float,
    null_cond: Any,
    check_path: Callable[[AffinePath], None],
) -> _Coupled:
    """Check a loss's arguments (``check_path`` checks the resolved path, in the order the errors
    have always come), couple the batches, drop conditions and draw the times."""
    with_cond = cond is not None
    cond_dropout = check_real("cond_dropout", cond_dropout, low=0.0, high=1.0)
    if not with_cond and (cond_dropout > 0 or null_cond is not None):
        raise ValueError(
            "cond_dropout and null_cond need a condition: pass cond (a pytree of batch-leading arrays)"
        )
    path = resolve_path(path)
    coupling = resolve_coupling(coupling)
    time_sampler = resolve_time_sampler(time_sampler)
    if coupling.by_label and not with_cond:
        raise ValueError(
            f"coupling {coupling!r} pairs within classes (by_label=True) and needs x1's class labels: "
            "pass cond (integer labels of shape [batch], or a dict with a 'label' entry)"
        )
    check_callable("apply_fn", apply_fn, ("params", "t", "x", "cond") if with_cond else ("params", "t", "x"))
    check_key("key", key)
    check_pair(x0, x1)
    check_choice("reduction", reduction, REDUCTIONS)
    check_path(path)
    if weight is not None:
        check_callable("weight", weight, ("t",))
    if cond_dropout > 0 and null_cond is None:
        raise ValueError(
            f"cond_dropout={cond_dropout} needs null_cond, the condition that means 'no condition' "
            "(for a bundled model: model.null_cond(); for class labels, the null class id num_classes)"
        )
    labels = {}
    if with_cond:
        check_cond("cond", cond, x1.shape[0])
        if coupling.by_label:
            labels["labels1"] = class_labels(cond)
    dropout = cond_dropout > 0
    key_time, key_coupling, key_path, key_drop = _split_key(key, coupling.uses_key, path.stochastic, dropout)
    if with_cond:
        x0c, x1c, cond, pairs, status = coupling.apply_with_cond(key_coupling, x0, x1, cond, **labels)
        status = dict(status)
    else:
        with_status = getattr(coupling, "apply_with_status", None)
        if with_status is not None:
            x0c, x1c, pairs, status = with_status(key_coupling, x0, x1)
            status = dict(status)
        else:
            (x0c, x1c, pairs), status = coupling.apply(key_coupling, x0, x1), {}
    for name, before, after in (("x0", x0, x0c), ("x1", x1, x1c)):
        if after.shape != before.shape:
            raise ValueError(
                f"coupling must return pairs of the batches' shape {before.shape}; its {name} has shape "
                f"{after.shape} (the index arrays (i, j) must have shape [batch])"
            )
    if dropout:
        cond = drop_cond(key_drop, cond, null_cond, cond_dropout)
    t = time_sampler(key_time, x0c.shape[0], x0c.dtype)
    check_output("time_sampler(key, n, dtype)", t, x0c.shape[:1], "[n], one time per sample,")
    check_unit_interval("time_sampler(key, n, dtype)", t)
    return _Coupled(path, x0c, x1c, cond if with_cond else None, pairs, status, t, key_path)


def cfm_loss(
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
        ``fmjax.paths.PATHS`` (e.g. ``"condot"``), built with its defaults by ``make_path``.
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

    def check_target(path: AffinePath) -> None:
        check_choice("target", target, TARGETS)
        if target != "velocity" and path.stochastic:
            raise ValueError(
                f"target={target!r} needs a deterministic path (no noise), whose conversions relate "
                f"{target} and velocity predictions; {path!r} draws noise (use target='velocity')"
            )

    coupled = _couple(
        apply_fn,
        key,
        x0,
        x1,
        cond=cond,
        path=path,
        coupling=coupling,
        time_sampler=time_sampler,
        reduction=reduction,
        weight=weight,
        cond_dropout=cond_dropout,
        null_cond=null_cond,
        check_path=check_target,
    )
    path, cond, pairs, status = coupled.path, coupled.cond, coupled.pairs, coupled.status
    with_cond = cond is not None
    sample = path.sample(coupled.key_path, coupled.x0, coupled.x1, coupled.t)
    if with_cond:
        prediction = apply_fn(params, sample.t, sample.xt, cond)
        call = "apply_fn(params, t, x, cond)"
    else:
        prediction = apply_fn(params, sample.t, sample.xt)
        call = "apply_fn(params, t, x)"
    check_output(call, prediction, sample.xt.shape, "[batch, *dims], the shape of x")
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
        loss = jnp.mean(jnp.square(prediction - regressed), axis=axes)
        if weight is not None:
            w = weight(sample.t)
            check_output("weight(t)", w, sample.t.shape, "[batch], one weight per sample,")
            loss = w.astype(loss.dtype) * loss
        if reduction == "mean":
            loss = jnp.mean(loss)
    aux = LossAux(
        sample=sample,
        velocity=velocity,
        pairs=pairs,
        status=status,
        prediction=prediction,
        cond=cond if with_cond else None,
    )
    return loss, aux


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

    def __getitem__(self, key):
        """``aux["coupling_converged"]`` is ``aux.status["coupling_converged"]``; ints index the tuple."""
        if isinstance(key, str):
            return self.status[key]
        return tuple.__getitem__(self, key)


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

    def check_noise(path: AffinePath) -> None:
        if not path.stochastic:
            raise ValueError(
                f"sf2m_loss needs a path with noise, whose conditional path has a score; {path!r} has "
                "none (use e.g. SchrodingerBridge(sigma=1.0), or cfm_loss for the flow alone)"
            )

    coupled = _couple(
        apply_fn,
        key,
        x0,
        x1,
        cond=cond,
        path=path,
        coupling=coupling,
        time_sampler=time_sampler,
        reduction=reduction,
        weight=weight,
        cond_dropout=cond_dropout,
        null_cond=null_cond,
        check_path=check_noise,
    )
    path, cond = coupled.path, coupled.cond
    sample, eps = path.sample_with_noise(coupled.key_path, coupled.x0, coupled.x1, coupled.t)
    if cond is not None:
        out = apply_fn(params, sample.t, sample.xt, cond)
        call = "apply_fn(params, t, x, cond)"
    else:
        out = apply_fn(params, sample.t, sample.xt)
        call = "apply_fn(params, t, x)"
    velocity, score = check_flow_and_score(call, out, sample.xt.shape)
    axes = tuple(range(1, sample.xt.ndim))
    noise_scale = path.schedule(sample.t).s.reshape(sample.t.shape + (1,) * len(axes))
    flow_loss = jnp.mean(jnp.square(velocity - sample.ut), axis=axes)
    score_loss = jnp.mean(jnp.square(noise_scale * score + eps), axis=axes)
    loss = flow_loss + score_loss
    if weight is not None:
        w = weight(sample.t)
        check_output("weight(t)", w, sample.t.shape, "[batch], one weight per sample,")
        loss = w.astype(loss.dtype) * loss
    if reduction == "mean":
        loss = jnp.mean(loss)
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

"""Training state and the jitted CFM training step.

The whole training state is one pytree, ``TrainState(step, params, opt_state, ema_params, key)``,
passed into the step and returned from it:

>>> import jax, jax.numpy as jnp, optax
>>> from fmjax.models import MLP, functional
>>> from fmjax.paths import Linear
>>> from fmjax.training import TrainState, make_train_step
>>> apply_fn, params = functional(MLP(dim=2, width=16, depth=2, seed=0))
>>> optimizer = optax.adam(1e-3)
>>> state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.key(1))
>>> step = make_train_step(apply_fn, optimizer, path=Linear())
>>> x0, x1 = jnp.zeros((32, 2)), jnp.ones((32, 2))
>>> state, metrics = step(state, x0, x1)
>>> int(state.step), sorted(metrics)
(1, ['coupling_converged', 'coupling_error', 'loss'])

With ``loss="sf2m"`` the model returns a pair (flow, score) (``fmjax.losses.sf2m_loss``; two
networks joined by ``fmjax.losses.two_networks``) and the metrics add each term's batch mean:

>>> from fmjax.losses import two_networks
>>> from fmjax.paths import SchrodingerBridge
>>> flow_fn, flow_params = functional(MLP(dim=2, width=16, depth=2, seed=0))
>>> score_fn, score_params = functional(MLP(dim=2, width=16, depth=2, seed=1))
>>> params = {"flow": flow_params, "score": score_params}
>>> state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.key(1))
>>> model = two_networks(flow_fn, score_fn)
>>> step = make_train_step(model, optimizer, path=SchrodingerBridge(sigma=1.0), loss="sf2m")
>>> state, metrics = step(state, x0, x1)
>>> sorted(metrics)
['coupling_converged', 'coupling_error', 'flow_loss', 'loss', 'score_loss']

A conditional model takes the condition as a fourth argument of the step (paired with x1):

>>> model = MLP(dim=2, width=16, depth=2, num_classes=3)
>>> apply_fn, params = functional(model)
>>> state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.key(1))
>>> step = make_train_step(apply_fn, optimizer, path=Linear(), cond_dropout=0.1, null_cond=model.null_cond())
>>> state, metrics = step(state, x0, x1, jnp.arange(32) % 3)
>>> int(state.step)
1
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fmjax._checks import check_bool, check_callable, check_choice, check_pair, check_real
from fmjax._time import TIME_SAMPLERS, LogitNormal, logit_normal, uniform
from fmjax.couplings import Coupling, GlobalBatch, Independent, PerShard, check_cond, independent
from fmjax.losses.cfm import TARGETS, cfm_terms, check_target
from fmjax.losses.common import ApplyFn, check_apply_fn, check_labels_given, check_null_cond, resolve_options
from fmjax.losses.sf2m import check_noise, sf2m_terms
from fmjax.paths import AffinePath

__all__ = [
    "TrainState",
    "make_train_step",
    "ema_update",
    "uniform",
    "logit_normal",
    "LogitNormal",
    "TIME_SAMPLERS",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a training run carries from step to step, as one pytree.

    Attributes:
      step: number of optimiser steps taken, int32 scalar.
      params: model parameters.
      opt_state: optimiser state.
      ema_params: exponential moving average of ``params``.
      key: PRNG key from which each step's randomness is split.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    key: jax.Array

    @classmethod
    def create(cls, *, params: Any, optimizer: optax.GradientTransformation, key: jax.Array) -> TrainState:
        """Initial state: step 0, fresh optimiser state, EMA equal to ``params``."""
        params = jax.tree.map(jnp.array, params)  # a copy: the step may donate its buffers
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            ema_params=jax.tree.map(jnp.copy, params),
            key=key,
        )

    def replace(self, **changes: Any) -> TrainState:
        """A copy with the given fields replaced."""
        return dataclasses.replace(self, **changes)


def ema_update(ema_params: Any, params: Any, decay: float) -> Any:
    """One EMA step: ema <- decay * ema + (1 - decay) * params."""
    return jax.tree.map(lambda e, p: e + (1 - decay) * (p - e), ema_params, params)


# bits of ``metrics["nonfinite"]``
NONFINITE_LOSS = 1
NONFINITE_GRADIENT = 2
NONFINITE_STATE = 4


def _all_finite(tree: Any) -> jax.Array:
    """Whether every floating leaf of ``tree`` is finite: one boolean, reductions XLA fuses."""
    checks = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(checks).all() if checks else jnp.bool_(True)


LOSSES = ("cfm", "sf2m")
"""What ``make_train_step(loss=...)`` minimises: ``cfm_loss`` or ``sf2m_loss``."""


def _at_least_float32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32) if jnp.dtype(x.dtype).itemsize < 4 else x


def _check_takes_dropout_key(apply_fn: ApplyFn) -> None:
    """Refuse (TypeError naming ``model_dropout``) an ``apply_fn`` without a keyword ``dropout_key``."""
    try:
        parameters = inspect.signature(apply_fn).parameters.values()
    except (TypeError, ValueError):
        return
    if not any(
        p.kind is p.VAR_KEYWORD or (p.name == "dropout_key" and p.kind is not p.POSITIONAL_ONLY)
        for p in parameters
    ):
        raise TypeError(
            "model_dropout=True calls apply_fn(params, t, x, ..., dropout_key=key), but apply_fn takes no "
            f"keyword dropout_key (its signature is {inspect.signature(apply_fn)}); use "
            "fmjax.models.functional of a model with dropout, or model_dropout=False"
        )


def _with_dropout_key(apply_fn: ApplyFn, dropout_key: jax.Array) -> ApplyFn:
    """``apply_fn`` with ``dropout_key`` bound: the training-mode model that ``cfm_loss`` calls."""

    def model(params: Any, t: jax.Array, x: jax.Array, *cond: Any) -> jax.Array:
        return apply_fn(params, t, x, *cond, dropout_key=dropout_key)

    return model


def make_train_step(
    apply_fn: ApplyFn,
    optimizer: optax.GradientTransformation,
    *,
    path: AffinePath | str,
    coupling: Coupling | str = independent(),
    time_sampler: Callable[..., jax.Array] | str = uniform,
    weight: Callable[[jax.Array], jax.Array] | None = None,
    target: str = "velocity",
    loss: str = "cfm",
    cond_dropout: float = 0.0,
    null_cond: Any = None,
    model_dropout: bool | None = None,
    ema_decay: float = 0.999,
    log_grad_norm: bool = False,
    check_finite: bool = False,
    skip_nonfinite: bool = False,
    donate: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = "data",
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Build the jitted training step ``(state, x0, x1, cond=None) -> (state, metrics)``.

    One call draws a key from ``state.key``, evaluates ``cfm_loss`` (or ``sf2m_loss``, with
    ``loss="sf2m"``) and its gradient, applies the optimiser and updates the EMA of the parameters.
    The step is traced once per input shape and dtype (and once more for steps given a ``cond``);
    with ``donate=True`` the input state's buffers are reused for the output (do not use the old
    state after the call).

    ``cond`` (optional) is the condition paired with x1, a pytree of batch-leading arrays (see
    ``cfm_loss``); the model is then called ``apply_fn(params, t, xt, cond)``. A ``by_label``
    coupling takes x1's labels from it.

    Args:
      apply_fn: model, ``apply_fn(params, t, xt)`` with t of shape [batch], or
        ``apply_fn(params, t, xt, cond)`` for steps given a condition.
      optimizer: an optax gradient transformation.
      path: the probability path, or its name in ``fmjax.paths.PATHS`` (built with its defaults).
      coupling: how x0 and x1 are paired (default: independent), or a name in ``COUPLINGS``.
      time_sampler: ``time_sampler(key, n, dtype) -> t``, or a name ("uniform", "logit_normal").
      weight, target: ``cfm_loss``'s time weighting ``weight(t)`` and what the model predicts
        ("velocity", "x1" or "eps").
      loss: "cfm" (``cfm_loss``) or "sf2m" (``sf2m_loss``: flow and score matching, [SF]²M). With
        "sf2m" the model returns the pair ``(v, s)`` (``fmjax.losses.two_networks`` joins a flow
        and a score network), the path must have noise (e.g. ``SchrodingerBridge(sigma)``),
        ``target`` must stay "velocity", and the metrics add ``flow_loss`` and ``score_loss``, the
        batch means of the two (weighted) terms, whose sum is ``loss``.
      cond_dropout, null_cond: ``cfm_loss``'s classifier-free guidance dropout: each sample's
        condition becomes ``null_cond`` (one sample's null condition, e.g. ``model.null_cond()``)
        with probability ``cond_dropout``.
      model_dropout: call the model as ``apply_fn(params, t, xt[, cond], dropout_key=k)`` with a fresh
        key k per step, so that the model's own dropout (``UNet(dropout=p)``) acts in training. None
        (default): when ``apply_fn.takes_dropout_key`` is true (``functional`` of a model with
        dropout > 0). The step then splits ``state.key`` into three (next key, the loss's key, k)
        instead of two; without it the step and its random stream are those of a model without
        dropout. Sampling and likelihoods call ``apply_fn`` without a key, deterministically.
      ema_decay: EMA decay in [0, 1); 0 makes ``ema_params`` equal to ``params``.
      log_grad_norm: add the gradient's global norm to the metrics. Off by default: on a CPU its
        per-leaf reductions cost about 2% of a small MLP's step.
      check_finite: add ``metrics["nonfinite"]``, an int32 bit mask of what went non-finite in this
        step: 1 the loss, 2 the gradient's global norm (a NaN/inf gradient, or one so large that its
        norm overflows), 4 the updated parameters or optimiser state. 0 means all finite. Costs the
        gradient norm and one fused ``isfinite`` reduction over the new parameters and optimiser
        state. ``fmjax.runs.train`` stops at the first step where it is not 0.
      skip_nonfinite: when any of the checks of ``check_finite`` fails, keep the parameters,
        optimiser state and EMA unchanged (the step count and key still advance, so the data stream
        goes on) and report ``metrics["skipped"] = 1`` (and ``metrics["nonfinite"]``). Also costs a
        select per parameter. Off by default; without it a NaN propagates into the parameters.
      donate: donate the input state to the output.
      mesh: shard the batch over ``data_axis`` of this mesh and replicate the state (data parallel:
        XLA averages the gradients across devices). The loss is the mean over the global batch, so
        the step computes what a single device would on the same global batch. A coupling with
        ``scope="global"`` couples the whole global batch; with ``scope="local"`` each device
        couples its own shard. The condition's leaves are sharded as the batch and move with x1's
        pairs on the devices.
      data_axis: the mesh axis the batch is sharded over.

    Returns:
      The jitted step. ``metrics`` holds the scalar ``loss``, the coupling's status when it reports one
      (``coupling_converged`` and ``coupling_error``, see ``Coupling.apply_with_status``; reduced over
      the devices of a mesh), and ``grad_norm`` when asked,
      ``nonfinite`` with ``check_finite`` or ``skip_nonfinite``, ``skipped`` with
      ``skip_nonfinite``). x0 and x1 must be floating point arrays of the same shape
      [batch, *dims]; bfloat16 and float16 batches are upcast to float32 inside the step
      (integer data is refused with a TypeError: convert it, scaled as the model expects). For
      bfloat16 computation in the model, wrap ``apply_fn`` with ``fmjax.models.mixed_precision``.
    """
    ema_decay = check_real("ema_decay", ema_decay, low=0.0, high=1.0, high_inclusive=False)
    # whether the step is given a condition is known per call (checked there): with_cond=None
    options = resolve_options(path, coupling, time_sampler, cond_dropout, null_cond, with_cond=None)
    path = options.path
    check_choice("target", target, TARGETS)
    check_choice("loss", loss, LOSSES)
    sf2m = loss == "sf2m"
    if sf2m and target != "velocity":
        raise ValueError(
            f"target={target!r} cannot be combined with loss='sf2m': sf2m_loss regresses the velocity "
            "(and the score); use target='velocity', or loss='cfm' for an x1- or eps-prediction model"
        )
    if sf2m and not path.stochastic:
        raise ValueError(
            f"loss='sf2m' needs a path with noise, whose conditional path has a score; {path!r} has none "
            "(use e.g. SchrodingerBridge(sigma=1.0), or loss='cfm' for the flow alone)"
        )
    (check_noise if sf2m else lambda path: check_target(target, path))(path)
    if weight is not None:
        check_callable("weight", weight, ("t",))
    check_null_cond(options.cond_dropout, null_cond)
    if model_dropout is None:
        model_dropout = getattr(apply_fn, "takes_dropout_key", False) is True
    elif check_bool("model_dropout", model_dropout):
        _check_takes_dropout_key(apply_fn)
    if mesh is not None:
        if data_axis not in mesh.axis_names:
            raise ValueError(f"data_axis must be one of the mesh's axes {mesh.axis_names}; got {data_axis!r}")
        if not isinstance(options.coupling, Independent):
            wrapper = PerShard if options.coupling.scope == "local" else GlobalBatch
            options = options._replace(coupling=wrapper(inner=options.coupling, mesh=mesh, axis=data_axis))

    # the loss's arguments are checked above and per call below: the step computes it unchecked
    def loss_fn(model: ApplyFn, params: Any, key: jax.Array, x0: jax.Array, x1: jax.Array, cond: Any):
        # steps given no condition drop none (their key stream is that of a model without conditions)
        unconditioned = options if cond is not None else options._replace(cond_dropout=0.0)
        if sf2m:
            return sf2m_terms(model, params, key, x0, x1, cond, unconditioned, null_cond, weight, "mean")
        return cfm_terms(model, params, key, x0, x1, cond, unconditioned, null_cond, weight, target, "mean")

    grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)
    called = set()  # the call forms (with and without a condition) whose arguments were checked

    def check_call(x0: jax.Array, x1: jax.Array, cond: Any) -> None:
        """The arguments of one call of the step (at every call: the batch; once per form: the rest)."""
        check_pair(x0, x1, half_precision=True)
        if cond is not None:
            check_cond("cond", cond, x1.shape[0])
        with_cond = cond is not None
        if with_cond not in called:
            check_labels_given(options.coupling, with_cond)
            check_apply_fn(apply_fn, with_cond)
            called.add(with_cond)

    def step(state: TrainState, x0: jax.Array, x1: jax.Array, cond: Any = None):
        # half-precision batches (bf16 pipelines) are upcast: the path maths and the loss run in float32
        x0, x1 = _at_least_float32(x0), _at_least_float32(x1)
        if model_dropout:
            key, loss_key, dropout_key = jax.random.split(state.key, 3)
            model = _with_dropout_key(apply_fn, dropout_key)
        else:
            key, loss_key = jax.random.split(state.key)
            model = apply_fn
        (loss, aux), grads = grad_fn(model, state.params, loss_key, x0, x1, cond)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=ema_update(state.ema_params, params, ema_decay),
            key=key,
        )
        metrics = {"loss": loss, **aux.status}
        if sf2m:
            # the loss's weight applies to both terms; aux holds them unweighted
            w = weight(aux.sample.t).astype(loss.dtype) if weight is not None else 1.0
            metrics["flow_loss"] = jnp.mean(w * aux.flow_loss)
            metrics["score_loss"] = jnp.mean(w * aux.score_loss)
        if log_grad_norm or check_finite or skip_nonfinite:
            grad_norm = optax.global_norm(grads)
        if log_grad_norm:
            metrics["grad_norm"] = grad_norm
        if check_finite or skip_nonfinite:
            nonfinite = (
                jnp.where(jnp.isfinite(loss), 0, NONFINITE_LOSS)
                + jnp.where(jnp.isfinite(grad_norm), 0, NONFINITE_GRADIENT)
                + jnp.where(_all_finite((params, opt_state)), 0, NONFINITE_STATE)
            ).astype(jnp.int32)
            metrics["nonfinite"] = nonfinite
        if skip_nonfinite:
            ok = nonfinite == 0
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
            new_state = dataclasses.replace(
                new_state,
                params=keep(params, state.params),
                opt_state=keep(opt_state, state.opt_state),
                ema_params=keep(new_state.ema_params, state.ema_params),
            )
            metrics["skipped"] = (~ok).astype(jnp.int32)
        return new_state, metrics

    donate_argnums = (0,) if donate else ()
    if mesh is None:
        jitted = jax.jit(step, donate_argnums=donate_argnums)

        def checked(state: TrainState, x0: jax.Array, x1: jax.Array, cond: Any = None):
            check_call(x0, x1, cond)
            if cond is None:
                return jitted(state, x0, x1)
            return jitted(state, x0, x1, cond)

        checked.lower = jitted.lower
        return checked

    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh, PartitionSpec())
    data = NamedSharding(mesh, PartitionSpec(data_axis))
    devices = mesh.shape[data_axis]
    sharded_step = jax.jit(
        step,
        in_shardings=(replicated, data, data),
        out_shardings=(replicated, replicated),
        donate_argnums=donate_argnums,
    )
    # steps given a condition: its leaves sharded as the batch
    sharded_cond_step = jax.jit(
        step,
        in_shardings=(replicated, data, data, data),
        out_shardings=(replicated, replicated),
        donate_argnums=donate_argnums,
    )

    def checked_step(state: TrainState, x0: jax.Array, x1: jax.Array, cond: Any = None):
        check_call(x0, x1, cond)
        for name, x in (("x0", x0), ("x1", x1)):
            if x.shape[0] % devices:
                raise ValueError(
                    f"{name} has batch size {x.shape[0]}, which the {devices} devices of mesh axis "
                    f"{data_axis!r} cannot split evenly; use a multiple of {devices}"
                )
        if cond is None:
            return sharded_step(state, x0, x1)
        return sharded_cond_step(state, x0, x1, cond)

    checked_step.lower = sharded_step.lower
    return checked_step

"""The velocity field of a trained run: the parameters it is evaluated with, its condition and guidance."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fmjax._checks import ArgumentError, check_int, check_real
from fmjax.guidance import guided_velocity
from fmjax.runs.config import RunConfig
from fmjax.sampling import as_velocity

__all__ = ["check_finite_params", "run_velocity", "check_class"]


def check_finite_params(run: Any) -> Any:
    """The parameters a run evaluates with (EMA unless ``eval_ema=False``); ValueError if any is NaN/inf."""
    params = run.state.ema_params if run.config.eval_ema else run.state.params
    leaves = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if leaves and not bool(jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))):
        which = "EMA parameters" if run.config.eval_ema else "parameters"
        raise ValueError(
            f"run's {which} at step {int(run.state.step)} are not finite (NaN or inf): nothing to evaluate; "
            "train it again with a lower learning rate"
        )
    return params


def run_velocity(config: RunConfig, apply_fn, params, *, labels: Any = None, guidance: float = 1.0):
    """The velocity field of a run's model: unconditional, or conditioned on ``labels`` (int [n]).

    ``guidance`` w (conditional runs): v_null + w (v_cond - v_null) through ``fmjax.guided_velocity``
    (w = 1 is the conditional field, 0 the unconditional one; one model call per evaluation at w = 1,
    one batched call of twice the batch otherwise).
    """
    guidance = check_real("guidance", guidance)
    if not config.conditional:
        if labels is not None or guidance != 1.0:
            raise ValueError("class and guidance need a conditional run (trained with --conditional)")
        return as_velocity(apply_fn, params)
    if labels is None:
        raise ValueError("labels are required for a conditional run's model")
    labels = jnp.asarray(labels, jnp.int32)
    if guidance == 1.0:
        return as_velocity(apply_fn, params, cond=labels)
    return guided_velocity(apply_fn, params, labels, scale=guidance, null_cond=config.null_cond())


def check_class(config: RunConfig, label: Any) -> int:
    """``label`` as a class id of a conditional run (0 .. num_classes - 1), named when it is not one."""
    if not config.conditional:
        raise ArgumentError(lambda n: f"{n('class')} needs a conditional run (trained with --conditional)")
    return check_int("class", label, low=0, high=config.num_classes - 1)

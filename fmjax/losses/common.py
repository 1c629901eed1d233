"""What the losses share: their argument checks, the coupling of the batch, condition dropout, the times.

A loss is checked once, at its public entry (``check_arguments``), then computed from checked values
(``couple``, then the loss's own terms); ``fmjax.training.make_train_step`` checks the same arguments
once when it builds the step and calls the computation directly.
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
)
from fmjax._time import resolve_time_sampler
from fmjax.couplings import Coupling, check_cond, resolve_coupling
from fmjax.paths import Path, PathSample, resolve_path

__all__ = ["ApplyFn", "REDUCTIONS", "class_labels", "drop_cond", "check_arguments", "couple", "Coupled"]

ApplyFn = Callable[..., jax.Array]

REDUCTIONS = ("mean", "none")
"""The losses' reductions: the mean over the batch, or one loss per sample."""


def status_or_index(aux: tuple, key: Any) -> Any:
    """``aux["coupling_converged"]`` is ``aux.status["coupling_converged"]``; ints index the tuple."""
    if isinstance(key, str):
        return aux.status[key]
    return tuple.__getitem__(aux, key)


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


def check_null_cond(cond_dropout: float, null_cond: Any) -> None:
    """A positive (checked) ``cond_dropout`` needs the ``null_cond`` that dropped conditions become."""
    if cond_dropout > 0 and null_cond is None:
        raise ValueError(
            f"cond_dropout={cond_dropout} needs null_cond, the condition that means 'no condition' "
            "(for a bundled model: model.null_cond(); for class labels, the null class id num_classes)"
        )


class Options(NamedTuple):
    """A loss's checked options: the resolved path, coupling and time sampler, and the dropout rate."""

    path: Path
    coupling: Coupling
    time_sampler: Callable[..., jax.Array]
    cond_dropout: float


def resolve_options(
    path: Any, coupling: Any, time_sampler: Any, cond_dropout: Any, null_cond: Any, *, with_cond: bool | None
) -> Options:
    """Resolve a loss's path, coupling and time sampler (objects or names) and check the condition
    options. ``with_cond`` None: whether a condition is given is known only per call (a train step)."""
    cond_dropout = check_real("cond_dropout", cond_dropout, low=0.0, high=1.0)
    if with_cond is False and (cond_dropout > 0 or null_cond is not None):
        raise ValueError(
            "cond_dropout and null_cond need a condition: pass cond (a pytree of batch-leading arrays)"
        )
    path = resolve_path(path)
    coupling = resolve_coupling(coupling)
    time_sampler = resolve_time_sampler(time_sampler)
    if with_cond is False:
        check_labels_given(coupling, with_cond)
    return Options(path, coupling, time_sampler, cond_dropout)


def check_labels_given(coupling: Coupling, with_cond: bool) -> None:
    """A ``by_label`` coupling needs a condition that holds x1's labels."""
    if coupling.by_label and not with_cond:
        raise ValueError(
            f"coupling {coupling!r} pairs within classes (by_label=True) and needs x1's class labels: "
            "pass cond (integer labels of shape [batch], or a dict with a 'label' entry)"
        )


def check_apply_fn(apply_fn: Any, with_cond: bool) -> None:
    """``apply_fn`` must be callable as ``apply_fn(params, t, x[, cond])``."""
    check_callable("apply_fn", apply_fn, ("params", "t", "x", "cond") if with_cond else ("params", "t", "x"))


def check_arguments(
    apply_fn: ApplyFn,
    key: jax.Array,
    x0: jax.Array,
    x1: jax.Array,
    *,
    cond: Any,
    path: Path | str,
    coupling: Coupling | str,
    time_sampler: Callable[..., jax.Array] | str,
    reduction: str,
    weight: Callable[[jax.Array], jax.Array] | None,
    cond_dropout: float,
    null_cond: Any,
    check_path: Callable[[Path], None],
) -> Options:
    """Check the arguments of a loss (``check_path`` checks the resolved path for that loss), in the
    order its errors have always come, and return its options resolved."""
    with_cond = cond is not None
    options = resolve_options(path, coupling, time_sampler, cond_dropout, null_cond, with_cond=with_cond)
    check_apply_fn(apply_fn, with_cond)
    check_key("key", key)
    check_pair(x0, x1)
    check_choice("reduction", reduction, REDUCTIONS)
    check_path(options.path)
    if weight is not None:
        check_callable("weight", weight, ("t",))
    check_null_cond(options.cond_dropout, null_cond)
    if with_cond:
        check_cond("cond", cond, x1.shape[0])
    return options


class Coupled(NamedTuple):
    """The coupled pairs of a batch, their condition, the times and the path's key."""

    x0: jax.Array
    x1: jax.Array
    cond: Any
    pairs: tuple[jax.Array, jax.Array]
    status: dict[str, jax.Array]
    t: jax.Array
    key_path: jax.Array | None


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


def couple(
    key: jax.Array, x0: jax.Array, x1: jax.Array, cond: Any, options: Options, null_cond: Any
) -> Coupled:
    """Couple the batches, drop conditions and draw the times, from checked ``options``.

    The coupling's pairs and the time sampler's times are checked here: they are what user code
    returned (at trace time under jit).
    """
    coupling, with_cond = options.coupling, cond is not None
    dropout = options.cond_dropout > 0
    keys = _split_key(key, coupling.uses_key, options.path.stochastic, dropout)
    key_time, key_coupling, key_path, key_drop = keys
    if with_cond:
        labels = {"labels1": class_labels(cond)} if coupling.by_label else {}
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
        cond = drop_cond(key_drop, cond, null_cond, options.cond_dropout)
    t = options.time_sampler(key_time, x0c.shape[0], x0c.dtype)
    check_output("time_sampler(key, n, dtype)", t, x0c.shape[:1], "[n], one time per sample,")
    check_unit_interval("time_sampler(key, n, dtype)", t)
    return Coupled(x0c, x1c, cond if with_cond else None, pairs, status, t, key_path)


def call_model(apply_fn: ApplyFn, params: Any, sample: PathSample, cond: Any) -> tuple[Any, str]:
    """The model's output at the path's sample, and how the call reads in an error message."""
    if cond is not None:
        return apply_fn(params, sample.t, sample.xt, cond), "apply_fn(params, t, x, cond)"
    return apply_fn(params, sample.t, sample.xt), "apply_fn(params, t, x)"


def weigh_and_reduce(
    losses: jax.Array, t: jax.Array, weight: Callable[[jax.Array], jax.Array] | None, reduction: str
) -> jax.Array:
    """Per-sample ``losses`` [batch] times ``weight(t)`` when given, then their mean (``"mean"``)."""
    if weight is not None:
        w = weight(t)
        check_output("weight(t)", w, t.shape, "[batch], one weight per sample,")
        losses = w.astype(losses.dtype) * losses
    return jnp.mean(losses) if reduction == "mean" else losses

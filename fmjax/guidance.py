"""Classifier-free guidance: a conditional model's velocity pushed away from its unconditional one.

    v_w(t, x | c) = v(t, x | null) + w (v(t, x | c) - v(t, x | null))

w = 0 is the unconditional field, w = 1 the conditional one, w > 1 sharpens the condition (Ho &
Salimans). The model learns both fields at once when trained with ``cfm_loss(..., cond_dropout=p,
null_cond=...)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fmjax._checks import check_callable, check_output, check_real, is_traced

__all__ = ["GuidedVelocity", "guided_velocity"]


def _per_batch(name: str, tree: Any, batch: int, null: Any) -> Any:
    """Each leaf of ``tree`` as [batch, ...]: a leaf with one more axis than ``null``'s matching leaf is
    the batch's own (its leading axis must be ``batch``); one of the same rank is broadcast to all."""
    out = []
    for (where, leaf), ref in zip(
        jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(null), strict=True
    ):
        leaf, ref = jnp.asarray(leaf), jnp.asarray(ref)
        label = name + jax.tree_util.keystr(where)
        if leaf.ndim == ref.ndim + 1:
            if leaf.shape[0] != batch:
                raise ValueError(
                    f"{label} has a batch axis of {leaf.shape[0]}, but x has {batch} samples "
                    f"(give one condition per sample, or one condition, of shape {tuple(ref.shape)}, for all)"
                )
        elif leaf.ndim == ref.ndim:
            leaf = jnp.broadcast_to(leaf[None], (batch, *leaf.shape))
        else:
            raise ValueError(
                f"{label} must have the shape of one sample's condition {tuple(ref.shape)} (null_cond's), "
                f"or [batch, ...] with one per sample; got shape {tuple(leaf.shape)}"
            )
        out.append(leaf)
    return jax.tree.unflatten(jax.tree.structure(tree), out)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["params", "cond", "null_cond", "scale"],
    meta_fields=["apply_fn"],
)
@dataclasses.dataclass(frozen=True)
class GuidedVelocity:
    """``velocity(t, x) = v_null + scale (v_cond - v_null)`` from one call of ``apply_fn`` on the batch
    doubled: ``apply_fn(params, t[2 batch], [x; x], [cond; null_cond])``.

    A pytree over ``params``, ``cond``, ``null_cond`` and ``scale``: a solve compiled for one guidance
    scale or class is reused for the next. Built by ``guided_velocity``.
    """

    apply_fn: Callable[..., jax.Array]
    params: Any
    cond: Any
    null_cond: Any
    scale: jax.Array

    def __call__(self, t: jax.Array, x: jax.Array) -> jax.Array:
        batch = x.shape[0]
        cond = _per_batch("cond", self.cond, batch, self.null_cond)
        null = _per_batch("null_cond", self.null_cond, batch, self.null_cond)
        both = jax.tree.map(lambda c, n: jnp.concatenate([c, n.astype(c.dtype)]), cond, null)
        t2 = jnp.broadcast_to(jnp.asarray(t, x.dtype), (2 * batch,))
        out = self.apply_fn(self.params, t2, jnp.concatenate([x, x]), both)
        check_output("apply_fn(params, t, x, cond)", out, (2 * batch, *x.shape[1:]), "[batch, *dims]")
        v_cond, v_null = out[:batch], out[batch:]
        return v_null + self.scale.astype(out.dtype) * (v_cond - v_null)

    def per_sample_cond(self) -> Any:
        """The condition if it is one per sample (leaves with a batch axis more than ``null_cond``'s),
        else None (one condition for all samples)."""
        ranks = zip(jax.tree.leaves(self.cond), jax.tree.leaves(self.null_cond), strict=True)
        return self.cond if all(jnp.ndim(c) == jnp.ndim(n) + 1 for c, n in ranks) else None

    def with_cond(self, cond: Any) -> GuidedVelocity:
        """This field with another condition (e.g. one sample's, for a per-sample divergence)."""
        return dataclasses.replace(self, cond=cond)


def guided_velocity(
    apply_fn: Callable[..., jax.Array], params: Any, cond: Any, *, scale: float, null_cond: Any
) -> GuidedVelocity:
    """The classifier-free guided field ``velocity(t, x) = v_null + scale (v_cond - v_null)``, for
    ``fmjax.sample`` and ``fmjax.log_likelihood`` as they are.

    v_cond = apply_fn(params, t, x, cond) and v_null = apply_fn(params, t, x, null_cond) come from ONE
    model call on the batch concatenated with itself (t of shape [2 batch]). ``scale`` 0 gives the
    unconditional field, 1 the conditional one.

    Args:
      apply_fn: a conditional model ``apply_fn(params, t, x, cond)`` (e.g. from
        ``fmjax.models.functional`` of ``MLP(..., num_classes=K)``).
      params: its parameters.
      cond: the condition: one sample's (no batch axis, e.g. a class id; used for every sample) or
        one per sample (leaves [batch, ...]); a pytree with ``null_cond``'s structure.
      scale: the guidance weight w (a real number; may be a traced scalar).
      null_cond: one sample's null condition (``model.null_cond()``: for class labels the null class
        id num_classes).

    >>> import jax, jax.numpy as jnp
    >>> from fmjax.models import MLP, functional
    >>> from fmjax.sampling import sample
    >>> model = MLP(dim=2, width=8, depth=1, num_classes=3)
    >>> apply_fn, params = functional(model)
    >>> velocity = guided_velocity(apply_fn, params, jnp.int32(1), scale=2.0, null_cond=model.null_cond())
    >>> sample(velocity, jnp.zeros((5, 2)), solver="euler", steps=4).x1.shape
    (5, 2)
    """
    check_callable("apply_fn", apply_fn, ("params", "t", "x", "cond"))
    if null_cond is None:
        raise ValueError(
            "null_cond is required: the condition meaning 'no condition' (model.null_cond(); for class "
            "labels the null class id num_classes)"
        )
    if cond is None:
        raise ValueError("cond is required: the condition to guide toward (e.g. a class id)")
    cond_tree, null_tree = jax.tree.structure(cond), jax.tree.structure(null_cond)
    if cond_tree != null_tree:
        raise ValueError(f"cond must have the structure of null_cond, {null_tree}; got {cond_tree}")
    if is_traced(scale):
        scale = jnp.asarray(scale)
        real = jnp.issubdtype(scale.dtype, jnp.floating) or jnp.issubdtype(scale.dtype, jnp.integer)
        if scale.shape != () or not real:
            raise TypeError(f"scale must be a real scalar; got shape {scale.shape} and dtype {scale.dtype}")
    else:
        scale = jnp.asarray(check_real("scale", scale), jnp.float32)
    return GuidedVelocity(apply_fn=apply_fn, params=params, cond=cond, null_cond=null_cond, scale=scale)

"""The condition input of the bundled models: class labels with a null class, continuous features with a
null mask, embedded into one vector per sample."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fmjax._checks import check_int, is_traced

__all__ = ["Condition", "Conditioned", "check_condition_sizes"]


def check_condition_sizes(num_classes: Any, cond_dim: Any) -> tuple[int | None, int | None]:
    """``(num_classes, cond_dim)`` as ints >= 1 or None, named when they are not."""
    if num_classes is not None:
        num_classes = check_int("num_classes", num_classes, low=1)
    if cond_dim is not None:
        cond_dim = check_int("cond_dim", cond_dim, low=1)
    return num_classes, cond_dim


class Conditioned:
    """What the bundled models share about their optional condition: ``conditional``, ``null_cond`` and the
    ``condition`` embedding, built by ``_add_condition`` after the model's own layers (so that a
    conditional model's other weights are those of the unconditional one)."""

    num_classes: int | None
    cond_dim: int | None

    def _add_condition(self, num_classes: int | None, cond_dim: int | None, features: int, rngs: nnx.Rngs):
        self.num_classes, self.cond_dim = num_classes, cond_dim
        self.condition = (
            Condition(num_classes=num_classes, cond_dim=cond_dim, features=features, rngs=rngs)
            if self.conditional
            else None
        )

    @property
    def conditional(self) -> bool:
        """Whether the model takes a condition (``num_classes`` or ``cond_dim`` was given)."""
        return self.num_classes is not None or self.cond_dim is not None

    def null_cond(self) -> Any:
        """One sample's null condition (no batch axis), for ``cfm_loss(null_cond=...)`` and
        ``fmjax.guided_velocity``: the class id ``num_classes``, and/or zero features with mask 0
        (``{"features": zeros(cond_dim), "mask": 0.0}``); None for an unconditional model."""
        return self.condition.null() if self.conditional else None


class Condition(nnx.Module):
    """Embeds a model's condition into ``features`` numbers per sample.

    Class labels (``num_classes`` = K): an embedding table of K + 1 rows; ids 0..K-1 are the classes and
    id K is the null class (no condition, for classifier-free guidance). Continuous features
    (``cond_dim`` = D): a linear map of the D features, or, where the sample's ``mask`` is 0, a learned
    null vector. The two embeddings are summed.

    The condition's forms (``cond`` of ``__call__``):
      - labels only: an int array [batch] (or ``{"label": labels}``);
      - features only: a float array [batch, D] (all present), or ``{"features": f, "mask": m}`` with
        m of shape [batch], nonzero (1) where the features are given and 0 where the condition is null
        (the features there are ignored);
      - both: ``{"label": labels, "features": f}`` plus an optional ``"mask"`` (for the features).
    ``null()`` is one sample's null condition in the full form (for ``cfm_loss(null_cond=...)`` and
    ``guided_velocity``): a condition given with a mask must then carry it in every batch.
    """

    def __init__(self, *, num_classes: int | None, cond_dim: int | None, features: int, rngs: nnx.Rngs):
        self.num_classes = num_classes
        self.cond_dim = cond_dim
        self.label_embed = nnx.Embed(num_classes + 1, features, rngs=rngs) if num_classes else None
        self.features_in = nnx.Linear(cond_dim, features, rngs=rngs) if cond_dim else None
        self.null_features = nnx.Param(jnp.zeros((features,))) if cond_dim else None

    def describe(self) -> str:
        """The condition this module takes, in words (for error messages)."""
        parts = []
        if self.num_classes:
            parts.append(
                f"int labels [batch] in 0..{self.num_classes} ({self.num_classes} is the null class)"
            )
        if self.cond_dim:
            parts.append(f"float features [batch, {self.cond_dim}] with an optional 'mask' [batch]")
        if len(parts) == 2:
            return "a dict {'label': " + parts[0] + ", 'features': " + parts[1] + "}"
        return parts[0] + (
            " (or a dict {'label': ...})" if self.num_classes else " (or {'features', 'mask'})"
        )

    def null(self) -> Any:
        """One sample's null condition: the null class id K, and/or zero features with mask 0."""
        label = jnp.asarray(self.num_classes or 0, jnp.int32)
        features = {"features": jnp.zeros((self.cond_dim or 0,), jnp.float32), "mask": jnp.float32(0.0)}
        if self.num_classes and self.cond_dim:
            return {"label": label, **features}
        return label if self.num_classes else features

    def _parts(self, cond: Any) -> tuple[Any, Any, Any]:
        """``(labels, features, mask)`` of a condition in any accepted form (None where absent)."""
        if isinstance(cond, Mapping):
            required = ({"label"} if self.num_classes else set()) | ({"features"} if self.cond_dim else set())
            allowed = required | ({"mask"} if self.cond_dim else set())
            unknown, missing = sorted(set(cond) - allowed), sorted(required - set(cond))
            if unknown or missing:
                raise ValueError(
                    f"cond must be {self.describe()}; got a dict with keys {sorted(cond)}"
                    + (f" (unknown: {unknown})" if unknown else f" (missing: {missing})")
                )
            return cond.get("label"), cond.get("features"), cond.get("mask")
        if self.num_classes and self.cond_dim:
            raise TypeError(f"cond must be {self.describe()}; got {type(cond).__name__}")
        if not hasattr(cond, "dtype"):
            raise TypeError(f"cond must be {self.describe()}; got {type(cond).__name__}")
        return (cond, None, None) if self.num_classes else (None, cond, None)

    def __call__(self, cond: Any, batch: int, dtype: Any) -> jax.Array:
        """The embedding of ``cond`` for ``batch`` samples, shape [batch, features], in ``dtype``."""
        labels, features, mask = self._parts(cond)
        out = jnp.zeros((), dtype)
        if labels is not None:
            name = "cond['label']" if isinstance(cond, Mapping) else "cond"
            labels = jnp.asarray(labels)
            if labels.dtype == jnp.bool_ or not jnp.issubdtype(labels.dtype, jnp.integer):
                raise TypeError(f"{name} must hold integer class labels; got dtype {labels.dtype}")
            if labels.shape != (batch,):
                raise ValueError(f"{name} must have shape [batch] = ({batch},); got {labels.shape}")
            if not is_traced(labels):
                low, high = int(np.min(labels)), int(np.max(labels))
                if low < 0 or high > self.num_classes:
                    raise ValueError(
                        f"{name} must lie in 0..{self.num_classes} (num_classes={self.num_classes}, "
                        f"{self.num_classes} is the null class); got values from {low} to {high}"
                    )
            out = out + self.label_embed(labels).astype(dtype)
        if features is not None:
            name = "cond['features']" if isinstance(cond, Mapping) else "cond"
            features = jnp.asarray(features)
            if not jnp.issubdtype(features.dtype, jnp.floating):
                raise TypeError(f"{name} must be a floating array of features; got dtype {features.dtype}")
            if features.shape != (batch, self.cond_dim):
                raise ValueError(
                    f"{name} must have shape [batch, cond_dim] = ({batch}, {self.cond_dim}); "
                    f"got {features.shape}"
                )
            given = self.features_in(features.astype(dtype))
            if mask is not None:
                mask = jnp.asarray(mask)
                if mask.shape != (batch,):
                    raise ValueError(f"cond['mask'] must have shape [batch] = ({batch},); got {mask.shape}")
                null = self.null_features[...].astype(dtype)
                given = jnp.where((mask != 0)[:, None], given, null)
            out = out + given
        return jnp.broadcast_to(out, (batch, out.shape[-1]))

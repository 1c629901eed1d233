"""Minibatch couplings between source and target batches.

A coupling is a callable ``coupling(key, x0, x1) -> (i, j)`` returning int32 index arrays of shape [n];
the coupled pairs are ``(x0[i], x1[j])``, so labels or conditions attached to either batch follow by
the same indexing. Couplings are static pytrees (frozen dataclasses holding only hyperparameters) and
are jit-able.

>>> import jax, jax.numpy as jnp
>>> from fmjax.couplings import independent
>>> i, j = independent()(jax.random.key(0), jnp.zeros((3, 2)), jnp.ones((3, 2)))
>>> i.tolist(), j.tolist()
([0, 1, 2], [0, 1, 2])
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fmjax._checks import check_batch, check_choice

__all__ = ["Coupling", "Independent", "independent", "COUPLINGS", "make_coupling"]

SCOPES = ("local", "global")


class Coupling:
    """Base class of couplings: ``__call__(key, x0, x1) -> (i, j)``.

    ``scope`` says what a coupling sees when the batch is sharded over devices: "local" couples each
    device's shard on its own, "global" couples the whole global batch.
    """

    scope: str = "local"
    uses_key: bool = False  # whether the coupling draws random numbers (else key may be None)

    def pairs(self, key: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Return (i, j) for a single, unsharded batch; subclasses implement this."""
        raise NotImplementedError(f"{type(self).__name__} must define pairs(key, x0, x1)")

    def __call__(self, key: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Couple the batches ``x0`` and ``x1`` (shape [n, *dims] each); return (i, j) of shape [n]."""
        check_batch("x0", x0)
        check_batch("x1", x1)
        if x0.shape[0] != x1.shape[0]:
            raise ValueError(f"x0 and x1 must have the same batch size; got {x0.shape[0]} and {x1.shape[0]}")
        return self.pairs(key, x0, x1)

    def apply(
        self, key: jax.Array, x0: jax.Array, x1: jax.Array
    ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
        """Couple and gather: return ``(x0[i], x1[j], (i, j))``."""
        i, j = self(key, x0, x1)
        return x0[i], x1[j], (i, j)


def _coupling_dataclass(cls):
    cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    jax.tree_util.register_static(cls)
    return cls


@_coupling_dataclass
class Independent(Coupling):
    """The independent coupling: x0 and x1 are already independent draws, so pairs are (x0[k], x1[k])."""

    scope: str = "local"

    def __post_init__(self):
        check_choice("scope", self.scope, SCOPES)

    def pairs(self, key, x0, x1):
        idx = jnp.arange(x0.shape[0], dtype=jnp.int32)
        return idx, idx

    def apply(self, key, x0, x1):
        # the pairs are the identity: skip the gather, which XLA would otherwise run as a copy
        pairs = self(key, x0, x1)
        return x0, x1, pairs


def independent(*, scope: str = "local") -> Independent:
    """Return the independent coupling (I-CFM, rectified flow, Lipman's FM)."""
    return Independent(scope=scope)


COUPLINGS = {"independent": independent}
"""Coupling factories by name, as accepted by ``make_coupling`` and the CLI's ``--coupling``."""


def make_coupling(name: str, **kwargs) -> Coupling:
    """Build a coupling by name (see ``COUPLINGS``) with the factory's keyword arguments."""
    from fmjax._checks import lookup

    return lookup("coupling", name, COUPLINGS)(**kwargs)

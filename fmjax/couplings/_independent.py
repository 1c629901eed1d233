"""The independent coupling: the batches are paired as they come."""

from __future__ import annotations

import jax.numpy as jnp

from fmjax._checks import check_choice
from fmjax.couplings._base import SCOPES, Coupling, _coupling_dataclass


@_coupling_dataclass
class Independent(Coupling):
    """The independent coupling: x0 and x1 are already independent draws, so pairs are (x0[k], x1[k])."""

    scope: str = "local"

    def __post_init__(self):
        check_choice("scope", self.scope, SCOPES)

    def pairs(self, key, x0, x1):
        idx = jnp.arange(x0.shape[0], dtype=jnp.int32)
        return idx, idx

    def _gather(self, x0, x1, i, j):
        # the pairs are the identity: skip the gather, which XLA would otherwise run as a copy
        return x0, x1

    def _gather_cond(self, cond, j):
        return cond


def independent(*, scope: str = "local") -> Independent:
    """Return the independent coupling (I-CFM, rectified flow, Lipman's FM)."""
    return Independent(scope=scope)

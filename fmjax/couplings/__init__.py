"""Minibatch couplings between source and target batches.

A coupling is a callable ``coupling(key, x0, x1) -> (i, j)`` returning int32 index arrays of shape [n];
the coupled pairs are ``(x0[i], x1[j])``, so labels or conditions attached to either batch follow by
the same indexing. Couplings are static pytrees (frozen dataclasses holding only hyperparameters) and
are jit-able.

Every coupling also reports whether its solver succeeded:
``coupling.apply_with_status(key, x0, x1) -> (x0[i], x1[j], (i, j), status)``, where ``status`` is a
dict of two scalar arrays, ``"coupling_converged"`` (bool) and ``"coupling_error"`` (float32: the
Sinkhorn plan's marginal error, or an unbalanced plan's optimality residual; 0.0 for the independent
coupling; 0.0 for the exact coupling when its host solve succeeded and inf when it failed). Under
``jit`` the status is the only report; called eagerly, a Sinkhorn coupling that did not converge warns
(``CouplingWarning``) and an exact coupling whose host solve failed raises.

Label-aware couplings (``exact(by_label=True)``, ``sinkhorn(..., by_label=True)``,
``schrodinger_bridge(..., by_label=True)``) pair only within a class: every call takes the integer
class labels as keywords, ``coupling(key, x0, x1, labels1=y1)`` (x1's labels alone) or
``labels0=y0, labels1=y1`` (both sides); see ``Exact`` for what happens when the class counts of the
two sides differ. ``apply_with_cond(key, x0, x1, cond, ...)`` also moves a condition (any pytree with
the batch as leading axis of its leaves, paired with x1) by the same j index: ``cond[j]``.

The OT couplings minimise squared Euclidean distances unless given another cost: ``cost=f`` (a hashable
function, ``f(x0, x1) -> [n, m]``) or ``manifold=M`` (squared geodesic distances ``M.dist(x, y) ** 2``)
for ``exact`` and ``sinkhorn`` (``manifold`` for ``schrodinger_bridge`` too). ``sinkhorn(tau_a=...,
tau_b=...)`` relaxes the marginals (unbalanced OT, ott-jax's ``tau = rho / (rho + epsilon)``; see
``Sinkhorn``).

>>> import jax, jax.numpy as jnp
>>> from fmjax.couplings import independent
>>> i, j = independent()(jax.random.key(0), jnp.zeros((3, 2)), jnp.ones((3, 2)))
>>> i.tolist(), j.tolist()
([0, 1, 2], [0, 1, 2])
>>> _, _, _, status = independent().apply_with_status(None, jnp.zeros((3, 2)), jnp.ones((3, 2)))
>>> bool(status["coupling_converged"]), float(status["coupling_error"])
(True, 0.0)
"""

from __future__ import annotations

from fmjax.couplings._base import SCOPES, Coupling, CouplingWarning, check_cond
from fmjax.couplings._costs import squared_distances
from fmjax.couplings._exact import (
    HOST_NOT_FINITE,
    HOST_SOLVED,
    HOST_SOLVER_FAILED,
    HOST_STATUS,
    POINTS_ON_HOST_MAX_DIM,
    Exact,
    exact,
)
from fmjax.couplings._independent import Independent, independent
from fmjax.couplings._registry import COUPLINGS, make_coupling, resolve_coupling
from fmjax.couplings._sampling import sample_plan_pairs, sample_plan_rows
from fmjax.couplings._sharding import GlobalBatch, PerShard
from fmjax.couplings._sinkhorn import (
    MAX_SINKHORN_ITERATIONS,
    Sinkhorn,
    schrodinger_bridge,
    sinkhorn,
)

__all__ = [
    "Coupling",
    "CouplingWarning",
    "Independent",
    "Exact",
    "Sinkhorn",
    "independent",
    "exact",
    "sinkhorn",
    "schrodinger_bridge",
    "PerShard",
    "GlobalBatch",
    "sample_plan_rows",
    "sample_plan_pairs",
    "squared_distances",
    "check_cond",
    "COUPLINGS",
    "make_coupling",
    "resolve_coupling",
    "SCOPES",
    "MAX_SINKHORN_ITERATIONS",
    "POINTS_ON_HOST_MAX_DIM",
    "HOST_STATUS",
    "HOST_SOLVED",
    "HOST_NOT_FINITE",
    "HOST_SOLVER_FAILED",
]

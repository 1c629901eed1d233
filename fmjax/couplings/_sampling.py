"""Drawing index pairs from a transport plan: one column per row, or pairs from the whole plan."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_plan_rows(key: jax.Array, plan: jax.Array) -> jax.Array:
    """Draw one column per row, j_i ~ plan[i, :] / sum(plan[i, :]), by inverse CDF: O(n m), n uniforms.

    With uniform marginals each row of a transport plan holds mass 1/n, so this samples the plan
    without duplicating or dropping any row.
    """
    cdf = jnp.cumsum(plan, axis=1)
    u = jax.random.uniform(key, (plan.shape[0], 1), cdf.dtype) * cdf[:, -1:]
    j = jnp.sum(cdf <= u, axis=1)
    return jnp.minimum(j, plan.shape[1] - 1).astype(jnp.int32)


def sample_plan_pairs(key: jax.Array, plan: jax.Array, num_pairs: int) -> tuple[jax.Array, jax.Array]:
    """Draw ``num_pairs`` index pairs ``(i_k, j_k) ~ plan[i, j] / sum(plan)``, independently.

    ``plan`` is a non-negative [n, m] matrix of positive total mass (it need not sum to one); ``i``,
    ``j`` are int32 of shape [num_pairs]. For a plan whose row sums differ (unbalanced OT), this samples
    the normalised plan where ``sample_plan_rows`` would not: a source row is drawn as often as its
    mass says, possibly several times or never. Drawn in two stages by inverse CDF, the row from the
    row sums and then the column from that row, O(n m + num_pairs (m + log n)).

    >>> import jax, jax.numpy as jnp
    >>> i, j = sample_plan_pairs(jax.random.key(0), jnp.array([[0.0, 0.3], [0.0, 0.0]]), 4)
    >>> i.tolist(), j.tolist()  # all the mass is at (0, 1)
    ([0, 0, 0, 0], [1, 1, 1, 1])
    """
    return _sample_log_pairs(key, jnp.log(plan), num_pairs)


def _sample_log_pairs(key: jax.Array, log_plan: jax.Array, num_pairs: int) -> tuple[jax.Array, jax.Array]:
    """``sample_plan_pairs`` from the plan's logarithm [n, m] (entries may be -inf), in the log domain."""
    key_rows, key_columns = jax.random.split(key)
    row_max = jnp.max(log_plan, axis=1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    within = jnp.exp(log_plan - row_max)  # each row's largest weight is 1 (an empty row's are 0)
    log_rows = row_max[:, 0] + jnp.log(jnp.sum(within, axis=1))
    cdf = jnp.cumsum(jnp.exp(log_rows - jnp.max(log_rows)))
    u = jax.random.uniform(key_rows, (num_pairs,), cdf.dtype) * cdf[-1]
    i = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), log_plan.shape[0] - 1).astype(jnp.int32)
    return i, sample_plan_rows(key_columns, within[i])

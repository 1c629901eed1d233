"""Costs between two clouds: the default squared distances (centred and scaled by powers of two to stay in
float32 range), and a user's cost function or a manifold's squared geodesic distance."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fmjax._checks import ArgumentError, check_callable, check_output, describe


def _power_of_two_exponent(a: jax.Array, b: jax.Array) -> jax.Array:
    """e with max(|a|, |b|) = m 2^e, m in [0.5, 1); 0 when the maximum is 0 or not finite."""
    top = jnp.maximum(jnp.max(jnp.abs(a)), jnp.max(jnp.abs(b)))
    _, e = jnp.frexp(top)
    return jnp.where(jnp.isfinite(top) & (top > 0), e, 0)


def _times_power_of_two(x: jax.Array, k: jax.Array) -> jax.Array:
    """x 2^k, exact: two scalar factors 2^(k//2) and 2^(k - k//2), each a normal float for |k| <= 250."""
    half = k // 2
    return x * jnp.ldexp(jnp.ones((), x.dtype), half) * jnp.ldexp(jnp.ones((), x.dtype), k - half)


def _centred(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two clouds [n, d], [m, d] less their joint mean (over all n + m points)."""
    center = (jnp.sum(a, axis=0) + jnp.sum(b, axis=0)) / (a.shape[0] + b.shape[0])
    return a - center, b - center


def _normalised(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Centre two clouds [n, d] on their joint mean and scale them by a power of two: ``(a', b', k)``.

    ``a' = (a - c) 2^k`` (likewise b') with max(|a'|, |b'|) in [0.5, 1), or 0 when all points coincide.
    Squared distances and the optimal assignment are invariant to the translation; the costs scale by
    4^k. Scaling by a power of two is exact in floating point, so for data of ordinary magnitude the
    costs are bitwise 4^k times the unscaled ones; for data near the float32 range (1e30, 1e-30) it
    keeps ``||a - b||^2`` from overflowing or underflowing. The first scaling, before centring, keeps
    the joint mean's sum in range. (XLA flushes float32 subnormals, below 1.2e-38, to zero.)
    """
    e1 = _power_of_two_exponent(a, b)
    a, b = _times_power_of_two(a, -e1), _times_power_of_two(b, -e1)
    a, b = _centred(a, b)
    e2 = _power_of_two_exponent(a, b)
    return _times_power_of_two(a, -e2), _times_power_of_two(b, -e2), -(e1 + e2)


def _centred_costs(a: jax.Array, b: jax.Array) -> jax.Array:
    """||a_i - b_j||^2 for centred clouds [n, d], [m, d] at full float32 matmul precision, clipped at 0."""
    # full float32 products: the default precision is TF32 on recent GPUs and one bf16 pass on TPUs,
    # which would make the "exact" coupling exact for other costs than the batch's
    cross = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    cost = jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * cross
    return jnp.maximum(cost, 0.0)


def squared_distances(x0: jax.Array, x1: jax.Array) -> jax.Array:
    """Cost matrix C[i, j] = ||x0[i] - x1[j]||^2 over flattened samples, shape [n, m].

    Both clouds are first centred on their joint mean (the cost is translation invariant), which
    keeps the matrix-product form ||a||^2 + ||b||^2 - 2 a.b accurate in float32.
    """
    return _centred_costs(*_centred(x0.reshape(x0.shape[0], -1), x1.reshape(x1.shape[0], -1)))


def _is_hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def check_cost(cost: Any, manifold: Any) -> None:
    """Check a coupling's ``cost`` / ``manifold`` where the user hands them in (at most one of the two).

    ``cost`` must be a hashable callable ``cost(x, y)`` and ``manifold`` a hashable object with a ``dist``
    method: a coupling is a static pytree, hashed by ``jit``'s cache, so both must hash (functions,
    frozen dataclasses do). What ``cost`` returns is checked per batch shape by ``check_cost_output``.
    """
    if cost is not None and manifold is not None:
        raise ArgumentError(
            lambda n: (
                f"give either {n('cost')} or {n('manifold')}, not both: {n('manifold')}=M means "
                f"the cost M.dist(x, y) ** 2; got cost={describe(cost)} and manifold={describe(manifold)}"
            )
        )
    if cost is not None:
        check_callable("cost", cost, ("x", "y"))
        if not _is_hashable(cost):
            raise TypeError(
                f"cost must be hashable (a function, or a frozen dataclass): a coupling is a static pytree "
                f"that jit caches by hash; got {describe(cost)}"
            )
    if manifold is not None:
        if not callable(getattr(manifold, "dist", None)):
            raise TypeError(
                "manifold must be an fmjax manifold (e.g. fmjax.manifolds.Sphere()) with a method "
                f"dist(x, y); got {describe(manifold)}, which has no dist method"
            )
        if not _is_hashable(manifold):
            raise TypeError(
                f"manifold must be hashable (a frozen dataclass): a coupling is a static pytree that jit "
                f"caches by hash; got {describe(manifold)}"
            )


def cost_matrix(cost: Callable | None, manifold: Any, x0: jax.Array, x1: jax.Array) -> jax.Array:
    """The user's cost matrix C[i, j] of the batches x0 [n, *dims], x1 [m, *dims], shape [n, m].

    ``cost(x0, x1)``, or ``manifold.dist(x0[:, None], x1[None]) ** 2`` (squared geodesic distances; the
    manifold's methods act on the last axis and broadcast the leading ones); at least float32.
    """
    if manifold is not None:
        out = manifold.dist(x0[:, None], x1[None]) ** 2
    else:
        out = cost(x0, x1)
    return out.astype(jnp.promote_types(out.dtype, jnp.float32))


def check_cost_output(cost: Callable | None, manifold: Any, x0: jax.Array, x1: jax.Array) -> None:
    """Check, by ``jax.eval_shape`` (no computation), that the cost gives one real [n, m] matrix."""
    if cost is None and manifold is None:
        return
    args = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (x0, x1)]
    shape = (x0.shape[0], x1.shape[0])
    if manifold is not None:
        out = jax.eval_shape(lambda a, b: manifold.dist(a[:, None], b[None]), *args)
        call = "manifold.dist(x[:, None], y[None])"
    else:
        out = jax.eval_shape(cost, *args)
        call = "cost(x, y)"
    check_output(call, out, shape, "[n, m] for x of shape [n, *dims] and y of shape [m, *dims]")

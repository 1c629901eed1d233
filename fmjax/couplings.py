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

import abc
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fmjax._checks import check_batch, check_choice, check_finite, check_int, check_real, lookup

__all__ = [
    "Coupling",
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
    "squared_distances",
    "COUPLINGS",
    "make_coupling",
]

SCOPES = ("local", "global")


class Coupling(abc.ABC):
    """Base class of couplings: ``__call__(key, x0, x1) -> (i, j)``.

    ``scope`` says what a coupling sees when the batch is sharded over devices: "local" couples each
    device's shard on its own, "global" couples the whole global batch.
    """

    scope: str = "local"
    uses_key: bool = False  # whether the coupling draws random numbers (else key may be None)

    @abc.abstractmethod
    def pairs(self, key: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Return (i, j) for a single, unsharded batch; subclasses implement this."""

    def __call__(self, key: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Couple the batches ``x0`` and ``x1`` (shape [n, *dims] each); return (i, j) of shape [n]."""
        check_batch("x0", x0)
        check_batch("x1", x1)
        check_finite("x0", x0)
        check_finite("x1", x1)
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


def squared_distances(x0: jax.Array, x1: jax.Array) -> jax.Array:
    """Cost matrix C[i, j] = ||x0[i] - x1[j]||^2 over flattened samples, shape [n, m].

    Both clouds are first centred on their joint mean (the cost is translation invariant), which
    keeps the matrix-product form ||a||^2 + ||b||^2 - 2 a.b accurate in float32.
    """
    a = x0.reshape(x0.shape[0], -1)
    b = x1.reshape(x1.shape[0], -1)
    center = (jnp.sum(a, axis=0) + jnp.sum(b, axis=0)) / (a.shape[0] + b.shape[0])
    a, b = a - center, b - center
    # full float32 products: the default precision is TF32 on recent GPUs and one bf16 pass on TPUs,
    # which would make the "exact" coupling exact for other costs than the batch's
    cross = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    cost = jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * cross
    return jnp.maximum(cost, 0.0)


# Up to this many dimensions per sample the exact coupling sends the points to the host, which forms
# the costs itself; above it the device builds the n x n cost matrix with a matrix product.
POINTS_ON_HOST_MAX_DIM = 32


def _host_assignment(cost):
    from fmjax._assignment import solve_assignment

    return solve_assignment(cost)


def _host_assignment_points(x0, x1):
    from fmjax._assignment import solve_assignment_points

    return solve_assignment_points(x0, x1)


@_coupling_dataclass
class Exact(Coupling):
    """Exact minibatch optimal transport (OT-CFM): the permutation minimising sum_i ||x0[i] - x1[j_i]||^2.

    The assignment is solved on the host by fmjax's compiled solver (an epsilon-scaling auction for
    the duals, then Jonker-Volgenant shortest augmenting paths, exact for the float32-rounded costs).
    The work is split in two so that a training loop can run it off the device's critical path:
    ``host_inputs(x0, x1)`` runs on the device (jit-able) and gives what the host needs, and
    ``solve_host(inputs)`` runs on the host (numpy in, numpy out; the C solver releases the GIL, so
    several solves run on threads in parallel). ``pairs`` chains the two through ``jax.pure_callback``,
    so the coupling is also usable inside a jitted loss (``cfm_loss``, ``make_train_step``), where the
    device waits for the solve; ``fmjax train`` instead solves batch k+1 while the device runs step k.

    For samples of at most 32 dimensions the host gets the centred points and forms the costs itself
    (float64, rounded once); for larger ones the device builds the cost matrix at full float32
    precision. Returns (arange(n), j): no x0 is duplicated or dropped.
    """

    scope: str = "local"

    def __post_init__(self):
        check_choice("scope", self.scope, SCOPES)

    def host_inputs(self, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, ...]:
        """What ``solve_host`` needs, computed on the device: the centred float32 points ``(a, b)`` of
        shape [n, d] when d <= 32, else the float32 cost matrix ``(C,)`` of shape [n, n]."""
        n = x0.shape[0]
        a = x0.reshape(n, -1)
        b = x1.reshape(n, -1)
        if a.shape[1] <= POINTS_ON_HOST_MAX_DIM:
            center = (jnp.sum(a, axis=0) + jnp.sum(b, axis=0)) / (2 * n)
            return (a - center).astype(jnp.float32), (b - center).astype(jnp.float32)
        return (squared_distances(x0, x1).astype(jnp.float32),)

    @staticmethod
    def solve_host(inputs: tuple) -> np.ndarray:
        """The optimal ``j`` (int32, shape [n]) from ``host_inputs``'s arrays, on the host."""
        if len(inputs) == 2:
            return np.asarray(_host_assignment_points(*inputs), np.int32)
        return np.asarray(_host_assignment(inputs[0]), np.int32)

    def pairs(self, key, x0, x1):
        n = x0.shape[0]
        out = jax.ShapeDtypeStruct((n,), jnp.int32)
        inputs = self.host_inputs(x0, x1)
        j = jax.pure_callback(lambda *arrays: self.solve_host(arrays), out, *inputs, vmap_method="sequential")
        return jnp.arange(n, dtype=jnp.int32), j


def sample_plan_rows(key: jax.Array, plan: jax.Array) -> jax.Array:
    """Draw one column per row, j_i ~ plan[i, :] / sum(plan[i, :]), by inverse CDF: O(n m), n uniforms.

    With uniform marginals each row of a transport plan holds mass 1/n, so this samples the plan
    without duplicating or dropping any row.
    """
    cdf = jnp.cumsum(plan, axis=1)
    u = jax.random.uniform(key, (plan.shape[0], 1), cdf.dtype) * cdf[:, -1:]
    j = jnp.sum(cdf <= u, axis=1)
    return jnp.minimum(j, plan.shape[1] - 1).astype(jnp.int32)


@_coupling_dataclass
class Sinkhorn(Coupling):
    """Entropic OT coupling with ott-jax's Sinkhorn; each x0[i] is paired with a draw from row i of the plan.

    ``epsilon`` is the entropic regularisation: relative to the mean of the cost matrix when
    ``relative_epsilon`` is True, absolute otherwise. ``threshold`` is Sinkhorn's marginal error
    tolerance and ``max_iterations`` its iteration cap.
    """

    epsilon: float = 0.05
    relative_epsilon: bool = True
    max_iterations: int = 2000
    threshold: float = 1e-3
    scope: str = "local"
    uses_key: bool = dataclasses.field(default=True, init=False)

    def __post_init__(self):
        check_real("epsilon", self.epsilon, low=0.0, low_inclusive=False)
        check_int("max_iterations", self.max_iterations, low=1)
        check_real("threshold", self.threshold, low=0.0, low_inclusive=False)
        if not isinstance(self.relative_epsilon, bool):
            raise TypeError(f"relative_epsilon must be a bool; got {self.relative_epsilon!r}")
        check_choice("scope", self.scope, SCOPES)

    def plan(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        """The entropic transport plan between the two batches (uniform weights), shape [n, n]."""
        from ott.geometry import pointcloud
        from ott.problems.linear import linear_problem
        from ott.solvers.linear import sinkhorn

        a = x0.reshape(x0.shape[0], -1)
        b = x1.reshape(x1.shape[0], -1)
        geom = pointcloud.PointCloud(
            a, b, epsilon=self.epsilon, relative_epsilon="mean" if self.relative_epsilon else None
        )
        solver = sinkhorn.Sinkhorn(max_iterations=self.max_iterations, threshold=self.threshold)
        return solver(linear_problem.LinearProblem(geom)).matrix

    def pairs(self, key, x0, x1):
        if key is None:
            raise ValueError("key is required: the Sinkhorn coupling samples its plan")
        j = sample_plan_rows(key, self.plan(x0, x1))
        return jnp.arange(x0.shape[0], dtype=jnp.int32), j


@dataclasses.dataclass(frozen=True)
class _OnMesh(Coupling):
    """A coupling ``inner`` placed on the data axis ``axis`` of ``mesh`` by ``make_train_step``."""

    inner: Coupling
    mesh: jax.sharding.Mesh
    axis: str = "data"

    @property
    def uses_key(self) -> bool:
        return self.inner.uses_key

    def pairs(self, key, x0, x1):
        return self.inner.pairs(key, x0, x1)

    def _on_each_device(self, key, x0, x1, batch_spec, *, fold_in_device: bool = False):
        """``inner.apply`` on every device, on the part of the batch ``batch_spec`` gives it.

        Inside ``shard_map`` the solver runs with no collective; the key is replicated and, with
        ``fold_in_device``, folded with the device's index along ``axis``.
        """
        from jax.sharding import PartitionSpec

        def body(key, x0, x1):
            if fold_in_device and key is not None:
                key = jax.random.fold_in(key, jax.lax.axis_index(self.axis))
            a, b, (i, j) = self.inner.apply(key, x0, x1)
            return a, b, i, j

        a, b, i, j = jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=(PartitionSpec(), batch_spec, batch_spec),
            out_specs=(batch_spec,) * 4,
            check_vma=False,
        )(key, x0, x1)
        return a, b, (i, j)


@dataclasses.dataclass(frozen=True)
class PerShard(_OnMesh):
    """Runs ``inner`` on each device's shard of a batch sharded over ``axis`` of ``mesh`` (scope "local").

    Built by ``make_train_step`` for a coupling with ``scope="local"`` when it is given a mesh; each
    shard draws from its own key (the shared key folded with the shard's index) and its pairs index
    into the shard, so the gathered pairs never cross devices, as in TorchCFM's DDP training.
    """

    @property
    def scope(self) -> str:
        return "local"

    def apply(self, key, x0, x1):
        from jax.sharding import PartitionSpec

        return self._on_each_device(key, x0, x1, PartitionSpec(self.axis), fold_in_device=True)


jax.tree_util.register_static(PerShard)


@dataclasses.dataclass(frozen=True)
class GlobalBatch(_OnMesh):
    """Runs ``inner`` on the whole global batch of a sharded step (scope "global").

    Built by ``make_train_step`` for a coupling with ``scope="global"`` when it is given a mesh: the
    batch is gathered (replicated) before coupling, and the coupled batch is resharded over ``axis``,
    so each device trains on its slice of globally coupled pairs.
    """

    @property
    def scope(self) -> str:
        return "global"

    def apply(self, key, x0, x1):
        from jax.sharding import NamedSharding, PartitionSpec

        sharded = NamedSharding(self.mesh, PartitionSpec(self.axis))
        # The batch is gathered once; then every device couples the whole batch on its own, with no
        # collective inside the solver (left to the partitioner, Sinkhorn's loop and the exact
        # assignment's host callback were split over the devices and paid a collective per iteration).
        a, b, pairs = self._on_each_device(key, x0, x1, PartitionSpec())
        return (
            jax.lax.with_sharding_constraint(a, sharded),
            jax.lax.with_sharding_constraint(b, sharded),
            pairs,
        )


jax.tree_util.register_static(GlobalBatch)


def independent(*, scope: str = "local") -> Independent:
    """Return the independent coupling (I-CFM, rectified flow, Lipman's FM)."""
    return Independent(scope=scope)


def exact(*, scope: str = "local") -> Exact:
    """Return the exact OT coupling (OT-CFM): an optimal permutation of x1 for x0."""
    return Exact(scope=scope)


def sinkhorn(
    *,
    epsilon: float = 0.05,
    relative_epsilon: bool = True,
    max_iterations: int = 2000,
    threshold: float = 1e-3,
    scope: str = "local",
) -> Sinkhorn:
    """Return the entropic OT coupling; ``epsilon`` is relative to the mean cost unless told otherwise."""
    return Sinkhorn(
        epsilon=epsilon,
        relative_epsilon=relative_epsilon,
        max_iterations=max_iterations,
        threshold=threshold,
        scope=scope,
    )


def schrodinger_bridge(
    sigma: float = 1.0, *, max_iterations: int = 2000, threshold: float = 1e-3, scope: str = "local"
) -> Sinkhorn:
    """Return SB-CFM's coupling: entropic OT with absolute epsilon = 2 sigma^2 on squared distances.

    Pair it with ``fmjax.paths.SchrodingerBridge(sigma=sigma)``; for sigma = 0 use ``exact()``.
    """
    sigma = check_real("sigma", sigma, low=0.0, low_inclusive=False)
    return Sinkhorn(
        epsilon=2 * sigma**2,
        relative_epsilon=False,
        max_iterations=max_iterations,
        threshold=threshold,
        scope=scope,
    )


COUPLINGS = {
    "independent": independent,
    "exact": exact,
    "sinkhorn": sinkhorn,
    "sb": schrodinger_bridge,
}
"""Coupling factories by name, as accepted by ``make_coupling`` and the CLI's ``--coupling``."""


def make_coupling(name: str, **kwargs) -> Coupling:
    """Build a coupling by name (see ``COUPLINGS``) with the factory's keyword arguments."""
    return lookup("coupling", name, COUPLINGS)(**kwargs)

"""Couplings on a device mesh: each device's shard coupled on its own, or the whole global batch."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from fmjax.couplings._base import Coupling, _pairs_and_status, _status, check_cond


@dataclasses.dataclass(frozen=True)
class _OnMesh(Coupling):
    """A coupling ``inner`` placed on the data axis ``axis`` of ``mesh`` by ``make_train_step``."""

    inner: Coupling
    mesh: jax.sharding.Mesh
    axis: str = "data"

    @property
    def uses_key(self) -> bool:
        return self.inner.uses_key

    @property
    def by_label(self) -> bool:
        return self.inner.by_label

    def pairs(self, key, x0, x1):
        return self.inner.pairs(key, x0, x1)

    def _check_inputs(self, key, x0, x1):
        self.inner._check_inputs(key, x0, x1)  # the inner coupling's checks (e.g. its cost's shape)

    def _pairs_with_details(self, key, x0, x1, labels=None):
        return _pairs_and_status(self.inner, key, x0, x1, labels)

    def _gather_cond(self, cond, j):
        return self.inner._gather_cond(cond, j)

    def _failed(self, error, details):
        self.inner._failed(error, details)

    def apply_with_status(self, key, x0, x1, *, labels0=None, labels1=None):
        a, b, _, pairs, status = self.apply_with_cond(key, x0, x1, None, labels0=labels0, labels1=labels1)
        return a, b, pairs, status

    def _on_each_device(
        self, key, x0, x1, batch_spec, *, labels0=None, labels1=None, cond=None, fold_in_device=False
    ):
        """``inner``'s pairs, gather and status on every device, on the part of the batch ``batch_spec``
        gives it; the status is reduced over the devices (converged on all of them, the largest error).
        The labels and the condition (moved with x1) get the batch's spec; ``(a, b, cond_c, pairs,
        status)`` comes back, ``cond_c`` None without a condition.

        Inside ``shard_map`` the solver runs with no collective; the key is replicated and, with
        ``fold_in_device``, folded with the device's index along ``axis``.
        """
        self._check_inputs(key, x0, x1)
        extras = {}
        labels = self._labels(x0, labels0, labels1)
        if labels is not None:
            extras["labels"] = labels
        if cond is not None:
            check_cond("cond", cond, x1.shape[0])
            extras["cond"] = cond

        def body(key, x0, x1, extras):
            if fold_in_device and key is not None:
                key = jax.random.fold_in(key, jax.lax.axis_index(self.axis))
            i, j, status, details = self._pairs_with_details(key, x0, x1, extras.get("labels"))
            a, b = self.inner._gather(x0, x1, i, j)
            moved = {"cond": self.inner._gather_cond(extras["cond"], j)} if "cond" in extras else {}
            # one entry per device along the axis, reduced outside
            return a, b, moved, i, j, jax.tree.map(lambda v: v[None], (status, details))

        a, b, moved, i, j, (status, details) = jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=(PartitionSpec(), batch_spec, batch_spec, batch_spec),
            out_specs=(batch_spec,) * 5 + (PartitionSpec(self.axis),),
            check_vma=False,
        )(key, x0, x1, extras)
        status = _status(jnp.all(status["coupling_converged"]), jnp.max(status["coupling_error"]))
        details = {name: jnp.max(value) for name, value in details.items()}
        self._report(status, details)
        return a, b, moved.get("cond"), (i, j), status


@dataclasses.dataclass(frozen=True)
class PerShard(_OnMesh):
    """Runs ``inner`` on each device's shard of a batch sharded over ``axis`` of ``mesh`` (scope "local").

    Built by ``make_train_step`` for a coupling with ``scope="local"`` when it is given a mesh; each
    shard draws from its own key (the shared key folded with the shard's index) and its pairs index
    into the shard, so the gathered pairs never cross devices, as in TorchCFM's DDP training. The
    status is converged when every shard's is, with the largest error.
    """

    @property
    def scope(self) -> str:
        return "local"

    def apply_with_cond(self, key, x0, x1, cond, *, labels0=None, labels1=None):
        spec = PartitionSpec(self.axis)
        labels = {"labels0": labels0, "labels1": labels1}
        return self._on_each_device(key, x0, x1, spec, **labels, cond=cond, fold_in_device=True)


jax.tree_util.register_static(PerShard)


@dataclasses.dataclass(frozen=True)
class GlobalBatch(_OnMesh):
    """Runs ``inner`` on the whole global batch of a sharded step (scope "global").

    Built by ``make_train_step`` for a coupling with ``scope="global"`` when it is given a mesh: the
    batch is gathered (replicated) before coupling, and the coupled batch is resharded over ``axis``,
    so each device trains on its slice of globally coupled pairs. The status is reduced over the
    devices as ``PerShard``'s (every device solves the same batch).
    """

    @property
    def scope(self) -> str:
        return "global"

    def apply_with_cond(self, key, x0, x1, cond, *, labels0=None, labels1=None):
        sharded = NamedSharding(self.mesh, PartitionSpec(self.axis))
        # The batch is gathered once; then every device couples the whole batch on its own, with no
        # collective inside the solver (left to the partitioner, Sinkhorn's loop and the exact
        # assignment's host callback were split over the devices and paid a collective per iteration).
        a, b, moved, pairs, status = self._on_each_device(
            key, x0, x1, PartitionSpec(), labels0=labels0, labels1=labels1, cond=cond
        )
        reshard = lambda x: jax.lax.with_sharding_constraint(x, sharded)  # noqa: E731
        return reshard(a), reshard(b), jax.tree.map(reshard, moved), pairs, status


jax.tree_util.register_static(GlobalBatch)

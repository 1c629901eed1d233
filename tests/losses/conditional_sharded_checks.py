"""Run with 4 host devices (by tests/losses/test_cfm.py in a subprocess); prints one JSON object.

The condition follows x1 through every coupling on a mesh: cond["row"] names the row of x1 each
coupled x1 came from (a hidden permutation), per shard and over the global batch; a conditional,
label-aware sharded step computes what the unsharded one does.
"""

import os

if __name__ == "__main__":  # pytest imports this file too: only the script run sets the device count
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from fmjax.couplings import (  # noqa: E402
    GlobalBatch,
    PerShard,
    exact,
    independent,
    schrodinger_bridge,
    sinkhorn,
)
from fmjax.losses import cfm_loss  # noqa: E402
from fmjax.models import MLP, functional  # noqa: E402
from fmjax.paths import CondOT  # noqa: E402
from fmjax.training import TrainState, make_train_step  # noqa: E402


def main():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    data = NamedSharding(mesh, PartitionSpec("data"))
    n, shard = 32, 8
    rng = np.random.default_rng(0)
    hidden = rng.permutation(n)
    x0 = jnp.asarray(rng.normal(size=(n, 2)), jnp.float32)
    x1 = jnp.asarray(rng.normal(size=(n, 2)) + 1.0, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, n), jnp.int32)
    # x1 and its condition are stored in a hidden order; the condition is the row in the stored array
    x1_hidden, labels_hidden = x1[hidden], labels[hidden]
    cond = {"row": jnp.arange(n, dtype=jnp.int32), "label": labels_hidden}
    put = lambda tree: jax.device_put(tree, data)  # noqa: E731
    results = {"devices": jax.device_count()}

    def follow(wrapped):
        """Whether every coupled x1 is the stored row its condition names, and what crossed shards/classes."""

        def loss(x0, x1, cond):
            return cfm_loss(
                lambda p, t, x, c: p * x,
                0.0,
                jax.random.key(3),
                x0,
                x1,
                cond=cond,
                path=CondOT(),
                coupling=wrapped,
            )[1]

        aux = jax.jit(loss)(put(x0), put(x1_hidden), put(cond))
        rows = np.asarray(aux.cond["row"])
        x1c = np.asarray(aux.sample.x1)
        record = {
            "follows": bool(np.array_equal(x1c, np.asarray(x1_hidden)[rows])),
            "labels_follow": bool(
                np.array_equal(np.asarray(aux.cond["label"]), np.asarray(labels_hidden)[rows])
            ),
            "sharded": str(aux.cond["row"].sharding.spec),
        }
        if isinstance(wrapped, PerShard):  # each shard's pairs stay in the shard
            record["within_shards"] = bool(np.all(rows // shard == np.arange(n) // shard))
        if wrapped.by_label:  # x0[k] takes the class of the k-th stored x1
            record["within_classes"] = bool(
                np.array_equal(np.asarray(aux.cond["label"]), np.asarray(labels_hidden))
            )
        return record

    # each kind of gather once: none (independent), on every shard (PerShard), on the gathered batch
    # (GlobalBatch), with labels through the host solve and through Sinkhorn
    for name, coupling, scope in (
        ("independent", independent(), "local"),
        ("exact", exact(), "global"),
        ("sb", schrodinger_bridge(1.0), "local"),
        ("exact_by_label", exact(by_label=True), "local"),
        ("sinkhorn_by_label", sinkhorn(by_label=True), "global"),
    ):
        wrapper = PerShard if scope == "local" else GlobalBatch
        results[f"{name}_{scope}"] = follow(wrapper(inner=coupling, mesh=mesh))

    # a conditional, label-aware step: sharded (global exact by label) == unsharded
    model = MLP(dim=2, width=16, depth=2, num_classes=3, seed=0)
    apply_fn, params = functional(model)
    optimizer = optax.adam(1e-2)

    def train(mesh_or_none):
        state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.key(1))
        step = make_train_step(
            apply_fn,
            optimizer,
            path=CondOT(),
            coupling=exact(by_label=True, scope="global"),
            cond_dropout=0.25,
            null_cond=model.null_cond(),
            mesh=mesh_or_none,
        )
        losses = []
        for _ in range(2):
            state, metrics = step(state, x0, x1_hidden, labels_hidden)
            losses.append(float(metrics["loss"]))
        return state, losses

    one, losses_one = train(None)
    four, losses_four = train(mesh)
    results["step"] = {
        "loss_diff": max(abs(a - b) for a, b in zip(losses_one, losses_four, strict=True)),
        "param_diff": max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params), strict=True)
        ),
    }
    print(json.dumps(results))


if __name__ == "__main__":
    main()

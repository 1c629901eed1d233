"""Run with 8 host devices (set by tests/test_training_sharded.py in a subprocess); prints one JSON object.

argv[1:] names the couplings whose sharded step is compared with one device's (default: all three).
"""

import os

if __name__ == "__main__":  # pytest imports this file too: only the script run sets the device count
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from fmjax.couplings import PerShard, exact, independent, sinkhorn  # noqa: E402
from fmjax.models import MLP, functional  # noqa: E402
from fmjax.paths import Linear, SchrodingerBridge  # noqa: E402
from fmjax.training import TrainState, make_train_step  # noqa: E402


def main():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    apply_fn, params = functional(MLP(dim=2, width=32, depth=2, seed=0))
    optimizer = optax.adam(1e-2)
    k0, k1 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k0, (64, 2))
    x1 = jax.random.normal(k1, (64, 2)) + 2.0
    results = {"devices": jax.device_count()}

    def run(coupling, path, mesh_or_none, steps=3):
        state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.key(1))
        step = make_train_step(apply_fn, optimizer, path=path, coupling=coupling, mesh=mesh_or_none)
        losses = []
        for _ in range(steps):
            state, metrics = step(state, x0, x1)
            losses.append(float(metrics["loss"]))
        return state, losses

    couplings = {
        "independent": (independent(), Linear(sigma=0.1)),
        "exact_global": (exact(scope="global"), Linear(sigma=0.1)),
        "sinkhorn_global": (sinkhorn(scope="global"), SchrodingerBridge(sigma=0.5)),
    }
    for name in sys.argv[1:] or couplings:
        coupling, path = couplings[name]
        one, losses_one = run(coupling, path, None)
        eight, losses_eight = run(coupling, path, mesh)
        results[name] = {
            "loss_diff": max(abs(a - b) for a, b in zip(losses_one, losses_eight, strict=True)),
            "param_diff": max(
                float(jnp.max(jnp.abs(a - b)))
                for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params), strict=True)
            ),
            "sharded": str(eight.params["out"]["kernel"].sharding.spec),
        }

    # local scope: each device couples its own 8 points
    per_shard = PerShard(inner=exact(), mesh=mesh)
    a, b, (i, j) = jax.jit(per_shard.apply)(None, x0, x1)
    manual_j = np.concatenate(
        [np.asarray(exact()(None, x0[s : s + 8], x1[s : s + 8])[1]) for s in range(0, 64, 8)]
    )
    results["local_pairs_match"] = bool(np.array_equal(np.asarray(j), manual_j))
    results["local_x1_match"] = bool(
        np.allclose(
            np.asarray(b),
            np.concatenate([np.asarray(x1[s : s + 8])[manual_j[s : s + 8]] for s in range(0, 64, 8)]),
        )
    )
    _, local_losses = run(exact(scope="local"), Linear(sigma=0.1), mesh)
    results["local_losses_finite"] = all(np.isfinite(local_losses))

    try:
        step = make_train_step(apply_fn, optimizer, path=Linear(), mesh=mesh)
        step(TrainState.create(params=params, optimizer=optimizer, key=jax.random.key(1)), x0[:60], x1[:60])
        results["indivisible"] = "no error"
    except ValueError as error:
        results["indivisible"] = str(error)

    print(json.dumps(results))


if __name__ == "__main__":
    main()

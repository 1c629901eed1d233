"""Run with N simulated host devices (argv[1]; tests/runs/test_distributed_devices.py runs it in a
subprocess); prints JSON.

Trains through ``fmjax.runs.train`` on every device (the default), on one device, and with the exact coupling
solved inside the step; reports their losses, the device count each used and how often the host solver ran.
With argv[2] == "images" it also trains a digits UNet on every device and on one.
"""

import os
import sys

if __name__ == "__main__":  # pytest's doctest collection imports this file too: leave its devices alone
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={int(sys.argv[1])}"

import json  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fmjax.couplings import Exact  # noqa: E402
from fmjax.runs import RunConfig, train  # noqa: E402

STEPS = 60
solves = {"count": 0}
# every host solve (the pipelined loop's and the in-step callback's) goes through solve_host_status
solve_host_status = Exact.solve_host_status


def counted(inputs):
    solves["count"] += 1
    return solve_host_status(inputs)


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "event" not in r]


def trained(config, **options):
    solves["count"] = 0
    with tempfile.TemporaryDirectory() as run_dir:
        run = train(config, run_dir, data_dir=os.environ.get("FMJAX_DATA_DIR"), **options)
        with open(os.path.join(run_dir, "config.json")) as f:
            recorded = json.load(f)["environment"]
        return {
            "losses": losses(run_dir),
            "devices": run.environment["devices"],
            "recorded_devices": recorded["devices"],
            "solves": solves["count"],
            "params": [np.asarray(leaf).tolist() for leaf in jax.tree.leaves(run.state.params)][:1],
        }


def main():
    Exact.solve_host_status = staticmethod(counted)
    # one chunk length (20 steps) and one checkpoint per run: one compiled step per device count
    toy = dict(steps=STEPS, batch_size=64, width=16, log_every=20, checkpoint_every=STEPS, eval_samples=100)
    results = {"devices": jax.device_count(), "steps": STEPS}
    for coupling in ("independent", "exact"):
        config = RunConfig(coupling=coupling, **toy)
        results[coupling] = {"all": trained(config), "one": trained(config, devices=1)}
    results["exact"]["in_step"] = trained(RunConfig(coupling="exact", **toy), pipeline=False)
    if sys.argv[2:] == ["images"]:
        images = RunConfig(
            dataset="digits",
            steps=30,
            batch_size=32,
            width=8,
            log_every=10,
            checkpoint_every=30,
            eval_samples=16,
        )
        results["digits"] = {"all": trained(images), "one": trained(images, devices=1)}
    print(json.dumps(results))


if __name__ == "__main__":
    main()

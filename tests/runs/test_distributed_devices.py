"""fmjax train on 4 and 8 simulated host devices: it uses them all, trains what one device trains, and
solves the exact coupling of each global batch once on the host (tests/runs/device_checks.py, a subprocess per
device count). The default selection runs the 2D runs on 8 devices; -m slow adds 4 devices and a digits
UNet on both counts."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(__file__)


# 8 devices (2D runs) in the default run; 4 (another split of the batch) and the digits UNet with -m slow
@pytest.fixture(
    scope="module",
    params=[
        pytest.param((4, "images"), marks=pytest.mark.slow),
        (8, "toy"),
        pytest.param((8, "images"), marks=pytest.mark.slow),
    ],
    ids=lambda p: f"{p[0]}dev-{p[1]}",
)
def results(request, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    env = dict(os.environ, JAX_PLATFORMS="cpu", FMJAX_DATA_DIR=str(data_dir))
    devices, kinds = request.param
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "device_checks.py"), str(devices), kinds],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return devices, json.loads(done.stdout.strip().splitlines()[-1])


def test_default_run_uses_every_device_and_records_it(results):
    devices, r = results
    assert r["devices"] == devices
    for name in [name for name in ("independent", "exact", "digits") if name in r]:
        assert r[name]["all"]["devices"] == r[name]["all"]["recorded_devices"] == devices
        assert r[name]["one"]["devices"] == 1


@pytest.mark.parametrize("name", ["independent", "exact", "digits"])
def test_losses_equal_a_one_device_run(results, name):
    _, r = results
    if name not in r:
        pytest.skip("the digits runs are in the slow selection")
    every, one = r[name]["all"], r[name]["one"]
    assert len(every["losses"]) == len(one["losses"]) > 0
    # same global batches and keys: only the order of floating-point reductions differs
    np.testing.assert_allclose(every["losses"], one["losses"], rtol=0, atol=1e-5)


def test_exact_coupling_is_solved_once_per_step(results):
    _, r = results
    # each global batch solved once on the host, whatever the device count
    assert r["exact"]["all"]["solves"] == r["exact"]["one"]["solves"] == r["steps"]
    assert r["independent"]["all"]["solves"] == 0


def test_pipelined_pairs_train_what_the_in_step_solve_trains(results):
    _, r = results
    # the in-step solve (every device solves the gathered batch) and the pipelined host solve pair the same
    # points, so the losses agree to float32 reduction order
    np.testing.assert_allclose(
        r["exact"]["all"]["losses"], r["exact"]["in_step"]["losses"], rtol=0, atol=1e-5
    )
    # one solve per device and step: what the pipeline avoids
    assert r["exact"]["in_step"]["solves"] == r["steps"] * r["devices"]

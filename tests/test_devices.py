"""fmjax train on 4 and 8 simulated host devices: it uses them all, trains what one device trains, and
solves the exact coupling of each global batch once on the host (tests/device_checks.py, a subprocess per
device count)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(__file__)


# 8 devices in the default run; 4 (the same checks, another split of the batch) with -m slow
@pytest.fixture(
    scope="module",
    params=[pytest.param(4, marks=pytest.mark.slow), 8],
    ids=lambda n: f"{n}dev",
)
def results(request, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    env = dict(os.environ, JAX_PLATFORMS="cpu", FMJAX_DATA_DIR=str(data_dir))
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "device_checks.py"), str(request.param)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return request.param, json.loads(done.stdout.strip().splitlines()[-1])


def test_default_run_uses_every_device_and_records_it(results):
    devices, r = results
    assert r["devices"] == devices
    for name in ("independent", "exact", "digits"):
        assert r[name]["all"]["devices"] == r[name]["all"]["recorded_devices"] == devices
        assert r[name]["one"]["devices"] == 1


@pytest.mark.parametrize("name", ["independent", "exact", "digits"])
def test_losses_equal_a_one_device_run(results, name):
    _, r = results
    every, one = r[name]["all"], r[name]["one"]
    assert len(every["losses"]) == len(one["losses"]) > 0
    # same global batches and keys: only the order of floating-point reductions differs
    np.testing.assert_allclose(every["losses"], one["losses"], rtol=0, atol=1e-5)


def test_exact_coupling_is_solved_once_per_step(results):
    _, r = results
    # 120 steps: each global batch solved once on the host, whatever the device count
    assert r["exact"]["all"]["solves"] == r["exact"]["one"]["solves"] == 120
    assert r["independent"]["all"]["solves"] == 0


def test_pipelined_pairs_train_what_the_in_step_solve_trains(results):
    _, r = results
    # the in-step solve (every device solves the gathered batch) and the pipelined host solve pair the same
    # points, so the losses agree to float32 reduction order
    np.testing.assert_allclose(
        r["exact"]["all"]["losses"], r["exact"]["in_step"]["losses"], rtol=0, atol=1e-5
    )
    # one solve per device and step: what the pipeline avoids
    assert r["exact"]["in_step"]["solves"] == 120 * r["devices"]

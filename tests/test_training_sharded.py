"""Data-parallel training over 8 host devices equals the single-device step (run in a subprocess)."""

import os

import pytest
from _host_devices import run_json

HERE = os.path.dirname(__file__)


# By default the sharded step is compared with one device's for the global Sinkhorn coupling; the
# independent and the global exact couplings' steps run on 8 devices by default in
# tests/runs/test_distributed_devices.py (fmjax.runs.train, against one device and in-step), and here
# with -m slow.
@pytest.fixture(scope="module")
def results():
    return run_json(os.path.join(HERE, "sharded_checks.py"), "sinkhorn_global", devices=8)


@pytest.fixture(scope="module")
def every_coupling():
    return run_json(os.path.join(HERE, "sharded_checks.py"), devices=8)


def test_eight_devices(results):
    assert results["devices"] == 8


def _equals_single_device(result):
    # same global batch, same keys: only the order of floating-point reductions differs
    assert result["loss_diff"] < 1e-5
    assert result["param_diff"] < 1e-5
    assert result["sharded"] in ("P()", "PartitionSpec()")  # parameters stay replicated


def test_sharded_sinkhorn_step_equals_single_device(results):
    _equals_single_device(results["sinkhorn_global"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["independent", "exact_global", "sinkhorn_global"])
def test_sharded_step_equals_single_device(every_coupling, name):
    _equals_single_device(every_coupling[name])


def test_local_scope_couples_each_shard(results):
    assert results["local_pairs_match"] and results["local_x1_match"]
    assert results["local_losses_finite"]


def test_indivisible_batch_is_a_clear_error(results):
    assert (
        "batch size 60, which the 8 devices of mesh axis 'data' cannot split evenly" in results["indivisible"]
    )

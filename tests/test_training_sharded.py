"""Data-parallel training over 8 host devices equals the single-device step (run in a subprocess)."""

import os

import pytest
from _host_devices import run_json

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def results():
    return run_json(os.path.join(HERE, "sharded_checks.py"), devices=8)


def test_eight_devices(results):
    assert results["devices"] == 8


@pytest.mark.parametrize("name", ["independent", "exact_global", "sinkhorn_global"])
def test_sharded_step_equals_single_device(results, name):
    # same global batch, same keys: only the order of floating-point reductions differs
    assert results[name]["loss_diff"] < 1e-5
    assert results[name]["param_diff"] < 1e-5
    assert results[name]["sharded"] in ("P()", "PartitionSpec()")  # parameters stay replicated


def test_local_scope_couples_each_shard(results):
    assert results["local_pairs_match"] and results["local_x1_match"]
    assert results["local_losses_finite"]


def test_indivisible_batch_is_a_clear_error(results):
    assert (
        "batch size 60, which the 8 devices of mesh axis 'data' cannot split evenly" in results["indivisible"]
    )

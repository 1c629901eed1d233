"""Exact resume: a run killed with SIGKILL and started again with the same command ends bit for bit where an
uninterrupted run ends; an unreadable checkpoint is reported, set aside and the previous one used."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fmjax.runs import load_run

FMJAX = os.path.join(os.path.dirname(sys.executable), "fmjax")
STEPS = 6_000
ARGS = [
    "--steps", str(STEPS), "--batch-size", "64", "--width", "16", "--log-every", "200",
    "--checkpoint-every", "1000", "--eval-samples", "200", "--no-progress", "--no-plots",
]  # fmt: skip


def _train(out, timeout=300):
    return subprocess.run(
        [FMJAX, "train", "--out", str(out), *ARGS], capture_output=True, text=True, timeout=timeout
    )


def _assert_same_run(a, b):
    run_a, run_b = load_run(a), load_run(b)
    assert int(run_a.state.step) == int(run_b.state.step) == STEPS
    for x, y in zip(jax.tree.leaves(run_a.state), jax.tree.leaves(run_b.state), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bitwise: params, EMA, Adam state, key
    losses = [
        [r["loss"] for r in map(json.loads, open(os.path.join(d, "metrics.jsonl"))) if "event" not in r]
        for d in (a, b)
    ]
    assert losses[0] == losses[1] and len(losses[0]) == STEPS // 200


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    done = _train(out)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _logged_steps(out):
    try:
        with open(out / "metrics.jsonl") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("moment", ["mid-training", "any"])
def test_killed_runs_resume_bit_for_bit(reference, tmp_path, moment):
    # killed after a random number of logged chunks (surely mid-training), or at a random moment of the
    # whole command (start-up, training or evaluation)
    rng = random.Random(0 if moment == "mid-training" else 1)
    out = tmp_path / "killed"
    process = subprocess.Popen([FMJAX, "train", "--out", str(out), *ARGS], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    if moment == "mid-training":
        target = rng.randint(5, STEPS // 200 - 5)
        deadline = time.monotonic() + 120
        while _logged_steps(out) < target and time.monotonic() < deadline:
            time.sleep(0.005)
        assert _logged_steps(out) < STEPS // 200  # killed before the end of training
    else:
        time.sleep(rng.uniform(0.5, 8.0))
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = _train(out)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same_run(reference, out)
    steps = sorted(int(d) for d in os.listdir(out / "checkpoints") if d.isdigit())
    assert steps[-1] == STEPS and len(steps) <= 3


def test_an_unreadable_checkpoint_is_set_aside_and_the_previous_used(reference, tmp_path):
    out = tmp_path / "run"
    assert _train(out).returncode == 0
    latest = out / "checkpoints" / str(STEPS)
    for root, _, files in os.walk(latest):
        for name in files:
            if name != "_CHECKPOINT_METADATA":
                open(os.path.join(root, name), "w").close()  # truncate every data file
    done = _train(out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"checkpoint {STEPS} is unreadable" in done.stdout + done.stderr
    assert f"resuming from checkpoint {STEPS - 1000}" in done.stdout + done.stderr
    assert (out / "checkpoints" / f"{STEPS}.corrupt").is_dir()  # kept for inspection, not deleted
    _assert_same_run(reference, out)


def _kill_trials(n, tmp_path):
    from experiments import kill_trials

    records, duration = kill_trials.trials(n, steps=3000, seed=n, work=str(tmp_path))
    kill_trials.report(records, duration, str(tmp_path / "report"))
    assert (tmp_path / "report" / "kill_trials.png").stat().st_size > 0
    assert [r["bitwise_equal"] for r in records] == [True] * n, records


@pytest.mark.slow  # kills and resumes: test_killed_runs_resume_bit_for_bit covers them by default
def test_three_kill_trials(tmp_path):
    _kill_trials(3, tmp_path)


@pytest.mark.slow
def test_twenty_kill_trials(tmp_path):
    _kill_trials(20, tmp_path)

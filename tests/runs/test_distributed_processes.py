"""Two processes on 127.0.0.1 (jax.distributed, gloo) train what one process trains on one global batch."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from fmjax.cli import main
from fmjax.runs import load_run

FMJAX = os.path.join(os.path.dirname(sys.executable), "fmjax")
ARGS = [
    "--steps", "200", "--batch-size", "64", "--width", "16", "--log-every", "50",
    "--checkpoint-every", "100", "--eval-samples", "100", "--no-progress", "--no-plots",
]  # fmt: skip


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "event" not in r]


def _start_two(out, args, env, log_dir):
    """Start the two processes of one `fmjax train` run on 127.0.0.1."""
    port = _free_port()
    flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    return [
        subprocess.Popen(
            [FMJAX, "train", "--out", str(out), *args, *flags, "--process-id", str(i)],
            # files, not pipes: a full pipe would block one process and, through the collectives, both
            stdout=open(log_dir / f"process{i}.log", "w"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
            env=env,
        )
        for i in range(2)
    ]


def _wait_two(processes, log_dir):
    for i, process in enumerate(processes):
        process.wait(timeout=300)
        assert process.returncode == 0, (log_dir / f"process{i}.log").read_text()[-2000:]


# the OT couplings' default scope in fmjax train is global: two processes couple the one global batch, as one
# process does (Sinkhorn's loop once paid a collective per iteration there: 200 steps took 380 s, not 18 s)
# exact (host-solved, global) in the default run; independent and sb with -m slow (CI time)
@pytest.mark.parametrize(
    "coupling",
    [
        pytest.param(["independent"], marks=pytest.mark.slow),
        ["exact"],
        pytest.param(["sb", "--path", "sb", "--sigma", "0.5"], marks=pytest.mark.slow),
    ],
    ids=lambda c: c[0],
)
def test_two_processes_match_one(coupling, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    args = [*ARGS, "--coupling", *coupling]
    multi = tmp_path / "two"
    processes = _start_two(multi, args, env, tmp_path)
    single = tmp_path / "one"  # trained only: the two processes' run is evaluated
    done = subprocess.run(
        [FMJAX, "train", "--out", str(single), *args, "--no-eval"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    _wait_two(processes, tmp_path)
    assert np.allclose(_losses(multi), _losses(single), rtol=1e-5, atol=1e-6) and len(_losses(multi)) == 4
    a, b = load_run(multi), load_run(single)
    for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    assert sorted(os.listdir(multi / "checkpoints")) == ["100", "200"]
    assert json.loads((multi / "summary.json").read_text())["step"] == 200


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--coordinator", "127.0.0.1:1234"], "--coordinator, --num-processes and --process-id go together"),
        (
            ["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
            "--process-id must be in 0 .. 1",
        ),
    ],
)
def test_bad_process_flags(extra, message, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "x"), *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow  # 80 s on 2 cores; the 2D runs above cover two processes in the default run
def test_two_processes_train_digits_like_one(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", FMJAX_DATA_DIR=str(tmp_path / "tfds"))
    env.pop("XLA_FLAGS", None)
    args = [
        "--dataset", "digits", "--steps", "30", "--batch-size", "32", "--width", "8", "--log-every", "10",
        "--checkpoint-every", "10", "--eval-samples", "8", "--no-progress", "--no-plots",
    ]  # fmt: skip
    single = tmp_path / "one"
    done = subprocess.run(
        [FMJAX, "train", "--out", str(single), *args], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    multi = tmp_path / "two"
    _wait_two(_start_two(multi, args, env, tmp_path), tmp_path)
    # each process read its half of every global batch; together they trained on the same batches
    assert np.allclose(_losses(multi), _losses(single), rtol=1e-4, atol=1e-5) and len(_losses(multi)) == 3

"""Bad input, one case a row: the API raises ValueError/TypeError naming the argument (and the allowed
values); the CLI prints one line on stderr, exits 2, and leaves what was already written untouched."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fmjax
from fmjax.cli import main as cli
from fmjax.couplings import make_coupling
from fmjax.data import sample as toy
from fmjax.data.tfds_sources import batches
from fmjax.data.toy import log_density
from fmjax.metrics import wasserstein2
from fmjax.models import MLP, functional
from fmjax.paths import make_path
from fmjax.runs import RunConfig

X = jnp.zeros((8, 2))
KEY = jax.random.key(0)
FIELD = lambda t, x: -x  # noqa: E731
NAN_X = X.at[3, 1].set(jnp.nan)
INF_X = X.at[0, 0].set(jnp.inf)


def _step():
    apply_fn, params = functional(MLP(dim=2, width=8, depth=1, seed=0))
    return fmjax.make_train_step(apply_fn, optax.sgd(0.1), path=fmjax.Linear(), donate=False)


def _mesh_step():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    apply_fn, params = functional(MLP(dim=2, width=8, depth=1, seed=0))
    return fmjax.make_train_step(apply_fn, optax.sgd(0.1), path=fmjax.Linear(), mesh=mesh, data_axis="batch")


def _state():
    apply_fn, params = functional(MLP(dim=2, width=8, depth=1, seed=0))
    return fmjax.TrainState.create(params=params, optimizer=optax.sgd(0.1), key=KEY)


# (id, call, exception type, substrings the message must contain)
API_CASES = [
    ("nan-in-sample-x0", lambda: fmjax.sample(FIELD, NAN_X), ValueError, ["x0 must be finite", "1 NaN"]),
    (
        "inf-in-likelihood-x1",
        lambda: fmjax.log_likelihood(FIELD, INF_X, log_p0=log_density("gaussian")),
        ValueError,
        ["x1 must be finite"],
    ),
    ("nan-in-w2", lambda: wasserstein2(np.asarray(NAN_X), np.zeros((8, 2))), ValueError, ["finite"]),
    ("nan-in-exact-coupling", lambda: fmjax.exact()(KEY, NAN_X, X), ValueError, ["x0 must be finite"]),
    (
        "rank-1-x0",
        lambda: fmjax.Linear().sample(None, jnp.zeros(8), jnp.zeros(8), jnp.zeros(8)),
        ValueError,
        ["x0", "rank >= 2"],
    ),
    (
        "x0-x1-shapes",
        lambda: fmjax.cfm_loss(lambda p, t, x: x, None, KEY, X, jnp.zeros((8, 3)), path=fmjax.Linear()),
        ValueError,
        ["x0 and x1", "same shape"],
    ),
    ("train-step-shapes", lambda: _step()(_state(), X, jnp.zeros((4, 2))), ValueError, ["same shape"]),
    ("t-shape", lambda: fmjax.Linear().sample(None, X, X, jnp.zeros(3)), ValueError, ["t must have shape"]),
    (
        "t-above-1",
        lambda: fmjax.Linear().sample(None, X, X, jnp.full(8, 1.5)),
        ValueError,
        ["t must lie in [0, 1]"],
    ),
    (
        "t-below-0",
        lambda: fmjax.CondOT().sample(None, X, X, jnp.full(8, -0.1)),
        ValueError,
        ["t must lie in [0, 1]"],
    ),
    ("t0-outside", lambda: fmjax.sample(FIELD, X, t0=-0.5), ValueError, ["t0 must be >= 0"]),
    ("negative-sigma", lambda: fmjax.Linear(sigma=-0.1), ValueError, ["sigma must be >= 0"]),
    ("nan-sigma", lambda: fmjax.SchrodingerBridge(sigma=float("nan")), ValueError, ["sigma must be finite"]),
    ("negative-sigma-min", lambda: fmjax.CondOT(sigma_min=-1e-3), ValueError, ["sigma_min"]),
    ("inf-sigma-min", lambda: fmjax.CondOT(sigma_min=float("inf")), ValueError, ["sigma_min must be finite"]),
    ("negative-epsilon", lambda: fmjax.sinkhorn(epsilon=-0.1), ValueError, ["epsilon"]),
    ("zero-sb-sigma", lambda: fmjax.schrodinger_bridge(0.0), ValueError, ["sigma must be > 0"]),
    ("string-sigma", lambda: fmjax.Linear(sigma="0.1"), TypeError, ["sigma must be a real number"]),
    ("unknown-path", lambda: make_path("straight"), ValueError, ["'condot'", "'linear'", "'straight'"]),
    ("unknown-coupling", lambda: make_coupling("greedy"), ValueError, ["'exact'", "'sinkhorn'", "'greedy'"]),
    (
        "unknown-solver",
        lambda: fmjax.sample(FIELD, X, solver="rk4"),
        ValueError,
        ["solver must be one of", "'dopri5'"],
    ),
    (
        "unknown-dataset",
        lambda: RunConfig(dataset="imagenet"),
        ValueError,
        ["dataset must be one of", "'digits'"],
    ),
    ("unknown-toy", lambda: toy("spiral", KEY, 4), ValueError, ["name must be one of", "'moons'"]),
    (
        "unknown-probe",
        lambda: fmjax.log_likelihood(
            FIELD, X, log_p0=log_density("gaussian"), divergence="hutchinson", key=KEY, probe="uniform"
        ),
        ValueError,
        ["probe must be one of", "'rademacher'"],
    ),
    (
        "unknown-divergence",
        lambda: fmjax.log_likelihood(FIELD, X, log_p0=log_density("gaussian"), divergence="trace"),
        ValueError,
        ["divergence must be one of", "'exact'"],
    ),
    ("unknown-data-axis", lambda: _mesh_step(), ValueError, ["data_axis must be one of"]),
    (
        "num-probes-0",
        lambda: fmjax.log_likelihood(
            FIELD, X, log_p0=log_density("gaussian"), divergence="hutchinson", key=KEY, num_probes=0
        ),
        ValueError,
        ["num_probes must be >= 1"],
    ),
    (
        "hutchinson-no-key",
        lambda: fmjax.log_likelihood(FIELD, X, log_p0=log_density("gaussian"), divergence="hutchinson"),
        ValueError,
        ["key"],
    ),
    (
        "int-data-sample",
        lambda: fmjax.sample(FIELD, jnp.zeros((4, 2), jnp.int32)),
        TypeError,
        ["x0 must be a float32 or float64 array", "int32", "astype(jnp.float32)"],
    ),
    (
        "int-data-train",
        lambda: _step()(_state(), X.astype(jnp.int32), X.astype(jnp.int32)),
        TypeError,
        ["x0 must be a float32, float64, bfloat16 or float16 array", "int32"],
    ),
    (
        "bfloat16-data-loss",
        lambda: fmjax.Linear().sample(None, X.astype(jnp.bfloat16), X.astype(jnp.bfloat16), jnp.zeros(8)),
        TypeError,
        ["bfloat16"],
    ),
    ("empty-dataset", lambda: next(batches([], batch_size=4)), ValueError, ["data source is empty"]),
    (
        "batch-larger-than-data",
        lambda: next(batches(list(range(3)), batch_size=4)),
        ValueError,
        ["batch_size"],
    ),
    ("steps-zero", lambda: RunConfig(steps=0), ValueError, ["steps must be >= 1"]),
    (
        "on-nonfinite-name",
        lambda: RunConfig(on_nonfinite="ignore"),
        ValueError,
        ["on_nonfinite must be one of", "'skip'"],
    ),
    (
        "ema-decay-1",
        lambda: fmjax.make_train_step(lambda p, t, x: x, optax.sgd(0.1), path=fmjax.Linear(), ema_decay=1.0),
        ValueError,
        ["ema_decay must be < 1.0"],
    ),
    (
        "path-not-a-path",
        lambda: fmjax.make_train_step(lambda p, t, x: x, optax.sgd(0.1), path=42),
        TypeError,
        ["path must be an fmjax path", "or one of the names"],
    ),
    (
        "path-unknown-name",
        lambda: fmjax.make_train_step(lambda p, t, x: x, optax.sgd(0.1), path="nope"),
        ValueError,
        ["path must be one of", "'linear'"],
    ),
    (
        "fixed-steps-zero",
        lambda: fmjax.sample(FIELD, X, solver="euler", steps=0),
        ValueError,
        ["steps must be >= 1"],
    ),
    (
        "bits-per-dim-scale",
        lambda: fmjax.bits_per_dim(
            FIELD, jnp.zeros((2, 4), jnp.int32), key=KEY, scale=0.0, log_p0=log_density("gaussian")
        ),
        ValueError,
        ["scale must be > 0"],
    ),
]


@pytest.mark.parametrize("call, error, needles", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input(call, error, needles):
    with pytest.raises(error) as info:
        call()
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {str(info.value)!r}"


def test_at_least_thirty_api_cases():
    assert len({c[0] for c in API_CASES}) == len(API_CASES) >= 30


def _snapshot(directory):
    """Every file under ``directory`` with its bytes."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    args = ["train", "--out", str(out), "--steps", "200", "--log-every", "100", "--checkpoint-every", "100"]
    assert cli(args + ["--eval-samples", "200", "--no-plots", "--no-progress"]) == 0
    return out


CLI_CASES = [
    ("unknown-path", ["train", "--path", "straight"], "path must be one of"),
    ("unknown-coupling", ["train", "--coupling", "greedy"], "coupling must be one of"),
    ("unknown-dataset", ["train", "--dataset", "imagenet"], "dataset must be one of"),
    ("negative-sigma", ["train", "--sigma", "-1"], "sigma must be >= 0"),
    ("nan-sigma", ["train", "--sigma", "nan"], "sigma must be finite"),
    ("zero-steps", ["train", "--steps", "0"], "steps must be >= 1"),
    ("on-nonfinite", ["train", "--on-nonfinite", "pray"], "--on-nonfinite must be one of"),
    ("sample-unknown-solver", ["sample", "{run}", "--solver", "rk4"], "solver must be one of"),
    (
        "nll-unknown-probe",
        ["nll", "{run}", "--divergence", "hutchinson", "--probe", "uniform"],
        "probe must be one of",
    ),
    (
        "nll-zero-probes",
        ["nll", "{run}", "--divergence", "hutchinson", "--num-probes", "0"],
        "--num-probes must be >= 1",
    ),
    ("missing-run-dir", ["sample", "{missing}"], "does not exist"),
    ("not-a-run", ["nll", "{plain}"], "is not an fmjax run"),
    (
        "other-config",
        ["train", "--out", "{run}", "--steps", "300", "--log-every", "100", "--checkpoint-every", "100"],
        "different configuration",
    ),
    ("out-is-a-file", ["train", "--out", "{file}"], "is a file"),
]


@pytest.mark.parametrize("args, needle", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(args, needle, trained_run, tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    names = {
        "run": str(trained_run),
        "missing": str(tmp_path / "nope"),
        "plain": str(tmp_path / "plain"),
        "file": str(tmp_path / "file"),
    }
    before = _snapshot(trained_run), _snapshot(tmp_path)
    capsys.readouterr()
    assert cli([a.format(**names) for a in args]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fmjax: error:") and needle in lines[0], err
    assert "Traceback" not in err
    assert (_snapshot(trained_run), _snapshot(tmp_path)) == before  # nothing already written changed


def test_nonfinite_step_is_skipped_in_the_api():
    apply_fn, params = functional(MLP(dim=2, width=8, depth=1, seed=0))
    optimizer = optax.adam(1e-2)
    step = fmjax.make_train_step(apply_fn, optimizer, path=fmjax.Linear(), skip_nonfinite=True, donate=False)
    state = fmjax.TrainState.create(params=params, optimizer=optimizer, key=KEY)
    x1 = toy("moons", KEY, 8)
    state, metrics = step(state, X, x1)
    assert int(metrics["skipped"]) == 0
    after, metrics = step(state, X, x1.at[2, 0].set(jnp.nan))
    assert int(metrics["skipped"]) == 1 and int(after.step) == int(state.step) + 1
    for new, old in zip(
        jax.tree.leaves((after.params, after.opt_state, after.ema_params)),
        jax.tree.leaves((state.params, state.opt_state, state.ema_params)),
        strict=True,
    ):
        np.testing.assert_array_equal(new, old)
    # without the option the NaN reaches the parameters
    plain = fmjax.make_train_step(apply_fn, optimizer, path=fmjax.Linear(), donate=False)
    poisoned, _ = plain(state, X, x1.at[2, 0].set(jnp.nan))
    assert not all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(poisoned.params))


def test_cli_nan_is_one_line_and_names_the_step(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "--out",
        str(out),
        "--steps",
        "200",
        "--log-every",
        "100",
        "--checkpoint-every",
        "100",
        "--no-plots",
        "--no-progress",
        "--learning-rate",
        "1e12",
    ]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at step 2; training stopped" in err[0] and "no checkpoint yet" in err[0], err
    assert not [p for p in os.listdir(out / "checkpoints") if p.isdigit()]


def _poison_at(monkeypatch, bad_step):
    """Make the toy run's step see a NaN target point at step ``bad_step`` (1-based)."""
    from fmjax.runs import config

    real = config.make_train_step

    def patched(*args, **kwargs):
        step = real(*args, **kwargs)

        def poisoned(state, x0, x1):
            return step(state, x0, jnp.where(state.step + 1 == bad_step, jnp.nan, x1))

        return poisoned

    monkeypatch.setattr(config, "make_train_step", patched)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_mid_run_stops_or_skips(policy, tmp_path, monkeypatch):
    from fmjax.runs import RunConfig, train

    _poison_at(monkeypatch, 250)
    config = RunConfig(steps=400, log_every=50, checkpoint_every=100, eval_samples=100, on_nonfinite=policy)
    messages = []
    if policy == "stop":
        with pytest.raises(FloatingPointError) as info:
            train(config, tmp_path, log=messages.append)
        assert "at step 250; training stopped" in str(info.value)
        assert "last good checkpoint is step 200" in str(info.value)
        with fmjax.Checkpointer(tmp_path / "checkpoints") as ckpt:
            assert ckpt.all_steps() == [100, 200]
            state = ckpt.restore(_state_like(tmp_path))
        assert int(state.step) == 200
        assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(state.params))
    else:
        run = train(config, tmp_path, log=messages.append)
        assert int(run.state.step) == 400
        assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(run.state.params))
        assert any("skipped 1 step(s)" in m and "first at step 250" in m for m in messages), messages
        records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r.get("skipped")] == [250]


def _state_like(run_dir):
    from fmjax.runs import Run, RunConfig

    with open(run_dir / "config.json") as f:
        return Run.build(RunConfig.from_json(json.load(f))).state


def test_failed_save_keeps_the_checkpoints_already_written(tmp_path, monkeypatch):
    """A writer that fails half-way (a patched full disk): one OSError, partial folders gone."""
    state = {"w": jnp.arange(3.0), "b": jnp.ones((2, 2))}
    checkpoints = fmjax.Checkpointer(tmp_path, max_to_keep=None)
    checkpoints.save(1, state)
    before = _snapshot(tmp_path / "1")

    def full_disk(step, *args, **kwargs):
        partial = tmp_path / f"{step}.orbax-checkpoint-tmp-1234"
        partial.mkdir()
        (partial / "half_written").write_bytes(b"\0" * 10)
        if step == 3:  # the rename to the final folder happened, the commit did not
            (tmp_path / str(step)).mkdir()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints._manager, "save", full_disk)
    for step, left in ((2, ["1"]), (3, ["1", "3.corrupt"])):
        message = rf"could not write checkpoint {step} .*No space left.*intact: \[1\]"
        with pytest.raises(OSError, match=message):
            checkpoints.save(step, state)
        assert sorted(os.listdir(tmp_path)) == left
    monkeypatch.undo()
    assert checkpoints.all_steps() == [1] and _snapshot(tmp_path / "1") == before
    restored = checkpoints.restore(state)
    for name in state:
        np.testing.assert_array_equal(restored[name], state[name])
    checkpoints.save(2, state)  # space again: saving carries on
    assert checkpoints.all_steps() == [1, 2]
    checkpoints.close()


def _can_mount_tmpfs(where):
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"],
        capture_output=True,
    )
    return probe.returncode == 0


FULL_DISK_RUN = [
    "train", "--steps", "600", "--checkpoint-every", "100", "--log-every", "100", "--width", "64",
    "--depth", "2", "--keep-checkpoints", "10", "--eval-samples", "200", "--no-plots", "--no-progress",
]  # fmt: skip


# a full disk while writing checkpoints: tests/runs/test_rundir.py injects write faults in the default
# selection; this run fills a real 500 kB tmpfs
@pytest.mark.slow
def test_cli_full_disk_on_a_small_tmpfs(tmp_path):
    """A real full disk (a 500 KiB tmpfs in a private mount namespace): one line, exit 2, the
    checkpoints already written are bitwise those of an uninterrupted run, and the run resumes
    to the same final state once there is room again."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if not _can_mount_tmpfs(mount):
        pytest.skip("needs `unshare -rm` and tmpfs mounts (user namespaces) on this machine")
    command = " ".join([sys.executable, "-m", "fmjax.cli", *FULL_DISK_RUN, "--out", f"{mount}/run"])
    script = (
        f"mount -t tmpfs -o size=500k tmpfs {mount} && "
        f"{{ {command} 2> {tmp_path}/err; echo $? > {tmp_path}/rc; cp -a {mount}/run {tmp_path}/run; }}"
    )
    subprocess.run(["unshare", "-rm", "sh", "-c", script], check=True, timeout=300)
    err = (tmp_path / "err").read_text()
    assert (tmp_path / "rc").read_text().strip() == "2", err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    failed = re.match(r"fmjax: error: could not write checkpoint (\d+) .* intact: \[([\d, ]+)\]$", lines[0])
    assert failed, lines[0]
    intact = [int(s) for s in failed.group(2).split(",")]
    assert intact == list(range(100, int(failed.group(1)), 100)) and len(intact) >= 1
    run = tmp_path / "run"
    assert sorted(os.listdir(run / "checkpoints")) == [str(s) for s in intact]  # no partial folders

    reference = tmp_path / "reference"
    assert cli([*FULL_DISK_RUN, "--out", str(reference)]) == 0
    target = _state_like(reference)

    def same_states(steps, a_dir, b_dir):
        with fmjax.Checkpointer(a_dir) as a, fmjax.Checkpointer(b_dir) as b:
            for step in steps:
                ours = jax.tree.leaves(a.restore(target, step))
                for x, y in zip(ours, jax.tree.leaves(b.restore(target, step)), strict=True):
                    np.testing.assert_array_equal(x, y)

    # what was written before the disk filled reads back as what an undisturbed run writes
    same_states(intact, run / "checkpoints", reference / "checkpoints")
    assert cli([*FULL_DISK_RUN, "--out", str(run)]) == 0  # room again: resume from the last intact one
    same_states([600], run / "checkpoints", reference / "checkpoints")

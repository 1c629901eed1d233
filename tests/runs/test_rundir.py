"""A run directory that never loses work, tried as a hostile user would (issue 15).

Stray and damaged entries of ``checkpoints/``, a second writer, processes that disagree, damaged metrics,
Ctrl-C, failed validation, non-finite training, bad option values, and faults injected at random points
of checkpoint writes. The rule everywhere: a readable checkpoint is never renamed, moved or deleted by a
failure; only what fails to read is set aside (renamed, kept); a resumed run ends bitwise where an
uninterrupted one ends; every error is one line.
"""

import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import runs
from fmjax.checkpoint import Checkpointer
from fmjax.cli import main
from fmjax.runs import RunConfig, load_run, train

FMJAX = os.path.join(os.path.dirname(sys.executable), "fmjax")
TINY = {
    "steps": 60, "batch_size": 64, "width": 16, "log_every": 10, "checkpoint_every": 10,
    "keep_checkpoints": 10, "eval_samples": 200,
}  # fmt: skip
CONFIG = RunConfig(**TINY)
CLI = [
    "--steps", "60", "--batch-size", "64", "--width", "16", "--log-every", "10", "--checkpoint-every", "10",
    "--keep-checkpoints", "10", "--eval-samples", "200", "--no-progress", "--no-plots",
]  # fmt: skip


# --- helpers ------------------------------------------------------------------------------------------


def _raw(tree):
    """Host bytes of every leaf (typed keys as their raw data)."""
    raw = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(raw)]


def _is_key(x):
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _checkpoint(run_dir, step):
    """Bytes of checkpoint ``step`` of a run (of CONFIG's structure)."""
    with Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True) as ckpt:
        return _raw(ckpt.restore(runs.Run.build(CONFIG).state, step))


def _final(run_dir):
    run = load_run(run_dir)
    return int(run.state.step), _raw(run.state)


def _snapshot(directory):
    """Every file under ``directory`` with its bytes (links as their target)."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                out[os.path.relpath(path, directory)] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    out[os.path.relpath(path, directory)] = f.read()
    return out


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "event" not in r]


def _one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fmjax: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of CONFIG (all six checkpoints kept), trained through the API."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(CONFIG, out)
    return out


def _copy(reference, tmp_path, name="run", drop=()):
    """A copy of the reference run without the checkpoints ``drop`` (so training resumes)."""
    out = tmp_path / name
    shutil.copytree(reference, out)
    for step in drop:
        shutil.rmtree(out / "checkpoints" / str(step))
    return out


# --- stray and damaged entries of checkpoints/ (Checkpointer) ------------------------------------------


def _small(step):
    return {"w": jnp.arange(6.0, dtype=jnp.float32) + step, "n": jnp.full((2, 3), step, jnp.int32)}


def _copy_step(directory, source, name):
    shutil.copytree(directory / str(source), directory / name)


def _garble(path, rng):
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                size = f.seek(0, 2)
                f.seek(0)
                f.write(rng.randbytes(max(size, 8)))


def _truncate(path):
    for root, _, files in os.walk(path):
        for name in files:
            if name != "_CHECKPOINT_METADATA":
                open(os.path.join(root, name), "w").close()


def _foreign(directory, name):
    """A checkpoint of another structure (another run's) named ``name``."""
    with Checkpointer(directory / "other", max_to_keep=None) as other:
        other.save(9, {"w": jnp.zeros(7), "extra": jnp.ones(3)})
    shutil.move(directory / "other" / "9", directory / name)
    shutil.rmtree(directory / "other")


# name -> (make the stray entry in directory d, expected restored step, whether the stray is set aside)
STRAYS = {
    "unknown-folder": (
        lambda d: (d / "notes").mkdir() or (d / "notes" / "x.txt").write_text("mine"),
        2,
        False,
    ),
    "prefixed-step-folder": (lambda d: _copy_step(d, 1, "backup_9"), 2, False),
    "file-named-like-a-step": (lambda d: (d / "9").write_text("not a checkpoint"), 2, False),
    "broken-link-named-like-a-step": (lambda d: os.symlink("/nonexistent/fmjax", d / "9"), 2, False),
    "empty-step-folder": (lambda d: (d / "9").mkdir(), 2, True),
    "step-folder-without-data": (
        lambda d: (d / "9").mkdir() or shutil.copy(d / "2" / "_CHECKPOINT_METADATA", d / "9"),
        2,
        True,
    ),
    "garbled-step-folder": (lambda d: _copy_step(d, 2, "9") or _garble(d / "9", random.Random(9)), 2, True),
    "truncated-step-folder": (lambda d: _copy_step(d, 2, "9") or _truncate(d / "9"), 2, True),
    "orbax-temporary-folder": (lambda d: _copy_step(d, 2, "9.orbax-checkpoint-tmp-1234"), 2, False),
    "zero-padded-copy": (lambda d: _copy_step(d, 2, "0009"), 2, False),
    "left-over-corrupt-folder": (lambda d: _copy_step(d, 2, "9.corrupt"), 2, False),
    "another-runs-checkpoint": (lambda d: _foreign(d, "9"), 2, True),
    "empty-older-step-folder": (lambda d: (d / "0").mkdir(), 2, True),
}


def _entry(path):
    """What is at ``path``: a folder's files, a file's bytes or a link's target."""
    if os.path.islink(path):
        return "-> " + os.readlink(path)
    if os.path.isdir(path):
        return _snapshot(path)
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("kind", list(STRAYS))
def test_a_stray_entry_never_costs_a_readable_checkpoint(tmp_path, kind):
    make, expected, set_aside = STRAYS[kind]
    directory = tmp_path / "ckpt"
    with Checkpointer(directory, max_to_keep=3) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _small(step))
    readable = {step: _snapshot(directory / step) for step in ("1", "2")}
    make(directory)
    (stray,) = sorted(set(os.listdir(directory)) - {"1", "2"})
    content = _entry(directory / stray)
    with Checkpointer(directory, max_to_keep=3) as ckpt:
        state, step, skipped = ckpt.restore_latest_good(_small(0))
        assert step == expected and _raw(state) == _raw(_small(expected))
        assert [s for s, _ in skipped] == ([int(stray)] if set_aside else [])
        assert {step: _snapshot(directory / step) for step in ("1", "2")} == readable
        assert sorted(set(os.listdir(directory)) - {"1", "2"}) == [f"{stray}.corrupt" if set_aside else stray]
        ckpt.save(9, _small(9))  # the step of the stray entry: what is in its way is kept aside
        assert ckpt.restore(_small(0))["w"].tolist() == _small(9)["w"].tolist()
    names = sorted(os.listdir(directory))
    assert _snapshot(directory / "2") == readable["2"]  # 1 may have been retired (max_to_keep = 3)
    keeping = [n for n in names if n != "9" and (n.startswith(stray) or n.startswith("9.corrupt"))]
    assert any(_entry(directory / n) == content for n in keeping), names  # nothing of it was deleted


def test_a_step_that_exists_is_never_renamed_by_saving_it_again(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        ckpt.save(1, _small(1))
        ckpt.save(2, _small(2))
        before = _snapshot(tmp_path)
        for step in (1, 2):
            with pytest.raises(ValueError, match=rf"never overwritten\); got {step}"):
                ckpt.save(step, _small(5))
        assert _snapshot(tmp_path) == before


def test_a_checkpoints_path_that_is_a_file(reference, tmp_path, capsys):
    out = _copy(reference, tmp_path)
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").write_text("precious")
    with pytest.raises(NotADirectoryError, match="is not a directory") as info:
        Checkpointer(out / "checkpoints")
    assert "\n" not in str(info.value)
    before = _snapshot(out)
    start = time.monotonic()
    assert main(["train", "--out", str(out), *CLI]) == 2
    assert "checkpoints is not a directory" in _one_line(capsys.readouterr().err)
    assert main(["sample", str(out), "--n", "10"]) == 2
    assert "checkpoints is not a directory" in _one_line(capsys.readouterr().err)
    assert time.monotonic() - start < 60 and _snapshot(out) == before  # no hang, nothing changed


def test_checkpoints_replaced_by_a_file_during_training(tmp_path):
    out, done = tmp_path / "run", []

    def progress(n):  # after checkpoint 30 was started: the directory becomes a file
        done.append(n)
        if sum(done) == 30:
            time.sleep(0.2)
            shutil.rmtree(out / "checkpoints")
            (out / "checkpoints").write_text("mine")

    with pytest.raises(OSError, match=r"could not write checkpoint 40 in .*Not a directory") as info:
        train(CONFIG, out, progress=progress)
    assert "\n" not in str(info.value) and (out / "checkpoints").read_text() == "mine"
    assert _helpers_waiting() == []  # the process can exit at once


def test_a_checkpoint_holding_another_step_is_set_aside_and_the_run_ends_bitwise(reference, tmp_path):
    # a step folder "50" that holds step 30's state (copied by hand): resuming from it would save 50 again
    out = _copy(reference, tmp_path, drop=(50, 60))
    shutil.copytree(out / "checkpoints" / "30", out / "checkpoints" / "50")
    messages = []
    train(CONFIG, out, log=messages.append)
    assert any("checkpoint 50 is unreadable (it holds the state of step 30)" in m for m in messages), messages
    assert "resuming from checkpoint 40" in messages
    assert (out / "checkpoints" / "50.corrupt").is_dir()
    assert _final(out) == _final(reference)


def test_another_runs_checkpoint_among_the_steps_resumes_from_this_runs(reference, tmp_path):
    out = _copy(reference, tmp_path, drop=(60,))
    _foreign(out / "checkpoints", "55")
    messages = []
    train(CONFIG, out, log=messages.append)
    assert any("checkpoint 55 is unreadable (its structure or shapes differ" in m for m in messages), messages
    assert _final(out) == _final(reference) and (out / "checkpoints" / "55.corrupt").is_dir()


# --- the lock on the run directory ---------------------------------------------------------------------


def test_a_second_writer_is_refused_in_one_line(reference, tmp_path, capsys):
    out = _copy(reference, tmp_path, drop=(60,))
    lock = runs.RunLock(str(out))
    lock.acquire()  # as a running `fmjax train` holds it
    try:
        before = _snapshot(out)
        assert main(["train", "--out", str(out), *CLI]) == 2
        line = _one_line(capsys.readouterr().err)
        assert f"--out '{out}' is in use by another fmjax train (pid {os.getpid()} on" in line, line
        with pytest.raises(BlockingIOError, match="is in use by another fmjax train"):
            train(CONFIG, out)
        assert _snapshot(out) == before
        assert main(["sample", str(out), "--n", "20", "--solver", "euler", "--steps", "4"]) == 0  # reading
    finally:
        lock.release()
    assert not (out / "train.lock").exists()


def test_a_lock_left_by_a_killed_run_is_taken_over(reference, tmp_path):
    out = _copy(reference, tmp_path, drop=(60,))
    (out / "train.lock").write_text("pid 999999 on a-host-long-gone\n")  # no process holds it
    train(CONFIG, out)
    assert _final(out) == _final(reference) and not (out / "train.lock").exists()
    fresh = tmp_path / "fresh"  # killed before it wrote anything but its lock
    fresh.mkdir()
    (fresh / "train.lock").write_text("")
    runs.check_run_dir(CONFIG, fresh)  # not "holds files but no fmjax run"
    lock = runs.RunLock(str(fresh))
    lock.acquire()
    assert (fresh / "train.lock").read_text().startswith(f"pid {os.getpid()} on ")
    lock.release()
    assert os.listdir(fresh) == []


# --- metrics.jsonl ----------------------------------------------------------------------------------------


def test_a_cut_last_metrics_line_is_set_aside_on_resume(reference, tmp_path):
    out = _copy(reference, tmp_path, drop=(60,))
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:-1]) + lines[-1][:17])  # killed mid-write
    messages = []
    train(CONFIG, out, log=messages.append)
    assert any(f"line(s) {len(lines)} are not metrics records (the last one cut short" in m for m in messages)
    assert (out / "metrics.jsonl.corrupt").read_text() == lines[-1][:17] + "\n"
    assert [s for s, _ in _losses(out)] == [s for s, _ in _losses(reference)]
    assert _losses(out) == _losses(reference) and _final(out) == _final(reference)


JUNK = ["\x00\x17garbage", '"a string"', "[1, 2]", '{"step": "ten", "loss": 1}', '{"loss": 0.5', "{}"]


def test_garbled_metrics_lines_in_the_middle_are_set_aside_with_their_numbers(reference, tmp_path):
    out = _copy(reference, tmp_path, drop=(60,))
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text(
        "".join(lines[:2]) + "".join(j + "\n" for j in JUNK) + "".join(lines[2:])
    )
    messages = []
    train(CONFIG, out, log=messages.append)
    numbers = ", ".join(str(n) for n in range(3, 3 + len(JUNK)))
    assert any(f"metrics.jsonl: line(s) {numbers} are not metrics records; moved to" in m for m in messages)
    assert (out / "metrics.jsonl.corrupt").read_text() == "".join(j + "\n" for j in JUNK)
    assert _losses(out) == _losses(reference)


def test_metrics_that_are_a_directory_are_refused_in_one_line(reference, tmp_path, capsys):
    out = _copy(reference, tmp_path, drop=(60,))
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").mkdir()
    before = _snapshot(out)
    assert main(["train", "--out", str(out), *CLI]) == 2
    assert "metrics.jsonl is not a file" in _one_line(capsys.readouterr().err)
    assert _snapshot(out) == before


def test_a_record_appended_after_a_cut_line_stays_a_line_of_its_own(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "lo')
    runs.append_record(str(path), {"event": "nll", "nll": 1.5})
    assert path.read_text().splitlines()[-2:] == ['{"step": 20, "lo', '{"event": "nll", "nll": 1.5}']
    runs.resume_metrics(str(path), 20)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 10, "loss": 1.0},
        {"event": "nll", "nll": 1.5},
    ]


def test_an_append_waiting_on_a_rewrite_lands_in_the_new_file(tmp_path):
    """`fmjax nll` appending while `fmjax train` rewrites the metrics on resume: the record is not lost
    in the replaced file."""
    import fcntl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.5}\n')
    with open(path, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the rewrite of resume_metrics holds this lock
        appender = threading.Thread(target=runs.append_record, args=(str(path), {"event": "nll", "nll": 2.0}))
        appender.start()
        time.sleep(0.2)
        assert appender.is_alive()  # waiting for the lock
        replacement = tmp_path / "new"
        replacement.write_text('{"step": 10, "loss": 1.0}\n')
        os.replace(replacement, path)
    appender.join(10)
    assert path.read_text().splitlines() == ['{"step": 10, "loss": 1.0}', '{"event": "nll", "nll": 2.0}']


# --- sample and nll on damaged runs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gaussian_run(tmp_path_factory):
    """A run with a closed-form source density (for nll), checkpoints 10 and 20."""
    out = tmp_path_factory.mktemp("gaussian") / "run"
    train(RunConfig(**{**TINY, "steps": 20, "source": "gaussian"}), out)
    return out


@pytest.mark.parametrize(
    "command", [["sample", "--n", "20", "--solver", "euler", "--steps", "4"], ["nll", "--n", "20"]]
)
def test_sample_and_nll_fall_back_from_an_unreadable_checkpoint(gaussian_run, tmp_path, capsys, command):
    out = tmp_path / "run"
    shutil.copytree(gaussian_run, out)
    _truncate(out / "checkpoints" / "20")
    checkpoints = _snapshot(out / "checkpoints")
    capsys.readouterr()
    assert main([command[0], str(out), *command[1:]]) == 0
    err = capsys.readouterr().err
    # one warning, besides the line that says what the command is computing
    progress = ("fmjax: sampling", "fmjax: integrating")
    told = "\n".join(line for line in err.splitlines() if not line.startswith(progress))
    assert _one_line(told).startswith("fmjax: warning: checkpoint 20 in ") and "using checkpoint 10" in err
    assert _snapshot(out / "checkpoints") == checkpoints  # readers rename nothing
    _truncate(out / "checkpoints" / "10")
    assert main([command[0], str(out), *command[1:]]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "has no checkpoint that reads back: 20 (" in line and "10 (" in line


def test_evaluating_nonfinite_parameters_is_one_line(gaussian_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(gaussian_run, out)
    shutil.rmtree(out / "checkpoints")
    run = load_run(gaussian_run)
    with Checkpointer(out / "checkpoints") as ckpt:
        nan = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), run.state.ema_params)
        ckpt.save(20, run.state.replace(ema_params=nan))
    capsys.readouterr()
    for command in (
        ["sample", str(out), "--n", "10", "--solver", "euler", "--steps", "4"],
        ["nll", str(out)],
    ):
        assert main(command) == 2
        assert "EMA parameters at step 20 are not finite" in _one_line(capsys.readouterr().err)
    with pytest.raises(ValueError, match="are not finite"):
        runs.evaluate(load_run(out), out)


# --- nothing written before the configuration and data are checked ------------------------------------


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    from fmjax.data.tfds_sources import data_source

    path = tmp_path_factory.mktemp("tfds")
    data_source("digits", split="train", data_dir=str(path))  # prepared here: its progress bars stay out
    return path


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        # builds layers before it can refuse
        pytest.param(["--width", "3"], "cannot make a UNet for 'digits'", marks=pytest.mark.slow),
        (["--batch-size", "5000"], "--batch-size 5000 is larger"),
    ],
    ids=["width", "batch"],
)
def test_a_failed_image_run_writes_nothing(tmp_path, capsys, monkeypatch, digits_dir, args, flag):
    monkeypatch.setenv("FMJAX_DATA_DIR", str(digits_dir))
    out = tmp_path / "run"
    image = ["train", "--out", str(out), "--dataset", "digits", "--steps", "2", "--batch-size", "32"]
    assert main([*image, "--width", "8", "--no-progress", *args]) == 2
    assert flag in _one_line(capsys.readouterr().err)
    assert not out.exists()


def test_a_run_stopped_before_its_first_checkpoint_takes_the_corrected_command(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *CLI, "--learning-rate", "1e12"]) == 2
    assert "training stopped. no checkpoint yet" in _one_line(capsys.readouterr().err)
    messages = []
    train(RunConfig(**{**TINY, "steps": 20}), out, log=messages.append)  # the lower default rate
    assert any("(differs in learning_rate, steps) that saved no checkpoint" in m for m in messages), messages
    assert json.loads((out / "config.json.old").read_text())["learning_rate"] == 1e12
    assert json.loads((out / "config.json").read_text())["learning_rate"] == 1e-3
    assert sorted(os.listdir(out / "checkpoints")) == ["10", "20"]


# --- non-finite training --------------------------------------------------------------------------------


def test_a_blown_up_gradient_stops_at_the_first_bad_step_keeping_the_last_good_checkpoint(tmp_path, capsys):
    # --learning-rate 100: the loss stays finite while the gradient norm overflows to inf at step 3
    out = tmp_path / "run"
    args = [
        "train",
        "--out",
        str(out),
        *CLI,
        "--learning-rate",
        "100",
        "--log-every",
        "1",
        "--checkpoint-every",
        "2",
    ]
    assert main(args) == 2
    line = _one_line(capsys.readouterr().err)
    assert "the gradient norm (inf) became non-finite at step 3; training stopped" in line, line
    assert "the last good checkpoint is step 2" in line
    with Checkpointer(out / "checkpoints", read_only=True) as ckpt:
        assert ckpt.all_steps() == [2]
    state = load_run(out).state
    assert int(state.step) == 2 and all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params))
    assert [s for s, _ in _losses(out)] == [1, 2]


# --- the CLI names its own options ------------------------------------------------------------------------

FLAG_CASES = [
    (["train", "--source", "nope"], "--source must be one of"),
    (["train", "--target", "nope"], "--target must be one of"),
    (["train", "--dataset", "nope"], "--dataset must be one of"),
    (["train", "--path", "nope"], "--path must be one of"),
    (["train", "--sigma", "-1"], "--sigma must be >= 0"),
    (["train", "--path", "condot", "--sigma", "-1"], "--sigma must be >= 0"),  # sigma_min in the API
    (["train", "--path", "condot", "--sigma", "nan"], "--sigma must be finite"),
    (["train", "--path", "vp", "--sigma", "0.3"], "--sigma is not a parameter of --path 'vp'"),
    (["train", "--coupling", "nope"], "--coupling must be one of"),
    (["train", "--coupling-scope", "nope"], "--coupling-scope must be one of"),
    (["train", "--steps", "0"], "--steps must be >= 1"),
    (["train", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["train", "--width", "0"], "--width must be >= 1"),
    (["train", "--depth", "0"], "--depth must be >= 1"),
    (["train", "--activation", "nope"], "--activation must be one of"),
    (["train", "--learning-rate", "0"], "--learning-rate must be > 0"),
    (["train", "--learning-rate", "inf"], "--learning-rate must be finite"),
    (["train", "--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["train", "--ema-decay", "1"], "--ema-decay must be < 1"),
    (["train", "--seed", "-1"], "--seed must be >= 0"),
    (["train", "--eval-samples", "0"], "--eval-samples must be >= 1"),
    (["train", "--eval-solver", "euler"], "--eval-solver must be adaptive"),
    (["train", "--log-every", "0"], "--log-every must be >= 1"),
    (["train", "--checkpoint-every", "0"], "--checkpoint-every must be >= 1"),
    (["train", "--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1"),
    (["train", "--on-nonfinite", "nope"], "--on-nonfinite must be one of"),
    (["train", "--precision", "fp8"], "--precision must be one of"),
    (["train", "--devices", "0"], "--devices must be >= 1"),
    (["train", "--distributed", "nope"], "--distributed must be 'auto'"),
    (
        ["train", "--coordinator", "h:1", "--num-processes", "0", "--process-id", "0"],
        "--process-id must be in",
    ),
    (["train", "--steps", "ten"], "argument --steps: invalid int value"),
    (["train", "--out", "{file}"], "--out '{file}' is a file, not a directory"),
    (["sample", "{run}", "--n", "0"], "--n must be >= 1"),
    (["sample", "{run}", "--solver", "nope"], "--solver must be one of"),
    (["sample", "{run}", "--solver", "euler", "--steps", "0"], "--steps must be >= 1"),
    (["sample", "{run}", "--solver", "euler"], "--steps is required for --solver 'euler'"),
    (["sample", "{run}", "--seed", "x"], "argument --seed: invalid int value"),
    (["nll", "{run}", "--n", "1"], "--n must be >= 2"),
    (["nll", "{run}", "--divergence", "nope"], "--divergence must be one of"),
    (["nll", "{run}", "--divergence", "hutchinson", "--num-probes", "0"], "--num-probes must be >= 1"),
    (["nll", "{run}", "--divergence", "hutchinson", "--probe", "nope"], "--probe must be one of"),
    (["nll", "{run}", "--solver", "nope"], "--solver must be one of"),
    (["nll", "{run}", "--solver", "euler"], "--solver must be adaptive"),
]


@pytest.mark.parametrize(("args", "needle"), FLAG_CASES, ids=[f"{a[0]}: {n}" for a, n in FLAG_CASES])
def test_a_bad_value_names_the_option_as_typed(gaussian_run, tmp_path, capsys, args, needle):
    names = {"run": gaussian_run, "file": tmp_path / "file"}
    (tmp_path / "file").write_text("x")
    args = [a.format(**names) for a in args]
    if args[0] == "train" and "--out" not in args:
        args += ["--out", str(tmp_path / "new")]
    if args[0] == "train":
        args.append("--no-progress")
    before = _snapshot(gaussian_run)
    capsys.readouterr()
    assert main(args) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"fmjax: error: {needle.format(**names)}"), line
    assert not (tmp_path / "new").exists() and _snapshot(gaussian_run) == before


# --- Ctrl-C and a concurrent writer, with real processes ------------------------------------------------

LONG = {**TINY, "steps": 2000, "log_every": 25, "checkpoint_every": 100, "keep_checkpoints": 3}
LONG_CLI = [
    "--steps", "2000", "--batch-size", "64", "--width", "16", "--log-every", "25", "--checkpoint-every",
    "100", "--keep-checkpoints", "3", "--eval-samples", "200", "--no-progress", "--no-plots",
]  # fmt: skip
INTERRUPTED = (
    r"fmjax: interrupted at step (\d+) \((checkpoint \1 is saved|no checkpoint yet)\); resume with the"
)


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("long") / "run"
    train(RunConfig(**LONG), out)
    return out


def _lines(path):
    try:
        with open(path) as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def _wait_for(condition, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before the moment to interrupt it"


def _start(out):
    return subprocess.Popen(
        [FMJAX, "train", "--out", str(out), *LONG_CLI],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _interrupt(out, process):
    """Ctrl-C: one line, exit status 130, the interrupted step saved; returns that step."""
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]  # not a traceback (1), not a segfault (-11)
    step = int(re.fullmatch(INTERRUPTED + " same command", _one_line(err)).group(1))
    with Checkpointer(out / "checkpoints", read_only=True) as ckpt:
        assert ckpt.latest_step() == (step or None)
    return step


def test_ctrl_c_during_the_first_compile_and_an_async_write_then_resume_bitwise(
    long_reference, tmp_path, capsys
):
    out = tmp_path / "run"
    process = _start(out)
    _wait_for(lambda: (out / "config.json").exists(), process)  # locked, about to compile the first chunk
    assert main(["train", "--out", str(out), *LONG_CLI]) == 2  # a second writer meanwhile
    line = _one_line(capsys.readouterr().err)
    assert f"is in use by another fmjax train (pid {process.pid} on" in line, line
    assert _interrupt(out, process) <= 25
    process = _start(out)  # the same command resumes; interrupted again while it trains
    _wait_for(lambda: _lines(out / "metrics.jsonl") >= 10, process)  # a checkpoint is written every 4 records
    assert 250 <= _interrupt(out, process) < 2000
    train(RunConfig(**LONG), out)
    assert _final(out) == _final(long_reference) and _losses(out) == _losses(long_reference)


# --- processes of one run that disagree -------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(tmp_path, per_process):
    """Run the two processes of one jax.distributed `fmjax train`; (return codes, their fmjax lines)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    flags = ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2"]
    processes = [
        subprocess.Popen(
            [FMJAX, "train", *CLI, *per_process[i], *flags, "--process-id", str(i)],
            stdout=open(tmp_path / f"log{i}", "w"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
            env=env,
        )
        for i in range(2)
    ]
    for process in processes:
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise AssertionError("a process of a run that cannot start waited instead of failing") from None
    logs = [(tmp_path / f"log{i}").read_text() for i in range(2)]
    assert not any("Traceback" in log for log in logs), logs
    return [p.returncode for p in processes], [
        [line for line in log.splitlines() if line.startswith("fmjax:")] for log in logs
    ]


def test_processes_given_different_run_dirs_fail_at_start_in_one_line(tmp_path):
    start = time.monotonic()
    codes, lines = _two_processes(tmp_path, [["--out", str(tmp_path / "a")], ["--out", str(tmp_path / "b")]])
    assert codes == [2, 2] and time.monotonic() - start < 90
    for got in lines:
        assert (
            len(got) == 1
            and f"process(es) [1] got another --out than process 0's '{tmp_path / 'a'}'" in got[0]
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_processes_given_different_configurations_fail_at_start_in_one_line(tmp_path):
    out = ["--out", str(tmp_path / "run")]
    codes, lines = _two_processes(tmp_path, [out, [*out, "--seed", "3"]])
    assert codes == [2, 2]
    assert all(len(got) == 1 and "[1] got another configuration than process 0" in got[0] for got in lines)
    assert "(differs in --seed)" in lines[1][0] and not (tmp_path / "run").exists()


# --- faults injected at random points of checkpoint writes ------------------------------------------------

FAULTY = RunConfig(**{**TINY, "keep_checkpoints": 3})  # old checkpoints are deleted too
FAULTY_CLI = [*CLI, "--keep-checkpoints", "3"]  # the last one counts
ORBAX_IO = ("exists", "mkdir", "write_text", "write_bytes", "read_text", "rename", "glob", "rmtree", "unlink")


def _inject(patch, k):
    """Make the k-th I/O call of orbax's writer (its async path functions) raise OSError(EIO)."""
    from orbax.checkpoint._src.path import async_path

    calls = {"n": 0, "fired": None}
    for name in ORBAX_IO:

        async def failing(*args, _real=getattr(async_path, name), _name=name, **kwargs):
            calls["n"] += 1
            if calls["n"] == k:
                calls["fired"] = _name
                raise OSError(errno.EIO, f"injected I/O error in {_name}")
            return await _real(*args, **kwargs)

        patch.setattr(async_path, name, failing)
    return calls


def _helpers_waiting():
    """orbax's helper threads still alive (after a failed save they must not wait out orbax's 300 s
    timeout, which kept the process from exiting)."""
    from orbax.checkpoint._src.futures import future

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = [t for t in threading.enumerate() if isinstance(t, future._SignalingThread) and t.is_alive()]
        if not alive:
            return []
        time.sleep(0.05)
    return alive


def _check_after_fault(reference, out, failure, config=FAULTY):
    """Every checkpoint that reads back is the reference's at its step; at most the one being written when
    the fault hit is missing; no helper thread is left waiting; the same command then ends bitwise where
    the reference ended."""
    assert _helpers_waiting() == []
    with Checkpointer(out / "checkpoints", read_only=True) as ckpt:
        steps = ckpt.all_steps()
    readable = []
    for step in steps:
        try:
            got = _checkpoint(out, step)
        except Exception:  # set aside by the resume below
            continue
        assert got == _checkpoint(reference, step), step
        readable.append(step)
    written = re.search(r"could not write checkpoint (\d+)", str(failure)) if failure else None
    if written and int(written.group(1)) > 10:
        assert int(written.group(1)) - 10 in readable, (str(failure), steps, readable)
    train(config, out)
    assert _final(out) == _final(reference)


# the I/O calls of orbax in a whole run of FAULTY (120 with orbax 0.12; a k past the end injects nothing)
ORBAX_CALLS = 120


def _fault_trials(reference, tmp_path, monkeypatch, trials, seed):
    rng = random.Random(seed)
    fired = []
    for k in sorted(rng.sample(range(1, ORBAX_CALLS + 1), trials)):
        out = tmp_path / f"fault{k}"
        failure = None
        with monkeypatch.context() as patch:
            calls = _inject(patch, k)
            try:
                train(FAULTY, out)
            except OSError as error:
                failure = error
        assert calls["fired"] or failure is None
        assert failure is None or "\n" not in str(failure)
        fired.append((k, calls["fired"], failure is not None))
        _check_after_fault(reference, out, failure)
    return fired


def test_a_fault_at_random_io_calls_of_the_checkpoint_writer(reference, tmp_path, monkeypatch):
    fired = _fault_trials(reference, tmp_path, monkeypatch, trials=2, seed=15)
    assert any(failed for _, _, failed in fired), fired


@pytest.mark.slow
def test_faults_at_many_random_io_calls_of_the_checkpoint_writer(reference, tmp_path, monkeypatch):
    fired = _fault_trials(reference, tmp_path, monkeypatch, trials=40, seed=1515)
    assert sum(failed for _, _, failed in fired) >= 10, fired


def _damage(step_dir, rng):
    """Cut a random file of a checkpoint at a random length, or delete it."""
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(step_dir) for name in names)
    path = rng.choice(files)
    if rng.random() < 0.3:
        os.unlink(path)
        return
    with open(path, "r+b") as f:
        f.truncate(rng.randrange(max(os.path.getsize(path), 1)))


def _damage_trials(reference, tmp_path, trials, seed):
    rng = random.Random(seed)
    for trial in range(trials):
        out = _copy(reference, tmp_path, f"damaged{trial}")
        for step in rng.sample([40, 50, 60], rng.randint(1, 3)):
            _damage(out / "checkpoints" / str(step), rng)
        _check_after_fault(reference, out, None, CONFIG)


def test_checkpoints_cut_short_at_random_points_resume_bitwise(reference, tmp_path):
    _damage_trials(reference, tmp_path, trials=2, seed=16)


@pytest.mark.slow
def test_many_checkpoints_cut_short_at_random_points_resume_bitwise(reference, tmp_path):
    _damage_trials(reference, tmp_path, trials=30, seed=1616)


FULL_DISK = """mount -t tmpfs -o size={size}k tmpfs {mount} &&
{fmjax} train --out {mount}/run {args} 2> {log}; echo $? > {rc};
cp -a {mount}/run {copy} 2>/dev/null || true"""


@pytest.mark.slow
def test_a_full_disk_at_random_points_of_a_run(reference, tmp_path):
    """A tmpfs of random size in a private mount namespace: the disk fills at a random point of the run
    (config, metrics, any file of any checkpoint, the evaluation)."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    probe = (
        subprocess.run(["unshare", "-rm", "true"], capture_output=True) if shutil.which("unshare") else None
    )
    if probe is None or probe.returncode:
        pytest.skip("needs `unshare -rm` (user namespaces) for a private tmpfs")
    args = " ".join(FAULTY_CLI)
    rng, codes = random.Random(17), []
    for trial in range(8):
        paths = {n: tmp_path / f"{n}{trial}" for n in ("log", "rc", "copy")}
        script = FULL_DISK.format(size=rng.randint(40, 600), mount=mount, fmjax=FMJAX, args=args, **paths)
        done = subprocess.run(
            ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        code = int(paths["rc"].read_text())
        assert code in (0, 2), paths["log"].read_text()[-2000:]
        codes.append(code)
        if code == 2:
            _one_line(paths["log"].read_text())
        if paths["copy"].exists() and (paths["copy"] / "config.json").exists():
            _check_after_fault(reference, paths["copy"], None)
    assert codes.count(2) >= 4, codes  # most runs met the full disk


@pytest.mark.slow
def test_runs_killed_during_async_checkpoint_writes_resume_bitwise(reference, tmp_path):
    """SIGKILL at random moments of a run that writes a checkpoint after every chunk."""
    rng = random.Random(18)
    for trial in range(6):
        out = tmp_path / f"killed{trial}"
        process = subprocess.Popen(
            [FMJAX, "train", "--out", str(out), *FAULTY_CLI],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for(lambda: (out / "config.json").exists(), process)  # noqa: B023 - called at once
        time.sleep(rng.uniform(0.0, 3.0))
        process.kill()
        process.wait()
        train(FAULTY, out)
        assert _final(out) == _final(reference)


@pytest.mark.slow
def test_ctrl_c_while_loading_and_during_the_evaluation(long_reference, tmp_path, capsys):
    out = tmp_path / "run"
    process = _start(out)
    # while the command's modules load (jax: a second or more); not sooner: before main() installs its
    # handler (Python starting up) a Ctrl-C is Python's own KeyboardInterrupt
    time.sleep(0.8)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted before it started" in _one_line(err)
    assert not out.exists()
    process = _start(out)
    _wait_for(lambda: (out / "checkpoints" / "2000").is_dir(), process, timeout=300)
    time.sleep(0.5)  # evaluating
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    line = _one_line(err)
    assert process.returncode == 130 and ("training is complete" in line or "after training 2000" in line), (
        err
    )
    assert _final(out) == _final(long_reference)
    assert main(["train", "--out", str(out), *LONG_CLI]) == 0  # evaluates, trains nothing
    assert _final(out) == _final(long_reference) and (out / "summary.json").is_file()

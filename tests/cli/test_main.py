"""The fmjax command."""

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import pytest

from fmjax.cli import main

SMALL = ["--steps", "200", "--batch-size", "64", "--width", "16", "--eval-samples", "300", "--no-progress"]


# one complete run shared by the tests that read it (those that write into it work on a copy)
RUN_ARGS = [*SMALL, "--source", "gaussian"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run of RUN_ARGS (with its plots) and what the command printed."""
    out = tmp_path_factory.mktemp("cli") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", "--out", str(out), *RUN_ARGS]) == 0
    return out, printed.getvalue()


def _copy(finished, tmp_path):
    return shutil.copytree(finished[0], tmp_path / "run")


def test_train_writes_a_complete_run(finished):
    out, printed = finished
    for name in (
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "samples.png",
        "trajectories.png",
        "loss.png",
    ):
        assert (out / name).is_file(), name
    assert os.listdir(out / "checkpoints") == ["200"]
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 200 and config["sigma"] == 0.1 and config["path"] == "linear"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records[:-1]] == [100, 200]
    assert records[-1]["event"] == "eval"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nfe"] > 0 and 0 < summary["w2"] < summary["w2_source_target"]
    assert f"W2 = {summary['w2']:.4f}" in printed and f"NFE = {summary['nfe']}" in printed


def test_resumed_config_rebuilds_the_trained_state(finished):
    from fmjax.runs import load_run

    run = load_run(finished[0])
    assert int(run.state.step) == 200


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--path", "ot"], "path must be one of 'condot', 'linear', 'sb', 'vp', 'vp_diffusion'"),
        (["train", "--coupling", "hungarian"], "coupling must be one of"),
        (["train", "--coupling-scope", "world"], "--coupling-scope must be one of 'global', 'local'"),
        (["train", "--source", "mnist"], "source must be one of"),
        (["train", "--steps", "0"], "steps must be >= 1"),
        (["train", "--steps", "ten"], "invalid int value"),
        (["train", "--sigma", "-1"], "--sigma must be >= 0"),
        (["train", "--path", "condot", "--sigma", "-1"], "--sigma must be >= 0"),
        (["train", "--path", "vp", "--sigma", "0.2"], "--sigma is not a parameter of --path 'vp'"),
        (["train", "--eval-solver", "euler"], "--eval-solver must be adaptive"),
        (["train", "--learning-rate", "nan"], "--learning-rate must be finite"),
        (["train", "--coupling", "sb", "--path", "vp"], "coupling 'sb' needs a path with sigma > 0"),
        (["frobnicate"], "invalid choice"),
        ([], "a command is required"),
    ],
)
def test_bad_arguments_print_one_line_and_exit_2(args, message, capsys, tmp_path):
    assert main([*args, "--out", str(tmp_path / "x")] if args and args[0] == "train" else args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fmjax: error: ")
    assert message in err
    assert not (tmp_path / "x").exists()


def test_a_directory_that_is_not_a_run_is_never_written(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert main(["train", "--out", str(out), *SMALL]) == 2
    assert "already holds files but no fmjax run" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "precious"


def test_a_broken_config_is_reported_and_kept(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("precious")
    assert main(["train", "--out", str(out), *SMALL]) == 2
    assert "is not an fmjax run configuration" in capsys.readouterr().err
    assert (out / "config.json").read_text() == "precious" and sorted(os.listdir(out)) == ["config.json"]


def test_a_run_of_another_configuration_is_not_touched(finished, capsys):
    out = finished[0]
    before = {p: (out / p).read_bytes() for p in ("config.json", "metrics.jsonl", "summary.json")}
    assert main(["train", "--out", str(out), *RUN_ARGS, "--no-plots", "--width", "32"]) == 2
    assert "belongs to a different configuration (differs in --width)" in capsys.readouterr().err
    assert {p: (out / p).read_bytes() for p in before} == before


def test_console_script_runs(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "fmjax")
    result = subprocess.run([script, "train", "--steps", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "fmjax: error: --steps must be >= 1; got 0"


# fmjax train with the exact coupling runs by default in tests/runs/test_distributed_processes.py (two
# processes and one); here with -m slow
@pytest.mark.parametrize(
    ("coupling", "path"),
    [pytest.param("exact", "linear", marks=pytest.mark.slow), ("sinkhorn", "condot"), ("sb", "sb")],
)
def test_train_with_ot_couplings(coupling, path, tmp_path):
    out = tmp_path / coupling
    args = ["train", "--out", str(out), *SMALL, "--steps", "100", "--coupling", coupling, "--path", path]
    assert main([*args, "--no-plots"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["w2"] < summary["w2_source_target"]


def test_paths_without_sigma_train_with_the_default_options(tmp_path):
    out = tmp_path / "vp"
    assert main(["train", "--out", str(out), *SMALL, "--steps", "20", "--path", "vp", "--no-eval"]) == 0
    assert json.loads((out / "config.json").read_text())["sigma"] is None


def test_sample_and_nll_on_a_trained_run(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    assert main(["sample", str(out), "--n", "200", "--solver", "euler", "--steps", "20"]) == 0
    printed = capsys.readouterr().out
    assert "NFE = 20" in printed and (out / "samples-euler-200.png").is_file()
    before = (out / "samples-euler-200.png").read_bytes()
    assert main(["sample", str(out), "--n", "200", "--solver", "euler", "--steps", "20"]) == 2
    assert (out / "samples-euler-200.png").read_bytes() == before  # never overwritten
    assert "already exists" in capsys.readouterr().err

    assert main(["nll", str(out), "--n", "100"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["event"] == "nll" and f"NLL = {record['nll']:.4f}" in printed
    assert math.isfinite(record["nll"]) and record["nfe"] > 0 and record["n"] == 100


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nll", "{missing}"], "does not exist"),
        (["nll", "{empty}"], "is not an fmjax run"),
        (["nll", "{run}", "--divergence", "trace"], "divergence must be one of"),
        (["nll", "{run}", "--divergence", "hutchinson", "--num-probes", "0"], "--num-probes must be >= 1"),
        (["sample", "{run}", "--solver", "rk4"], "--solver must be one of"),
        (["sample", "{run}", "--solver", "euler"], "--steps is required for --solver 'euler'"),
    ],
)
def test_run_commands_reject_bad_input(args, message, finished, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "run": finished[0]}
    listing = sorted(os.listdir(finished[0]))
    assert main([a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert sorted(os.listdir(finished[0])) == listing  # nothing written


def test_nll_needs_a_source_with_a_density(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), *SMALL, "--steps", "20", "--source", "moons", "--no-eval"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["nll", str(run)]) == 2
    assert "'moons' has no closed-form density" in capsys.readouterr().err


def test_rerunning_a_finished_run_keeps_its_records(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    args = ["train", "--out", str(out), *RUN_ARGS]
    assert main(["nll", str(out), "--n", "50"]) == 0
    before = (out / "metrics.jsonl").read_text().splitlines()
    capsys.readouterr()
    assert main(args) == 0  # nothing left to train, and its evaluation is current: neither is redone
    printed = capsys.readouterr().out
    assert "already trained (200 steps): nothing to train" in printed
    assert "trained 200 steps in" not in printed
    summary = json.loads((out / "summary.json").read_text())
    assert f"W2 = {summary['w2']:.4f}" in printed and "from " in printed
    assert (out / "metrics.jsonl").read_text().splitlines() == before
    (out / "summary.json").unlink()  # no current evaluation: the rerun evaluates
    assert main([*args, "--no-plots"]) == 0
    after = (out / "metrics.jsonl").read_text().splitlines()
    assert after[: len(before)] == before and json.loads(after[-1])["event"] == "eval"
    assert (out / "summary.json").is_file()


def test_coupling_scope_reaches_the_coupling():
    from fmjax.runs import RunConfig

    assert RunConfig(coupling="exact").make_coupling().scope == "global"
    assert RunConfig(coupling="exact", coupling_scope="local").make_coupling().scope == "local"
    assert RunConfig(coupling="sb", coupling_scope="local").make_coupling().scope == "local"
    # independent pairs are the same in either scope: never gathered
    assert RunConfig(coupling="independent").make_coupling().scope == "local"


def test_bf16_precision_trains_like_float32_with_float32_state(tmp_path):
    from fmjax.runs import load_run

    losses = {}
    for precision in ("float32", "bf16"):
        out = tmp_path / precision
        assert main(["train", "--out", str(out), *SMALL, "--no-eval", "--precision", precision]) == 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[precision] = [r["loss"] for r in records if "event" not in r]
        assert json.loads((out / "config.json").read_text())["precision"] == precision
    run = load_run(tmp_path / "bf16")
    assert {leaf.dtype.name for leaf in jax.tree.leaves(run.state.params)} == {"float32"}
    # bf16 rounds activations to 8 significant bits: the logged losses stay within 1% of float32's
    for a, b in zip(losses["bf16"], losses["float32"], strict=True):
        assert abs(a - b) < 0.01 * b


def test_summary_and_config_record_the_devices(finished):
    config = json.loads((finished[0] / "config.json").read_text())
    summary = json.loads((finished[0] / "summary.json").read_text())
    for record in (config["environment"], summary["environment"]):
        assert (
            record["devices"] == jax.device_count() and record["device_kind"] == jax.devices()[0].device_kind
        )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--devices", "0"], "devices must be >= 1; got 0"),
        (["--devices", "999"], "devices must be at most the"),
        (["--distributed", "slurm"], "--distributed must be 'auto'; got 'slurm'"),
        (["--distributed", "auto", "--process-id", "0"], "--distributed auto detects the cluster"),
        (["--distributed", "auto"], "--distributed auto found no cluster to join"),
        (["--precision", "fp8"], "precision must be one of 'bf16', 'float32'; got 'fp8'"),
    ],
)
def test_device_options_are_checked_before_anything_is_written(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *SMALL, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_unraisable_errors_the_cli_reports_itself_are_not_printed(monkeypatch):
    from types import SimpleNamespace

    from fmjax.cli.main import _drop_reported_unraisables

    passed_on = []
    monkeypatch.setattr(sys, "__unraisablehook__", passed_on.append)  # Python's printing hook
    reported = [KeyboardInterrupt(), RuntimeError("Event loop is closed")]  # a Ctrl-C in a gc callback; orbax
    other = RuntimeError("something else")
    for error in [*reported, other]:
        _drop_reported_unraisables(SimpleNamespace(exc_type=type(error), exc_value=error))
    assert [u.exc_value for u in passed_on] == [other]

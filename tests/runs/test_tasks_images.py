"""fmjax train --dataset digits: a UNet CFM on scikit-learn's digits through the tfds builder."""

import json

import pytest

from fmjax.cli import main


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    path = tmp_path / "tfds"
    monkeypatch.setenv("FMJAX_DATA_DIR", str(path))
    return path


DIGITS = [
    "--dataset", "digits", "--steps", "10", "--batch-size", "32", "--width", "8", "--channel-mults", "1",
    "--num-res-blocks", "1", "--log-every", "5", "--checkpoint-every", "5", "--eval-samples", "16",
    "--no-progress",
]  # fmt: skip
# a one-level UNet: the run, evaluation and commands are those of any digits run, compiled in half the time


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A digits run trained by ``fmjax train --no-eval`` (evaluated by the first test below)."""
    root = tmp_path_factory.mktemp("digits")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FMJAX_DATA_DIR", str(root / "tfds"))
        assert main(["train", "--out", str(root / "run"), *DIGITS, "--no-eval"]) == 0
        yield root / "run"


def test_the_same_command_evaluates_a_trained_digits_run(digits_run, capsys):
    out = digits_run
    assert main(["train", "--out", str(out), *DIGITS]) == 0  # trained: it evaluates, nothing more
    assert "already trained (10 steps): nothing to train" in capsys.readouterr().out
    for name in ("config.json", "metrics.jsonl", "summary.json", "samples.png"):
        assert (out / name).is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["path"] == "condot" and config["sigma"] == 1e-4 and config["dataset"] == "digits"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 16 and 0 < summary["bits_per_dim"] < 16 and summary["nfe"] > 0
    assert sorted(summary["fd_euler_steps"]) == ["1", "2", "4", "8"] and summary["fd_test_images"] == 16


# the exact divergence of a UNet's log-likelihood compiles for about a minute: with -m slow; the default run
# checks fmjax nll's Hutchinson estimate (the divergences themselves are checked in test_likelihood.py)
@pytest.mark.parametrize("divergence", ["hutchinson", pytest.param("exact", marks=pytest.mark.slow)])
def test_nll_scores_bits_per_dim_of_test_digits(digits_run, capsys, divergence):
    # the evaluation's own estimate (16 test images, 4 probes, seed 0): the same numbers, from the same
    # compiled program
    options = ["--n", "16", "--num-probes", "4"] if divergence == "hutchinson" else ["--n", "4"]
    assert main(["nll", str(digits_run), "--divergence", divergence, *options]) == 0
    printed = capsys.readouterr().out
    record = json.loads((digits_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["divergence"] == divergence and f"bits/dim = {record['bits_per_dim']:.4f}" in printed
    assert 0 < record["bits_per_dim"] < 16
    if divergence == "hutchinson":
        summary = json.loads((digits_run / "summary.json").read_text())
        assert record["n"] == summary["n"] == 16
        assert record["bits_per_dim"] == pytest.approx(summary["bits_per_dim"], rel=1e-6)
    else:
        assert record["n"] == 4


def test_sample_writes_a_grid_of_digits(digits_run):
    # 16 images in 8 Euler steps: the shapes of the evaluation's few-step samples (one compiled program)
    assert main(["sample", str(digits_run), "--n", "16", "--solver", "euler", "--steps", "8"]) == 0
    assert (digits_run / "samples-euler-16.png").is_file()


def test_unknown_dataset_is_named(tmp_path, capsys):
    assert main(["train", "--dataset", "imagenet", "--out", str(tmp_path / "x")]) == 2
    names = "'cifar10', 'digits', 'earthquake', 'fire', 'flood', 'mnist', 'volcano'"
    assert f"dataset must be one of {names}" in capsys.readouterr().err


# resumes log each step once with the same losses: tests/runs/test_loop_resume.py on 2D runs in the default
# selection
@pytest.mark.slow
def test_resumed_digits_run_logs_each_step_once_with_the_same_losses(tmp_path, data_dir):
    import shutil

    from fmjax.runs import RunConfig, train

    config = RunConfig(dataset="digits", steps=40, batch_size=16, width=8, log_every=10, checkpoint_every=20)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(config, whole)
    train(config, cut)
    # as if killed after logging step 40 but before its checkpoint was committed
    shutil.rmtree(cut / "checkpoints" / "40")
    train(config, cut)

    def logged(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    steps = [r["step"] for r in logged(cut)]
    assert steps == [10, 20, 30, 40]
    assert [r["loss"] for r in logged(cut)] == [r["loss"] for r in logged(whole)]

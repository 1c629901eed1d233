"""Training records to TensorBoard event files and to loggers (fmjax train --tensorboard / --wandb)."""

import importlib.util
import json

import pytest

from fmjax.cli import main
from fmjax.runs import RunConfig, evaluate, train

CONFIG = RunConfig(steps=60, batch_size=32, width=8, log_every=20, checkpoint_every=20, eval_samples=200)


class Recorder:
    """A logger: what the run sends to ``scalars``."""

    def __init__(self):
        self.calls = []

    def scalars(self, values, step):
        self.calls.append((step, dict(values)))


def _records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_loggers_receive_every_training_record_and_the_evaluation(tmp_path):
    recorder = Recorder()
    run = train(CONFIG, tmp_path / "run", loggers=[recorder])
    summary = evaluate(run, tmp_path / "run", plots=False, loggers=[recorder])
    training = [r for r in _records(tmp_path / "run") if "event" not in r]
    assert [step for step, _ in recorder.calls] == [20, 40, 60, 60]
    for (step, values), record in zip(recorder.calls, training, strict=False):
        assert step == record["step"] and values["train/loss"] == record["loss"]
        assert values["train/grad_norm"] == record["grad_norm"] and "train/step" not in values
    step, values = recorder.calls[-1]
    assert step == 60 and values["eval/w2"] == summary["w2"] and values["eval/nfe"] == summary["nfe"]
    assert "eval/solver" not in values  # strings are not scalars


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_files_hold_the_records_of_a_resumed_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    train(RunConfig(**{**CONFIG.to_json(), "steps": 40}), run_dir, tensorboard=True)
    # the same run continued: a config with more steps is refused, so resume a run stopped early instead
    stopped = {"n": 0}

    def stop():
        stopped["n"] += 1
        return stopped["n"] > 2

    other = tmp_path / "other"
    with pytest.raises(Exception, match="interrupted at step 40"):
        train(CONFIG, other, tensorboard=True, stop=stop)
    train(CONFIG, other, tensorboard=True)  # resumes at 40 and logs 60 into a new file
    events = EventAccumulator(str(other / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    expected = {r["step"]: r["loss"] for r in _records(other) if "event" not in r}
    assert set(logged) == {20, 40, 60} and all(abs(logged[s] - expected[s]) < 1e-6 for s in logged)
    assert len(list((other / "tensorboard").iterdir())) == 2  # one file per start


def test_cli_wandb_without_the_package_is_one_line_and_writes_nothing(tmp_path, capsys):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    out = tmp_path / "run"
    assert main(["train", "--steps", "20", "--out", str(out), "--wandb", "proj", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--wandb" in err[0] and "pip install wandb" in err[0]
    assert not out.exists()

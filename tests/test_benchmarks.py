"""The benchmark scripts run end to end on tiny settings (their timings are not checked here)."""

import pytest

from benchmarks import __main__ as suite
from benchmarks import couplings, likelihood, sampling, train_step


def test_train_step_benchmark_runs():
    report = train_step.main(["--batch", "32", "--width", "16", "--repeats", "1", "--inner", "2"])
    for name in ("plain I-CFM", "fmjax I-CFM", "fmjax OT-CFM (exact)"):
        assert f"| {name} |" in report


def test_coupling_benchmark_runs():
    report = couplings.main(["--sizes", "32", "--repeats", "1", "--hungarian-max", "32"])
    assert "| 32 | fmjax exact |" in report and "| 32 | ott Hungarian |" in report
    exact_rows = [line for line in report.splitlines() if "exact" in line or "Hungarian" in line]
    for line in exact_rows:  # exact solvers sit at the optimum: last column is cost / optimum - 1
        assert abs(float(line.strip("| ").split("|")[-1])) < 1e-6


def test_likelihood_benchmark_runs():
    report = likelihood.main(["--dims", "2", "--dim", "3", "--steps", "2", "--repeats", "1"])
    assert "fmjax exact" in report and "not installed" in report


def test_sampling_benchmark_runs(monkeypatch):
    monkeypatch.delenv("FMJAX_PEER_PYTHON", raising=False)
    report = sampling.main(["--points", "32", "--width", "8", "--train-steps", "5", "--repeats", "1"])
    row = next(line for line in report.splitlines() if line.startswith("| fmjax dopri5 |"))
    nfe = int(row.split("|")[2])
    assert nfe >= 7 and (nfe - 1) % 6 == 0  # dopri5: 6 evaluations a step (FSAL) plus the first
    assert "not installed" in report


def test_suite_writes_every_section(tmp_path, monkeypatch):
    monkeypatch.delenv("FMJAX_PEER_PYTHON", raising=False)
    out = tmp_path / "suite.md"
    suite.main(["--quick", "--out", str(out)])
    text = out.read_text()
    for section in ("## train step", "## couplings", "## sampling", "## likelihood", "FLOP rate"):
        assert section in text
    assert text.count("not installed") == 3  # TorchCFM, torchdyn, flow_matching


def test_suite_rejects_unknown_section(tmp_path):
    with pytest.raises(SystemExit) as error:
        suite.main(["--quick", "--only", "train step,warp drive", "--out", str(tmp_path / "x.md")])
    assert error.value.code == 2

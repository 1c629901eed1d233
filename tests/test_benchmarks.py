"""The benchmark scripts run end to end on tiny settings (their timings are not checked here)."""

import pytest

from benchmarks import __main__ as suite
from benchmarks import device


def _quick_section(name: str, monkeypatch) -> str:
    """One section's benchmark, run as the quick suite runs it (its QUICK arguments), without peers."""
    monkeypatch.delenv("FMJAX_PEER_PYTHON", raising=False)
    module, args = suite.QUICK[name]
    return module.main(args)


def test_train_step_benchmark_runs(monkeypatch):
    report = _quick_section("train step", monkeypatch)
    for name in ("plain I-CFM", "fmjax I-CFM", "fmjax OT-CFM (exact)"):
        assert f"| {name} |" in report
    assert "FLOP rate" in report and "not installed" in report


def test_coupling_benchmark_runs(monkeypatch):
    report = _quick_section("couplings", monkeypatch)
    assert "| 32 | fmjax exact |" in report and "| 32 | ott Hungarian |" in report
    exact_rows = [line for line in report.splitlines() if "exact" in line or "Hungarian" in line]
    for line in exact_rows:  # exact solvers sit at the optimum: last column is cost / optimum - 1
        assert abs(float(line.strip("| ").split("|")[-1])) < 1e-6


def test_likelihood_benchmark_runs(monkeypatch):
    report = _quick_section("likelihood", monkeypatch)
    assert "fmjax exact" in report and "not installed" in report


def test_sampling_benchmark_runs(monkeypatch):
    report = _quick_section("sampling", monkeypatch)
    row = next(line for line in report.splitlines() if line.startswith("| fmjax dopri5 |"))
    nfe = int(row.split("|")[2])
    assert nfe >= 7 and (nfe - 1) % 6 == 0  # dopri5: 6 evaluations a step (FSAL) plus the first
    assert "not installed" in report


# The whole quick suite is the four sections above, run again and written as one report: 25-30 s on a
# 2-core CPU, so it runs with `pytest -m slow tests/test_benchmarks.py`.
@pytest.mark.slow
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


def _positive(cell: str) -> float:
    value = float(cell.strip().rstrip("%"))
    assert value > 0, cell
    return value


@pytest.mark.slow  # 35 s of the device benchmark on this CPU (CI time); run with -m slow
def test_device_check_writes_every_row(tmp_path):
    out = tmp_path / "device.md"
    report = device.main(
        ["--quick", "--batches", "16", "--couplings", "independent,exact", "--mlp-width", "8"]
        + ["--unet-width", "8", "--image-dataset", "digits", "--points", "64", "--ll-images", "1"]
        + ["--cell-s", "0.2", "--matmul", "64", "--mlp-train-steps", "100", "--unet-train-steps", "20"]
        + ["--out", str(out)]
    )
    assert out.read_text() == report
    assert "tiny setting on a CPU" in report and "Status: complete" in report
    lines = [line for line in report.splitlines() if line.startswith("| ")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    peak = [r for r in rows if r[0] == "[64, 64] x [64, 64]"]
    assert [r[1] for r in peak] == ["float32, HIGHEST", "float32, DEFAULT", "bfloat16, DEFAULT"]
    for r in peak:
        _positive(r[2]), _positive(r[3])
    train = {(r[0], r[2]): r[3:] for r in rows if r[0] in ("MLP 2D", "UNet 8x8x1")}
    trainings = ("I-CFM", "OT-CFM (exact, pipelined)")
    assert set(train) == {(model, training) for model in ("MLP 2D", "UNet 8x8x1") for training in trainings}
    for cells in train.values():
        steps_per_s, samples_per_s = _positive(cells[0]), _positive(cells[1])
        assert samples_per_s == pytest.approx(16 * steps_per_s, rel=2e-3)  # 4 significant digits each
        for cell in cells[2:]:  # GFLOP/step, TFLOP/s, fractions, steps measured, per dispatch, first chunk
            _positive(cell)
    solves = [r for r in rows if r[0].startswith(("dopri5", "exact"))]
    # the models of the kept I-CFM runs, trained to the end
    mlp, unet = "MLP 3x8, 100 steps", "UNet 8x8x1 width 8, 20 steps"
    assert [(r[0], r[1]) for r in solves] == [
        ("dopri5 sample", mlp),
        ("exact log-likelihood", mlp),
        ("dopri5 sample", unet),
        ("exact divergence, one evaluation", unet),
        ("exact log-likelihood", unet),
    ]
    for r in solves:
        assert int(r[3]) >= 1  # NFE
        _positive(r[4]), _positive(r[5]), _positive(r[6])

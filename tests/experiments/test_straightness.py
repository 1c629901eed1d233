"""experiments/straightness.py, --quick setting end to end: table rows, finite values, compute, resume."""

import json
import math

import numpy as np
import pytest

from experiments import straightness

TASK = "8gaussians -> moons"
METHODS = ["I-CFM", "OT-CFM", "I-CFM + 1 reflow", "OT-CFM + 1 reflow"]


def _row(table: str, method: str) -> list[str]:
    rows = [line for line in table.splitlines() if line.startswith(f"| {method} |")]
    assert len(rows) == 1, (method, rows)
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


@pytest.mark.slow  # the experiment script end to end; straightness itself: tests/test_metrics_straightness.py
def test_quick_setting_writes_the_table_figure_and_resumes(tmp_path):
    args = ["--quick", "--tasks", TASK, "--out", str(tmp_path), "--work", str(tmp_path / "work")]
    records = straightness.main(args)
    assert sorted(r["method"] for r in records) == sorted(METHODS)
    by = {r["method"]: r for r in records}
    numbers = [k for k, v in by["I-CFM"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for r in records:
        assert all(math.isfinite(r[k]) and r[k] >= 0 for k in numbers), r
        assert r["nfe_dopri5"] >= 6
    # one reflow costs the teacher's steps, its own steps and the pair solves
    for base in ("I-CFM", "OT-CFM"):
        teacher, student = by[base], by[f"{base} + 1 reflow"]
        assert student["total_train_steps"] == teacher["train_steps"] + student["train_steps"] == 200
        assert student["pairs_nfe"] >= 6 and student["pairs_seconds"] > 0
        expected = teacher["total_seconds"] + student["train_seconds"] + student["pairs_seconds"]
        assert student["total_seconds"] == pytest.approx(expected, abs=1e-5)
    # minibatch OT pairs within a batch never cross (quadratic cost), pooled batches rarely; independent
    # pairs of two separated clouds do (0.25 seen); a flow's own pairs rarely (0.02 seen)
    assert by["OT-CFM"]["crossing_training_pairs"] < by["I-CFM"]["crossing_training_pairs"] / 3
    assert by["I-CFM + 1 reflow"]["crossing_training_pairs"] < by["I-CFM"]["crossing_training_pairs"] / 3

    table = (tmp_path / "straightness.md").read_text()
    section = table.split(f"## {TASK}\n")[1].split("\n## ")[0]
    for method in METHODS:
        row = _row(section, method)
        assert row[1] == "1"  # seeds
        values = [float(cell) for cell in row[2:9]]  # W2 at 1, 2, 4, 8 Euler steps, dopri5; NFE; S
        assert np.isfinite(values).all()
        assert values[0] == pytest.approx(by[method]["distance_euler_1"], abs=5e-4)
    assert "| I-CFM + 2 reflows |" not in table
    assert 'Not run in this setting (`--tasks "N -> moons"`)' in table
    assert "OT-CFM + 1 reflow minus OT-CFM:" in table
    assert (tmp_path / "straightness.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "straightness.json").read_text())
    assert len(saved["records"]) == 4 and saved["settings"][TASK]["steps"] == 100

    again = straightness.main(args)  # every model is recorded: nothing is trained or evaluated again
    assert again == records


def test_frechet_distance_closed_forms():
    # same sample covariance C: a shift m gives ||m||^2; doubling gives ||mu||^2 + tr(5C - 2 (4 C^2)^(1/2))
    x = np.random.default_rng(0).normal(size=(500, 6)) @ np.diag([0.5, 1.0, 1.5, 2.0, 0.1, 3.0])
    shift = np.arange(6.0) / 4
    assert straightness.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert straightness.frechet_distance(x, x + shift) == pytest.approx(np.sum(shift**2), rel=1e-9)
    doubled = np.sum(x.mean(0) ** 2) + np.trace(np.cov(x, rowvar=False))
    assert straightness.frechet_distance(x, 2 * x) == pytest.approx(doubled, rel=1e-7)


def test_unknown_task_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        straightness.main(["--quick", "--tasks", "moons -> digits", "--out", str(tmp_path)])
    assert error.value.code == 2
    assert "--tasks: unknown ['moons -> digits']" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_digits_setting_reports_frechet_distances(tmp_path):
    # the UNet path: its compiles take about a minute on a 2-core CPU, hence slow
    args = ["--quick", "--tasks", "digits", "--out", str(tmp_path), "--work", str(tmp_path / "work")]
    records = straightness.main(args)
    assert sorted(r["method"] for r in records) == sorted(METHODS)
    for r in records:
        assert r["metric"] == "FD (pixels)" and "crossing_training_pairs" not in r
        distances = [r[f"distance_euler_{n}"] for n in (1, 2, 4, 8)] + [r["distance_dopri5"]]
        assert np.isfinite(distances).all() and min(distances) > 0, r
    table = (tmp_path / "straightness.md").read_text()
    section = table.split("## digits\n")[1]
    assert "FD between the 360 real test digits and the 1437 training digits" in section
    for method in METHODS:
        assert _row(section, method)[1] == "1"
    assert (tmp_path / "straightness_digits.png").stat().st_size > 5_000

"""experiments/earth.py: the Earth protocol end to end on a short budget (the full run is the experiment)."""

import json

import pytest

from experiments import earth


@pytest.mark.slow
def test_earth_smoke_writes_the_table_and_json_and_resumes(tmp_path, capsys):
    argv = [
        "--datasets",
        "volcano",
        "--seeds",
        "2",
        "--steps",
        "200",
        "--eval-every",
        "100",
        "--out",
        str(tmp_path),
    ]
    earth.main(argv)
    result = json.loads((tmp_path / "earth.json").read_text())
    row = result["volcano"]  # the first coupling's (exact) row, in the layout
    assert len(row["test_nll"]) == 2 and row["mean"] == pytest.approx(sum(row["test_nll"]) / 2)
    assert set(result["by_coupling"]) == {"exact", "independent"}
    assert all(step in (100, 200) for step in row["best_step"])
    table = (tmp_path / "earth.md").read_text()
    assert "Riemannian flow matching, geodesic (Chen & Lipman 2024) (published) | -7.93 +- 1.67" in table
    assert "fmjax, OT pairs (exact, geodesic cost)" in table and "## Against the goal" in table
    # a second call finds every run in earth_runs.jsonl and trains nothing
    capsys.readouterr()
    earth.main(argv)
    assert "test NLL" not in capsys.readouterr().out
    assert len((tmp_path / "earth_runs.jsonl").read_text().splitlines()) == 4


def test_the_summary_is_the_mean_and_spread_over_seeds():
    records = [
        {"dataset": "volcano", "seed": s, "coupling": "exact", "test_nll": v, "best_step": 10, "wall_s": 1.0}
        for s, v in enumerate([0.5, 1.5])
    ]
    summary = earth.summarise(records, ["exact"])
    assert summary["exact"]["volcano"]["mean"] == pytest.approx(1.0)
    assert summary["exact"]["volcano"]["std"] == pytest.approx(0.7071, abs=1e-4)

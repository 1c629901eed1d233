"""experiments/nfe_digits.py: the tables, gaps and verdict from a record of known values, the quality
measures, and the --quick setting end to end."""

import json

import numpy as np
import pytest

from experiments import nfe_digits
from experiments.classifier import dequantise, load_digits, train_classifier

NFE = (1, 2, 4, 8)
SEEDS = (0, 1, 2)


def make_record(final: dict, *, dopri5_nfe=(50, 60, 70)) -> dict:
    """A record with the given after-training values: ``final[method][metric]`` [seeds, NFE + dopri5]."""
    runs = []
    for method in nfe_digits.METHODS:
        for s, seed in enumerate(SEEDS):
            values = {m: np.asarray(final[method][m], float)[s] for m in nfe_digits.METRICS}
            rows = [
                {"solver": "euler", "nfe": n, "seconds": 0.1, **{m: float(v[k]) for m, v in values.items()}}
                for k, n in enumerate(NFE)
            ]
            rows.append({"solver": "dopri5", "nfe": dopri5_nfe[s], "seconds": 1.0,
                         **{m: float(v[-1]) for m, v in values.items()}})  # fmt: skip
            along = [
                {"step": step, "loss": 1.0 / step, "nfe": 40 + s, "seconds": 1.0,
                 **{m: float(v[-1]) * (1 + 1 / step) for m, v in values.items()}}
                for step in (10, 20)
            ]  # fmt: skip
            runs.append({"method": method, "seed": seed, "along": along, "final": rows,
                         "losses": [(10, 0.1), (20, 0.05)], "train_seconds": 2.0})  # fmt: skip
    settings = {**nfe_digits.FULL, "seeds": list(SEEDS), "euler_steps": list(NFE), "checkpoints": [10, 20]}
    return {
        "settings": settings,
        "classifier_test_accuracy": 0.99,
        "classifier_seconds": 1.0,
        "floor": {"fd": 5.0, "w2": 3.0},
        "coupled_cost": {"I-CFM": 2.0, "OT-CFM": 1.5},
        "runs": runs,
        "total_seconds": 10.0,
    }


# I-CFM: 10 at every NFE; OT-CFM better by 20% at NFE 1, 2, 4 in every seed, equal at 8 and dopri5
ICFM = [[9.0] * 5, [10.0] * 5, [11.0] * 5]
OTCFM = [[7.2, 7.2, 7.2, 9.0, 9.0], [8.0, 8.0, 8.0, 10.0, 10.0], [8.8, 8.8, 8.8, 11.0, 11.0]]


def test_curves_and_gaps_from_known_values():
    record = make_record({"I-CFM": {"fd": ICFM, "w2": ICFM}, "OT-CFM": {"fd": OTCFM, "w2": ICFM}})
    data = nfe_digits.curves(record)
    assert data["I-CFM"]["nfe"] == list(NFE) and data["I-CFM"]["steps"] == [10, 20]
    np.testing.assert_array_equal(data["OT-CFM"]["final_fd"], OTCFM)
    np.testing.assert_array_equal(data["OT-CFM"]["dopri5_nfe"], [50, 60, 70])
    gaps = nfe_digits.comparison(record)
    assert gaps["columns"] == ["euler 1", "euler 2", "euler 4", "euler 8", "dopri5"]
    np.testing.assert_allclose(gaps["fd"]["relative_gap"], [0.2, 0.2, 0.2, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(gaps["fd"]["paired"][0], [1.8, 1.8, 1.8, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(gaps["w2"]["relative_gap"], 0.0, atol=1e-12)


def test_verdict_counts_only_nfe_where_every_seed_agrees():
    worse = [row[:] for row in OTCFM]
    worse[2][1] = 11.5  # seed 2 at 2 NFE: OT-CFM worse, although the mean is still lower
    record = make_record({"I-CFM": {"fd": ICFM, "w2": ICFM}, "OT-CFM": {"fd": worse, "w2": ICFM}})
    lines = nfe_digits.verdict(record)
    assert len(lines) == 10
    assert "paired seeds at euler 1, euler 4 (of euler 1, euler 2, euler 4)" in lines[0]
    assert "euler 1 +20%, euler 2 +11%, euler 4 +20%" in lines[0]
    # many NFE: dopri5 only (no Euler count >= 32 here), the per-seed differences listed
    assert lines[1].endswith("dopri5 +0% (seeds +0 / +0 / +0).")
    assert lines[2].startswith(
        '- Verdict (classifier FD): "better for minibatch OT when few NFE" holds in part; '
        '"small difference" at dopri5 holds'
    )
    assert "at none of them" in lines[3]
    assert '"better for minibatch OT when few NFE" does not hold' in lines[5]
    # along training: FD = dopri5 * (1 + 1/step), the same for both methods here: lower in no seed
    assert lines[6].endswith("step 10 11 vs 11 (0 of 3), step 20 10.5 vs 10.5 (0 of 3).")
    assert lines[8] == "- I-CFM: the mean classifier FD is lowest at euler 1, the mean pixel W2 at euler 1."
    # a clear gap at dopri5, the same sign in every seed: not a small difference
    far = [row[:4] + [row[4] * 0.5] for row in OTCFM]
    record = make_record({"I-CFM": {"fd": ICFM, "w2": ICFM}, "OT-CFM": {"fd": far, "w2": ICFM}})
    assert '"small difference" at dopri5 does not hold' in nfe_digits.verdict(record)[2]


def test_report_tables(tmp_path):
    record = make_record({"I-CFM": {"fd": ICFM, "w2": ICFM}, "OT-CFM": {"fd": OTCFM, "w2": ICFM}})
    text = nfe_digits.report(record, "python -m experiments.nfe_digits --seeds 0,1,2")
    assert "Command: `python -m experiments.nfe_digits --seeds 0,1,2`" in text
    assert "| I-CFM | classifier FD | 10.00 (9.00-11.00) | 10.00 (9.00-11.00) |" in text
    assert "| OT-CFM | classifier FD | 8.00 (7.20-8.80) | 8.00 (7.20-8.80) | 8.00 (7.20-8.80) | 10.00" in text
    assert "| OT-CFM | NFE | 1 | 2 | 4 | 8 | 60 (50-70) |" in text
    assert "| real train digits (floor) | classifier FD | 5.00 |" in text
    assert "| classifier FD | +20.0% | +20.0% | +20.0% | +0.0% | +0.0% |" in text
    # along training: step 20's FD is final * (1 + 1/20), mean over seeds
    assert "| I-CFM | 20 | 0.0500 | 41 (40-42) | 10.50 (9.45-11.55) |" in text
    assert "2.000 independent, 1.500 exact (25% lower)" in text
    nfe_digits.figure(str(tmp_path / "f.png"), record, title="known values")
    assert (tmp_path / "f.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def classifier():
    return train_classifier(seed=0, epochs=nfe_digits.QUICK["classifier_epochs"])


def test_quality_measures(classifier):
    levels, _ = load_digits("test")
    real = np.asarray(dequantise(levels[:64], 0.5))
    same = nfe_digits.quality(classifier, real, real)
    assert same["w2"] == 0.0 and same["fd"] == pytest.approx(0.0, abs=1e-6)
    # samples are clipped to [-1, 1] before they are measured
    assert nfe_digits.quality(classifier, 3 * real, real) == nfe_digits.quality(
        classifier, np.clip(3 * real, -1.0, 1.0), real
    )
    # W2 of a shift by c in every pixel of 64 is 8 c (the identity plan is optimal for a translation)
    shifted = nfe_digits.quality(classifier, real * 0.5 + 0.1, real * 0.5)
    assert shifted["w2"] == pytest.approx(8 * 0.1, rel=1e-6)


# about 50 s of CPU (two UNet steps and four solvers compiled, four short runs), 160 s wall on the
# shared 2-core machine: over the default suite's budget
@pytest.mark.slow
def test_quick_setting_end_to_end(tmp_path, classifier, monkeypatch):
    # the quick run trains the same classifier (seed 0, same epochs): reuse the fixture's
    monkeypatch.setattr(nfe_digits, "train_classifier", lambda **kwargs: classifier)
    record = nfe_digits.main(["--quick", "--out", str(tmp_path)])
    quick = nfe_digits.QUICK
    assert len(record["runs"]) == 2 * len(quick["seeds"])
    for run in record["runs"]:
        assert [row["step"] for row in run["along"]] == list(quick["checkpoints"])
        assert [row["nfe"] for row in run["final"][:-1]] == list(quick["euler_steps"])
        assert run["final"][-1]["solver"] == "dopri5" and run["final"][-1]["nfe"] >= 12
        assert all(np.isfinite([row["fd"], row["w2"]]).all() for row in run["along"] + run["final"])
    # the exact coupling pairs noise and digits at a lower cost than the independent one (measured
    # 1.64 vs 1.43 per pixel at batch 32)
    assert record["coupled_cost"]["OT-CFM"] < 0.95 * record["coupled_cost"]["I-CFM"]
    # and its conditional targets vary less: with the same batches, times and initial weights, OT-CFM's
    # loss is lower than I-CFM's in every seed (measured 0.77 vs 0.98 at step 40)
    loss = {(r["method"], r["seed"]): r["losses"][-1][1] for r in record["runs"]}
    for seed in quick["seeds"]:
        assert loss["OT-CFM", seed] < 0.9 * loss["I-CFM", seed]
    text = (tmp_path / "nfe_digits.md").read_text()
    assert "`python -m experiments.nfe_digits --quick --out " in text
    assert "## The seeds' conclusion here" in text and text.count("| I-CFM | ") == 2 + 3
    saved = json.loads((tmp_path / "nfe_digits.json").read_text())
    assert saved["settings"]["steps"] == quick["steps"] and len(saved["comparison"]["columns"]) == 4
    assert (tmp_path / "nfe_digits.png").stat().st_size > 10_000
    # --rewrite renders the same report again from the JSON, without training
    (tmp_path / "nfe_digits.md").unlink()
    nfe_digits.main(["--out", str(tmp_path), "--rewrite"])
    assert (tmp_path / "nfe_digits.md").read_text() == text

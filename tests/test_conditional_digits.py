"""experiments/classifier.py and experiments/conditional_digits.py: the digits classifier's accuracy,
input spaces and features; the --quick setting of the guidance experiment end to end."""

import json

import numpy as np
import pytest

from experiments import conditional_digits
from experiments.classifier import (
    classifier_frechet_distance,
    dequantise,
    load_digits,
    to_levels_space,
    train_classifier,
)


@pytest.fixture(scope="module")
def classifier():
    return train_classifier(seed=0)


@pytest.fixture(scope="module")
def test_digits():
    levels, labels = load_digits("test")
    u = np.random.default_rng(0).uniform(size=levels.shape)
    return levels, labels, u


def test_classifier_is_accurate_in_both_spaces(classifier, test_digits):
    levels, labels, u = test_digits
    # seeds 0, 1, 2 score 0.992, 0.992, 0.986 on the 360 test digits at the middle of their cells
    assert classifier.test_accuracy > 0.97
    assert np.mean(classifier.predict(dequantise(levels, 0.5)) == labels) == classifier.test_accuracy
    # anywhere in the cells (it trained on fresh dequantisation draws), as [n, 64] too
    in_cells = np.asarray(dequantise(levels, u))
    assert np.mean(classifier.predict(in_cells.reshape(-1, 64)) == labels) > 0.97
    # the same digits in the 0..255 space of `fmjax train --dataset digits`
    stored = np.round(levels.astype(np.float64) * 255.0 / 16.0)
    as_bytes = 2.0 * (stored + u) / 256.0 - 1.0
    assert np.mean(classifier.predict(as_bytes, space="bytes") == labels) > 0.97
    logits, features = classifier.logits(in_cells), classifier.features(in_cells)
    assert logits.shape == (len(labels), 10) and features.shape == (len(labels), 64)
    assert np.isfinite(np.asarray(logits)).all()


def test_bytes_space_maps_cell_middles_to_cell_middles():
    levels = np.arange(17, dtype=np.uint8).reshape(17, 1, 1, 1) * np.ones((1, 8, 8, 1), np.uint8)
    stored = np.round(levels.astype(np.float64) * 255.0 / 16.0)
    mapped = np.asarray(to_levels_space(2.0 * (stored + 0.5) / 256.0 - 1.0, space="bytes"))
    # exact up to the rounding of 255 k / 16 to a byte (at most 1/2 byte = 1/30 level)
    np.testing.assert_allclose(mapped, np.asarray(dequantise(levels, 0.5)), atol=2.0 / 17 / 30 + 1e-6)
    # outside [-1, 1] is clipped to the extreme grey levels
    assert float(to_levels_space(np.full((1, 64), 1.7)).max()) == 1.0


def test_classifier_frechet_distance(classifier, test_digits):
    levels, labels, u = test_digits
    real = np.asarray(dequantise(levels, u))
    assert classifier_frechet_distance(classifier, real, real) == pytest.approx(0.0, abs=1e-6)
    train_levels, _ = load_digits("train")
    train = np.asarray(dequantise(train_levels, 0.5))
    noise = np.random.default_rng(1).uniform(-1.0, 1.0, size=(360, 64))
    # real training digits are far closer to the test digits than uniform noise is
    assert 20 * classifier_frechet_distance(classifier, train, real) < classifier_frechet_distance(
        classifier, noise, real
    )


@pytest.mark.parametrize(
    ("images", "space", "match"),
    [
        (np.zeros((3, 8, 7)), "levels", "images must have shape"),
        (np.zeros(64), "levels", "images must have shape"),
        (np.full((2, 64), np.nan), "levels", "images must be finite"),
        (np.zeros((2, 64)), "pixels", "space must be one of"),
    ],
)
def test_bad_images_are_named(images, space, match):
    with pytest.raises(ValueError, match=match):
        to_levels_space(images, space=space)


def test_quick_setting_end_to_end(tmp_path, classifier, monkeypatch):
    # the quick run trains its own classifier with the same seed: reuse the fixture's (same weights)
    monkeypatch.setattr(conditional_digits, "train_classifier", lambda **kwargs: classifier)
    record = conditional_digits.main(["--quick", "--out", str(tmp_path)])
    scales = conditional_digits.QUICK["scales"]
    rows = {row["scale"]: row for row in record["rows"]}
    assert sorted(rows) == sorted(scales) and len(record["rows"]) == len(scales)  # Euler only
    for row in rows.values():
        assert row["nfe"] == conditional_digits.QUICK["euler_steps"]
        assert len(row["accuracy_per_class"]) == 10 and np.isfinite(row["fd_per_class"]).all()
        # a 300-step model is far from real digits: the floor of real training digits is well below
        assert row["fd"] > 2 * record["floor"]["fd"]
    accuracy = {w: rows[w]["accuracy"] for w in scales}
    # seeds 0, 1, 2 (200 samples each): w = 0: 0.110, 0.080, 0.095 (the class asked is ignored: chance
    # 0.1); w = 1: 0.425, 0.380, 0.465; w = 2: 0.710, 0.650, 0.700; w = 3: 0.795, 0.795, 0.835
    assert accuracy[0.0] < 0.2
    assert accuracy[1.0] > 0.25
    assert accuracy[2.0] > accuracy[1.0] + 0.1 and accuracy[3.0] > accuracy[1.0] + 0.2
    assert record["floor"]["accuracy"] > 0.97  # the classifier on real training digits

    text = (tmp_path / "conditional_digits.md").read_text()
    assert f"test accuracy **{classifier.test_accuracy:.4f}**" in text
    assert "`python -m experiments.conditional_digits --quick --out " in text
    table = text.split("## Results")[1].split("\n\n")[1]
    for w in scales:
        (row,) = [r for r in table.splitlines() if r.startswith(f"| {w:g} |")]
        assert float(row.split("|")[4]) == pytest.approx(accuracy[w], abs=5e-4)
    per_class = text.split("Accuracy per class:")[1].split("\n\n")[1].splitlines()
    assert per_class[0] == "| w | solver | " + " | ".join(str(k) for k in range(10)) + " |"
    assert len(per_class) == 2 + len(scales)
    saved = json.loads((tmp_path / "conditional_digits.json").read_text())
    assert saved["settings"]["steps"] == 300 and len(saved["rows"]) == len(scales)
    assert saved["rows"][1]["accuracy"] == pytest.approx(accuracy[1.0])
    assert (tmp_path / "conditional_digits.png").stat().st_size > 10_000

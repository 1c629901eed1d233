"""fmjax.digits_classifier and its digits_frechet_distance (the digits classifier's accuracy,
input spaces and features; the FID recipe with it), experiments.classifier's re-export, and the --quick
setting of experiments/conditional_digits.py end to end."""

import json
import subprocess
import sys

import numpy as np
import pytest

import fmjax.digits_classifier as library
from experiments import classifier as experiments_classifier
from experiments import conditional_digits
from fmjax.digits_classifier import (
    Classifier,
    classifier_frechet_distance,
    dequantise,
    digits_frechet_distance,
    load_digits,
    to_levels_space,
    train_classifier,
)
from fmjax.digits_classifier import trained_classifier as digits_classifier


@pytest.fixture(scope="module")
def classifier():
    return digits_classifier(0)


@pytest.fixture(scope="module")
def test_digits():
    levels, labels = load_digits("test")
    u = np.random.default_rng(0).uniform(size=levels.shape)
    return levels, labels, u


def as_bytes(levels, u):
    """Grey levels 0..16 in the 0..255 space of `fmjax train --dataset digits`: z = 2 (x + u) / 256 - 1."""
    return 2.0 * (np.round(levels.astype(np.float64) * 255.0 / 16.0) + u) / 256.0 - 1.0


def test_classifier_is_cached_seeded_and_accurate_in_both_spaces(classifier, test_digits):
    levels, labels, u = test_digits
    assert isinstance(classifier, Classifier) and classifier.seed == 0
    assert digits_classifier(0) is classifier  # trained once per process
    # seeds 0, 1, 2 score 0.992, 0.992, 0.986 on the 360 test digits at the middle of their cells
    assert classifier.test_accuracy > 0.95
    assert np.mean(classifier.predict(dequantise(levels, 0.5)) == labels) == classifier.test_accuracy
    # anywhere in the cells (it trained on fresh dequantisation draws), as [n, 64] too
    in_cells = np.asarray(dequantise(levels, u))
    assert np.mean(classifier.predict(in_cells.reshape(-1, 64)) == labels) > 0.95
    assert np.mean(classifier.predict(as_bytes(levels, u), space="bytes") == labels) > 0.95
    logits, features = classifier.logits(in_cells), classifier.features(in_cells)
    assert logits.shape == (len(labels), 10) and features.shape == (len(labels), 64)
    assert np.isfinite(np.asarray(logits)).all()


def test_experiments_classifier_is_the_library_module():
    for name in experiments_classifier.__all__:
        assert getattr(experiments_classifier, name) is getattr(library, name), name
    assert conditional_digits.train_classifier is library.train_classifier


def test_importing_metrics_trains_nothing_and_loads_no_flax():
    code = (
        "import sys, fmjax.metrics; "
        "print(sorted(m for m in ('flax', 'optax', 'fmjax.digits_classifier') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bytes_space_maps_cell_middles_to_cell_middles():
    levels = np.arange(17, dtype=np.uint8).reshape(17, 1, 1, 1) * np.ones((1, 8, 8, 1), np.uint8)
    mapped = np.asarray(to_levels_space(as_bytes(levels, 0.5), space="bytes"))
    # exact up to the rounding of 255 k / 16 to a byte (at most 1/2 byte = 1/30 level)
    np.testing.assert_allclose(mapped, np.asarray(dequantise(levels, 0.5)), atol=2.0 / 17 / 30 + 1e-6)
    # outside [-1, 1] is clipped to the extreme grey levels
    assert float(to_levels_space(np.full((1, 64), 1.7)).max()) == 1.0


def test_digits_frechet_distance_real_digits_near_noise_far(classifier, test_digits):
    levels, _, u = test_digits
    real = np.asarray(dequantise(levels, u))
    # the default reference is the test split dequantised with u drawn from default_rng(seed): this draw
    assert digits_frechet_distance(real, space="levels") == pytest.approx(0.0, abs=1e-6)
    assert classifier_frechet_distance(classifier, real, real) == pytest.approx(0.0, abs=1e-6)
    train_levels, _ = load_digits("train")
    train_u = np.random.default_rng(5).uniform(size=train_levels.shape)
    noise = np.random.default_rng(1).uniform(-1.0, 1.0, size=(360, 64))
    # measured (seed 0): train digits 8.57 in bytes, 8.60 in levels; noise 880 (bytes), 836 (levels)
    for space, train in (
        ("bytes", as_bytes(train_levels, train_u)),
        ("levels", np.asarray(dequantise(train_levels, train_u))),
    ):
        near, far = digits_frechet_distance(train, space=space), digits_frechet_distance(noise, space=space)
        assert near < 15.0 and far > 400.0 and 40 * near < far, (space, near, far)
    # the library function is classifier_frechet_distance with the cached classifier
    train = as_bytes(train_levels, train_u)
    assert digits_frechet_distance(train, real[:200], space="bytes") == pytest.approx(
        classifier_frechet_distance(classifier, train, real[:200], space="bytes"), rel=1e-9
    )


def test_digits_frechet_distance_space_handling(classifier, test_digits):
    levels, _, u = test_digits
    train_levels, _ = load_digits("train")
    train_u = np.random.default_rng(5).uniform(size=train_levels.shape)
    train_bytes = as_bytes(train_levels, train_u)
    # the default space is "bytes" (fmjax train --dataset digits)
    assert digits_frechet_distance(train_bytes) == digits_frechet_distance(train_bytes, space="bytes")
    # a given reference is read in the same space as the samples: the test digits in bytes score
    # what the same digits in levels score (1e-2: the byte rounding moves a pixel by 1/30 level at most)
    in_bytes = digits_frechet_distance(train_bytes, as_bytes(levels, u), space="bytes")
    in_levels = digits_frechet_distance(
        np.asarray(dequantise(train_levels, train_u)), np.asarray(dequantise(levels, u)), space="levels"
    )
    assert in_bytes == pytest.approx(in_levels, rel=0.05)
    # the default reference is in the levels space whatever `space` is: the test digits in bytes match it
    assert digits_frechet_distance(as_bytes(levels, u)) < 0.1  # measured 0.029
    # reading bytes images as levels shifts every grey level: measured 16.4 against 8.6
    assert digits_frechet_distance(train_bytes, space="levels") > 1.5 * digits_frechet_distance(train_bytes)
    # shapes [n, 8, 8, 1], [n, 8, 8] and [n, 64] are the same images
    shaped = [digits_frechet_distance(train_bytes.reshape(-1, *s)) for s in ((8, 8, 1), (8, 8), (64,))]
    assert shaped[0] == pytest.approx(shaped[1], rel=1e-9) and shaped[0] == pytest.approx(shaped[2], rel=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"space": "pixels"}, ValueError, "space must be one of"),
        ({"classifier": "cnn"}, TypeError, "classifier must be"),
        ({"reference": np.zeros((1, 64))}, ValueError, "at least 2 rows"),
    ],
)
def test_digits_frechet_distance_bad_arguments_are_named(classifier, kwargs, error, match):
    with pytest.raises(error, match=match):
        digits_frechet_distance(np.zeros((4, 64)), **{"classifier": classifier, **kwargs})


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


def test_a_seed_gives_the_same_classifier(classifier):
    # short training keeps this cheap; the same seed twice gives the same weights
    a, b = (train_classifier(seed=3, epochs=1) for _ in range(2))
    images = np.random.default_rng(2).uniform(-1.0, 1.0, size=(8, 64))
    np.testing.assert_array_equal(np.asarray(a.logits(images)), np.asarray(b.logits(images)))


@pytest.mark.slow  # about a minute: the experiment script end to end
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

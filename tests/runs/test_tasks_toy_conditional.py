"""Conditional runs: labelled toy data, fmjax train --conditional, fmjax sample --class/--guidance, and
label-aware couplings on the training loop's pipelined (host-solved) path."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.cli import main
from fmjax.data.sources import ImageSource, ToySource
from fmjax.data.toy import TOY_NUM_CLASSES, sample, sample_labeled
from fmjax.runs import RunConfig, class_points, generate, load_run, train

CENTRES = 5.0 * np.stack([np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], axis=-1)


def _nearest_centre(points):
    return np.argmin(((np.asarray(points)[:, None, :] - CENTRES[None]) ** 2).sum(-1), axis=1)


# --- labelled toy data --------------------------------------------------------------------------------


def test_labels_name_the_component_moon_and_square_of_each_point():
    key = jax.random.key(3)
    for name in TOY_NUM_CLASSES:
        points, labels = sample_labeled(name, key, 4000)
        np.testing.assert_array_equal(points, sample(name, key, 4000))  # the unlabelled draw, same key
        assert labels.dtype == jnp.int32 and set(np.unique(labels)) == set(range(TOY_NUM_CLASSES[name]))
    points, labels = sample_labeled("8gaussians", key, 4000)
    # components 5 apart with std 0.56: all but a handful of points are nearest their own centre
    assert np.mean(_nearest_centre(points) == np.asarray(labels)) > 0.99
    points, labels = (
        np.asarray(sample_labeled("checkerboard", key, 4000)[0]),
        np.asarray(sample_labeled("checkerboard", key, 4000)[1]),
    )
    column, row = np.floor(points[:, 0] / 2) + 2, np.floor(points[:, 1] / 2) + 2
    np.testing.assert_array_equal(labels, 2 * column + row // 2)  # square (column, row pair)
    assert np.all((column + row) % 2 == 0)  # dark squares only
    points, labels = (np.asarray(a) for a in sample_labeled("moons", key, 4000))
    unit = (points + 1.0) / 3.0  # undo the scaling: outer moon around (0, 0), inner around (1, 0.5)
    outer = np.abs(np.hypot(unit[:, 0], unit[:, 1]) - 1)
    inner = np.abs(np.hypot(unit[:, 0] - 1, unit[:, 1] - 0.5) - 1)
    assert np.mean((inner < outer) == (labels == 1)) > 0.85  # noise 0.2 blurs where the moons cross


def test_unlabelled_distributions_are_refused_by_name():
    with pytest.raises(ValueError, match="'scurve' has no class labels; labelled: 8gaussians"):
        sample_labeled("scurve", jax.random.key(0), 4)
    with pytest.raises(ValueError, match="conditional needs a target with class labels"):
        RunConfig(target="scurve", conditional=True)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"cond_dropout": 0.1}, "cond_dropout needs conditional=True"),
        ({"by_label": True}, "by_label needs conditional=True"),
        ({"conditional": True, "by_label": True}, "by_label needs a coupling that pairs by label"),
        ({"conditional": True, "cond_dropout": 1.5}, "cond_dropout must be"),
        ({"conditional": 1}, "conditional must be a bool"),
    ],
)
def test_bad_conditional_configurations_are_named(fields, message):
    with pytest.raises((ValueError, TypeError), match=message):
        RunConfig(**fields)


def test_old_configurations_read_back_unconditional():
    old = RunConfig().to_json()
    for name in ("conditional", "cond_dropout", "by_label"):
        del old[name]  # a config.json written before conditional runs existed
    config = RunConfig.from_json(old)
    assert config == RunConfig() and config.num_classes is None and config.null_cond() is None


def test_sources_pair_the_labels_with_x1():
    toy = ToySource(source="gaussian", target="8gaussians", batch_size=64)
    key = jax.random.key(1)
    x0, x1, labels = toy.pair_cond(key, {})
    for a, b in zip((x0, x1), toy.pair(key, {}), strict=True):
        np.testing.assert_array_equal(a, b)  # the unconditional batches, plus the labels of x1
    np.testing.assert_array_equal(labels, _nearest_centre(x1))

    records = [{"image": np.full((2, 2, 1), k, np.uint8), "label": k % 3} for k in range(12)]
    source = ImageSource(records, batch_size=4, seed=0, labels=True)
    assert source.host_spec()["label"] == ((4,), np.int32)
    host = source.host_batch(5)
    np.testing.assert_array_equal(host["label"], host["image"][:, 0, 0, 0] % 3)  # each image's own label
    _, x1, labels = source.pair_cond(jax.random.key(0), {k: jnp.asarray(v) for k, v in host.items()})
    np.testing.assert_array_equal(labels, np.floor((np.asarray(x1)[:, 0, 0, 0] + 1) * 128) % 3)
    with pytest.raises(ValueError, match="labels=True"):
        ImageSource(records, batch_size=4, seed=0).pair_cond(key, {"image": jnp.zeros((4, 2, 2, 1))})


# --- training and sampling ---------------------------------------------------------------------------

# EMA decay 0.99: with the default 0.999, 1500 steps leave the EMA mostly at the initial parameters
FAST = {"steps": 1500, "batch_size": 128, "width": 32, "log_every": 100, "checkpoint_every": 1500}
FAST["ema_decay"] = 0.99
# the evaluation's 1000 points give each of the 8 classes about 125 (their W2 to the class's target points is
# then ~0.2 at the floor; the bound checked is 1.0, a fifth of the distance between components)
FAST["eval_samples"] = 1000


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory):
    """N(0, I) -> 8gaussians conditioned on the component, trained with label dropout."""
    run_dir = tmp_path_factory.mktemp("conditional") / "run"
    config = RunConfig(
        source="gaussian", target="8gaussians", conditional=True, cond_dropout=0.2, learning_rate=3e-3, **FAST
    )
    train(config, run_dir)
    return run_dir


def test_class_k_samples_land_at_component_k(mixture_run):
    run = load_run(mixture_run)
    assert run.config.num_classes == 8 and int(run.config.null_cond()) == 8
    fractions = []
    for k in range(8):
        x1, _, w2 = generate(run, n=400, label=k, solver="euler", steps=20)
        fractions.append(np.mean(_nearest_centre(x1) == k))
        assert w2 < 1.0  # against points of component k alone (the components are 5 apart)
    assert min(fractions) >= 0.98, fractions
    # guidance 0 is the unconditional model: it spreads over every component
    x1, _, _ = generate(run, n=800, label=0, guidance=0.0, solver="euler", steps=20)
    assert np.mean(_nearest_centre(x1) == 0) < 0.5 and len(np.unique(_nearest_centre(x1))) == 8


def test_guidance_above_one_pulls_harder_toward_the_class(mixture_run):
    run = load_run(mixture_run)
    x1, _, _ = generate(run, n=800, label=3, guidance=1.0, solver="euler", steps=20)
    y1, _, _ = generate(run, n=800, label=3, guidance=3.0, solver="euler", steps=20)

    def posterior(x):  # p(component 3 | x) under the true mixture (variance sqrt(0.1) per axis)
        logits = -((x[:, None, :] - CENTRES[None]) ** 2).sum(-1) / (2 * 0.1**0.5)
        return np.exp(logits[:, 3] - np.logaddexp.reduce(logits, axis=1))

    assert np.mean(_nearest_centre(y1) == 3) >= np.mean(_nearest_centre(x1) == 3)
    # guidance raises p(y | x): fewer samples between components
    assert np.mean(posterior(y1) < 0.99) < np.mean(posterior(x1) < 0.99)


def test_summary_reports_w2_per_class(mixture_run):
    from fmjax.runs import evaluate

    run = load_run(mixture_run)
    summary = evaluate(run, mixture_run, plots=False)
    assert summary["conditional"] is True and len(summary["w2_per_class"]) == 8
    assert all(w < 1.0 for w in summary["w2_per_class"]) and summary["w2"] < 1.0


def test_class_points_are_draws_of_that_class():
    points = class_points("8gaussians", jax.random.key(0), 6, 500)
    assert points.shape == (500, 2) and np.mean(_nearest_centre(points) == 6) > 0.99


def test_by_label_pairs_within_classes_on_the_pipelined_path(tmp_path):
    """The exact coupling solved on host threads one chunk ahead pairs by label as the in-step solve does:
    both give bitwise the same parameters (the labels move with x1 through the host's pairs)."""
    config = RunConfig(
        source="gaussian", target="8gaussians", conditional=True, coupling="exact", by_label=True,
        steps=40, batch_size=64, width=16, log_every=20, checkpoint_every=40,
    )  # fmt: skip
    piped = train(config, tmp_path / "piped")
    inline = train(config, tmp_path / "inline", pipeline=False)
    for a, b in zip(jax.tree.leaves(piped.state.params), jax.tree.leaves(inline.state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    unlabelled = train(RunConfig(**{**config.to_json(), "by_label": False}), tmp_path / "free")
    leaves = zip(jax.tree.leaves(piped.state.params), jax.tree.leaves(unlabelled.state.params), strict=True)
    differ = [not np.allclose(np.asarray(a), np.asarray(b)) for a, b in leaves]
    assert any(differ)  # pairing within classes is not the free pairing


# --- the CLI -----------------------------------------------------------------------------------------


def test_cli_trains_and_samples_a_conditional_run(tmp_path, capsys):
    out = tmp_path / "moons"
    args = [
        "train", "--conditional", "--cond-dropout", "0.1", "--steps", "200", "--batch-size", "64",
        "--width", "16", "--log-every", "100", "--checkpoint-every", "200", "--eval-samples", "400",
        "--out", str(out), "--no-progress", "--no-plots",
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads((out / "config.json").read_text())["conditional"] is True
    assert f"W2 per class (0 .. 1): {summary['w2_per_class'][0]:.3f}" in printed
    assert main(["sample", str(out), "--n", "100", "--solver", "euler", "--steps", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (out / "samples-euler-100.png").is_file()
    assert lines[1].startswith("class 0: W2 = ") and lines[2].startswith("class 1: W2 = ")
    assert main(["sample", str(out), "--n", "50", "--class", "1", "--guidance", "2.5", "--solver", "euler",
                 "--steps", "4"]) == 0  # fmt: skip
    assert (out / "samples-euler-50-class-1-w2.5.png").is_file()
    assert "guidance 2.5, class 1" in capsys.readouterr().out
    assert main(["nll", str(out), "--n", "20", "--solver", "dopri5"]) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["conditional"] is True and math.isfinite(record["nll"])


def test_cli_conditional_errors_are_one_line(tmp_path, capsys):
    plain = tmp_path / "plain"
    common = [
        "--steps",
        "20",
        "--batch-size",
        "32",
        "--width",
        "8",
        "--log-every",
        "10",
        "--checkpoint-every",
        "20",
        "--eval-samples",
        "100",
        "--no-progress",
        "--no-plots",
        "--no-eval",
    ]  # fmt: skip  (no evaluation: the errors are what is checked)
    assert main(["train", "--out", str(plain), *common]) == 0
    capsys.readouterr()
    cases = [
        (["sample", str(plain), "--class", "0"], "--class and --guidance need a conditional run"),
        (["sample", str(plain), "--guidance", "2"], "--class and --guidance need a conditional run"),
        (["train", "--target", "scurve", "--conditional", *common], "--conditional needs a target"),
        (["train", "--cond-dropout", "0.1", *common], "--cond-dropout needs conditional=True"),
        (["train", "--conditional", "--by-label", *common], "--by-label needs a coupling"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    cond = tmp_path / "cond"
    assert main(["train", "--conditional", "--out", str(cond), *common]) == 0
    capsys.readouterr()
    assert main(["sample", str(cond), "--class", "2"]) == 2
    assert capsys.readouterr().err.strip() == "fmjax: error: --class must be in 0 .. 1; got 2"
    few = ["--n", "10", "--solver", "euler", "--steps", "2"]
    assert main(["sample", str(cond), *few, "--guidance", "2"]) == 0
    assert "trained without --cond-dropout" in capsys.readouterr().err  # its null class never trained

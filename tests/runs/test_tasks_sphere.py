"""Sphere runs: fmjax train --dataset volcano (an Earth dataset on S^2), fmjax nll and fmjax sample on it."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.cli import main
from fmjax.couplings import Exact
from fmjax.data import earth
from fmjax.data.pairs import load_pairs
from fmjax.manifolds import Sphere
from fmjax.paths import Geodesic
from fmjax.runs import RunConfig, load_run, prepare_reflow, train
from fmjax.runs.tasks.sphere import UNIFORM_NLL, density_grid, sphere_nll

VOLCANO = [
    "--dataset", "volcano", "--steps", "60", "--batch-size", "64", "--width", "32", "--depth", "2",
    "--log-every", "20", "--checkpoint-every", "60", "--eval-samples", "200", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def volcano_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("volcano") / "run"
    assert main(["train", "--out", str(out), *VOLCANO, "--coupling", "exact"]) == 0
    return out


def test_a_sphere_run_trains_and_reports_the_exact_test_nll(volcano_run, capsys):
    config = json.loads((volcano_run / "config.json").read_text())
    assert config["path"] == "geodesic" and config["source"] is None and config["target"] is None
    assert config["sigma"] is None and config["channel_mults"] is None and config["depth"] == 2
    summary = json.loads((volcano_run / "summary.json").read_text())
    n_test = len(earth.load("volcano", split="test", seed=0))
    assert summary["n_test"] == n_test and summary["n_val"] == len(earth.load("volcano", split="validation"))
    assert summary["uniform_nll"] == pytest.approx(math.log(4 * math.pi))
    assert math.isfinite(summary["test_nll"]) and math.isfinite(summary["val_nll"])
    for name in ("density.png", "loss.png"):
        assert (volcano_run / name).is_file()
    # the summary's figure is the library's: the mean of -log_likelihood(..., manifold=Sphere()) of the
    # test points, from the run's EMA parameters
    run = load_run(volcano_run)
    again = sphere_nll(run.config, run.apply_fn, run.state.ema_params, split="test")
    assert again["nll"] == pytest.approx(summary["test_nll"], rel=1e-6)


def test_nll_and_sample_commands_work_on_a_sphere_run(volcano_run, capsys):
    assert main(["nll", str(volcano_run), "--n", "20"]) == 0
    record = json.loads((volcano_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["n"] == 20 and record["split"] == "test" and "nats" in capsys.readouterr().out
    assert main(["sample", str(volcano_run), "--n", "64", "--solver", "euler", "--steps", "10"]) == 0
    assert (volcano_run / "samples-euler-64.png").is_file()


def test_a_sphere_run_reflows_on_the_sphere(volcano_run, tmp_path):
    # the teacher's flow solved on S^2 (pairs on the sphere), the student on the geodesic path between them
    config, initial = prepare_reflow(volcano_run, tmp_path / "reflow", pairs=128, solver="euler",
                                     solver_steps=8, overrides={"steps": 20, "batch_size": 64})  # fmt: skip
    assert config.path == "geodesic" and config.sigma is None and config.coupling == "independent"
    x0, x1, _ = load_pairs(tmp_path / "reflow" / "pairs.npz")
    np.testing.assert_allclose(np.linalg.norm(x0, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(x1, axis=-1), 1.0, atol=1e-5)
    assert int(train(config, tmp_path / "reflow", initial_state=initial).state.step) == 20


def test_the_density_grid_integrates_to_one(volcano_run):
    # the learned density is a density: its integral over the sphere (cells of area cos(lat) dlat dlon) is 1
    run = load_run(volcano_run)
    lat, lon, log_density = density_grid(run.config, run.apply_fn, run.state.ema_params)
    cell = np.radians(lat[1] - lat[0]) * np.radians(lon[1] - lon[0])
    total = np.sum(np.exp(log_density) * np.cos(np.radians(lat))[:, None]) * cell
    assert total == pytest.approx(1.0, abs=0.02)


def test_the_configuration_of_a_sphere_run():
    config = RunConfig(dataset="earthquake")
    assert config.kind == "sphere" and config.make_path() == Geodesic(manifold=Sphere())
    assert config.manifold() == Sphere() and config.source is None
    coupling = RunConfig(dataset="fire", coupling="exact").make_coupling()
    assert isinstance(coupling, Exact) and coupling.manifold == Sphere()  # squared geodesic cost
    assert RunConfig.defaults("flood")["path"] == "geodesic" and RunConfig.defaults("flood")["sigma"] is None
    assert UNIFORM_NLL == pytest.approx(-float(Sphere().base_log_prob(jnp.array([[0.0, 0.0, 1.0]]))[0]))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--source", "moons"], "--source: for 2D runs only; a sphere run (--dataset volcano) trains an MLP"),
        (["--path", "linear"], "--path must be 'geodesic' for a sphere run"),
        (["--conditional"], "--conditional needs class labels"),
        (["--channel-mults", "1,2"], "--channel-mults: for image runs only; a sphere run"),
        (["--sigma", "0.1"], "--sigma is not a parameter of --path 'geodesic'"),
    ],
)
def test_options_a_sphere_run_cannot_take_are_refused_in_one_line(flags, message, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "x"), "--dataset", "volcano", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_the_geodesic_path_is_for_sphere_runs_only(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "x"), "--path", "geodesic"]) == 2
    assert "--path 'geodesic' is for sphere runs" in capsys.readouterr().err

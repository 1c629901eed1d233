"""experiments/: closed forms behind them, and a smoke setting of each run end to end."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from experiments import digits, gaussian_sb, two_dim
from fmjax.couplings import schrodinger_bridge


# One run by default: OT-CFM from a non-Gaussian source (about 10 s, mostly compiling its step and
# solvers); FM is refused there without a run. The three-run setting (FM and OT-CFM from N(0, I) too)
# compiles three steps: `pytest -m slow tests/experiments/test_smoke.py`.
@pytest.mark.parametrize(
    ("tasks", "runs"),
    [
        (["moons -> 8gaussians"], [("OT-CFM", "moons -> 8gaussians")]),
        pytest.param(
            ["N -> moons", "moons -> 8gaussians"],
            [("FM", "N -> moons"), ("OT-CFM", "N -> moons"), ("OT-CFM", "moons -> 8gaussians")],
            marks=pytest.mark.slow,
        ),
    ],
    ids=["one-run", "three-runs"],
)
def test_two_dim_smoke_writes_table_and_resumes(tmp_path, tasks, runs):
    args = ["--steps", "60", "--seeds", "1", "--eval-samples", "300", "--out", str(tmp_path)]
    args += ["--methods", "OT-CFM,FM", "--tasks", ",".join(tasks)]
    records = two_dim.main(args)
    # FM needs a Gaussian source: no moons -> 8gaussians run
    assert sorted((r["method"], r["task"]) for r in records) == runs
    for r in records:
        assert all(math.isfinite(r[k]) and r[k] >= 0 for k in ("w2_raw", "w2_ema", "npe_raw", "npe_ema"))
        assert r["nfe_dopri5"] >= 6 and r["nfe_dopri5"] % 6 in (0, 1, 2)
    table = (tmp_path / "two_dim.md").read_text()
    for method, task in runs:
        assert f"| {method} | {task} | 1 |" in table
    assert "0.130 (0.083)" in table  # the published OT-CFM figure for N -> moons, run or not
    assert "| FM | moons -> 8gaussians | — | needs a Gaussian source" in table
    assert "| I-CFM | N -> moons | 0 | not run |" in table
    lines = (tmp_path / "two_dim_runs.jsonl").read_text().splitlines()
    assert len(lines) == len(runs)
    again = two_dim.main(args)  # every run is already logged: nothing is retrained
    assert len((tmp_path / "two_dim_runs.jsonl").read_text().splitlines()) == len(runs)
    assert [json.dumps(r) for r in again] == [json.dumps(json.loads(line)) for line in lines]


def test_two_dim_rejects_unknown_method(tmp_path):
    with pytest.raises(SystemExit) as error:
        two_dim.main(["--methods", "OT-CFM,XFM", "--out", str(tmp_path)])
    assert error.value.code == 2


def test_gaussian_bridge_marginal_closed_form():
    for dim in (1, 5):
        mean0, var0 = gaussian_sb.marginal(0.0, dim, sigma=1.0)
        mean1, var1 = gaussian_sb.marginal(1.0, dim, sigma=1.0)
        np.testing.assert_allclose(mean0, -0.1)
        np.testing.assert_allclose(mean1, 0.1)
        assert var0 == pytest.approx(1.0) and var1 == pytest.approx(1.0)
    # sigma -> 0 is the OT map between equal covariances (a translation): variance stays 1
    for t in (0.25, 0.5, 0.9):
        assert gaussian_sb.marginal(t, 3, sigma=1e-6)[1] == pytest.approx(1.0, abs=1e-9)
    # sigma = 1, t = 1/2: 1/4 + 1/4 + (sqrt 5 - 1)/4 + 1/4
    assert gaussian_sb.marginal(0.5, 2, sigma=1.0)[1] == pytest.approx(0.75 + (math.sqrt(5) - 1) / 4)


def test_gaussian_bridge_cross_covariance_matches_fmjax_coupling():
    # the entropic coupling (epsilon = 2 sigma^2) of two large Gaussian samples has Cov(x0, x1) ~ c I
    n, dim, sigma = 2000, 2, 1.0
    k0, k1, kc = jax.random.split(jax.random.PRNGKey(0), 3)
    x0 = -0.1 + jax.random.normal(k0, (n, dim))
    x1 = 0.1 + jax.random.normal(k1, (n, dim))
    i, j = schrodinger_bridge(sigma).pairs(kc, x0, x1)
    a, b = np.asarray(x0[i], np.float64), np.asarray(x1[j], np.float64)
    cross = np.mean(np.sum((a - a.mean(0)) * (b - b.mean(0)), axis=1)) / dim
    # sampling error of the covariance estimate ~ 1 / sqrt(n dim) ~ 0.016; 4 of those
    assert cross == pytest.approx(gaussian_sb.cross_covariance(sigma), abs=0.065)
    assert gaussian_sb.cross_covariance(sigma) == pytest.approx((math.sqrt(5) - 1) / 2)


def test_gaussian_kl_closed_form_and_fit_bias():
    rng = np.random.default_rng(0)
    dim, n = 4, 200_000
    points = 0.3 + 1.5 * rng.normal(size=(n, dim))
    # KL(N(0.3, 2.25 I) || N(0, I)) = 0.5 (d 2.25 + d 0.09 - d - d log 2.25)
    expected = 0.5 * dim * (2.25 + 0.09 - 1 - math.log(2.25))
    assert gaussian_sb.gaussian_kl_to_isotropic(points, np.zeros(dim), 1.0) == pytest.approx(
        expected, rel=2e-2
    )
    exact = rng.normal(size=(5000, 10))
    kl = gaussian_sb.gaussian_kl_to_isotropic(exact, np.zeros(10), 1.0)
    assert 0 < kl < 5 * 10 * 13 / (4 * 5000)  # the fit bias d (d + 3) / (4 n), with room for noise


def test_gaussian_sb_smoke(tmp_path):
    # the SB-CFM training of tests/experiments/test_gaussian_sb.py's flow-head test (d = 2, 20 steps,
    # width 16, batch 256): the session's compilation cache holds one program for both
    rows = gaussian_sb.main(
        ["--methods", "sbcfm", "--dims", "2", "--steps", "20", "--width", "16", "--eval-samples", "300"]
        + ["--out", str(tmp_path)]
    )
    assert rows[0]["dim"] == 2 and math.isfinite(rows[0]["kl_t1"]) and rows[0]["kl_t1"] >= 0
    assert "\n| 2 | " in (tmp_path / "gaussian_sb.md").read_text()


def test_digits_gaussian_floor_matches_scipy():
    rng = np.random.default_rng(1)
    train = rng.integers(0, digits.LEVELS, size=(500, 64)).astype(np.float64)
    test = rng.integers(0, digits.LEVELS, size=(7, 64)).astype(np.float64)
    bpd = digits.gaussian_floor_bits_per_dim(train, test, seed=3)
    # recompute with scipy from the same dequantisation draws
    draws = np.random.default_rng(3)
    z_train = digits.SCALE * (train + draws.uniform(size=train.shape)) + digits.SHIFT
    z_test = digits.SCALE * (test + draws.uniform(size=test.shape)) + digits.SHIFT
    log_p = stats.multivariate_normal(z_train.mean(0), np.cov(z_train, rowvar=False)).logpdf(z_test)
    expected = -(log_p + 64 * math.log(digits.SCALE)) / (64 * math.log(2))
    np.testing.assert_allclose(bpd, expected, rtol=1e-9)
    # uniform levels: a Gaussian (variance 1/3 in [-1, 1)) scores (0.5 log(2 pi e / 3) + log(17 / 2)) / log 2
    # = 4.34 bits/dim, above log2(17) = 4.09 of the uniform itself; fitting 64x64 covariances to 500
    # points adds a little on 7 test points
    uniform_gaussian = (0.5 * math.log(2 * math.pi * math.e / 3) + math.log(digits.LEVELS / 2)) / math.log(2)
    assert np.mean(bpd) == pytest.approx(uniform_gaussian, abs=0.15)


# the experiment script end to end (UNet compiles); image runs by default: tests/runs/test_tasks_images.py
@pytest.mark.slow
def test_digits_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("FMJAX_DATA_DIR", str(tmp_path / "tfds"))
    result = digits.main(
        ["--steps", "50", "--eval-every", "25", "--test-images", "4", "--width", "32", "--depth", "2"]
        + ["--out", str(tmp_path)]
    )
    assert math.isfinite(result["bits_per_dim"]) and result["bits_per_dim"] > 0
    assert [row[0] for row in result["history"]] == [25, 50] and result["best_step"] in (25, 50)
    assert result["gaussian_bits_per_dim"] < math.log2(digits.LEVELS)  # digits are far from uniform
    assert (tmp_path / "digits.png").stat().st_size > 0 and "Gaussian" in (tmp_path / "digits.md").read_text()
    assert jnp.isfinite(result["final_loss"])

"""make_train_step(loss="sf2m") and the [SF]²M paper's 2D protocol (two_dim.py --protocol paper)."""

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import two_dim
from fmjax.couplings import exact, independent
from fmjax.losses import sf2m_loss, two_networks
from fmjax.metrics import wasserstein2
from fmjax.models import MLP, functional
from fmjax.paths import CondOT, Linear, SchrodingerBridge
from fmjax.training import TrainState, make_train_step


def _sf2m_model(num_classes=None):
    flow_fn, flow_params = functional(MLP(dim=2, width=16, depth=2, seed=0, num_classes=num_classes))
    score_fn, score_params = functional(MLP(dim=2, width=16, depth=2, seed=1, num_classes=num_classes))
    params = {"flow": flow_params, "score": score_params}
    if num_classes is None:
        return two_networks(flow_fn, score_fn), params

    def apply_fn(params, t, x, cond):  # two conditional networks, joined by hand
        return flow_fn(params["flow"], t, x, cond), score_fn(params["score"], t, x, cond)

    return apply_fn, params


def _batch(n=64, seed=0):
    k0, k1 = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(k0, (n, 2)), 3.0 + jax.random.normal(k1, (n, 2))


# ---- make_train_step(loss="sf2m") ----


@pytest.mark.parametrize("coupling", [independent(), exact()], ids=["independent", "exact"])
def test_sf2m_step_is_sf2m_loss_and_its_adamw_update(coupling):
    apply_fn, params = _sf2m_model()
    optimizer = optax.adamw(1e-2, weight_decay=1e-4)
    path = SchrodingerBridge(sigma=0.5)
    state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.PRNGKey(7))
    x0, x1 = _batch()
    step = make_train_step(
        apply_fn, optimizer, path=path, coupling=coupling, loss="sf2m", ema_decay=0.9, donate=False
    )
    new_state, metrics = step(state, x0, x1)

    # the step splits state.key into (next key, loss key) and evaluates sf2m_loss on the loss key
    next_key, loss_key = jax.random.split(state.key)
    # the references jitted (one program each, not every operation compiled on its own)
    (loss, aux), grads = jax.jit(
        jax.value_and_grad(
            lambda params, key: sf2m_loss(apply_fn, params, key, x0, x1, path=path, coupling=coupling),
            has_aux=True,
        )
    )(params, loss_key)
    # the same computation in two programs: XLA's fusion choices may round float32 differently
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["flow_loss"], jnp.mean(aux.flow_loss), rtol=1e-5)
    np.testing.assert_allclose(metrics["score_loss"], jnp.mean(aux.score_loss), rtol=1e-5)
    np.testing.assert_allclose(metrics["flow_loss"] + metrics["score_loss"], metrics["loss"], rtol=1e-6)
    assert jnp.array_equal(jax.random.key_data(new_state.key), jax.random.key_data(next_key))

    expected = jax.jit(
        lambda grads, params: optax.apply_updates(
            params, optimizer.update(grads, optimizer.init(params), params)[0]
        )
    )(grads, params)
    for got, want, old, ema in zip(
        jax.tree.leaves(new_state.params),
        jax.tree.leaves(expected),
        jax.tree.leaves(params),
        jax.tree.leaves(new_state.ema_params),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        # EMA at decay 0.9 after one step: 0.9 old + 0.1 new
        np.testing.assert_allclose(ema, 0.9 * old + 0.1 * got, rtol=1e-5, atol=1e-7)
    # both networks learn: the score net's gradient is not zero
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["score"]))


def test_sf2m_step_weight_applies_to_both_terms():
    apply_fn, params = _sf2m_model()
    optimizer = optax.sgd(0.0)
    path = SchrodingerBridge(sigma=1.0)
    x0, x1 = _batch()
    state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.PRNGKey(3))
    weight = lambda t: 1.0 + 3.0 * t  # noqa: E731
    step = make_train_step(apply_fn, optimizer, path=path, loss="sf2m", weight=weight, donate=False)
    _, metrics = step(state, x0, x1)
    _, loss_key = jax.random.split(state.key)
    loss, aux = jax.jit(
        lambda params, key: sf2m_loss(apply_fn, params, key, x0, x1, path=path, weight=weight)
    )(params, loss_key)
    w = weight(aux.sample.t)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["flow_loss"], jnp.mean(w * aux.flow_loss), rtol=1e-5)
    np.testing.assert_allclose(metrics["score_loss"], jnp.mean(w * aux.score_loss), rtol=1e-5)


def test_sf2m_step_with_condition_and_finite_checks():
    apply_fn, params = _sf2m_model(num_classes=3)
    optimizer = optax.adam(1e-3)
    path = SchrodingerBridge(sigma=1.0)
    x0, x1 = _batch(n=32)
    labels = jnp.arange(32) % 3
    state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.PRNGKey(5))
    step = make_train_step(apply_fn, optimizer, path=path, loss="sf2m", check_finite=True, donate=False)
    new_state, metrics = step(state, x0, x1, labels)
    _, loss_key = jax.random.split(state.key)
    loss, _ = sf2m_loss(apply_fn, params, loss_key, x0, x1, path=path, cond=labels)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    assert int(metrics["nonfinite"]) == 0 and int(new_state.step) == 1
    # a NaN target is reported by the same bit mask as for cfm
    _, bad = step(state, x0, x1.at[0, 0].set(jnp.nan), labels)
    assert int(bad["nonfinite"]) & 1


def test_sf2m_step_bad_combinations_are_named():
    apply_fn, _ = _sf2m_model()
    optimizer = optax.adam(1e-3)
    with pytest.raises(ValueError, match=r"target='x1'.*loss='sf2m'"):
        make_train_step(apply_fn, optimizer, path=SchrodingerBridge(sigma=1.0), loss="sf2m", target="x1")
    with pytest.raises(ValueError, match=r"loss must be one of 'cfm', 'sf2m'; got 'score'"):
        make_train_step(apply_fn, optimizer, path=SchrodingerBridge(sigma=1.0), loss="score")
    # a path without noise has no score to match
    with pytest.raises(ValueError, match=r"loss='sf2m' needs a path with noise"):
        make_train_step(apply_fn, optimizer, path=Linear(sigma=0.0), loss="sf2m")
    with pytest.raises(ValueError, match=r"loss='sf2m' needs a path with noise"):
        make_train_step(apply_fn, optimizer, path=CondOT(sigma_min=0.1), loss="sf2m")


SHARDED = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, numpy as np, optax
    from jax.sharding import Mesh
    from fmjax.couplings import exact
    from fmjax.losses import two_networks
    from fmjax.models import MLP, functional
    from fmjax.paths import SchrodingerBridge
    from fmjax.training import TrainState, make_train_step

    assert len(jax.devices()) == 2
    flow_fn, flow_params = functional(MLP(dim=2, width=16, depth=2, seed=0))
    score_fn, score_params = functional(MLP(dim=2, width=16, depth=2, seed=1))
    apply_fn, params = two_networks(flow_fn, score_fn), {"flow": flow_params, "score": score_params}
    optimizer = optax.adam(1e-2)
    x0 = jax.random.normal(jax.random.PRNGKey(0), (64, 2))
    x1 = 3.0 + jax.random.normal(jax.random.PRNGKey(1), (64, 2))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    results = []
    for m in (None, mesh):
        state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.PRNGKey(2))
        step = make_train_step(apply_fn, optimizer, path=SchrodingerBridge(sigma=1.0),
                               coupling=exact(scope="global"), loss="sf2m", mesh=m, donate=False)
        for _ in range(3):
            state, metrics = step(state, x0, x1)
        results.append((metrics, state.params))
    (m1, p1), (m2, p2) = results
    for name in ("loss", "flow_loss", "score_loss"):
        np.testing.assert_allclose(m1[name], m2[name], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    print("sharded ok")
    """
)


def test_sf2m_step_on_a_mesh_equals_one_device():
    # a global exact coupling on 2 devices computes what one device computes on the same global batch
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [sys.executable, "-c", SHARDED], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sharded ok" in out.stdout


# ---- the paper protocol: data as the runner draws it ----


def _nearest(points, centres):
    return np.argmin(((points[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)


def test_runner_gaussians_ring_of_eight():
    x = two_dim.runner_gaussians(1500, seed=42)
    assert x.shape == (12_000, 2) and x.dtype == np.float32
    angles = 2 * np.pi * np.arange(1, 9) / 8
    centres = 5.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
    label = _nearest(x, centres)
    # components are in order, 1500 each. A std-1 point lies past the bisector towards one of its two
    # neighbours (centres 2 * 5 sin(pi / 8) = 3.83 apart) with probability 1 - Phi(1.91) = 0.028 each:
    # 94.4% are nearest their own centre (binomial sd over 12,000 points: 0.2%)
    assert np.mean(label == np.repeat(np.arange(8), 1500)) == pytest.approx(0.944, abs=0.01)
    for k in range(8):
        part = x[1500 * k : 1500 * (k + 1)]
        np.testing.assert_allclose(part.mean(0), centres[k], atol=0.1)  # 4 standard errors
        np.testing.assert_allclose(part.std(0), 1.0, atol=0.08)
    assert not np.array_equal(x, two_dim.runner_gaussians(1500, seed=43))


def test_runner_sklearn_sets_are_seed_42_and_scaled():
    moons = two_dim.runner_moons(12_000)
    # make_moons: x in [-1, 2], y in [-0.5, 1] before noise 0.05; the runner doubles it and shifts x by
    # -1 (bounds with 5 sd of the doubled noise)
    assert (
        moons.min(0)[0] > -3.5 and moons.max(0)[0] < 3.5 and moons.min(0)[1] > -1.5 and moons.max(0)[1] < 2.5
    )
    # the two half circles' means: (0, 2/pi) and (1, 0.5 - 2/pi), doubled, shifted
    np.testing.assert_allclose(moons.mean(0), [2 * 0.5 - 1, 0.5], atol=0.02)
    np.testing.assert_array_equal(moons, two_dim.runner_moons(12_000))  # random_state 42, whatever the seed
    scurve = two_dim.runner_scurve(12_000)
    # (sin t, sign(t)(cos t - 1)) for t uniform in 3 pi (-1/2, 1/2), times 1.5, noise 1.5 * 0.05
    assert np.abs(scurve[:, 0]).max() < 1.5 + 0.4 and np.abs(scurve[:, 1]).max() < 3.0 + 0.4
    np.testing.assert_allclose(scurve.mean(0), [0.0, 0.0], atol=0.05)
    # E[sin^2 t] over t ~ U(-3pi/2, 3pi/2) is 1/2: x's variance is 1.5^2 / 2 + noise
    assert scurve[:, 0].var() == pytest.approx(1.125 + 0.075**2, rel=0.05)


def test_dsb_pair_standardised_moon_and_wide_gaussians():
    moon = two_dim.dsb_moon(12_000, seed=42)
    assert abs(float(moon.mean())) < 1e-4 and float(moon.std(ddof=1)) == pytest.approx(7.0, rel=1e-5)
    gauss = two_dim.dsb_8gaussians(12_000, seed=42)
    r = 1 / np.sqrt(2)
    centres = 12.0 * np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (r, r), (r, -r), (-r, r), (-r, -r)])
    label = _nearest(gauss, centres)
    counts = np.bincount(label, minlength=8)
    assert counts.min() > 1300 and counts.max() < 1700  # 1500 +- 5 sd of a binomial(12000, 1/8)
    for k in range(8):
        np.testing.assert_allclose(gauss[label == k].std(0), 1.5, rtol=0.08)
    # the DSB code reseeds numpy's generator for each set: a seed gives the same points
    np.testing.assert_array_equal(gauss, two_dim.dsb_8gaussians(12_000, seed=42))
    assert not np.array_equal(moon, two_dim.dsb_moon(12_000, seed=43))


def test_paper_datamodule_sizes_and_fixed_split():
    data = two_dim.paper_data("N -> moons", seed=43)
    assert [len(data[k][1]) for k in ("train", "val", "test")] == [10_000, 1_000, 1_000]
    assert all(data[k][0] is None for k in data)
    # the split is disjoint and covers the 12,000 points; moons' test set is the same for every seed
    whole = np.concatenate([data[k][1] for k in ("train", "val", "test")])
    assert len(np.unique(whole, axis=0)) == 12_000
    full = two_dim.runner_moons(12_000)
    np.testing.assert_array_equal(whole[np.lexsort(whole.T)], full[np.lexsort(full.T)])
    np.testing.assert_array_equal(data["test"][1], two_dim.paper_data("N -> moons", seed=42)["test"][1])
    paired = two_dim.paper_data("moons -> 8gaussians", seed=42)
    assert [paired[k][0].shape for k in ("train", "val", "test")] == [(10_000, 2), (1_000, 2), (1_000, 2)]
    assert not np.array_equal(
        two_dim.paper_data("N -> 8gaussians", seed=42)["test"][1],
        two_dim.paper_data("N -> 8gaussians", seed=43)["test"][1],
    )


def test_fixed_dataset_epochs_like_a_shuffling_loader():
    x1 = np.arange(20_000, dtype=np.float32).reshape(10_000, 2)
    loader = two_dim.FixedDataset(x1=x1, x0=None, batch_size=512, drop_last=False, seed=1)
    batches = list(loader.epoch(0))
    assert loader.steps_per_epoch() == 20 == len(batches)
    assert [len(b[1]) for b in batches] == [512] * 19 + [272]
    seen = np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(np.sort(seen[:, 0]), x1[:, 0])  # every point once an epoch
    assert not np.array_equal(seen, np.concatenate([b[1] for b in loader.epoch(1)]))  # reshuffled
    np.testing.assert_array_equal(seen, np.concatenate([b[1] for b in loader.epoch(0)]))  # reproducible
    noise = np.concatenate([b[0] for b in batches])
    assert (
        noise.shape == (10_000, 2) and abs(noise.mean()) < 0.05 and noise.std() == pytest.approx(1, abs=0.03)
    )
    paired = two_dim.FixedDataset(x1=x1, x0=-x1, batch_size=512, drop_last=True, seed=1)
    pairs = list(paired.epoch(0))
    assert paired.steps_per_epoch() == 19 == len(pairs) and all(len(b[0]) == 512 for b in pairs)
    # two loaders, two permutations: x0's rows are not x1's partners
    assert not np.array_equal(pairs[0][0], -pairs[0][1])


def test_paper_quick_run_learns_and_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(two_dim, "PROGRESS_SECONDS", 0.0)  # a line at every validation
    records = two_dim.main(["--protocol", "paper", "--quick", "--out", str(tmp_path)])
    progress = capsys.readouterr().err
    assert "[OT-CFM | N -> moons | seed 42] training 20 epochs of 8 steps" in progress
    assert "[SF2M-Exact | N -> moons | seed 42] epoch 20/20: val loss" in progress
    assert sorted(r["method"] for r in records) == ["OT-CFM", "SF2M-Exact"]
    for r in records:
        assert r["steps"] == 20 * 8 and r["best_epoch"] in (5, 10, 15, 20)
        # 160 steps take 512 N(0, I) points to 0.46 of their W2 to the moons (seeded: the same run each
        # time; 0.6 leaves room for another CPU's rounding). The EMA (decay 0.999) has barely moved
        # from the initial network, whose samples are further away than the source points themselves.
        for key in ("w2_best", "w2_last", "w2_dopri5"):
            assert math.isfinite(r[key]) and 0 < r[key] < 0.6 * r["w2_source"], (key, r)
        assert r["w2_ema"] > r["w2_source"]
        assert r["w2_source"] == pytest.approx(
            wasserstein2(
                *two_dim._test_points(
                    "N -> moons", 42, two_dim.paper_data("N -> moons", 42, two_dim.QUICK.split), 256
                )
            )
        )
    sf2m = next(r for r in records if r["method"] == "SF2M-Exact")
    assert 0 < sf2m["w2_sde_best"] < 0.6 * sf2m["w2_source"]
    table = (tmp_path / "two_dim_paper.md").read_text()
    assert "| OT-CFM | N -> moons | 1 |" in table and "0.130 (0.083)" in table
    assert "| [SF]²M-Exact | N -> moons | 1 |" in table
    summary = json.loads((tmp_path / "two_dim_paper.json").read_text())
    assert summary["settings"]["split"] == [2048, 512, 512] and len(summary["records"]) == 2
    again = two_dim.main(
        ["--protocol", "paper", "--quick", "--out", str(tmp_path)]
    )  # all logged: no training
    assert "training" not in capsys.readouterr().err
    assert [json.dumps(r) for r in again] == [json.dumps(r) for r in records]
    assert len((tmp_path / "two_dim_paper_runs.jsonl").read_text().splitlines()) == 2


def test_paper_protocol_rejects_unknown_method(tmp_path):
    with pytest.raises(SystemExit) as error:
        two_dim.main(["--protocol", "paper", "--methods", "OT-CFM,DSBM", "--out", str(tmp_path)])
    assert error.value.code == 2

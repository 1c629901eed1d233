"""Conditional generation: conditions through the loss, couplings and step; label-aware couplings against
POT class by class; classifier-free guidance; per-sample, weighted and x1/eps-target losses."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import ot
import pytest

import fmjax
from fmjax.couplings import Coupling, Sinkhorn, exact, independent, schrodinger_bridge, sinkhorn
from fmjax.guidance import guided_velocity
from fmjax.likelihood import log_likelihood
from fmjax.losses import cfm_loss, drop_cond
from fmjax.manifolds import Euclidean, FlatTorus, Sphere
from fmjax.models import MLP, TangentField, UNet, functional
from fmjax.paths import CondOT, Geodesic, Linear, VariancePreserving
from fmjax.runs.pipeline import HostPairs
from fmjax.sampling import sample
from fmjax.training import TrainState, make_train_step

HERE = os.path.dirname(__file__)
KEY = jax.random.key(0)

# A mixture of K = 4 Gaussians (std 0.4) at distance 2 from the origin: a sample of component k lies
# nearest to mean k with probability 1 - 2 P(N(0, 0.4^2) > sqrt(2)) = 0.9996.
MEANS = 2.0 * jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
K, STD = 4, 0.4


def _mixture(key, n):
    """(x0 ~ N(0, I), x1 from the mixture, the component of each x1)."""
    k_label, k_x1, k_x0 = jax.random.split(key, 3)
    labels = jax.random.randint(k_label, (n,), 0, K)
    x1 = MEANS[labels] + STD * jax.random.normal(k_x1, (n, 2))
    return jax.random.normal(k_x0, (n, 2)), x1, labels


def _train(steps, cond_dropout, seed=0):
    """(model, apply_fn, state) of a conditional MLP trained by make_train_step, labels as cond."""
    model = MLP(dim=2, width=64, depth=3, num_classes=K, seed=seed)
    apply_fn, params = functional(model)
    optimizer = optax.adam(optax.cosine_decay_schedule(1e-2, steps, alpha=0.05))
    state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.key(1))
    step = make_train_step(
        apply_fn,
        optimizer,
        path=CondOT(),
        cond_dropout=cond_dropout,
        null_cond=model.null_cond(),
        ema_decay=0.99,
    )
    batches = jax.vmap(lambda key: _mixture(key, 256))(jax.random.split(jax.random.key(2), steps))
    # the step scanned over the batches in one dispatch (the same steps as a Python loop over them)
    train = jax.jit(
        lambda state, batches: jax.lax.scan(lambda s, b: (step(s, *b)[0], None), state, batches)[0]
    )
    return model, apply_fn, train(state, batches)


def _nearest(x):
    return np.asarray(jnp.argmin(jnp.sum(jnp.square(x[:, None] - MEANS[None]), axis=-1), axis=-1))


def _guided_samples(model, apply_fn, params, scales, n=500):
    """For each scale: samples of every class (n each), and the class asked of each."""
    asked = jnp.repeat(jnp.arange(K, dtype=jnp.int32), n)
    x0 = jax.random.normal(jax.random.key(5), (K * n, 2))
    out = {}
    for scale in scales:
        velocity = guided_velocity(apply_fn, params, asked, scale=scale, null_cond=model.null_cond())
        out[scale] = np.asarray(sample(velocity, x0, solver="euler", steps=20).x1)
    return out, np.asarray(asked)


@pytest.fixture(scope="module")
def conditional_model():
    # 600 steps of batch 256 (cond_dropout 0.1, Adam with a cosine decay from 1e-2)
    return _train(600, cond_dropout=0.1)


def test_samples_land_on_their_component_and_guidance_sharpens(conditional_model):
    model, apply_fn, state = conditional_model
    samples, asked = _guided_samples(model, apply_fn, state.ema_params, (0.0, 1.0, 2.0))
    right = {s: np.mean(_nearest(x) == asked) for s, x in samples.items()}
    per_class = {s: [np.mean(_nearest(x)[asked == k] == k) for k in range(K)] for s, x in samples.items()}
    # figures (seeded, 500 samples per class): nearest the class asked at scale 0: 0.251 (the mixture's
    # shares); scale 1: 0.998/0.998/1.0/0.992; scale 2 (and 4): 1.0. Mean distance to the class's mean:
    # 2.51, 0.459, 0.352 (0.351)
    assert min(per_class[1.0]) >= 0.98
    # scale 0 is the unconditional field: whatever class is asked, the samples cover the whole mixture
    # (0.25 per component; 0.04 is 4 standard errors of a share of 2000 samples)
    shares = np.bincount(_nearest(samples[0.0]), minlength=K) / len(asked)
    np.testing.assert_allclose(shares, 0.25, atol=0.04)
    # guidance above 1 raises the fraction nearest the class asked, and pulls samples toward its mean
    assert right[2.0] >= right[1.0] and right[2.0] >= 0.999
    distance = {s: np.mean(np.linalg.norm(x - np.asarray(MEANS)[asked], axis=-1)) for s, x in samples.items()}
    assert distance[2.0] < distance[1.0] < distance[0.0]


def test_cond_dropout_one_trains_the_unconditional_model():
    model, apply_fn, state = _train(300, cond_dropout=1.0)
    init = functional(MLP(dim=2, width=64, depth=3, num_classes=K, seed=0))[1]
    table = state.params["condition"]["label_embed"]["embedding"]
    # the classes' rows never reached the loss (Adam moves nothing with zero gradients); the null row did
    np.testing.assert_array_equal(table[:K], init["condition"]["label_embed"]["embedding"][:K])
    assert not np.array_equal(table[K], init["condition"]["label_embed"]["embedding"][K])
    # the null-conditioned model is the unconditional flow: a quarter of the samples on each component
    samples, _ = _guided_samples(model, apply_fn, state.ema_params, (0.0,))
    shares = np.bincount(_nearest(samples[0.0]), minlength=K) / len(samples[0.0])
    np.testing.assert_allclose(shares, 0.25, atol=0.04)  # 2000 samples: 0.04 is 4 standard errors


def test_cond_dropout_replaces_conditions_by_the_null_condition():
    labels = jnp.arange(4000) % K
    for rate in (0.0, 0.3, 1.0):
        dropped = np.asarray(drop_cond(KEY, labels, jnp.int32(K), rate)) == K
        # each sample with probability rate: within 4 standard errors of 4000 draws (0.029 at 0.3)
        assert abs(dropped.mean() - rate) < 0.029
    # in the loss: the model sees each sample's label, or the null class K
    x0, x1, labels = _mixture(KEY, 4000)
    apply_fn, params = functional(MLP(dim=2, width=8, depth=1, num_classes=K))
    options = {"cond": labels, "path": CondOT(), "cond_dropout": 0.3, "null_cond": K}
    _, aux = jax.jit(lambda key: cfm_loss(apply_fn, params, key, x0, x1, **options))(KEY)
    dropped = np.asarray(aux.cond) == K
    assert abs(dropped.mean() - 0.3) < 0.029
    np.testing.assert_array_equal(np.asarray(aux.cond)[~dropped], np.asarray(labels)[~dropped])


def _class_by_class_emd(x0, x1, labels0, labels1):
    """The optimal j of POT's emd solved for each class on its own (float64)."""
    j = np.full(len(labels0), -1)
    for c in np.unique(labels1):
        rows, cols = np.flatnonzero(labels0 == c), np.flatnonzero(labels1 == c)
        a = np.asarray(x0, np.float64)[rows].reshape(len(rows), -1)
        b = np.asarray(x1, np.float64)[cols].reshape(len(cols), -1)
        w = np.full(len(rows), 1.0 / len(rows))
        plan = ot.emd(w, w, ot.dist(a, b), numItermax=10**7)
        j[rows] = cols[np.argmax(plan, axis=1)]
    return j


@pytest.mark.parametrize("shape", [(2,), (40,)])  # points solved on the host; the device's cost matrix
@pytest.mark.parametrize("sides", ["x1", "both"])
def test_exact_by_label_is_pot_emd_class_by_class(shape, sides):
    rng = np.random.default_rng(len(shape) + len(sides))
    n = 90
    x0 = jnp.asarray(rng.normal(size=(n, *shape)), jnp.float32)
    x1 = jnp.asarray(rng.normal(size=(n, *shape)) + 0.5, jnp.float32)
    labels1 = rng.integers(0, 5, n)
    labels0 = rng.permutation(labels1) if sides == "both" else labels1  # the same count of each class
    given = {"labels1": jnp.asarray(labels1)}
    if sides == "both":
        given["labels0"] = jnp.asarray(labels0)
    i, j = jax.jit(lambda x0, x1, given: exact(by_label=True)(None, x0, x1, **given))(x0, x1, given)
    np.testing.assert_array_equal(i, np.arange(n))
    j = np.asarray(j)
    assert sorted(j.tolist()) == list(range(n))
    np.testing.assert_array_equal(labels1[j], labels0)  # never across classes
    # continuous data: the optimum of each class is unique, so the pairs are POT's exactly
    np.testing.assert_array_equal(j, _class_by_class_emd(x0, x1, labels0, labels1))


def test_exact_by_label_with_unequal_counts_crosses_classes_only_for_the_surplus():
    rng = np.random.default_rng(3)
    n = 60
    x0 = jnp.asarray(rng.normal(size=(n, 2)), jnp.float32)
    x1 = jnp.asarray(rng.normal(size=(n, 2)), jnp.float32)
    labels0, labels1 = rng.integers(0, 3, n), rng.integers(0, 3, n)
    _, j = exact(by_label=True)(None, x0, x1, labels0=jnp.asarray(labels0), labels1=jnp.asarray(labels1))
    j = np.asarray(j)
    assert sorted(j.tolist()) == list(range(n))
    surplus = sum(max(0, np.sum(labels0 == c) - np.sum(labels1 == c)) for c in range(3))
    assert surplus > 0 and np.sum(labels0 != labels1[j]) == surplus


def test_sinkhorn_by_label_stays_within_classes():
    coupling = sinkhorn(by_label=True)
    rng = np.random.default_rng(4)
    n = 48
    x0 = jnp.asarray(rng.normal(size=(n, 2)), jnp.float32)
    x1 = jnp.asarray(rng.normal(size=(n, 2)), jnp.float32)
    labels1 = jnp.asarray(rng.integers(0, 3, n))
    for key in jax.random.split(KEY, 5):
        _, j = coupling(key, x0, x1, labels1=labels1)
        np.testing.assert_array_equal(labels1[j], labels1)
    # the plan is that of each class on its own: no mass across classes, uniform marginals
    plan = np.asarray(coupling.plan(x0, x1, labels1=labels1))
    across = np.asarray(labels1)[:, None] != np.asarray(labels1)[None, :]
    assert plan[across].sum() < 1e-12
    np.testing.assert_allclose(plan.sum(axis=1), 1.0 / n, atol=1e-3 / n)
    # with x0 labelled too, even unequal class counts never give a cross-class pair
    labels0 = jnp.asarray(rng.integers(0, 3, n))
    _, j = coupling(KEY, x0, x1, labels0=labels0, labels1=labels1)
    np.testing.assert_array_equal(labels1[j], labels0)


def test_pipelined_host_solve_takes_the_labels():
    """The training loop's split solve (host_inputs on the device, HostPairs on host threads) pairs
    within classes as the in-step coupling does; without labels host_inputs refuses."""
    coupling = exact(by_label=True)
    xs0 = jax.random.normal(jax.random.key(1), (3, 32, 2))
    xs1 = jax.random.normal(jax.random.key(2), (3, 32, 2))
    labels = jax.random.randint(jax.random.key(3), (3, 32), 0, 4)
    inputs = jax.jit(jax.vmap(lambda a, b, y: coupling.host_inputs(a, b, labels1=y)))(xs0, xs1, labels)
    solver = HostPairs(coupling, threads=2)
    try:
        j = solver.solve(inputs)
    finally:
        solver.close()
    for k in range(3):
        np.testing.assert_array_equal(j[k], coupling(None, xs0[k], xs1[k], labels1=labels[k])[1])
        np.testing.assert_array_equal(np.asarray(labels[k])[j[k]], labels[k])
    with pytest.raises(ValueError, match="labels1 is required"):
        coupling.host_inputs(xs0[0], xs1[0])


# every coupling, with and without labels: the condition must name x1's row after coupling
COUPLINGS = {
    "independent": independent(),
    "exact": exact(),
    "sinkhorn": sinkhorn(),
    "sb": schrodinger_bridge(1.0),
    "exact_by_label": exact(by_label=True),
    "sinkhorn_by_label": sinkhorn(by_label=True),
    "sb_by_label": schrodinger_bridge(1.0, by_label=True),
}


@pytest.mark.parametrize("name", list(COUPLINGS))
def test_cond_follows_x1_through_every_coupling(name):
    coupling = COUPLINGS[name]
    rng = np.random.default_rng(5)
    n = 24
    hidden = rng.permutation(n)
    x0 = jnp.asarray(rng.normal(size=(n, 2)), jnp.float32)
    x1 = jnp.asarray(rng.normal(size=(n, 2)) + 1.0, jnp.float32)[hidden]  # stored in a hidden order
    cond = {"row": jnp.arange(n), "label": jnp.asarray(rng.integers(0, 3, n))}

    def loss(x0, x1, cond):
        model = lambda params, t, x, cond: params * x  # noqa: E731
        return cfm_loss(model, 1.0, KEY, x0, x1, cond=cond, path=CondOT(), coupling=coupling)

    # eagerly too where that compiles nothing more (Sinkhorn's eager calls compile their own solve)
    eager = [] if isinstance(coupling, Sinkhorn) else [loss(x0, x1, cond)[1]]
    for aux in [*eager, jax.jit(loss)(x0, x1, cond)[1]]:
        rows = np.asarray(aux.cond["row"])
        np.testing.assert_array_equal(aux.sample.x1, np.asarray(x1)[rows])
        np.testing.assert_array_equal(aux.cond["label"], np.asarray(cond["label"])[rows])
        np.testing.assert_array_equal(rows, aux.pairs[1])
        if coupling.by_label:
            np.testing.assert_array_equal(aux.cond["label"], cond["label"])  # x0[k] takes x1[k]'s class


def test_cond_follows_x1_on_a_mesh_and_the_sharded_step_matches():
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "conditional_sharded_checks.py")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert results.pop("devices") == 4
    step = results.pop("step")
    assert step["loss_diff"] < 1e-5 and step["param_diff"] < 1e-5, step
    for name, record in results.items():
        assert record["follows"] and record["labels_follow"], name
        assert record["sharded"] == "P('data',)", name
        assert record.get("within_shards", True) and record.get("within_classes", True), name


def _losses(**options):
    x0, x1, labels = _mixture(KEY, 64)
    apply_fn = lambda params, t, x, cond: params * x * t[:, None] + cond[:, None]  # noqa: E731
    return cfm_loss(apply_fn, 0.5, KEY, x0, x1, cond=labels, path=CondOT(), **options)


def test_reduction_none_averages_to_the_mean_and_weights_multiply():
    mean, aux = _losses()
    per_sample, aux_none = _losses(reduction="none")
    assert per_sample.shape == (64,)
    np.testing.assert_allclose(jnp.mean(per_sample), mean, rtol=1e-6)
    expected = jnp.mean(jnp.square(aux.velocity - aux.sample.ut), axis=-1)
    np.testing.assert_allclose(per_sample, expected, rtol=1e-6)
    weighted, _ = _losses(reduction="none", weight=lambda t: 1.0 - t)
    np.testing.assert_allclose(weighted, (1.0 - aux.sample.t) * per_sample, rtol=1e-6)
    weighted_mean, _ = _losses(weight=lambda t: 1.0 - t)
    np.testing.assert_allclose(weighted_mean, jnp.mean(weighted), rtol=1e-6)


@pytest.mark.parametrize("path", [CondOT(sigma_min=0.0), CondOT(sigma_min=0.1), VariancePreserving()])
def test_x1_and_eps_targets_are_the_velocity_loss_scaled_by_the_conversion(path):
    """A velocity model v and the x1 (eps) model its conversion implies: with x_t = a x0 + b x1 and
    u_t = a' x0 + b' x1, with D = a b' - a' b: x1_pred - x1 = a / D (v - u) and x0_pred - x0 = -b / D (v - u);
    for CondOT(sigma_min=0) the factors are (1 - t) and -t."""
    x0, x1, _ = _mixture(KEY, 64)
    apply_v, params = functional(MLP(dim=2, width=16, depth=2))
    apply_x1 = lambda p, t, x: path.x1_from_velocity(t, x, apply_v(p, t, x))  # noqa: E731
    apply_eps = lambda p, t, x: path.eps_from_velocity(t, x, apply_v(p, t, x))  # noqa: E731
    run = lambda fn, target: cfm_loss(fn, params, KEY, x0, x1, path=path, reduction="none", target=target)  # noqa: E731
    loss_v, aux = run(apply_v, "velocity")
    loss_x1, aux_x1 = run(apply_x1, "x1")
    loss_eps, aux_eps = run(apply_eps, "eps")
    t = aux.sample.t
    coef, dcoef = path.schedule(t), path.schedule_derivative(t)
    det = coef.a * dcoef.b - dcoef.a * coef.b
    np.testing.assert_allclose(loss_x1, (coef.a / det) ** 2 * loss_v, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(loss_eps, (coef.b / det) ** 2 * loss_v, rtol=1e-4, atol=1e-7)
    if path == CondOT(sigma_min=0.0):
        np.testing.assert_allclose(loss_x1, (1 - t) ** 2 * loss_v, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(loss_eps, t**2 * loss_v, rtol=1e-4, atol=1e-7)
    # the velocity each target's prediction implies is the velocity model's
    np.testing.assert_allclose(aux_x1.velocity, aux.velocity, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(aux_eps.velocity, aux.velocity, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(aux_x1.prediction, apply_x1(params, t, aux.sample.xt))


def test_guided_velocity_is_one_call_and_interpolates_the_two_fields():
    model = MLP(dim=2, width=16, depth=2, num_classes=K, seed=1)
    apply_fn, params = functional(model)
    calls = []

    def counted(params, t, x, cond):
        calls.append(x.shape)
        return apply_fn(params, t, x, cond)

    x = jax.random.normal(KEY, (6, 2))
    t = jnp.float32(0.3)
    cond = jnp.array([0, 1, 2, 3, 0, 1])
    v_cond = apply_fn(params, jnp.full(6, t), x, cond)
    v_null = apply_fn(params, jnp.full(6, t), x, jnp.full(6, K))
    for scale, expected in ((0.0, v_null), (1.0, v_cond), (3.0, v_null + 3.0 * (v_cond - v_null))):
        calls.clear()
        v = guided_velocity(counted, params, cond, scale=scale, null_cond=model.null_cond())(t, x)
        assert calls == [(12, 2)]  # one call, on the batch doubled
        np.testing.assert_allclose(v, expected, rtol=1e-5, atol=1e-6)
    # one condition for the whole batch broadcasts; jit gives the same field
    one = guided_velocity(apply_fn, params, jnp.int32(2), scale=1.0, null_cond=model.null_cond())
    np.testing.assert_allclose(
        jax.jit(lambda v, t, x: v(t, x))(one, t, x),
        apply_fn(params, jnp.full(6, t), x, jnp.full(6, 2)),
        rtol=1e-5,
    )


def test_guided_velocity_works_with_log_likelihood():
    model = MLP(dim=2, width=16, depth=2, num_classes=K, seed=2)
    apply_fn, params = functional(model)
    x = jax.random.normal(KEY, (5, 2))
    cond = jnp.int32(1)
    guided = guided_velocity(apply_fn, params, cond, scale=1.0, null_cond=model.null_cond())
    plain = lambda t, x: apply_fn(params, jnp.full(x.shape[0], t), x, jnp.full(x.shape[0], 1))  # noqa: E731
    ours, reference = (log_likelihood(v, x, solver="heun", steps=8) for v in (guided, plain))
    np.testing.assert_allclose(ours.log_p, reference.log_p, rtol=1e-5, atol=1e-5)


def test_conditional_models_keep_the_unconditional_weights_and_null_features_are_ignored():
    for build in (
        lambda **c: MLP(dim=2, width=16, depth=2, seed=3, **c),
        lambda **c: UNet(channels=4, channel_mults=(1,), groups=2, seed=3, **c),
    ):
        plain = functional(build())[1]
        conditional = functional(build(num_classes=3, cond_dim=2))[1]
        assert set(conditional) - set(plain) == {"condition"}
        for a, b in zip(
            jax.tree.leaves(plain), jax.tree.leaves({k: conditional[k] for k in plain}), strict=True
        ):
            np.testing.assert_array_equal(a, b)
    model = MLP(dim=2, width=16, depth=2, cond_dim=3)
    apply_fn, params = functional(model)
    t, x = jnp.full(4, 0.5), jnp.ones((4, 2))
    null = model.null_cond()
    masked = {"features": jax.random.normal(KEY, (4, 3)), "mask": jnp.zeros(4)}
    all_null = jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (4, *leaf.shape)), null)
    np.testing.assert_array_equal(apply_fn(params, t, x, masked), apply_fn(params, t, x, all_null))
    features = {"features": masked["features"], "mask": jnp.ones(4)}
    np.testing.assert_array_equal(
        apply_fn(params, t, x, features), apply_fn(params, t, x, features["features"])
    )


def _raises(error, match, fn):
    with pytest.raises(error, match=match):
        fn()


def test_bad_conditional_input_is_named():
    x0, x1, labels = _mixture(KEY, 8)
    model = MLP(dim=2, width=8, depth=1, num_classes=K)
    apply_fn, params = functional(model)
    plain_fn, plain_params = functional(MLP(dim=2, width=8, depth=1))

    def loss(**options):
        options = {"cond": labels, "path": CondOT(), **options}
        return cfm_loss(options.pop("apply_fn", apply_fn), params, KEY, x0, x1, **options)

    _raises(ValueError, r"cond must have the batch \(8\) as leading axis", lambda: loss(cond=labels[:5]))
    _raises(ValueError, r"cond\['label'\] must have the batch", lambda: loss(cond={"label": labels[None]}))
    _raises(
        ValueError,
        r"cond must lie in 0..4 .*4 is the null class.* to 5",
        lambda: loss(cond=labels.at[0].set(5)),
    )
    _raises(
        ValueError,
        "labels1 must hold class ids >= 0",
        lambda: loss(cond=labels.at[0].set(-1), coupling=exact(by_label=True)),
    )
    _raises(TypeError, "cond must hold integer class labels for a by_label coupling; got dtype float32",
            lambda: loss(cond=labels.astype(jnp.float32), coupling=exact(by_label=True)))  # fmt: skip
    _raises(
        TypeError,
        "labels1 must be an integer array",
        lambda: exact(by_label=True)(None, x0, x1, labels1=x1[:, 0]),
    )
    _raises(ValueError, r"cond_dropout must be <= 1.0", lambda: loss(cond_dropout=1.5, null_cond=K))
    _raises(ValueError, r"cond_dropout must be >= 0.0", lambda: loss(cond_dropout=-0.1, null_cond=K))
    _raises(ValueError, "cond_dropout=0.1 needs null_cond", lambda: loss(cond_dropout=0.1))
    _raises(
        ValueError, "cond_dropout and null_cond need a condition", lambda: loss(cond=None, cond_dropout=0.1)
    )
    _raises(TypeError, r"apply_fn must be callable as apply_fn\(params, t, x, cond\)",
            lambda: cfm_loss(plain_fn, plain_params, KEY, x0, x1, cond=labels, path=CondOT()))  # fmt: skip
    _raises(TypeError, "cond is given, but this MLP is unconditional", lambda: MLP(dim=2)(0.5, x1, labels))
    _raises(TypeError, "this MLP is conditional .* needs cond", lambda: model(0.5, x1))
    _raises(
        ValueError,
        "needs x1's class labels: pass cond",
        lambda: loss(cond=None, coupling=exact(by_label=True)),
    )
    _raises(ValueError, "built without by_label=True", lambda: exact()(None, x0, x1, labels1=labels))
    _raises(ValueError, "null_cond must have the structure of cond",
            lambda: loss(cond={"label": labels}, cond_dropout=0.5, null_cond=K))  # fmt: skip
    _raises(ValueError, "target must be one of 'eps', 'velocity', 'x1'", lambda: loss(target="score"))
    _raises(
        ValueError,
        "target='x1' needs a deterministic path",
        lambda: loss(path=Linear(sigma=0.1), target="x1"),
    )
    _raises(ValueError, "reduction must be one of 'mean', 'none'", lambda: loss(reduction="sum"))
    _raises(ValueError, r"weight\(t\) must return shape", lambda: loss(weight=lambda t: t[:2]))
    _raises(TypeError, "num_classes must be an int", lambda: MLP(dim=2, num_classes=2.0))
    _raises(ValueError, "cond_dim must be >= 1", lambda: UNet(cond_dim=0))
    guided = guided_velocity(apply_fn, params, labels[:3], scale=2.0, null_cond=model.null_cond())
    _raises(ValueError, r"cond has a batch axis of 3, but x has 8 samples", lambda: guided(0.5, x1))
    _raises(
        ValueError,
        "null_cond is required",
        lambda: guided_velocity(apply_fn, params, labels, scale=1.0, null_cond=None),
    )
    _raises(
        TypeError,
        "scale must be a real number",
        lambda: guided_velocity(apply_fn, params, labels, scale="2", null_cond=K),
    )
    step = make_train_step(apply_fn, optax.sgd(0.1), path=CondOT())
    state = TrainState.create(params=params, optimizer=optax.sgd(0.1), key=KEY)
    _raises(ValueError, r"cond must have the batch \(8\)", lambda: step(state, x0, x1, labels[:4]))
    _raises(
        ValueError,
        "cond_dropout must be <= 1.0",
        lambda: make_train_step(apply_fn, optax.sgd(0.1), path=CondOT(), cond_dropout=2.0),
    )


class _Shuffle(Coupling):
    """A coupling that draws random numbers: a random permutation of x1."""

    uses_key = True

    def pairs(self, key, x0, x1):
        return jnp.arange(x0.shape[0]), jax.random.permutation(key, x0.shape[0])


jax.tree_util.register_static(_Shuffle)


def test_without_cond_the_loss_is_unchanged():
    """The unconditional loss is still mean((v - u)^2) with the old key split (time, coupling, path)."""
    x0, x1, _ = _mixture(KEY, 32)
    apply_fn, params = lambda params, t, x: params * jnp.sin(x + t[:, None]), 0.7
    path = Linear(sigma=0.1)
    loss, aux = cfm_loss(apply_fn, params, KEY, x0, x1, path=path, coupling=_Shuffle())
    key_time, key_coupling, key_path = jax.random.split(KEY, 3)
    x0c, x1c, _, _ = _Shuffle().apply_with_status(key_coupling, x0, x1)
    t = fmjax.uniform(key_time, 32, x0.dtype)
    s = path.sample(key_path, x0c, x1c, t)
    assert float(loss) == float(jnp.mean(jnp.square(apply_fn(params, s.t, s.xt) - s.ut)))
    assert aux.cond is None and aux.prediction is aux.velocity


# --- on a manifold: the geodesic path, errors measured with the manifold's metric ---------------------------


def test_geodesic_loss_on_euclidean_space_is_the_linear_loss():
    apply_fn, params = functional(MLP(dim=3, width=8, depth=1))
    key, x0, x1 = jax.random.key(0), jax.random.normal(jax.random.key(1), (16, 3)), jnp.ones((16, 3))
    euclidean = cfm_loss(apply_fn, params, key, x0, x1, path=Geodesic(manifold=Euclidean()))[0]
    linear = cfm_loss(apply_fn, params, key, x0, x1, path=Linear())[0]
    np.testing.assert_allclose(euclidean, linear, rtol=1e-6)


def test_sphere_loss_ignores_normal_outputs_and_measures_the_geodesic_speed():
    sphere = Sphere()
    x0 = sphere.base_sample(jax.random.key(0), (32, 3))
    x1 = sphere.base_sample(jax.random.key(1), (32, 3))
    path = Geodesic(manifold=sphere)
    # a model predicting 0: each sample's error is |u_t|^2 / 3 = d(x0, x1)^2 / 3, at any t
    zero = lambda params, t, x: params * x  # noqa: E731 (params = 0)
    loss, aux = cfm_loss(zero, 0.0, jax.random.key(2), x0, x1, path=path, reduction="none")
    np.testing.assert_allclose(loss, sphere.dist(x0, x1) ** 2 / 3, rtol=1e-4)
    # a purely normal output (a multiple of x_t) is no error at all: it is projected away
    normal_loss, aux = cfm_loss(zero, 5.0, jax.random.key(2), x0, x1, path=path, reduction="none")
    np.testing.assert_allclose(normal_loss, loss, rtol=1e-5)
    np.testing.assert_allclose(jnp.sum(aux.velocity * aux.sample.xt, axis=-1), 0.0, atol=1e-5)


def test_torus_loss_uses_the_short_way_round():
    x0, x1 = jnp.full((4, 1), 0.1), jnp.full((4, 1), 2 * jnp.pi - 0.1)
    zero = lambda params, t, x: jnp.zeros_like(x)  # noqa: E731
    loss = cfm_loss(zero, None, jax.random.key(0), x0, x1, path=Geodesic(manifold=FlatTorus()))[0]
    np.testing.assert_allclose(loss, 0.2**2, rtol=1e-5)  # not (2 pi - 0.2)^2


def test_manifold_paths_take_only_velocity_targets():
    with pytest.raises(ValueError, match="target='x1' needs an affine path"):
        cfm_loss(lambda p, t, x: x, None, jax.random.key(0), jnp.ones((2, 3)), jnp.ones((2, 3)),
                 path=Geodesic(manifold=Sphere()), target="x1")  # fmt: skip


def test_a_tangent_field_trains_on_the_sphere_toward_a_cap():
    # CFM on S^2 from the uniform source to a cap around the north pole: the trained field carries
    # uniform points into the cap (mean z from 0 to near the cap's)
    sphere = Sphere()
    apply_fn, params = functional(TangentField(MLP(dim=3, width=32, depth=2), sphere))
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    def target(key, n):
        x = jax.random.normal(key, (n, 3)) * jnp.array([0.15, 0.15, 0.0]) + jnp.array([0.0, 0.0, 1.0])
        return sphere.projx(x)

    @jax.jit
    def step(params, opt_state, key):
        k0, k1, k2 = jax.random.split(key, 3)
        x0, x1 = sphere.base_sample(k0, (128, 3)), target(k1, 128)
        loss, grads = jax.value_and_grad(
            lambda p: cfm_loss(apply_fn, p, k2, x0, x1, path=Geodesic(manifold=sphere))[0]
        )(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    for k in range(300):
        params, opt_state, loss = step(params, opt_state, jax.random.key(k))
    x0 = sphere.base_sample(jax.random.key(10_000), (256, 3))
    x1 = sample(fmjax.as_velocity(apply_fn, params), x0, manifold=sphere, solver="euler", steps=20).x1
    np.testing.assert_allclose(jnp.linalg.norm(x1, axis=-1), 1.0, atol=1e-5)
    assert float(jnp.mean(x1[:, 2])) > 0.85  # the cap's mean z is about 0.98

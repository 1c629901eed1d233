"""[SF]²M: the conditional score of the paths, sf2m_loss against its closed forms, the drift and
velocity of a two-headed model, and a tiny bridge trained and sampled between two Gaussians."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fmjax
from fmjax.couplings import exact, schrodinger_bridge
from fmjax.losses import cfm_loss, sf2m_loss, two_networks
from fmjax.models import MLP, functional
from fmjax.paths import CondOT, Linear, SchrodingerBridge
from fmjax.sampling import sample
from fmjax.sde import SF2MDrift, sample_sde, sf2m_drift, sf2m_velocity

KEY = jax.random.key(0)
NOISY_PATHS = [SchrodingerBridge(sigma=0.7), SchrodingerBridge(sigma=2.0), Linear(sigma=0.3)]


def _batch(n=16, d=3, seed=1):
    k0, k1 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k0, (n, d)), 2.0 + jax.random.normal(k1, (n, d))


def _times(n=16, seed=2):
    return jax.random.uniform(jax.random.key(seed), (n,), minval=0.05, maxval=0.95)


# --- the conditional score on the paths ---------------------------------------------------------


@pytest.mark.parametrize("path", NOISY_PATHS, ids=repr)
def test_score_is_the_gradient_of_the_conditional_log_density(path):
    x0, x1 = _batch()
    t = _times()
    x = x0 + jax.random.normal(jax.random.key(3), x0.shape)

    def log_density(x_one, t_one, x0_one, x1_one):  # log N(x; a x0 + b x1, s^2 I), one sample
        coef = path.schedule(t_one)
        mean = coef.a * x0_one + coef.b * x1_one
        return jnp.sum(
            -0.5 * jnp.square((x_one - mean) / coef.s) - jnp.log(coef.s) - 0.5 * jnp.log(2 * jnp.pi)
        )

    autodiff = jax.vmap(jax.grad(log_density))(x, t, x0, x1)
    np.testing.assert_allclose(path.score(t, x, x0, x1), autodiff, rtol=1e-5, atol=1e-5)
    # a scalar t is every sample's time
    np.testing.assert_allclose(
        path.score(0.3, x, x0, x1), path.score(jnp.full((16,), 0.3), x, x0, x1), rtol=1e-6
    )


@pytest.mark.parametrize("path", NOISY_PATHS, ids=repr)
def test_score_on_the_path_is_minus_eps_over_the_noise_scale(path):
    x0, x1 = _batch()
    t = _times()
    sample, eps = path.sample_with_noise(KEY, x0, x1, t)
    s_t = path.schedule(t).s[:, None]
    np.testing.assert_allclose(path.score(t, sample.xt, x0, x1), -eps / s_t, rtol=1e-4, atol=1e-4)
    # sample_with_noise draws what sample draws, and eps rebuilds x_t
    plain = path.sample(KEY, x0, x1, t)
    for got, want in zip(sample, plain, strict=True):
        np.testing.assert_array_equal(got, want)
    coef = path.schedule(t)
    np.testing.assert_allclose(
        coef.a[:, None] * x0 + coef.b[:, None] * x1 + s_t * eps, sample.xt, rtol=1e-6, atol=1e-6
    )


def test_score_is_finite_at_the_ends_and_refused_without_noise():
    path = SchrodingerBridge(sigma=1.0)
    x0, x1 = _batch(n=2)
    ends = jnp.array([0.0, 1.0])
    xt = path.sample(KEY, x0, x1, ends).xt  # the end points themselves
    np.testing.assert_allclose(path.score(ends, xt, x0, x1), 0.0, atol=1e-4)
    assert CondOT().sample_with_noise(None, x0, x1, ends)[1] is None
    with pytest.raises(ValueError, match="no density and no score"):
        CondOT().score(ends, xt, x0, x1)
    with pytest.raises(ValueError, match="x1 must have the shape of xt"):
        path.score(ends, xt, x0, x1[:, :2])
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        path.score(jnp.array([0.5, 1.5]), xt, x0, x1)


def test_score_weight_is_lambda_of_tong_et_al():
    sigma = 0.7
    path = SchrodingerBridge(sigma=sigma)
    t = _times()
    sigma_t = sigma * jnp.sqrt(t * (1 - t))
    np.testing.assert_allclose(path.score_weight(t), 2 * sigma_t / sigma**2, rtol=1e-6)
    # lambda(t) (sigma^2 / 2) grad log p_t = -eps on the path: the loss's unit-noise scaling
    x0, x1 = _batch()
    sample, eps = path.sample_with_noise(KEY, x0, x1, t)
    scaled = path.score_weight(t)[:, None] * (sigma**2 / 2) * path.score(t, sample.xt, x0, x1)
    np.testing.assert_allclose(scaled, -eps, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="sigma > 0"):
        SchrodingerBridge(sigma=0.0).score_weight(t)


# --- sf2m_loss ----------------------------------------------------------------------------------


def _constant_model(params, t, x):
    """v = params["v"], s = params["s"] everywhere: known outputs to check the targets with."""
    return jnp.broadcast_to(params["v"], x.shape), jnp.broadcast_to(params["s"], x.shape)


PARAMS = {"v": jnp.array([0.5, -1.0, 2.0]), "s": jnp.array([1.0, 0.0, -3.0])}


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_sf2m_loss_targets_are_the_closed_forms(sigma):
    x0, x1 = _batch()
    path = SchrodingerBridge(sigma=sigma)
    loss, aux = sf2m_loss(_constant_model, PARAMS, KEY, x0, x1, path=path)
    t, xt = aux.sample.t[:, None], aux.sample.xt
    mu = (1 - t) * x0 + t * x1  # independent coupling: the pairs are the batches' rows
    sigma_t = sigma * jnp.sqrt(t * (1 - t))
    eps = (xt - mu) / sigma_t  # the fixed noise the loss drew
    np.testing.assert_allclose(aux.score_target, -eps / sigma_t, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(aux.score_target, -(xt - mu) / (sigma**2 * t * (1 - t)), rtol=1e-4, atol=1e-4)
    u = (1 - 2 * t) / (2 * t * (1 - t)) * (xt - mu) + x1 - x0
    np.testing.assert_allclose(aux.sample.ut, u, rtol=1e-4, atol=1e-4)
    v, s = _constant_model(PARAMS, t, xt)
    np.testing.assert_allclose(aux.flow_loss, jnp.mean(jnp.square(v - u), axis=1), rtol=1e-4)
    # the score term: lambda(t)^2 || (sigma^2 / 2)(s - grad log p_t) ||^2, i.e. TorchCFM's
    # || lambda(t) s~ + eps ||^2 for the drift-scaled score s~ = (sigma^2 / 2) s
    lam = 2 * sigma_t / sigma**2
    torchcfm = jnp.mean(jnp.square(lam * (sigma**2 / 2) * s + eps), axis=1)
    np.testing.assert_allclose(aux.score_loss, torchcfm, rtol=1e-4, atol=1e-5)
    paper = jnp.mean(jnp.square(lam * (sigma**2 / 2) * (s - aux.score_target)), axis=1)
    np.testing.assert_allclose(aux.score_loss, paper, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(loss, jnp.mean(aux.flow_loss + aux.score_loss), rtol=1e-6)
    np.testing.assert_array_equal(aux.velocity, v)
    np.testing.assert_array_equal(aux.score, s)


def _bridge_model(sigma, a, b):
    """The exact flow and score of the bridge between the point masses a and b."""

    def apply_fn(params, t, x):
        t = t[:, None]
        mu = (1 - t) * a + t * b
        return (1 - 2 * t) / (2 * t * (1 - t)) * (x - mu) + b - a, -(x - mu) / (sigma**2 * t * (1 - t))

    return apply_fn


def test_the_true_flow_and_score_minimise_the_loss():
    """Between point masses the conditional flow and score are the marginal ones: zero loss. The
    score scaled as TorchCFM's network outputs it is not the minimiser (unless sigma^2 = 2)."""
    sigma, a, b = 0.5, jnp.array([1.0, -2.0]), jnp.array([3.0, 0.5])
    x0, x1 = jnp.broadcast_to(a, (64, 2)), jnp.broadcast_to(b, (64, 2))
    exact_fn = _bridge_model(sigma, a, b)
    loss, aux = sf2m_loss(exact_fn, None, KEY, x0, x1, path=SchrodingerBridge(sigma=sigma))
    assert float(loss) < 1e-6
    np.testing.assert_allclose(aux.score, aux.score_target, rtol=1e-3, atol=1e-3)

    def scaled(params, t, x):
        v, s = exact_fn(params, t, x)
        return v, (sigma**2 / 2) * s

    assert float(sf2m_loss(scaled, None, KEY, x0, x1, path=SchrodingerBridge(sigma=sigma))[0]) > 0.1


def test_reduction_none_means_to_mean_and_weight_multiplies():
    x0, x1 = _batch()
    path = SchrodingerBridge(sigma=1.0)
    mean, aux = sf2m_loss(_constant_model, PARAMS, KEY, x0, x1, path=path)
    per_sample, aux_none = sf2m_loss(_constant_model, PARAMS, KEY, x0, x1, path=path, reduction="none")
    assert per_sample.shape == (16,)
    np.testing.assert_allclose(jnp.mean(per_sample), mean, rtol=1e-6)
    np.testing.assert_allclose(per_sample, aux_none.flow_loss + aux_none.score_loss, rtol=1e-6)
    weighted, aux_w = sf2m_loss(
        _constant_model, PARAMS, KEY, x0, x1, path=path, reduction="none", weight=lambda t: 1 + t
    )
    np.testing.assert_allclose(weighted, (1 + aux_w.sample.t) * per_sample, rtol=1e-6)


def test_jit_matches_eager_and_the_loss_is_differentiable():
    x0, x1 = _batch()
    path = SchrodingerBridge(sigma=1.0)

    def loss_fn(params, key):
        return sf2m_loss(_constant_model, params, key, x0, x1, path=path)[0]

    eager = loss_fn(PARAMS, KEY)
    np.testing.assert_allclose(jax.jit(loss_fn)(PARAMS, KEY), eager, rtol=1e-5)
    grads = jax.grad(loss_fn)(PARAMS, KEY)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.sum(jnp.abs(grads["s"]))) > 0  # the score head is trained


def test_the_coupling_pairs_the_batches():
    x0, x1 = _batch(n=8, d=2)
    path = SchrodingerBridge(sigma=1.0)
    _, aux = sf2m_loss(_constant_model, {"v": 0.0, "s": 0.0}, KEY, x0, x1, path=path, coupling=exact())
    i, j = aux.pairs
    np.testing.assert_array_equal(aux.sample.x0, x0[i])
    np.testing.assert_array_equal(aux.sample.x1, x1[j])
    assert sorted(j.tolist()) == list(range(8))  # a permutation


def test_cond_reaches_the_model_with_x1():
    x0, x1 = _batch(n=8, d=2)
    labels = jnp.arange(8)

    def apply_fn(params, t, x, cond):
        shift = cond.astype(x.dtype)[:, None]
        return x + shift, x - shift

    _, aux = sf2m_loss(apply_fn, None, KEY, x0, x1, cond=labels, path="sb", coupling=exact())
    np.testing.assert_array_equal(aux.cond, labels[aux.pairs[1]])
    np.testing.assert_allclose(aux.velocity - aux.sample.xt, jnp.broadcast_to(aux.cond[:, None], (8, 2)))


def test_two_networks_and_one_network_with_two_heads_agree():
    flow, score = MLP(dim=2, width=8, depth=1, seed=0), MLP(dim=2, width=8, depth=1, seed=1)
    (flow_fn, flow_params), (score_fn, score_params) = functional(flow), functional(score)
    apply_fn = two_networks(flow_fn, score_fn)
    params = {"flow": flow_params, "score": score_params}
    x0, x1 = _batch(n=8, d=2)
    _, aux = sf2m_loss(apply_fn, params, KEY, x0, x1, path=SchrodingerBridge(sigma=1.0))
    t, xt = aux.sample.t, aux.sample.xt
    np.testing.assert_allclose(aux.velocity, flow_fn(flow_params, t, xt), rtol=1e-6)
    np.testing.assert_allclose(aux.score, score_fn(score_params, t, xt), rtol=1e-6)

    def heads(params, t, x):  # the same two networks behind one apply_fn
        return flow_fn(params[0], t, x), score_fn(params[1], t, x)

    loss_two = sf2m_loss(apply_fn, params, KEY, x0, x1, path="sb")[0]
    loss_heads = sf2m_loss(heads, (flow_params, score_params), KEY, x0, x1, path="sb")[0]
    np.testing.assert_allclose(loss_two, loss_heads, rtol=1e-6)
    with pytest.raises(TypeError, match="'flow' and 'score'"):
        apply_fn((flow_params, score_params), t, xt)


def test_bad_arguments_name_what_is_wrong():
    x0, x1 = _batch(n=4, d=2)
    sb = SchrodingerBridge(sigma=1.0)
    with pytest.raises(ValueError, match="sf2m_loss needs a path with noise"):
        sf2m_loss(_constant_model, PARAMS, KEY, x0, x1, path=CondOT())
    with pytest.raises(ValueError, match="sf2m_loss needs a path with noise"):
        sf2m_loss(_constant_model, PARAMS, KEY, x0, x1, path=SchrodingerBridge(sigma=0.0))
    with pytest.raises(TypeError, match=r"apply_fn\(params, t, x\) must return a pair \(velocity, score\)"):
        sf2m_loss(lambda p, t, x: x, None, KEY, x0, x1, path=sb)
    with pytest.raises(TypeError, match="a tuple of 3 items"):
        sf2m_loss(lambda p, t, x: (x, x, x), None, KEY, x0, x1, path=sb)
    with pytest.raises(ValueError, match=r"apply_fn\(params, t, x\)\[1\] \(the score\) must return shape"):
        sf2m_loss(lambda p, t, x: (x, x[:, :1]), None, KEY, x0, x1, path=sb)
    with pytest.raises(TypeError, match=r"\[0\] \(the velocity\) must return a real floating-point array"):
        sf2m_loss(lambda p, t, x: (x.astype(jnp.int32), x), None, KEY, x0, x1, path=sb)
    with pytest.raises(ValueError, match="reduction must be one of"):
        sf2m_loss(_constant_model, PARAMS, KEY, x0, x1, path=sb, reduction="sum")
    with pytest.raises(TypeError, match="apply_fn must be callable as apply_fn"):
        sf2m_loss(lambda p, t: t, None, KEY, x0, x1, path=sb)
    with pytest.raises(TypeError, match="key must be one PRNG key"):
        sf2m_loss(_constant_model, PARAMS, 0, x0, x1, path=sb)
    with pytest.raises(TypeError, match="flow_fn must be callable"):
        two_networks(lambda p: p, _constant_model)


def test_cfm_loss_is_unchanged_by_the_shared_setup():
    """cfm_loss and sf2m_loss share their argument checks, coupling and times: on the same key they
    draw the same pairs, times and path sample, and cfm_loss's value is sf2m_loss's flow term."""
    x0, x1 = _batch()
    path = SchrodingerBridge(sigma=1.0)
    v_only = lambda params, t, x: jnp.broadcast_to(params["v"], x.shape)  # noqa: E731
    loss, aux = cfm_loss(v_only, PARAMS, KEY, x0, x1, path=path, coupling=exact())
    _, aux2 = sf2m_loss(_constant_model, PARAMS, KEY, x0, x1, path=path, coupling=exact())
    for got, want in zip(aux.sample, aux2.sample, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(loss, jnp.mean(aux2.flow_loss), rtol=1e-6)


# --- the drift and velocity of a two-headed model -----------------------------------------------


def test_sf2m_drift_and_velocity_read_the_two_heads():
    apply_fn = lambda params, t, x: (params["a"] * x + t[:, None], params["b"] * x)  # noqa: E731
    params = {"a": jnp.float32(2.0), "b": jnp.float32(-3.0)}
    x = jnp.ones((4, 2))
    drift = sf2m_drift(apply_fn, params, sigma=0.5)
    np.testing.assert_allclose(drift(0.25, x), 2.0 * x + 0.25 + 0.125 * (-3.0 * x), rtol=1e-6)
    np.testing.assert_allclose(sf2m_velocity(apply_fn, params)(0.25, x), 2.0 * x + 0.25, rtol=1e-6)
    # pytrees over the parameters: jit takes them as arguments, one compilation for new params
    assert isinstance(drift, SF2MDrift) and jax.tree.leaves(drift) == jax.tree.leaves(params)
    traced = jax.jit(lambda field, x: field(0.25, x))
    np.testing.assert_allclose(traced(drift, x), drift(0.25, x), rtol=1e-6)
    with pytest.raises(TypeError, match=r"must return a pair \(velocity, score\)"):
        sf2m_drift(lambda p, t, x: x, None, sigma=1.0)(0.5, x)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        sf2m_drift(apply_fn, params, sigma=-1.0)
    with pytest.raises(TypeError, match="apply_fn must be callable"):
        sf2m_velocity(lambda p, t: t, params)


# --- a tiny bridge between two Gaussians --------------------------------------------------------

TARGET_MEAN = np.array([2.0, -1.0])
TARGET_STD = np.array([0.5, 0.8])


# Training and sampling end to end (about 12 s on a 2-core CPU): `pytest -m slow tests/losses/test_sf2m.py`.
# By default tests/experiments/test_gaussian_sb.py trains the same [SF]²M (sf2m_loss, the SB coupling and
# path, two networks) and checks both its SDE and its flow head's ODE against the bridge's closed-form
# marginals.
@pytest.mark.slow
def test_trained_sf2m_samples_the_target_gaussian():
    """N(0, I) -> N((2, -1), diag(0.25, 0.64)) with sigma = 0.5 and the SB coupling (entropic OT at
    epsilon = 2 sigma^2): after a short training of two small networks, both the SDE (drift
    v + sigma^2/2 s, noise sigma) and the ODE of the flow head carry fresh source samples to the
    target's mean and covariance. Tolerances: 2000 samples give Monte-Carlo errors ~0.02 on the
    mean and covariance; the rest is the fit of 500 steps (errors ~0.04 seen)."""
    sigma = 0.5
    path, coupling = SchrodingerBridge(sigma=sigma), schrodinger_bridge(sigma)
    (flow_fn, flow_params), (score_fn, score_params) = (
        functional(MLP(dim=2, width=32, depth=2, seed=seed)) for seed in (0, 1)
    )
    apply_fn = two_networks(flow_fn, score_fn)
    params = {"flow": flow_params, "score": score_params}
    num_steps = 500
    optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, num_steps))

    @jax.jit
    def step(params, opt_state, key):
        k0, k1, k_loss = jax.random.split(key, 3)
        x0 = jax.random.normal(k0, (256, 2))
        x1 = TARGET_MEAN + TARGET_STD * jax.random.normal(k1, (256, 2))

        def loss_fn(params):
            return sf2m_loss(apply_fn, params, k_loss, x0, x1, path=path, coupling=coupling)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, aux["coupling_converged"]

    opt_state = optimizer.init(params)
    for key in jax.random.split(jax.random.key(0), num_steps):
        params, opt_state, converged = step(params, opt_state, key)
    assert bool(converged)

    x0 = jax.random.normal(jax.random.key(1), (2000, 2))
    sde = sample_sde(sf2m_drift(apply_fn, params, sigma), sigma, x0, key=jax.random.key(2), steps=100)
    ode = sample(sf2m_velocity(apply_fn, params), x0, solver="euler", steps=50)
    for x1 in (sde.x1, ode.x1):
        x1 = np.asarray(x1)
        np.testing.assert_allclose(x1.mean(axis=0), TARGET_MEAN, atol=0.1)
        np.testing.assert_allclose(np.cov(x1.T), np.diag(TARGET_STD**2), atol=0.1)
    assert int(sde.nfe) == 100 and int(sde.status) == 0


def test_public_names():
    for name in ("sf2m_loss", "SF2MAux", "two_networks", "sample_sde", "sf2m_drift", "sf2m_velocity"):
        assert name in fmjax.__all__ and getattr(fmjax, name).__doc__
    assert fmjax.sf2m_loss is sf2m_loss and fmjax.sample_sde is sample_sde


def test_two_networks_joins_conditional_networks():
    apply_fn = two_networks(lambda p, t, x, c: p * x + c[:, None], lambda p, t, x, c: -p * x - c[:, None])
    v, s = apply_fn({"flow": 2.0, "score": 3.0}, jnp.zeros(2), jnp.ones((2, 2)), jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(v, [[3.0, 3.0], [2.0, 2.0]])
    np.testing.assert_allclose(s, [[-4.0, -4.0], [-3.0, -3.0]])
    with pytest.raises(TypeError, match=r"flow_fn must be callable as flow_fn\(params, t, x\)"):
        two_networks(lambda p: p, lambda p, t, x: x)

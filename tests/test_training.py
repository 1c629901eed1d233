"""CFM loss, time samplers and the jitted training step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmjax.losses import cfm_loss
from fmjax.models import MLP, functional
from fmjax.paths import CondOT, Linear
from fmjax.training import TrainState, ema_update, logit_normal, make_train_step, uniform


def constant_model(params, t, x):
    return jnp.broadcast_to(params, x.shape)


def test_uniform_times_cover_the_unit_interval():
    t = uniform(jax.random.key(0), 100_000)
    assert t.shape == (100_000,) and t.dtype == jnp.float32
    assert float(t.min()) >= 0.0 and float(t.max()) < 1.0
    # mean 1/2 and variance 1/12 of U[0, 1), within 6 standard errors
    assert abs(float(t.mean()) - 0.5) < 6 * (1 / 12 / 1e5) ** 0.5
    assert abs(float(t.var()) - 1 / 12) < 6 * (1 / 180 / 1e5) ** 0.5


def test_logit_normal_times_are_sigmoid_of_a_normal():
    t = logit_normal(mean=0.5, std=0.8)(jax.random.key(1), 100_000)
    z = jnp.log(t) - jnp.log1p(-t)
    assert float(t.min()) > 0.0 and float(t.max()) < 1.0
    assert abs(float(z.mean()) - 0.5) < 6 * 0.8 / 1e5**0.5
    assert abs(float(z.std()) - 0.8) < 0.01
    with pytest.raises(ValueError, match="std must be > 0"):
        logit_normal(std=0.0)


def test_cfm_loss_closed_form():
    # A constant model v = theta against u_t = x1 - x0 (linear path, identity pairs): the loss is
    # mean((theta - (x1 - x0))^2) whatever t is.
    k0, k1 = jax.random.split(jax.random.key(2))
    x0 = jax.random.normal(k0, (64, 3))
    x1 = jax.random.normal(k1, (64, 3)) + 1.0
    theta = jnp.array([0.5, -1.0, 2.0])
    loss, aux = cfm_loss(constant_model, theta, jax.random.key(3), x0, x1, path=Linear())
    np.testing.assert_allclose(loss, jnp.mean((theta - (x1 - x0)) ** 2), rtol=1e-6)
    np.testing.assert_array_equal(aux.pairs[0], jnp.arange(64))
    np.testing.assert_allclose(aux.sample.ut, x1 - x0, rtol=1e-6)
    np.testing.assert_allclose(aux.velocity, jnp.broadcast_to(theta, x0.shape))
    t = aux.sample.t
    np.testing.assert_allclose(aux.sample.xt, (1 - t[:, None]) * x0 + t[:, None] * x1, rtol=1e-5, atol=1e-6)


def test_cfm_loss_gradient_is_closed_form():
    # d/dtheta mean((theta - u)^2) = 2 (theta - mean_batch(u)) / dim
    k0, k1 = jax.random.split(jax.random.key(4))
    x0, x1 = jax.random.normal(k0, (32, 2)), jax.random.normal(k1, (32, 2))
    theta = jnp.array([0.1, 0.2])
    grad = jax.grad(lambda p: cfm_loss(constant_model, p, jax.random.key(5), x0, x1, path=Linear())[0])(theta)
    np.testing.assert_allclose(grad, 2 * (theta - jnp.mean(x1 - x0, axis=0)) / 2, rtol=1e-5)


def test_cfm_loss_jit_matches_eager():
    apply_fn, params = functional(MLP(dim=2, width=16, depth=2, seed=0))
    k0, k1 = jax.random.split(jax.random.key(6))
    x0, x1 = jax.random.normal(k0, (32, 2)), jax.random.normal(k1, (32, 2))
    loss = lambda p, k: cfm_loss(apply_fn, p, k, x0, x1, path=CondOT(sigma_min=0.1))[0]
    np.testing.assert_allclose(
        loss(params, jax.random.key(7)), jax.jit(loss)(params, jax.random.key(7)), rtol=1e-6
    )


def _setup(ema_decay=0.9, donate=True, count=None):
    model_apply, params = functional(MLP(dim=2, width=16, depth=2, seed=0))

    def apply_fn(p, t, x):
        if count is not None:
            count.append(1)  # runs once per trace, never per call of the compiled step
        return model_apply(p, t, x)

    optimizer = optax.adam(1e-2)
    state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.key(8))
    step = make_train_step(
        apply_fn, optimizer, path=Linear(), ema_decay=ema_decay, donate=donate, log_grad_norm=True
    )
    return apply_fn, optimizer, state, step


def test_train_step_is_traced_once():
    traces = []
    _, _, state, step = _setup(count=traces)
    x0, x1 = jnp.zeros((32, 2)), jnp.ones((32, 2))
    for _ in range(4):
        state, _ = step(state, x0, x1)
    assert len(traces) == 1
    assert int(state.step) == 4


def test_train_step_matches_loss_optimizer_and_ema_by_hand():
    apply_fn, optimizer, state, step = _setup(ema_decay=0.9, donate=False)
    k0, k1 = jax.random.split(jax.random.key(9))
    x0, x1 = jax.random.normal(k0, (32, 2)), jax.random.normal(k1, (32, 2))
    new_state, metrics = step(state, x0, x1)

    key, loss_key = jax.random.split(state.key)
    loss_fn = lambda p: cfm_loss(apply_fn, p, loss_key, x0, x1, path=Linear())[0]

    @jax.jit  # the reference as one program (not each operation compiled on its own)
    def reference(state):
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, _ = optimizer.update(grads, state.opt_state, state.params)
        return loss, grads, optax.apply_updates(state.params, updates)

    loss, grads, params = reference(state)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], optax.global_norm(grads), rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), new_state.params, params
    )
    expected_ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state.params, params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        new_state.ema_params,
        expected_ema,
    )
    assert jnp.array_equal(jax.random.key_data(new_state.key), jax.random.key_data(key))


def test_ema_update_formula():
    np.testing.assert_allclose(ema_update({"w": jnp.array(2.0)}, {"w": jnp.array(4.0)}, 0.75)["w"], 2.5)


def test_training_fits_a_constant_velocity():
    # x1 = x0 + (3, -1) with identity pairs: u_t is constant and an MLP learns it to near-zero loss.
    apply_fn, params = functional(MLP(dim=2, width=32, depth=2, seed=1))
    optimizer = optax.adam(1e-2)
    state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.key(10))
    step = make_train_step(apply_fn, optimizer, path=Linear())
    key = jax.random.key(11)
    for _ in range(400):
        key, sub = jax.random.split(key)
        x0 = jax.random.normal(sub, (128, 2))
        state, metrics = step(state, x0, x0 + jnp.array([3.0, -1.0]))
    assert float(metrics["loss"]) < 1e-2


def test_make_train_step_rejects_bad_arguments():
    apply_fn, params = functional(MLP(dim=2, width=8, depth=1))
    with pytest.raises(ValueError, match="ema_decay must be < 1"):
        make_train_step(apply_fn, optax.adam(1e-3), path=Linear(), ema_decay=1.0)
    with pytest.raises(TypeError, match="path must be a path, not a path class: call it"):
        make_train_step(apply_fn, optax.adam(1e-3), path=Linear)
    with pytest.raises(ValueError, match="path must be one of"):
        make_train_step(apply_fn, optax.adam(1e-3), path="straight")
    with pytest.raises(TypeError, match="coupling must be an fmjax coupling"):
        make_train_step(apply_fn, optax.adam(1e-3), path=Linear(), coupling=lambda k, a, b: (a, b))


def test_half_precision_batches_are_upcast_in_the_step():
    # a bf16 batch trains as its float32 upcast does: the step casts it before the path maths
    apply_fn, params = functional(MLP(dim=2, width=16, depth=2, seed=0))
    optimizer = optax.adam(1e-2)
    x0 = jax.random.normal(jax.random.key(3), (64, 2)).astype(jnp.bfloat16)
    x1 = (x0.astype(jnp.float32) + 2.0).astype(jnp.bfloat16)
    results = []
    for a, b in ((x0, x1), (x0.astype(jnp.float32), x1.astype(jnp.float32))):
        state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.key(4))
        step = make_train_step(apply_fn, optimizer, path=Linear(), donate=False)
        state, metrics = step(state, a, b)
        results.append((float(metrics["loss"]), state))
    assert results[0][0] == results[1][0]
    assert results[0][1].params["out"]["kernel"].dtype == jnp.float32


def _sqrt_model(params, t, x):
    # value 0 but an infinite gradient at params = 0 (d sqrt(|p|) / dp); finite anywhere else
    return jnp.broadcast_to(jnp.sqrt(jnp.abs(params)), x.shape)


@pytest.mark.parametrize(
    ("apply_fn", "params", "optimizer", "x1", "expected"),
    [
        (constant_model, jnp.zeros(2), optax.sgd(1e-2), jnp.ones((16, 2)), 0),
        (constant_model, jnp.zeros(2), optax.sgd(1e-2), jnp.ones((16, 2)).at[3, 1].set(jnp.nan), 1 | 2 | 4),
        (_sqrt_model, jnp.zeros(2), optax.adam(1e-2), jnp.ones((16, 2)), 2 | 4),  # finite loss, inf gradient
        (constant_model, jnp.zeros(2), optax.sgd(1e38), jnp.full((16, 2), 3e3), 4),  # the update overflows
    ],
    ids=["finite", "nan-data", "inf-gradient", "overflowing-update"],
)
@pytest.mark.parametrize("skip", [False, True], ids=["check", "skip"])
def test_check_finite_reports_what_went_nonfinite(apply_fn, params, optimizer, x1, expected, skip):
    """Bits of metrics["nonfinite"]: 1 loss, 2 gradient norm, 4 the updated parameters or optimiser
    state. With skip_nonfinite a flagged step leaves params, optimiser state and EMA as they were."""
    state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.key(0))
    step = make_train_step(
        apply_fn, optimizer, path=Linear(), check_finite=not skip, skip_nonfinite=skip, donate=False
    )
    new, metrics = step(state, jnp.zeros((16, 2)), x1)
    assert int(metrics["nonfinite"]) == expected
    assert bool(jnp.isfinite(metrics["loss"])) == (expected & 1 == 0)
    assert int(new.step) == 1
    kept = (new.params, new.opt_state, new.ema_params), (state.params, state.opt_state, state.ema_params)
    if skip:
        assert int(metrics["skipped"]) == (expected != 0)
        if expected:  # the step left the state as it was
            for a, b in zip(*map(jax.tree.leaves, kept), strict=True):
                np.testing.assert_array_equal(a, b)
    else:
        assert "skipped" not in metrics
    finite = all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(kept[0]) if x.dtype != jnp.int32)
    assert finite == (skip or expected & 4 == 0)


def test_step_metrics_carry_the_coupling_status_and_names_build_the_same_step():
    """A coupling that reports a status (Sinkhorn) puts it in the step's metrics; names resolve through the
    registries to the factories' defaults, so the step computes the same loss as with the objects."""
    from fmjax.couplings import sinkhorn

    apply_fn = lambda params, t, x: params * x  # noqa: E731
    optimizer = optax.sgd(0.1)
    x0 = jax.random.normal(jax.random.key(1), (16, 2))
    x1 = x0 + 3.0

    def metrics_of(path, coupling):
        state = TrainState.create(params=jnp.float32(0.5), optimizer=optimizer, key=jax.random.key(0))
        step = make_train_step(apply_fn, optimizer, path=path, coupling=coupling, donate=False)
        return step(state, x0, x1)[1]

    by_object = metrics_of(Linear(), sinkhorn())
    by_name = metrics_of("linear", "sinkhorn")
    assert float(by_object["loss"]) == float(by_name["loss"])
    assert bool(by_object["coupling_converged"]) and float(by_object["coupling_error"]) < 1e-3
    # three Sinkhorn iterations do not reach the 1e-3 marginal threshold: reported, not hidden
    capped = metrics_of(Linear(), sinkhorn(max_iterations=3))
    assert not bool(capped["coupling_converged"]) and float(capped["coupling_error"]) > 1e-3
    independent = metrics_of(Linear(), "independent")
    assert bool(independent["coupling_converged"]) and float(independent["coupling_error"]) == 0.0

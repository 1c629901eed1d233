"""Mixed precision: bfloat16 activations, float32 parameters; half-precision batches in check_batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmjax._checks import check_batch, check_pair
from fmjax.models import MLP, UNet, functional, mixed_precision

# bfloat16 rounds to 8 significant bits (relative error u = 2^-9 ~ 0.002 per rounding). A forward pass
# of the 3-hidden-layer MLP rounds the inputs, every weight and every layer's output: a few dozen
# roundings that mostly cancel leave the output about 1% off the float32 model's (measured 1.0-1.2% in
# norm over seeds), so 3% in norm bounds it with margin. The gradient goes through bf16 activations
# forward and backward: about twice that (measured 2.0-2.1%), bounded by 5%.
OUTPUT_RTOL = 0.03
GRAD_RTOL = 0.05


def _relative_error(got, expected):
    got = jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(got)])
    expected = jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(expected)])
    return float(jnp.linalg.norm(got - expected) / jnp.linalg.norm(expected))


def _mlp_problem(seed):
    apply_fn, params = functional(MLP(dim=2, width=64, depth=3, seed=seed))
    k_x, k_t, k_target = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k_x, (256, 2))
    t = jax.random.uniform(k_t, (256,))
    return apply_fn, params, t, x, jax.random.normal(k_target, x.shape)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_mlp_is_float32_and_close_to_the_float32_model(seed, jit):
    apply_fn, params, t, x, _ = _mlp_problem(seed)
    mixed = mixed_precision(apply_fn)
    v = apply_fn(params, t, x)
    v16 = (jax.jit(mixed) if jit else mixed)(params, t, x)
    assert v16.dtype == jnp.float32 and v16.shape == x.shape
    error = _relative_error(v16, v)
    assert 1e-4 < error < OUTPUT_RTOL  # above 0: the model really ran in bfloat16


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_gradients_are_float32_and_close(seed):
    apply_fn, params, t, x, target = _mlp_problem(seed)

    def loss(fn):
        return lambda p: jnp.mean((fn(p, t, x) - target) ** 2)

    grads = jax.grad(loss(apply_fn))(params)
    grads16 = jax.jit(jax.grad(loss(mixed_precision(apply_fn))))(params)
    assert jax.tree.structure(grads16) == jax.tree.structure(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
    assert _relative_error(grads16, grads) < GRAD_RTOL


def test_what_is_cast_and_what_is_passed_through():
    seen = {}

    def probe(params, t, x, cond):
        seen.update(params=params, t=t, x=x, cond=cond)
        return x * params["scale"]

    params = {"scale": jnp.float32(2.0), "count": jnp.int32(3)}
    cond = jnp.arange(4)
    v = mixed_precision(probe)(params, 0.5, jnp.ones((4, 2)), cond)
    assert seen["params"]["scale"].dtype == jnp.bfloat16 and seen["params"]["count"].dtype == jnp.int32
    assert seen["t"].dtype == jnp.bfloat16 and seen["x"].dtype == jnp.bfloat16
    assert seen["cond"] is cond
    assert v.dtype == jnp.float32
    np.testing.assert_array_equal(v, 2.0)
    assert mixed_precision(probe, jnp.float16)(params, 0.5, jnp.ones((4, 2)), cond).dtype == jnp.float32
    assert seen["x"].dtype == jnp.float16
    with pytest.raises(TypeError, match="compute_dtype must be a floating dtype"):
        mixed_precision(probe, jnp.int8)
    with pytest.raises(TypeError, match="compute_dtype must be a floating dtype"):
        mixed_precision(probe, "half-ish")


# the smallest UNet of tests/models/test_unet.py, one level: its initialisers are compiled once a session
UNET = {"channels": 4, "channel_mults": (1,), "groups": 2}


def test_bf16_unet_is_close_to_the_float32_model():
    apply_fn, params = functional(UNet(**UNET))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    t = jnp.array([0.0, 0.25, 0.5, 0.75])  # exact in bfloat16: only the arithmetic is compared
    v16 = jax.jit(mixed_precision(apply_fn))(params, t, x)
    assert v16.dtype == jnp.float32
    # GroupNorm statistics are computed in float32 by flax; measured 1.0-1.1% in norm (seeds 0-2)
    assert 1e-4 < _relative_error(v16, jax.jit(apply_fn)(params, t, x)) < OUTPUT_RTOL


def test_training_keeps_float32_parameters_and_optimiser_state():
    from fmjax.paths import Linear
    from fmjax.training import TrainState, make_train_step

    apply_fn, params = functional(MLP(dim=2, width=32, depth=2, seed=0))
    optimizer = optax.adam(1e-2)
    state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.key(0))
    step = make_train_step(mixed_precision(apply_fn), optimizer, path=Linear(), donate=False)
    x0 = jax.random.normal(jax.random.key(1), (128, 2))
    x1 = x0 + 3.0  # a constant velocity field: learnable in a few steps
    losses = []
    for _ in range(40):
        state, metrics = step(state, x0, x1)
        losses.append(float(metrics["loss"]))
    floating = [
        leaf
        for leaf in jax.tree.leaves((state.params, state.opt_state))
        if jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    assert floating and all(leaf.dtype == jnp.float32 for leaf in floating)
    assert losses[-1] < 0.1 * losses[0]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64])
def test_check_batch_accepts_half_precision_when_asked(dtype):
    x = np.zeros((8, 2), dtype)
    check_batch("x0", x, half_precision=True)
    check_pair(x, x, half_precision=True)
    if dtype in (jnp.bfloat16, jnp.float16):
        # the default stays float32/float64: paths, sampling and likelihoods compute in the batch's dtype
        with pytest.raises(
            TypeError, match=f"x0 must be a float32 or float64 array; got dtype {jnp.dtype(dtype)}"
        ):
            check_batch("x0", x)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
def test_check_batch_refuses_integer_batches_naming_the_argument(dtype):
    x = np.zeros((8, 2), dtype)
    with pytest.raises(TypeError) as info:
        check_batch("x1", x, half_precision=True)
    message = str(info.value)
    assert message.startswith("x1 must be a float32, float64, bfloat16 or float16 array")
    assert f"got dtype {jnp.dtype(dtype)}" in message and "x1.astype(jnp.float32)" in message
    with pytest.raises(TypeError, match="x1 must be a float32 or float64 array"):
        check_batch("x1", x)
    with pytest.raises(TypeError, match="x0 must be a float32, float64, bfloat16 or float16 array"):
        check_pair(x, np.zeros((8, 2), jnp.bfloat16), half_precision=True)


def test_mixed_precision_keeps_the_models_dropout():
    apply_fn, params = functional(UNet(**UNET, dropout=0.5))
    mixed = mixed_precision(apply_fn)
    assert mixed.takes_dropout_key is True
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t = jnp.array([0.25, 0.5])
    deterministic = mixed(params, t, x)
    a = mixed(params, t, x, dropout_key=jax.random.key(0))
    b = mixed(params, t, x, dropout_key=jax.random.key(0))
    c = mixed(params, t, x, dropout_key=jax.random.key(1))
    assert a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, deterministic)
    # the key reaches the wrapped model: bf16 of the float32 model under the same key (measured 1.0%)
    full = apply_fn(params, t, x, dropout_key=jax.random.key(0))
    assert _relative_error(a, full) < OUTPUT_RTOL
    assert functional(MLP(dim=2, width=8, depth=1))[0].takes_dropout_key is False
    assert mixed_precision(functional(MLP(dim=2, width=8, depth=1))[0]).takes_dropout_key is False

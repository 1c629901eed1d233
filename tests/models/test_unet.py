"""The UNet's self-attention (ADM's AttentionBlock) and dropout, and the dropout key of the training step."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _host_devices import run_json
from flax import nnx

from fmjax.losses import cfm_loss
from fmjax.models import MLP, UNet, functional
from fmjax.models.unet import _AttentionBlock, _dropout, _ResBlock
from fmjax.paths import Linear
from fmjax.training import TrainState, make_train_step


def _randomise(module: nnx.Module, seed: int, scale: float = 0.5) -> None:
    """Give every parameter of ``module`` random N(0, scale^2) values (the output projection starts at 0)."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(
        module,
        jax.tree.unflatten(
            treedef, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
        ),
    )


def _group_norm_reference(x, scale, bias, groups, eps):
    """GroupNorm in float64: per sample and group, normalise over H, W and the group's channels."""
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * scale + bias


def _attention_reference(x, params, num_heads, groups, eps):
    """ADM's attention block written out in NumPy float64, head by head."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape
    d = c // num_heads
    xn = _group_norm_reference(x, p["norm"]["scale"], p["norm"]["bias"], groups, eps).reshape(b, h * w, c)
    qkv = xn @ p["qkv"]["kernel"] + p["qkv"]["bias"]  # [b, n, 3c]: q, k, v blocks of c channels
    q, k, v = qkv[..., :c], qkv[..., c : 2 * c], qkv[..., 2 * c :]
    heads = []
    for i in range(num_heads):
        qi, ki, vi = (a[..., i * d : (i + 1) * d] for a in (q, k, v))
        scores = np.einsum("bnd,bmd->bnm", qi, ki) / np.sqrt(d)
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        heads.append(np.einsum("bnm,bmd->bnd", weights, vi))
    a = np.concatenate(heads, axis=-1)
    return x + (a @ p["proj"]["kernel"] + p["proj"]["bias"]).reshape(b, h, w, c)


def test_attention_block_matches_multi_head_attention_written_out():
    block = _AttentionBlock(8, 2, 2, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 4, 8))
    # ADM's zero-initialised output projection: a fresh block is the identity
    np.testing.assert_array_equal(block(x), x)
    _randomise(block, seed=2)
    params = nnx.to_pure_dict(nnx.state(block, nnx.Param))
    expected = _attention_reference(x, params, num_heads=2, groups=2, eps=block.norm.epsilon)
    # float32 against float64, values O(1): a few ulps of float32 through two matmuls and a softmax
    np.testing.assert_allclose(block(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(lambda x: block(x))(x), expected, rtol=1e-5, atol=1e-5)
    # the heads are separate: one head of 8 channels is another function
    one_head = _AttentionBlock(8, 1, 2, nnx.Rngs(0))
    nnx.update(one_head, nnx.state(block, nnx.Param))
    assert not np.allclose(one_head(x), block(x), atol=1e-3)
    np.testing.assert_allclose(
        one_head(x),
        _attention_reference(x, params, num_heads=1, groups=2, eps=block.norm.epsilon),
        rtol=1e-5,
        atol=1e-5,
    )


def test_attention_is_permutation_equivariant_over_positions():
    # the block and input shapes of the test above: its eagerly compiled operations are reused
    block = _AttentionBlock(8, 2, 2, nnx.Rngs(3))
    _randomise(block, seed=4)
    x = jax.random.normal(jax.random.key(5), (2, 3, 4, 8))
    perm = jax.random.permutation(jax.random.key(6), 12)

    def permute(y):
        return y.reshape(2, 12, 8)[:, perm].reshape(2, 3, 4, 8)

    # GroupNorm statistics and the softmax sums are over all positions: only summation order changes
    np.testing.assert_allclose(block(permute(x)), permute(block(x)), rtol=1e-5, atol=1e-5)
    # and each output position depends on every input position (it is not a per-position map)
    jac = jax.jit(jax.jacobian(lambda y: block(y)[0, 0, 0, 0]))(x)
    assert np.all(np.abs(np.asarray(jac[0])).sum(axis=-1) > 0)


def test_dropout_zeroes_the_expected_fraction_and_preserves_the_mean():
    rate, n = 0.3, 200_000
    h = jnp.full((n,), 2.0)
    out = np.asarray(_dropout(jax.random.key(0), h, rate))
    dropped = out == 0
    # Bernoulli(rate) per unit: the fraction dropped has standard deviation sqrt(rate (1 - rate) / n) ~ 1e-3
    assert abs(dropped.mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
    # the kept units are scaled by 1 / (1 - rate) (inverted dropout), so E[out] = h
    np.testing.assert_allclose(out[~dropped], 2.0 / (1 - rate), rtol=1e-6)
    # mean of out / 2: kept fraction / (1 - rate), standard deviation sqrt(rate / ((1 - rate) n)) ~ 1.5e-3
    assert abs(out.mean() / 2.0 - 1.0) < 5 * np.sqrt(rate / ((1 - rate) * n))
    # same key, same mask; another key, another mask
    np.testing.assert_array_equal(_dropout(jax.random.key(0), h, rate), out)
    assert not np.array_equal(_dropout(jax.random.key(1), h, rate), out)


def test_res_block_drops_between_the_second_norm_and_the_second_conv():
    # the shapes of the 4 -> 8 channel block of the UNets below (time embedding of 4 x 4 features)
    block = _ResBlock(4, 8, 16, 2, nnx.Rngs(0), dropout=0.5)
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 4))
    emb = jax.random.normal(jax.random.key(2), (2, 16))
    key = jax.random.key(3)
    h = block.conv1(jax.nn.silu(block.norm1(x))) + block.emb(jax.nn.silu(emb))[:, None, None, :]
    h = jax.nn.silu(block.norm2(h))
    keep = jax.random.bernoulli(key, 0.5, h.shape)
    expected = block.conv2(jnp.where(keep, 2.0 * h, 0.0)) + block.skip(x)
    np.testing.assert_allclose(block(x, emb, key), expected, rtol=1e-6, atol=1e-6)
    # without a key, the block of a model without dropout
    np.testing.assert_array_equal(block(x, emb), block.conv2(h) + block.skip(x))


# one small shape for all UNets of this file: XLA compiles each initialiser and layer shape once per process
SMALL = {"in_channels": 1, "channels": 4, "channel_mults": (1, 2), "groups": 2}


def test_unet_dropout_acts_only_with_a_key():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t = jnp.array([0.2, 0.8])
    plain_fn, plain = functional(UNet(**SMALL, seed=1))
    apply_fn, params = functional(UNet(**SMALL, dropout=0.3, seed=1))
    assert apply_fn.takes_dropout_key and not plain_fn.takes_dropout_key
    # dropout has no parameters: same seed, same parameters
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    reference = jax.jit(plain_fn)(params, t, x)
    # deterministic apply (sampling, likelihood, evaluation): exactly the model without dropout
    np.testing.assert_array_equal(jax.jit(apply_fn)(params, t, x), reference)
    # rate 0: a key changes nothing
    np.testing.assert_array_equal(jax.jit(plain_fn)(params, t, x, dropout_key=jax.random.key(7)), reference)
    train_fn = jax.jit(lambda params, key: apply_fn(params, t, x, dropout_key=key))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    out1 = train_fn(params, k1)
    np.testing.assert_array_equal(train_fn(params, k1), out1)
    assert not np.allclose(out1, reference, atol=1e-3)
    assert not np.allclose(train_fn(params, k2), out1, atol=1e-3)


def test_attention_sits_at_the_listed_resolutions_with_the_heads_asked_for():
    def build(**kwargs):  # the structure alone, without computing initial values
        return nnx.eval_shape(lambda: UNet(**{**SMALL, "channels": 8, **kwargs}))

    # 8x8 images, three levels of sides 8, 4, 2: attention at 4 is the second level
    model = build(channel_mults=(1, 2, 2), image_size=8, attention_resolutions=(4,), num_heads=2)
    assert [a is not None for a in model.down_attention] == [False, True, False]
    # up path: levels 2, 1, 0 with num_res_blocks + 1 = 2 blocks each
    assert [a is not None for a in model.up_attention] == [False, False, True, True, False, False]
    assert model.middle_attention.num_heads == 2 and model.down_attention[1].num_heads == 2
    assert model.down_attention[1].qkv.kernel.shape == (16, 48)
    # num_head_channels fixes the head width instead (ADM): 8 channels in heads of 4, 16 in heads of 4
    model = build(image_size=8, attention_resolutions=(4, 8), num_head_channels=4)
    assert [a.num_heads for a in model.down_attention] == [2, 4]
    assert [a.num_heads for a in model.up_attention] == [4, 4, 2, 2]
    assert model.middle_attention.num_heads == 4


def test_unet_with_attention_runs_through_its_attention_blocks():
    apply_fn, params = functional(
        UNet(**SMALL, image_size=8, attention_resolutions=(4,), num_head_channels=4, dropout=0.1)
    )
    assert {"down_attention", "middle_attention", "up_attention"} <= set(params)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t = jnp.array([0.1, 0.6])
    loss = jax.jit(
        jax.value_and_grad(lambda p: jnp.sum(apply_fn(p, t, x, dropout_key=jax.random.key(1)) ** 2))
    )
    value, grads = loss(params)
    assert np.isfinite(float(value))
    # the attention blocks are on the computation: their (zero-initialised) output projections get gradients
    assert float(jnp.abs(grads["middle_attention"]["proj"]["kernel"]).sum()) > 0
    assert float(jnp.abs(grads["down_attention"][1]["proj"]["kernel"]).sum()) > 0
    assert float(jnp.abs(grads["up_attention"][0]["proj"]["kernel"]).sum()) > 0
    # with non-zero output projections the attention changes the velocity
    nudged = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    out = jax.jit(apply_fn)(nudged, t, x)
    assert out.shape == x.shape and not np.allclose(out, jax.jit(apply_fn)(params, t, x), atol=1e-4)


# Computed with fmjax at the commit before attention and dropout (2127a54): a default UNet's parameter
# tree (leaf paths and shapes, hashed), size, sum of squares and outputs on a fixed input.
DEFAULT_REFERENCES = [
    (
        {**SMALL, "seed": 3},
        "520fb4962cd2a682",
        10405,
        372.09868094429163,
        (28.646786788478494, 44.654323587194085),
        [-0.35580453276634216, 0.5949559211730957],
    ),
    (
        {**SMALL, "num_classes": 3, "seed": 1},
        "71040d0b536b0096",
        10469,
        371.6324332608232,
        (-25.476555828005075, 60.182886231690645),
        [-0.16155222058296204, -0.27334949374198914],
    ),
]


@pytest.mark.parametrize(("kwargs", "tree_hash", "size", "sum_squares", "sums", "first"), DEFAULT_REFERENCES)
def test_default_unet_is_unchanged(kwargs, tree_hash, size, sum_squares, sums, first):
    apply_fn, params = functional(UNet(**kwargs))
    leaves = jax.tree_util.tree_leaves_with_path(params)
    text = "\n".join(f"{jax.tree_util.keystr(p)}:{tuple(x.shape)}" for p, x in leaves)
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == tree_hash
    assert sum(x.size for _, x in leaves) == size
    # float32 initial values summed in float64: equal up to the summation order's rounding
    assert sum(np.sum(np.asarray(x, np.float64) ** 2) for _, x in leaves) == pytest.approx(
        sum_squares, rel=1e-12
    )
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t = jnp.array([0.25, 0.75])
    if "num_classes" in kwargs:
        out = jax.jit(apply_fn)(params, t, x, jnp.array([0, 3]))
    else:
        out = jax.jit(apply_fn)(params, t, x)
    out = np.asarray(out, np.float64)
    # float32 convolutions: other CPUs' XLA kernels may round differently in the last bits
    np.testing.assert_allclose([out.sum(), np.abs(out).sum()], sums, rtol=1e-5)
    np.testing.assert_allclose(out[0, :2, 0, 0], first, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"attention_resolutions": (4,)}, ValueError, "attention_resolutions=.*needs image_size"),
        (
            {"image_size": 8, "attention_resolutions": (2,)},
            ValueError,
            r"attention_resolutions\[0\]=2 is not .* \[8, 4\]",
        ),
        ({"image_size": 8, "attention_resolutions": "4"}, TypeError, "attention_resolutions must be a tuple"),
        ({"image_size": 7, "attention_resolutions": (7,)}, ValueError, "image_size=7 must be divisible by 2"),
        (
            {"image_size": 8, "attention_resolutions": (4,), "num_heads": 3},
            ValueError,
            "num_heads=3 must divide .* resolution 4 has 8",
        ),
        (
            {"image_size": 8, "attention_resolutions": (8,), "num_head_channels": 8},
            ValueError,
            "num_head_channels=8 must divide .* resolution 8 has 4",
        ),
        ({"num_heads": 0}, ValueError, "num_heads must be >= 1"),
        ({"dropout": 1.0}, ValueError, r"dropout must be < 1.0"),
        ({"dropout": -0.1}, ValueError, r"dropout must be >= 0.0"),
    ],
)
def test_bad_attention_and_dropout_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        UNet(**{**SMALL, **kwargs})


def test_bad_calls_are_named():
    model = UNet(**SMALL, image_size=8, attention_resolutions=(4,), num_heads=2, dropout=0.1)
    with pytest.raises(ValueError, match="built for image_size=8.*got images of 16x16"):
        model(jnp.zeros(1), jnp.zeros((1, 16, 16, 1)))
    with pytest.raises(TypeError, match="dropout_key must be one PRNG key"):
        model(jnp.zeros(1), jnp.zeros((1, 8, 8, 1)), dropout_key=3)
    apply_fn, params = functional(MLP(dim=2, width=4, depth=1))
    assert not apply_fn.takes_dropout_key
    with pytest.raises(TypeError, match="dropout_key is for a model with dropout.*MLP has none"):
        apply_fn(params, jnp.zeros(1), jnp.zeros((1, 2)), dropout_key=jax.random.key(0))
    with pytest.raises(TypeError, match="model_dropout=True .* takes no keyword dropout_key"):
        make_train_step(lambda params, t, x: x, optax.sgd(0.1), path=Linear(), model_dropout=True)


def _train_setup(dropout):
    apply_fn, params = functional(
        UNet(in_channels=1, channels=4, channel_mults=(1,), groups=2, dropout=dropout)
    )
    optimizer = optax.sgd(1e-2)
    state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.key(0))
    x1 = jax.random.normal(jax.random.key(1), (4, 4, 4, 1))
    return apply_fn, optimizer, state, jnp.zeros_like(x1), x1


def _assert_states_equal(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        u, v = (
            jax.random.key_data(w) if jax.dtypes.issubdtype(w.dtype, jax.dtypes.prng_key) else w
            for w in (u, v)
        )
        np.testing.assert_array_equal(u, v)


def test_train_step_with_dropout_is_reproducible_and_draws_a_key_per_step():
    apply_fn, optimizer, state, x0, x1 = _train_setup(dropout=0.5)
    step = make_train_step(apply_fn, optimizer, path=Linear(), donate=False)
    new, metrics = step(state, x0, x1)
    again, metrics_again = step(state, x0, x1)
    _assert_states_equal(new, again)
    assert float(metrics["loss"]) == float(metrics_again["loss"])
    # the key is split in three: next state key, the loss's key (times, path noise), the dropout key
    key, loss_key, dropout_key = jax.random.split(state.key, 3)
    _assert_states_equal(new.key, key)
    # the step's loss is cfm_loss of the model called with that dropout key, not of the deterministic model
    # (jitted: one program each instead of the UNet's operations compiled one by one)
    expected, _ = jax.jit(
        lambda params, key: cfm_loss(
            lambda p, t, x: apply_fn(p, t, x, dropout_key=dropout_key), params, key, x0, x1, path=Linear()
        )
    )(state.params, loss_key)
    np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-6)
    deterministic, _ = jax.jit(lambda params, key: cfm_loss(apply_fn, params, key, x0, x1, path=Linear()))(
        state.params, loss_key
    )
    assert abs(float(deterministic) - float(expected)) > 1e-4 * float(expected)
    # a one-device mesh runs the sharded step: the same update
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharded = make_train_step(apply_fn, optimizer, path=Linear(), donate=False, mesh=mesh)
    new_sharded, _ = sharded(state, x0, x1)
    for u, v in zip(jax.tree.leaves(new.params), jax.tree.leaves(new_sharded.params), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)


def test_train_step_without_dropout_keeps_its_random_stream():
    apply_fn, optimizer, state, x0, x1 = _train_setup(dropout=0.0)
    assert not apply_fn.takes_dropout_key
    new, metrics = make_train_step(apply_fn, optimizer, path=Linear(), donate=False)(state, x0, x1)
    # the step of a model without dropout: two-way split, the loss of the deterministic model
    key, loss_key = jax.random.split(state.key)
    _assert_states_equal(new.key, key)
    expected, _ = jax.jit(lambda params, key: cfm_loss(apply_fn, params, key, x0, x1, path=Linear()))(
        state.params, loss_key
    )
    assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-6)
    # model_dropout=False is the same step
    forced, _ = make_train_step(apply_fn, optimizer, path=Linear(), donate=False, model_dropout=False)(
        state, x0, x1
    )
    _assert_states_equal(new, forced)


SHARDED_SCRIPT = """
import json
import jax, jax.numpy as jnp, numpy as np, optax
from fmjax.models import UNet, functional
from fmjax.paths import Linear
from fmjax.training import TrainState, make_train_step

apply_fn, params = functional(UNet(in_channels=1, channels=4, channel_mults=(1, 2), groups=2, dropout=0.5))
optimizer = optax.sgd(1e-2)
state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.key(0))
x1 = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
x0 = jnp.zeros_like(x1)
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
one, m1 = make_train_step(apply_fn, optimizer, path=Linear(), donate=False)(state, x0, x1)
two, m2 = make_train_step(apply_fn, optimizer, path=Linear(), donate=False, mesh=mesh)(state, x0, x1)
leaves = zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params))
diff = max(float(jnp.abs(a - b).max()) for a, b in leaves)
loss = [float(m1["loss"]), float(m2["loss"])]
print(json.dumps({"devices": len(jax.devices()), "loss": loss, "diff": diff}))
"""


# a subprocess with two host devices: about 40 s of CPU, mostly the UNet's initialisation and two compiles
@pytest.mark.slow
def test_sharded_step_draws_the_dropout_masks_of_the_single_device_step():
    result = run_json("-c", SHARDED_SCRIPT, devices=2)
    assert result["devices"] == 2
    # the masks are a function of the key and the global shape, however the batch is sharded: the
    # same loss and update up to the order of the cross-device gradient sum
    assert result["loss"][0] == pytest.approx(result["loss"][1], rel=1e-6)
    assert result["diff"] < 1e-6

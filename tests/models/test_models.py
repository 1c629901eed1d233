"""The MLP velocity field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.models import MLP, functional


def test_mlp_matches_its_definition():
    model = MLP(dim=2, width=5, depth=2, activation="tanh", seed=0)
    apply_fn, params = functional(model)
    t = jnp.array([0.1, 0.9])
    x = jnp.array([[1.0, 2.0], [-1.0, 0.5]])
    h = jnp.concatenate([x, t[:, None]], axis=-1)
    for layer in (params["hidden"][0], params["hidden"][1]):
        h = jnp.tanh(h @ layer["kernel"] + layer["bias"])
    expected = h @ params["out"]["kernel"] + params["out"]["bias"]
    np.testing.assert_allclose(apply_fn(params, t, x), expected, rtol=1e-6)
    np.testing.assert_allclose(model(t, x), expected, rtol=1e-6)


def test_mlp_on_image_shaped_input_and_parameter_count():
    apply_fn, params = functional(MLP(dim=12, width=7, depth=3))
    x = jnp.ones((4, 3, 2, 2))
    assert apply_fn(params, jnp.zeros(4), x).shape == (4, 3, 2, 2)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    assert n_params == (13 * 7 + 7) + 2 * (7 * 7 + 7) + (7 * 12 + 12)


def test_scalar_time_broadcasts():
    apply_fn, params = functional(MLP(dim=2, width=4, depth=1))
    x = jnp.ones((3, 2))
    np.testing.assert_allclose(apply_fn(params, 0.5, x), apply_fn(params, jnp.full(3, 0.5), x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation must be one of"):
        MLP(dim=2, activation="swish2")
    with pytest.raises(ValueError, match="depth must be >= 1"):
        MLP(dim=2, depth=0)
    with pytest.raises(TypeError, match="width must be an int"):
        MLP(dim=2, width=6.5)
    apply_fn, params = functional(MLP(dim=2))
    with pytest.raises(ValueError, match="3 data dimensions per sample, the MLP 2"):
        apply_fn(params, jnp.zeros(1), jnp.zeros((1, 3)))


# The UNets below have tests/models/test_unet.py's smallest widths (4 channels, GroupNorm over 2 groups):
# building a UNet compiles an initialiser per parameter shape, and shared shapes are compiled once in a
# session (the compilation cache of tests/conftest.py holds them for every worker).
UNET = {"channels": 4, "groups": 2}


@pytest.mark.parametrize(
    ("shape", "mults"), [((2, 8, 8, 1), (1, 2)), ((2, 28, 28, 1), (1, 2, 2)), ((1, 8, 8, 3), (1,))]
)
def test_unet_keeps_the_image_shape_and_depends_on_time(shape, mults):
    from fmjax.models import UNet

    apply_fn, params = functional(UNet(in_channels=shape[-1], channel_mults=mults, **UNET))
    x = jax.random.normal(jax.random.key(0), shape)
    apply_jit = jax.jit(apply_fn)
    out = apply_jit(params, jnp.zeros(shape[0]), x)
    assert out.shape == shape and bool(jnp.all(jnp.isfinite(out)))
    assert not np.allclose(out, apply_jit(params, jnp.full(shape[0], 0.7), x))


def test_unet_is_per_sample_and_trains():
    import optax

    from fmjax.models import UNet
    from fmjax.paths import CondOT
    from fmjax.training import TrainState, make_train_step

    apply_fn, params = functional(UNet(channel_mults=(1, 2), **UNET))
    # batch 2 of 8x8 images: the program of the first case of the test above
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t = jnp.array([0.1, 0.2])
    # no batch statistics: a sample's output does not depend on the others (needed by the likelihood)
    np.testing.assert_allclose(
        jax.jit(apply_fn)(params, t, x)[:1], jax.jit(apply_fn)(params, t[:1], x[:1]), rtol=1e-5, atol=1e-5
    )
    # at 4 channels Adam at 1e-3 halves the loss only just in 30 steps (0.44 of the first, measured);
    # at 3e-3 the last five steps' losses are 0.20-0.28 of the first, the margin 8 channels had at 1e-3
    optimizer = optax.adam(3e-3)
    state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.key(2))
    step = make_train_step(apply_fn, optimizer, path=CondOT(sigma_min=1e-4))
    losses = []
    for _ in range(30):
        state, metrics = step(
            state, jax.random.normal(jax.random.key(3), (8, 8, 8, 1)), jnp.ones((8, 8, 8, 1))
        )
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]


def test_unet_rejects_bad_shapes():
    from fmjax.models import UNet

    apply_fn, params = functional(UNet(channel_mults=(1, 2, 2), **UNET))
    with pytest.raises(ValueError, match="image size 10x10 must be divisible by 4"):
        apply_fn(params, jnp.zeros(1), jnp.zeros((1, 10, 10, 1)))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, H, W, C\]"):
        apply_fn(params, jnp.zeros(1), jnp.zeros((1, 8, 8)))
    with pytest.raises(ValueError, match="channel_mults must be a non-empty tuple"):
        UNet(channel_mults=())

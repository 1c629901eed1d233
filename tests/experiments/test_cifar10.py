"""experiments/cifar10.py: the recipe's values against TorchCFM's train_cifar10.py, its optimiser (warm-up
and clipping), the augmentation, and a few steps at a tiny width on tfds's mock CIFAR-10, resumed."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from experiments import cifar10
from fmjax.data.tfds_sources import data_source


def test_recipe_is_torchcfms():
    r = cifar10.RECIPE
    # TorchCFM examples/images/cifar10/train_cifar10.py: UNetModelWrapper(num_res_blocks=2,
    # num_channels=128, channel_mult=[1, 2, 2, 2], num_heads=4, num_head_channels=64,
    # attention_resolutions="16", dropout=0.1), lr 2e-4, grad_clip 1.0, total_steps 400001,
    # warmup 5000, batch_size 128, ema_decay 0.9999, torch.optim.Adam defaults, sigma = 0.0, otcfm;
    # GroupNorm32(32, channels) in guided-diffusion's normalization()
    assert (r.channels, r.channel_mults, r.num_res_blocks, r.groups) == (128, (1, 2, 2, 2), 2, 32)
    assert (r.attention_resolutions, r.num_heads, r.num_head_channels, r.dropout) == ((16,), 4, 64, 0.1)
    assert (r.learning_rate, r.batch_size, r.steps, r.ema_decay) == (2e-4, 128, 400_000, 0.9999)
    assert (r.warmup_steps, r.grad_clip) == (5_000, 1.0)
    assert (r.adam_b1, r.adam_b2, r.adam_eps) == (0.9, 0.999, 1e-8)
    assert (r.sigma, r.coupling, r.horizontal_flip, r.save_every) == (0.0, "exact", True, 20_000)
    # fmjax's UNet now has all of it (recipe.json still records what it would lack)
    assert cifar10.NOT_IN_FMJAX == {}


def test_recipe_model_has_attention_at_16x16_and_dropout_everywhere():
    # the full-size model's structure, without computing its 36M initial values
    model = nnx.eval_shape(lambda: cifar10.make_model(cifar10.RECIPE))
    # levels of sides 32, 16, 8, 4 with 2 residual blocks each down, 3 up: attention at side 16 only
    assert [a is not None for a in model.down_attention] == [False, False, True, True] + [False] * 4
    up = [a is not None for a in model.up_attention]
    assert up == [False] * 6 + [True] * 3 + [False] * 3
    # ADM's middle block: res, attention, res; heads of 64 channels at 256 channels: 4 heads
    attention = [model.middle_attention, *(a for a in [*model.down_attention, *model.up_attention] if a)]
    assert {(a.num_heads, a.qkv.kernel.shape) for a in attention} == {(4, (256, 768))}
    blocks = [*model.down, *model.middle, *model.up]
    assert len(blocks) == 8 + 2 + 12 and {b.dropout for b in blocks} == {0.1}
    assert model.down[0].norm1.num_groups == 32
    # the 35.7M parameters of Ho et al.'s DDPM CIFAR-10 UNet, the architecture of TorchCFM's config
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == 35_746_307


def test_warm_up_schedule():
    lr = cifar10.learning_rate(cifar10.RECIPE)
    # LambdaLR(min(step, 5000) / 5000): the first update uses 0, then linear up to 2e-4, then constant
    for step, value in [(0, 0.0), (1, 2e-4 / 5000), (2500, 1e-4), (5000, 2e-4), (400_000, 2e-4)]:
        # optax computes end - end (1 - k / 5000) in float32: absolute error ~ 2e-4 * 6e-8
        assert float(lr(step)) == pytest.approx(value, rel=1e-6, abs=1e-10)


def test_optimizer_clips_the_gradient_then_adam_with_the_schedule():
    recipe = cifar10.RECIPE
    optimizer = cifar10.make_optimizer(recipe)
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.array([6.0, 8.0, 0.0, 0.0])}  # global norm 10
    state = optimizer.init(params)
    updates, state = optimizer.update(grads, state, params)
    # the first update uses learning rate 0
    np.testing.assert_array_equal(updates["w"], np.zeros(4))
    # Adam saw the gradient clipped to norm 1: mu = (1 - b1) g / 10, nu = (1 - b2) (g / 10)^2
    clipped = np.array([0.6, 0.8, 0.0, 0.0])
    np.testing.assert_allclose(optax.tree_utils.tree_get(state, "mu")["w"], 0.1 * clipped, rtol=1e-6)
    np.testing.assert_allclose(optax.tree_utils.tree_get(state, "nu")["w"], 1e-3 * clipped**2, rtol=1e-5)
    # a gradient under the threshold passes unchanged
    small = {"w": jnp.array([0.3, 0.4, 0.0, 0.0])}
    _, state = optimizer.update(small, optimizer.init(params), params)
    np.testing.assert_allclose(optax.tree_utils.tree_get(state, "mu")["w"], 0.1 * small["w"], rtol=1e-6)
    # after warm-up (both counts at 5000), the update is Adam's at the full rate:
    # -lr m_hat / (sqrt(v_hat) + eps), m_hat = (1 - b1) g / (1 - b1^5001), v_hat likewise
    late = optax.tree_utils.tree_set(optimizer.init(params), count=jnp.asarray(5_000, jnp.int32))
    updates, _ = optimizer.update(small, late, params)
    g = np.asarray(small["w"], np.float64)
    m_hat, v_hat = 0.1 * g / (1 - 0.9**5001), 1e-3 * g**2 / (1 - 0.999**5001)
    np.testing.assert_allclose(updates["w"], -2e-4 * m_hat / (np.sqrt(v_hat) + 1e-8), rtol=1e-5)


def test_augment_scales_and_flips():
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (64, 4, 4, 3)), jnp.uint8)
    x = np.asarray(cifar10.augment(jax.random.PRNGKey(0), images, flip=False))
    # XLA multiplies by the reciprocal of 127.5: float32 rounding apart, x / 127.5 - 1
    np.testing.assert_allclose(x, np.asarray(images, np.float64) / 127.5 - 1.0, rtol=0, atol=3e-7)
    y = np.asarray(cifar10.augment(jax.random.PRNGKey(0), images))
    flipped = np.array(
        [np.array_equal(a, b[:, ::-1]) and not np.array_equal(a, b) for a, b in zip(y, x, strict=True)]
    )
    kept = np.array([np.array_equal(a, b) for a, b in zip(y, x, strict=True)])
    assert (flipped | kept).all()
    assert 16 < flipped.sum() < 48  # each image flipped with probability 1/2


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"coupling": "sinkhorn"}, "coupling must be one of 'exact', 'independent'"),
        ({"warmup_steps": 0}, "warmup_steps must be an int >= 1"),
        ({"grad_clip": 0.0}, "grad_clip must be > 0"),
        ({"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\)"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"num_head_channels": 0}, "num_head_channels must be None or an int >= 1"),
        ({"groups": 0}, "groups must be an int >= 1"),
    ],
)
def test_bad_recipe_fields_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(cifar10.RECIPE, **change)


TINY = dataclasses.replace(
    cifar10.RECIPE,
    channels=8,
    channel_mults=(1, 2),  # two levels keep the compile short; the full recipe's four are checked above
    num_res_blocks=1,
    groups=4,
    num_head_channels=8,  # attention at 16x16 (16 channels here) in heads of 8
    batch_size=8,
    steps=4,
    warmup_steps=2,
    save_every=2,
    log_every=1,
    sample_count=4,
    sample_steps=2,
)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# mostly compiling the UNet, its step twice and the sampler: 130 s wall on the shared 2-core machine
# without attention and dropout, 240 s with them while two other jobs shared the cores; over the
# default suite's budget
@pytest.mark.slow
def test_tiny_run_on_mock_cifar10_and_resume(tmp_path):
    with tfds.testing.mock_data(num_examples=32):
        records = data_source("cifar10", split="train", data_dir=str(tmp_path / "tfds"))
        assert records[0]["image"].shape == (32, 32, 3)
        first = tmp_path / "first"
        lines = []
        state = cifar10.train(TINY, first, records=records, log=lines.append)
        assert int(state.step) == 4
        metrics = _records(first / "metrics.jsonl")
        assert [m["step"] for m in metrics] == [1, 2, 3, 4]
        assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)
        # the learning rate of each step's update: warm-up over 2 steps, then 2e-4
        assert [m["learning_rate"] for m in metrics] == pytest.approx([0.0, 1e-4, 2e-4, 2e-4])
        assert sorted(p.name for p in (first / "checkpoints").iterdir()) == ["2", "4"]
        assert (first / "samples_2.png").stat().st_size > 1000 and (first / "samples_4.png").exists()
        saved = json.loads((first / "recipe.json").read_text())
        assert saved["learning_rate"] == 2e-4 and saved["channel_mults"] == [1, 2] and saved["steps"] == 4
        assert saved["dropout"] == 0.1 and saved["attention_resolutions"] == [16]
        assert saved["not_in_fmjax"] == {}

        # resume: a copy cut back to its step-2 checkpoint runs steps 3 and 4 again, exactly
        resumed = tmp_path / "resumed"
        shutil.copytree(first, resumed)
        shutil.rmtree(resumed / "checkpoints" / "4")
        again = cifar10.train(TINY, resumed, records=records, log=lines.append)
        assert "resuming from step 2" in lines
        assert int(again.step) == 4
        # step, params, Adam state, EMA and key: bitwise those of the uninterrupted run
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(again), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        rerun = _records(resumed / "metrics.jsonl")
        assert [{**m, "seconds": 0} for m in rerun] == [{**m, "seconds": 0} for m in metrics]

        # a run directory of another recipe is refused before anything is written
        before = (resumed / "metrics.jsonl").read_text()
        with pytest.raises(ValueError, match="differs in learning_rate"):
            cifar10.train(dataclasses.replace(TINY, learning_rate=1e-3), resumed, records=records)
        assert (resumed / "metrics.jsonl").read_text() == before

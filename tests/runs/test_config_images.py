"""Image runs' UNet and augmentation options (fmjax train --dataset ... --channel-mults, --num-res-blocks,
--groups, --attention-resolutions, --num-heads, --num-head-channels, --dropout, --hflip)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.cli import main
from fmjax.data.sources import ImageSource
from fmjax.models import UNet
from fmjax.runs import IMAGE_DEFAULTS, Run, RunConfig, load_run, train


def _count(params):
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def test_defaults_are_the_datasets_and_old_configs_load_with_them():
    config = RunConfig(dataset="cifar10")
    assert config.channel_mults == (1, 2, 2, 2) and RunConfig(dataset="digits").channel_mults == (1, 2)
    assert (config.num_res_blocks, config.groups, config.attention_resolutions) == (1, 8, ())
    assert (config.num_heads, config.num_head_channels, config.dropout, config.hflip) == (4, None, 0.0, False)
    old = RunConfig(dataset="digits").to_json()
    for name in IMAGE_DEFAULTS:
        del old[name]  # a config.json written before these options
    assert RunConfig.from_json(old) == RunConfig(dataset="digits")
    # JSON turns tuples into lists: the configuration read back is the one written
    chosen = RunConfig(dataset="digits", channel_mults=(1, 2, 2), attention_resolutions=(4,), dropout=0.1)
    assert RunConfig.from_json(json.loads(json.dumps(chosen.to_json()))) == chosen
    # a 2D run records none of them
    assert all(RunConfig().to_json()[name] is None for name in IMAGE_DEFAULTS)


def test_the_run_builds_the_unet_the_options_describe():
    config = RunConfig(
        dataset="digits", width=8, channel_mults=(1, 2), num_res_blocks=2, groups=4,
        attention_resolutions=(4,), num_head_channels=8, dropout=0.1,
    )  # fmt: skip
    run = Run.build(config)
    model = UNet(
        in_channels=1, channels=8, channel_mults=(1, 2), num_res_blocks=2, groups=4, image_size=8,
        attention_resolutions=(4,), num_head_channels=8, dropout=0.1,
    )  # fmt: skip
    from flax import nnx

    assert _count(run.state.params) == _count(nnx.state(model, nnx.Param))
    plain = Run.build(RunConfig(dataset="digits", width=8, channel_mults=(1, 2), groups=4))
    assert _count(run.state.params) > _count(plain.state.params)
    assert run.apply_fn.takes_dropout_key is True  # the step passes a fresh key: dropout while training
    assert getattr(plain.apply_fn, "takes_dropout_key", False) is False
    x, t = jnp.ones((2, 8, 8, 1)), jnp.full((2,), 0.5)
    apply = jax.jit(run.apply_fn)
    dropped = jax.jit(lambda p, t, x, key: run.apply_fn(p, t, x, dropout_key=key))
    a, b = apply(run.state.params, t, x), dropped(run.state.params, t, x, jax.random.key(0))
    assert np.array_equal(a, apply(run.state.params, t, x))  # no key: deterministic
    assert not np.allclose(a, b)


def test_hflip_flips_about_half_the_images_left_right():
    """Each x1 is its image or its mirror image (dequantised: floor((x1 + 1) * 128) recovers the
    uint8 image), each with probability 1/2, independently; without hflip none is flipped."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (256, 6, 5, 2), dtype=np.uint8)  # no image is its own mirror
    records = [{"image": image, "label": 0} for image in images]
    for hflip in (True, False):
        source = ImageSource(records, batch_size=256, seed=0, hflip=hflip)
        _, x1 = source.pair(jax.random.key(1), {"image": jnp.asarray(images)})
        back = np.floor((np.asarray(x1) + 1.0) * 128.0).astype(np.uint8)
        same = np.all(back == images, axis=(1, 2, 3))
        mirrored = np.all(back == images[:, :, ::-1], axis=(1, 2, 3))
        assert np.all(same ^ mirrored)
        if hflip:
            assert 128 - 4 * 8 < mirrored.sum() < 128 + 4 * 8  # Binomial(256, 1/2): 4 standard deviations
        else:
            assert not mirrored.any()
    with pytest.raises(TypeError, match="hflip must be True or False"):
        ImageSource(records, batch_size=8, seed=0, hflip="yes")


# the default selection trains a digits run end to end in tests/runs/test_tasks_images.py and builds these
# options' UNet above; this run trains with all of them
@pytest.mark.slow
def test_a_digits_run_with_attention_dropout_and_flips_trains_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("FMJAX_DATA_DIR", str(tmp_path / "tfds"))
    config = RunConfig(
        dataset="digits", steps=20, batch_size=16, width=8, log_every=10, checkpoint_every=10,
        attention_resolutions=(4,), num_head_channels=8, dropout=0.1, hflip=True,
    )  # fmt: skip
    run = train(config, tmp_path / "run")
    assert int(run.state.step) == 20
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["attention_resolutions"] == [4] and stored["dropout"] == 0.1 and stored["hflip"] is True
    assert load_run(tmp_path / "run").config == config  # read back from the run directory
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20] and all(np.isfinite(r["loss"]) for r in records)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dropout", "0.1"], "--dropout is for image runs only"),
        (["--hflip"], "--hflip is for image runs only"),
        (["--dataset", "digits", "--dropout", "1.5"], "--dropout must be < 1.0"),
        (
            ["--dataset", "digits", "--channel-mults", "1,x"],
            "--channel-mults: must be comma-separated integers",
        ),
        (["--dataset", "digits", "--channel-mults", ""], "--channel-mults must hold at least one level"),
        (["--dataset", "digits", "--num-res-blocks", "0"], "--num-res-blocks must be >= 1"),
        (["--dataset", "digits", "--attention-resolutions", "0"], "attention_resolutions[0] must be >= 1"),
    ],
)
def test_bad_image_options_print_one_line_and_exit_2(args, message, capsys, tmp_path):
    assert main(["train", "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "x").exists()

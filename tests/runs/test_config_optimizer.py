"""RunConfig's optimiser options (fmjax train --warmup-steps / --grad-clip) against closed forms.

Adam fed a constant gradient g has bias-corrected moments m = g and v = g^2 at every step, so its
update is -lr_k g / (|g| + eps): the learning rate of step k can be read off the update. Its first
moment after one step is (1 - b1) times the gradient it was given, which shows the clip.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmjax.cli import main
from fmjax.runs import RunConfig, TrainingInterrupted, load_run, train

LR = 1e-2


def _updates(config, grad, steps):
    """The updates of ``steps`` optimiser steps on a constant gradient (parameters held fixed)."""
    optimizer = config.make_optimizer()
    params = {"w": jnp.zeros_like(grad)}
    state = optimizer.init(params)
    out = []
    for _ in range(steps):
        updates, state = optimizer.update({"w": grad}, state, params)
        out.append(np.asarray(updates["w"]))
    return np.stack(out), state


def test_warmup_is_linear_from_zero_then_constant():
    """Update k uses lr min(k, W) / W: 0, lr / 4, lr / 2, 3 lr / 4, lr, lr, ... for W = 4."""
    grad = jnp.array([2.0, -0.5, 3.0])
    updates, _ = _updates(RunConfig(learning_rate=LR, weight_decay=0.0, warmup_steps=4), grad, 7)
    rates = LR * np.minimum(np.arange(7), 4) / 4
    # rtol covers float32 bias corrections
    np.testing.assert_allclose(updates, -rates[:, None] * np.sign(grad)[None], rtol=1e-4, atol=1e-12)


def test_without_warmup_every_update_uses_the_learning_rate():
    grad = jnp.array([2.0, -0.5])
    updates, _ = _updates(RunConfig(learning_rate=LR, weight_decay=0.0), grad, 3)
    np.testing.assert_allclose(updates, -LR * np.sign(grad)[None].repeat(3, 0), rtol=1e-4)


@pytest.mark.parametrize(("clip", "scale"), [(1.0, 1 / 5), (10.0, 1.0)])
def test_grad_clip_scales_the_gradient_to_the_norm(clip, scale):
    """||g|| = 5: clip 1 gives Adam g / 5 (first moment 0.1 g / 5), clip 10 leaves g as it is."""
    grad = jnp.array([3.0, 4.0])
    _, state = _updates(RunConfig(learning_rate=LR, weight_decay=0.0, grad_clip=clip), grad, 1)
    (adam_state,) = [
        s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")
    ]
    np.testing.assert_allclose(adam_state.mu["w"], 0.1 * scale * np.asarray(grad), rtol=1e-6)


def test_the_default_optimizer_keeps_plain_adamw_state():
    """No warm-up, no clip: the state of optax.adamw, so the checkpoints of earlier runs restore."""
    params = {"w": jnp.ones(3)}
    ours = RunConfig().make_optimizer().init(params)
    plain = optax.adamw(1e-3, weight_decay=1e-5).init(params)
    assert jax.tree.structure(ours) == jax.tree.structure(plain)
    config = json.loads(json.dumps(RunConfig().to_json()))
    for name in ("warmup_steps", "grad_clip"):
        del config[name]  # a config.json written before these options
    assert RunConfig.from_json(config) == RunConfig()


def test_a_warmed_up_clipped_run_resumes_bit_for_bit(tmp_path):
    """The schedule's count is optimiser state: a run stopped at step 20 and started again ends where
    an uninterrupted run ends."""
    config = RunConfig(
        steps=40, batch_size=32, width=8, log_every=10, checkpoint_every=10, eval_samples=200,
        warmup_steps=30, grad_clip=0.5,
    )  # fmt: skip
    train(config, tmp_path / "once")
    polls = iter(range(100))
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config, tmp_path / "twice", stop=lambda: next(polls) == 2)  # before the 3rd dispatch
    assert 0 < stopped.value.step < 40
    train(config, tmp_path / "twice")
    a, b = load_run(tmp_path / "once"), load_run(tmp_path / "twice")
    assert int(a.state.step) == int(b.state.step) == 40
    for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    first = json.loads((tmp_path / "once" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["grad_norm"] > 0.5  # the logged norm is the one before the clip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
        (["--grad-clip", "0"], "--grad-clip must be > 0"),
        (["--grad-clip", "inf"], "--grad-clip must be finite"),
    ],
)
def test_bad_optimizer_options_print_one_line_and_exit_2(args, message, capsys, tmp_path):
    assert main(["train", "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "x").exists()

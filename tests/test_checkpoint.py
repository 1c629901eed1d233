"""orbax checkpoints of the training state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmjax.checkpoint import Checkpointer
from fmjax.models import MLP, functional
from fmjax.paths import Linear
from fmjax.training import TrainState, make_train_step


def _trained_state(key):
    apply_fn, params = functional(MLP(dim=2, width=8, depth=2, seed=0))
    optimizer = optax.adamw(1e-2)
    state = TrainState.create(params=params, optimizer=optimizer, key=key)
    step = make_train_step(apply_fn, optimizer, path=Linear())
    for _ in range(3):
        state, _ = step(state, jnp.zeros((16, 2)), jnp.ones((16, 2)))
    return state, TrainState.create(params=params, optimizer=optimizer, key=key)


@pytest.mark.parametrize("key", [jax.random.PRNGKey(0), jax.random.key(0)], ids=["raw", "typed"])
def test_state_round_trips_bitwise(tmp_path, key):
    state, fresh = _trained_state(key)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state)
        restored = ckpt.restore(fresh)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


def test_keeps_the_newest_and_restores_by_step(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, {"w": jnp.full(2, float(step))})
        assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
        assert ckpt.restore({"w": jnp.zeros(2)}, step=2)["w"].tolist() == [2.0, 2.0]
        with pytest.raises(ValueError, match=r"step must be one of the saved steps \[2, 3\]"):
            ckpt.restore({"w": jnp.zeros(2)}, step=1)


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
    with Checkpointer(tmp_path) as ckpt, pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.restore({"w": jnp.zeros(2)})

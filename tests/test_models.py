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

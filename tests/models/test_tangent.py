"""TangentField: any network made a tangent field of a manifold."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.manifolds import FlatTorus, Hyperbolic, Product, Sphere
from fmjax.models import MLP, TangentField, embedded_size, functional


def _points(manifold, shape, seed=0):
    return manifold.base_sample(jax.random.key(seed), shape)


@pytest.mark.parametrize(
    "manifold, size",
    [(Sphere(), 3), (Hyperbolic(), 3), (FlatTorus(), 2), (Product(Sphere(dim=3), FlatTorus(dim=2)), 5)],
    ids=["sphere", "hyperbolic", "torus", "sphere-x-torus"],
)
def test_outputs_are_tangent_and_inputs_projected(manifold, size):
    field = TangentField(MLP(dim=embedded_size(manifold, size), width=16, depth=1), manifold)
    x = _points(manifold, (8, size))
    v = field(jnp.full(8, 0.3), x)
    assert v.shape == x.shape
    np.testing.assert_allclose(manifold.proju(x, v), v, rtol=1e-4, atol=1e-5)
    # a point off the manifold is read as its projection
    off = x + 0.05 * jax.random.normal(jax.random.key(1), x.shape)
    np.testing.assert_allclose(field(0.3, off), field(0.3, manifold.projx(off)), rtol=1e-4, atol=1e-5)


def test_torus_field_is_periodic_and_embeds_each_angle_as_cos_sin():
    torus = FlatTorus()
    assert embedded_size(torus, 2) == 4 and embedded_size(Product(Sphere(dim=3), FlatTorus(dim=2)), 5) == 7
    field = TangentField(MLP(dim=4, width=16, depth=1), torus)
    x = jnp.array([[0.1, 3.0], [6.0, 1.0]])
    np.testing.assert_allclose(field(0.5, x), field(0.5, x + 2 * jnp.pi), atol=1e-5)
    np.testing.assert_allclose(field(0.5, x), field(0.5, x - 4 * jnp.pi), atol=1e-5)


def test_functional_keeps_the_condition_and_the_dropout_contract():
    field = TangentField(MLP(dim=3, width=8, depth=1, num_classes=2), Sphere())
    apply_fn, params = functional(field)
    x = _points(Sphere(), (4, 3))
    v = apply_fn(params, jnp.zeros(4), x, jnp.array([0, 1, 2, 0]))
    assert v.shape == (4, 3) and not apply_fn.takes_dropout_key
    np.testing.assert_allclose(jnp.sum(v * x, axis=-1), 0.0, atol=1e-5)
    assert int(field.null_cond()) == 2


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="model must be a Flax NNX module"):
        TangentField(lambda t, x: x, Sphere())
    with pytest.raises(TypeError, match="manifold must be an fmjax manifold"):
        TangentField(MLP(dim=3), 3)

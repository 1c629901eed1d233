"""Hostile input, as a careless or adversarial user would give it: user callables of the wrong shape or
dtype, fields that go NaN mid-solve, empty batches, out-of-range image data, NumPy scalars, registry
names instead of objects, bad PRNG keys. Each bad case raises one line naming the argument (or the
callable) and what is allowed; each accepted variant gives the closed-form value of the plain one."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fmjax
from fmjax.couplings import Coupling, Independent
from fmjax.likelihood import bits_per_dim, log_likelihood, standard_normal_log_density
from fmjax.metrics import normalized_path_energy, path_energy
from fmjax.models import MLP, UNet, functional, mixed_precision
from fmjax.paths import CondOT, Linear, make_path
from fmjax.sampling import SOLVE_STATUS, Trajectory, as_velocity, sample
from fmjax.training import logit_normal, uniform

KEY = jax.random.key(0)
X = jnp.ones((8, 2))
X0 = jnp.zeros((8, 2))
DECAY = lambda t, x: -x  # noqa: E731
ZERO_MODEL = lambda params, t, x: jnp.zeros_like(x)  # noqa: E731
EULER = {"solver": "euler", "steps": 2}


def _loss(apply_fn=ZERO_MODEL, key=KEY, x0=X0, x1=X, **kwargs):
    kwargs.setdefault("path", Linear())
    return fmjax.cfm_loss(apply_fn, None, key, x0, x1, **kwargs)


def _loss_of_a_bad_model(q):
    return fmjax.cfm_loss(lambda q, t, x: q * x[:, 0], q, KEY, X0, X, path=Linear())[0]


def _nan_after_half(t, x):
    return jnp.where(t > 0.5, jnp.nan, -x)


class _HalfPairs(Coupling):
    """A broken user coupling: pairs only the first half of the batch."""

    def pairs(self, key, x0, x1):
        idx = jnp.arange(x0.shape[0] // 2)
        return idx, idx


class _WithStatus(Independent):
    """A user coupling that reports its own status through ``apply_with_status``."""

    def apply_with_status(self, key, x0, x1):
        i = jnp.arange(x0.shape[0])
        status = {"coupling_converged": jnp.asarray(False), "coupling_error": jnp.asarray(0.25, jnp.float32)}
        return x0, x1, (i, i), status


jax.tree_util.register_static(_HalfPairs)
jax.tree_util.register_static(_WithStatus)

# (id, call, exception type, substrings the message must contain); every message is one line
CASES = [
    # -- user callables: wrong shape, dtype or kind of output, named with expected vs got --
    ("velocity-batch-only", lambda: sample(lambda t, x: x[:, 0], X, **EULER), ValueError,
     ["velocity(t, x) must return shape", "(8, 2)", "got shape (8,)"]),
    ("velocity-batch-1", lambda: sample(lambda t, x: x[:, :1], X, **EULER), ValueError,
     ["velocity(t, x)", "(8, 2)", "(8, 1)"]),
    ("velocity-1-dims", lambda: sample(lambda t, x: x[:1], X, **EULER), ValueError,
     ["velocity(t, x)", "(8, 2)", "(1, 2)"]),
    ("velocity-python-float", lambda: sample(lambda t, x: 1.0, X, **EULER), TypeError,
     ["velocity(t, x) must return one array", "float 1.0"]),
    ("velocity-tuple", lambda: sample(lambda t, x: (x, x), X, **EULER), TypeError,
     ["velocity(t, x) must return one array", "tuple of 2 items"]),
    ("velocity-int-dtype", lambda: sample(lambda t, x: x.astype(jnp.int32), X, **EULER), TypeError,
     ["velocity(t, x) must return a real floating-point array", "int32"]),
    ("velocity-complex-dtype", lambda: sample(lambda t, x: x.astype(jnp.complex64), X, **EULER), TypeError,
     ["velocity(t, x)", "complex64"]),
    ("velocity-bool-dtype", lambda: sample(lambda t, x: x > 0, X, **EULER), TypeError,
     ["velocity(t, x)", "bool"]),
    ("apply-fn-as-velocity", lambda: sample(ZERO_MODEL, X), TypeError,
     ["velocity must be callable as velocity(t, x)", "fmjax.as_velocity(apply_fn, params)"]),
    ("velocity-not-callable", lambda: sample("field", X), TypeError, ["velocity must be a function"]),
    ("velocity-wrong-shape-dopri5", lambda: sample(lambda t, x: x[:, 0], X), ValueError,
     ["velocity(t, x)", "(8,)"]),
    ("velocity-wrong-shape-under-jit", lambda: jax.jit(lambda x: sample(lambda t, y: y[:, 0], x).x1)(X),
     ValueError, ["velocity(t, x)", "(8,)"]),
    ("as-velocity-model-shape", lambda: sample(as_velocity(lambda p, t, x: x[:, :1], None), X, **EULER),
     ValueError, ["apply_fn(params, t, x) must return shape", "(8, 1)"]),
    ("as-velocity-bad-signature", lambda: as_velocity(lambda t, x: x, None), TypeError,
     ["apply_fn must be callable as apply_fn(params, t, x)"]),
    ("loss-model-batch-only", lambda: _loss(lambda p, t, x: x[:, 0]), ValueError,
     ["apply_fn(params, t, x) must return shape", "(8, 2)", "(8,)"]),
    ("loss-model-batch-1", lambda: _loss(lambda p, t, x: x[:, :1]), ValueError, ["apply_fn", "(8, 1)"]),
    ("loss-model-1-dims", lambda: _loss(lambda p, t, x: x[:1]), ValueError, ["apply_fn", "(1, 2)"]),
    ("loss-model-python-float", lambda: _loss(lambda p, t, x: 0.0), TypeError, ["apply_fn", "float 0.0"]),
    ("loss-model-int", lambda: _loss(lambda p, t, x: jnp.zeros(x.shape, jnp.int32)), TypeError,
     ["apply_fn", "int32"]),
    ("loss-model-tuple", lambda: _loss(lambda p, t, x: (x, t)), TypeError, ["apply_fn", "tuple"]),
    ("loss-model-two-args", lambda: _loss(lambda t, x: x), TypeError,
     ["apply_fn must be callable as apply_fn(params, t, x)"]),
    ("loss-model-shape-in-jitted-grad", lambda: jax.jit(jax.grad(_loss_of_a_bad_model))(1.0), ValueError,
     ["apply_fn", "(8,)"]),
    ("log-p0-per-dimension", lambda: log_likelihood(DECAY, X, log_p0=lambda x: -0.5 * x**2, **EULER),
     ValueError, ["log_p0(x) must return shape [batch]", "(8,)", "got shape (8, 2)"]),
    ("log-p0-scalar", lambda: log_likelihood(DECAY, X, log_p0=lambda x: jnp.sum(x), **EULER), ValueError,
     ["log_p0(x)", "(8,)", "got shape ()"]),
    ("log-p0-two-args", lambda: log_likelihood(DECAY, X, log_p0=lambda x, y: x, **EULER), TypeError,
     ["log_p0 must be callable as log_p0(x)"]),
    ("likelihood-velocity-shape", lambda: log_likelihood(lambda t, x: x[:, :1], X, **EULER), ValueError,
     ["velocity(t, x)", "(1, 1)"]),  # the exact divergence calls velocity on one sample at a time
    ("hutchinson-velocity-shape",
     lambda: log_likelihood(lambda t, x: x[:, :1], X, divergence="hutchinson", key=KEY, **EULER),
     ValueError, ["velocity(t, x)", "(8, 2)", "(8, 1)"]),
    ("time-sampler-shape", lambda: _loss(time_sampler=lambda k, n, d: jnp.zeros((n, 1), d)), ValueError,
     ["time_sampler(key, n, dtype) must return shape [n]", "(8, 1)"]),
    ("time-sampler-outside-0-1", lambda: _loss(time_sampler=lambda k, n, d: jnp.full((n,), 2.0, d)),
     ValueError, ["time_sampler(key, n, dtype) must lie in [0, 1]", "2.0"]),
    ("time-sampler-two-args", lambda: _loss(time_sampler=lambda k, n: jnp.zeros(n)), TypeError,
     ["time_sampler must be callable as time_sampler(key, n, dtype)"]),
    ("time-sampler-factory-uncalled", lambda: _loss(time_sampler=logit_normal), TypeError,
     ["time_sampler", "fmjax.logit_normal()"]),
    ("coupling-half-pairs", lambda: _loss(coupling=_HalfPairs()), ValueError,
     ["coupling must return pairs of the batches' shape (8, 2)", "(4, 2)"]),
    # -- non-finite values during a solve: the cause in one line --
    ("nan-field-dopri5", lambda: sample(_nan_after_half, X), FloatingPointError,
     ["velocity returned NaN", "at t=0.5", "'dopri5'"]),
    ("nan-field-euler", lambda: sample(_nan_after_half, X, solver="euler", steps=10), FloatingPointError,
     ["velocity returned NaN (16 values) at t=0.6", "10 fixed steps"]),
    ("inf-field-heun",
     lambda: sample(lambda t, x: x / jnp.where(t > 0.3, 0.0, 1.0), X, solver="heun", steps=5),
     FloatingPointError, ["velocity returned inf", "t=0.4"]),
    ("velocity-overflow-euler", lambda: sample(lambda t, x: 1e30 * x, X, solver="euler", steps=4),
     FloatingPointError, ["velocity returned inf (16 values) at t=0.25"]),
    ("state-overflow-euler", lambda: sample(lambda t, x: jnp.full_like(x, 3e38), 2e38 * X, solver="euler",
     steps=2), FloatingPointError, ["the state overflowed to inf/NaN at t=0.5", "velocity stayed finite"]),
    ("state-overflow-last-step", lambda: sample(lambda t, x: jnp.full_like(x, 3e38), 2e38 * X, solver="euler",
     steps=1), FloatingPointError, ["the state overflowed to inf/NaN at t=1"]),
    ("max-steps-on-a-finite-field", lambda: sample(lambda t, x: -1e3 * x, X, max_steps=10), RuntimeError,
     ["reached max_steps=10", "velocity finite"]),
    ("nan-in-model-params",
     lambda: sample(as_velocity(lambda p, t, x: p * x, jnp.float32(jnp.nan)), X, solver="euler", steps=3),
     FloatingPointError, ["velocity returned NaN", "at t=0"]),
    ("likelihood-nan-field",  # integrates from t=1 back to 0: the first NaN is at t=0.4
     lambda: log_likelihood(lambda t, x: jnp.where(t < 0.5, jnp.nan, -x), X, solver="euler", steps=10),
     FloatingPointError, ["velocity returned NaN", "at t=0.4", "log_likelihood"]),
    ("likelihood-inf-divergence", lambda: log_likelihood(lambda t, x: jnp.sqrt(jnp.abs(x)), X0, **EULER),
     FloatingPointError, ["the divergence of velocity returned", "at t=1"]),
    ("likelihood-log-p0-nan", lambda: log_likelihood(DECAY, X, log_p0=lambda x: jnp.log(-x[:, 0]), **EULER),
     FloatingPointError, ["log_p0 returned NaN or inf for 8 of 8 latent points"]),
    # -- empty batches --
    ("loss-empty-batch", lambda: _loss(x0=jnp.zeros((0, 2)), x1=jnp.zeros((0, 2))), ValueError,
     ["x0 must hold at least one sample", "(0, 2)"]),
    ("loss-empty-samples", lambda: _loss(x0=jnp.zeros((8, 0)), x1=jnp.zeros((8, 0))), ValueError,
     ["x0 must have at least one value per sample"]),
    ("sample-empty-batch", lambda: sample(DECAY, jnp.zeros((0, 2))), ValueError,
     ["x0 must hold at least one"]),
    ("likelihood-empty-batch", lambda: log_likelihood(DECAY, jnp.zeros((0, 3))), ValueError,
     ["x1 must hold at least one sample"]),
    ("bpd-empty-batch", lambda: bits_per_dim(DECAY, jnp.zeros((0, 4), jnp.uint8), key=KEY), ValueError,
     ["images must hold at least one sample"]),
    ("path-empty-batch", lambda: Linear().sample(None, jnp.zeros((0, 2)), jnp.zeros((0, 2)), jnp.zeros(0)),
     ValueError, ["x0 must hold at least one sample"]),
    ("path-energy-one-time", lambda: path_energy(Trajectory(jnp.zeros(1), jnp.zeros((1, 4, 2)))), ValueError,
     ["trajectory.ts", "num_times >= 2"]),
    ("path-energy-empty-batch", lambda: path_energy(Trajectory(jnp.linspace(0, 1, 3), jnp.zeros((3, 0, 2)))),
     ValueError, ["trajectory.xs", "batch >= 1"]),
    ("path-energy-repeated-time", lambda: path_energy(Trajectory(jnp.zeros(3), jnp.zeros((3, 2, 2)))),
     ValueError, ["strictly monotone"]),
    # -- bits_per_dim data --
    ("bpd-above-255", lambda: bits_per_dim(DECAY, jnp.array([[0, 256]]), key=KEY), ValueError,
     ["images must hold integers in {0, ..., 255}", "values from 0 to 256"]),
    ("bpd-negative", lambda: bits_per_dim(DECAY, jnp.array([[-1, 3]]), key=KEY), ValueError,
     ["images", "from -1 to 3"]),
    ("bpd-already-scaled", lambda: bits_per_dim(DECAY, jnp.array([[-1.0, 0.5]]), key=KEY), ValueError,
     ["images must hold integers", "raw pixel values"]),
    ("bpd-fractional", lambda: bits_per_dim(DECAY, jnp.array([[1.0, 2.5]]), key=KEY), ValueError,
     ["images", "non-integer values such as 2.5"]),
    ("bpd-num-levels", lambda: bits_per_dim(DECAY, jnp.array([[0, 16]]), key=KEY, num_levels=16), ValueError,
     ["{0, ..., 15}"]),
    ("bpd-bool", lambda: bits_per_dim(DECAY, jnp.ones((2, 4), bool), key=KEY), TypeError,
     ["images must be an integer", "bool"]),
    ("bpd-complex", lambda: bits_per_dim(DECAY, jnp.ones((2, 4), jnp.complex64), key=KEY), TypeError,
     ["images", "complex64"]),
    ("bpd-list", lambda: bits_per_dim(DECAY, [[0, 1]], key=KEY), TypeError, ["images must be an array"]),
    ("bpd-num-levels-1", lambda: bits_per_dim(DECAY, jnp.zeros((1, 2)), key=KEY, num_levels=1), ValueError,
     ["num_levels must be >= 2"]),
    # -- numbers: NumPy scalars are fine, bools, strings, NaN and out-of-range values are not --
    ("bool-sigma", lambda: Linear(sigma=True), TypeError, ["sigma must be a real number", "bool"]),
    ("numpy-bool-sigma", lambda: Linear(sigma=np.bool_(False)), TypeError, ["sigma must be a real number"]),
    ("numpy-nan-sigma", lambda: Linear(sigma=np.float32("nan")), ValueError, ["sigma must be finite"]),
    ("array-sigma", lambda: CondOT(sigma_min=np.array([0.1, 0.2])), TypeError,
     ["sigma_min must be a real number", "shape (2,)"]),
    ("complex-sigma", lambda: Linear(sigma=0.1j), TypeError, ["sigma must be a real number", "complex"]),
    ("traced-sigma", lambda: jax.jit(lambda s: Linear(sigma=s).sigma)(0.1), TypeError,
     ["sigma must be a real number", "traced"]),
    ("float-steps", lambda: sample(DECAY, X, solver="euler", steps=4.0), TypeError,
     ["steps must be an int", "float 4.0"]),
    ("numpy-float-steps", lambda: sample(DECAY, X, solver="euler", steps=np.float32(4)), TypeError,
     ["steps must be an int", "numpy.float32"]),
    ("negative-steps", lambda: sample(DECAY, X, solver="euler", steps=-3), ValueError,
     ["steps must be >= 1"]),
    ("negative-steps-trajectory", lambda: sample(DECAY, X, solver="euler", steps=-3, save_trajectory=True),
     ValueError, ["steps must be >= 1"]),
    ("rtol-zero-fixed-steps", lambda: sample(DECAY, X, solver="euler", steps=2, rtol=0.0), ValueError,
     ["rtol must be > 0"]),
    ("atol-nan", lambda: sample(DECAY, X, atol=np.nan), ValueError, ["atol must be finite"]),
    ("rtol-string", lambda: sample(DECAY, X, rtol="1e-5"), TypeError, ["rtol must be a real number"]),
    ("max-steps-zero", lambda: sample(DECAY, X, max_steps=0), ValueError, ["max_steps must be >= 1"]),
    ("trajectory-points-1", lambda: sample(DECAY, X, save_trajectory=True, trajectory_points=1), ValueError,
     ["trajectory_points must be >= 2"]),
    ("string-flag", lambda: sample(DECAY, X, save_trajectory="False"), TypeError,
     ["save_trajectory must be True or False", "str 'False'"]),
    ("num-probes-float", lambda: log_likelihood(DECAY, X, divergence="hutchinson", key=KEY, num_probes=2.0),
     TypeError, ["num_probes must be an int"]),
    ("solver-object", lambda: sample(DECAY, X, solver=fmjax.sampling.SOLVERS["dopri5"]), ValueError,
     ["solver must be one of"]),
    ("mlp-width-float", lambda: MLP(dim=2, width=8.0), TypeError, ["width must be an int"]),
    ("mlp-seed-string", lambda: MLP(dim=2, seed="0"), TypeError, ["seed must be an int"]),
    ("mlp-rngs-int", lambda: MLP(dim=2, rngs=0), TypeError, ["rngs must be an nnx.Rngs"]),
    ("unet-groups", lambda: UNet(channels=12, groups=8), ValueError,
     ["groups=8 must divide the channels of every GroupNorm", "12 channels"]),
    ("unet-mults-float", lambda: UNet(channel_mults=(1, 2.0)), TypeError,
     ["channel_mults[1] must be an int"]),
    ("functional-not-a-module", lambda: functional(lambda t, x: x), TypeError,
     ["model must be a Flax NNX module"]),
    ("mixed-precision-not-callable", lambda: mixed_precision("mlp"), TypeError,
     ["apply_fn must be a function"]),
    ("npe-string", lambda: normalized_path_energy("1.0", 1.0), TypeError, ["energy must be a real number"]),
    ("npe-zero-w2", lambda: normalized_path_energy(1.0, np.float32(0)), ValueError, ["w2 must be > 0"]),
    # -- registry names and objects --
    ("unknown-path-name", lambda: _loss(path="straight"), ValueError,
     ["path must be one of", "'condot'", "'straight'"]),
    ("path-class", lambda: _loss(path=Linear), TypeError,
     ["path must be a path, not a path class", "Linear()"]),
    ("path-none", lambda: _loss(path=None), TypeError, ["path must be an fmjax path", "'linear'"]),
    ("unknown-coupling-name", lambda: _loss(coupling="greedy"), ValueError,
     ["coupling must be one of", "'exact'", "'greedy'"]),
    ("coupling-factory", lambda: _loss(coupling=fmjax.exact), TypeError,
     ["coupling must be a coupling, not its factory", "exact()"]),
    ("coupling-function", lambda: _loss(coupling=lambda k, a, b: (jnp.arange(8), jnp.arange(8))), TypeError,
     ["coupling must be an fmjax coupling"]),
    ("unknown-time-sampler-name", lambda: _loss(time_sampler="beta"), ValueError,
     ["time_sampler must be one of", "'logit_normal'"]),
    # -- PRNG keys --
    ("loss-int-key", lambda: _loss(key=0), TypeError, ["key must be one PRNG key", "int 0"]),
    ("loss-key-batch", lambda: _loss(key=jax.random.split(KEY, 4)), TypeError,
     ["key must be one PRNG key", "batch of keys of shape (4,)"]),
    ("loss-float-key", lambda: _loss(key=jnp.zeros(2)), TypeError, ["key must be one PRNG key", "float32"]),
    ("hutchinson-int-key", lambda: log_likelihood(DECAY, X, divergence="hutchinson", key=3), TypeError,
     ["key must be one PRNG key"]),
    ("bpd-no-key", lambda: bits_per_dim(DECAY, jnp.zeros((1, 2)), key=None), TypeError,
     ["key must be one PRNG key"]),
    ("path-noise-int-key", lambda: Linear(sigma=0.1).sample(1, X0, X, jnp.zeros(8)), TypeError,
     ["key must be one PRNG key"]),
    ("time-sampler-int-key", lambda: uniform(5, 4), TypeError, ["key must be one PRNG key"]),
    ("time-sampler-zero-n", lambda: uniform(KEY, 0), ValueError, ["n must be >= 1"]),
    ("time-sampler-int-dtype", lambda: logit_normal()(KEY, 4, jnp.int32), TypeError,
     ["dtype must be a floating dtype"]),
    # -- mismatched batches and times --
    ("loss-x0-x1-dims", lambda: _loss(x1=jnp.ones((8, 3))), ValueError,
     ["x0 and x1 must have the same shape"]),
    ("loss-x0-x1-batch", lambda: _loss(x1=jnp.ones((4, 2))), ValueError, ["(8, 2) and (4, 2)"]),
    ("loss-rank-1", lambda: _loss(x0=jnp.zeros(8), x1=jnp.ones(8)), ValueError, ["x0", "rank >= 2"]),
    ("loss-int-x1", lambda: _loss(x1=jnp.ones((8, 2), jnp.int32)), TypeError, ["x1 must be a float32"]),
    ("conversion-t-batch-1", lambda: CondOT().velocity_from_x1(jnp.full((8, 1), 0.5), X, X), ValueError,
     ["t must be a scalar or have shape [batch] = (8,)", "(8, 1)"]),
    ("conversion-prediction-shape", lambda: CondOT().x1_from_velocity(0.5, X, X[:, :1]), ValueError,
     ["velocity must have the shape of xt", "(8, 1)"]),
    ("path-complex-t", lambda: Linear().sample(None, X0, X, jnp.zeros(8, jnp.complex64)), TypeError,
     ["t must be a real array", "complex64"]),
    ("path-bool-t", lambda: Linear().sample(None, X0, X, jnp.zeros(8, bool)), TypeError,
     ["t must be a real"]),
]  # fmt: skip


@pytest.mark.parametrize("call, error, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_is_named_in_one_line(call, error, needles):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_case_count():
    assert len({c[0] for c in CASES}) == len(CASES) >= 100


# -- closed forms: what is accepted gives the plain value --


def test_numpy_scalars_are_accepted_and_give_the_plain_values():
    assert Linear(sigma=np.float32(0.1)) == Linear(sigma=0.1)  # the decimal, not 0.10000000149
    assert type(Linear(sigma=np.float32(0.5)).sigma) is float
    assert CondOT(sigma_min=np.float64(1e-4)) == CondOT(sigma_min=1e-4)
    assert make_path("linear", sigma=np.float32(0.25)) == Linear(sigma=0.25)
    assert CondOT(sigma_min=jnp.asarray(0.0)) == CondOT()
    assert logit_normal(mean=np.int64(1), std=np.float32(0.5)) == logit_normal(mean=1.0, std=0.5)
    assert fmjax.sinkhorn(epsilon=np.float32(0.1)).epsilon == pytest.approx(0.1)
    plain = sample(DECAY, X, solver="euler", steps=4, save_trajectory=True)
    numpy = sample(
        DECAY, X, solver="euler", steps=np.int64(4), save_trajectory=np.bool_(True), t1=np.float32(1)
    )
    np.testing.assert_array_equal(numpy.x1, plain.x1)
    np.testing.assert_allclose(plain.x1, 0.75**4 * X, rtol=1e-6)  # Euler on dx/dt = -x, four steps of 1/4
    assert numpy.trajectory.xs.shape == (5, 8, 2)
    model = MLP(dim=np.int64(2), width=np.int32(4), depth=np.int64(1), seed=np.int64(0))
    assert functional(model)[1]["out"]["kernel"].shape == (4, 2)
    probes = log_likelihood(DECAY, X, divergence="hutchinson", key=KEY, num_probes=np.int64(3), **EULER)
    assert probes.log_p.shape == (8,)


def test_names_build_the_registry_objects():
    x1 = jax.random.normal(jax.random.key(1), (8, 2))
    for kwargs, objects in [
        ({"path": "condot"}, {"path": CondOT()}),
        ({"path": "linear", "coupling": "exact"}, {"path": Linear(), "coupling": fmjax.exact()}),
        ({"path": "vp", "time_sampler": "logit_normal"},
         {"path": fmjax.VariancePreserving(), "time_sampler": logit_normal()}),
    ]:  # fmt: skip
        by_name, aux_name = _loss(x1=x1, apply_fn=lambda p, t, x: 0.5 * x, **kwargs)
        by_object, aux_object = _loss(x1=x1, apply_fn=lambda p, t, x: 0.5 * x, **objects)
        assert float(by_name) == float(by_object)
        np.testing.assert_array_equal(aux_name.sample.t, aux_object.sample.t)
    # closed form: Linear, model 0, x0 = 0: u_t = x1, loss = mean(x1^2)
    loss, _ = _loss(x1=x1, path="linear")
    np.testing.assert_allclose(loss, jnp.mean(x1**2), rtol=1e-6)


def test_legacy_and_typed_keys_give_the_same_loss():
    x1 = jax.random.normal(jax.random.key(2), (8, 2))
    typed, _ = _loss(key=jax.random.key(3), x1=x1, path=Linear(sigma=0.1), apply_fn=lambda p, t, x: x)
    raw, _ = _loss(key=jax.random.PRNGKey(3), x1=x1, path=Linear(sigma=0.1), apply_fn=lambda p, t, x: x)
    assert float(typed) == float(raw)


def test_a_low_precision_velocity_is_cast_to_the_state():
    # a bfloat16 model output joins a float32 state; constant field 1: x1 = x0 + 1 exactly
    result = sample(lambda t, x: jnp.ones(x.shape, jnp.bfloat16), X, solver="heun", steps=3)
    assert result.x1.dtype == jnp.float32
    np.testing.assert_array_equal(result.x1, X + 1)
    assert int(result.status) == 0


def test_coupling_status_goes_into_the_aux():
    loss, aux = _loss(coupling=_WithStatus())
    assert float(loss) == 1.0  # model 0, u_t = x1 - x0 = 1
    assert set(aux.status) == {"coupling_converged", "coupling_error"}
    assert not bool(aux["coupling_converged"]) and float(aux["coupling_error"]) == 0.25
    assert aux[1] is aux.velocity  # integers still index the tuple

    def loss_fn(q):
        return fmjax.cfm_loss(lambda q, t, x: q * x, q, KEY, X0, X, path=Linear(), coupling=_WithStatus())

    (loss, aux), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(0.0)
    # x_t = t x1 = t, u_t = 1: d/dq mean((q t - 1)^2) at q = 0 is -2 mean(t)
    np.testing.assert_allclose(grad, -2 * jnp.mean(aux.sample.t), rtol=1e-6)
    assert float(aux["coupling_error"]) == 0.25
    # a coupling without the method reports nothing
    plain = fmjax.independent()
    _, aux = _loss(coupling=plain)
    assert ("coupling_converged" in aux.status) == hasattr(plain, "apply_with_status")


def test_empty_batch_never_reaches_the_train_step():
    apply_fn, params = functional(MLP(dim=2, width=4, depth=1))

    step = fmjax.make_train_step(apply_fn, optax.sgd(0.1), path=Linear(), donate=False)
    state = fmjax.TrainState.create(params=params, optimizer=optax.sgd(0.1), key=KEY)
    with pytest.raises(ValueError, match="x0 must hold at least one sample"):
        step(state, jnp.zeros((0, 2)), jnp.zeros((0, 2)))
    assert int(state.step) == 0


# -- jit: nothing can raise, the status says what happened --


def test_a_nan_field_under_jit_gives_a_status_and_nan():
    adaptive = jax.jit(lambda x: sample(_nan_after_half, x))(X)
    assert SOLVE_STATUS[int(adaptive.status)] == "stopped"
    assert bool(jnp.all(jnp.isnan(adaptive.x1)))
    fixed = jax.jit(lambda x: sample(_nan_after_half, x, solver="euler", steps=10))(X)
    assert SOLVE_STATUS[int(fixed.status)] == "non-finite"
    good = jax.jit(lambda x: sample(DECAY, x, rtol=1e-7, atol=1e-7))(X)
    assert int(good.status) == 0
    np.testing.assert_allclose(good.x1, math.exp(-1) * X, rtol=1e-5)


def test_a_nan_field_in_log_likelihood_under_jit_gives_a_status():
    bad = jax.jit(lambda x: log_likelihood(_nan_after_half, x))(X)
    assert int(bad.status) == 2 and bool(jnp.all(jnp.isnan(bad.log_p)))
    good = jax.jit(lambda x: log_likelihood(DECAY, x, solver="heun", steps=8))(X0)
    assert int(good.status) == 0
    # dx/dt = -x from 0 stays at 0 and div = -2 is constant, which Heun integrates exactly:
    # log p1(0) = log N(0; 0, I) + 2 (the volume shrinks by e^-2)
    np.testing.assert_allclose(good.log_p, standard_normal_log_density(X0) + 2.0, rtol=1e-6)


def test_bits_per_dim_under_jit_marks_bad_images_nan():
    uniform_source = lambda z: jnp.full(z.shape[0], -z[0].size * math.log(2.0))  # noqa: E731
    images = jnp.array([[0.0, 255.0, 7.0], [0.0, 300.0, 1.0], [1.0, 2.5, 3.0]])
    zero = lambda t, x: jnp.zeros_like(x)  # noqa: E731
    bpd = jax.jit(lambda x: bits_per_dim(zero, x, key=KEY, log_p0=uniform_source, **EULER))(images)
    np.testing.assert_allclose(bpd[0], 8.0, rtol=1e-6)  # uniform model of 8-bit data
    assert bool(jnp.isnan(bpd[1])) and bool(jnp.isnan(bpd[2]))
    with pytest.raises(ValueError, match="values from 0 to 300"):
        bits_per_dim(zero, images, key=KEY, log_p0=uniform_source, **EULER)

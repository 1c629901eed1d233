"""Determinism (same seed, same device count: bitwise-equal losses) and property-based checks over
path x coupling x time sampler x data shape: loss finite, jit == no jit, couplings are permutations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fmjax
from fmjax.couplings import make_coupling
from fmjax.models import MLP, functional
from fmjax.paths import make_path
from fmjax.runs import RunConfig, train
from fmjax.training import TIME_SAMPLERS

PATHS = {"linear": 0.1, "condot": 0.01, "sb": 0.5, "vp": None, "vp_diffusion": None}
COUPLINGS = ["independent", "exact", "sinkhorn", "sb"]
PERMUTING = {"independent", "exact"}


def test_same_seed_gives_bitwise_identical_losses(tmp_path):
    # six logged losses of each run, as at 600 steps with log_every=100: the runs' fixed costs (tracing and
    # compiling the step, checkpointing) dominate either way
    config = RunConfig(steps=120, log_every=20, checkpoint_every=120, eval_samples=100, coupling="exact")
    losses = []
    for name in ("a", "b"):
        train(config, tmp_path / name)
        with open(tmp_path / name / "metrics.jsonl") as f:
            losses.append([line.split('"loss": ')[1].split(",")[0] for line in f if '"loss"' in line])
    assert losses[0] == losses[1] and len(losses[0]) == 6


CASES = given(
    path_name=st.sampled_from(sorted(PATHS)),
    coupling_name=st.sampled_from(COUPLINGS),
    time_name=st.sampled_from(sorted(TIME_SAMPLERS)),
    batch=st.integers(2, 12),
    dims=st.sampled_from([(1,), (3,), (2, 2), (4, 2, 1)]),
    seed=st.integers(0, 2**16),
)
# Each example compiles its own shapes (2-5 s, mostly the eager loss's operations one by one): 4 per
# default run, drawn afresh each time; 40 more with `pytest -m slow tests/test_training_properties.py`.
EXAMPLES = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=4, **EXAMPLES)
@CASES
def test_cfm_loss_properties(path_name, coupling_name, time_name, batch, dims, seed):
    check_cfm_loss_properties(path_name, coupling_name, time_name, batch, dims, seed)


@pytest.mark.slow
@settings(max_examples=40, **EXAMPLES)
@CASES
def test_cfm_loss_properties_more_examples(path_name, coupling_name, time_name, batch, dims, seed):
    check_cfm_loss_properties(path_name, coupling_name, time_name, batch, dims, seed)


def check_cfm_loss_properties(path_name, coupling_name, time_name, batch, dims, seed):
    """Over one drawn case: the loss is finite and jit == no jit; the coupling's pairs index the batch,
    and the permuting couplings return permutations."""
    sigma = PATHS.get(path_name)
    path = make_path(path_name, sigma=sigma) if sigma is not None else make_path(path_name)
    coupling = (
        make_coupling(coupling_name, sigma=0.5) if coupling_name == "sb" else make_coupling(coupling_name)
    )
    key = jax.random.key(seed)
    k0, k1, kl, kc = jax.random.split(key, 4)
    x0 = jax.random.normal(k0, (batch, *dims))
    x1 = 2.0 + jax.random.normal(k1, (batch, *dims))
    apply_fn, params = functional(MLP(dim=int(np.prod(dims)), width=8, depth=1, seed=0))
    sampler = TIME_SAMPLERS[time_name]()  # factories with their defaults

    def loss(params, key):
        return fmjax.cfm_loss(
            apply_fn, params, key, x0, x1, path=path, coupling=coupling, time_sampler=sampler
        )[0]

    eager = loss(params, kl)
    jitted = jax.jit(loss)(params, kl)
    assert bool(jnp.isfinite(eager))
    np.testing.assert_allclose(float(eager), float(jitted), rtol=1e-5, atol=1e-6)
    i, j = jax.jit(coupling.__call__)(kc, x0, x1)
    assert i.shape == j.shape == (batch,)
    assert bool(jnp.all((i >= 0) & (i < batch) & (j >= 0) & (j < batch)))
    if coupling_name in PERMUTING:
        assert sorted(np.asarray(j).tolist()) == list(range(batch))
        assert sorted(np.asarray(i).tolist()) == list(range(batch))

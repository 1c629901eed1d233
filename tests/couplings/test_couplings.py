"""Couplings: exact OT against POT, Sinkhorn plans and their sampling, labels following the pairs."""

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest

from fmjax._assignment import HAVE_NATIVE, solve_assignment, solve_assignment_points, solve_assignment_pot
from fmjax.couplings import (
    COUPLINGS,
    Exact,
    Sinkhorn,
    exact,
    independent,
    make_coupling,
    sample_plan_rows,
    schrodinger_bridge,
    sinkhorn,
    squared_distances,
)
from fmjax.losses import cfm_loss
from fmjax.paths import Linear


def _emd_mean_cost(x0, x1):
    a = np.asarray(x0, np.float64).reshape(len(x0), -1)
    b = np.asarray(x1, np.float64).reshape(len(x1), -1)
    cost = ot.dist(a, b)
    w = np.full(len(a), 1 / len(a))
    return ot.emd2(w, w, cost, numItermax=10**8), cost


def _clouds(kind, n, shape, seed):
    rng = np.random.default_rng(seed)
    x0 = rng.normal(size=(n, *shape))
    x1 = rng.normal(size=(n, *shape)) + 0.7
    if kind == "ties":  # points on an integer grid: many equal costs
        x0, x1 = np.round(x0), np.round(x1)
    if kind == "duplicates":
        x0[: n // 2] = x0[0]
        x1[: n // 3] = x1[-1]
    return jnp.asarray(x0, jnp.float32), jnp.asarray(x1, jnp.float32)


@pytest.mark.parametrize("kind", ["random", "ties", "duplicates"])
@pytest.mark.parametrize(
    ("n", "shape"), [(1, (2,)), (2, (2,)), (17, (1,)), (64, (2,)), (300, (5,)), (40, (3, 4))]
)
def test_exact_is_an_optimal_permutation(kind, n, shape):
    x0, x1 = _clouds(kind, n, shape, seed=n)
    i, j = jax.jit(exact())(None, x0, x1)
    np.testing.assert_array_equal(i, np.arange(n))
    assert sorted(np.asarray(j).tolist()) == list(range(n))  # a permutation: nothing duplicated
    optimum, cost = _emd_mean_cost(x0, x1)
    ours = cost[np.asarray(i), np.asarray(j)].mean()
    assert ours == pytest.approx(optimum, rel=1e-6, abs=1e-9)


def test_native_and_pot_solvers_agree():
    rng = np.random.default_rng(3)
    for n in (5, 50, 200):
        cost = rng.exponential(size=(n, n)).astype(np.float32)
        native, pot = solve_assignment(cost), solve_assignment_pot(cost)
        np.testing.assert_allclose(cost[np.arange(n), native].sum(), cost[np.arange(n), pot].sum(), rtol=1e-6)
    assert HAVE_NATIVE  # the test machine builds the C solver; a fallback would be silently slower


def test_assignment_rejects_non_finite_costs():
    with pytest.raises(ValueError, match="finite"):
        solve_assignment(np.array([[0.0, np.nan], [1.0, 0.0]], np.float32))


def test_squared_distances_closed_form():
    x0 = jnp.array([[0.0, 0.0], [1.0, 1.0]]) + 1000.0  # far from the origin: centring keeps it exact
    x1 = jnp.array([[3.0, 4.0], [1.0, 0.0]]) + 1000.0
    np.testing.assert_allclose(squared_distances(x0, x1), [[25.0, 1.0], [13.0, 1.0]], atol=1e-3)


def test_exact_recovers_a_hidden_permutation_and_labels_follow():
    # x1 is a shuffled, slightly perturbed copy of x0 with class labels: the optimal coupling undoes
    # the shuffle, and labels indexed like x1 follow the pairs.
    key_points, key_perm, key_noise = jax.random.split(jax.random.key(0), 3)
    labels0 = jnp.arange(60) % 3
    x0 = 4.0 * labels0[:, None] + jax.random.normal(key_points, (60, 2))
    perm = jax.random.permutation(key_perm, 60)
    x1 = x0[perm] + 1e-3 * jax.random.normal(key_noise, (60, 2))
    labels1 = labels0[perm]
    i, j = exact()(None, x0, x1)
    np.testing.assert_array_equal(perm[j], i)
    np.testing.assert_array_equal(labels1[j], labels0[i])


def test_exact_inside_the_loss_pairs_by_optimal_transport():
    x0 = jnp.array([[0.0], [10.0]])
    x1 = jnp.array([[10.5], [0.5]])
    _, aux = cfm_loss(lambda p, t, x: 0 * x, None, jax.random.key(0), x0, x1, path=Linear(), coupling=exact())
    np.testing.assert_allclose(aux.sample.x0, x0)
    np.testing.assert_allclose(aux.sample.x1, [[0.5], [10.5]])


def test_sample_plan_rows_follows_each_row():
    plan = jnp.array([[0.5, 0.0, 0.0], [0.0, 0.25, 0.25], [0.1, 0.1, 0.3]])
    keys = jax.random.split(jax.random.key(1), 20_000)
    draws = np.asarray(jax.vmap(lambda k: sample_plan_rows(k, plan))(keys))
    for row in range(3):
        freq = np.bincount(draws[:, row], minlength=3) / len(keys)
        expected = np.asarray(plan[row] / plan[row].sum())
        # binomial standard error at 20 000 draws is <= 0.0036; 5 of them
        np.testing.assert_allclose(freq, expected, atol=0.018)


def test_sinkhorn_plan_has_uniform_marginals_and_approaches_exact():
    x0, x1 = _clouds("random", 64, (2,), seed=5)
    coupling = sinkhorn(epsilon=0.002, threshold=1e-4, max_iterations=20_000)
    plan = coupling.plan(x0, x1)
    np.testing.assert_allclose(plan.sum(axis=1), 1 / 64, atol=1e-4 / 64 * 10)
    np.testing.assert_allclose(plan.sum(axis=0), 1 / 64, atol=1e-4 / 64 * 10)
    optimum, cost = _emd_mean_cost(x0, x1)
    entropic = float(jnp.sum(plan * cost))
    assert optimum <= entropic <= optimum * 1.02  # small epsilon: within 2% of the exact cost


def test_sinkhorn_with_huge_epsilon_is_independent():
    x0, x1 = _clouds("random", 32, (2,), seed=6)
    plan = sinkhorn(epsilon=1e4).plan(x0, x1)
    np.testing.assert_allclose(plan, 1 / 32**2, rtol=1e-3)


def test_sinkhorn_pairs_keep_every_source_point():
    x0, x1 = _clouds("random", 50, (2,), seed=7)
    i, j = jax.jit(sinkhorn())(jax.random.key(3), x0, x1)
    np.testing.assert_array_equal(i, np.arange(50))
    assert j.shape == (50,) and j.dtype == jnp.int32 and int(j.min()) >= 0 and int(j.max()) < 50


def test_schrodinger_bridge_uses_absolute_epsilon_two_sigma_squared():
    coupling = schrodinger_bridge(0.5)
    assert coupling.epsilon == pytest.approx(0.5) and coupling.relative_epsilon is False
    assert make_coupling("sb", sigma=0.5) == coupling


@pytest.mark.parametrize("name", list(COUPLINGS))
def test_every_coupling_jits_and_returns_int32_pairs(name):
    x0, x1 = _clouds("random", 16, (3,), seed=8)
    coupling = make_coupling(name)
    key = jax.random.key(4)
    eager, jitted = coupling(key, x0, x1), jax.jit(coupling)(key, x0, x1)
    for a, b in zip(eager, jitted, strict=True):
        assert a.dtype == jnp.int32 and a.shape == (16,)
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: exact(scope="world"), "scope must be one of 'global', 'local'"),
        (lambda: independent(scope=None), "scope must be one of"),
        (lambda: sinkhorn(epsilon=0.0), "epsilon must be > 0"),
        (lambda: sinkhorn(epsilon=float("inf")), "epsilon must be finite"),
        (lambda: sinkhorn(max_iterations=0), "max_iterations must be >= 1"),
        (lambda: schrodinger_bridge(0.0), "sigma must be > 0"),
        (
            lambda: make_coupling("hungarian"),
            "coupling must be one of 'exact', 'independent', 'sb', 'sinkhorn'",
        ),
    ],
)
def test_bad_arguments_are_named(factory, message):
    with pytest.raises((ValueError, TypeError), match=message):
        factory()


def test_bad_batches_are_named():
    with pytest.raises(ValueError, match="same batch size"):
        exact()(None, jnp.zeros((3, 2)), jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="key is required"):
        sinkhorn()(None, jnp.zeros((3, 2)), jnp.zeros((3, 2)))
    assert isinstance(exact(), Exact) and isinstance(sinkhorn(), Sinkhorn)


def test_points_solver_matches_the_cost_matrix_solver():
    rng = np.random.default_rng(9)
    for n, d in ((7, 1), (100, 2), (120, 32)):
        a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d))
        cost = ot.dist(a, b)
        by_points = solve_assignment_points(a, b)
        by_cost = solve_assignment_pot(cost)
        np.testing.assert_allclose(
            cost[np.arange(n), by_points].sum(), cost[np.arange(n), by_cost].sum(), rtol=1e-6
        )


@pytest.mark.parametrize("dims", [(2,), (40,)])  # points to the host, and the device cost matrix
def test_exact_rejects_non_finite_points(dims):
    x0 = jnp.zeros((4, *dims)).at[1, 0].set(jnp.nan)
    with pytest.raises(Exception, match="finite"):
        jax.block_until_ready(exact()(None, x0, jnp.ones((4, *dims))))

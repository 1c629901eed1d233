"""Couplings with other costs (a function, a manifold's geodesic distance) and unbalanced marginals."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest

from fmjax.couplings import (
    CouplingWarning,
    PerShard,
    exact,
    make_coupling,
    sample_plan_pairs,
    schrodinger_bridge,
    sinkhorn,
)
from fmjax.manifolds import Sphere

KEY = jax.random.key(0)


def squared_euclidean(x, y):
    """The default cost, as a user would write it."""
    return jnp.sum((x[:, None] - y[None]) ** 2, axis=-1)


def product(x, y):
    """x.y: sum_i x_i y_(j_i) is least when the largest x meets the smallest y (rearrangement
    inequality), so in 1D the optimal assignment is anti-monotone."""
    return x @ y.T


def _on_sphere(key, n, dims=3):
    x = jax.random.normal(key, (n, dims))
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


# --- two far-apart clusters, source classes 50:50, target 80:20 -------------------------------------------

_rng = np.random.default_rng(0)
_A, _B = np.array([0.0, 0.0]), np.array([10.0, 0.0])  # 10 apart, spread 0.1: a crossing costs ~100
X0 = jnp.asarray(np.concatenate([_A + 0.1 * _rng.normal(size=(50, 2)), _B + 0.1 * _rng.normal(size=(50, 2))]))
X1 = jnp.asarray(np.concatenate([_A + 0.1 * _rng.normal(size=(80, 2)), _B + 0.1 * _rng.normal(size=(20, 2))]))
CLASS0 = np.repeat([0, 1], [50, 50])
CLASS1 = np.repeat([0, 1], [80, 20])
ACROSS = CLASS0[:, None] != CLASS1[None, :]


def _plan_across(plan):
    plan = np.asarray(plan, np.float64)
    return plan[ACROSS].sum() / plan.sum()


def _pairs_across(i, j):
    return float(np.mean(CLASS0[np.asarray(i)] != CLASS1[np.asarray(j)]))


def test_balanced_plans_move_the_class_surplus_across_and_unbalanced_ones_do_not():
    # A permutation must send 30 of the 50 B sources to the 80 A targets: 0.30 of the mass crosses.
    i, j = exact()(None, X0, X1)
    assert _pairs_across(i, j) == 0.30
    balanced = sinkhorn(epsilon=0.01)
    # the entropic plan crosses 0.30 up to its marginal error (threshold 1e-3) and e^-100-small blur
    assert _plan_across(balanced.plan(X0, X1)) == pytest.approx(0.30, abs=0.02)
    keys = jax.random.split(KEY, 20)
    # 20 x 100 draws, one per row: the fraction's standard error is sqrt(50 0.6 0.4) / 100 / sqrt(20) < 0.008
    drawn = np.mean([_pairs_across(*balanced(key, X0, X1)) for key in keys])
    assert drawn == pytest.approx(0.30, abs=0.03)
    # rho = 9 epsilon ~ 4.5 per unit of mass against a crossing cost of ~100: mass is created and
    # destroyed within each cluster instead of moved across
    unbalanced = sinkhorn(epsilon=0.01, tau_a=0.9, tau_b=0.9)
    assert _plan_across(unbalanced.plan(X0, X1)) < 0.02
    _, _, (i, j), status = unbalanced.apply_with_status(KEY, X0, X1)
    assert _pairs_across(i, j) < 0.02
    assert bool(status["coupling_converged"]) and float(status["coupling_error"]) < 1e-3
    # pairs from the whole plan: x0 rows repeat (the 50 B sources share 20 targets' mass) or are dropped
    assert len(set(np.asarray(i).tolist())) < 100
    # jit == no jit
    _, _, (i_jit, j_jit), status_jit = jax.jit(unbalanced.apply_with_status)(KEY, X0, X1)
    np.testing.assert_array_equal(i_jit, i)
    np.testing.assert_array_equal(j_jit, j)
    assert float(status_jit["coupling_error"]) == pytest.approx(float(status["coupling_error"]), rel=1e-3)


@pytest.mark.filterwarnings("ignore:If reg_type = entropy")  # POT: its reference measure c is unused
@pytest.mark.parametrize(("tau_a", "tau_b"), [(0.7, 0.7), (1.0, 0.5)])
def test_unbalanced_plan_is_pots_with_reg_m_rho_and_tau_rho_over_rho_plus_epsilon(tau_a, tau_b):
    # POT's sinkhorn_knopp_unbalanced with reg_type="entropy" solves
    # min <P, C> - reg H(P) + reg_m1 KL(P 1 | a) + reg_m2 KL(P^T 1 | b): ours with rho = eps tau / (1 - tau)
    x0 = jax.random.normal(jax.random.key(1), (8, 2))
    x1 = jax.random.normal(jax.random.key(2), (8, 2)) + 1.0
    epsilon = 0.5
    coupling = sinkhorn(
        epsilon=epsilon,
        relative_epsilon=False,
        tau_a=tau_a,
        tau_b=tau_b,
        threshold=1e-6,
        max_iterations=20_000,
    )
    rho = [math.inf if tau == 1.0 else epsilon * tau / (1.0 - tau) for tau in (tau_a, tau_b)]
    uniform = np.full(8, 1 / 8)
    cost = ot.dist(np.asarray(x0, np.float64), np.asarray(x1, np.float64))
    expected = ot.unbalanced.sinkhorn_knopp_unbalanced(  # warns that c is unused with "entropy"
        uniform, uniform, cost, reg=epsilon, reg_m=rho, reg_type="entropy", numItermax=100_000, stopThr=1e-12
    )
    plan = np.asarray(coupling.plan(x0, x1), np.float64)
    np.testing.assert_allclose(plan, expected, rtol=1e-3, atol=1e-7)
    assert np.abs(plan.sum(axis=0) - 1 / 8).sum() > 0.05  # x1's marginal is relaxed: not the balanced plan
    if tau_a == 1.0:  # the source marginal is still enforced, and each x0 keeps its one pair
        np.testing.assert_allclose(plan.sum(axis=1), 1 / 8, rtol=1e-4)
        i, _ = coupling(KEY, x0, x1)
        np.testing.assert_array_equal(i, np.arange(8))


def test_an_unconverged_unbalanced_plan_reports_its_optimality_error():
    x0 = jax.random.normal(jax.random.key(1), (8, 2))
    coupling = sinkhorn(tau_a=0.5, tau_b=0.5, max_iterations=2)
    with pytest.warns(
        CouplingWarning, match=r"2 iterations .*optimality error \(unbalanced\) [0-9.e+-]+ >= thr"
    ):
        _, _, (i, j), status = coupling.apply_with_status(KEY, x0, x0 + 3.0)
    assert not bool(status["coupling_converged"]) and 1e-3 <= float(status["coupling_error"]) < math.inf
    assert 0 <= int(i.min()) and int(i.max()) < 8 and 0 <= int(j.min()) and int(j.max()) < 8


# --- other costs ------------------------------------------------------------------------------------------


def test_squared_euclidean_as_a_cost_gives_the_default_pairs():
    x0 = jax.random.normal(jax.random.key(3), (16, 2))
    x1 = jax.random.normal(jax.random.key(4), (16, 2)) + 0.5
    np.testing.assert_array_equal(exact(cost=squared_euclidean)(None, x0, x1)[1], exact()(None, x0, x1)[1])
    # on the clusters, with the balanced coupling of the test above (its solve compiled once)
    default, custom = sinkhorn(epsilon=0.01), sinkhorn(epsilon=0.01, cost=squared_euclidean)
    # the same plan up to float32 rounding of the costs (the default's are centred first)
    np.testing.assert_allclose(custom.plan(X0, X1), default.plan(X0, X1), rtol=1e-3, atol=1e-7)
    j = default(KEY, X0, X1)[1]
    np.testing.assert_array_equal(custom(KEY, X0, X1)[1], j)
    np.testing.assert_array_equal(jax.jit(custom)(KEY, X0, X1)[1], j)  # jit == no jit


def test_a_reversing_cost_gives_the_anti_monotone_assignment_also_within_classes():
    x = jnp.arange(6.0)[:, None]
    coupling = exact(cost=product)
    assert coupling(None, x, x)[1].tolist() == [5, 4, 3, 2, 1, 0]
    # jit == no jit, and a hashable coupling: the jitted call is cached by the coupling's hash
    assert jax.jit(coupling)(None, x, x)[1].tolist() == [5, 4, 3, 2, 1, 0]
    assert exact(cost=product) == coupling and hash(exact(cost=product)) == hash(coupling)
    # by class (0 on the even points, 1 on the odd): reversed within each class
    labels = jnp.arange(6) % 2
    _, j = exact(cost=product, by_label=True)(None, x, x, labels0=labels, labels1=labels)
    assert j.tolist() == [4, 5, 2, 3, 0, 1]
    # unequal class counts take the raised-cost path; a signed cost must not break its penalty
    labels1 = jnp.array([0, 0, 0, 0, 1, 1])
    _, j = exact(cost=product, by_label=True)(None, x, x, labels0=labels, labels1=labels1)
    assert (
        int(np.sum(np.asarray(labels)[np.arange(6)] != np.asarray(labels1)[np.asarray(j)])) == 1
    )  # the surplus


def test_sinkhorn_by_label_with_a_cost_pairs_within_classes():
    x = jax.random.normal(jax.random.key(5), (12, 2))
    labels = jnp.arange(12) % 3
    coupling = sinkhorn(cost=product, by_label=True)
    i, j = coupling(KEY, x, x, labels1=labels)
    np.testing.assert_array_equal(labels[j], labels[i])


# --- a manifold: squared geodesic distances ---------------------------------------------------------------


def test_exact_on_the_sphere_minimises_the_squared_great_circle_distances():
    sphere = Sphere()
    x0, x1 = _on_sphere(jax.random.key(6), 5), _on_sphere(jax.random.key(7), 5)
    cost = np.arccos(np.clip(np.asarray(x0, np.float64) @ np.asarray(x1, np.float64).T, -1, 1)) ** 2
    best = min(itertools.permutations(range(5)), key=lambda p: cost[np.arange(5), list(p)].sum())
    coupling = exact(manifold=sphere)
    assert coupling(None, x0, x1)[1].tolist() == list(best)
    assert jax.jit(coupling)(None, x0, x1)[1].tolist() == list(best)
    assert coupling.host_inputs(x0, x1)[0].shape == (5, 5)  # the device's cost matrix, not the points
    # a larger batch against POT's network simplex on the same cost matrix
    x0, x1 = _on_sphere(jax.random.key(8), 40), _on_sphere(jax.random.key(9), 40)
    cost = np.arccos(np.clip(np.asarray(x0, np.float64) @ np.asarray(x1, np.float64).T, -1, 1)) ** 2
    uniform = np.full(40, 1 / 40)
    optimum = 40 * np.sum(ot.emd(uniform, uniform, cost) * cost)
    _, j = coupling(None, x0, x1)
    assert cost[np.arange(40), np.asarray(j)].sum() == pytest.approx(optimum, rel=1e-5)
    # and the entropic coupling of the same cost approaches that optimum for a small epsilon
    coupling = sinkhorn(manifold=sphere, epsilon=3e-3, max_iterations=5000)
    plan = np.asarray(coupling.plan(x0, x1), np.float64)
    assert bool(coupling.apply_with_status(KEY, x0, x1)[3]["coupling_converged"])
    # (slightly below the optimum is possible: the plan's marginals are met to its threshold, 1e-3)
    assert optimum / 40 * 0.99 <= np.sum(plan * cost) <= optimum / 40 * 1.02


# --- argument checks --------------------------------------------------------------------------------------


class _Unhashable:
    __hash__ = None

    def __call__(self, x, y):
        return x @ y.T

    def dist(self, x, y):
        return jnp.sum(x * y, axis=-1)


BAD_ARGUMENTS = {
    "tau_a-zero": (lambda: sinkhorn(tau_a=0.0), ValueError, r"tau_a must be in \(0, 1\]"),
    "tau_b-above-one": (lambda: sinkhorn(tau_b=1.5), ValueError, r"tau_b must be in \(0, 1\]"),
    "tau_a-nan": (lambda: sinkhorn(tau_a=float("nan")), ValueError, "tau_a must be finite"),
    "tau_b-bool": (lambda: sinkhorn(tau_b=True), TypeError, "tau_b must be a number, not a bool"),
    "cost-not-callable": (lambda: exact(cost="sqeuclidean"), TypeError, "cost must be a function"),
    "cost-signature": (
        lambda: sinkhorn(cost=lambda x: x),
        TypeError,
        r"cost must be callable as cost\(x, y\)",
    ),
    "cost-unhashable": (lambda: sinkhorn(cost=_Unhashable()), TypeError, "cost must be hashable"),
    "both": (
        lambda: exact(cost=squared_euclidean, manifold=Sphere()),
        ValueError,
        "give either cost or manifold, not both",
    ),
    "manifold-without-dist": (
        lambda: sinkhorn(manifold=object()),
        TypeError,
        "manifold must be .* no dist method",
    ),
    "manifold-unhashable": (lambda: exact(manifold=_Unhashable()), TypeError, "manifold must be hashable"),
    "sb-manifold-without-dist": (lambda: schrodinger_bridge(0.5, manifold=3), TypeError, "manifold must be"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_are_named(case):
    factory, error, message = BAD_ARGUMENTS[case]
    with pytest.raises(error, match=message):
        factory()


BAD_OUTPUTS = {
    "vector": (lambda x, y: jnp.sum(x * y, axis=-1), ValueError, r"cost\(x, y\) must return shape \[n, m\]"),
    "too-few-columns": (lambda x, y: (x @ y.T)[:, :3], ValueError, r"= \(4, 4\); got shape \(4, 3\)"),
    "integer": (lambda x, y: jnp.zeros((4, 4), jnp.int32), TypeError, r"cost\(x, y\) must return a real"),
}


@pytest.mark.parametrize("case", list(BAD_OUTPUTS))
@pytest.mark.parametrize("make", [exact, sinkhorn], ids=["exact", "sinkhorn"])
def test_a_cost_of_the_wrong_shape_is_named_at_trace_time(make, case):
    cost, error, message = BAD_OUTPUTS[case]
    coupling = make(cost=cost)
    x = jnp.ones((4, 2))
    for call in (coupling, jax.jit(coupling), coupling.apply_with_status):
        with pytest.raises(error, match=message):
            call(KEY, x, x)
    with pytest.raises(error, match=message):
        coupling.plan(x, x) if make is sinkhorn else coupling.host_inputs(x, x)


def test_a_manifold_whose_distance_has_the_wrong_shape_is_named():
    class Flat:
        def dist(self, x, y):
            return x - y  # not reduced over the last axis

    coupling = exact(manifold=Flat())
    with pytest.raises(ValueError, match=r"manifold.dist\(x\[:, None\], y\[None\]\) must return shape"):
        coupling(None, jnp.ones((4, 2)), jnp.ones((4, 2)))


def test_make_coupling_passes_cost_manifold_and_tau_through():
    assert make_coupling("sinkhorn", tau_a=0.9, tau_b=0.8) == sinkhorn(tau_a=0.9, tau_b=0.8)
    assert make_coupling("exact", cost=product).cost is product
    assert make_coupling("sb", sigma=0.5, manifold=Sphere()).manifold == Sphere()
    assert sinkhorn().balanced and not sinkhorn(tau_b=0.99).balanced


def test_mesh_wrapper_checks_the_inner_cost():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    coupling = PerShard(inner=exact(cost=lambda x, y: (x @ y.T)[:, :3]), mesh=mesh)
    with pytest.raises(ValueError, match=r"cost\(x, y\) must return shape"):
        coupling.apply_with_status(None, jnp.ones((4, 2)), jnp.ones((4, 2)))


# --- sampling a plan whose row sums differ ----------------------------------------------------------------


def test_sample_plan_pairs_draws_from_the_whole_normalised_plan():
    plan = jnp.array([[0.5, 0.0, 0.1], [0.0, 0.0, 0.0], [0.2, 0.4, 0.0]])  # rows of mass 0.6, 0, 0.6
    i, j = jax.jit(sample_plan_pairs, static_argnums=2)(jax.random.key(10), plan, 20_000)
    assert i.dtype == jnp.int32 and i.shape == (20_000,) and j.shape == (20_000,)
    freq = np.zeros((3, 3))
    np.add.at(freq, (np.asarray(i), np.asarray(j)), 1 / 20_000)
    # binomial standard error at 20 000 draws is <= 0.0036; 5 of them
    np.testing.assert_allclose(freq, np.asarray(plan) / 1.2, atol=0.018)
    assert freq[1].sum() == 0.0 and freq[0, 1] == 0.0  # nothing drawn where the plan is empty

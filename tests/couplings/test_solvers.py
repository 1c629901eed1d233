"""Hostile inputs to the couplings' solvers: they never return garbage silently.

Sinkhorn at tiny epsilon or few iterations reports non-convergence (a status under jit, a warning when
called eagerly); batches at 1e30 or 1e-30 are solved as the same batch at scale 1; the exact coupling's
host callback never raises; mismatched batches and bad hyperparameters are named at trace time.
"""

import json
import math
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest
from _host_devices import run_json
from jax.sharding import Mesh

import fmjax.couplings._exact as exact_module
from fmjax._assignment import solve_assignment, solve_assignment_points, solve_assignment_pot
from fmjax.couplings import (
    COUPLINGS,
    HOST_NOT_FINITE,
    HOST_SOLVED,
    HOST_SOLVER_FAILED,
    Coupling,
    CouplingWarning,
    Exact,
    GlobalBatch,
    PerShard,
    exact,
    independent,
    make_coupling,
    schrodinger_bridge,
    sinkhorn,
)
from fmjax.couplings._sinkhorn import _jitted_solution
from fmjax.runs.pipeline import HostPairs

KEY = jax.random.key(0)
_rng = np.random.default_rng(15)
X0 = jnp.asarray(_rng.normal(size=(64, 2)), jnp.float32)
X1 = jnp.asarray(_rng.normal(size=(64, 2)) + 1.0, jnp.float32)


def _status(status):
    assert set(status) == {"coupling_converged", "coupling_error"}
    assert status["coupling_converged"].shape == () and status["coupling_converged"].dtype == jnp.bool_
    assert status["coupling_error"].shape == () and status["coupling_error"].dtype == jnp.float32
    return bool(status["coupling_converged"]), float(status["coupling_error"])


def _pair_cost(x0, x1, j):
    a = np.asarray(x0, np.float64).reshape(len(x0), -1)
    b = np.asarray(x1, np.float64).reshape(len(x1), -1)
    return float(np.sum((a - b[np.asarray(j)]) ** 2))


def _optimal_cost(x0, x1):
    a = np.asarray(x0, np.float64).reshape(len(x0), -1)
    b = np.asarray(x1, np.float64).reshape(len(x1), -1)
    n = len(a)
    plan = ot.emd(np.full(n, 1 / n), np.full(n, 1 / n), ot.dist(a, b), numItermax=10**7)
    return float(n * np.sum(plan * ot.dist(a, b)))


# one jitted apply_with_status per coupling, so tests on the same shapes share its compilation
_JITTED = {}


def _jit_apply(coupling):
    return _JITTED.setdefault(coupling, jax.jit(coupling.apply_with_status))


@pytest.fixture
def no_coupling_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", CouplingWarning)
        yield


# --- Sinkhorn: non-convergence is reported --------------------------------------------------------------

UNCONVERGED = {
    "epsilon=1e-9": sinkhorn(epsilon=1e-9),
    "sb(1e-6)": schrodinger_bridge(1e-6),
    "max_iterations=3": sinkhorn(max_iterations=3),
}


@pytest.mark.parametrize(
    "coupling",
    list(UNCONVERGED.values())
    + [pytest.param(sinkhorn(threshold=1e-12, max_iterations=50), marks=pytest.mark.slow)],
    ids=list(UNCONVERGED) + ["threshold=1e-12"],
)
def test_unconverged_sinkhorn_reports_it_and_still_returns_finite_pairs(coupling):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CouplingWarning)  # eager calls warn; the status is checked here
        a, b, (i, j), status = coupling.apply_with_status(KEY, X0, X1)
    converged, error = _status(status)
    assert not converged and error >= coupling.threshold and not math.isnan(error)
    np.testing.assert_array_equal(i, np.arange(64))
    assert 0 <= int(j.min()) and int(j.max()) < 64
    np.testing.assert_array_equal(b, X1[j])  # the gathered batch is the pairs' batch
    plan = coupling.plan(X0, X1)
    assert bool(jnp.all(jnp.isfinite(plan))) and float(plan.min()) >= 0.0


def test_eager_call_that_does_not_converge_warns_naming_epsilon_iterations_and_error():
    coupling = sinkhorn(max_iterations=3)
    pattern = r"epsilon=0\.05 \(relative to the mean cost\), 3 iterations .*marginal error [0-9.e+-]+ >= thr"
    with pytest.warns(CouplingWarning, match=pattern):
        coupling(KEY, X0, X1)
    with pytest.warns(CouplingWarning, match="epsilon=2e-12 \\(absolute\\), 2000 iterations"):
        schrodinger_bridge(1e-6).apply(KEY, X0, X1)
    # under jit the status is the only report
    with warnings.catch_warnings():
        warnings.simplefilter("error", CouplingWarning)
        _jit_apply(coupling)(KEY, X0, X1)
        with pytest.raises(CouplingWarning):  # a user who wants an error gets one
            coupling.apply_with_status(KEY, X0, X1)


def test_max_iterations_is_honoured_below_one_block():
    assert [sinkhorn(max_iterations=cap).inner_iterations for cap in (1, 7, 10, 2000)] == [1, 7, 10, 10]
    assert sinkhorn(max_iterations=10**6).inner_iterations == 100  # at most 10^4 error checks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CouplingWarning)
        _, _, _, details = sinkhorn(max_iterations=3)._pairs_with_details(KEY, X0, X1)
    assert int(details["iterations"]) == 3


def test_converged_sinkhorn_has_uniform_marginals_within_its_threshold(no_coupling_warnings):
    coupling = sinkhorn(epsilon=0.05, threshold=1e-4, max_iterations=5000)
    plan = np.asarray(coupling.plan(X0, X1), np.float64)
    converged, error = _status(coupling.apply_with_status(KEY, X0, X1)[3])
    assert converged and error < 1e-4
    marginal_error = np.abs(plan.sum(1) - 1 / 64).sum() + np.abs(plan.sum(0) - 1 / 64).sum()
    assert marginal_error == pytest.approx(error, abs=2e-6)  # the status is the plan's own error
    np.testing.assert_allclose(plan.sum(0), 1 / 64, atol=1e-4)


@pytest.mark.parametrize(
    "scale",
    [1e30] + [pytest.param(scale, marks=pytest.mark.slow) for scale in (1.0, 2.0**40, 1e-30)],
)
def test_two_point_entropic_plan_has_its_closed_form_at_every_scale(scale):
    # x0 = x1 = {0, s}: C = s^2 [[0, 1], [1, 0]]. The entropic plan [[p, 1/2 - p], [1/2 - p, p]] solves
    # 2 log(p / (1/2 - p)) = 2 s^2 / epsilon; with epsilon = s^2 (absolute 2 sigma^2, sigma = s / sqrt 2,
    # or relative 2 x mean(C)), p = e / (2 (1 + e)).
    x = jnp.asarray([[0.0], [scale]], jnp.float32)
    p = math.e / (2 * (1 + math.e))
    expected = np.array([[p, 0.5 - p], [0.5 - p, p]])
    for coupling in (
        schrodinger_bridge(scale / math.sqrt(2), threshold=1e-6),
        sinkhorn(epsilon=2.0, threshold=1e-6),
    ):
        plan = coupling.plan(x, x)
        np.testing.assert_allclose(plan, expected, rtol=1e-5)
        assert _status(coupling.apply_with_status(KEY, x, x)[3])[0]


@pytest.mark.parametrize(
    ("make", "scale"),
    [
        (sinkhorn, 2.0**90),
        (sinkhorn, 2.0**-90),
        pytest.param(schrodinger_bridge, 2.0**90, marks=pytest.mark.slow),
        pytest.param(schrodinger_bridge, 2.0**-90, marks=pytest.mark.slow),
    ],
    ids=["rel-2^90", "rel-2^-90", "sb-2^90", "sb-2^-90"],
)
def test_sinkhorn_pairs_are_bitwise_invariant_to_power_of_two_scaling(make, scale):
    # the batch scaled by 2^k is solved as the batch itself (an absolute epsilon scaled by 4^k with it)
    # sinkhorn(): relative epsilon, unchanged; schrodinger_bridge(sigma s): absolute epsilon 2 sigma^2 s^2
    build = (lambda s: sinkhorn()) if make is sinkhorn else schrodinger_bridge
    i, j, status = build(1.0)._run(KEY, X0, X1)
    i_s, j_s, status_s = build(scale)._run(KEY, X0 * scale, X1 * scale)
    np.testing.assert_array_equal(j_s, j)
    assert _status(status_s) == _status(status) and _status(status)[0]


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_sinkhorn_on_huge_and_tiny_batches_converges_to_the_unscaled_plan(scale, no_coupling_warnings):
    coupling = sinkhorn()
    plan = coupling.plan(X0, X1)
    scaled = coupling.plan(X0 * scale, X1 * scale)
    assert bool(jnp.all(jnp.isfinite(scaled)))
    # X * 1e30 is rounded in float32 (relative 6e-8): the plans agree to well within Sinkhorn's tolerance
    np.testing.assert_allclose(scaled, plan, atol=1e-6)
    converged, error = _status(coupling.apply_with_status(KEY, X0 * scale, X1 * scale)[3])
    assert converged and error < coupling.threshold
    _, j = coupling(KEY, X0 * scale, X1 * scale)
    assert len(set(np.asarray(j).tolist())) > 32  # not collapsed (it was 1 of 64 before)


def test_absolute_epsilon_far_below_the_costs_is_flagged_with_its_cause():
    # sigma = 1 on a batch at 1e30: epsilon / cost ~ 1e-60, beyond float32; solved at the floor, flagged
    coupling = schrodinger_bridge(1.0)
    with pytest.warns(CouplingWarning, match="below 2\\^-100 of the largest cost"):
        _, _, _, status = coupling.apply_with_status(KEY, X0 * 1e30, X1 * 1e30)
    assert not _status(status)[0]


def test_absolute_epsilon_far_above_the_costs_is_the_independent_plan(no_coupling_warnings):
    # sigma = 1 on a batch at 1e-30 (and epsilon = 1e30 relative): C / epsilon ~ 0, the plan is 1/n^2
    for coupling, scale in ((schrodinger_bridge(1.0), 1e-30), (sinkhorn(epsilon=1e30), 1.0)):
        plan = coupling.plan(X0 * scale, X1 * scale)
        np.testing.assert_allclose(plan, 1 / 64**2, rtol=1e-5)
        assert _status(coupling.apply_with_status(KEY, X0 * scale, X1 * scale)[3])[0]


def test_sinkhorn_on_nan_under_jit_falls_back_to_the_identity_and_says_so():
    x0 = X0.at[5, 1].set(jnp.nan)
    coupling = sinkhorn()
    # the solve behind every call (jitted; shared with the eager calls on this shape)
    (i, j, status, _), plan = _jitted_solution(coupling, KEY, x0, X1)
    np.testing.assert_array_equal(j, np.arange(64))
    assert _status(status) == (False, math.inf)
    np.testing.assert_array_equal(plan, np.eye(64, dtype=np.float32) / 64)
    with pytest.raises(ValueError, match="x0 must be finite"):  # eagerly, the values are checked first
        coupling(KEY, x0, X1)


def test_identical_points_give_the_uniform_plan(no_coupling_warnings):
    # every cost is 0 (relative epsilon 0 x mean 0): the plan is uniform, not NaN
    same = jnp.full((64, 2), 7.0)
    for coupling in (sinkhorn(), schrodinger_bridge(1.0)):
        np.testing.assert_allclose(coupling.plan(same, same), 1 / 64**2, rtol=1e-5)
        assert _status(coupling.apply_with_status(KEY, same, same)[3]) == (True, pytest.approx(0.0, abs=1e-6))
    i, j = exact()(None, same, same)
    assert sorted(np.asarray(j).tolist()) == list(range(64))


def test_grid_ties_and_duplicates_converge(no_coupling_warnings):
    x0 = jnp.round(2 * X0) / 2
    x1 = jnp.concatenate([jnp.round(X1[:32]), jnp.round(X1[:32])])
    _, _, (i, j), status = sinkhorn(threshold=1e-4, max_iterations=5000).apply_with_status(KEY, x0, x1)
    assert _status(status)[0]
    _, j_exact = exact()(None, x0, x1)
    assert _pair_cost(x0, x1, j_exact) == pytest.approx(_optimal_cost(x0, x1), rel=1e-6, abs=1e-9)


@pytest.mark.slow  # compiles the float64 solvers
def test_float64_batch_beyond_float32_range(x64, no_coupling_warnings):
    x0 = jnp.asarray(np.asarray(X0, np.float64) * 1e200)
    x1 = jnp.asarray(np.asarray(X1, np.float64) * 1e200)
    plan = sinkhorn().plan(x0, x1)
    assert plan.dtype == jnp.float64 and bool(jnp.all(jnp.isfinite(plan)))
    np.testing.assert_allclose(plan.sum(0), 1 / 64, atol=1e-4)
    _, j = exact()(None, x0, x1)
    _, j_ref = exact()(None, X0, X1)
    np.testing.assert_array_equal(j, j_ref)


# --- the exact coupling: huge and tiny batches, a host callback that never raises ------------------------


@pytest.mark.parametrize("dims", [(2,), (6, 7)], ids=["points-to-host", "device-cost-matrix"])
@pytest.mark.parametrize("scale", [1e30, 1e-30, 2.0**100])
def test_exact_solves_huge_and_tiny_batches_as_the_unscaled_one(dims, scale):
    x0 = jnp.asarray(_rng.normal(size=(48, *dims)), jnp.float32)
    x1 = jnp.asarray(_rng.normal(size=(48, *dims)) + 0.5, jnp.float32)
    _, reference = exact()(None, x0, x1)
    _, _, (i, j), status = _jit_apply(exact())(None, x0 * scale, x1 * scale)
    assert _status(status) == (True, 0.0)
    np.testing.assert_array_equal(j, reference)
    # and optimal, by POT's network simplex in float64 on the unscaled batch
    assert _pair_cost(x0, x1, j) == pytest.approx(_optimal_cost(x0, x1), rel=1e-6)


def test_an_outlier_at_1e30_leaves_a_valid_permutation():
    x0 = X0.at[0].set(jnp.array([1e30, -1e30]))
    _, _, (i, j), status = _jit_apply(exact())(None, x0, X1)
    assert _status(status) == (True, 0.0)
    assert sorted(np.asarray(j).tolist()) == list(range(64))
    assert _pair_cost(x0, X1, j) == pytest.approx(_optimal_cost(x0, X1), rel=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dims", [(2,), (40,)], ids=["points-to-host", "device-cost-matrix"])
def test_exact_with_nan_under_jit_returns_a_status_not_a_callback_error(bad, dims, caplog):
    x0 = jnp.zeros((8, *dims)).at[1, 0].set(bad)
    x1 = jnp.ones((8, *dims))
    a, b, (i, j), status = _jit_apply(exact())(None, x0, x1)
    np.testing.assert_array_equal(j, np.arange(8))
    assert _status(status) == (False, math.inf)
    assert not [r for r in caplog.records if "callback" in r.name]  # no "pure_callback failed" logged
    with pytest.raises(ValueError, match="x0 must be finite"):
        exact()(None, x0, x1)


def test_a_failing_host_solver_is_a_status_under_jit_and_an_error_eagerly(monkeypatch):
    def broken(x0, x1):
        raise MemoryError("no room for the cost matrix")

    monkeypatch.setattr(exact_module, "_host_assignment_points", broken)
    _, _, (i, j), status = _jit_apply(exact())(None, X0, X1)
    np.testing.assert_array_equal(j, np.arange(64))
    assert _status(status) == (False, math.inf)
    with pytest.raises(RuntimeError, match="exact coupling: the host assignment solve failed"):
        exact()(None, X0, X1)
    # a solver answer that is no permutation counts as a failure too
    monkeypatch.setattr(exact_module, "_host_assignment_points", lambda a, b: np.zeros(len(a), np.int32))
    assert _status(_jit_apply(exact())(None, X0 + 1, X1)[3]) == (False, math.inf)


@pytest.mark.slow  # compiles the batched callback
def test_exact_under_vmap_flags_only_the_bad_batch():
    xs0 = jnp.stack([X0[:16], X0[16:32].at[3, 0].set(jnp.nan), X0[32:48]])
    xs1 = jnp.stack([X1[:16], X1[16:32], X1[32:48]])
    _, _, (i, j), status = jax.vmap(exact().apply_with_status, in_axes=(None, 0, 0))(None, xs0, xs1)
    np.testing.assert_array_equal(status["coupling_converged"], [True, False, True])
    np.testing.assert_array_equal(status["coupling_error"], [0.0, np.inf, 0.0])
    np.testing.assert_array_equal(j[0], exact()(None, X0[:16], X1[:16])[1])


def test_host_solve_never_raises_and_solve_host_names_the_cause():
    nan = np.full((5, 2), np.nan, np.float32)
    ok = np.zeros((5, 2), np.float32)
    for inputs, code in [
        ((nan, ok), HOST_NOT_FINITE),
        ((np.full((5, 5), np.inf, np.float32),), HOST_NOT_FINITE),
        ((ok, np.zeros((4, 2), np.float32)), HOST_SOLVER_FAILED),  # mismatched clouds
        ((np.zeros((5, 4), np.float32),), HOST_SOLVER_FAILED),  # a cost matrix that is not square
        ((ok, ok + 1), HOST_SOLVED),
    ]:
        j, got = Exact.solve_host_status(inputs)
        assert got == code and j.dtype == np.int32 and sorted(j.tolist()) == list(range(5))
    with pytest.raises(ValueError, match="host assignment solve failed: the inputs hold NaN or inf"):
        Exact.solve_host((nan, ok))


class _RaisingSolve:
    """A duck-typed host-solved coupling whose solve raises."""

    @staticmethod
    def solve_host(inputs):
        raise ZeroDivisionError("boom")


class _WrongShapeSolve:
    @staticmethod
    def solve_host(inputs):
        return np.arange(3, dtype=np.int32)


def test_pipelined_host_pairs_raise_in_the_calling_thread_naming_the_step():
    coupling = exact()
    x0 = jax.random.normal(jax.random.key(1), (3, 16, 2)).at[1, 4, 0].set(jnp.nan)
    x1 = jax.random.normal(jax.random.key(2), (3, 16, 2))
    inputs = jax.vmap(coupling.host_inputs)(x0, x1)
    solver = HostPairs(coupling, threads=2)
    try:
        with pytest.raises(RuntimeError, match="host solve of step 11 failed: the inputs hold NaN or inf"):
            solver.solve(inputs, first_step=10)
        with pytest.raises(RuntimeError, match="step 2 of 3 in this chunk"):
            solver.solve(inputs)
        good = solver.solve(tuple(a[::2] for a in inputs))
        np.testing.assert_array_equal(good[1], exact()(None, x0[2], x1[2])[1])
    finally:
        solver.close()
    for duck, message in [
        (_RaisingSolve(), "ZeroDivisionError: boom"),
        (_WrongShapeSolve(), "the solve returned shape"),
    ]:
        solver = HostPairs(duck, threads=1)
        try:
            with pytest.raises(RuntimeError, match=f"step 1 of 3 in this chunk failed: {message}"):
                solver.solve(tuple(np.asarray(a) for a in inputs))
        finally:
            solver.close()


# loads the compiled solver alone (no jax) in a subprocess, so a hang fails the test instead of the run
_HANG_CHECK = """
import importlib.util, json, sys
import numpy as np
spec = importlib.util.spec_from_file_location("_lap", sys.argv[1])
lap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lap)
costs = np.load(sys.argv[2])
print(json.dumps({name: np.frombuffer(lap.solve(c, len(c)), np.int32).tolist() for name, c in costs.items()}))
"""


def test_assignment_with_equal_or_negative_costs_terminates(tmp_path):
    # all-equal negative costs once made the auction's bids too small to move a float32 price: a hang
    from fmjax import _lap

    rng = np.random.default_rng(0)
    costs = {
        "minus-ones": -np.ones((40, 40)),
        "sevens": np.full((300, 300), 7.0),
        "offset": 1e6 + rng.random((200, 200)),
        "negative": -rng.random((200, 200)),
    }
    costs = {name: np.ascontiguousarray(c, np.float32) for name, c in costs.items()}
    np.savez(tmp_path / "costs.npz", **costs)
    done = subprocess.run(
        [sys.executable, "-c", _HANG_CHECK, _lap.__file__, str(tmp_path / "costs.npz")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for name, j in json.loads(done.stdout).items():
        cost = costs[name].astype(np.float64)
        rows = np.arange(len(cost))
        assert sorted(j) == rows.tolist()
        optimum = cost[rows, solve_assignment_pot(cost)].sum()
        assert cost[rows, j].sum() == pytest.approx(optimum, rel=1e-7, abs=1e-3)


@pytest.mark.parametrize("scale", [1e38, 1e-35, 1e300])
def test_assignment_costs_near_and_beyond_float32_range_match_network_simplex(scale):
    base = _rng.random((60, 60))
    cost = base * scale  # float64; 1e300 does not fit float32 at all
    j = solve_assignment(cost)
    reference = solve_assignment_pot(base)
    assert base[np.arange(60), j].sum() == pytest.approx(base[np.arange(60), reference].sum(), rel=1e-6)
    points0, points1 = _rng.normal(size=(30, 3)), _rng.normal(size=(30, 3))
    np.testing.assert_array_equal(
        solve_assignment_points(points0 * scale, points1 * scale), solve_assignment_points(points0, points1)
    )


# --- batch shapes and dtypes: named at trace time --------------------------------------------------------

BAD_BATCHES = {
    "dims": ((8, 2), (8, 3), ValueError, r"x0 and x1 must have the same shape .*\(8, 2\).*\(8, 3\)"),
    "batch": ((8, 2), (6, 2), ValueError, r"same batch size.*\(8, 2\).*\(6, 2\)"),
    "rank": ((8, 2), (8, 2, 1), ValueError, r"same shape.*\(8, 2, 1\)"),
    "rank-1": ((8,), (8,), ValueError, r"x0.*rank >= 2"),
    "empty": ((0, 2), (0, 2), ValueError, r"x0.*at least one sample"),
    "no-features": ((8, 0), (8, 0), ValueError, r"x0.*at least one value per sample"),
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
@pytest.mark.parametrize("name", list(COUPLINGS))
def test_mismatched_batches_are_named_at_trace_time(name, case):
    shape0, shape1, error, message = BAD_BATCHES[case]
    coupling = make_coupling(name)
    for call in (coupling, coupling.apply_with_status):
        with pytest.raises(error, match=message):
            jax.jit(call)(KEY, jnp.zeros(shape0), jnp.ones(shape1))


@pytest.mark.parametrize("name", list(COUPLINGS))
def test_non_float_batches_are_named(name):
    coupling = make_coupling(name)
    with pytest.raises(TypeError, match="x0 must be a float32"):
        coupling(KEY, jnp.zeros((4, 2), jnp.int32), jnp.zeros((4, 2), jnp.int32))
    with pytest.raises(TypeError, match="x1"):
        coupling(KEY, jnp.zeros((4, 2)), [[0.0, 0.0]] * 4)


@pytest.mark.parametrize("name", list(COUPLINGS))
def test_a_batch_of_one_is_its_own_pair(name, no_coupling_warnings):
    a, b, (i, j), status = make_coupling(name).apply_with_status(KEY, jnp.zeros((1, 3)), jnp.ones((1, 3)))
    assert i.tolist() == [0] and j.tolist() == [0]
    converged, error = _status(status)
    assert converged and error == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("key", "error", "message"),
    [
        (None, ValueError, "key is required"),
        (0, TypeError, "key must be a PRNG key"),
        (jnp.zeros(3, jnp.uint32), TypeError, "key must be a PRNG key"),
        (jax.random.split(KEY, 2), TypeError, "key must be a PRNG key"),
    ],
)
def test_sinkhorn_keys_are_checked(key, error, message):
    with pytest.raises(error, match=message):
        sinkhorn()(key, X0, X1)


@pytest.mark.slow  # another compile, for the raw key
def test_legacy_prng_keys_are_accepted(no_coupling_warnings):
    i, j = sinkhorn()(jax.random.PRNGKey(0), X0, X1)
    assert j.shape == (64,)


# --- the status contract on every coupling ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["independent", "exact", "sinkhorn", pytest.param("sb", marks=pytest.mark.slow)]
)
def test_status_is_the_same_with_and_without_jit_and_traced_once(name, no_coupling_warnings):
    coupling = make_coupling(name)
    traces = []

    def step(key, x0, x1):
        traces.append(1)
        return coupling.apply_with_status(key, x0, x1)

    jitted = jax.jit(step)
    eager = coupling.apply_with_status(KEY, X0, X1)
    for x0 in (X0, X0 + 0.5):
        out = jitted(KEY, x0, X1)
    np.testing.assert_array_equal(jitted(KEY, X0, X1)[2][1], eager[2][1])
    # the same plan; its error agrees to float32 rounding of a sum of 2n terms
    assert _status(out[3])[0] and _status(eager[3]) == pytest.approx(
        _status(jitted(KEY, X0, X1)[3]), rel=1e-3
    )
    assert len(traces) == 1


def test_independent_status_and_no_gather():
    a, b, (i, j), status = independent().apply_with_status(None, X0, X1)
    assert a is X0 and b is X1 and _status(status) == (True, 0.0)


def test_a_user_coupling_that_implements_only_pairs_reports_converged():
    class Reversed(Coupling):
        def pairs(self, key, x0, x1):
            n = x0.shape[0]
            return jnp.arange(n), jnp.arange(n)[::-1]

    jax.tree_util.register_static(Reversed)
    a, b, (i, j), status = jax.jit(Reversed().apply_with_status)(None, X0, X1)
    np.testing.assert_array_equal(b, X1[::-1])
    assert _status(status) == (True, 0.0)


# --- hyperparameters -------------------------------------------------------------------------------------


def test_numpy_and_0d_scalars_are_accepted_and_stored_as_python_numbers():
    coupling = sinkhorn(epsilon=np.float32(0.1), max_iterations=np.int64(500), threshold=np.float64(1e-3))
    assert coupling == sinkhorn(epsilon=0.1, max_iterations=500, threshold=1e-3)
    assert type(coupling.epsilon) is float and type(coupling.max_iterations) is int
    assert schrodinger_bridge(np.float32(0.5)) == schrodinger_bridge(0.5)
    assert sinkhorn(relative_epsilon=np.bool_(False)).relative_epsilon is False
    assert sinkhorn(epsilon=jnp.asarray(0.25)).epsilon == 0.25
    assert hash(coupling) == hash(sinkhorn(epsilon=0.1, max_iterations=500))  # a static, jit-cacheable pytree


BAD_HYPERPARAMETERS = {
    "bool-epsilon": (lambda: sinkhorn(epsilon=True), TypeError, "epsilon must be a number, not a bool"),
    "np-bool-epsilon": (
        lambda: sinkhorn(epsilon=np.True_),
        TypeError,
        "epsilon must be a number, not a bool",
    ),
    "nan-epsilon": (lambda: sinkhorn(epsilon=float("nan")), ValueError, "epsilon must be finite"),
    "np-inf-epsilon": (lambda: sinkhorn(epsilon=np.float32("inf")), ValueError, "epsilon must be finite"),
    "negative-epsilon": (lambda: sinkhorn(epsilon=-1e-3), ValueError, "epsilon must be > 0"),
    "string-epsilon": (lambda: sinkhorn(epsilon="0.1"), TypeError, "epsilon"),
    "vector-epsilon": (lambda: sinkhorn(epsilon=jnp.ones(2)), TypeError, "epsilon must be a scalar"),
    "traced-epsilon": (
        lambda: jax.jit(lambda e: sinkhorn(epsilon=e).epsilon)(0.1),
        TypeError,
        "epsilon is a hyperparameter and must be a concrete number",
    ),
    "bool-iterations": (lambda: sinkhorn(max_iterations=True), TypeError, "max_iterations"),
    "fractional-iterations": (lambda: sinkhorn(max_iterations=2.5), TypeError, "max_iterations"),
    "zero-iterations": (
        lambda: sinkhorn(max_iterations=np.int64(0)),
        ValueError,
        "max_iterations must be >= 1",
    ),
    "huge-iterations": (lambda: sinkhorn(max_iterations=10**12), ValueError, "max_iterations must be <="),
    "nan-threshold": (lambda: sinkhorn(threshold=float("nan")), ValueError, "threshold must be finite"),
    "int-relative": (lambda: sinkhorn(relative_epsilon=1), TypeError, "relative_epsilon must be a bool"),
    "bool-sigma": (lambda: schrodinger_bridge(True), TypeError, "sigma"),
    "inf-sigma": (lambda: schrodinger_bridge(float("inf")), ValueError, "sigma must be finite"),
    "underflowing-sigma": (
        lambda: schrodinger_bridge(1e-200),
        ValueError,
        "sigma must give a positive, finite",
    ),
    "overflowing-sigma": (
        lambda: schrodinger_bridge(1e200),
        ValueError,
        "sigma must give a positive, finite",
    ),
}


@pytest.mark.parametrize("case", list(BAD_HYPERPARAMETERS))
def test_bad_hyperparameters_are_named(case):
    factory, error, message = BAD_HYPERPARAMETERS[case]
    with pytest.raises(error, match=message):
        factory()


# --- on a device mesh: the status is reduced over the devices (8 host devices, in a subprocess) ----------

_MESH_CHECK = """
import json, os, warnings
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
from fmjax.couplings import CouplingWarning, GlobalBatch, PerShard, exact, independent, sinkhorn

mesh = Mesh(np.array(jax.devices()), ("data",))
x0 = jax.random.normal(jax.random.key(0), (64, 2))
x1 = jax.random.normal(jax.random.key(1), (64, 2)) + 2.0
bad = x0.at[20, 0].set(jnp.nan)  # on the third device's shard
key = jax.random.key(2)
out = {}
for wrap in (PerShard, GlobalBatch):
    for name, inner, a in [("independent", independent(), x0), ("exact", exact(), x0),
                           ("exact-nan", exact(), bad), ("sinkhorn", sinkhorn(), x0),
                           ("sinkhorn-3", sinkhorn(max_iterations=3), x0)]:
        coupling = wrap(inner=inner, mesh=mesh)
        _, b, (i, j), status = jax.jit(coupling.apply_with_status)(key, a, x1)
        error = status["coupling_error"]
        out[f"{wrap.__name__}/{name}"] = [bool(status["coupling_converged"]), float(error), str(error.dtype),
                                          list(error.shape)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrap(inner=sinkhorn(max_iterations=3), mesh=mesh).apply_with_status(key, x0, x1)
    out[f"{wrap.__name__}/warned"] = [str(w.message)[:60] for w in caught if w.category is CouplingWarning]
print(json.dumps(out))
"""


@pytest.mark.parametrize("wrap", [PerShard, pytest.param(GlobalBatch, marks=pytest.mark.slow)])
def test_mesh_wrappers_report_the_inner_status_on_one_device(wrap):
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    bad = X0.at[20, 0].set(jnp.nan)
    status = _jit_apply(wrap(inner=exact(), mesh=mesh))(None, bad, X1)[3]
    assert _status(status) == (False, math.inf)
    coupling = wrap(inner=sinkhorn(max_iterations=3), mesh=mesh)
    _, b, (i, j), status = jax.jit(coupling.apply_with_status)(KEY, X0, X1)
    converged, error = _status(status)
    assert not converged and error > 1e-3
    np.testing.assert_array_equal(b, X1[j])


@pytest.mark.slow  # ~35 s: a subprocess with 8 host devices
def test_mesh_wrappers_reduce_the_status_over_devices():
    out = run_json("-c", textwrap.dedent(_MESH_CHECK))
    for wrap in ("PerShard", "GlobalBatch"):
        assert out[f"{wrap}/independent"] == [True, 0.0, "float32", []]
        assert out[f"{wrap}/exact"] == [True, 0.0, "float32", []]
        assert out[f"{wrap}/exact-nan"][:2] == [False, math.inf]  # one device's failure fails the step
        assert out[f"{wrap}/sinkhorn"][0] and out[f"{wrap}/sinkhorn"][1] < 1e-3
        assert not out[f"{wrap}/sinkhorn-3"][0] and out[f"{wrap}/sinkhorn-3"][1] > 1e-3
        assert out[f"{wrap}/warned"] == ["Sinkhorn coupling did not converge: epsilon=0.05 (relative t"]

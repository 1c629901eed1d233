"""Entropic OT couplings with ott-jax's Sinkhorn: the Sinkhorn coupling (balanced or unbalanced, any cost)
and SB-CFM's coupling."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fmjax._checks import ArgumentError, check_bool, check_choice, check_int, check_real, is_traced
from fmjax.couplings._base import SCOPES, Coupling, CouplingWarning, Labels, _coupling_dataclass, _status
from fmjax.couplings._costs import (
    _centred_costs,
    _normalised,
    _times_power_of_two,
    check_cost,
    check_cost_output,
    cost_matrix,
)
from fmjax.couplings._sampling import _sample_log_pairs, sample_plan_rows

# Sinkhorn's cap on iterations (ott-jax counts them in int32).
MAX_SINKHORN_ITERATIONS = 10**9


def _scalar(name: str, value: Any) -> Any:
    """A numpy scalar or concrete 0-d array as the Python number it holds; bools refused."""
    if isinstance(value, bool | np.bool_) or getattr(value, "dtype", None) == np.bool_:
        raise TypeError(f"{name} must be a number, not a bool; got {value!r}")
    if isinstance(value, np.floating):
        return float(str(value))  # np.float32(0.1) is 0.1, not 0.10000000149011612
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        if value.shape != ():
            raise TypeError(f"{name} must be a scalar; got an array of shape {value.shape}")
        if isinstance(value, jax.core.Tracer):
            raise TypeError(f"{name} is a hyperparameter and must be a concrete number, not a traced array")
        return np.asarray(value).item()
    return value


def _real(name: str, value: Any, **bounds: Any) -> float:
    return check_real(name, _scalar(name, value), **bounds)


def _int(name: str, value: Any, **bounds: Any) -> int:
    return int(check_int(name, _scalar(name, value), **bounds))


def _tau(name: str, value: Any) -> float:
    tau = _real(name, value)
    if not 0.0 < tau <= 1.0:
        raise ArgumentError(
            lambda n: (
                f"{n(name)} must be in (0, 1] (1 enforces the marginal exactly, smaller values "
                f"relax it); got {tau!r}"
            )
        )
    return tau


def _optimal_sums(potential: jax.Array, tau: float, epsilon: jax.Array, size: int) -> Any:
    """The row (column) sums of the unbalanced optimum for a potential f (g): ``(1/size) e^(-f / rho)``
    with ``rho = epsilon tau / (1 - tau)``; the uniform ``1/size`` for tau = 1 (rho = inf)."""
    if tau == 1.0:
        return 1.0 / size
    return jnp.exp(-potential * ((1.0 - tau) / tau) / epsilon) / size


# Sinkhorn's epsilon, in units of the normalised cost scale, is kept in [2^-100, 2^100]: the
# log-domain iterations then never meet cost / epsilon or potentials / epsilon beyond float32's range
# (2^128). An epsilon asked below the range is solved at its floor and reported as not converged.
_EPSILON_RANGE = 100


@_coupling_dataclass
class Sinkhorn(Coupling):
    """Entropic OT coupling with ott-jax's Sinkhorn; each x0[i] is paired with a draw from row i of the plan.

    The plan is ``P = argmin_{P 1 = 1/n, P^T 1 = 1/n} <P, C> - epsilon H(P)`` for the squared distances
    ``C_ij = ||x0[i] - x1[j]||^2``, computed in the log domain as ``log P_ij = (f_i + g_j - C_ij) / epsilon``
    from Sinkhorn's potentials. ``epsilon`` is relative to the mean of C when ``relative_epsilon`` is True,
    absolute (in the units of C) otherwise. ``threshold`` is the tolerance on the marginal error
    ``sum_i |sum_j P_ij - 1/n| + sum_j |sum_i P_ij - 1/n|`` and ``max_iterations`` the iteration cap
    (iterations run in blocks of min(10, max_iterations), more for caps above 10^5, with the error
    checked after each block).

    Numerics: the points are centred and scaled by a power of two (an absolute epsilon by its square),
    which leaves the plan unchanged and keeps batches at 1e30 or 1e-30 in range; rows are sampled from
    ``exp(log P_ij - max_j log P_ij)``, so no row is ever empty. ``apply_with_status`` reports the final
    marginal error and ``coupling_converged = error < threshold``; if the plan holds NaN (a traced batch
    with NaN), the pairs fall back to ``j = arange(n)`` with ``coupling_converged = False`` and
    ``coupling_error = inf``. Called eagerly, a coupling that did not converge warns
    (``CouplingWarning``) naming epsilon, the iterations run and the error.

    With ``by_label=True`` every call takes integer class labels (``labels1=``, optionally
    ``labels0=``; x0[i] takes the class of x1[i] when only x1's are given, as for ``Exact``). Each
    cross-class cost is raised by ``2 max(C) + 100 epsilon`` (epsilon as computed from the unraised
    costs), which leaves at most ``e^-100`` of the mass across classes when the class counts agree:
    the plan is then the entropic plan of each class on its own (with the batch's epsilon). Each row
    is sampled only among the columns of its class (when x1 has one of that class), so no pair
    crosses classes; with unequal counts some x1 of a class are drawn more often than others.

    Other costs: with ``cost`` (a hashable function ``cost(x, y) -> [n, m]`` of batches x [n, *dims],
    y [m, *dims]) C is ``cost(x0, x1)`` as it comes (not centred or rescaled); with ``manifold=M``,
    ``C_ij = M.dist(x0[i], x1[j])^2``. Both go to ott-jax as ``Geometry(cost_matrix=C)``. A relative
    epsilon is then relative to the mean absolute cost ``mean_ij |C_ij|`` (the mean cost for the usual
    non-negative costs, and positive for signed ones), and the by-label raise uses ``max |C|``.

    Unbalanced marginals: with ``tau_a`` or ``tau_b`` below 1 the marginal constraints become penalties,
    as in ott-jax's ``LinearProblem(geom, tau_a, tau_b)``: Sinkhorn solves

        min_{P >= 0} <P, C> - epsilon H(P) + rho_a KL(P 1 | a) + rho_b KL(P^T 1 | b),

    a = b = 1/n, H(P) = -sum P_ij (log P_ij - 1), KL(p | q) = sum p log(p / q) - p + q, with
    ``tau = rho / (rho + epsilon)``, i.e. ``rho = epsilon tau / (1 - tau)`` (epsilon as used, so a
    relative epsilon makes rho relative too). tau = 1 (rho = inf) enforces that marginal exactly; as
    tau -> 0 it is free, and mass that would have to travel far is created or destroyed instead.
    TorchCFM's unbalanced coupling passes its ``reg`` and ``reg_m`` to POT's
    ``sinkhorn_knopp_unbalanced``, whose ``reg_m`` is this rho (on both sides, in the units of the
    cost); with POT's ``reg_type="entropy"`` (its default before POT 0.9.5) that is this problem with an
    absolute epsilon = reg and ``tau = reg_m / (reg_m + reg)``. (POT's later default, "kl", regularises
    by ``reg KL(P | a b^T)``, which adds ``reg log(n m)`` per unit of mass: another, lighter plan.)
    The plan's row sums are then not uniform, so when ``tau_a < 1`` the n pairs are n independent
    draws ``(i, j) ~ P_ij / sum(P)`` from the whole normalised plan (``sample_plan_pairs``, as TorchCFM
    samples): a source point may be drawn several times or not at all, and ``i`` is not
    ``arange(n)``. With ``tau_a = 1`` the rows keep mass 1/n and each x0[i] is paired with a draw from
    its row, as in the balanced case. The status's error is then the solver's optimality residual
    ``sum_i |sum_j P_ij - a_i e^(-f_i / rho_a)| + sum_j |sum_i P_ij - b_j e^(-g_j / rho_b)|`` (f, g the
    potentials, ``log P_ij = (f_i + g_j - C_ij) / epsilon``), which ott-jax checks against
    ``threshold``; with tau = 1 a term is the balanced marginal error.
    """

    epsilon: float = 0.05
    relative_epsilon: bool = True
    max_iterations: int = 2000
    threshold: float = 1e-3
    scope: str = "local"
    by_label: bool = False
    tau_a: float = 1.0
    tau_b: float = 1.0
    cost: Callable[[jax.Array, jax.Array], jax.Array] | None = None
    manifold: Any = None
    uses_key: bool = dataclasses.field(default=True, init=False)

    def __post_init__(self):
        set_field = lambda name, value: object.__setattr__(self, name, value)
        set_field("epsilon", _real("epsilon", self.epsilon, low=0.0, low_inclusive=False))
        set_field(
            "max_iterations",
            _int("max_iterations", self.max_iterations, low=1),
        )
        if self.max_iterations > MAX_SINKHORN_ITERATIONS:
            raise ValueError(
                f"max_iterations must be <= {MAX_SINKHORN_ITERATIONS}; got {self.max_iterations}"
            )
        set_field("threshold", _real("threshold", self.threshold, low=0.0, low_inclusive=False))
        if not isinstance(self.relative_epsilon, bool | np.bool_):
            raise TypeError(f"relative_epsilon must be a bool; got {self.relative_epsilon!r}")
        set_field("relative_epsilon", bool(self.relative_epsilon))
        check_choice("scope", self.scope, SCOPES)
        set_field("by_label", check_bool("by_label", self.by_label))
        set_field("tau_a", _tau("tau_a", self.tau_a))
        set_field("tau_b", _tau("tau_b", self.tau_b))
        check_cost(self.cost, self.manifold)

    @property
    def balanced(self) -> bool:
        """Whether both marginals are enforced exactly (tau_a = tau_b = 1)."""
        return self.tau_a == 1.0 and self.tau_b == 1.0

    def _check_inputs(self, key, x0, x1) -> None:
        super()._check_inputs(key, x0, x1)
        check_cost_output(self.cost, self.manifold, x0, x1)

    @property
    def inner_iterations(self) -> int:
        """Iterations between two error checks: at most 10^4 checks, and never more than the cap."""
        return min(self.max_iterations, max(10, -(-self.max_iterations // 10_000)))

    def _solve(self, x0: jax.Array, x1: jax.Array, labels=None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``log P`` of shape [n, n] and ``{"error", "iterations", "epsilon_floor", "fallback"}``."""
        from ott.geometry import geometry
        from ott.problems.linear import linear_problem
        from ott.solvers.linear import sinkhorn

        n = x0.shape[0]
        if self.cost is None and self.manifold is None:
            a, b, k = _normalised(x0.reshape(n, -1), x1.reshape(n, -1))
            cost = _centred_costs(a, b)
            top, mean, shift = jnp.max(cost), jnp.mean(cost), 2 * k  # the costs were scaled by 4^k
        else:
            cost = cost_matrix(self.cost, self.manifold, x0, x1)
            top, mean, shift = jnp.max(jnp.abs(cost)), jnp.mean(jnp.abs(cost)), 0
        unit = jnp.where(top > 0, top, 1.0)
        if self.relative_epsilon:
            asked = self.epsilon * mean
        else:
            # epsilon 4^k as mantissa 2^(exponent + 2k): exact, and in range whenever the result is
            # (an epsilon of 1e60 for costs of 1e60 is fine although neither fits float32)
            mantissa, exponent = math.frexp(self.epsilon)
            asked = _times_power_of_two(jnp.asarray(mantissa, cost.dtype), shift + exponent)
        low, high = unit * 2.0**-_EPSILON_RANGE, unit * 2.0**_EPSILON_RANGE
        epsilon = jnp.clip(asked, low, high)
        floor = (asked < low) & (top > 0)
        if labels is not None:
            across = labels[0][:, None] != labels[1][None, :]
            cost = jnp.where(across, cost + (2.0 * top + 100.0 * epsilon), cost)

        geom = geometry.Geometry(cost_matrix=cost, epsilon=epsilon)
        solver = sinkhorn.Sinkhorn(
            max_iterations=self.max_iterations,
            threshold=self.threshold,
            inner_iterations=self.inner_iterations,
            lse_mode=True,
        )
        out = solver(linear_problem.LinearProblem(geom, tau_a=self.tau_a, tau_b=self.tau_b))
        log_plan = (out.f[:, None] + out.g[None, :] - cost) / epsilon
        # the error of the plan actually sampled (ott's own check can miss a divergence): the marginal
        # error, or unbalanced, the residual of the optimality conditions ott-jax checks
        rows = jnp.exp(jax.nn.logsumexp(log_plan, axis=1))
        cols = jnp.exp(jax.nn.logsumexp(log_plan, axis=0))
        m = x1.shape[0]
        row_sums = _optimal_sums(out.f, self.tau_a, epsilon, n)
        col_sums = _optimal_sums(out.g, self.tau_b, epsilon, m)
        error = jnp.sum(jnp.abs(rows - row_sums)) + jnp.sum(jnp.abs(cols - col_sums))
        fallback = ~(jnp.all(jnp.isfinite(log_plan)) & jnp.isfinite(error))
        error = jnp.where(fallback, jnp.inf, error)
        details = {
            "error": error,
            "iterations": jnp.asarray(out.n_iters, jnp.int32),
            "epsilon_floor": floor,
            "fallback": fallback,
        }
        return log_plan, details

    def plan(
        self, x0: jax.Array, x1: jax.Array, *, labels0: Labels = None, labels1: Labels = None
    ) -> jax.Array:
        """The entropic transport plan between the two batches (uniform weights), shape [n, n].

        Entries are ``exp(min(log P_ij, 0))`` (a balanced plan's entries never exceed its total mass 1);
        when the plan would hold NaN it is the fallback ``I / n``, the plan of the pairs ``j = arange(n)``.
        With ``by_label``, the plan of the raised cross-class costs (labels as for ``__call__``). An
        unbalanced plan (tau < 1) has the row and column sums its penalties chose, and a total mass
        that is in general not 1; the pairs are drawn from it normalised.
        """
        check_cost_output(self.cost, self.manifold, x0, x1)
        labels = self._labels(x0, labels0, labels1)
        if not is_traced(x0, x1, labels):  # eagerly: one compiled solve per coupling and shape
            return _jitted_solution(self, jax.random.key(0), x0, x1, labels)[1]
        return self._plan(*self._solve(x0, x1, labels))

    @staticmethod
    def _plan(log_plan, details):
        n = log_plan.shape[0]
        plan = jnp.exp(jnp.minimum(log_plan, 0.0))
        return jnp.where(details["fallback"], jnp.eye(n, dtype=plan.dtype) / n, plan)

    def _pairs_with_details(self, key, x0, x1, labels=None):
        if not is_traced(key, x0, x1, labels):
            return _jitted_solution(self, key, x0, x1, labels)[0]
        return self._sample(key, *self._solve(x0, x1, labels), labels=labels)

    def _sample(self, key, log_plan, details, labels=None):
        """``(i, j, status, details)`` from ``_solve``'s solution: j_i drawn from row i of the plan
        (with labels, among the columns of row i's class when there are any); with tau_a < 1, n pairs
        drawn from the whole plan."""
        details = dict(details)
        n = log_plan.shape[0]
        i = jnp.arange(n, dtype=jnp.int32)
        safe = jnp.where(details["fallback"], 0.0, log_plan)
        if labels is not None:
            same = labels[0][:, None] == labels[1][None, :]
            safe = jnp.where(same | ~jnp.any(same, axis=1, keepdims=True), safe, -jnp.inf)
        if self.tau_a == 1.0:  # every row holds mass 1/n: one draw per row keeps every x0
            weights = jnp.exp(safe - jnp.max(safe, axis=1, keepdims=True))  # each row's largest weight is 1
            j = jnp.where(details["fallback"], i, sample_plan_rows(key, weights))
        else:
            drawn_i, drawn_j = _sample_log_pairs(key, safe, n)
            i, j = jnp.where(details["fallback"], i, drawn_i), jnp.where(details["fallback"], i, drawn_j)
        error = details.pop("error")
        converged = (error < self.threshold) & ~details["epsilon_floor"] & ~details["fallback"]
        return i, j, _status(converged, error), details

    def pairs(self, key, x0, x1):
        # the one entry point that skips _check_inputs (which requires the key for the other calls)
        if key is None:
            raise ValueError("key is required: the Sinkhorn coupling samples its plan")
        i, j, _, _ = self._pairs_with_details(key, x0, x1)
        return i, j

    def _failed(self, error, details):
        kind = "relative to the mean cost" if self.relative_epsilon else "absolute"
        what = "marginal error" if self.balanced else "optimality error (unbalanced)"
        notes = []
        if details.get("epsilon_floor", False):
            notes.append(
                "epsilon is below 2^-100 of the largest cost, beyond float32's reach; solved at that floor"
            )
        if details.get("fallback", False):
            notes.append("the plan held NaN; the pairs fell back to j = arange(n)")
        note = f" ({'; '.join(notes)})" if notes else ""
        warnings.warn(
            f"Sinkhorn coupling did not converge: epsilon={self.epsilon:g} ({kind}), "
            f"{int(details.get('iterations', -1))} iterations (max_iterations={self.max_iterations}), "
            f"{what} {error:.3g} >= threshold {self.threshold:g}{note}. The pairs come from the "
            f"unconverged plan; raise epsilon or max_iterations, or use exact().",
            CouplingWarning,
            stacklevel=5,
        )


def _solution(coupling: Sinkhorn, key, x0, x1, labels=None):
    """``((i, j, status, details), plan)`` from one solve."""
    log_plan, details = coupling._solve(x0, x1, labels)
    return coupling._sample(key, log_plan, details, labels), coupling._plan(log_plan, details)


# Eager Sinkhorn calls (pairs or plan) run through this, compiled once per coupling (a static pytree)
# and shape: the solver's while loop would otherwise be traced and compiled anew on every call.
_jitted_solution = jax.jit(_solution, static_argnums=0)


def sinkhorn(
    *,
    epsilon: float = 0.05,
    relative_epsilon: bool = True,
    max_iterations: int = 2000,
    threshold: float = 1e-3,
    scope: str = "local",
    by_label: bool = False,
    tau_a: float = 1.0,
    tau_b: float = 1.0,
    cost: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    manifold: Any = None,
) -> Sinkhorn:
    """Return the entropic OT coupling; ``epsilon`` is relative to the mean cost unless told otherwise.

    Numbers may be Python or numpy scalars (``np.float32(0.1)``, ``np.int64(500)``); bools, NaN and inf
    are refused with the argument named. ``by_label=True`` pairs only within classes (see ``Sinkhorn``).

    ``cost=f`` (a hashable function, ``f(x0, x1) -> [n, m]``) or ``manifold=M`` (squared geodesic
    distances ``M.dist(x0[i], x1[j])^2``) replace the squared Euclidean cost; not both. ``tau_a``,
    ``tau_b`` in (0, 1] relax the source and target marginals (unbalanced OT): ``tau = rho / (rho +
    epsilon)`` for a KL penalty ``rho KL(P 1 | a)`` on the marginal; 1 enforces it exactly. With
    ``tau_a < 1`` the n pairs are drawn from the whole normalised plan (see ``Sinkhorn``).

    Two clusters at 0 and 10, the source split 2:2, the target 3:1: the balanced plan must move a
    quarter of the mass across; relaxing the marginals moves next to none.

    >>> import jax, jax.numpy as jnp
    >>> x0 = jnp.array([[0.0], [0.1], [10.0], [10.1]])
    >>> x1 = jnp.array([[0.0], [0.1], [0.2], [10.0]])
    >>> across = lambda plan: float(plan[2:, :3].sum() + plan[:2, 3:].sum()) / float(plan.sum())
    >>> round(across(sinkhorn(epsilon=1e-3).plan(x0, x1)), 2)
    0.25
    >>> across(sinkhorn(epsilon=1e-3, tau_a=0.9, tau_b=0.9).plan(x0, x1)) < 1e-3
    True
    """
    return Sinkhorn(
        epsilon=epsilon,
        relative_epsilon=relative_epsilon,
        max_iterations=max_iterations,
        threshold=threshold,
        scope=scope,
        by_label=by_label,
        tau_a=tau_a,
        tau_b=tau_b,
        cost=cost,
        manifold=manifold,
    )


def schrodinger_bridge(
    sigma: float = 1.0,
    *,
    max_iterations: int = 2000,
    threshold: float = 1e-3,
    scope: str = "local",
    by_label: bool = False,
    manifold: Any = None,
) -> Sinkhorn:
    """Return SB-CFM's coupling: entropic OT with absolute epsilon = 2 sigma^2 on squared distances.

    Pair it with ``fmjax.paths.SchrodingerBridge(sigma=sigma)``; for sigma = 0 use ``exact()``. A sigma
    so small against the batch's spread that Sinkhorn cannot converge is reported (status, or a
    ``CouplingWarning`` when called eagerly), not hidden. ``by_label=True`` pairs only within classes
    (see ``Sinkhorn``).

    ``manifold=M`` uses the squared geodesic distances ``M.dist(x0[i], x1[j])^2``: the heat kernel of
    Brownian motion on M at scale sigma behaves as ``exp(-d^2 / (2 sigma^2))`` to leading order for
    small sigma (Varadhan's formula), as the Euclidean one does exactly. There is no ``cost=``:
    epsilon = 2 sigma^2 is tied to squared distances (use ``sinkhorn(cost=..., epsilon=...,
    relative_epsilon=False)`` for another cost).
    """
    sigma = _real("sigma", sigma, low=0.0, low_inclusive=False)
    epsilon = 2.0 * sigma * sigma  # a product, not sigma**2, which raises OverflowError for a huge sigma
    if epsilon == 0.0 or not np.isfinite(epsilon):
        raise ValueError(f"sigma must give a positive, finite epsilon = 2 sigma^2; got sigma={sigma!r}")
    return Sinkhorn(
        epsilon=epsilon,
        relative_epsilon=False,
        max_iterations=max_iterations,
        threshold=threshold,
        scope=scope,
        by_label=by_label,
        manifold=manifold,
    )

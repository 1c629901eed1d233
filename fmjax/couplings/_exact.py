"""The exact OT coupling: an optimal permutation, solved on the host by fmjax's assignment solver."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fmjax._checks import check_bool, check_choice
from fmjax.couplings._base import SCOPES, Coupling, Labels, _coupling_dataclass, _status
from fmjax.couplings._costs import (
    _centred_costs,
    _normalised,
    check_cost,
    check_cost_output,
    cost_matrix,
)

# Up to this many dimensions per sample the exact coupling sends the points to the host, which forms
# the costs itself; above it the device builds the n x n cost matrix with a matrix product.
POINTS_ON_HOST_MAX_DIM = 32

# Status codes of the exact coupling's host solve.
HOST_SOLVED, HOST_NOT_FINITE, HOST_SOLVER_FAILED = 0, 1, 2
HOST_STATUS = {
    HOST_SOLVED: "solved",
    HOST_NOT_FINITE: "the inputs hold NaN or inf",
    HOST_SOLVER_FAILED: "the assignment solver failed (out of memory, or it returned no permutation)",
}


def _host_assignment(cost):
    from fmjax._assignment import solve_assignment

    return solve_assignment(cost)


def _host_assignment_points(x0, x1):
    from fmjax._assignment import solve_assignment_points

    return solve_assignment_points(x0, x1)


def _host_costs(arrays: list[np.ndarray]) -> np.ndarray:
    """The [n, n] squared distances of the points ``(a, b)`` (float64), or the cost matrix ``(C,)``."""
    if len(arrays) == 1:
        return arrays[0].astype(np.float64)
    a, b = (x.astype(np.float64) for x in arrays)
    cost = np.sum(a * a, axis=1)[:, None] + np.sum(b * b, axis=1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(cost, 0.0)


def _host_assignment_by_label(
    arrays: list[np.ndarray], labels0: np.ndarray, labels1: np.ndarray
) -> np.ndarray:
    """Optimal ``j`` pairing x0[i] only with x1 of class labels0[i] (``Exact`` with ``by_label``).

    Equal class counts: one assignment per class, on the rows and columns of that class. Unequal
    counts: one assignment of the whole batch with every cross-class cost raised by 2 n max(C) + 1.
    """
    n = labels0.shape[0]
    classes0, counts0 = np.unique(labels0, return_counts=True)
    classes1, counts1 = np.unique(labels1, return_counts=True)
    if not (np.array_equal(classes0, classes1) and np.array_equal(counts0, counts1)):
        cost = _host_costs(arrays)
        penalty = 2.0 * n * float(np.max(cost, initial=0.0)) + 1.0
        return _host_assignment(cost + penalty * (labels0[:, None] != labels1[None, :]))
    rows_by_class = np.argsort(labels0, kind="stable")
    cols_by_class = np.argsort(labels1, kind="stable")
    j = np.empty(n, np.int32)
    start = 0
    for count in counts0:
        rows = rows_by_class[start : start + count]
        cols = cols_by_class[start : start + count]
        start += count
        if count == 1:
            j[rows] = cols
        elif len(arrays) == 2:
            j[rows] = cols[_host_assignment_points(arrays[0][rows], arrays[1][cols])]
        else:
            j[rows] = cols[_host_assignment(arrays[0][np.ix_(rows, cols)])]
    return j


@_coupling_dataclass
class Exact(Coupling):
    """Exact minibatch optimal transport (OT-CFM): the permutation minimising sum_i ||x0[i] - x1[j_i]||^2.

    The assignment is solved on the host by fmjax's compiled solver (an epsilon-scaling auction for
    the duals, then Jonker-Volgenant shortest augmenting paths, exact for the float32-rounded costs).
    The work is split in two so that a training loop can run it off the device's critical path:
    ``host_inputs(x0, x1)`` runs on the device (jit-able) and gives what the host needs, and
    ``solve_host_status(inputs)`` runs on the host (numpy in, numpy out, never raises; the C solver
    releases the GIL, so several solves run on threads in parallel). ``pairs`` chains the two through
    ``jax.pure_callback``, so the coupling is also usable inside a jitted loss (``cfm_loss``,
    ``make_train_step``), where the device waits for the solve; ``fmjax train`` instead solves batch
    k+1 while the device runs step k.

    The points are centred and scaled by a power of two first (the assignment is invariant to both),
    so batches at 1e30 or 1e-30 are solved as the same batch at scale 1. For samples of at most 32
    dimensions the host gets the points and forms the costs itself (float64, rounded once); for larger
    ones the device builds the cost matrix at full float32 precision. Returns (arange(n), j): no x0 is
    duplicated or dropped. When the host solve fails (NaN or inf in a traced batch) ``j = arange(n)``
    and the status says ``coupling_converged = False``, ``coupling_error = inf``; called eagerly, such
    a failure raises.

    With ``by_label=True`` every call takes integer class labels (``labels1=``, and optionally
    ``labels0=``) and x0[i] is paired only with an x1 of its class, optimally within each class: the
    host solves one assignment per class (cheaper than one of the whole batch). With x1's labels
    alone, x0[i] takes the class of x1[i]: x0's rows are independent draws of the source, so this
    splits them at random into groups of the class counts, and the source seen by each class stays
    the source distribution (what sampling with a class condition starts from; a split chosen by cost
    would bias each class's noise toward its data). With both sides' labels and the same count of
    every class, no pair crosses classes. When the counts differ a permutation cannot stay within
    classes: each cross-class cost is raised by ``2 n max(C) + 1`` (more than any within-class
    assignment costs), so the result pairs as few samples across classes as the counts allow (the
    surplus of each class) and is optimal among such permutations, up to the float32 rounding of the
    raised costs.

    Other costs: with ``cost`` (a function ``cost(x, y) -> [n, m]`` of batches x [n, *dims], y [m, *dims])
    the permutation minimises ``sum_i cost(x0, x1)[i, j_i]``; with ``manifold=M`` it minimises the sum of
    squared geodesic distances ``sum_i M.dist(x0[i], x1[j_i])^2``. The device computes the cost matrix,
    less its minimum (which changes no permutation's rank and keeps the by-label raise above valid for
    signed costs), and the host solves the float32 matrix. The cost must be finite: an inf or NaN entry
    is a failed solve (``HOST_NOT_FINITE``).
    """

    scope: str = "local"
    by_label: bool = False
    cost: Callable[[jax.Array, jax.Array], jax.Array] | None = None
    manifold: Any = None

    def __post_init__(self):
        check_choice("scope", self.scope, SCOPES)
        object.__setattr__(self, "by_label", check_bool("by_label", self.by_label))
        check_cost(self.cost, self.manifold)

    def _check_inputs(self, key, x0, x1) -> None:
        super()._check_inputs(key, x0, x1)
        check_cost_output(self.cost, self.manifold, x0, x1)

    def host_inputs(
        self, x0: jax.Array, x1: jax.Array, labels0: Labels = None, labels1: Labels = None
    ) -> tuple[jax.Array, ...]:
        """What ``solve_host`` needs, computed on the device: the centred float32 points ``(a, b)`` of
        shape [n, d] when d <= 32, else the float32 cost matrix ``(C,)`` of shape [n, n]; both scaled
        by a power of two so that max(|a|, |b|) lies in [0.5, 1). With a ``cost`` or ``manifold``,
        always ``(C - min C,)``, C that cost's matrix. With ``by_label`` the int32 labels
        ``(labels0, labels1)`` (shape [n] each; labels0 = labels1 when not given) follow:
        ``(a, b, labels0, labels1)`` or ``(C, labels0, labels1)``."""
        check_cost_output(self.cost, self.manifold, x0, x1)
        return self._host_inputs(x0, x1, self._labels(x0, labels0, labels1))

    def _host_inputs(self, x0, x1, labels) -> tuple[jax.Array, ...]:
        """``host_inputs`` for labels already checked: ``(labels0, labels1)`` (int32 [n] each) or None."""
        n = x0.shape[0]
        if self.cost is not None or self.manifold is not None:
            cost = cost_matrix(self.cost, self.manifold, x0, x1)
            inputs = ((cost - jnp.min(cost)).astype(jnp.float32),)
            return inputs if labels is None else inputs + labels
        a, b, _ = _normalised(x0.reshape(n, -1), x1.reshape(n, -1))
        if a.shape[1] <= POINTS_ON_HOST_MAX_DIM:
            inputs = (a.astype(jnp.float32), b.astype(jnp.float32))
        else:
            inputs = (_centred_costs(a, b).astype(jnp.float32),)
        return inputs if labels is None else inputs + labels

    @staticmethod
    def solve_host_status(inputs: tuple) -> tuple[np.ndarray, int]:
        """``(j, code)`` from ``host_inputs``'s arrays, on the host; never raises.

        ``j`` is the optimal column per row (int32, shape [n]) and code ``HOST_SOLVED`` (0); on failure
        ``j = arange(n)`` and code ``HOST_NOT_FINITE`` (1) or ``HOST_SOLVER_FAILED`` (2). Inputs with
        labels (a ``by_label`` coupling's: four arrays, or three with a cost matrix) are solved within
        classes.
        """
        n = int(np.shape(inputs[0])[0])
        identity = np.arange(n, dtype=np.int32)
        try:
            labels = None
            if len(inputs) in (3, 4):
                labels, inputs = tuple(np.asarray(x) for x in inputs[-2:]), inputs[:-2]
            arrays = [np.asarray(x, np.float32) for x in inputs]
            if not all(np.isfinite(x).all() for x in arrays):
                return identity, HOST_NOT_FINITE
            if labels is not None:
                j = _host_assignment_by_label(arrays, *labels)
            elif len(arrays) == 2:
                j = _host_assignment_points(*arrays)
            else:
                j = _host_assignment(arrays[0])
            j = np.asarray(j, np.int32)
            if j.shape != (n,) or not np.array_equal(np.bincount(j, minlength=n), np.ones(n)):
                return identity, HOST_SOLVER_FAILED
            return j, HOST_SOLVED
        except Exception:  # a callback must never raise: the status carries the failure
            return identity, HOST_SOLVER_FAILED

    @staticmethod
    def solve_host(inputs: tuple) -> np.ndarray:
        """The optimal ``j`` (int32, shape [n]) from ``host_inputs``'s arrays, on the host.

        Raises a ValueError naming the cause when the solve fails (for use outside callbacks).
        """
        j, code = Exact.solve_host_status(inputs)
        if code != HOST_SOLVED:
            raise ValueError(f"exact coupling: the host assignment solve failed: {HOST_STATUS[code]}")
        return j

    def _pairs_with_details(self, key, x0, x1, labels=None):
        n = x0.shape[0]
        inputs = self._host_inputs(x0, x1, labels)
        points = inputs if labels is None else inputs[:-2]
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in points]))

        def solve(*arrays):
            j, code = self.solve_host_status(arrays)
            return np.asarray(j, np.int32), np.asarray(code, np.int32)

        shapes = (jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
        j, code = jax.pure_callback(solve, shapes, *inputs, vmap_method="sequential")
        # checked on the device too: a non-finite batch never counts as solved
        code = jnp.where(finite, code, HOST_NOT_FINITE)
        i = jnp.arange(n, dtype=jnp.int32)
        j = jnp.where(code == HOST_SOLVED, j, i)
        ok = code == HOST_SOLVED
        return i, j, _status(ok, jnp.where(ok, 0.0, jnp.inf)), {"code": code}

    def pairs(self, key, x0, x1):
        i, j, _, _ = self._pairs_with_details(key, x0, x1)
        return i, j

    def _failed(self, error, details):
        reason = HOST_STATUS.get(int(details.get("code", HOST_SOLVER_FAILED)), "unknown failure")
        raise RuntimeError(f"exact coupling: the host assignment solve failed: {reason}")


def exact(
    *,
    scope: str = "local",
    by_label: bool = False,
    cost: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    manifold: Any = None,
) -> Exact:
    """Return the exact OT coupling (OT-CFM): an optimal permutation of x1 for x0.

    With ``by_label=True`` it pairs only within classes, optimally within each class; calls take the
    labels as ``labels1=`` (x1's) and optionally ``labels0=`` (x0's). See ``Exact``.

    The permutation minimises ``sum_i C[i, j_i]`` for the cost matrix C of shape [n, n]: by default
    ``C_ij = ||x0[i] - x1[j]||^2``; with ``cost=f``, ``C = f(x0, x1)`` (f maps batches [n, *dims] and
    [m, *dims] to [n, m], and must be hashable: a function is); with ``manifold=M``,
    ``C_ij = M.dist(x0[i], x1[j])^2``. Giving both is a ValueError.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0.0], [1.0], [2.0]])
    >>> exact(cost=lambda x, y: x @ y.T)(None, x, x)[1].tolist()  # min sum x_i y_j: anti-monotone
    [2, 1, 0]

    >>> import jax.numpy as jnp
    >>> x0 = jnp.array([[0.0], [1.0], [2.0], [3.0]])
    >>> x1 = jnp.array([[0.1], [1.1], [2.1], [3.1]])
    >>> exact(by_label=True)(None, x0, x1, labels0=jnp.array([0, 1, 0, 1]),
    ...                      labels1=jnp.array([1, 0, 1, 0]))[1].tolist()
    [1, 0, 3, 2]
    """
    return Exact(scope=scope, by_label=by_label, cost=cost, manifold=manifold)

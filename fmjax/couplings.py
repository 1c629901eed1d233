"""Minibatch couplings between source and target batches.

A coupling is a callable ``coupling(key, x0, x1) -> (i, j)`` returning int32 index arrays of shape [n];
the coupled pairs are ``(x0[i], x1[j])``, so labels or conditions attached to either batch follow by
the same indexing. Couplings are static pytrees (frozen dataclasses holding only hyperparameters) and
are jit-able.

Every coupling also reports whether its solver succeeded:
``coupling.apply_with_status(key, x0, x1) -> (x0[i], x1[j], (i, j), status)``, where ``status`` is a
dict of two scalar arrays, ``"coupling_converged"`` (bool) and ``"coupling_error"`` (float32: the
Sinkhorn plan's marginal error; 0.0 for the independent coupling; 0.0 for the exact coupling when its
host solve succeeded and inf when it failed). Under ``jit`` the status is the only report; called
eagerly, a Sinkhorn coupling that did not converge warns (``CouplingWarning``) and an exact coupling
whose host solve failed raises.

Label-aware couplings (``exact(by_label=True)``, ``sinkhorn(..., by_label=True)``,
``schrodinger_bridge(..., by_label=True)``) pair only within a class: every call takes the integer
class labels as keywords, ``coupling(key, x0, x1, labels1=y1)`` (x1's labels alone) or
``labels0=y0, labels1=y1`` (both sides); see ``Exact`` for what happens when the class counts of the
two sides differ. ``apply_with_cond(key, x0, x1, cond, ...)`` also moves a condition (any pytree with
the batch as leading axis of its leaves, paired with x1) by the same j index: ``cond[j]``.

>>> import jax, jax.numpy as jnp
>>> from fmjax.couplings import independent
>>> i, j = independent()(jax.random.key(0), jnp.zeros((3, 2)), jnp.ones((3, 2)))
>>> i.tolist(), j.tolist()
([0, 1, 2], [0, 1, 2])
>>> _, _, _, status = independent().apply_with_status(None, jnp.zeros((3, 2)), jnp.ones((3, 2)))
>>> bool(status["coupling_converged"]), float(status["coupling_error"])
(True, 0.0)
"""

from __future__ import annotations

import abc
import dataclasses
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fmjax._checks import (
    check_batch,
    check_bool,
    check_choice,
    check_finite,
    check_int,
    check_real,
    describe,
    lookup,
)

__all__ = [
    "Coupling",
    "CouplingWarning",
    "Independent",
    "Exact",
    "Sinkhorn",
    "independent",
    "exact",
    "sinkhorn",
    "schrodinger_bridge",
    "PerShard",
    "GlobalBatch",
    "sample_plan_rows",
    "squared_distances",
    "check_cond",
    "COUPLINGS",
    "make_coupling",
]

SCOPES = ("local", "global")

# Sinkhorn's cap on iterations (ott-jax counts them in int32).
MAX_SINKHORN_ITERATIONS = 10**9


class CouplingWarning(RuntimeWarning):
    """Warned when a coupling called eagerly (outside ``jit``) did not converge; its pairs still come back.

    Make it an error with ``warnings.simplefilter("error", fmjax.couplings.CouplingWarning)``.
    """


Status = dict[str, jax.Array]


def _status(converged: Any, error: Any) -> Status:
    """``apply_with_status``'s status: ``coupling_converged`` (bool), ``coupling_error`` (float32)."""
    return {
        "coupling_converged": jnp.asarray(converged, jnp.bool_),
        "coupling_error": jnp.asarray(error, jnp.float32),
    }


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


def _check_key(key: Any) -> None:
    """Raise a TypeError unless ``key`` is a PRNG key: a typed key array of shape () or a raw uint32 [2]."""
    dtype = getattr(key, "dtype", None)
    shape = getattr(key, "shape", None)
    if dtype is not None:
        typed = jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
        if (typed and shape == ()) or (not typed and dtype == np.uint32 and shape == (2,)):
            return
    got = f"an array of shape {shape} and dtype {dtype}" if dtype is not None else repr(key)[:80]
    raise TypeError(
        f"key must be a PRNG key of shape () made by jax.random.key(seed) (or a PRNGKey); got {got}"
    )


def _check_pair(x0: Any, x1: Any) -> None:
    """Shapes and dtypes at trace time; values (finite) when concrete."""
    check_batch("x0", x0)
    check_batch("x1", x1)
    if x0.shape[0] != x1.shape[0]:
        raise ValueError(
            f"x0 and x1 must have the same batch size; got x0 of shape {tuple(x0.shape)} "
            f"and x1 of shape {tuple(x1.shape)}"
        )
    if x0.shape != x1.shape:
        raise ValueError(
            f"x0 and x1 must have the same shape [n, *dims]; got x0 of shape {tuple(x0.shape)} "
            f"and x1 of shape {tuple(x1.shape)}"
        )
    if x0.shape[0] == 0:
        raise ValueError(f"x0 and x1 must hold at least one sample; got shape {tuple(x0.shape)}")
    if np.prod(x0.shape[1:]) == 0:
        raise ValueError(f"x0 and x1 must hold at least one value per sample; got shape {tuple(x0.shape)}")
    check_finite("x0", x0)
    check_finite("x1", x1)


def _traced(*values: Any) -> bool:
    """Whether any leaf of ``values`` is a tracer (inside jit, vmap, grad or shard_map)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(values))


def check_cond(name: str, cond: Any, n: int) -> None:
    """Check that every leaf of the pytree ``cond`` is an array whose leading axis is the batch, ``n``.

    Raises a ValueError naming the leaf (``cond['label']``) and its shape, or a TypeError for a leaf
    that is not an array (a Python number, a string) or a ``cond`` without leaves.
    """
    leaves = jax.tree_util.tree_leaves_with_path(cond)
    if not leaves:
        raise TypeError(f"{name} must be a pytree of arrays of shape [batch, ...]; got {cond!r:.80}")
    for where, leaf in leaves:
        label = name + jax.tree_util.keystr(where)
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype") or isinstance(leaf, np.generic):
            raise TypeError(
                f"{label} must be an array with the batch ({n}) as leading axis; got {type(leaf).__name__}"
            )
        if len(leaf.shape) == 0 or leaf.shape[0] != n:
            raise ValueError(
                f"{label} must have the batch ({n}) as leading axis, [batch, ...] = ({n}, ...); "
                f"got shape {tuple(leaf.shape)}"
            )


def _check_labels(name: str, labels: Any, n: int) -> jax.Array:
    """``labels`` as int32 [n] after checking it holds integer class ids >= 0 (values when concrete)."""
    what = f"{name} must be an integer array of class labels of shape [n] = ({n},)"
    if not hasattr(labels, "shape") or not hasattr(labels, "dtype"):
        raise TypeError(f"{what}; got {type(labels).__name__}")
    dtype = jnp.dtype(labels.dtype)
    if dtype == jnp.bool_ or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{what}; got dtype {dtype} (convert class ids with .astype(jnp.int32))")
    if tuple(labels.shape) != (n,):
        raise ValueError(f"{what}; got shape {tuple(labels.shape)}")
    if not _traced(labels):
        low = int(np.min(np.asarray(labels)))
        if low < 0:
            raise ValueError(f"{name} must hold class ids >= 0; got {low}")
    return jnp.asarray(labels, jnp.int32)


class Coupling(abc.ABC):
    """Base class of couplings: ``__call__(key, x0, x1) -> (i, j)``.

    ``x0`` and ``x1`` are float arrays of the same shape [n, *dims], n >= 1; ``i``, ``j`` are int32 of
    shape [n]. A new coupling implements ``pairs``; ``__call__``, ``apply`` and ``apply_with_status`` add
    the input checks, the gather and the status (always converged unless the subclass reports one).

    ``scope`` says what a coupling sees when the batch is sharded over devices: "local" couples each
    device's shard on its own, "global" couples the whole global batch. Without a mesh (one device)
    the two are the same. The factories default to "local", the choice that never adds communication
    to a step a user builds; ``fmjax train`` (``RunConfig.coupling_scope``) defaults to "global", so
    that a run on several devices or processes trains what it would on one.
    """

    scope: str = "local"
    uses_key: bool = False  # whether the coupling draws random numbers (else key may be None)
    by_label: bool = False  # whether the coupling takes class labels and pairs only within a class

    @abc.abstractmethod
    def pairs(self, key: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Return (i, j) for a single, unsharded batch; subclasses implement this."""

    def _pairs_with_details(
        self, key, x0, x1, labels=None
    ) -> tuple[jax.Array, jax.Array, Status, dict[str, jax.Array]]:
        """``(i, j, status, details)``: ``details`` holds scalars the eager report names (e.g. iterations).

        ``labels`` is ``(labels0, labels1)`` (int32 [n] each) for a ``by_label`` coupling, else None.
        """
        i, j = self.pairs(key, x0, x1)
        return i, j, _status(True, 0.0), {}

    def _gather(self, x0, x1, i, j):
        return x0[i], x1[j]

    def _gather_cond(self, cond, j):
        return jax.tree.map(lambda leaf: leaf[j], cond)

    def _labels(self, x0, labels0, labels1) -> tuple[jax.Array, jax.Array] | None:
        """``(labels0, labels1)`` (int32 [n]) for a ``by_label`` coupling, None otherwise; checked.

        With ``labels1`` alone, x0[i] takes the class of x1[i] (see ``Exact``).
        """
        if not self.by_label:
            if labels0 is not None or labels1 is not None:
                raise ValueError(
                    f"labels0/labels1 are given, but {self!r} was built without by_label=True and would "
                    "ignore them; build it with by_label=True (e.g. exact(by_label=True)) to pair "
                    "within classes"
                )
            return None
        n = x0.shape[0]
        if labels1 is None:
            raise ValueError(
                f"labels1 is required: {type(self).__name__} was built with by_label=True and pairs "
                f"within classes; pass x1's integer class labels, labels1 of shape [n] = ({n},)"
            )
        labels1 = _check_labels("labels1", labels1, n)
        labels0 = labels1 if labels0 is None else _check_labels("labels0", labels0, n)
        return labels0, labels1

    def _check_inputs(self, key, x0, x1) -> None:
        _check_pair(x0, x1)
        if self.uses_key:
            if key is None:
                raise ValueError(f"key is required: the {type(self).__name__} coupling draws random numbers")
            _check_key(key)

    def _report(self, status: Status, details: dict[str, jax.Array]) -> None:
        """Eagerly (concrete status) warn or raise when the solver failed; under a trace do nothing."""
        converged = status["coupling_converged"]
        if not _traced(converged) and not bool(converged):
            self._failed(float(status["coupling_error"]), {k: np.asarray(v) for k, v in details.items()})

    def _failed(self, error: float, details: dict[str, np.ndarray]) -> None:
        warnings.warn(
            f"{self!r} did not converge (error {error:.3g}); its pairs may be far from the coupling's",
            CouplingWarning,
            stacklevel=5,
        )

    def _run(self, key, x0, x1, labels0=None, labels1=None):
        self._check_inputs(key, x0, x1)
        labels = self._labels(x0, labels0, labels1)
        if labels is None:
            i, j, status, details = self._pairs_with_details(key, x0, x1)
        else:
            i, j, status, details = self._pairs_with_details(key, x0, x1, labels)
        self._report(status, details)
        return i, j, status

    def __call__(
        self,
        key: jax.Array,
        x0: jax.Array,
        x1: jax.Array,
        *,
        labels0: jax.Array | None = None,
        labels1: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Couple the batches ``x0`` and ``x1`` (shape [n, *dims] each); return (i, j) of shape [n].

        ``labels0``/``labels1`` (integer class ids of shape [n]) only for a ``by_label`` coupling.
        """
        i, j, _ = self._run(key, x0, x1, labels0, labels1)
        return i, j

    def apply_with_status(
        self,
        key: jax.Array,
        x0: jax.Array,
        x1: jax.Array,
        *,
        labels0: jax.Array | None = None,
        labels1: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array], Status]:
        """Couple and gather: ``(x0[i], x1[j], (i, j), status)``.

        ``status = {"coupling_converged": bool[], "coupling_error": float32[]}``: whether the solver
        converged and its final error (Sinkhorn: the plan's marginal error
        ``sum_i |sum_j P_ij - 1/n| + sum_j |sum_i P_ij - 1/n|``; exact: 0.0, or inf when the host
        solve failed; independent: 0.0). jit-able; a step can put the status in its metrics.
        ``labels0``/``labels1`` as for ``__call__``.
        """
        i, j, status = self._run(key, x0, x1, labels0, labels1)
        a, b = self._gather(x0, x1, i, j)
        return a, b, (i, j), status

    def apply(
        self,
        key: jax.Array,
        x0: jax.Array,
        x1: jax.Array,
        *,
        labels0: jax.Array | None = None,
        labels1: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
        """Couple and gather: return ``(x0[i], x1[j], (i, j))``."""
        a, b, pairs, _ = self.apply_with_status(key, x0, x1, **_given(labels0=labels0, labels1=labels1))
        return a, b, pairs

    def apply_with_cond(
        self,
        key: jax.Array,
        x0: jax.Array,
        x1: jax.Array,
        cond: Any,
        *,
        labels0: jax.Array | None = None,
        labels1: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, Any, tuple[jax.Array, jax.Array], Status]:
        """Couple and gather, moving a condition with x1: ``(x0[i], x1[j], cond[j], (i, j), status)``.

        ``cond`` is any pytree whose leaves have the batch as leading axis (class labels [n], features
        [n, k], ...), paired with x1; ``cond[j]`` means ``jax.tree.map(lambda c: c[j], cond)``. On a
        mesh (``PerShard``, ``GlobalBatch``) the gather runs on the devices with the pairs.

        >>> import jax.numpy as jnp
        >>> from fmjax.couplings import exact
        >>> x1 = jnp.array([[2.0], [0.0], [1.0]])
        >>> _, x1c, cond, _, _ = exact().apply_with_cond(None, jnp.array([[0.0], [1.0], [2.0]]), x1,
        ...                                                {"row": jnp.arange(3)})
        >>> x1c[:, 0].tolist(), cond["row"].tolist()  # cond["row"] still names x1c's row of x1
        ([0.0, 1.0, 2.0], [1, 2, 0])
        """
        check_batch("x1", x1)
        check_cond("cond", cond, x1.shape[0])
        given = _given(labels0=labels0, labels1=labels1)
        a, b, (i, j), status = self.apply_with_status(key, x0, x1, **given)
        return a, b, self._gather_cond(cond, j), (i, j), status


def _given(**kwargs: Any) -> dict[str, Any]:
    """The keyword arguments that are not None (so couplings that take no labels are called as before)."""
    return {name: value for name, value in kwargs.items() if value is not None}


def _coupling_dataclass(cls):
    cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    jax.tree_util.register_static(cls)
    return cls


@_coupling_dataclass
class Independent(Coupling):
    """The independent coupling: x0 and x1 are already independent draws, so pairs are (x0[k], x1[k])."""

    scope: str = "local"

    def __post_init__(self):
        check_choice("scope", self.scope, SCOPES)

    def pairs(self, key, x0, x1):
        idx = jnp.arange(x0.shape[0], dtype=jnp.int32)
        return idx, idx

    def _gather(self, x0, x1, i, j):
        # the pairs are the identity: skip the gather, which XLA would otherwise run as a copy
        return x0, x1

    def _gather_cond(self, cond, j):
        return cond


def _power_of_two_exponent(a: jax.Array, b: jax.Array) -> jax.Array:
    """e with max(|a|, |b|) = m 2^e, m in [0.5, 1); 0 when the maximum is 0 or not finite."""
    top = jnp.maximum(jnp.max(jnp.abs(a)), jnp.max(jnp.abs(b)))
    _, e = jnp.frexp(top)
    return jnp.where(jnp.isfinite(top) & (top > 0), e, 0)


def _times_power_of_two(x: jax.Array, k: jax.Array) -> jax.Array:
    """x 2^k, exact: two scalar factors 2^(k//2) and 2^(k - k//2), each a normal float for |k| <= 250."""
    half = k // 2
    return x * jnp.ldexp(jnp.ones((), x.dtype), half) * jnp.ldexp(jnp.ones((), x.dtype), k - half)


def _normalised(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Centre two clouds [n, d] on their joint mean and scale them by a power of two: ``(a', b', k)``.

    ``a' = (a - c) 2^k`` (likewise b') with max(|a'|, |b'|) in [0.5, 1), or 0 when all points coincide.
    Squared distances and the optimal assignment are invariant to the translation; the costs scale by
    4^k. Scaling by a power of two is exact in floating point, so for data of ordinary magnitude the
    costs are bitwise 4^k times the unscaled ones; for data near the float32 range (1e30, 1e-30) it
    keeps ``||a - b||^2`` from overflowing or underflowing. The first scaling, before centring, keeps
    the joint mean's sum in range. (XLA flushes float32 subnormals, below 1.2e-38, to zero.)
    """
    e1 = _power_of_two_exponent(a, b)
    a, b = _times_power_of_two(a, -e1), _times_power_of_two(b, -e1)
    center = (jnp.sum(a, axis=0) + jnp.sum(b, axis=0)) / (a.shape[0] + b.shape[0])
    a, b = a - center, b - center
    e2 = _power_of_two_exponent(a, b)
    return _times_power_of_two(a, -e2), _times_power_of_two(b, -e2), -(e1 + e2)


def _centred_costs(a: jax.Array, b: jax.Array) -> jax.Array:
    """||a_i - b_j||^2 for centred clouds [n, d], [m, d] at full float32 matmul precision, clipped at 0."""
    # full float32 products: the default precision is TF32 on recent GPUs and one bf16 pass on TPUs,
    # which would make the "exact" coupling exact for other costs than the batch's
    cross = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    cost = jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * cross
    return jnp.maximum(cost, 0.0)


def squared_distances(x0: jax.Array, x1: jax.Array) -> jax.Array:
    """Cost matrix C[i, j] = ||x0[i] - x1[j]||^2 over flattened samples, shape [n, m].

    Both clouds are first centred on their joint mean (the cost is translation invariant), which
    keeps the matrix-product form ||a||^2 + ||b||^2 - 2 a.b accurate in float32.
    """
    a = x0.reshape(x0.shape[0], -1)
    b = x1.reshape(x1.shape[0], -1)
    center = (jnp.sum(a, axis=0) + jnp.sum(b, axis=0)) / (a.shape[0] + b.shape[0])
    return _centred_costs(a - center, b - center)


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
    """

    scope: str = "local"
    by_label: bool = False

    def __post_init__(self):
        check_choice("scope", self.scope, SCOPES)
        object.__setattr__(self, "by_label", check_bool("by_label", self.by_label))

    def host_inputs(
        self,
        x0: jax.Array,
        x1: jax.Array,
        labels0: jax.Array | None = None,
        labels1: jax.Array | None = None,
    ) -> tuple[jax.Array, ...]:
        """What ``solve_host`` needs, computed on the device: the centred float32 points ``(a, b)`` of
        shape [n, d] when d <= 32, else the float32 cost matrix ``(C,)`` of shape [n, n]; both scaled
        by a power of two so that max(|a|, |b|) lies in [0.5, 1). With ``by_label`` the int32 labels
        ``(labels0, labels1)`` (shape [n] each; labels0 = labels1 when not given) follow:
        ``(a, b, labels0, labels1)`` or ``(C, labels0, labels1)``."""
        labels = self._labels(x0, labels0, labels1)
        n = x0.shape[0]
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
        inputs = self.host_inputs(x0, x1) if labels is None else self.host_inputs(x0, x1, *labels)
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


def sample_plan_rows(key: jax.Array, plan: jax.Array) -> jax.Array:
    """Draw one column per row, j_i ~ plan[i, :] / sum(plan[i, :]), by inverse CDF: O(n m), n uniforms.

    With uniform marginals each row of a transport plan holds mass 1/n, so this samples the plan
    without duplicating or dropping any row.
    """
    cdf = jnp.cumsum(plan, axis=1)
    u = jax.random.uniform(key, (plan.shape[0], 1), cdf.dtype) * cdf[:, -1:]
    j = jnp.sum(cdf <= u, axis=1)
    return jnp.minimum(j, plan.shape[1] - 1).astype(jnp.int32)


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
    """

    epsilon: float = 0.05
    relative_epsilon: bool = True
    max_iterations: int = 2000
    threshold: float = 1e-3
    scope: str = "local"
    by_label: bool = False
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
        a, b, k = _normalised(x0.reshape(n, -1), x1.reshape(n, -1))
        cost = _centred_costs(a, b)
        top = jnp.max(cost)
        unit = jnp.where(top > 0, top, 1.0)
        if self.relative_epsilon:
            asked = self.epsilon * jnp.mean(cost)
        else:
            # epsilon 4^k as mantissa 2^(exponent + 2k): exact, and in range whenever the result is
            # (an epsilon of 1e60 for costs of 1e60 is fine although neither fits float32)
            mantissa, exponent = math.frexp(self.epsilon)
            asked = _times_power_of_two(jnp.asarray(mantissa, cost.dtype), 2 * k + exponent)
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
        out = solver(linear_problem.LinearProblem(geom))
        log_plan = (out.f[:, None] + out.g[None, :] - cost) / epsilon
        # the marginal error of the plan actually sampled (ott's own check can miss a divergence)
        rows = jnp.exp(jax.nn.logsumexp(log_plan, axis=1))
        cols = jnp.exp(jax.nn.logsumexp(log_plan, axis=0))
        error = jnp.sum(jnp.abs(rows - 1.0 / n)) + jnp.sum(jnp.abs(cols - 1.0 / n))
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
        self,
        x0: jax.Array,
        x1: jax.Array,
        *,
        labels0: jax.Array | None = None,
        labels1: jax.Array | None = None,
    ) -> jax.Array:
        """The entropic transport plan between the two batches (uniform weights), shape [n, n].

        Entries are ``exp(min(log P_ij, 0))`` (a plan's entries never exceed its total mass 1); when
        the plan would hold NaN it is the fallback ``I / n``, the plan of the pairs ``j = arange(n)``.
        With ``by_label``, the plan of the raised cross-class costs (labels as for ``__call__``).
        """
        labels = self._labels(x0, labels0, labels1)
        if not _traced(x0, x1, labels):  # eagerly: one compiled solve per coupling and shape
            return _jitted_solution(self, jax.random.key(0), x0, x1, labels)[1]
        return self._plan(*self._solve(x0, x1, labels))

    @staticmethod
    def _plan(log_plan, details):
        n = log_plan.shape[0]
        plan = jnp.exp(jnp.minimum(log_plan, 0.0))
        return jnp.where(details["fallback"], jnp.eye(n, dtype=plan.dtype) / n, plan)

    def _pairs_with_details(self, key, x0, x1, labels=None):
        if key is None:
            raise ValueError("key is required: the Sinkhorn coupling samples its plan")
        if not _traced(key, x0, x1, labels):
            return _jitted_solution(self, key, x0, x1, labels)[0]
        return self._sample(key, *self._solve(x0, x1, labels), labels=labels)

    def _sample(self, key, log_plan, details, labels=None):
        """``(i, j, status, details)`` from ``_solve``'s solution: j_i drawn from row i of the plan
        (with labels, among the columns of row i's class when there are any)."""
        details = dict(details)
        n = log_plan.shape[0]
        i = jnp.arange(n, dtype=jnp.int32)
        safe = jnp.where(details["fallback"], 0.0, log_plan)
        if labels is not None:
            same = labels[0][:, None] == labels[1][None, :]
            safe = jnp.where(same | ~jnp.any(same, axis=1, keepdims=True), safe, -jnp.inf)
        weights = jnp.exp(safe - jnp.max(safe, axis=1, keepdims=True))  # each row's largest weight is 1
        j = jnp.where(details["fallback"], i, sample_plan_rows(key, weights))
        error = details.pop("error")
        converged = (error < self.threshold) & ~details["epsilon_floor"] & ~details["fallback"]
        return i, j, _status(converged, error), details

    def pairs(self, key, x0, x1):
        i, j, _, _ = self._pairs_with_details(key, x0, x1)
        return i, j

    def _failed(self, error, details):
        kind = "relative to the mean cost" if self.relative_epsilon else "absolute"
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
            f"marginal error {error:.3g} >= threshold {self.threshold:g}{note}. The pairs come from the "
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


@dataclasses.dataclass(frozen=True)
class _OnMesh(Coupling):
    """A coupling ``inner`` placed on the data axis ``axis`` of ``mesh`` by ``make_train_step``."""

    inner: Coupling
    mesh: jax.sharding.Mesh
    axis: str = "data"

    @property
    def uses_key(self) -> bool:
        return self.inner.uses_key

    @property
    def by_label(self) -> bool:
        return self.inner.by_label

    def pairs(self, key, x0, x1):
        return self.inner.pairs(key, x0, x1)

    def _pairs_with_details(self, key, x0, x1, labels=None):
        if labels is None:
            return self.inner._pairs_with_details(key, x0, x1)
        return self.inner._pairs_with_details(key, x0, x1, labels)

    def _gather_cond(self, cond, j):
        return self.inner._gather_cond(cond, j)

    def _failed(self, error, details):
        self.inner._failed(error, details)

    def _on_each_device(
        self, key, x0, x1, batch_spec, *, labels0=None, labels1=None, cond=None, fold_in_device=False
    ):
        """``inner``'s pairs, gather and status on every device, on the part of the batch ``batch_spec``
        gives it; the status is reduced over the devices (converged on all of them, the largest error).
        The labels and the condition (moved with x1) get the batch's spec; ``(a, b, cond_c, pairs,
        status)`` comes back, ``cond_c`` None without a condition.

        Inside ``shard_map`` the solver runs with no collective; the key is replicated and, with
        ``fold_in_device``, folded with the device's index along ``axis``.
        """
        from jax.sharding import PartitionSpec

        self._check_inputs(key, x0, x1)
        extras = {}
        labels = self._labels(x0, labels0, labels1)
        if labels is not None:
            extras["labels"] = labels
        if cond is not None:
            check_cond("cond", cond, x1.shape[0])
            extras["cond"] = cond

        def body(key, x0, x1, extras):
            if fold_in_device and key is not None:
                key = jax.random.fold_in(key, jax.lax.axis_index(self.axis))
            i, j, status, details = self._pairs_with_details(key, x0, x1, extras.get("labels"))
            a, b = self.inner._gather(x0, x1, i, j)
            moved = {"cond": self.inner._gather_cond(extras["cond"], j)} if "cond" in extras else {}
            # one entry per device along the axis, reduced outside
            return a, b, moved, i, j, jax.tree.map(lambda v: v[None], (status, details))

        a, b, moved, i, j, (status, details) = jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=(PartitionSpec(), batch_spec, batch_spec, batch_spec),
            out_specs=(batch_spec,) * 5 + (PartitionSpec(self.axis),),
            check_vma=False,
        )(key, x0, x1, extras)
        status = _status(jnp.all(status["coupling_converged"]), jnp.max(status["coupling_error"]))
        details = {name: jnp.max(value) for name, value in details.items()}
        self._report(status, details)
        return a, b, moved.get("cond"), (i, j), status


@dataclasses.dataclass(frozen=True)
class PerShard(_OnMesh):
    """Runs ``inner`` on each device's shard of a batch sharded over ``axis`` of ``mesh`` (scope "local").

    Built by ``make_train_step`` for a coupling with ``scope="local"`` when it is given a mesh; each
    shard draws from its own key (the shared key folded with the shard's index) and its pairs index
    into the shard, so the gathered pairs never cross devices, as in TorchCFM's DDP training. The
    status is converged when every shard's is, with the largest error.
    """

    @property
    def scope(self) -> str:
        return "local"

    def apply_with_status(self, key, x0, x1, *, labels0=None, labels1=None):
        from jax.sharding import PartitionSpec

        spec = PartitionSpec(self.axis)
        labels = {"labels0": labels0, "labels1": labels1}
        a, b, _, pairs, status = self._on_each_device(key, x0, x1, spec, **labels, fold_in_device=True)
        return a, b, pairs, status

    def apply_with_cond(self, key, x0, x1, cond, *, labels0=None, labels1=None):
        from jax.sharding import PartitionSpec

        spec = PartitionSpec(self.axis)
        labels = {"labels0": labels0, "labels1": labels1}
        return self._on_each_device(key, x0, x1, spec, **labels, cond=cond, fold_in_device=True)


jax.tree_util.register_static(PerShard)


@dataclasses.dataclass(frozen=True)
class GlobalBatch(_OnMesh):
    """Runs ``inner`` on the whole global batch of a sharded step (scope "global").

    Built by ``make_train_step`` for a coupling with ``scope="global"`` when it is given a mesh: the
    batch is gathered (replicated) before coupling, and the coupled batch is resharded over ``axis``,
    so each device trains on its slice of globally coupled pairs. The status is reduced over the
    devices as ``PerShard``'s (every device solves the same batch).
    """

    @property
    def scope(self) -> str:
        return "global"

    def apply_with_status(self, key, x0, x1, *, labels0=None, labels1=None):
        a, b, _, pairs, status = self.apply_with_cond(key, x0, x1, None, labels0=labels0, labels1=labels1)
        return a, b, pairs, status

    def apply_with_cond(self, key, x0, x1, cond, *, labels0=None, labels1=None):
        from jax.sharding import NamedSharding, PartitionSpec

        sharded = NamedSharding(self.mesh, PartitionSpec(self.axis))
        # The batch is gathered once; then every device couples the whole batch on its own, with no
        # collective inside the solver (left to the partitioner, Sinkhorn's loop and the exact
        # assignment's host callback were split over the devices and paid a collective per iteration).
        a, b, moved, pairs, status = self._on_each_device(
            key, x0, x1, PartitionSpec(), labels0=labels0, labels1=labels1, cond=cond
        )
        reshard = lambda x: jax.lax.with_sharding_constraint(x, sharded)  # noqa: E731
        return reshard(a), reshard(b), jax.tree.map(reshard, moved), pairs, status


jax.tree_util.register_static(GlobalBatch)


def independent(*, scope: str = "local") -> Independent:
    """Return the independent coupling (I-CFM, rectified flow, Lipman's FM)."""
    return Independent(scope=scope)


def exact(*, scope: str = "local", by_label: bool = False) -> Exact:
    """Return the exact OT coupling (OT-CFM): an optimal permutation of x1 for x0.

    With ``by_label=True`` it pairs only within classes, optimally within each class; calls take the
    labels as ``labels1=`` (x1's) and optionally ``labels0=`` (x0's). See ``Exact``.

    >>> import jax.numpy as jnp
    >>> x0 = jnp.array([[0.0], [1.0], [2.0], [3.0]])
    >>> x1 = jnp.array([[0.1], [1.1], [2.1], [3.1]])
    >>> exact(by_label=True)(None, x0, x1, labels0=jnp.array([0, 1, 0, 1]),
    ...                      labels1=jnp.array([1, 0, 1, 0]))[1].tolist()
    [1, 0, 3, 2]
    """
    return Exact(scope=scope, by_label=by_label)


def sinkhorn(
    *,
    epsilon: float = 0.05,
    relative_epsilon: bool = True,
    max_iterations: int = 2000,
    threshold: float = 1e-3,
    scope: str = "local",
    by_label: bool = False,
) -> Sinkhorn:
    """Return the entropic OT coupling; ``epsilon`` is relative to the mean cost unless told otherwise.

    Numbers may be Python or numpy scalars (``np.float32(0.1)``, ``np.int64(500)``); bools, NaN and inf
    are refused with the argument named. ``by_label=True`` pairs only within classes (see ``Sinkhorn``).
    """
    return Sinkhorn(
        epsilon=epsilon,
        relative_epsilon=relative_epsilon,
        max_iterations=max_iterations,
        threshold=threshold,
        scope=scope,
        by_label=by_label,
    )


def schrodinger_bridge(
    sigma: float = 1.0,
    *,
    max_iterations: int = 2000,
    threshold: float = 1e-3,
    scope: str = "local",
    by_label: bool = False,
) -> Sinkhorn:
    """Return SB-CFM's coupling: entropic OT with absolute epsilon = 2 sigma^2 on squared distances.

    Pair it with ``fmjax.paths.SchrodingerBridge(sigma=sigma)``; for sigma = 0 use ``exact()``. A sigma
    so small against the batch's spread that Sinkhorn cannot converge is reported (status, or a
    ``CouplingWarning`` when called eagerly), not hidden. ``by_label=True`` pairs only within classes
    (see ``Sinkhorn``).
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
    )


COUPLINGS = {
    "independent": independent,
    "exact": exact,
    "sinkhorn": sinkhorn,
    "sb": schrodinger_bridge,
}
"""Coupling factories by name, as accepted by ``make_coupling`` and the CLI's ``--coupling``."""


def make_coupling(name: str, **kwargs) -> Coupling:
    """Build a coupling by name (see ``COUPLINGS``) with the factory's keyword arguments."""
    return lookup("coupling", name, COUPLINGS)(**kwargs)


def resolve_coupling(coupling: Any, name: str = "coupling") -> Coupling:
    """A ``Coupling`` from a coupling or a name in ``COUPLINGS`` (e.g. "exact").

    A name builds the coupling with its factory's defaults (``make_coupling(name)``). A factory that
    was not called, or anything else, raises a TypeError naming ``name`` and how to build one.
    """
    if isinstance(coupling, str):
        return make_coupling(coupling)
    if isinstance(coupling, Coupling):
        return coupling
    names = ", ".join(map(repr, sorted(COUPLINGS)))
    if callable(coupling) and not isinstance(coupling, type) and coupling in COUPLINGS.values():
        raise TypeError(f"{name} must be a coupling, not its factory: call it, e.g. {coupling.__name__}()")
    raise TypeError(
        f"{name} must be an fmjax coupling (e.g. fmjax.independent(), fmjax.exact(), "
        f"fmjax.sinkhorn(epsilon=0.05)) or one of the names {names}; got {describe(coupling)}"
    )

"""The coupling base class, its status and the input checks shared by every coupling."""

from __future__ import annotations

import abc
import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fmjax._checks import check_batch, check_finite, is_traced

SCOPES = ("local", "global")


class CouplingWarning(RuntimeWarning):
    """Warned when a coupling called eagerly (outside ``jit``) did not converge; its pairs still come back.

    Make it an error with ``warnings.simplefilter("error", fmjax.couplings.CouplingWarning)``.
    """


Status = dict[str, jax.Array]

Labels = jax.Array | None
"""Integer class labels of shape [n], given to a ``by_label`` coupling only (None otherwise)."""


def _status(converged: Any, error: Any) -> Status:
    """``apply_with_status``'s status: ``coupling_converged`` (bool), ``coupling_error`` (float32)."""
    return {
        "coupling_converged": jnp.asarray(converged, jnp.bool_),
        "coupling_error": jnp.asarray(error, jnp.float32),
    }


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
    if not is_traced(labels):
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
        if not is_traced(converged) and not bool(converged):
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
        i, j, status, details = _pairs_and_status(self, key, x0, x1, labels)
        self._report(status, details)
        return i, j, status

    def __call__(
        self, key: jax.Array, x0: jax.Array, x1: jax.Array, *, labels0: Labels = None, labels1: Labels = None
    ) -> tuple[jax.Array, jax.Array]:
        """Couple the batches ``x0`` and ``x1`` (shape [n, *dims] each); return (i, j) of shape [n].

        ``labels0``/``labels1`` (integer class ids of shape [n]) only for a ``by_label`` coupling.
        """
        i, j, _ = self._run(key, x0, x1, labels0, labels1)
        return i, j

    def apply_with_status(
        self, key: jax.Array, x0: jax.Array, x1: jax.Array, *, labels0: Labels = None, labels1: Labels = None
    ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array], Status]:
        """Couple and gather: ``(x0[i], x1[j], (i, j), status)``.

        ``status = {"coupling_converged": bool[], "coupling_error": float32[]}``: whether the solver
        converged and its final error (Sinkhorn: the plan's marginal error
        ``sum_i |sum_j P_ij - 1/n| + sum_j |sum_i P_ij - 1/n|``, or with tau_a or tau_b < 1 the
        unbalanced solver's optimality residual (see ``Sinkhorn``); exact: 0.0, or inf when the host
        solve failed; independent: 0.0). jit-able; a step can put the status in its metrics.
        ``labels0``/``labels1`` as for ``__call__``.
        """
        i, j, status = self._run(key, x0, x1, labels0, labels1)
        a, b = self._gather(x0, x1, i, j)
        return a, b, (i, j), status

    def apply(
        self, key: jax.Array, x0: jax.Array, x1: jax.Array, *, labels0: Labels = None, labels1: Labels = None
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
        labels0: Labels = None,
        labels1: Labels = None,
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


def _pairs_and_status(coupling: Coupling, key, x0, x1, labels) -> tuple:
    """``coupling._pairs_with_details``, passed ``labels`` only when there are some (so a coupling that
    takes no labels implements it without them)."""
    if labels is None:
        return coupling._pairs_with_details(key, x0, x1)
    return coupling._pairs_with_details(key, x0, x1, labels)


def _given(**kwargs: Any) -> dict[str, Any]:
    """The keyword arguments that are not None (so couplings that take no labels are called as before)."""
    return {name: value for name, value in kwargs.items() if value is not None}


def _coupling_dataclass(cls):
    cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    jax.tree_util.register_static(cls)
    return cls

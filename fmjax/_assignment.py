"""Host solvers for the dense linear assignment problem behind the exact coupling."""

from __future__ import annotations

import numpy as np

try:
    from fmjax import _lap
except ImportError:  # built without a C compiler
    _lap = None

__all__ = [
    "HAVE_NATIVE",
    "SOLVER_NAME",
    "solve_assignment",
    "solve_assignment_points",
    "solve_assignment_pot",
]

HAVE_NATIVE = _lap is not None
SOLVER_NAME = (
    "fmjax C (auction + Jonker-Volgenant)" if HAVE_NATIVE else "POT network simplex (C extension not built)"
)
"""The host solver the exact coupling uses, in words (``fmjax --version``, a run's ``config.json``)."""

if not HAVE_NATIVE:
    import os as _os
    import warnings as _warnings

    if _os.environ.get("FMJAX_VERBOSE"):
        _warnings.warn(
            "fmjax's C assignment solver was not built (no C compiler at install time): the exact coupling "
            "uses POT, 3-6x slower; reinstall with a C compiler (pip install -e .) to build it",
            RuntimeWarning,
            stacklevel=2,
        )


def solve_assignment_pot(cost: np.ndarray) -> np.ndarray:
    """Optimal columns for each row with POT's network simplex (float64)."""
    import ot  # POT pulls in scikit-learn: imported only where the C solver is missing

    n = cost.shape[0]
    weights = np.full(n, 1.0 / n)
    plan = ot.emd(weights, weights, np.asarray(cost, np.float64), numItermax=max(100_000, 50 * n * n))
    return np.argmax(plan, axis=1).astype(np.int32)


def _scaled_to_range(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """``x`` times the power of two that brings max |x| into [0.5, 1), when max |x| lies outside
    [low, high]; else ``x`` itself. Exact: the assignment is invariant to scaling the costs by c > 0."""
    top = float(np.max(np.abs(x), initial=0.0))
    if top == 0.0 or low <= top <= high:
        return x
    _, exponent = np.frexp(top)
    return np.ldexp(np.asarray(x, np.float64), -int(exponent))


def solve_assignment(cost: np.ndarray) -> np.ndarray:
    """Optimal columns ``j[i]`` for a square cost matrix: a permutation minimising sum_i cost[i, j[i]].

    Uses fmjax's compiled auction + Jonker-Volgenant solver when it was built (exact for the float32
    costs), else POT's network simplex. Costs beyond 2^64 (or all below 2^-64) in magnitude are first
    scaled by a power of two, so float32 neither overflows nor underflows. Raises a ValueError for a
    non-square or non-finite matrix.
    """
    cost = np.asarray(cost)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"cost must be a square matrix; got shape {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("cost must be finite (found NaN or inf in the coupling's cost matrix)")
    cost = np.ascontiguousarray(_scaled_to_range(cost, 2.0**-64, 2.0**64), np.float32)
    n = cost.shape[0]
    if _lap is None:
        return solve_assignment_pot(cost)
    return np.frombuffer(_lap.solve(cost, n), np.int32)


def solve_assignment_points(x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """Optimal columns for the squared Euclidean costs between point clouds ``x0``, ``x1`` of shape [n, d].

    The costs are formed on the host in float64 and rounded to float32 once; cheaper than moving an
    n x n cost matrix when d is small. Points beyond 2^32 (or all below 2^-32) in magnitude are first
    scaled by a power of two, so the float32 costs neither overflow nor underflow.
    """
    x0, x1 = np.asarray(x0), np.asarray(x1)
    if x0.ndim != 2 or x0.shape != x1.shape or x0.shape[1] < 1:
        raise ValueError(
            f"x0 and x1 must be point clouds of one shape [n, d], d >= 1; got {x0.shape}, {x1.shape}"
        )
    if not (np.isfinite(x0).all() and np.isfinite(x1).all()):
        raise ValueError("x0 and x1 must be finite (found NaN or inf)")
    both = _scaled_to_range(np.concatenate([x0, x1]), 2.0**-32, 2.0**32)
    x0 = np.ascontiguousarray(both[: len(x0)], np.float32)
    x1 = np.ascontiguousarray(both[len(x0) :], np.float32)
    n, d = x0.shape
    if _lap is None:
        diff = x0.astype(np.float64)[:, None, :] - x1.astype(np.float64)[None, :, :]
        return solve_assignment(np.sum(diff * diff, axis=-1))
    return np.frombuffer(_lap.solve_points(x0, x1, n, d), np.int32)

"""Host solvers for the dense linear assignment problem behind the exact coupling."""

from __future__ import annotations

import numpy as np
import ot

try:
    from fmjax import _lap
except ImportError:  # built without a C compiler
    _lap = None

__all__ = ["HAVE_NATIVE", "solve_assignment", "solve_assignment_points", "solve_assignment_pot"]

HAVE_NATIVE = _lap is not None


def solve_assignment_pot(cost: np.ndarray) -> np.ndarray:
    """Optimal columns for each row with POT's network simplex (float64)."""
    n = cost.shape[0]
    weights = np.full(n, 1.0 / n)
    plan = ot.emd(weights, weights, np.asarray(cost, np.float64), numItermax=max(100_000, 50 * n * n))
    return np.argmax(plan, axis=1).astype(np.int32)


def solve_assignment(cost: np.ndarray) -> np.ndarray:
    """Optimal columns ``j[i]`` for a square cost matrix: a permutation minimising sum_i cost[i, j[i]].

    Uses fmjax's compiled auction + Jonker-Volgenant solver when it was built (exact for the float32
    costs), else POT's network simplex.
    """
    cost = np.ascontiguousarray(cost, np.float32)
    n = cost.shape[0]
    if cost.shape != (n, n):
        raise ValueError(f"cost must be a square matrix; got shape {cost.shape}")
    if _lap is None:
        if not np.isfinite(cost).all():
            raise ValueError("cost must be finite (found NaN or inf in the coupling's cost matrix)")
        return solve_assignment_pot(cost)
    return np.frombuffer(_lap.solve(cost, n), np.int32)


def solve_assignment_points(x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """Optimal columns for the squared Euclidean costs between point clouds ``x0``, ``x1`` of shape [n, d].

    The costs are formed on the host in float64 and rounded to float32 once; cheaper than moving an
    n x n cost matrix when d is small.
    """
    x0 = np.ascontiguousarray(x0, np.float32)
    x1 = np.ascontiguousarray(x1, np.float32)
    n, d = x0.shape
    if _lap is None:
        diff = x0.astype(np.float64)[:, None, :] - x1.astype(np.float64)[None, :, :]
        return solve_assignment(np.sum(diff * diff, axis=-1))
    return np.frombuffer(_lap.solve_points(x0, x1, n, d), np.int32)

"""Evaluation metrics: exact 2-Wasserstein distance, Fréchet distance and path energy; straightness and
crossing of trajectories. No trained model inside: the Fréchet distance in a digits classifier's features
(the FID recipe) lives beside that classifier, ``fmjax.digits_classifier.digits_frechet_distance``.

``wasserstein2`` solves the exact OT problem between two empirical measures with uniform weights and
squared-Euclidean cost and returns its square root, the convention of the OT-CFM papers' tables.
Between two clouds of the same size the optimal plan is a permutation, found by fmjax's assignment
solver (4x faster than POT at 10k points); other sizes go to POT's network simplex.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import _assignment
from fmjax._checks import check_real, is_traced
from fmjax._straightness import crossing_fraction, straightness
from fmjax.sampling import Trajectory

__all__ = [
    "wasserstein2",
    "frechet_distance",
    "path_energy",
    "normalized_path_energy",
    "straightness",
    "crossing_fraction",
]


def wasserstein2(x: jax.Array | np.ndarray, y: jax.Array | np.ndarray) -> float:
    """Exact W2 between the empirical measures of ``x`` [n, *dims] and ``y`` [m, *dims].

    The transport cost is summed in float64. For n == m the plan is the optimal assignment (fmjax's
    solver, exact for the float32-rounded costs); otherwise POT's ``emd2``.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim < 2 or y.ndim < 2 or x.shape[1:] != y.shape[1:]:
        raise ValueError(f"x and y must be [n, *dims] with the same dims; got {x.shape} and {y.shape}")
    if len(x) == 0 or len(y) == 0:
        raise ValueError("x and y must each hold at least one point")
    x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite (found NaN or inf)")
    if len(x) == len(y) and _assignment.HAVE_NATIVE:
        if x.shape[1] <= 32:
            cols = _assignment.solve_assignment_points(x, y)
        else:
            cols = _assignment.solve_assignment(_squared_distances(x, y))
        return float(np.sqrt(np.mean(np.sum(np.square(x - y[cols]), axis=1))))
    import ot  # POT (and the scikit-learn it imports) only for clouds of different sizes

    cost = _squared_distances(x, y)
    a, b = np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y))
    return float(np.sqrt(max(ot.emd2(a, b, cost, numItermax=10_000_000), 0.0)))


def _squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """||x_i - y_j||^2 in float64, [n, m]."""
    cost = np.sum(x * x, axis=1)[:, None] + np.sum(y * y, axis=1)[None, :] - 2.0 * x @ y.T
    return np.maximum(cost, 0.0)


def frechet_distance(x: jax.Array | np.ndarray, y: jax.Array | np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to features ``x`` [n, d] and ``y`` [m, d].

        FD = ||mu_x - mu_y||^2 + tr(C_x + C_y - 2 (C_x^1/2 C_y C_x^1/2)^1/2)

    with the sample means and (unbiased, ddof=1) covariances: the squared 2-Wasserstein distance
    between N(mu_x, C_x) and N(mu_y, C_y), and FID's formula when the features are a classifier's.
    Computed in float64 from symmetric eigendecompositions (C_x^1/2, then the eigenvalues of the
    symmetric PSD C_x^1/2 C_y C_x^1/2, negative round-off clipped to 0), which stays real and
    accurate for singular covariances (n <= d) where ``scipy.linalg.sqrtm(C_x C_y)`` is not.

    Raises ValueError naming ``x`` or ``y`` unless both are finite 2D arrays with n, m >= 2 rows
    (a covariance needs two) and the same number d >= 1 of columns.

    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(500, 3))
    >>> round(frechet_distance(x, x + np.array([3.0, 0.0, 4.0])), 6)  # a translation: ||delta||^2
    25.0
    """
    x, y = _features("x", x), _features("y", y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must have the same number of features d; got shapes {x.shape} (x) and {y.shape} (y)"
        )
    cov_x, cov_y = (np.atleast_2d(np.cov(f, rowvar=False, ddof=1)) for f in (x, y))  # [d, d], also d = 1
    root_x = _psd_sqrt(cov_x)
    middle = root_x @ cov_y @ root_x
    trace_root = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)))
    value = np.sum(np.square(x.mean(axis=0) - y.mean(axis=0))) + np.trace(cov_x) + np.trace(cov_y)
    return float(max(value - 2.0 * trace_root, 0.0))


def _features(name: str, features: jax.Array | np.ndarray) -> np.ndarray:
    """``features`` as a float64 [n, d] array with n >= 2, d >= 1 and every entry finite."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"{name} must be a 2D array of features [n, d]; got shape {features.shape}")
    if not (np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers; got dtype {features.dtype}")
    if features.shape[0] < 2 or features.shape[1] < 1:
        raise ValueError(
            f"{name} must have at least 2 rows (samples) and 1 column (feature); got shape {features.shape}"
        )
    features = features.astype(np.float64)
    if not np.isfinite(features).all():
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return features


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues set to 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def path_energy(trajectory: Trajectory) -> jax.Array:
    """Mean kinetic energy E_x sum_k ||x_{k+1} - x_k||^2 / (t_{k+1} - t_k) of saved trajectories.

    For an Euler solve saved at every step this equals E int_0^1 ||v_t(x_t)||^2 dt exactly (the
    velocity is constant over each step); for other solvers it is the energy of the piecewise-linear
    interpolation of the saved states, a lower bound that tightens as points are added.

    ``trajectory.ts`` has shape [T] (T >= 2, strictly monotone when concrete) and ``trajectory.xs``
    shape [T, batch, *dims] with batch >= 1; the result is a scalar.
    """
    if not isinstance(trajectory, tuple) or len(trajectory) != 2:
        raise TypeError(
            "trajectory must be a Trajectory(ts, xs) from sample(save_trajectory=True); "
            f"got {type(trajectory).__name__}"
        )
    ts, xs = (jnp.asarray(a) for a in trajectory)
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"trajectory.ts must have shape [num_times] with num_times >= 2; got {ts.shape}")
    if xs.ndim < 3 or xs.shape[0] != ts.shape[0] or xs.shape[1] == 0:
        raise ValueError(
            f"trajectory.xs must have shape [num_times, batch, *dims] = [{ts.shape[0]}, batch >= 1, ...]; "
            f"got {xs.shape}"
        )
    if not is_traced(ts):
        steps = np.diff(np.asarray(ts, np.float64))
        if not (np.all(steps > 0) or np.all(steps < 0)):
            raise ValueError("trajectory.ts must be strictly monotone (a zero time step has infinite energy)")
    dt = jnp.diff(ts)
    steps = jnp.diff(xs, axis=0)
    sq = jnp.sum(jnp.square(steps).reshape(steps.shape[0], steps.shape[1], -1), axis=-1)
    return jnp.mean(jnp.sum(sq / dt[:, None], axis=0))


def normalized_path_energy(energy: float, w2: float) -> float:
    """NPE = |E int ||v||^2 dt - W2^2| / W2^2 (Tong et al.): 0 for the optimal transport map.

    ``w2`` is the 2-Wasserstein distance between the source and target distributions.
    """
    energy = check_real("energy", energy, low=0.0)
    w2 = check_real("w2", w2, low=0.0, low_inclusive=False)
    return abs(energy - w2**2) / w2**2

"""fmjax.metrics.frechet_distance against closed forms, on point sets built with exact sample moments."""

import numpy as np
import pytest

from fmjax.metrics import frechet_distance


def _with_moments(rng, n, mean, cov):
    """n points [n, d] whose sample mean is ``mean`` and sample covariance (ddof=1) is exactly ``cov``
    (of rank r < n)."""
    mean, cov = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
    values, vectors = np.linalg.eigh(cov)
    keep = values > 0
    z = rng.normal(size=(n, int(keep.sum())))
    z -= z.mean(axis=0)
    z = np.linalg.solve(np.linalg.cholesky(np.atleast_2d(np.cov(z, rowvar=False))), z.T).T  # covariance I
    return mean + (z * np.sqrt(values[keep])) @ vectors[:, keep].T


def _rotation(rng, d):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def test_identical_sets_are_at_distance_zero():
    x = np.random.default_rng(0).normal(size=(200, 6)) @ np.diag([3.0, 1.0, 0.5, 2.0, 0.1, 1.0])
    # the eigenvalues of C^1/2 C C^1/2 = C^2 and their roots reproduce tr C to float64 round-off
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-12 * np.trace(np.cov(x, rowvar=False)))


def test_translation_gives_the_squared_length():
    x = np.random.default_rng(1).normal(size=(300, 4)) @ np.diag([1.0, 2.0, 0.3, 5.0])
    delta = np.array([1.0, -2.0, 0.5, 3.0])
    assert frechet_distance(x, x + delta) == pytest.approx(np.sum(delta**2), rel=1e-10)


def test_commuting_covariances_give_the_sum_of_squared_root_differences():
    rng = np.random.default_rng(2)
    d = 5
    q = _rotation(rng, d)  # shared eigenvectors: the covariances commute but are not diagonal
    a, b = np.array([4.0, 1.0, 0.25, 9.0, 2.0]), np.array([1.0, 1.0, 1.0, 0.04, 8.0])
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    x = _with_moments(rng, 100, mu_a, q @ np.diag(a) @ q.T)
    y = _with_moments(rng, 70, mu_b, q @ np.diag(b) @ q.T)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(y, x) == pytest.approx(expected, rel=1e-10)


def test_one_dimension_is_the_squared_mean_and_std_differences():
    rng = np.random.default_rng(3)
    x, y = _with_moments(rng, 50, [2.0], [[9.0]]), _with_moments(rng, 80, [-1.0], [[0.25]])
    assert frechet_distance(x, y) == pytest.approx(3.0**2 + (3.0 - 0.5) ** 2, rel=1e-12)


def test_non_commuting_covariances_in_two_dimensions():
    # for a 2x2 PSD M, tr M^1/2 = sqrt(tr M + 2 sqrt(det M)); with M = A^1/2 B A^1/2:
    # tr M = tr(A B), det M = det A det B, an expression with no matrix square root in it
    rng = np.random.default_rng(4)
    cov_a = np.array([[2.0, 0.9], [0.9, 1.0]])
    cov_b = np.array([[0.5, -0.3], [-0.3, 3.0]])
    assert not np.allclose(cov_a @ cov_b, cov_b @ cov_a)
    mu_a, mu_b = np.array([0.0, 1.0]), np.array([2.0, -1.0])
    x, y = _with_moments(rng, 64, mu_a, cov_a), _with_moments(rng, 90, mu_b, cov_b)
    trace_root = np.sqrt(np.trace(cov_a @ cov_b) + 2.0 * np.sqrt(np.linalg.det(cov_a) * np.linalg.det(cov_b)))
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(y, x) == pytest.approx(expected, rel=1e-10)


def test_symmetric_and_invariant_under_a_rotation_of_both_sets():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(120, 8)) @ rng.normal(size=(8, 8))
    y = rng.standard_t(df=5, size=(150, 8)) + 0.3
    value = frechet_distance(x, y)
    assert value > 1.0
    assert frechet_distance(y, x) == pytest.approx(value, rel=1e-10)
    q = _rotation(rng, 8)
    assert frechet_distance(x @ q, y @ q) == pytest.approx(value, rel=1e-10)


def test_singular_covariances_fewer_points_than_features():
    # points on two axes of R^6 (rank-2 covariances that commute): exact where sqrtm(C_x C_y) of a
    # singular product is ill-conditioned
    rng = np.random.default_rng(6)
    d = 6
    a, b = np.zeros(d), np.zeros(d)
    a[:2], b[:2] = [4.0, 1.0], [1.0, 9.0]
    x = _with_moments(rng, 5, np.zeros(d), np.diag(a))
    y = _with_moments(rng, 4, np.ones(d), np.diag(b))
    expected = d * 1.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)


def test_estimate_converges_to_the_gaussians_distance():
    # a sample estimate, not an exact identity: 200k points put the sample moments within ~1% here
    rng = np.random.default_rng(7)
    x = rng.normal(size=(200_000, 3)) * np.array([1.0, 2.0, 0.5])
    y = rng.normal(size=(200_000, 3)) * np.array([2.0, 2.0, 1.5]) + np.array([1.0, 0.0, 0.0])
    assert frechet_distance(x, y) == pytest.approx(1.0 + 1.0 + 0.0 + 1.0, rel=0.02)


def test_accepts_integers_and_float32():
    x = np.arange(12, dtype=np.int64).reshape(6, 2) % 5
    assert frechet_distance(x, x.astype(np.float32) + 1.0) == pytest.approx(2.0, rel=1e-9)


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (np.zeros(5), np.zeros((5, 1)), "x must be a 2D array"),
        (np.zeros((5, 2)), np.zeros((5, 2, 1)), "y must be a 2D array"),
        (np.zeros((5, 2)), np.zeros((5, 3)), "same number of features"),
        (np.zeros((1, 2)), np.zeros((5, 2)), "x must have at least 2 rows"),
        (np.zeros((5, 2)), np.zeros((1, 2)), "y must have at least 2 rows"),
        (np.zeros((5, 0)), np.zeros((5, 0)), "x must have at least 2 rows .* 1 column"),
        (np.full((3, 2), np.nan), np.zeros((3, 2)), "x must be finite"),
        (np.zeros((3, 2)), np.array([[0.0, np.inf]] * 3), "y must be finite"),
        (np.array([["a", "b"]] * 3), np.zeros((3, 2)), "x must hold real numbers"),
    ],
)
def test_bad_input_is_named(x, y, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(x, y)

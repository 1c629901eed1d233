"""Earth event datasets on the sphere S^2, shipped with fmjax (no download).

The four datasets of Mathieu & Nickel (2020), used by the Riemannian score-based models of De Bortoli et
al. (2022) and by Riemannian flow matching (Chen & Lipman, 2024, Table 2); the CSV files are copied
unchanged from the score-based models' code (sources, counts and licence notes: ``PROVENANCE.md`` next to
this module):

============  ==================  ======
name          file                points
============  ==================  ======
volcano       ``volerup.csv``     827
earthquake    ``quakes_all.csv``  6120
flood         ``flood.csv``       4875
fire          ``fire.csv``        12809
============  ==================  ======

Each file holds one point per line as ``latitude,longitude`` in degrees, after a few comment lines
(``# ...``) and, in three files, a column header; every line that is not two comma-separated numbers is
skipped and the count is checked against the table.

``load(name)`` maps a point (lat, lon), in radians, to the unit vector

    x = cos(lat) cos(lon),   y = cos(lat) sin(lon),   z = sin(lat)

and returns them as float32 [N, 3], in file order; ``to_lat_lon`` is the inverse map (degrees), for plots.

Splits follow the published protocol: for each seed one random permutation of the N points,
``numpy.random.default_rng(seed).permutation(N)``; ``"train"`` is its first floor(0.8 N) entries,
``"validation"`` the next floor(0.1 N) and ``"test"`` the rest, each in the permutation's order
(``split_indices``). The published tables use seeds 0..4 and report the test NLL of the model chosen by
validation NLL.

>>> import numpy as np
>>> from fmjax.data import earth
>>> points = earth.load("volcano")
>>> points.shape, points.dtype.name
((827, 3), 'float32')
>>> bool(np.allclose(np.linalg.norm(points, axis=1), 1.0, atol=1e-6))
True
>>> [len(earth.load("volcano", split=split, seed=0)) for split in earth.SPLITS]
[661, 82, 84]
>>> np.round(earth.to_lat_lon(points[:1]).astype(float), 4).tolist()  # the file's first point
[[-30.2, -178.47]]
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import numpy as np

from fmjax._checks import check_choice, check_int

__all__ = [
    "DATASETS",
    "SPLITS",
    "SIZES",
    "load",
    "load_lat_lon",
    "split_indices",
    "from_lat_lon",
    "to_lat_lon",
]

_FILES = {
    "volcano": "volerup.csv",
    "earthquake": "quakes_all.csv",
    "flood": "flood.csv",
    "fire": "fire.csv",
}

DATASETS: tuple[str, ...] = tuple(_FILES)
"""The dataset names: ``("volcano", "earthquake", "flood", "fire")``."""

SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""The split names, in the order their points come in a seed's permutation."""

SIZES: dict[str, int] = {"volcano": 827, "earthquake": 6120, "flood": 4875, "fire": 12809}
"""The number of points N of each dataset (all splits together)."""


def _point(line: str) -> tuple[float, float] | None:
    """``(lat, lon)`` if ``line`` is two comma-separated numbers, else None (a comment or header)."""
    if line.lstrip().startswith("#"):
        return None
    fields = line.split(",")
    if len(fields) != 2:
        return None
    try:
        return float(fields[0]), float(fields[1])
    except ValueError:
        return None


@functools.cache
def _read(name: str) -> np.ndarray:
    """The points of dataset ``name`` as float64 [N, 2] (lat, lon in degrees), read-only (cached)."""
    file = _FILES[name]
    text = resources.files(__name__).joinpath(file).read_bytes().decode("ascii")
    points = [point for line in text.splitlines() if (point := _point(line)) is not None]
    lat_lon = np.array(points, dtype=np.float64).reshape(-1, 2)
    # a damaged copy of the package would otherwise give quietly different data
    if len(lat_lon) != SIZES[name]:
        raise RuntimeError(f"{file} holds {len(lat_lon)} points; expected {SIZES[name]}")
    lat, lon = lat_lon[:, 0], lat_lon[:, 1]
    if not (np.all(np.abs(lat) <= 90) and np.all(np.abs(lon) <= 180)):
        raise RuntimeError(f"{file} holds a latitude outside [-90, 90] or a longitude outside [-180, 180]")
    lat_lon.setflags(write=False)
    return lat_lon


def _split_indices(name: str, seed: int) -> dict[str, np.ndarray]:
    n = SIZES[name]
    permutation = np.random.default_rng(seed).permutation(n)
    num_train, num_validation = (8 * n) // 10, n // 10  # floor(0.8 n), floor(0.1 n), in integers
    return {
        "train": permutation[:num_train],
        "validation": permutation[num_train : num_train + num_validation],
        "test": permutation[num_train + num_validation :],
    }


def _check(name: Any, split: Any, seed: Any) -> tuple[str, str | None, int]:
    name = check_choice("name", name, DATASETS)
    if split is not None:
        split = check_choice("split", split, SPLITS)
    seed = check_int("seed", seed, low=0)
    return name, split, seed


def split_indices(name: str, *, seed: int = 0) -> dict[str, np.ndarray]:
    """The indices (into the file's points) of each split of dataset ``name`` under ``seed``.

    Returns ``{"train": ..., "validation": ..., "test": ...}``, int64 arrays of sizes floor(0.8 N),
    floor(0.1 N) and the rest: consecutive slices of ``numpy.random.default_rng(seed).permutation(N)``.

    >>> parts = split_indices("flood", seed=1)
    >>> [len(parts[split]) for split in SPLITS]
    [3900, 487, 488]
    >>> bool((np.sort(np.concatenate([parts[split] for split in SPLITS])) == np.arange(4875)).all())
    True
    """
    name, _, seed = _check(name, None, seed)
    return _split_indices(name, seed)


def load_lat_lon(name: str, *, split: str | None = None, seed: int = 0) -> np.ndarray:
    """The points of dataset ``name`` as float64 [n, 2]: (latitude, longitude) in degrees, as in the file.

    ``split=None`` gives all N points in file order; ``"train"``, ``"validation"`` or ``"test"`` gives
    the split of ``seed`` (see ``split_indices``). The array is the caller's own copy.
    """
    name, split, seed = _check(name, split, seed)
    lat_lon = _read(name)
    if split is None:
        return lat_lon.copy()
    return lat_lon[_split_indices(name, seed)[split]]


def load(name: str, *, split: str | None = None, seed: int = 0) -> np.ndarray:
    """The points of dataset ``name`` as unit vectors, float32 [n, 3] (``from_lat_lon`` of the file).

    ``name`` is one of ``DATASETS``. ``split=None`` gives all N points (``SIZES[name]``) in file order;
    ``"train"``, ``"validation"`` or ``"test"`` gives that split of the seeded 80/10/10 split of ``seed``
    (an int >= 0; see ``split_indices``). The array is the caller's own copy.

    >>> load("fire").shape, load("fire", split="test", seed=3).shape
    ((12809, 3), (1282, 3))
    """
    return from_lat_lon(load_lat_lon(name, split=split, seed=seed)).astype(np.float32)


def _floating(name: str, values: Any, size: int, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim == 0 or array.shape[-1] != size:
        raise ValueError(f"{name} must have shape [..., {size}] ({what}); got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise TypeError(f"{name} must be a real array; got dtype {array.dtype}")
    return array.astype(np.result_type(array.dtype, np.float32), copy=False)


def from_lat_lon(lat_lon: Any) -> np.ndarray:
    """Map points [..., 2] of (latitude, longitude) in degrees to unit vectors [..., 3] in R^3.

    ``x = cos(lat) cos(lon), y = cos(lat) sin(lon), z = sin(lat)``; float32 input stays float32, other
    input gives float64.

    >>> from_lat_lon([[0.0, 90.0], [90.0, 0.0]]).round(12).tolist()
    [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    lat_lon = _floating("lat_lon", lat_lon, 2, "latitude, longitude in degrees")
    lat, lon = np.deg2rad(lat_lon[..., 0]), np.deg2rad(lat_lon[..., 1])
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)


def to_lat_lon(points: Any) -> np.ndarray:
    """Map points [..., 3] of R^3 to (latitude, longitude) [..., 2] in degrees (inverse of ``from_lat_lon``).

    ``lat = atan2(z, hypot(x, y))`` in [-90, 90] and ``lon = atan2(y, x)`` in [-180, 180]; a point
    need not have unit norm (its direction is used). At the poles the longitude is 0 (any is right).

    >>> to_lat_lon([[0.0, -2.0, 0.0], [0.0, 0.0, -1.0]]).tolist()
    [[0.0, -90.0], [-90.0, 0.0]]
    """
    points = _floating("points", points, 3, "x, y, z")
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    return np.stack([np.rad2deg(np.arctan2(z, np.hypot(x, y))), np.rad2deg(np.arctan2(y, x))], axis=-1)

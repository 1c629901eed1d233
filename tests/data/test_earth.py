"""The shipped Earth event datasets (fmjax.data.earth): counts, the map to the unit sphere, the seeded
80/10/10 splits of the published protocol, argument errors, and that the files are package data."""

from __future__ import annotations

import fnmatch
import pathlib
import tomllib
from importlib import resources

import numpy as np
import pytest

from fmjax.data import earth

COUNTS = {"volcano": 827, "earthquake": 6120, "flood": 4875, "fire": 12809}

# the first and the last point of each file, (lat, lon) in degrees as written there
FIRST_LAST = {
    "volcano": ((-30.2, -178.47), (3.17, 98.392)),
    "earthquake": ((31.1, 35.5), (39.831, 77.106)),
    "flood": ((35.8142, 5.23026), (31.8833, -88.3364)),
    "fire": ((-25.088, 152.358), (-7.428, 22.986)),
}


def test_the_names_and_sizes():
    assert earth.DATASETS == ("volcano", "earthquake", "flood", "fire")
    assert earth.SPLITS == ("train", "validation", "test")
    assert earth.SIZES == COUNTS


@pytest.mark.parametrize("name", list(COUNTS))
def test_count_dtype_and_unit_norm(name):
    points = earth.load(name)
    assert points.shape == (COUNTS[name], 3) and points.dtype == np.float32
    norms = np.linalg.norm(points.astype(np.float64), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(COUNTS))
def test_the_headers_are_skipped_and_the_last_line_read(name):
    lat_lon = earth.load_lat_lon(name)
    assert lat_lon.shape == (COUNTS[name], 2) and lat_lon.dtype == np.float64
    first, last = FIRST_LAST[name]
    assert tuple(lat_lon[0]) == first and tuple(lat_lon[-1]) == last


def test_the_first_volcano_maps_to_its_unit_vector():
    # volerup.csv's first point is lat = -30.2, lon = -178.47 degrees; with cos(30.2°) = 0.8642748020,
    # sin(30.2°) = 0.5030199466, cos(1.53°) = 0.9996434817, sin(1.53°) = 0.0267003640 and
    # cos(-178.47°) = -cos(1.53°), sin(-178.47°) = -sin(1.53°):
    # x = 0.8642748020 * -0.9996434817, y = 0.8642748020 * -0.0267003640, z = -0.5030199466
    expected = np.array([-0.8639666722, -0.0230764518, -0.5030199466])
    np.testing.assert_allclose(earth.load("volcano")[0], expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", list(COUNTS))
def test_to_lat_lon_inverts_the_map(name):
    lat_lon = earth.load_lat_lon(name)
    back = earth.to_lat_lon(earth.load(name)).astype(np.float64)
    # float32 unit vectors: about 1e-7 rad = 6e-6 degrees; longitudes compared modulo 360 (180 == -180)
    np.testing.assert_allclose(back[:, 0], lat_lon[:, 0], rtol=0, atol=1e-4)
    lon_error = (back[:, 1] - lat_lon[:, 1] + 180.0) % 360.0 - 180.0
    np.testing.assert_allclose(lon_error, 0.0, rtol=0, atol=1e-4)


def test_from_and_to_lat_lon_are_inverse_in_float64():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(1000, 3))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    np.testing.assert_allclose(earth.from_lat_lon(earth.to_lat_lon(points)), points, rtol=0, atol=1e-12)
    lat_lon = np.stack([rng.uniform(-89.9, 89.9, 1000), rng.uniform(-179.9, 179.9, 1000)], axis=-1)
    np.testing.assert_allclose(earth.to_lat_lon(earth.from_lat_lon(lat_lon)), lat_lon, rtol=0, atol=1e-10)
    # the axes and a point off the unit sphere (only its direction counts)
    np.testing.assert_allclose(
        earth.to_lat_lon([[2.0, 0, 0], [0, 3.0, 0], [-1.0, 0, 0], [0, 0, 5.0]]),
        [[0, 0], [0, 90], [0, 180], [90, 0]],
        atol=1e-12,
    )


@pytest.mark.parametrize("name", list(COUNTS))
@pytest.mark.parametrize("seed", [0, 4])
def test_the_splits_follow_the_protocol(name, seed):
    n = COUNTS[name]
    parts = earth.split_indices(name, seed=seed)
    sizes = [len(parts[split]) for split in earth.SPLITS]
    assert sizes == [int(np.floor(0.8 * n)), int(np.floor(0.1 * n)), n - sum(sizes[:2])]
    # one permutation per seed, cut into consecutive slices: so disjoint, and together every point once
    joined = np.concatenate([parts[split] for split in earth.SPLITS])
    np.testing.assert_array_equal(joined, np.random.default_rng(seed).permutation(n))
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))
    everything = earth.load(name)
    everything_lat_lon = earth.load_lat_lon(name)
    for split in earth.SPLITS:
        np.testing.assert_array_equal(earth.load(name, split=split, seed=seed), everything[parts[split]])
        np.testing.assert_array_equal(
            earth.load_lat_lon(name, split=split, seed=seed), everything_lat_lon[parts[split]]
        )


def test_split_sizes_by_hand():
    sizes = {name: [len(earth.load(name, split=s)) for s in earth.SPLITS] for name in COUNTS}
    assert sizes == {
        "volcano": [661, 82, 84],
        "earthquake": [4896, 612, 612],
        "flood": [3900, 487, 488],
        "fire": [10247, 1280, 1282],
    }


def test_splits_are_deterministic_per_seed_and_differ_between_seeds():
    for split in earth.SPLITS:
        a = earth.load("volcano", split=split, seed=1)
        np.testing.assert_array_equal(a, earth.load("volcano", split=split, seed=1))
        assert not np.array_equal(a, earth.load("volcano", split=split, seed=2))
    np.testing.assert_array_equal(
        earth.load("flood", split="test"), earth.load("flood", split="test", seed=0)
    )


def test_callers_get_copies_the_cache_keeps_the_data():
    first = earth.load("volcano")
    first[:] = 0.0
    raw = earth.load_lat_lon("volcano")
    raw[:] = 0.0
    earth.load_lat_lon("volcano", split="train")[:] = 0.0
    assert tuple(earth.load_lat_lon("volcano")[0]) == (-30.2, -178.47)
    np.testing.assert_allclose(np.linalg.norm(earth.load("volcano"), axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (
            {"name": "moon"},
            ValueError,
            "name must be one of 'earthquake', 'fire', 'flood', 'volcano'; got 'moon'",
        ),
        ({"name": "Volcano"}, ValueError, "name must be one of"),
        ({"name": 0}, ValueError, "name must be one of"),
        ({"name": "fire", "split": "val"}, ValueError, "split must be one of 'test', 'train', 'validation'"),
        ({"name": "fire", "split": 1}, ValueError, "split must be one of"),
        ({"name": "fire", "seed": -1}, ValueError, "seed must be >= 0"),
        ({"name": "fire", "seed": 1.0}, TypeError, "seed must be an int"),
        ({"name": "fire", "seed": True}, TypeError, "seed must be an int"),
        ({"name": "fire", "seed": None}, TypeError, "seed must be an int"),
    ],
)
@pytest.mark.parametrize("function", [earth.load, earth.load_lat_lon])
def test_bad_arguments_are_named(function, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        function(**kwargs)


def test_split_indices_checks_its_arguments():
    with pytest.raises(ValueError, match="name must be one of"):
        earth.split_indices("moon")
    with pytest.raises(TypeError, match="seed must be an int"):
        earth.split_indices("fire", seed="0")


def test_map_arguments_must_have_the_right_last_axis():
    with pytest.raises(ValueError, match=r"points must have shape \[..., 3\]"):
        earth.to_lat_lon(np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"lat_lon must have shape \[..., 2\]"):
        earth.from_lat_lon(np.zeros(3))
    with pytest.raises(TypeError, match="points must be a real array"):
        earth.to_lat_lon(np.array([["a", "b", "c"]]))


def test_the_csv_files_are_package_data():
    # read as resources (as from an installed wheel), and matched by pyproject's package-data globs
    folder = resources.files(earth)
    files = ["volerup.csv", "quakes_all.csv", "flood.csv", "fire.csv", "PROVENANCE.md"]
    assert all(folder.joinpath(file).is_file() for file in files)
    pyproject = pathlib.Path(earth.__file__).parents[3] / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("fmjax is installed, not run from its source tree")
    globs = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["fmjax"]
    for file in files:
        assert any(fnmatch.fnmatch(f"data/earth/{file}", glob) for glob in globs), file

"""The training loop's host work: pipelined exact pairs, prefetched chunks, exact resume with both."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.couplings import exact
from fmjax.data import sample as toy
from fmjax.runs import RunConfig, load_run, train
from fmjax.runs.pipeline import HostPairs, Prefetcher, chunks


@pytest.mark.parametrize("shape", [(48, 2), (40, 6, 6, 1)], ids=["points", "cost-matrix"])
def test_pipelined_pairs_equal_the_in_step_solve_exactly(shape):
    coupling = exact()
    steps = 5
    keys = jax.random.split(jax.random.key(0), 2 * steps)
    x0 = jnp.stack([jax.random.normal(k, shape) for k in keys[:steps]])
    x1 = jnp.stack([2.0 + jax.random.normal(k, shape) ** 3 for k in keys[steps:]])
    solver = HostPairs(coupling, threads=2)
    try:
        pipelined = solver.solve(jax.jit(jax.vmap(coupling.host_inputs))(x0, x1))
    finally:
        solver.close()
    in_step = jax.jit(coupling)
    assert pipelined.shape == (steps, shape[0]) and pipelined.dtype == np.int32
    for k in range(steps):
        i, j = in_step(None, x0[k], x1[k])
        np.testing.assert_array_equal(np.asarray(i), np.arange(shape[0]))
        np.testing.assert_array_equal(pipelined[k], np.asarray(j))
        assert sorted(pipelined[k].tolist()) == list(range(shape[0]))  # a permutation


def test_exact_host_inputs_use_full_float32_products():
    # 3072 dims: the device builds the cost matrix; at HIGHEST precision it is float64's to float32 rounding
    x0 = jax.random.normal(jax.random.key(1), (16, 3072))
    x1 = jax.random.normal(jax.random.key(2), (16, 3072))
    (cost,) = exact().host_inputs(x0, x1)
    a, b = np.asarray(x0, np.float64), np.asarray(x1, np.float64)
    expected = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    # the points are scaled by a power of two 2^k (max |coordinate| in [0.5, 1)), the costs by 4^k
    exponent = np.log2(expected[0, 0] / float(cost[0, 0])) / 2
    assert exponent == pytest.approx(round(exponent), abs=1e-4)
    np.testing.assert_allclose(np.asarray(cost) * 4.0 ** round(exponent), expected, rtol=1e-5)


def test_prefetcher_keeps_order_and_raises_the_producers_error():
    made = list(Prefetcher(iter(range(10)), lambda k: k * k, depth=2))
    assert made == [(k, k * k) for k in range(10)]

    def fail(k):
        if k == 3:
            raise ValueError("record 3 is unreadable")
        return k

    stream = Prefetcher(iter(range(10)), fail)
    assert [next(stream)[1] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="record 3 is unreadable"):
        next(stream)


def test_chunks_depend_on_the_step_alone():
    config = RunConfig(steps=250, log_every=100, checkpoint_every=200)
    whole = list(chunks(0, config, limit=30))
    assert sum(n for _, n in whole) == 250
    boundaries = {first + n for first, n in whole}
    assert {100, 200, 250} <= boundaries and all(n <= 30 for _, n in whole)
    # a run resumed at a chunk boundary cuts the rest as the uninterrupted run did
    assert list(chunks(200, config, limit=30)) == [c for c in whole if c[0] >= 200]


def test_resume_is_bitwise_with_pipelined_pairs_and_async_checkpoints(tmp_path):
    config = RunConfig(
        coupling="exact",
        steps=300,
        batch_size=64,
        width=16,
        log_every=50,
        checkpoint_every=100,
        keep_checkpoints=5,
    )
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(config, whole)
    train(config, cut)
    for step in ("300", "200"):  # as if killed after step 100's checkpoint was committed
        shutil.rmtree(cut / "checkpoints" / step)
    train(config, cut)
    a, b = load_run(whole), load_run(cut)
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    assert losses(whole) == losses(cut) and len(losses(whole)) == 6


@pytest.mark.slow  # 18 s of benchmark; the pipeline's behaviour is tested above
def test_pipeline_benchmark_runs():
    from benchmarks import pipeline

    report = pipeline.main(
        ["--batches", "32", "--steps", "40", "--log-every", "10", "--width", "16", "--depth", "2",
         "--xla-cores", "0", "--repeats", "1", "--cost-sizes", "32"]
        + ["--image-batches", "16", "--image-steps", "6", "--image-width", "8"]
    )  # fmt: skip
    rows = [line for line in report.splitlines() if line.startswith("| 32 |")]
    assert len(rows) == 4
    assert all(float(cell) > 0 for row in rows for cell in row.strip("| ").split(" | ")[2:])
    image_rows = [line.strip("| ").split(" | ") for line in report.splitlines() if line.startswith("| 16 |")]
    assert [cells[1] for cells in image_rows] == ["cached", "read per step"]
    for cells in image_rows:
        assert float(cells[2]) > 0 and float(cells[4]) > 0 and cells[5].endswith("%")


def test_cached_images_equal_the_records_read_per_step(tmp_path):
    from fmjax.data.sources import ImageSource
    from fmjax.data.tfds_sources import data_source

    records = data_source("digits", split="train", data_dir=str(tmp_path))
    for process in range(
        2
    ):  # two processes' shares, across an epoch boundary (1437 // 200 = 7 steps an epoch)
        options = dict(batch_size=200, seed=3, process_index=process, process_count=2)
        cached = ImageSource(records, **options)
        read = ImageSource(records, cache_bytes=0, **options)
        assert cached._images is not None and read._images is None
        for step in range(12):
            np.testing.assert_array_equal(cached.host_batch(step)["image"], read.host_batch(step)["image"])
            assert cached.host_batch(step)["image"].shape == (100, 8, 8, 1)


def test_toy_source_matches_the_samplers():
    from fmjax.data.sources import ToySource

    source = ToySource(source="gaussian", target="moons", batch_size=8)
    key = jax.random.key(5)
    x0, x1 = source.pair(key, {})
    k0, k1 = jax.random.split(key)
    np.testing.assert_array_equal(x0, toy("gaussian", k0, 8))
    np.testing.assert_array_equal(x1, toy("moons", k1, 8))


# the cost-matrix path is checked against the in-step solve above, and a pipelined 2D run end to end below
@pytest.mark.slow
def test_image_run_with_pipelined_exact_pairs_trains_what_the_in_step_solve_trains(tmp_path, monkeypatch):
    # 64 dims per image: the device builds the cost matrices the host solves (the cost-matrix path)
    monkeypatch.setenv("FMJAX_DATA_DIR", str(tmp_path / "tfds"))
    config = RunConfig(
        dataset="digits", coupling="exact", steps=12, batch_size=16, width=8, log_every=4, checkpoint_every=12
    )
    losses = {}
    for pipeline in (True, False):
        out = tmp_path / str(pipeline)
        train(config, out, pipeline=pipeline)
        losses[pipeline] = [
            r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        ]
    assert len(losses[True]) == 3
    np.testing.assert_allclose(losses[True], losses[False], rtol=0, atol=1e-5)

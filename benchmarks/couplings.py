"""Coupling benchmark: fmjax's exact and Sinkhorn couplings against POT's emd and ott-jax's Hungarian.

All candidates solve the same 8gaussians -> moons batches (2D, squared Euclidean cost) at each size,
timed side by side. "fmjax exact" is the jitted coupling as the training step calls it (cost matrix
on the device, assignment on the host through pure_callback); "fmjax exact (solver)" is the host
solver alone on the cost matrix. Costs are mean pair costs relative to POT's exact optimum.

    python -m benchmarks.couplings                      # n = 256, 1024, 2048
    python -m benchmarks.couplings --sizes 256 --hungarian-max 256
"""

from __future__ import annotations

import argparse
import platform

import jax
import numpy as np
import ot

from benchmarks._timing import interleaved, markdown_table
from fmjax._assignment import HAVE_NATIVE, solve_assignment
from fmjax.couplings import exact, sinkhorn
from fmjax.data import sample as toy


def _mean_cost(cost: np.ndarray, i, j) -> float:
    return float(cost[np.asarray(i), np.asarray(j)].mean())


def run_size(n: int, *, hungarian: bool, repeats: int) -> list[list[object]]:
    """Rows (candidate, ms, ratio to POT, cost / optimum) for one batch size."""
    x0 = toy("8gaussians", jax.random.key(n), n)
    x1 = toy("moons", jax.random.key(n + 1), n)
    a, b = np.asarray(x0, np.float64), np.asarray(x1, np.float64)
    cost64 = ot.dist(a, b)
    cost32 = np.ascontiguousarray(cost64, np.float32)
    weights = np.full(n, 1.0 / n)
    key = jax.random.key(0)

    exact_fn = jax.jit(exact())
    sinkhorn_fn = jax.jit(sinkhorn(epsilon=0.05))
    sinkhorn_small_fn = jax.jit(sinkhorn(epsilon=0.002))
    results: dict[str, object] = {}

    def call(name, fn):
        def timed():
            results[name] = fn()

        return timed

    candidates = {
        "fmjax exact": call("fmjax exact", lambda: jax.block_until_ready(exact_fn(key, x0, x1))),
        "fmjax exact (solver)": call(
            "fmjax exact (solver)", lambda: (np.arange(n), solve_assignment(cost32))
        ),
        "POT emd": call(
            "POT emd",
            lambda: (np.arange(n), np.argmax(ot.emd(weights, weights, cost64, numItermax=10**8), axis=1)),
        ),
        "fmjax sinkhorn eps=0.05": call(
            "fmjax sinkhorn eps=0.05", lambda: jax.block_until_ready(sinkhorn_fn(key, x0, x1))
        ),
        "fmjax sinkhorn eps=0.002": call(
            "fmjax sinkhorn eps=0.002", lambda: jax.block_until_ready(sinkhorn_small_fn(key, x0, x1))
        ),
    }
    if hungarian:
        from ott.geometry import pointcloud
        from ott.tools import unreg

        hungarian_fn = jax.jit(lambda p, q: unreg.hungarian(pointcloud.PointCloud(p, q))[1].paired_indices)
        candidates["ott Hungarian"] = call(
            "ott Hungarian", lambda: tuple(jax.block_until_ready(hungarian_fn(x0, x1)))
        )
    inner = 1 if n >= 1024 else 5
    times = interleaved(candidates, repeats=repeats, inner=inner)
    optimum = ot.emd2(weights, weights, cost64, numItermax=10**8)
    rows = []
    for name, seconds in times.items():
        i, j = results[name]
        rows.append(
            [
                n,
                name,
                f"{seconds * 1e3:.2f}",
                f"{times['POT emd'] / seconds:.2f}x",
                f"{_mean_cost(cost64, i, j) / optimum - 1:+.2e}",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument(
        "--hungarian-max", type=int, default=1024, help="largest n for ott's Hungarian (slow)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rows = []
    for n in args.sizes:
        rows += run_size(n, hungarian=n <= args.hungarian_max, repeats=args.repeats)
    table = markdown_table(["n", "coupling", "ms", "speed-up vs POT emd", "cost / optimum - 1"], rows)
    report = (
        f"8gaussians -> moons, 2D; {jax.devices()[0].platform}, {platform.machine()}; native solver: "
        f"{HAVE_NATIVE}; median of {args.repeats} interleaved runs\n\n{table}"
    )
    print(report)
    return report


if __name__ == "__main__":
    main()

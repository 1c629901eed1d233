"""Does the host's OT solve overlap the device's steps? ``fmjax train``'s throughput, OT-CFM against I-CFM.

    python -m benchmarks.pipeline [--batches 256,1024] [--steps 1500] [--xla-cores 1]

A CPU has no separate device, so this benchmark makes one: before JAX starts, the process is pinned to
``--xla-cores`` cores, so XLA sizes its thread pools to them (the "device"); then the affinity of the
Python threads is widened to every core, so the coupling's solver threads run on the others (the "host").
It then trains the same run (2D, MLP 3 x 256, 8gaussians -> moons) through ``fmjax.runs.train`` with
I-CFM, OT-CFM with the pipelined host solve (fmjax's default) and OT-CFM with the solve inside the step
(``pipeline=False``: the device waits for the host), and reports steady-state steps/s (from the run's own
metrics, past the first logged chunk, so compilation is left out) and each ratio to I-CFM. The figures
are proxies for an accelerator: on a GPU the step is faster and the solve the same, so the batch size at
which the pipelined solve stops hiding behind the step is lower there (see ``benchmarks/DEVICE.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

CANDIDATES = (
    ("I-CFM", {"coupling": "independent"}, True),
    ("OT-CFM exact, pipelined", {"coupling": "exact"}, True),
    ("OT-CFM exact, in step", {"coupling": "exact"}, False),
)


def _pin(cores: int) -> set[int]:
    """Restrict this process to its first ``cores`` cores before JAX starts; return every core it had."""
    every = os.sched_getaffinity(0)
    os.sched_setaffinity(0, sorted(every)[:cores])
    return every


def _throughput(run_dir: str) -> float:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if "event" not in r]
    first, last = records[0], records[-1]
    return (last["step"] - first["step"]) / (last["time"] - first["time"])


def coupling_costs(sizes: list[int], *, repeats: int) -> str:
    """Per-step cost of each coupling at each batch size: the host solve of the exact coupling (2D points,
    and a 32x32x3 batch given as its cost matrix) and Sinkhorn on the device (JAX's default device)."""
    import time

    import jax
    import numpy as np

    from fmjax.couplings import exact, sinkhorn
    from fmjax.data import sample as toy

    def best(fn, *args):
        fn(*args)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - start)
        return min(times) * 1e3

    coupling = exact()
    sinkhorn_fn = jax.jit(sinkhorn(epsilon=0.05))
    rows = []
    for n in sizes:
        x0 = toy("8gaussians", jax.random.key(n), n)
        x1 = toy("moons", jax.random.key(n + 1), n)
        points = tuple(np.asarray(a) for a in jax.jit(coupling.host_inputs)(x0, x1))
        noise = jax.random.normal(jax.random.key(0), (n, 32, 32, 3))
        images = jax.random.uniform(jax.random.key(1), (n, 32, 32, 3), minval=-1.0, maxval=1.0)
        matrix = tuple(np.asarray(a) for a in jax.jit(coupling.host_inputs)(noise, images))
        cells = [
            best(coupling.solve_host, points),
            best(coupling.solve_host, matrix),
            best(lambda *args: jax.block_until_ready(sinkhorn_fn(*args)), jax.random.key(2), x0, x1),
        ]
        rows.append(f"| {n} | " + " | ".join(f"{c:.3g}" for c in cells) + " |")
    return (
        f"best of {repeats}; exact: the host solve alone (what the pipelined loop hides behind the device's "
        f"step, one thread per solve); Sinkhorn: eps = 0.05 x mean cost, on {jax.devices()[0].platform}\n\n"
        "| batch | exact, 2D points (ms) | exact, 32x32x3 cost matrix (ms) | Sinkhorn 2D (ms) |\n"
        "|---|---|---|---|\n" + "\n".join(rows)
    )


def image_input(batches: list[int], *, steps: int, width: int) -> str:
    """Host input time per step of digits runs (UNet) against the step itself, from the runs' metrics: with
    the dataset cached in memory (the default up to 1 GiB of images) and read from its array_record files."""
    import jax

    from fmjax.data.sources import ImageSource
    from fmjax.data.tfds_sources import data_source
    from fmjax.runs import RunConfig, train

    rows = []
    with tempfile.TemporaryDirectory() as data_dir:
        records = data_source("digits", split="train", data_dir=data_dir)
        for batch in batches:
            config = RunConfig(
                dataset="digits", steps=steps, batch_size=batch, width=width,
                log_every=max(1, steps // 3), checkpoint_every=steps,
            )  # fmt: skip
            for reads, cache_bytes in (("cached", 2**30), ("read per step", 0)):
                source = ImageSource(
                    records, batch_size=batch, seed=config.seed, cache_bytes=cache_bytes,
                    process_index=jax.process_index(), process_count=jax.process_count(),
                )  # fmt: skip
                with tempfile.TemporaryDirectory() as run_dir:
                    train(config, run_dir, source=source)
                    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                        logged = [r for r in map(json.loads, f) if "event" not in r]
                # the step from the steady state (past the first record, which holds the compilation); the
                # input per step over the whole run (its thread works ahead of the records it is counted in)
                first, last = logged[1], logged[-1]
                step_s = (last["time"] - first["time"]) / (last["step"] - first["step"])
                input_s = max(sum(r["host_input_s"] for r in logged) / last["step"], 1e-6)
                rows.append(
                    f"| {batch} | {reads} | {step_s * 1e3:.1f} | {batch / step_s:.0f} | {input_s * 1e3:.2f} "
                    f"| {input_s / step_s:.1%} | {batch / input_s:.0f} |"
                )
    return (
        f"digits 8x8x1, UNet width {width}, {steps} steps a run; host input = the step's images (a gather "
        "from the cached array, or batched array_record reads on 4 threads), stacked and placed on the "
        "device, off the critical path\n\n| batch | images | step (ms) | images/s trained "
        "| host input per step (ms) | input / step | images/s the input could feed |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pipeline", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--batches", default="256,1024", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per run")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--xla-cores", type=int, default=1, help="cores XLA may use (0: no pinning)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the candidates, interleaved")
    parser.add_argument(
        "--cost-sizes", default="256,1024,4096", help="batch sizes of the per-coupling cost table ('' : none)"
    )
    parser.add_argument(
        "--image-batches", default="256,1024", help="digits runs for the input table ('': none)"
    )
    parser.add_argument("--image-steps", type=int, default=30)
    parser.add_argument("--image-width", type=int, default=32)
    args = parser.parse_args(argv)
    every = _pin(args.xla_cores) if args.xla_cores else None

    import jax  # after pinning: XLA sizes its pools to the pinned cores

    from fmjax._assignment import HAVE_NATIVE
    from fmjax.runs import RunConfig, train

    jax.devices()
    if every is not None:
        os.sched_setaffinity(0, every)  # this thread and the solver threads it starts: every core
    batches = [int(b) for b in args.batches.split(",") if b]
    rows = []
    for batch in batches:
        rates: dict[str, list[float]] = {name: [] for name, _, _ in CANDIDATES}
        for _ in range(args.repeats):
            for name, options, pipeline in CANDIDATES:
                config = RunConfig(
                    steps=args.steps, batch_size=batch, width=args.width, depth=args.depth,
                    log_every=args.log_every, checkpoint_every=args.steps, **options,
                )  # fmt: skip
                with tempfile.TemporaryDirectory() as run_dir:
                    train(config, run_dir, pipeline=pipeline)
                    rates[name].append(_throughput(run_dir))
        base = max(rates["I-CFM"])
        for name, _, _ in CANDIDATES:
            best = max(rates[name])
            rows.append(f"| {batch} | {name} | {best:.0f} | {best / base:.2f} |")
    pinned = "no pinning"
    if every:
        pinned = f"XLA pinned to {args.xla_cores} core(s), solver threads on the other(s)"
    header = (
        f"{os.cpu_count()} cores; {pinned}; MLP {args.depth} x {args.width}, 2D, {args.steps} steps a run, "
        f"best of {args.repeats} interleaved rounds; exact solver: {'fmjax C' if HAVE_NATIVE else 'POT'}\n\n"
        "| batch | training | steps/s | vs I-CFM |\n|---|---|---|---|\n"
    )
    report = header + "\n".join(rows)
    if args.image_batches:
        sizes = [int(n) for n in args.image_batches.split(",")]
        report += "\n\n### Image input\n\n" + image_input(
            sizes, steps=args.image_steps, width=args.image_width
        )
    if args.cost_sizes:
        sizes = [int(n) for n in args.cost_sizes.split(",")]
        report += "\n\n### Per-step cost of each coupling\n\n" + coupling_costs(sizes, repeats=args.repeats)
    print(report)
    return report


if __name__ == "__main__":
    main()

"""Riemannian flow matching on the Earth datasets (S^2): the published protocol, exact test NLL in nats.

Protocol (Mathieu & Nickel 2020; De Bortoli et al. 2022; Chen & Lipman 2024, Table 2): the points of each
dataset as unit vectors of R^3, a random 80/10/10 train/validation/test split per seed, 5 seeds; the
model chosen by its validation NLL among its checkpoints (early stopping); the test NLL per point in nats
with respect to the area measure of the unit sphere (a uniform density scores log(4 pi) = 2.531), by the
exact Riemannian divergence. Published means are in ``PUBLISHED`` (../shared/data/earth/README.md).

Every run is an ``fmjax train --dataset NAME`` run, trained through ``fmjax.runs.train``: a
``TangentField`` MLP on the sphere, the geodesic path from the uniform distribution, AdamW with a linear
warm-up, EMA parameters. Couplings: ``exact`` (minibatch OT on the squared geodesic distance) and
``independent`` pairs, side by side. A checkpoint every ``--eval-every`` steps is kept; the exact
validation NLL of each (EMA parameters, dopri5) picks the one whose test NLL is reported.

    python -m experiments.earth    # experiments/results/earth.md and earth.json; the runs in runs/earth
    python -m experiments.earth --datasets volcano --seeds 1 --steps 400 --eval-every 200 --out /tmp/e
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from fmjax.checkpoint import Checkpointer
from fmjax.data.earth import DATASETS, SIZES
from fmjax.runs import RunConfig, load_run, train
from fmjax.runs.tasks.sphere import UNIFORM_NLL, sphere_nll

PUBLISHED = {
    "Mixture of Kent": {"volcano": (-0.80, 0.47), "earthquake": (0.33, 0.05), "flood": (0.73, 0.07),
                        "fire": (1.18, 0.06)},
    "Riemannian CNF (Mathieu & Nickel 2020)": {"volcano": (-6.05, 0.61), "earthquake": (0.14, 0.23),
                                               "flood": (1.11, 0.19), "fire": (-0.80, 0.54)},
    "Moser flow (Rozen et al. 2021)": {"volcano": (-4.21, 0.17), "earthquake": (-0.16, 0.06),
                                       "flood": (0.57, 0.10), "fire": (-1.28, 0.05)},
    "Riemannian score-based (De Bortoli et al. 2022)": {"volcano": (-4.92, 0.25), "earthquake": (-0.19, 0.07),
                                                        "flood": (0.48, 0.09), "fire": (-1.33, 0.06)},
    "Riemannian flow matching, geodesic (Chen & Lipman 2024)": {"volcano": (-7.93, 1.67),
                                                                "earthquake": (-0.28, 0.08),
                                                                "flood": (0.42, 0.05), "fire": (-1.86, 0.11)},
}  # fmt: skip
"""Published test NLL (mean, std over 5 seeds), as ../shared/data/earth/README.md gives them."""
GOAL = "Riemannian flow matching, geodesic (Chen & Lipman 2024)"
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def config_of(args, dataset: str, seed: int, coupling: str) -> RunConfig:
    """The run of one (dataset, seed, coupling): every checkpoint kept for the selection."""
    return RunConfig(
        dataset=dataset, seed=seed, coupling=coupling, steps=args.steps, batch_size=args.batch_size,
        width=args.width, depth=args.depth, activation="silu", learning_rate=args.learning_rate,
        warmup_steps=min(1000, args.steps // 10), weight_decay=0.0, ema_decay=0.999,
        log_every=args.eval_every, checkpoint_every=args.eval_every,
        keep_checkpoints=args.steps // args.eval_every,
    )  # fmt: skip


def run_one(args, dataset: str, seed: int, coupling: str) -> dict:
    """Train one run, pick its checkpoint by validation NLL, and score that checkpoint on the test split."""
    run_dir = os.path.join(args.runs_dir, f"{dataset}-{coupling}-seed{seed}")
    config = config_of(args, dataset, seed, coupling)
    started = time.monotonic()
    train(config, run_dir)
    trained_s = time.monotonic() - started
    run = load_run(run_dir)
    validation = {}
    with Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True) as checkpoints:
        for step in checkpoints.all_steps():
            state = checkpoints.restore(run.state, step)
            validation[step] = sphere_nll(config, run.apply_fn, state.ema_params, split="validation")["nll"]
        best = min(validation, key=validation.get)
        state = checkpoints.restore(run.state, best)
    test = sphere_nll(config, run.apply_fn, state.ema_params, split="test")
    return {
        "dataset": dataset, "seed": seed, "coupling": coupling, "best_step": best,
        "validation_nll": validation, "test_nll": test["nll"], "test_nll_stderr": test["nll_stderr"],
        "n_test": test["n"], "train_s": round(trained_s, 1), "wall_s": round(time.monotonic() - started, 1),
    }  # fmt: skip


def summarise(records: list[dict], couplings: list[str]) -> dict:
    """``{coupling: {dataset: {"test_nll": [per seed], "mean": m, "std": s, "wall_s": [...]}}}``."""
    out: dict = {}
    for coupling in couplings:
        for dataset in DATASETS:
            rows = sorted((r for r in records if r["dataset"] == dataset and r["coupling"] == coupling),
                          key=lambda r: r["seed"])  # fmt: skip
            if rows:
                values = [r["test_nll"] for r in rows]
                out.setdefault(coupling, {})[dataset] = {
                    "test_nll": values, "mean": float(np.mean(values)),
                    "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                    "seeds": [r["seed"] for r in rows], "best_step": [r["best_step"] for r in rows],
                    "wall_s": [r["wall_s"] for r in rows],
                }  # fmt: skip
    return out


def write_markdown(path: str, summary: dict, args, couplings: list[str]) -> None:
    names = [d for d in DATASETS if any(d in summary.get(c, {}) for c in couplings)]
    lines = [
        "# Riemannian flow matching on the Earth datasets (S^2)",
        "",
        "Test NLL in nats per point (area measure of the unit sphere; uniform = "
        f"{UNIFORM_NLL:.3f}), mean +- std over seeds, lower is better. Written by "
        f"`{' '.join(['python -m experiments.earth', *args.argv])}`.",
        "",
        f"Runs: `fmjax.runs.train` with `--dataset NAME`, TangentField MLP {args.depth} x {args.width} "
        f"(SiLU), {args.steps} steps of batch {args.batch_size}, AdamW lr {args.learning_rate:g} (warm-up, "
        f"no weight decay), EMA 0.999; checkpoint chosen by the exact validation NLL every {args.eval_every} "
        "steps; exact divergence, dopri5 (rtol = atol = 1e-5). Machine: 2-core CPU, no accelerator.",
        "",
        "| method | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for method, rows in PUBLISHED.items():
        lines.append(
            f"| {method} (published) | "
            + " | ".join(f"{rows[d][0]:.2f} +- {rows[d][1]:.2f}" for d in names)
            + " |"
        )
    for coupling in couplings:
        label = "OT pairs (exact, geodesic cost)" if coupling == "exact" else "independent pairs"
        cells = []
        for d in names:
            row = summary.get(coupling, {}).get(d)
            if row is None:
                cells.append("")
                continue
            spread = "n/a" if row["std"] is None else f"{row['std']:.2f}"
            cells.append(f"**{row['mean']:.2f} +- {spread}** (n={len(row['test_nll'])})")
        lines.append(f"| fmjax, {label} | " + " | ".join(cells) + " |")
    lines += ["", "Wall time per run (training, checkpoint selection and test NLL), seconds:", ""]
    for coupling in couplings:
        for d in names:
            row = summary.get(coupling, {}).get(d)
            if row:
                lines.append(f"- {coupling}, {d}: {', '.join(f'{w:.0f}' for w in row['wall_s'])} "
                             f"(best steps {row['best_step']})")  # fmt: skip
    lines += ["", "## Against the goal", ""]
    for d in names:
        goal = PUBLISHED[GOAL][d][0]
        score = PUBLISHED["Riemannian score-based (De Bortoli et al. 2022)"][d][0]
        best = min((summary[c][d]["mean"] for c in couplings if d in summary.get(c, {})), default=math.nan)
        verdict = "meets" if best <= goal else f"misses by {best - goal:.2f} nats"
        lines.append(f"- {d}: best fmjax mean {best:.2f}; RFM {goal:.2f} ({verdict}); RSGM {score:.2f} "
                     f"({'below' if best < score else 'not below'})")  # fmt: skip
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--couplings", nargs="+", default=["exact", "independent"], choices=["exact", "independent"]
    )
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--eval-every", type=int, default=2_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--out", default=RESULTS, help="where earth.md, earth.json and earth_runs.jsonl go")
    parser.add_argument(
        "--runs-dir", default=None, help="where the runs go (default: runs/earth, or OUT/runs with --out)"
    )
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.runs_dir is None:  # the runs' checkpoints stay out of experiments/results (runs/ is not tracked)
        in_results = args.out == RESULTS
        args.runs_dir = os.path.join("runs", "earth") if in_results else os.path.join(args.out, "runs")
    if args.steps % args.eval_every:
        parser.error("--steps must be a multiple of --eval-every")
    os.makedirs(args.out, exist_ok=True)
    records_path = os.path.join(args.out, "earth_runs.jsonl")
    done = []
    if os.path.exists(records_path):
        with open(records_path) as f:
            done = [json.loads(line) for line in f if line.strip()]
    for dataset in args.datasets:
        for seed in range(args.seeds):
            for coupling in args.couplings:
                key = (dataset, seed, coupling, args.steps)
                if any((r["dataset"], r["seed"], r["coupling"], r.get("steps")) == key for r in done):
                    continue
                batch = min(args.batch_size, 8 * SIZES[dataset] // 10)
                record = run_one(
                    argparse.Namespace(**{**vars(args), "batch_size": batch}), dataset, seed, coupling
                )
                record["steps"] = args.steps
                done.append(record)
                with open(records_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"{dataset} seed {seed} {coupling}: test NLL {record['test_nll']:.3f} "
                      f"(best step {record['best_step']}, {record['wall_s']:.0f} s)", flush=True)  # fmt: skip
    records = [r for r in done if r.get("steps") == args.steps and r["dataset"] in args.datasets]
    summary = summarise(records, args.couplings)
    with open(os.path.join(args.out, "earth.json"), "w") as f:
        first = summary[args.couplings[0]]  # the layout: {dataset: {"test_nll", "mean", "std"}}
        json.dump({**first, "by_coupling": summary}, f, indent=2)
    write_markdown(os.path.join(args.out, "earth.md"), summary, args, args.couplings)
    print(f"wrote {os.path.join(args.out, 'earth.md')}")


if __name__ == "__main__":
    main()

"""Straighter flows: I-CFM and OT-CFM with and without reflow, sampled with 1, 2, 4, 8 Euler steps and dopri5.

Rectified flow's reflow (Liu et al., ICLR 2023) retrains a flow on its own (x0, phi_1(x0)) pairs, whose
straight segments barely cross, so the new flow's trajectories are straighter and few Euler steps
suffice; minibatch OT (OT-CFM, Tong et al., TMLR 2024) straightens the conditional paths by pairing within
each batch. This experiment measures both and their combination on 8gaussians -> moons, N(0, I) -> moons
and the 8x8 scikit-learn digits (N(0, I) -> images, the UNet of ``fmjax train --dataset digits``):

- teachers: I-CFM (independent coupling) and OT-CFM (exact minibatch OT), trained by ``fmjax.runs.train``
  on the task's own data (2D: the straight path with sigma = 0.1 of the OT-CFM protocol; digits: sigma 0,
  the ``ImageSource`` of ``fmjax train --dataset digits``);
- k reflows: ``fmjax.reflow.reflow_pairs`` solves the previous model with dopri5 (rtol = atol = 1e-5) from
  fresh source points, ``fmjax.data.pairs.save_pairs`` stores the pairs, and a student with the same
  architecture and number of steps is trained from scratch on them (``PairSource``, coupling
  "independent" keeps the pairing, straight path with sigma = 0).

Every model, 2D and digits, is trained by ``fmjax.runs.train`` (on CPU it dispatches an image run's
steps one at a time). The digits models of results/straightness.md were trained by this script's earlier
loop of its own (``train_digits``: the run's step, sources and per-step keys, one jitted step per call);
``fmjax.runs.train`` gives the same parameters bit for bit (digits: with ``pipeline=False``, the exact
coupling solved inside the step as that loop did), so its rows stand.

Every model is evaluated with its EMA parameters on held-out source points: the distance to the target at
1, 2, 4 and 8 Euler steps and with dopri5 (2D: exact W2 against as many target points, ``wasserstein2``;
digits: the Fréchet distance between Gaussians fitted to the generated and the real digits' pixels, both
in the training space [-1, 1)^64 with the real digits dequantised; the table predates
``fmjax.digits_classifier.digits_frechet_distance`` and keeps the pixel metric so that its rows compare),
the dopri5 NFE, ``straightness`` (Liu et al.'s measure, along 100-step Euler trajectories in 2D, 32 steps
for digits), and in 2D ``crossing_fraction`` of the pairs the model was trained on (1024 pairs: four
minibatches of the coupling pooled, or the stored reflow pairs). Compute is counted per model and
cumulatively over its ancestors: training steps, training wall seconds and the seconds spent solving the
reflow pairs.

    python -m experiments.straightness                 # 2D: the setting of results/straightness.md
    python -m experiments.straightness --tasks digits  # digits, at the reduced scale of the same file
    python -m experiments.straightness --quick --tasks "8gaussians -> moons" --out /tmp/smoke

Runs, reflow pairs and figure data live under ``--work`` (default runs/straightness, one directory per
model); every evaluated model is recorded in ``<out>/straightness.json`` at once, so running the command
again skips what is recorded and resumes what is not (an interrupted 2D training resumes from its
checkpoint, its wall seconds then counting the resumed part only). The
table and the figures are rebuilt from the records of the settings given on the command line, so the 2D
and digits invocations add up to one report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import numpy as np

from fmjax.couplings import exact, independent
from fmjax.data.pairs import PairSource, load_pairs, save_pairs
from fmjax.data.toy import sample as toy_sample
from fmjax.metrics import crossing_fraction, straightness, wasserstein2
from fmjax.reflow import reflow_pairs
from fmjax.runs import RunConfig, load_run, train
from fmjax.sampling import as_velocity, sample

TASKS = {
    "8gaussians -> moons": ("8gaussians", "moons"),
    "N -> moons": ("gaussian", "moons"),
    "digits": None,
}
BASES = {"I-CFM": "independent", "OT-CFM": "exact"}
EULER_STEPS = (1, 2, 4, 8)
TEACHER_SIGMA_2D = 0.1  # the OT-CFM papers' 2D protocol; students train on deterministic pairs, sigma 0
CROSSING_PAIRS = 1024
# The experiment's own random streams, PRNGKey(offset + seed), apart from those of its runs
# (fmjax.runs.STREAMS): held-out evaluation points, the source points of reflow pairs, the minibatches
# whose crossing is measured.
SEED_OFFSETS = {"eval": 10_000, "reflow_pairs": 20_000, "crossing": 30_000}
DIGITS_SHAPE = (8, 8, 1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULTS = {
    "steps": 20_000,
    "batch_size": 256,
    "pairs": 20_000,
    "eval_samples": 5_000,
    "seeds": 3,
    "reflows": 2,
    "digits_steps": 3_000,
    "digits_batch_size": 128,
    "digits_width": 16,
    "digits_pairs": 2_048,
    "digits_eval_samples": 1_024,
    "digits_seeds": 3,
    "digits_reflows": 1,
}
QUICK = {
    "steps": 100,
    "batch_size": 64,
    "pairs": 256,
    "eval_samples": 256,
    "seeds": 1,
    "reflows": 1,
    "digits_steps": 20,
    "digits_batch_size": 16,
    "digits_width": 8,
    "digits_pairs": 64,
    "digits_eval_samples": 96,
    "digits_seeds": 1,
    "digits_reflows": 1,
}


def method_name(base: str, reflows: int) -> str:
    if reflows == 0:
        return base
    return f"{base} + {reflows} reflow" + ("s" if reflows > 1 else "")


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.replace("->", "to")).strip("-").lower()


def setting(args, task: str) -> dict:
    """The settings a task's models depend on (records of other settings are not this run's)."""
    if task == "digits":
        return {
            "steps": args.digits_steps,
            "batch_size": args.digits_batch_size,
            "width": args.digits_width,
            "pairs": args.digits_pairs,
            "eval_samples": args.digits_eval_samples,
        }
    return {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "width": 64,
        "pairs": args.pairs,
        "eval_samples": args.eval_samples,
    }


def run_config(task: str, base: str, reflows: int, seed: int, chosen: dict) -> RunConfig:
    steps = chosen["steps"]
    common = {
        "steps": steps,
        "batch_size": chosen["batch_size"],
        "width": chosen["width"],
        "seed": seed,
        "path": "linear",
        "coupling": BASES[base] if reflows == 0 else "independent",
        "log_every": min(500, steps),
        "checkpoint_every": min(1000, steps),
        "keep_checkpoints": 1,
    }
    if task == "digits":
        return RunConfig(dataset="digits", sigma=0.0, **common)
    source, target = TASKS[task]
    sigma = TEACHER_SIGMA_2D if reflows == 0 else 0.0
    return RunConfig(source=source, target=target, sigma=sigma, **common)


# --- data and metrics -----------------------------------------------------------------------------


# one compiled program per (distribution, n) instead of op-by-op dispatch
_toy = jax.jit(toy_sample, static_argnums=(0, 2))


def source_points(task: str, key: jax.Array, n: int) -> jax.Array:
    if task == "digits":
        return jax.random.normal(key, (n, *DIGITS_SHAPE))
    return _toy(TASKS[task][0], key, n)


def evaluation_data(task: str, seed: int, n: int) -> dict:
    """Held-out source points and the reference target of (task, seed), the same for every method."""
    key = jax.random.fold_in(jax.random.PRNGKey(SEED_OFFSETS["eval"] + seed), 7)
    k_source, k_target = jax.random.split(key)
    x0 = source_points(task, k_source, n)
    if task == "digits":
        return {"x0": x0, "target": digits_reference("train")}
    return {"x0": x0, "target": np.asarray(_toy(TASKS[task][1], k_target, n))}


_DIGITS: dict[str, np.ndarray] = {}


def digits_reference(split: str) -> np.ndarray:
    """All digits of a split in the training space: z = 2 (x + u) / 256 - 1, one fixed draw of u; [n, 64]."""
    if split not in _DIGITS:
        from fmjax.data.tfds_sources import data_source, read_batch

        records = data_source("digits", split=split)
        images, _ = read_batch(records, np.arange(len(records)))
        u = np.random.default_rng(0).uniform(size=images.shape)
        _DIGITS[split] = (2.0 * (images.astype(np.float64) + u) / 256.0 - 1.0).reshape(len(images), -1)
    return _DIGITS[split]


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """||mu_x - mu_y||^2 + tr(C_x + C_y - 2 (C_x C_y)^(1/2)) of Gaussians fitted to x, y [n, d] (float64)."""
    import scipy.linalg

    x, y = np.asarray(x, np.float64).reshape(len(x), -1), np.asarray(y, np.float64).reshape(len(y), -1)
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(cov_x @ cov_y)
    if np.iscomplexobj(root):  # round-off gives tiny imaginary parts for a PSD product
        root = root.real
    value = np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(cov_x + cov_y - 2.0 * root)
    return float(max(value, 0.0))


def distance(task: str, generated, target) -> float:
    generated = np.asarray(generated)
    if not np.isfinite(generated).all():
        return math.nan
    if task == "digits":
        return frechet_distance(generated, target)
    return wasserstein2(generated, target)


def training_pairs_crossing(task: str, base: str, seed: int, batch_size: int, pairs) -> float:
    """Crossing fraction of 1024 pairs of what the model trains on: its reflow pairs, or for a teacher
    minibatches of the coupling (each of ``batch_size`` coupled on its own, as in training) pooled."""
    if pairs is not None:
        return crossing_fraction(pairs[0][:CROSSING_PAIRS], pairs[1][:CROSSING_PAIRS])
    coupling = jax.jit(exact() if BASES[base] == "exact" else independent())
    source, target = TASKS[task]
    key = jax.random.fold_in(jax.random.PRNGKey(SEED_OFFSETS["crossing"] + seed), 3)
    batches = max(1, math.ceil(CROSSING_PAIRS / batch_size))
    starts, ends = [], []
    for k in range(batches):
        k0, k1, kc = jax.random.split(jax.random.fold_in(key, k), 3)
        x0, x1 = _toy(source, k0, batch_size), _toy(target, k1, batch_size)
        i, j = coupling(kc, x0, x1)
        starts.append(np.asarray(x0)[np.asarray(i)])
        ends.append(np.asarray(x1)[np.asarray(j)])
    starts, ends = np.concatenate(starts)[:CROSSING_PAIRS], np.concatenate(ends)[:CROSSING_PAIRS]
    return crossing_fraction(starts, ends)


def evaluate(task: str, velocity, data: dict) -> tuple[dict, dict]:
    """Distances at 1, 2, 4, 8 Euler steps and with dopri5, the dopri5 NFE and the straightness; and what
    the figures draw (2D: dopri5 trajectories and one-step samples; digits: images), from the same solves."""
    x0, target = data["x0"], data["target"]
    record, solved = {}, {}
    for steps in EULER_STEPS:
        solved[steps] = sample(velocity, x0, solver="euler", steps=steps).x1
        record[f"distance_euler_{steps}"] = distance(task, solved[steps], target)
    dopri5 = sample(velocity, x0, solver="dopri5", save_trajectory=task != "digits", trajectory_points=41)
    record["distance_dopri5"] = distance(task, dopri5.x1, target)
    record["nfe_dopri5"] = int(dopri5.nfe)
    if task == "digits":
        record["straightness"] = float(straightness(velocity, x0[:128], steps=32))
        figure = {"euler_1": np.asarray(solved[1][:16]), "dopri5": np.asarray(dopri5.x1[:16])}
        return record, figure
    record["straightness"] = float(straightness(velocity, x0[:2000], steps=100))
    record["crossing_flow"] = crossing_fraction(x0[:CROSSING_PAIRS], np.asarray(dopri5.x1)[:CROSSING_PAIRS])
    figure = {
        "trajectory": np.asarray(dopri5.trajectory.xs[:, :160]),
        "nfe": np.asarray(record["nfe_dopri5"]),
        "euler_1": np.asarray(solved[1][:1000]),
        "euler_1_x0": np.asarray(x0[:1000]),
        "target": np.asarray(target[:2000]),
    }
    return record, figure


# --- one model ------------------------------------------------------------------------------------


def _timed_train(config: RunConfig, run_dir: str, source=None):
    """Train (or resume) a run; the wall seconds of the session that finished it, kept beside the run."""
    marker = os.path.join(run_dir, "experiment_seconds.json")
    start = time.perf_counter()
    # digits: the exact coupling solved inside the step, as by the loop the digits rows were measured
    # with; pipelined (the pairs an input of the step) XLA compiles another program, whose parameters
    # differ from those in the last bits
    run = train(config, run_dir, source=source, pipeline=config.dataset is None)
    jax.block_until_ready(run.state.ema_params)
    seconds = time.perf_counter() - start
    if os.path.exists(marker):  # finished before (the record was not written): its first timing counts
        with open(marker) as f:
            seconds = json.load(f)["train_seconds"]
    else:
        with open(marker, "w") as f:
            json.dump({"train_seconds": seconds}, f)
    return run, seconds


class Models:
    """The trained models of one (task, seed): trains what is missing and keeps one apply_fn per task, so
    every model of the same architecture reuses the compiled solves."""

    def __init__(self, task: str, seed: int, chosen: dict, work: str):
        self.task, self.seed, self.chosen = task, seed, chosen
        tag = f"{chosen['steps']}steps-b{chosen['batch_size']}-w{chosen['width']}-p{chosen['pairs']}"
        self.work = os.path.join(work, slug(task), tag, f"seed{seed}")
        self.apply_fn = None
        self.velocities: dict[tuple[str, int], object] = {}

    def run_dir(self, base: str, reflows: int) -> str:
        return os.path.join(self.work, slug(method_name(base, reflows)))

    def pairs_path(self, base: str, reflows: int) -> str:
        return os.path.join(self.work, f"pairs-{slug(method_name(base, reflows))}.npz")

    def _velocity(self, run):
        if self.apply_fn is None:
            self.apply_fn = run.apply_fn
        return as_velocity(self.apply_fn, run.state.ema_params)

    def velocity(self, base: str, reflows: int):
        """The EMA velocity of a trained model (loaded from its run directory if not in memory)."""
        if (base, reflows) not in self.velocities:
            self.velocities[base, reflows] = self._velocity(load_run(self.run_dir(base, reflows)))
        return self.velocities[base, reflows]

    def pairs(self, base: str, reflows: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """The stored reflow pairs a k-reflow student trains on, solved from its parent if not stored."""
        path = self.pairs_path(base, reflows)
        if not os.path.exists(path):
            parent = self.velocity(base, reflows - 1)
            key = jax.random.fold_in(
                jax.random.PRNGKey(SEED_OFFSETS["reflow_pairs"] + self.seed),
                10 * reflows + list(BASES).index(base),
            )
            x0 = source_points(self.task, key, self.chosen["pairs"])
            start = time.perf_counter()
            solved = reflow_pairs(parent, x0, batch_size=4096 if self.task != "digits" else 1024)
            seconds = time.perf_counter() - start
            metadata = {"parent": method_name(base, reflows - 1), "solver": "dopri5", "seconds": seconds,
                        "nfe": int(solved.nfe.sum()), "seed": self.seed}  # fmt: skip
            save_pairs(path, solved.x0, solved.x1, metadata=metadata)
        return load_pairs(path)

    def train(self, base: str, reflows: int) -> tuple[dict, tuple[np.ndarray, np.ndarray] | None]:
        """Train (or resume) a model: its own compute (steps, train seconds, pair seconds and NFE) and the
        reflow pairs it trained on (None for a teacher)."""
        config = run_config(self.task, base, reflows, self.seed, self.chosen)
        compute = {"train_steps": config.steps, "pairs_seconds": 0.0, "pairs_nfe": 0}
        source, pairs = None, None
        if reflows:
            x0, x1, metadata = self.pairs(base, reflows)
            pairs = (x0, x1)
            compute.update(pairs_seconds=metadata["seconds"], pairs_nfe=metadata["nfe"])
            source = PairSource(self.pairs_path(base, reflows), batch_size=config.batch_size, seed=self.seed)
        run, seconds = _timed_train(config, self.run_dir(base, reflows), source=source)
        self.velocities[base, reflows] = self._velocity(run)
        compute["train_seconds"] = seconds
        return compute, pairs


def run_one(models: Models, base: str, reflows: int, data: dict, records: list[dict]) -> dict:
    """Train and evaluate one model; its record, with compute summed over its ancestors' records."""
    task, seed = models.task, models.seed
    compute, pairs = models.train(base, reflows)
    start = time.perf_counter()
    velocity = models.velocity(base, reflows)
    record = {
        "task": task,
        "method": method_name(base, reflows),
        "base": base,
        "reflows": reflows,
        "seed": seed,
        **models.chosen,
        "metric": "FD (pixels)" if task == "digits" else "W2",
    }
    metrics, figure = evaluate(task, velocity, data)
    record.update(metrics)
    if task != "digits":
        record["crossing_training_pairs"] = training_pairs_crossing(
            task, base, seed, models.chosen["batch_size"], pairs
        )
    record.update(compute)
    parent = None
    if reflows:
        parent = _find(records, task, method_name(base, reflows - 1), seed, models.chosen)
    record["total_train_steps"] = compute["train_steps"] + (parent["total_train_steps"] if parent else 0)
    own_seconds = compute["train_seconds"] + compute["pairs_seconds"]
    record["total_seconds"] = own_seconds + (parent["total_seconds"] if parent else 0.0)
    record["eval_seconds"] = time.perf_counter() - start
    if seed == 0:
        figure_path = os.path.join(models.work, f"figure-{slug(record['method'])}.npz")
        np.savez(figure_path, **figure)
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()}


def _matches(record: dict, chosen: dict) -> bool:
    return all(record.get(k) == v for k, v in chosen.items())


def _find(records, task, method, seed, chosen):
    for r in records:
        if r["task"] == task and r["method"] == method and r["seed"] == seed and _matches(r, chosen):
            return r
    return None


# --- report ---------------------------------------------------------------------------------------


def _mean_std(values):
    values = np.asarray(values, np.float64)
    std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return float(values.mean()), std


def _cell(values, digits=3):
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "nan"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def methods_of(reflows: int) -> list[tuple[str, int]]:
    return [(base, k) for k in range(reflows + 1) for base in BASES]


def task_table(task: str, records: list[dict], reflows: int) -> str:
    digits = task == "digits"
    metric = "FD" if digits else "W2"
    head = [f"{metric} Euler {n}" for n in EULER_STEPS] + [f"{metric} dopri5", "NFE dopri5", "straightness"]
    if not digits:
        head.append("crossing")
    head += ["train steps (total)", "train s (total, incl. pairs)", "of which pair solves, s"]
    lines = ["| method | seeds | " + " | ".join(head) + " |", "|---" * (len(head) + 2) + "|"]
    for base, k in methods_of(reflows):
        method = method_name(base, k)
        done = [r for r in records if r["task"] == task and r["method"] == method]
        if not done:
            lines.append(f"| {method} | 0 | not run |" + " |" * (len(head) - 1))
            continue
        cells = [_cell([r[f"distance_euler_{n}"] for r in done]) for n in EULER_STEPS]
        cells += [_cell([r["distance_dopri5"] for r in done]), _cell([r["nfe_dopri5"] for r in done], 0)]
        cells.append(_cell([r["straightness"] for r in done], 4 if not digits else 2))
        if not digits:
            cells.append(_cell([r["crossing_training_pairs"] for r in done], 4))
        cells.append(f"{done[0]['total_train_steps']:,}")
        cells.append(_cell([r["total_seconds"] for r in done], 0))
        pair_seconds = [sum(p["pairs_seconds"] for p in _lineage(records, r)) for r in done]
        cells.append(_cell(pair_seconds, 1))
        lines.append(f"| {method} | {len(done)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _lineage(records, record):
    """The record and its ancestors (the models whose pairs it was trained on, recursively)."""
    chain = [record]
    for k in range(record["reflows"] - 1, -1, -1):
        chosen = {key: record[key] for key in ("steps", "batch_size", "width", "pairs", "eval_samples")}
        parent = _find(records, record["task"], method_name(record["base"], k), record["seed"], chosen)
        if parent is not None:
            chain.append(parent)
    return chain


def one_step_comparison(task: str, records: list[dict], reflows: int) -> str:
    """Paired (same seed) differences of the 1-step distance: OT-CFM + k reflows against either alone."""
    by = {(r["method"], r["seed"]): r["distance_euler_1"] for r in records if r["task"] == task}
    lines = []
    for k in range(1, reflows + 1):
        both = method_name("OT-CFM", k)
        for other in ("OT-CFM", method_name("I-CFM", k)):
            seeds = sorted(s for (m, s) in by if m == both and (other, s) in by)
            if not seeds:
                continue
            diff = [by[both, s] - by[other, s] for s in seeds]
            lower = sum(d < 0 for d in diff)
            lines.append(
                f"- {both} minus {other}: {_cell(diff)} (lower in {lower} of {len(seeds)} seeds; "
                f"{_cell([by[both, s] for s in seeds])} vs {_cell([by[other, s] for s in seeds])})"
            )
    return "\n".join(lines) + "\n" if lines else "- not enough runs to compare\n"


def draw_figures(out: str, tasks: list[str], models: dict, reflows: dict) -> list[str]:
    """The 2D trajectory figure and the digits sample figure from the seed-0 figure data; the files drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = []
    flat = [t for t in tasks if t != "digits" and t in models]
    if flat:
        columns = methods_of(max(reflows[t] for t in flat))
        fig, axes = plt.subplots(2 * len(flat), len(columns), figsize=(2.6 * len(columns), 5.4 * len(flat)),
                                 squeeze=False)  # fmt: skip
        for row, task in enumerate(flat):
            for col, (base, k) in enumerate(columns):
                method = method_name(base, k)
                path = os.path.join(models[task].work, f"figure-{slug(method)}.npz")
                top, bottom = axes[2 * row, col], axes[2 * row + 1, col]
                if not os.path.exists(path):
                    for ax in (top, bottom):
                        ax.set_title(f"{method}\nnot run", fontsize=8)
                        ax.axis("off")
                    continue
                data = np.load(path)
                target, xs = data["target"], data["trajectory"]
                for ax in (top, bottom):
                    ax.scatter(target[:, 0], target[:, 1], s=3, c="tab:gray", alpha=0.25, lw=0)
                    ax.set_aspect("equal")
                    ax.set_xlabel("x₁", fontsize=7)
                    ax.set_ylabel("x₂", fontsize=7)
                    ax.tick_params(labelsize=6)
                top.plot(xs[:, :, 0], xs[:, :, 1], c="tab:olive", alpha=0.35, lw=0.5)
                top.scatter(xs[0, :, 0], xs[0, :, 1], s=2, c="black", lw=0)
                top.scatter(xs[-1, :, 0], xs[-1, :, 1], s=2, c="tab:blue", lw=0)
                top.set_title(f"{task}\n{method}\ndopri5 (NFE {int(data['nfe'])})", fontsize=8)
                start, end = data["euler_1_x0"][:160], data["euler_1"][:160]
                bottom.plot(np.stack([start[:, 0], end[:, 0]]), np.stack([start[:, 1], end[:, 1]]),
                            c="tab:olive", alpha=0.35, lw=0.5)  # fmt: skip
                bottom.scatter(data["euler_1"][:, 0], data["euler_1"][:, 1], s=1, c="tab:blue", lw=0)
                bottom.set_title(f"{task}\n{method}\nEuler, 1 step", fontsize=8)
        fig.suptitle("Trajectories from x0 (black) to x1 (blue), seed 0; target in grey", fontsize=10)
        fig.tight_layout()
        name = os.path.join(out, "straightness.png")
        fig.savefig(name, dpi=90)
        plt.close(fig)
        drawn.append(name)
    if "digits" in tasks and "digits" in models:
        columns = methods_of(reflows["digits"])
        fig, axes = plt.subplots(2, len(columns), figsize=(2.4 * len(columns), 5.8), squeeze=False)
        for col, (base, k) in enumerate(columns):
            method = method_name(base, k)
            path = os.path.join(models["digits"].work, f"figure-{slug(method)}.npz")
            for row, solver in enumerate(("euler_1", "dopri5")):
                ax = axes[row, col]
                ax.set_xticks([])
                ax.set_yticks([])
                label = "Euler, 1 step" if solver == "euler_1" else "dopri5"
                ax.set_title(f"{method}\n{label}", fontsize=8)
                if not os.path.exists(path):
                    continue
                images = np.clip(np.load(path)[solver], -1.0, 1.0).reshape(16, 8, 8)
                grid = np.zeros((37, 37))  # 4 x 4 tiles with grey lines between them
                for n, image in enumerate(images):
                    top, left = 1 + 9 * (n // 4), 1 + 9 * (n % 4)
                    grid[top : top + 8, left : left + 8] = image
                ax.imshow(grid, cmap="gray", vmin=-1, vmax=1)
        fig.suptitle(
            "Digits from the same 16 noise draws (seed 0): one Euler step against dopri5", fontsize=10
        )
        fig.tight_layout()
        name = os.path.join(out, "straightness_digits.png")
        fig.savefig(name, dpi=110)
        plt.close(fig)
        drawn.append(name)
    return drawn


SETTING_KEYS = ("steps", "batch_size", "width", "pairs", "eval_samples")


def compact_table(task: str, records: list[dict], reflows: int) -> str:
    """1-step and dopri5 distances and straightness of the records of another setting."""
    metric = "FD" if task == "digits" else "W2"
    lines = [
        f"| method | seeds | {metric} Euler 1 | {metric} dopri5 | straightness | train steps (total) |",
        "|---|---|---|---|---|---|",
    ]
    for base, k in methods_of(reflows):
        done = [r for r in records if r["method"] == method_name(base, k)]
        if done:
            cells = [
                _cell([r["distance_euler_1"] for r in done]),
                _cell([r["distance_dopri5"] for r in done]),
            ]
            cells += [_cell([r["straightness"] for r in done], 4), f"{done[0]['total_train_steps']:,}"]
            lines.append(f"| {method_name(base, k)} | {len(done)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(args, records: list[dict]) -> str:
    """The markdown report of the records of the settings in ``args`` (others in short tables)."""
    reflows = {t: args.digits_reflows if t == "digits" else args.reflows for t in TASKS}
    settings_2d, settings_digits = setting(args, "N -> moons"), setting(args, "digits")
    preset = QUICK if args.quick else DEFAULTS
    flags = " --quick" if args.quick else ""
    flags += "".join(
        f" --{n.replace('_', '-')} {getattr(args, n)}" for n in preset if getattr(args, n) != preset[n]
    )
    parts = [
        "# Straighter flows: minibatch OT, reflow, and few-step sampling\n",
        f"Commands: `python -m experiments.straightness{flags}` (2D), then `python -m "
        f"experiments.straightness --tasks digits{flags}` (digits).\n",
        f"2D setting: 3x64 SELU MLP, AdamW lr 1e-3, batch {settings_2d['batch_size']}, "
        f"{settings_2d['steps']:,} steps per model (teacher and every student, each from scratch), EMA "
        f"0.999; teachers on the straight path with sigma {TEACHER_SIGMA_2D}, students on "
        f"{settings_2d['pairs']:,} reflow pairs with sigma 0; W2 on {settings_2d['eval_samples']:,} "
        f"held-out points; up to {args.seeds} seeds.\n",
        f"Digits setting: UNet (channels {settings_digits['width']}, mults 1, 2), batch "
        f"{settings_digits['batch_size']}, {settings_digits['steps']:,} steps per model, straight path "
        f"with sigma 0, {settings_digits['pairs']:,} reflow pairs per student, FD on "
        f"{settings_digits['eval_samples']:,} samples; up to {args.digits_seeds} seed(s).\n",
        "All models are evaluated with their EMA parameters; dopri5 with rtol = atol = 1e-5 (also for the "
        "reflow pairs). Mean ± standard deviation over seeds. Train s: wall seconds of the model's training "
        "and of all its ancestors', plus the dopri5 solves of every reflow pair set on the way, on a "
        "2-core CPU shared with other jobs (indicative only).\n",
    ]
    for task in TASKS:
        chosen = setting(args, task)
        mine = [r for r in records if r["task"] == task and _matches(r, chosen)]
        parts.append(f"## {task}\n")
        if not mine:
            parts.append(f"Not run in this setting (`--tasks {json.dumps(task)}`).\n")
        else:
            if task == "digits":
                floor = frechet_distance(digits_reference("test"), digits_reference("train"))
                parts.append(
                    f"FD between the {len(digits_reference('test'))} real test digits and the "
                    f"{len(digits_reference('train'))} training digits (a floor, biased up by the smaller "
                    f"sample): {floor:.2f}.\n"
                )
            parts.append(task_table(task, mine, reflows[task]))
            parts.append("One Euler step: OT-CFM + reflow against each alone (paired by seed):\n")
            parts.append(one_step_comparison(task, mine, reflows[task]))
            train = sum(r["train_seconds"] + r["pairs_seconds"] for r in mine)
            evaluation = sum(r["eval_seconds"] for r in mine)
            parts.append(
                f"Compute of the {len(mine)} models above: {train:.0f} s training and pair solves, "
                f"{evaluation:.0f} s evaluation.\n"
            )
        others = {tuple(r[k] for k in SETTING_KEYS) for r in records if r["task"] == task} - {
            tuple(chosen[k] for k in SETTING_KEYS)
        }
        for other in sorted(others):
            shown = [r for r in records if r["task"] == task and tuple(r[k] for k in SETTING_KEYS) == other]
            described = ", ".join(
                f"{k.replace('_', ' ')} {v:,}" for k, v in zip(SETTING_KEYS, other, strict=True)
            )
            parts.append(f"Another setting of {task} ({described}):\n")
            parts.append(compact_table(task, shown, max(r["reflows"] for r in shown)))
    if args.notes:
        parts.append(NOTES)
    return "\n".join(parts)


NOTES = """
## What the run says

**Does minibatch OT plus reflow beat either alone at one Euler step?** It beats minibatch OT alone
clearly, and reflow alone only barely or not at all:

- against OT-CFM, one reflow lowers the 1-step distance in every seed of every task (W2 0.230 vs 0.263 on
  8gaussians -> moons, 0.182 vs 0.230 on N -> moons; pixel FD 0.51 vs 2.78 on digits);
- against I-CFM + 1 reflow, OT-CFM + 1 reflow is lower by 0.004 ± 0.002 in W2 on 8gaussians -> moons
  (all 3 seeds, paired by seed, but a quarter of the seed-to-seed spread of either), no different on
  N -> moons (0.001 ± 0.002, 2 of 3 seeds), and lower by 0.017 ± 0.013 in FD on digits (3 of 3 seeds,
  one of them by 0.002). After one reflow the student's 1-step W2 is within 0.015-0.035 of its own
  dopri5 W2, and that is bounded by the teacher's dopri5 W2 plus the student's fitting error; both
  teachers reach about the same dopri5 W2 (0.19-0.20 and 0.16-0.17), so there is little left for the
  better-coupled teacher to win.
- The short-training run (5,000 steps per model, the table "another setting" below each 2D task) shows
  where the combination pays: both teachers are then about equally undertrained (dopri5 W2 0.267 and
  0.259 on 8gaussians -> moons, against 0.19-0.20 at 20,000 steps), but the I-CFM teacher's map is the
  harder one to learn: its reflow pairs cross 3.5 times as often (0.0146 against 0.0042), and after
  5,000 steps its student is less straight (0.029 against 0.0044) and lands 0.048 above its own dopri5
  W2 at one step (OT-CFM's student: 0.022), so OT-CFM + 1 reflow beats I-CFM + 1 reflow by 0.035 ± 0.002
  (3 of 3 seeds). At 20,000 steps the I-CFM student catches up. On N -> moons I-CFM + 1 reflow is as
  good at both lengths (0.223 against 0.231 at 5,000 steps, lower in 2 of 3 seeds).

Other observations:

- Straightness (Liu et al.'s measure) falls by three to four orders of magnitude from I-CFM (8.5 and 1.8)
  to any student (0.0001-0.009); OT-CFM alone already sits at 0.020 and 0.003, and its students are the
  straightest on 8gaussians -> moons (0.0023 against 0.0094 for I-CFM + 1 reflow). The crossing of the
  training pairs tells the same story: independent pairs cross in 23-25% of pairs of segments, pooled
  minibatch-OT pairs in 1.5% (within one minibatch they never cross), reflow pairs in 0.4-1.6%, those of
  an OT-CFM teacher least.
- I-CFM with one Euler step puts every point at the mean of the target (at t = 0 its field is
  E[x1] - x0), hence W2 2.3-3.0; OT-CFM alone is usable at one step (0.26 and 0.23).
- Digits: one Euler step of a student (FD 0.51-0.53) lands between 2 and 4 steps of OT-CFM (0.81, 0.42)
  and between 4 and 8 steps of I-CFM (0.87, 0.40), but the students' own dopri5 FD
  (0.41-0.42) is well above the teachers' (0.23-0.24): 2,048 pairs and 3,000 steps leave a fitting error
  that more pairs and steps would shrink. OT-CFM straightens the digits flow less than the 2D ones
  (straightness 2.3 against 8.1 for I-CFM), and both students end at 0.46-0.47.
- A second reflow does not help at one step: each generation adds its own fitting error, so the dopri5 W2
  creeps up (OT-CFM 0.198 -> 0.205 -> 0.211 on 8gaussians -> moons) while the straightness, already
  tiny, falls further; the 1-step W2 rises by 0.001-0.005. We stop at one reflow
  for digits for that reason (and for time).
- The dopri5 NFE is not a straightness measure: on 8gaussians -> moons the OT-CFM students need more
  evaluations than their teacher (67 against 55) although they are straighter; the adaptive controller
  reacts to the field's roughness too.
- Compute: an OT-CFM teacher costs about three I-CFM teachers in wall time on this CPU (the exact
  assignment is solved on the host for every batch); training on stored pairs costs a little less than an
  I-CFM teacher, and solving the 20,000 pairs with dopri5 takes 0.2-1.6 s (the first of each seed includes a
  compile).
  So OT-CFM + 1 reflow is the most expensive 1-reflow model here (35 s against 17 s on 8gaussians ->
  moons), for its small gain.

## What was reduced or differs

- 2D: nothing of the two_dim.py protocol was cut except the batch (256, fmjax train's default, instead of
  512): 20,000 steps per model, 3 seeds, every method; the whole 2D sweep took 538 s. Students train from
  scratch (no warm start) for the same 20,000 steps as their teacher. The 5,000-step sweep (357 s) is kept
  as the second setting.
- Digits: run at a reduced scale: a 16-channel UNet (fmjax train's default is 64), 3,000 steps at batch
  128, 2,048 reflow pairs per student, one reflow, FD on 1,024 samples; 3 seeds, 53 minutes of
  training, pair solves and evaluation on the shared CPU. A 64-channel UNet's gradient step
  is about 10 times slower on this CPU (0.58 s against 0.06 s at batch 128, measured). The digits models
  were trained by this script's own loop (``train_digits``: one jitted step per call, otherwise the run's
  own step, sources and keys), when ``fmjax.runs.train`` still ran a UNet's steps under ``lax.scan``
  (1.2 s against 0.05 s per step on CPU); ``fmjax.runs.train`` now dispatches them one at a time and
  trains the same parameters, bit for bit.
- The digits metric is the Fréchet distance of Gaussians fitted to the raw pixels (64 dimensions, in the
  training space [-1, 1) with the real digits dequantised), not of a classifier's features: the table
  predates fmjax's digits classifier (``fmjax.digits_classifier.digits_frechet_distance``). It measures
  first and second moments only, and the "floor" of real held-out digits
  is biased upwards by its 360-image sample, so a model can sit below it.
- Wall seconds were taken on a 2-core CPU shared with other jobs and vary by tens of percent.
"""


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.straightness", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="the smoke setting: tiny runs, one seed")
    for name, value in DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {value}")
    parser.add_argument("--tasks", default="8gaussians -> moons,N -> moons")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--work", default=None, help="run directories (default: <repo>/runs/straightness)")
    parser.add_argument("--report-only", action="store_true", help="write the report from the records only")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    tasks = [t.strip() for t in args.tasks.split(",")]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"--tasks: unknown {unknown}; choose from {', '.join(TASKS)}")
    work = args.work or os.path.join(ROOT, "runs", "straightness")
    args.notes = not args.quick and all(getattr(args, n) == v for n, v in DEFAULTS.items())

    os.makedirs(args.out, exist_ok=True)
    results = os.path.join(args.out, "straightness.json")
    records = []
    if os.path.exists(results):
        with open(results) as f:
            records = json.load(f)["records"]

    def save():
        tmp = f"{results}.tmp"
        with open(tmp, "w") as f:
            json.dump({"settings": {t: setting(args, t) for t in TASKS}, "records": records}, f, indent=1)
        os.replace(tmp, results)

    start = time.perf_counter()
    seeds = {t: args.digits_seeds if t == "digits" else args.seeds for t in TASKS}
    reflows = {t: args.digits_reflows if t == "digits" else args.reflows for t in TASKS}
    models = {t: Models(t, 0, setting(args, t), work) for t in TASKS}  # seed 0 holds the figure data
    # seeds outermost: a sweep stopped early leaves every method of a task with the same number of seeds
    for seed in range(0 if args.report_only else max(seeds[t] for t in tasks)):
        for task in [t for t in tasks if seed < seeds[t]]:
            chosen = setting(args, task)
            seed_models, data = Models(task, seed, chosen, work), None
            for base, k in methods_of(reflows[task]):
                if _find(records, task, method_name(base, k), seed, chosen) is not None:
                    continue
                if data is None:
                    data = evaluation_data(task, seed, chosen["eval_samples"])
                record = run_one(seed_models, base, k, data, records)
                records.append(record)
                save()
                print(json.dumps(record), flush=True)
    mine = [r for r in records if r["task"] in TASKS and _matches(r, setting(args, r["task"]))]
    text = report(args, records)
    draw_figures(args.out, [t for t in TASKS if any(r["task"] == t for r in mine)], models, reflows)
    with open(os.path.join(args.out, "straightness.md"), "w") as f:
        f.write(text)
    save()
    print(text)
    print(f"wall time of this invocation: {time.perf_counter() - start:.0f} s")
    return mine


if __name__ == "__main__":
    main()

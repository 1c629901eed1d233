"""I-CFM against OT-CFM on the 8x8 digits: quality along training and against the Euler NFE after training.

Tong et al.'s CIFAR-10 figure (FID along training with dopri5; FID against the number of Euler steps
after training; "better for minibatch OT when few NFE, small difference in high dimension") at the
scale of a 2-core CPU: scikit-learn's digits (64 dimensions) and a small UNet.

For each seed, two UNets (``fmjax.models.UNet(channels=16, channel_mults=(1, 2))``) learn the linear
path with sigma = 0 (x_t = (1 - t) x0 + t x1, u_t = x1 - x0, as Tong et al.'s CIFAR-10 runs) from
N(0, I) to the 1437 training digits, one with the independent coupling (I-CFM) and one with the exact
minibatch OT coupling (OT-CFM, ``fmjax.couplings.exact()``), through the library's step
(``make_train_step(apply_fn, optimizer, path=Linear(sigma=0), coupling=...)``, one jitted step per
call). The two runs of a seed share everything but the coupling: initial weights, the batches of
digits, their dequantisation and the noise drawn for them (the coupling then re-pairs noise and
digits), the times t, and the evaluation noise. The batches come from the runs' "data" stream and the
evaluation noise from their "eval" stream (``fmjax.runs.stream_key``); the state's key, which draws
the times, is ``PRNGKey(seed)``.

Why a loop of its own and not ``fmjax.runs.train``: the learning rate decays along a cosine to 5% of
its start (``optax.cosine_decay_schedule``), and a ``RunConfig``'s optimiser is AdamW at a constant
rate after an optional linear warm-up; the results were measured with the decay. The rest would fit:
``RunConfig(dataset="digits", width=16, channel_mults=(1, 2), path="linear", sigma=0, coupling=...)``
builds the same UNet and step, a source of the 17-level digits would draw the same batches from the
same per-step keys, and the evaluations along training could read checkpoints kept at those steps.
(Its state's key is ``PRNGKey(seed)``, not the runs' "init" stream, so a conversion would also draw
other times t.)

Representation: the digits' 17 grey levels k = 0..16, recovered exactly from fmjax's stored 0..255
copy, dequantised into [-1, 1) as z = 2 (k + u) / 17 - 1, u ~ U[0, 1) (experiments/digits.py and
experiments/conditional_digits.py do the same; dequantising the 0..255 copy instead would put the data
on 17 slabs 1/256 wide). This is the classifier's own input space (``space="levels"``): generated
images are clipped to [-1, 1] and given to it as they are.

Quality, of ``eval_samples`` images generated from one fixed noise draw per seed, with the EMA
parameters, against the same number of test digits (all 360 in the full setting, one fixed
dequantisation draw):

- FD: ``experiments.classifier.classifier_frechet_distance``, the Fréchet distance between Gaussians
  fitted to the 64 penultimate features of a small CNN trained on the train split (an FID with a
  digits classifier in place of Inception);
- W2: ``fmjax.metrics.wasserstein2``, the exact 2-Wasserstein distance between the two clouds of
  flattened images (64 pixels in [-1, 1] units).

(a) along training: dopri5 (rtol = atol = ``tolerance``, 1e-4; TorchCFM's compute_fid uses 1e-5) at the
steps in ``checkpoints``; (b) after training: Euler with each of ``euler_steps`` equal steps (NFE =
steps) and dopri5 with its NFE. Floors: the same measures between as many real training digits and the
test digits. Each curve is the mean over seeds with the range (min to max) as a band.

    python -m experiments.nfe_digits              # writes results/nfe_digits.{md,json,png}
    python -m experiments.nfe_digits --quick --out /tmp/smoke
    python -m experiments.nfe_digits --rewrite    # md and png again from results/nfe_digits.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments._options import add_setting_options
from experiments.classifier import (
    Classifier,
    classifier_frechet_distance,
    dequantise,
    load_digits,
    train_classifier,
)
from fmjax.couplings import make_coupling
from fmjax.metrics import wasserstein2
from fmjax.models import UNet, functional
from fmjax.paths import Linear
from fmjax.runs import stream_key
from fmjax.sampling import as_velocity, sample
from fmjax.training import TrainState, make_train_step

SHAPE = (8, 8, 1)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# method name -> fmjax coupling name
METHODS = {"I-CFM": "independent", "OT-CFM": "exact"}
METRICS = {"fd": "classifier FD", "w2": "pixel W2"}
FEW_NFE = 4  # "few NFE": Euler with at most this many steps
SMALL_GAP = 0.1  # a relative gap below this at dopri5 counts as a small difference

FULL = {
    "steps": 3_000,
    "batch_size": 128,
    "channels": 16,
    "learning_rate": 2e-3,
    "ema_decay": 0.995,
    "seeds": (0, 1, 2),
    "checkpoints": (500, 1000, 2000, 3000),
    "eval_samples": 360,
    "euler_steps": (1, 2, 4, 8, 16, 32, 100),
    "tolerance": 1e-4,
    "classifier_epochs": 40,
}
QUICK = {
    **FULL,
    "steps": 40,
    "batch_size": 32,
    "channels": 8,
    "seeds": (0, 1),
    "checkpoints": (20, 40),
    "eval_samples": 48,
    "euler_steps": (1, 2, 8),
    "tolerance": 1e-3,
    "classifier_epochs": 3,
}


def quality(classifier: Classifier, images: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """FD (classifier features) and W2 (flattened pixels) of ``images`` against ``reference``, both
    [n, 8, 8, 1] in the levels space; ``images`` are clipped to [-1, 1] first."""
    images = np.clip(images, -1.0, 1.0)
    n = len(images)
    return {
        "fd": classifier_frechet_distance(classifier, images, reference),
        "w2": wasserstein2(images.reshape(n, -1), reference.reshape(len(reference), -1)),
    }


def solve(apply_fn, params, x0, *, steps: int | None, tolerance: float) -> tuple[np.ndarray, int]:
    """Images pushed from ``x0`` by the flow of ``params``: Euler with ``steps`` equal steps, or dopri5
    (``steps=None``); and the NFE."""
    velocity = as_velocity(apply_fn, params)
    if steps is None:
        result = sample(velocity, x0, solver="dopri5", rtol=tolerance, atol=tolerance)
    else:
        result = sample(velocity, x0, solver="euler", steps=steps)
    return np.asarray(result.x1), int(result.nfe)


def coupled_cost(coupling, levels: jax.Array, *, batch_size: int, batches: int = 20) -> float:
    """Mean squared distance per pixel, ||x0 - x1||^2 / 64, of the pairs ``coupling`` makes of ``batches``
    batches of noise and dequantised training digits (the same batches for every coupling)."""
    costs = []
    for b in range(batches):
        k_index, k_u, k_x0, k_pair = jax.random.split(jax.random.PRNGKey(50_000 + b), 4)
        index = jax.random.randint(k_index, (batch_size,), 0, levels.shape[0])
        x1 = dequantise(levels[index], jax.random.uniform(k_u, (batch_size, *SHAPE)))
        x0 = jax.random.normal(k_x0, x1.shape)
        i, j = coupling(k_pair, x0, x1)
        costs.append(float(jnp.mean(jnp.square(x0[i] - x1[j]))))
    return float(np.mean(costs))


def make_stepper(apply_fn, levels: jax.Array, settings: dict, *, method: str):
    """The optimiser and a jitted ``one(state, data_key) -> (state, metrics)`` of ``method``'s coupling,
    built once per method so that every seed reuses the compiled step.

    ``one`` draws the step's batch (indices, dequantisation u, noise x0) from ``fold_in(data_key,
    state.step)`` and the library's step draws the times from the state's key.
    """
    schedule = optax.cosine_decay_schedule(settings["learning_rate"], settings["steps"], alpha=0.05)
    optimizer = optax.adamw(schedule, weight_decay=1e-5)
    step = make_train_step(
        apply_fn,
        optimizer,
        path=Linear(sigma=0.0),
        coupling=make_coupling(METHODS[method]),
        ema_decay=settings["ema_decay"],
    )
    batch_size = settings["batch_size"]

    @jax.jit
    def one(state, data_key):
        k_index, k_u, k_x0 = jax.random.split(jax.random.fold_in(data_key, state.step), 3)
        index = jax.random.randint(k_index, (batch_size,), 0, levels.shape[0])
        x1 = dequantise(levels[index], jax.random.uniform(k_u, (batch_size, *SHAPE)))
        return step(state, jax.random.normal(k_x0, x1.shape), x1)

    return optimizer, one


def train_and_evaluate(
    apply_fn, params, stepper, settings, *, method: str, seed: int, x0_eval, reference, classifier
) -> dict:
    """Train one UNet from ``params`` with ``stepper`` (``make_stepper`` of ``method``); evaluate its
    EMA parameters with dopri5 at every checkpoint and, at the end, with every Euler step count and
    dopri5. The batches and the times are drawn from ``seed`` alone: the two methods see the same draws.
    """
    optimizer, one = stepper
    state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.PRNGKey(seed))
    data_key = stream_key(seed, "data")

    def evaluate(steps: int | None) -> dict:
        start = time.perf_counter()
        images, nfe = solve(apply_fn, state.ema_params, x0_eval, steps=steps, tolerance=settings["tolerance"])
        return {"nfe": nfe, **quality(classifier, images, reference), "seconds": time.perf_counter() - start}

    checkpoints = set(settings["checkpoints"])
    along, chunk, losses = [], [], []
    train_seconds, start = 0.0, time.perf_counter()
    for k in range(1, settings["steps"] + 1):
        state, metrics = one(state, data_key)
        chunk.append(metrics["loss"])
        if k in checkpoints or k == settings["steps"]:
            loss = float(np.mean(jax.device_get(chunk)))
            if not np.isfinite(loss):
                raise FloatingPointError(f"{method}, seed {seed}: the loss became {loss} by step {k}")
            losses.append((k, loss))
            chunk = []
            jax.block_until_ready(state)
            train_seconds += time.perf_counter() - start
            if k in checkpoints:
                along.append({"step": k, "loss": loss, **evaluate(None)})
                r = along[-1]
                print(
                    f"{method} seed {seed} step {k}: loss {loss:.4f}, dopri5 NFE {r['nfe']}, "
                    f"FD {r['fd']:.2f}, W2 {r['w2']:.3f} "
                    f"({train_seconds:.0f} s training, {r['seconds']:.0f} s eval)",
                    flush=True,
                )
            start = time.perf_counter()
    final = []
    for steps in (*settings["euler_steps"], None):
        final.append({"solver": "dopri5" if steps is None else "euler", **evaluate(steps)})
    print(
        f"{method} seed {seed} after training: "
        + ", ".join(f"{r['solver']} {r['nfe']}: FD {r['fd']:.2f} W2 {r['w2']:.3f}" for r in final),
        flush=True,
    )
    return {"method": method, "seed": seed, "along": along, "final": final, "losses": losses,
            "train_seconds": train_seconds}  # fmt: skip


def run(settings: dict, *, data_dir: str | None = None, classifier: Classifier | None = None) -> dict:
    """Train the classifier (unless given) and both methods for every seed; returns the record."""
    start = time.perf_counter()
    if classifier is None:
        classifier = train_classifier(seed=0, epochs=settings["classifier_epochs"], data_dir=data_dir)
    train_levels, _ = load_digits("train", data_dir=data_dir)
    test_levels, _ = load_digits("test", data_dir=data_dir)
    n = settings["eval_samples"]
    if not 2 <= n <= len(test_levels):
        raise ValueError(f"eval_samples must be in 2..{len(test_levels)} (the test digits); got {n}")
    rng = np.random.default_rng(10_000)
    reference = np.asarray(dequantise(test_levels[:n], rng.uniform(size=(n, *SHAPE))))
    chosen = rng.choice(len(train_levels), n, replace=False)
    floor = quality(classifier, np.asarray(dequantise(train_levels[chosen], rng.uniform(size=(n, *SHAPE)))),
                    reference)  # fmt: skip
    levels = jnp.asarray(train_levels)
    costs = {
        m: coupled_cost(make_coupling(c), levels, batch_size=settings["batch_size"])
        for m, c in METHODS.items()
    }

    # one apply_fn for every run (the architecture is the same), so the step and the solves compile once
    apply_fn, _ = functional(UNet(channels=settings["channels"], channel_mults=(1, 2), seed=0))
    steppers = {method: make_stepper(apply_fn, levels, settings, method=method) for method in METHODS}
    runs = []
    for seed in settings["seeds"]:
        _, params = functional(UNet(channels=settings["channels"], channel_mults=(1, 2), seed=seed))
        x0_eval = jax.random.normal(stream_key(seed, "eval"), (n, *SHAPE))
        for method in METHODS:
            runs.append(
                train_and_evaluate(
                    apply_fn,
                    params,
                    steppers[method],
                    settings,
                    method=method,
                    seed=seed,
                    x0_eval=x0_eval,
                    reference=reference,
                    classifier=classifier,
                )  # fmt: skip
            )
    return {
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
        "classifier_test_accuracy": classifier.test_accuracy,
        "classifier_seconds": classifier.train_seconds,
        "floor": floor,
        "coupled_cost": costs,
        "runs": runs,
        "total_seconds": time.perf_counter() - start,
    }


def curves(record: dict) -> dict:
    """Per method and metric, the seeds' values stacked: ``along`` [seeds, checkpoints] at ``steps``,
    ``final`` [seeds, Euler step counts + dopri5] at ``nfe`` (dopri5's NFE per seed in ``dopri5_nfe``)."""
    out = {}
    for method in METHODS:
        runs = sorted((r for r in record["runs"] if r["method"] == method), key=lambda r: r["seed"])
        entry = {
            "seeds": [r["seed"] for r in runs],
            "steps": [row["step"] for row in runs[0]["along"]],
            "nfe": [row["nfe"] for row in runs[0]["final"][:-1]],
            "dopri5_nfe": np.array([r["final"][-1]["nfe"] for r in runs]),
            "along_nfe": np.array([[row["nfe"] for row in r["along"]] for r in runs]),
        }
        for metric in METRICS:
            entry[f"along_{metric}"] = np.array([[row[metric] for row in r["along"]] for r in runs])
            entry[f"final_{metric}"] = np.array([[row[metric] for row in r["final"]] for r in runs])
        out[method] = entry
    return out


def figure(path: str, record: dict, *, title: str = "") -> None:
    """2x2 panels: rows FD and W2; columns along training (dopri5) and against the Euler NFE after
    training (dopri5 as a marker at its NFE). Lines are means over seeds, bands the seeds' range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(record)
    colours = {"I-CFM": "tab:blue", "OT-CFM": "tab:red"}
    fig, axes = plt.subplots(2, 2, figsize=(9.0, 6.6))
    for row, metric in enumerate(METRICS):
        for method, entry in data.items():
            c = colours[method]
            along = entry[f"along_{metric}"]
            ax = axes[row, 0]
            ax.plot(entry["steps"], along.mean(0), "o-", color=c, label=method, ms=3)
            ax.fill_between(entry["steps"], along.min(0), along.max(0), color=c, alpha=0.2, lw=0)
            final = entry[f"final_{metric}"]
            ax = axes[row, 1]
            euler = final[:, :-1]
            ax.plot(entry["nfe"], euler.mean(0), "o-", color=c, label=f"{method}, Euler", ms=3)
            ax.fill_between(entry["nfe"], euler.min(0), euler.max(0), color=c, alpha=0.2, lw=0)
            nfe = entry["dopri5_nfe"]
            ax.errorbar(
                nfe.mean(), final[:, -1].mean(), xerr=[[nfe.mean() - nfe.min()], [nfe.max() - nfe.mean()]],
                yerr=[[final[:, -1].mean() - final[:, -1].min()], [final[:, -1].max() - final[:, -1].mean()]],
                fmt="*", color=c, ms=10, capsize=2, label=f"{method}, dopri5",
            )  # fmt: skip
        for ax in axes[row]:
            ax.axhline(record["floor"][metric], color="k", ls=":", lw=1, label="real train digits")
            ax.set_yscale("log")
            ax.set_ylabel(METRICS[metric])
        axes[row, 1].set_xscale("log")
    axes[0, 0].set_title("along training (EMA params, dopri5)", fontsize=9)
    axes[0, 1].set_title("after training: Euler NFE (stars: dopri5)", fontsize=9)
    axes[1, 0].set_xlabel("training step")
    axes[1, 1].set_xlabel("NFE")
    axes[0, 0].legend(fontsize=7)
    axes[0, 1].legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _cell(values: np.ndarray, digits: int) -> str:
    """``mean (min-max)`` of the seeds' values."""
    return f"{values.mean():.{digits}f} ({values.min():.{digits}f}-{values.max():.{digits}f})"


def comparison(record: dict) -> dict:
    """Per metric and column of the after-training table (Euler step counts, then dopri5): the relative
    gap (I-CFM - OT-CFM) / I-CFM of the seeds' means, and the per-seed paired differences."""
    data = curves(record)
    icfm, otcfm = data["I-CFM"], data["OT-CFM"]
    labels = [f"euler {n}" for n in icfm["nfe"]] + ["dopri5"]
    out = {"columns": labels}
    for metric in METRICS:
        a, b = icfm[f"final_{metric}"], otcfm[f"final_{metric}"]
        out[metric] = {
            "relative_gap": ((a.mean(0) - b.mean(0)) / a.mean(0)).tolist(),
            "paired": (a - b).tolist(),  # [seeds, columns], positive: OT-CFM better for that seed
        }
    return out


def verdict(record: dict) -> list[str]:
    """What the numbers say about the seeds' conclusion, with the criteria spelled out."""
    data, gaps = curves(record), comparison(record)
    nfe = data["I-CFM"]["nfe"]
    few = [k for k, n in enumerate(nfe) if n <= FEW_NFE]
    many = [k for k, n in enumerate(nfe) if n >= 32] + [len(nfe)]  # Euler >= 32 steps and dopri5
    seeds = len(data["I-CFM"]["seeds"])
    lines = []
    for metric, name in METRICS.items():
        paired = np.array(gaps[metric]["paired"])
        rel = gaps[metric]["relative_gap"]
        col = gaps["columns"]
        better_few = [k for k in few if rel[k] > 0 and (paired[:, k] > 0).all()]
        lines.append(
            f"- {name}, few NFE (Euler <= {FEW_NFE} steps): OT-CFM is better than I-CFM in every one of the "
            f"{seeds} paired seeds at {', '.join(col[k] for k in better_few) or 'none of them'}"
            f" (of {', '.join(col[k] for k in few)}); relative gap (I-CFM - OT-CFM) / I-CFM of the means: "
            + ", ".join(f"{col[k]} {100 * rel[k]:+.0f}%" for k in few)
            + "."
        )
        lines.append(
            f"- {name}, many NFE: relative gap "
            + ", ".join(
                f"{col[k]} {100 * rel[k]:+.0f}% (seeds {' / '.join(f'{d:+.3g}' for d in paired[:, k])})"
                for k in many
            )
            + "."
        )
        dopri5 = paired[:, -1]
        small = abs(rel[-1]) < SMALL_GAP or not ((dopri5 > 0).all() or (dopri5 < 0).all())
        lines.append(
            f'- Verdict ({name}): "better for minibatch OT when few NFE" '
            + (
                "holds"
                if len(better_few) == len(few)
                else "does not hold"
                if not better_few
                else "holds in part"
            )
            + '; "small difference" at dopri5 '
            + ("holds" if small else "does not hold")
            + f" (criterion: |relative gap| < {100 * SMALL_GAP:.0f}% or the seeds disagree in sign)."
        )
    for metric, name in METRICS.items():
        a, b = data["I-CFM"][f"along_{metric}"], data["OT-CFM"][f"along_{metric}"]
        lines.append(
            f"- Along training ({name}, dopri5), I-CFM vs OT-CFM means, and the seeds where OT-CFM is lower: "
            + ", ".join(
                f"step {step} {a[:, k].mean():.3g} vs {b[:, k].mean():.3g} ({int((b[:, k] < a[:, k]).sum())}"
                f" of {seeds})"
                for k, step in enumerate(data["I-CFM"]["steps"])
            )
            + "."
        )
    for method, e in data.items():
        columns = gaps["columns"]
        lowest = {m: columns[int(np.argmin(e[f"final_{m}"].mean(0)))] for m in METRICS}
        lines.append(
            f"- {method}: the mean classifier FD is lowest at {lowest['fd']}, the mean pixel W2 at "
            f"{lowest['w2']}."
        )
    return lines


def report(record: dict, command: str) -> str:
    """The markdown report: command, machine, settings, the two tables and what the numbers say."""
    s, floor, data = record["settings"], record["floor"], curves(record)
    seeds = ", ".join(str(x) for x in s["seeds"])
    along_head = (
        "| method | step | loss | dopri5 NFE | classifier FD | pixel W2 |\n|---|---|---|---|---|---|\n"
    )
    along = ""
    for method, e in data.items():
        losses = np.array(
            [[row["loss"] for row in r["along"]] for r in record["runs"] if r["method"] == method]
        )
        for k, step in enumerate(e["steps"]):
            along += (
                f"| {method} | {step} | {losses[:, k].mean():.4f} | {_cell(e['along_nfe'][:, k], 0)} | "
                f"{_cell(e['along_fd'][:, k], 2)} | {_cell(e['along_w2'][:, k], 3)} |\n"
            )
    columns = [f"Euler {n}" for n in data["I-CFM"]["nfe"]] + ["dopri5"]
    final_head = "| method | metric | " + " | ".join(columns) + " |\n|---|---|" + "---|" * len(columns) + "\n"
    final = ""
    for method, e in data.items():
        for metric, name in METRICS.items():
            digits = 2 if metric == "fd" else 3
            final += (
                f"| {method} | {name} | "
                + " | ".join(_cell(e[f"final_{metric}"][:, k], digits) for k in range(len(columns)))
                + " |\n"
            )
        final += (
            f"| {method} | NFE | "
            + " | ".join(str(n) for n in e["nfe"])
            + f" | {_cell(e['dopri5_nfe'], 0)} |\n"
        )
    final += (
        f"| real train digits (floor) | classifier FD | {floor['fd']:.2f} |"
        + " |" * (len(columns) - 1)
        + "\n"
        f"| real train digits (floor) | pixel W2 | {floor['w2']:.3f} |" + " |" * (len(columns) - 1) + "\n"
    )
    gaps = comparison(record)
    gap_table = (
        "| metric | "
        + " | ".join(columns)
        + " |\n|---|"
        + "---|" * len(columns)
        + "\n"
        + "".join(
            f"| {name} | " + " | ".join(f"{100 * g:+.1f}%" for g in gaps[metric]["relative_gap"]) + " |\n"
            for metric, name in METRICS.items()
        )
    )
    seconds = {m: np.mean([r["train_seconds"] for r in record["runs"] if r["method"] == m]) for m in METHODS}
    cost = record["coupled_cost"]
    return (
        "# I-CFM vs OT-CFM on the 8x8 digits: quality along training and against the Euler NFE\n\n"
        f"Command: `{command}`\n\n"
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs, no GPU "
        f"(JAX {jax.__version__}, backend {jax.default_backend()}). Wall seconds are indicative only. "
        f"Total {record['total_seconds']:.0f} s; training alone {seconds['I-CFM']:.0f} s (I-CFM) and "
        f"{seconds['OT-CFM']:.0f} s (OT-CFM, exact coupling solved on the host every step) per run, "
        "the rest evaluation.\n\n"
        "## Settings\n\n"
        "- Data: the 1437 training digits' 17 grey levels dequantised into [-1, 1) "
        "(z = 2 (k + u) / 17 - 1); this is also the space the classifier reads (generated images are "
        "clipped to [-1, 1] and fed as they are).\n"
        f"- Model: `UNet(channels={s['channels']}, channel_mults=(1, 2))`, linear path with sigma = 0 from "
        f"N(0, I); I-CFM: independent coupling; OT-CFM: exact minibatch OT (`fmjax.couplings.exact()`) on "
        f"each batch of {s['batch_size']}. Mean squared distance per pixel of the coupled pairs "
        "(20 batches): "
        f"{cost['I-CFM']:.3f} independent, {cost['OT-CFM']:.3f} exact "
        f"({100 * (1 - cost['OT-CFM'] / cost['I-CFM']):.0f}% lower).\n"
        f"- Training: {s['steps']} steps of batch {s['batch_size']}, AdamW (weight decay 1e-5) with a "
        f"cosine decay from {s['learning_rate']:g} to 5% of it, EMA {s['ema_decay']} (all evaluations use "
        f"the EMA parameters); seeds {seeds}. For a seed, both methods start from the same weights and see "
        "the same batches, noise and times; only the pairing differs.\n"
        f"- Evaluation: {s['eval_samples']} images from one fixed noise draw per seed against the first "
        f"{s['eval_samples']} test digits (one fixed dequantisation draw). Classifier FD: Fréchet distance "
        f"in the 64 penultimate features of `experiments.classifier` (seed 0, "
        f"{s['classifier_epochs']} epochs on the train split; test accuracy "
        f"{record['classifier_test_accuracy']:.4f}). Pixel W2: exact `fmjax.metrics.wasserstein2` between "
        f"the flattened images (64 pixels, [-1, 1] units). dopri5 with rtol = atol = {s['tolerance']:g}. "
        "Floor: the same measures for as many real training digits.\n"
        f"- Cells: mean over the {len(s['seeds'])} seeds (min-max).\n\n"
        "## (a) Along training (dopri5)\n\n"
        + along_head
        + along
        + "\n## (b) After training: Euler NFE and dopri5\n\n"
        + final_head
        + final
        + "\nRelative gap of the means, (I-CFM - OT-CFM) / I-CFM (positive: OT-CFM better):\n\n"
        + gap_table
        + "\nReading the measures: the classifier FD is the FID analogue (it penalises blurred or "
        "malformed digits). The pixel W2 between two sets of "
        f"{s['eval_samples']} points in 64 dimensions is dominated by the sets' finite size: samples "
        "pulled towards the mean digit (the blur of few Euler steps) can score below real digits, so the "
        "floor is no lower bound for W2 and a lower W2 is not always a better sample.\n"
        + "\n## The seeds' conclusion here\n\n"
        'The slides (CIFAR-10, 3072 dimensions): "better for minibatch OT when few NFE, small difference in '
        'high dimension". Criteria: OT-CFM counts as better at an NFE when its mean is lower and it is '
        "lower in every paired seed.\n\n"
        + "\n".join(verdict(record))
        + "\n\nFigure: nfe_digits.png (lines: means over seeds; bands: min-max; dotted: real training "
        "digits).\n"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.nfe_digits", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="the smoke setting (tiny model, a few steps)")
    add_setting_options(parser, FULL, QUICK)
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument(
        "--rewrite",
        action="store_true",
        help="write the md and png again from OUT/nfe_digits.json (no training)",
    )
    args = parser.parse_args(argv)
    if args.rewrite:
        with open(os.path.join(args.out, "nfe_digits.json")) as f:
            saved = json.load(f)
        record = {k: v for k, v in saved.items() if k not in ("command", "comparison")}
        write(record, args.out, saved["command"])
        return record
    settings = dict(QUICK if args.quick else FULL)
    for name in settings:
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = tuple(int(x) for x in value.split(",")) if name == "seeds" else value
    if settings["steps"] not in settings["checkpoints"]:
        settings["checkpoints"] = tuple(c for c in settings["checkpoints"] if c < settings["steps"]) + (
            settings["steps"],
        )
    record = run(settings, data_dir=args.data_dir)
    given = sys.argv[1:] if argv is None else list(argv)
    write(record, args.out, "python -m experiments.nfe_digits" + "".join(" " + a for a in given))
    return record


def write(record: dict, out: str, command: str) -> None:
    """Write nfe_digits.{png,md,json} of ``record`` under ``out`` and print the report."""
    os.makedirs(out, exist_ok=True)
    s = record["settings"]
    figure(
        os.path.join(out, "nfe_digits.png"),
        record,
        title=f"digits, UNet width {s['channels']}, {s['steps']} steps, batch {s['batch_size']}, "
        f"{len(s['seeds'])} seeds: I-CFM vs OT-CFM (exact)",
    )
    text = report(record, command)
    with open(os.path.join(out, "nfe_digits.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "nfe_digits.json"), "w") as f:
        json.dump({"command": command, **record, "comparison": comparison(record)}, f, indent=1)
    print(text, flush=True)


if __name__ == "__main__":
    main()

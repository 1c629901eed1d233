"""Class-conditional CFM on the 8x8 digits with classifier-free guidance, judged by an independent classifier.

A UNet with a class embedding (``fmjax.models.UNet(num_classes=10)``; id 10 is the null class) learns
the CondOT field (sigma_min = 1e-4) from N(0, I) to the digits' 17 grey levels dequantised into
[-1, 1) (z = 2 (k + u) / 17 - 1, as experiments/digits.py), with the digit's label as condition,
replaced by the null class with probability ``cond_dropout`` = 0.1 so that one network learns both
the conditional and the unconditional field. It is trained with the library's step directly,
``make_train_step(apply_fn, optimizer, path=..., cond_dropout=..., null_cond=...)`` called as
``step(state, x0, x1, labels)``, one jitted step per call; each step's batch comes from the runs' "data"
stream and the sampling noise from their "eval" stream (``fmjax.runs.stream_key``).

Why a loop of its own and not ``fmjax.runs.train``: the learning rate decays along a cosine to 5% of
its start (``optax.cosine_decay_schedule``), and a ``RunConfig``'s optimiser is AdamW at a constant
rate after an optional linear warm-up; the results were measured with the decay. The rest would fit:
``RunConfig(dataset="digits", conditional=True, cond_dropout=0.1, width=16, channel_mults=(1, 2))``
builds the same UNet and step, and a source of the 17-level digits (``pair_cond``) would draw the same
batches from the same per-step keys. (Its state's key is ``PRNGKey(seed)``, not the runs' "init"
stream, so a conversion would also draw other times t and dropped labels.)

Its EMA parameters are then sampled class by class with ``guided_velocity(apply_fn, params, labels,
scale=w, null_cond=10)``, v_null + w (v_cond - v_null), from the same noise at every guidance scale
w (0: unconditional, 1: conditional, > 1: guided), and the samples are judged by
``fmjax.digits_classifier`` (a CNN trained on the train split only):

- accuracy: the fraction of the samples asked for class k that the classifier assigns to k, per class
  and over all classes (at w = 0 the class asked is ignored by the field, so about 1 in 10 by chance);
- FD: ``fmjax.metrics.frechet_distance`` between the classifier's penultimate features of the samples
  and of the 360 test digits (one fixed dequantisation draw): over all classes, and per class against
  that class's test digits (about 36 each, so a noisy, upward-biased figure; compare it with its floor);
- spread: the within-class pixel standard deviation sqrt(mean over pixels of the variance over a
  class's samples), averaged over classes: how diverse the samples of one class are.

Floors, from real digits with the same numbers of images: FD between training digits and the test
digits, and the spread of training digits.

    python -m experiments.conditional_digits            # writes results/conditional_digits.{md,json,png}
    python -m experiments.conditional_digits --quick --out /tmp/smoke
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
from fmjax.digits_classifier import (
    Classifier,
    classifier_frechet_distance,
    dequantise,
    load_digits,
    train_classifier,
)
from fmjax.guidance import guided_velocity
from fmjax.models import UNet, functional
from fmjax.paths import CondOT
from fmjax.runs import stream_key
from fmjax.sampling import sample
from fmjax.training import TrainState, make_train_step

CLASSES = 10
SHAPE = (8, 8, 1)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

FULL = {
    "steps": 4_000,
    "batch_size": 128,
    "channels": 16,
    "learning_rate": 2e-3,
    "ema_decay": 0.999,
    "cond_dropout": 0.1,
    "per_class": 100,
    "scales": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0),
    "solver": "dopri5",
    "tolerance": 1e-4,
    "euler_steps": 8,
}
QUICK = {
    **FULL,
    "steps": 300,
    "batch_size": 64,
    "channels": 8,
    "ema_decay": 0.95,
    "per_class": 20,
    "scales": (0.0, 1.0, 2.0, 3.0),
    "solver": "euler",
    "euler_steps": 8,
}


def train_conditional(levels, labels, settings, *, seed: int):
    """Train the class-conditional UNet; returns (model, apply_fn, EMA params, losses per 100 steps).

    ``levels`` uint8 [n, 8, 8, 1] grey levels 0..16 and ``labels`` int [n]. Each step draws its batch
    (indices, dequantisation u, noise x0) from ``fold_in(data_key, step)``.
    """
    model = UNet(channels=settings["channels"], channel_mults=(1, 2), num_classes=CLASSES, seed=seed)
    apply_fn, params = functional(model)
    schedule = optax.cosine_decay_schedule(settings["learning_rate"], settings["steps"], alpha=0.05)
    optimizer = optax.adamw(schedule, weight_decay=1e-5)
    state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.PRNGKey(seed))
    step = make_train_step(
        apply_fn,
        optimizer,
        path=CondOT(sigma_min=1e-4),
        cond_dropout=settings["cond_dropout"],
        null_cond=model.null_cond(),
        ema_decay=settings["ema_decay"],
    )
    levels, labels = jnp.asarray(levels), jnp.asarray(labels, jnp.int32)
    data_key = stream_key(seed, "data")
    batch_size = settings["batch_size"]

    @jax.jit
    def one(state):
        k_index, k_u, k_x0 = jax.random.split(jax.random.fold_in(data_key, state.step), 3)
        index = jax.random.randint(k_index, (batch_size,), 0, levels.shape[0])
        x1 = dequantise(levels[index], jax.random.uniform(k_u, (batch_size, *SHAPE)))
        x0 = jax.random.normal(k_x0, x1.shape)
        return step(state, x0, x1, labels[index])

    losses, chunk = [], []
    for k in range(settings["steps"]):
        state, metrics = one(state)
        chunk.append(metrics["loss"])
        if len(chunk) == 100 or k + 1 == settings["steps"]:
            loss = float(np.mean(jax.device_get(chunk)))
            if not np.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss} by step {k + 1}")
            losses.append((k + 1, loss))
            chunk = []
    return model, apply_fn, state.ema_params, losses


def guided_samples(model, apply_fn, params, x0, asked, *, scale, solver, steps, tolerance):
    """Samples [n, 8, 8, 1] of the guided field at ``scale`` for the classes ``asked`` [n], and the NFE."""
    velocity = guided_velocity(apply_fn, params, asked, scale=scale, null_cond=model.null_cond())
    if solver == "euler":
        result = sample(velocity, x0, solver="euler", steps=steps)
    else:
        result = sample(velocity, x0, solver=solver, rtol=tolerance, atol=tolerance)
    return np.asarray(result.x1), int(result.nfe)


def spread(images: np.ndarray, labels: np.ndarray) -> float:
    """Within-class pixel standard deviation sqrt(mean_pixels var), averaged over the classes."""
    flat = images.reshape(len(images), -1)
    return float(np.mean([np.sqrt(flat[labels == k].var(axis=0, ddof=1).mean()) for k in range(CLASSES)]))


def judge(classifier: Classifier, images, asked, reference, reference_labels) -> dict:
    """Accuracy (overall and per class), FD (over all classes and per class) and spread of ``images``."""
    predicted = classifier.predict(images)
    per_class = [float(np.mean(predicted[asked == k] == k)) for k in range(CLASSES)]
    fd_class = [
        classifier_frechet_distance(classifier, images[asked == k], reference[reference_labels == k])
        for k in range(CLASSES)
    ]
    return {
        "accuracy": float(np.mean(predicted == asked)),
        "accuracy_per_class": per_class,
        "predicted_shares": (np.bincount(predicted, minlength=CLASSES) / len(predicted)).tolist(),
        "fd": classifier_frechet_distance(classifier, images, reference),
        "fd_per_class": fd_class,
        "fd_per_class_mean": float(np.mean(fd_class)),
        "spread": spread(images, asked),
    }


def run(
    settings: dict, *, seed: int, data_dir: str | None = None, classifier: Classifier | None = None
) -> dict:
    """Train the classifier (unless given) and the conditional model, sample every scale, judge.

    Returns the record: settings, the classifier's test accuracy, the floor, one row per (solver,
    scale), losses, seconds, and the samples of the main solver by scale with the class asked of each.
    """
    start = time.perf_counter()
    if classifier is None:
        classifier = train_classifier(seed=seed, data_dir=data_dir)
    train_levels, train_labels = load_digits("train", data_dir=data_dir)
    test_levels, test_labels = load_digits("test", data_dir=data_dir)
    rng = np.random.default_rng(10_000 + seed)
    reference = np.asarray(dequantise(test_levels, rng.uniform(size=test_levels.shape)))
    real_train = np.asarray(dequantise(train_levels, rng.uniform(size=train_levels.shape)))

    per_class = settings["per_class"]
    asked = np.repeat(np.arange(CLASSES), per_class).astype(np.int32)
    # floors: real training digits in the numbers the samples come in (per_class of each class)
    chosen = np.concatenate([np.flatnonzero(train_labels == k)[:per_class] for k in range(CLASSES)])
    floor = judge(classifier, real_train[chosen], train_labels[chosen], reference, test_labels)

    t = time.perf_counter()
    model, apply_fn, params, losses = train_conditional(train_levels, train_labels, settings, seed=seed)
    jax.block_until_ready(params)
    train_seconds = time.perf_counter() - t
    print(f"trained {settings['steps']} steps in {train_seconds:.0f} s, loss {losses[-1][1]:.4f}", flush=True)

    x0 = jax.random.normal(stream_key(seed, "eval"), (len(asked), *SHAPE))
    solves = [(settings["solver"], settings["euler_steps"] if settings["solver"] == "euler" else None)]
    if settings["solver"] != "euler":
        solves.append(("euler", settings["euler_steps"]))
    rows, samples = [], {}
    for solver, steps in solves:
        for scale in settings["scales"]:
            t = time.perf_counter()
            images, nfe = guided_samples(
                model, apply_fn, params, x0, jnp.asarray(asked), scale=scale, solver=solver, steps=steps,
                tolerance=settings["tolerance"],
            )  # fmt: skip
            seconds = time.perf_counter() - t
            name = solver if steps is None else f"{solver} {steps}"
            rows.append({"scale": scale, "solver": name, "nfe": nfe, "seconds": seconds,
                         **judge(classifier, images, asked, reference, test_labels)})  # fmt: skip
            if solver == settings["solver"]:
                samples[scale] = images
            r = rows[-1]
            print(
                f"w = {scale:g}, {name}: NFE {nfe}, accuracy {r['accuracy']:.3f}, FD {r['fd']:.2f}",
                flush=True,
            )
    return {
        "settings": {**settings, "scales": list(settings["scales"]), "seed": seed},
        "classifier_test_accuracy": classifier.test_accuracy,
        "classifier_seconds": classifier.train_seconds,
        "floor": floor,
        "rows": rows,
        "losses": losses,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "samples": samples,
        "asked": asked,
    }


def figure(path: str, samples: dict, asked: np.ndarray, *, columns: int = 8, title: str = "") -> None:
    """One panel per guidance scale (four across): a row of ``columns`` samples per class (0..9 down)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = list(samples)
    across = min(len(scales), 4)
    down = -(-len(scales) // across)
    fig, axes = plt.subplots(down, across, figsize=(2.3 * across, 2.7 * down + 0.3), squeeze=False)
    for ax in axes.ravel()[len(scales) :]:
        ax.axis("off")
    for ax, scale in zip(axes.ravel(), scales, strict=False):
        images = np.clip((samples[scale][..., 0] + 1.0) / 2.0, 0.0, 1.0)
        tiles = np.ones((CLASSES * 9 - 1, columns * 9 - 1))
        for k in range(CLASSES):
            for c, image in enumerate(images[asked == k][:columns]):
                tiles[9 * k : 9 * k + 8, 9 * c : 9 * c + 8] = image
        ax.imshow(tiles, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"w = {scale:g}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks(9 * np.arange(CLASSES) + 3.5, [str(k) for k in range(CLASSES)], fontsize=6)
        ax.tick_params(length=0)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def report(record: dict, command: str) -> str:
    """The markdown report of a run: command, machine, settings, tables and what the numbers say."""
    s, floor, rows = record["settings"], record["floor"], record["rows"]
    main_solver = rows[0]["solver"]
    head = (
        "| w | solver | NFE | accuracy | lowest class accuracy | FD (all classes) | FD per class (mean) "
        "| spread | s |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    table = "".join(
        f"| {r['scale']:g} | {r['solver']} | {r['nfe']} | {r['accuracy']:.3f} | "
        f"{min(r['accuracy_per_class']):.2f} (class {int(np.argmin(r['accuracy_per_class']))}) | "
        f"{r['fd']:.2f} | {r['fd_per_class_mean']:.2f} | {r['spread']:.3f} | {r['seconds']:.1f} |\n"
        for r in rows
    )
    table += (
        f"| real training digits (floor) | | | {floor['accuracy']:.3f}\\* | "
        f"{min(floor['accuracy_per_class']):.2f} (class {int(np.argmin(floor['accuracy_per_class']))}) | "
        f"{floor['fd']:.2f} | {floor['fd_per_class_mean']:.2f} | {floor['spread']:.3f} | |\n"
    )
    per_class_head = (
        "| w | solver | " + " | ".join(str(k) for k in range(CLASSES)) + " |\n"
        "|---|---|" + "---|" * CLASSES + "\n"
    )
    per_class = "".join(
        f"| {r['scale']:g} | {r['solver']} | "
        + " | ".join(f"{a:.2f}" for a in r["accuracy_per_class"])
        + " |\n"
        for r in rows
    )
    per_class_fd = (
        "".join(
            f"| {r['scale']:g} | {r['solver']} | "
            + " | ".join(f"{v:.1f}" for v in r["fd_per_class"])
            + " |\n"
            for r in rows
        )
        + "| floor | | "
        + " | ".join(f"{v:.1f}" for v in floor["fd_per_class"])
        + " |\n"
    )
    main = {r["scale"]: r for r in rows if r["solver"] == main_solver}
    shares = main[0.0]["predicted_shares"] if 0.0 in main else None
    facts = []
    if 0.0 in main and 1.0 in main:
        facts.append(
            f"- w = 0 (the unconditional field; the class asked is ignored): accuracy "
            f"{main[0.0]['accuracy']:.3f} (chance 0.1); the classifier puts its samples in classes "
            f"0..9 in the shares {', '.join(f'{v:.2f}' for v in shares)}. w = 1 (conditional): "
            f"{main[1.0]['accuracy']:.3f}."
        )
    ordered = sorted(main)
    n = len(record["asked"])
    facts.append(
        f"- {main_solver}, samples the classifier assigns to another class than the one asked, out of {n}: "
        + ", ".join(f"{round((1 - main[w]['accuracy']) * n)} at w = {w:g}" for w in ordered if w > 0)
        + "."
    )
    facts.append(
        f"- {main_solver}, from w = {ordered[0]:g} to {ordered[-1]:g}: accuracy "
        + " -> ".join(f"{main[w]['accuracy']:.3f}" for w in ordered)
        + "; FD (all classes) "
        + " -> ".join(f"{main[w]['fd']:.2f}" for w in ordered)
        + "; FD per class (mean) "
        + " -> ".join(f"{main[w]['fd_per_class_mean']:.2f}" for w in ordered)
        + "; spread "
        + " -> ".join(f"{main[w]['spread']:.3f}" for w in ordered)
        + f" (real digits: {floor['spread']:.3f}); NFE "
        + " -> ".join(str(main[w]["nfe"]) for w in ordered)
        + "."
    )
    best_fd = min(ordered, key=lambda w: main[w]["fd"])
    best_class_fd = min(ordered, key=lambda w: main[w]["fd_per_class_mean"])
    facts.append(
        f"- Lowest FD over all classes at w = {best_fd:g}; lowest mean per-class FD at w = {best_class_fd:g}."
    )
    return (
        "# Class-conditional digits with classifier-free guidance\n\n"
        f"Command: `{command}`\n\n"
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs, no GPU "
        f"(JAX {jax.__version__}, backend {jax.default_backend()}). Wall seconds are indicative only. "
        f"Total {record['total_seconds']:.0f} s: classifier {record['classifier_seconds']:.1f} s, "
        f"conditional UNet {record['train_seconds']:.0f} s, the rest sampling and scoring.\n\n"
        "## Settings\n\n"
        f"- Model: `UNet(channels={s['channels']}, channel_mults=(1, 2), num_classes=10)`, CondOT path "
        f"(sigma_min = 1e-4) from N(0, I) to the 1437 training digits' 17 grey levels dequantised into "
        f"[-1, 1), independent coupling, cond_dropout = {s['cond_dropout']} (null class id 10).\n"
        f"- Training: {s['steps']} steps of batch {s['batch_size']}, AdamW (weight decay 1e-5) with a "
        f"cosine decay from {s['learning_rate']:g} to 5% of it, EMA {s['ema_decay']} (samples use the "
        f"EMA parameters); seed {s['seed']}. Loss (mean of the last 100 steps): "
        f"{record['losses'][-1][1]:.4f}.\n"
        f"- Sampling: {s['per_class']} samples per class at each w in "
        f"{', '.join(f'{w:g}' for w in s['scales'])}, all from the same noise; guided field "
        "v_null + w (v_cond - v_null) (`fmjax.guided_velocity`, one model call on the doubled batch, "
        "NFE counts calls of the guided field); "
        + (
            f"dopri5 with rtol = atol = {s['tolerance']:g}, and a fixed {s['euler_steps']}-step Euler grid."
            if s["solver"] != "euler"
            else f"a fixed {s['euler_steps']}-step Euler grid."
        )
        + "\n"
        f"- Judge: `fmjax.digits_classifier` (a small CNN trained on the train split only, seed "
        f"{s['seed']}): test accuracy **{record['classifier_test_accuracy']:.4f}** on the 360 test "
        "digits. FD is the Fréchet distance between Gaussians fitted to its 64 penultimate features of "
        "the samples and of the 360 test digits (per class: that class's ~36 test digits, a noisy and "
        "upward-biased figure); spread is the within-class pixel standard deviation (in [-1, 1] units). "
        f"The floor row scores {s['per_class']} real training digits per class the same way.\n\n"
        "## Results\n\n"
        + head
        + table
        + "\nAccuracy: the fraction of the samples asked for class k that the classifier assigns to k. "
        "\\* The floor's accuracy is measured on digits the classifier was trained on; its independent "
        "figure is its test accuracy above. The floor's FD is what a model that reproduced its training "
        "digits exactly would score with these sample sizes. At w = 0 the field ignores the class asked, "
        "so the per-class columns (lowest class accuracy, FD per class, spread) there compare samples of "
        "every class with one class's digits: they show that the class is ignored, not sample quality.\n\n"
        "Accuracy per class:\n\n"
        + per_class_head
        + per_class
        + "\nFD per class (against that class's test digits):\n\n"
        + per_class_head
        + per_class_fd
        + "\n## What the numbers say\n\n"
        + "\n".join(facts)
        + "\n\nSamples: conditional_digits.png (a row of samples per class, one panel per w, "
        f"{main_solver}).\n"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.conditional_digits", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="the smoke setting (tiny model, Euler only)")
    add_setting_options(parser, FULL, QUICK)
    parser.add_argument("--scales", default=None, help="comma-separated guidance scales")
    parser.add_argument("--solver", default=None, choices=("dopri5", "euler"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    for name in settings:
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = tuple(float(w) for w in value.split(",")) if name == "scales" else value
    record = run(settings, seed=args.seed, data_dir=args.data_dir)
    os.makedirs(args.out, exist_ok=True)
    command = "python -m experiments.conditional_digits" + (" " + " ".join(argv) if argv else "")
    if argv is None:
        command = "python -m experiments.conditional_digits" + "".join(" " + a for a in sys.argv[1:])
    s = record["settings"]
    figure(
        os.path.join(args.out, "conditional_digits.png"),
        record["samples"],
        record["asked"],
        title=f"class-conditional UNet ({s['steps']} steps), classifier-free guidance w, "
        f"{record['rows'][0]['solver']}: rows are classes 0-9",
    )
    text = report(record, command)
    with open(os.path.join(args.out, "conditional_digits.md"), "w") as f:
        f.write(text)
    saved = {k: v for k, v in record.items() if k not in ("samples", "asked")}
    with open(os.path.join(args.out, "conditional_digits.json"), "w") as f:
        json.dump({"command": command, **saved}, f, indent=1)
    print(text, flush=True)
    return record


if __name__ == "__main__":
    main()

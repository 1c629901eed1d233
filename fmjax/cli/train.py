"""``fmjax train``: train a flow and evaluate it; the same command resumes a stopped run.

Its options are ``RunConfig``'s fields (``fmjax.cli.options``) and the options of the call itself
(where the run goes, devices and processes, logging, what to skip), below.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from fmjax import runs
from fmjax._checks import message_of
from fmjax.cli.common import HelpFormat, UsageError, interrupted, say, warn
from fmjax.cli.options import add_config_options, config_from_args, foreign_flags, runs_of
from fmjax.data.earth import DATASETS as EARTH_DATASETS
from fmjax.runs import RunConfig
from fmjax.tensorboard import WandbLogger

ALIASES = {
    "run_dir": "--out"
}  # ``fmjax.runs.train``'s run_dir; the other arguments are named as their options


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of a training call shared by ``fmjax train`` and ``fmjax reflow``."""
    p.add_argument(
        "--data-dir", default=None, help="tfds data directory (default: $FMJAX_DATA_DIR or ~/.cache)"
    )
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="shard the batch over the first N devices (default: every device the run sees)",
    )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write the metrics as TensorBoard event files under OUT/tensorboard/ "
        "(view: tensorboard --logdir OUT)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-eval", action="store_true", help="train only; the same command again evaluates")


def add_parser(sub, help_text: str) -> None:
    """Add the command's parser to ``sub``; ``help_text`` is its line in ``fmjax.cli.main.COMMANDS``."""
    p = sub.add_parser(
        "train",
        help=help_text,
        description="Train a flow from a source to a target (2D toy data, or Gaussian noise to images with "
        "--dataset), checkpointing as it goes, then evaluate it. The same command resumes a stopped run.",
        formatter_class=HelpFormat,
    )
    add_config_options(p)
    p.add_argument(
        "--out",
        default=None,
        help="run directory (default: runs/train-<time>); a directory holding a run of the same "
        "configuration is resumed from its latest readable checkpoint; locked while training",
    )
    add_run_options(p)
    p.add_argument(
        "--no-pipeline",
        dest="pipeline",
        action="store_false",
        help="solve the exact coupling inside the step (the device waits) instead of on host threads "
        "one chunk ahead",
    )
    p.add_argument(
        "--distributed",
        default=None,
        help="'auto': join a multi-process run with jax.distributed.initialize() detecting the cluster "
        "(TPU pods, SLURM, ...); otherwise give --coordinator, --num-processes and --process-id",
    )
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0, for a multi-process run")
    p.add_argument("--num-processes", type=int, default=None, help="processes in a multi-process run")
    p.add_argument(
        "--process-id", type=int, default=None, help="this process's index, 0 .. num-processes - 1"
    )
    p.add_argument(
        "--wandb",
        default=None,
        metavar="PROJECT",
        help="also log the metrics to this Weights & Biases project (needs: pip install wandb)",
    )


def _default_run_dir() -> str:
    return os.path.join("runs", time.strftime("train-%Y%m%d-%H%M%S"))


def _config(args):
    given = config_from_args(args)
    foreign = foreign_flags(given)
    if foreign:
        flags = ", ".join(foreign)
        if given["dataset"] in EARTH_DATASETS:
            why = (
                f"a sphere run (--dataset {given['dataset']}) trains an MLP from the uniform distribution on "
                "the sphere to the dataset's points"
            )
        else:
            why = "an image run (--dataset) trains a UNet from noise"
        raise UsageError(f"{flags}: for {runs_of(foreign[0])} only; {why}")
    return RunConfig(**given)


def _init_distributed(args) -> None:
    """Join a multi-process run through jax.distributed (gloo collectives on CPU)."""
    given = [args.coordinator is not None, args.num_processes is not None, args.process_id is not None]
    if args.distributed is not None:
        if args.distributed != "auto":
            raise UsageError(f"--distributed must be 'auto'; got {args.distributed!r}")
        if any(given):
            raise UsageError(
                "--distributed auto detects the cluster: drop --coordinator, --num-processes and --process-id"
            )
        import jax

        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as error:  # no cluster that JAX can detect here
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UsageError(
                f"--distributed auto found no cluster to join ({reason}); on a machine without a TPU pod "
                "or a cluster scheduler, give --coordinator, --num-processes and --process-id"
            ) from None
        return
    if not any(given):
        return
    if not all(given):
        raise UsageError("--coordinator, --num-processes and --process-id go together")
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
        raise UsageError(
            f"--process-id must be in 0 .. {args.num_processes - 1} and --num-processes >= 1; "
            f"got {args.process_id} of {args.num_processes}"
        )
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
    )


def run(args, interrupts) -> int:
    """``fmjax train``."""
    config = _config(args)
    _init_distributed(args)
    import jax

    run_dir = args.out or _default_run_dir()
    if jax.process_count() == 1:  # a quick answer before the data are read (train checks it again)
        runs.check_run_dir(config, run_dir)
    if interrupts.requested():
        return interrupted("interrupted before training started; nothing was written")

    loggers = []
    if args.wandb is not None and jax.process_index() == 0:
        try:
            name = os.path.basename(os.path.normpath(run_dir))
            loggers.append(WandbLogger(project=args.wandb, name=name, config=config.to_json()))
        except ModuleNotFoundError as error:
            raise UsageError(str(error)) from None
    try:
        return train_and_evaluate(args, interrupts, config, run_dir, loggers)
    finally:
        for logger in loggers:
            logger.close()


class _BarLoss:
    """A logger of ``runs.train`` that shows the latest logged loss in the progress bar."""

    def __init__(self, bar):
        self.bar = bar

    def scalars(self, values: dict, step: int) -> None:
        if "train/loss" in values:
            self.bar.set_postfix(loss=f"{values['train/loss']:.4g}", refresh=False)


def train_and_evaluate(args, interrupts, config, run_dir: str, loggers: list, initial_state=None) -> int:
    """Train ``config`` in ``run_dir`` with a progress bar, then evaluate it (``fmjax train`` and
    ``fmjax reflow``); notes name the command's options through ``args.naming``."""
    import jax
    from tqdm import tqdm

    for note in config.warnings(args.naming):
        warn(note)
    bar = tqdm(
        total=config.steps, desc="compiling", unit="step", disable=args.no_progress, dynamic_ncols=True
    )
    started = {"yet": False}

    def progress(n: int) -> None:
        if not started["yet"]:  # the first chunk came back: compiled
            started["yet"] = True
            bar.set_description("train")
        bar.update(n)

    start = time.perf_counter()
    interrupts.defer = True
    try:
        run = runs.train(
            config,
            run_dir,
            progress=progress,
            log=lambda message: bar.write(message_of(message, args.naming)),
            data_dir=args.data_dir,
            devices=args.devices,
            pipeline=args.pipeline,
            stop=interrupts.requested,
            tensorboard=args.tensorboard,
            loggers=[*loggers, _BarLoss(bar)],
            initial_state=initial_state,
        )
    except runs.TrainingInterrupted as stopped:
        bar.close()
        return interrupted(str(stopped))
    finally:
        interrupts.defer = False
        bar.close()
    train_time = time.perf_counter() - start
    if interrupts.requested():  # after the last dispatch
        steps = int(run.state.step)
        return interrupted(f"interrupted after training {steps} steps (saved); rerun to evaluate")
    if jax.process_index() != 0:  # process 0 evaluates and reports
        return 0
    print(f"run directory: {run_dir}")
    if run.trained_steps:
        resumed = config.steps - run.trained_steps
        since = f" (resumed at step {resumed})" if resumed else ""
        print(f"trained {run.trained_steps} steps in {train_time:.1f} s{since}")
    else:
        print(f"already trained ({config.steps} steps): nothing to train")
    if args.no_eval:
        print("evaluation skipped (--no-eval); the same command without --no-eval evaluates")
        return 0
    summary = None if run.trained_steps else _current_summary(run_dir, config.steps)
    if summary is not None:
        print(f"evaluation of step {config.steps}, from {os.path.join(run_dir, runs.SUMMARY_FILE)}:")
    else:
        in_evaluation = (
            "interrupted during the evaluation; training is complete: rerun the command to evaluate"
        )
        try:
            summary = runs.evaluate(
                run, run_dir, plots=not args.no_plots, data_dir=args.data_dir, tensorboard=args.tensorboard,
                loggers=loggers, log=say,
            )  # fmt: skip
        except KeyboardInterrupt:
            return interrupted(in_evaluation)
        if interrupts.requested():
            return interrupted(in_evaluation)
    _print_summary(config, summary, run_dir)
    return 0


def _current_summary(run_dir: str, steps: int) -> dict | None:
    """The run's ``summary.json`` if it evaluates its final step, else None (evaluate again)."""
    try:
        with open(os.path.join(run_dir, runs.SUMMARY_FILE)) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("step") == steps else None


def _print_summary(config, summary: dict[str, Any], run_dir: str) -> None:
    if config.kind == "sphere":
        print(
            f"test NLL = {summary['test_nll']:.4f} +- {summary['test_nll_stderr']:.4f} nats on "
            f"{summary['n_test']} {config.dataset} test points (validation {summary['val_nll']:.4f}; uniform "
            f"{summary['uniform_nll']:.4f}); exact divergence, {summary['solver']}, NFE = {summary['nfe']}"
        )
        return
    if config.dataset is not None:
        print(
            f"samples: {os.path.join(run_dir, 'samples.png')} (NFE = {summary['nfe']}); "
            f"bits/dim = {summary['bits_per_dim']:.3f} +- {summary['bits_per_dim_stderr']:.3f} on "
            f"{summary['n']} test images (Hutchinson, 4 probes; fmjax nll for the exact value)"
        )
        if "fd_euler_steps" in summary:
            images = summary["fd_test_images"]
            print(f"pixel Fréchet distance to {images} test images {_few_steps(summary['fd_euler_steps'])}")
        return
    print(
        f"W2 = {summary['w2']:.4f} ({summary['solver']}, NFE = {summary['nfe']}); "
        f"W2 = {summary['w2_euler100']:.4f} (euler, NFE = 100); NPE = {summary['npe']:.3f}; "
        f"target sample floor W2 = {summary['w2_target_floor']:.4f}"
    )
    if "w2_euler_steps" in summary:
        print(f"W2 {_few_steps(summary['w2_euler_steps'])}")
    if config.conditional:
        per_class = ", ".join(f"{w:.3f}" for w in summary["w2_per_class"])
        classes = f"0 .. {config.num_classes - 1}"
        print(f"conditional on the target's labels; W2 per class ({classes}): {per_class}")


def _few_steps(distances: dict[str, float]) -> str:
    """``after few Euler steps (1: d1, 2: d2, ...)`` of a summary's distances by number of steps."""
    return "after few Euler steps (" + ", ".join(f"{steps}: {d:.4f}" for steps, d in distances.items()) + ")"

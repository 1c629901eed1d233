"""The ``fmjax`` command.

    fmjax train [--source 8gaussians] [--target moons] [--path linear] [--coupling independent] ...

Errors in the arguments or the data print one line on stderr, naming the option as typed (``--sigma``, not
the Python API's ``sigma_min``), and exit with status 2. Ctrl-C during ``fmjax train`` stops at the next
dispatch, saves the step if it can, prints one line and exits with status 130; the same command resumes
the run (a second Ctrl-C exits at once, keeping the checkpoints already written).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import signal
import sys
import threading
import time
from typing import Any

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

COMMAND_HELP = {
    "train": "train a flow (2D toy data, or images with --dataset) and evaluate it",
    "reflow": "rectified flow's reflow: solve a run's flow for (x0, x1) pairs, train a new run on them",
    "sample": "sample a trained run: a PNG of the samples, NFE and W2",
    "nll": "negative log-likelihood of fresh target points under a trained run",
}

# names of the Python API (RunConfig fields, function arguments) that the commands' options stand for
_API_NAMES = {
    "train": {"sigma_min": "--sigma", "run_dir": "--out", "data_dir": "--data-dir", "devices": "--devices"},
    "sample": {
        "n": "--n",
        "solver": "--solver",
        "steps": "--steps",
        "seed": "--seed",
        "class": "--class",
        "guidance": "--guidance",
    },
    "reflow": {
        "run_dir": "--out",
        "pairs": "--pairs",
        "solver": "--solver",
        "solver_steps": "--solver-steps",
        "init": "--init",
        "steps": "--steps",
        "batch_size": "--batch-size",
        "seed": "--seed",
    },
    "nll": {
        "n": "--n",
        "divergence": "--divergence",
        "num_probes": "--num-probes",
        "probe": "--probe",
        "solver": "--solver",
        "seed": "--seed",
        "data_dir": "--data-dir",
    },
}


def _flags(command: str | None) -> dict[str, str]:
    """API name -> the option of ``command`` that sets it."""
    names = dict(_API_NAMES.get(command, {}))
    if command == "train":
        from fmjax.runs import RunConfig

        for field in dataclasses.fields(RunConfig):
            names.setdefault(field.name, "--" + field.name.replace("_", "-"))
        names["eval_ema"] = "--no-eval-ema"
    return names


def _name_flags(message: str, command: str | None) -> str:
    """``message`` with the API names of ``command``'s options replaced by the options, where a name is
    the subject of the message (``sigma_min must be >= 0`` -> ``--sigma must be >= 0``) or listed as
    differing (``differs in width, seed``)."""
    names = _flags(command)
    if not names:
        return message
    pattern = "|".join(sorted(map(re.escape, names), key=len, reverse=True))
    subject = re.compile(
        rf"(?<![\w\-.'\"/])({pattern})(?=\s+(?:must|is|are|has|cannot|needs|and|than|-?\d|'|\"))"
    )
    message = subject.sub(lambda m: names[m.group(1)], message)
    return re.sub(
        r"differs in ([\w, ]+)",
        lambda m: "differs in " + ", ".join(names.get(n, n) for n in m.group(1).split(", ")),
        message,
    )


class _Interrupts:
    """The SIGINT (Ctrl-C) handler of a command.

    While training (``defer``), Ctrl-C only asks the loop to stop at its next dispatch (a
    KeyboardInterrupt inside a compile or an orbax write could leave either half done); a second one
    exits at once. Elsewhere it raises KeyboardInterrupt, and ``count`` remembers it in case that was
    swallowed (a KeyboardInterrupt raised inside a garbage-collection callback is only printed).
    """

    def __init__(self):
        self.count = 0
        self.defer = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.count += 1
        if not self.defer:
            raise KeyboardInterrupt
        if self.count > 1:
            os.write(2, b"fmjax: interrupted again: stopping now; the checkpoints written are intact\n")
            os._exit(EXIT_INTERRUPTED)

    def requested(self) -> bool:
        return self.count > 0


_interrupts = _Interrupts()
if os.path.basename(sys.argv[0]) == "fmjax" and threading.current_thread() is threading.main_thread():
    # the console script: a Ctrl-C while jax and the rest load is answered by main() in one line (this
    # module imports only the standard library, so the handler is in place within the first 0.1 s)
    _interrupts.defer = True
    signal.signal(signal.SIGINT, _interrupts)


class _UsageError(Exception):
    pass


class _HELP_FORMAT(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default (where it has one)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


class _Version(argparse.Action):
    """``fmjax --version``: fmjax's and jax's versions and the exact coupling's host solver."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import version

        from fmjax._assignment import SOLVER_NAME

        print(f"fmjax {version('fmjax')} (jax {version('jax')}; exact coupling solver: {SOLVER_NAME})")
        parser.exit()


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so every error is one line."""

    def error(self, message: str):
        raise _UsageError(message)


def _default_run_dir() -> str:
    return os.path.join("runs", time.strftime("train-%Y%m%d-%H%M%S"))


def _add_train(sub) -> None:
    from fmjax.couplings import COUPLINGS
    from fmjax.data.toy import TOY_SAMPLERS
    from fmjax.models import ACTIVATIONS
    from fmjax.paths import PATHS
    from fmjax.runs import RunConfig
    from fmjax.sampling import SOLVERS

    defaults = RunConfig()
    p = sub.add_parser(
        "train",
        help=COMMAND_HELP["train"],
        description="Train a flow from a source to a target (2D toy data, or Gaussian noise to images with "
        "--dataset), checkpointing as it goes, then evaluate it. The same command resumes a stopped run.",
        formatter_class=_HELP_FORMAT,
    )
    p.add_argument(
        "--source",
        default=None,
        help=f"2D runs: one of {', '.join(TOY_SAMPLERS)} (default {defaults.source})",
    )
    p.add_argument(
        "--target",
        default=None,
        help=f"2D runs: one of {', '.join(TOY_SAMPLERS)} (default {defaults.target})",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="train a UNet on images instead of 2D data: digits (offline), mnist or cifar10 (tfds)",
    )
    p.add_argument(
        "--data-dir", default=None, help="tfds data directory (default: $FMJAX_DATA_DIR or ~/.cache)"
    )
    p.add_argument(
        "--path", default=None, help=f"one of {', '.join(PATHS)} (default: linear; condot with --dataset)"
    )
    p.add_argument(
        "--sigma",
        type=float,
        default=None,
        help="sigma_min (condot) or sigma (linear, sb); default 0.1",
    )
    p.add_argument("--coupling", default=defaults.coupling, help=f"one of {', '.join(COUPLINGS)}")
    p.add_argument(
        "--coupling-scope",
        default=defaults.coupling_scope,
        help="with several devices or processes: 'global' couples the whole global batch (default), "
        "'local' each device's shard",
    )
    p.add_argument("--steps", type=int, default=defaults.steps, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument(
        "--width",
        type=int,
        default=defaults.width,
        help="MLP hidden width; with --dataset the UNet's base channels",
    )
    p.add_argument(
        "--depth", type=int, default=None, help=f"2D runs: MLP hidden layers (default {defaults.depth})"
    )
    p.add_argument(
        "--activation",
        default=None,
        help=f"2D runs: the MLP's activation, one of {', '.join(ACTIVATIONS)} "
        f"(default {defaults.activation})",
    )
    p.add_argument(
        "--time-sampler",
        default=defaults.time_sampler,
        help="distribution of the training times t: uniform on [0, 1], or logit-normal (sigmoid of N(0, 1))",
    )
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW's (0: Adam)")
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=defaults.warmup_steps,
        help="linear warm-up of the learning rate from 0 over this many steps (0: none)",
    )
    p.add_argument(
        "--grad-clip",
        type=float,
        default=defaults.grad_clip,
        help="clip the gradient to this global L2 norm before the optimiser (default: no clip)",
    )
    p.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    image = "image runs: the UNet's"
    p.add_argument(
        "--channel-mults",
        type=_int_list,
        default=None,
        help=f"{image} channel multiplier per level, e.g. 1,2,2,2 (default: digits 1,2; mnist 1,2,2; "
        "cifar10 1,2,2,2)",
    )
    p.add_argument("--num-res-blocks", type=int, default=None, help=f"{image} residual blocks per level (1)")
    p.add_argument("--groups", type=int, default=None, help=f"{image} GroupNorm groups (8)")
    p.add_argument(
        "--attention-resolutions",
        type=_int_list,
        default=None,
        help=f"{image} feature-map sides with self-attention, e.g. 16 (default: none)",
    )
    p.add_argument("--num-heads", type=int, default=None, help=f"{image} attention heads (4)")
    p.add_argument(
        "--num-head-channels",
        type=int,
        default=None,
        help=f"{image} channels per attention head (replaces --num-heads; default unset)",
    )
    p.add_argument(
        "--dropout", type=float, default=None, help=f"{image} residual blocks' dropout (training only; 0)"
    )
    p.add_argument(
        "--hflip",
        action="store_const",
        const=True,
        default=None,
        help="image runs: flip each training image left-right with probability 1/2",
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--eval-samples", type=int, default=defaults.eval_samples)
    p.add_argument(
        "--eval-solver",
        default=defaults.eval_solver,
        help=f"adaptive solver, one of {', '.join(n for n, s in SOLVERS.items() if s.adaptive)}",
    )
    p.add_argument(
        "--no-eval-ema",
        dest="eval_ema",
        action="store_false",
        help="evaluate the raw, not the EMA, parameters",
    )
    p.add_argument("--log-every", type=int, default=defaults.log_every, help="steps per logged chunk")
    p.add_argument(
        "--checkpoint-every", type=int, default=defaults.checkpoint_every, help="steps between checkpoints"
    )
    p.add_argument(
        "--keep-checkpoints", type=int, default=defaults.keep_checkpoints, help="newest checkpoints kept"
    )
    p.add_argument(
        "--on-nonfinite",
        default=defaults.on_nonfinite,
        help="a NaN/inf loss, gradient norm or updated state: 'stop' (error naming the step and the "
        "quantity; that state is never saved, the last good checkpoint is kept) or 'skip' (leave the state "
        "unchanged for that step)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="run directory (default: runs/train-<time>); a directory holding a run of the same "
        "configuration is resumed from its latest readable checkpoint; locked while training",
    )
    p.add_argument(
        "--precision",
        default=defaults.precision,
        help="float32, or bf16: bfloat16 activations with float32 parameters and optimiser state",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="shard the batch over the first N devices (default: every device the run sees)",
    )
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
        "--conditional",
        action="store_true",
        help="condition the model on the class of each target point: the component of 8gaussians, the "
        "moon of moons, the square of checkerboard, the digit or class of --dataset (class embedding with "
        "a null class, id = number of classes)",
    )
    p.add_argument(
        "--cond-dropout",
        type=float,
        default=defaults.cond_dropout,
        help="with --conditional: probability of replacing a label by the null class while training, for "
        "classifier-free guidance (e.g. 0.1; 0 trains no unconditional model)",
    )
    p.add_argument(
        "--by-label",
        action="store_true",
        help="with --conditional and an OT coupling (exact, sinkhorn, sb): pair only within a class",
    )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write the metrics as TensorBoard event files under OUT/tensorboard/ "
        "(view: tensorboard --logdir OUT)",
    )
    p.add_argument(
        "--wandb",
        default=None,
        metavar="PROJECT",
        help="also log the metrics to this Weights & Biases project (needs: pip install wandb)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-eval", action="store_true", help="train only; the same command again evaluates")


_TOY_ONLY = ("source", "target", "depth", "activation")


def _int_list(text: str) -> tuple[int, ...]:
    """``"1,2,2,2"`` -> (1, 2, 2, 2); ``""`` -> () (argparse reports a ValueError as an invalid value)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        message = f"must be comma-separated integers, e.g. 1,2,2,2; got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def _config_from_args(args):
    from fmjax.runs import RunConfig

    fields = {f.name for f in dataclasses.fields(RunConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    if given.get("dataset") is not None:
        toy = [_flags("train")[name] for name in _TOY_ONLY if given.get(name) is not None]
        if toy:
            raise _UsageError(
                f"{', '.join(toy)}: for 2D runs only; an image run (--dataset) trains a UNet from noise"
            )
    given = {k: v for k, v in given.items() if not (k in _TOY_ONLY and v is None)}
    try:
        return RunConfig(**given)
    except (ValueError, TypeError) as error:
        raise _UsageError(str(error)) from None


def _init_distributed(args) -> None:
    """Join a multi-process run through jax.distributed (gloo collectives on CPU)."""
    given = [args.coordinator is not None, args.num_processes is not None, args.process_id is not None]
    if args.distributed is not None:
        if args.distributed != "auto":
            raise _UsageError(f"--distributed must be 'auto'; got {args.distributed!r}")
        if any(given):
            raise _UsageError(
                "--distributed auto detects the cluster: drop --coordinator, --num-processes and --process-id"
            )
        import jax

        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as error:  # no cluster that JAX can detect here
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise _UsageError(
                f"--distributed auto found no cluster to join ({reason}); on a machine without a TPU pod "
                "or a cluster scheduler, give --coordinator, --num-processes and --process-id"
            ) from None
        return
    if not any(given):
        return
    if not all(given):
        raise _UsageError("--coordinator, --num-processes and --process-id go together")
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
        raise _UsageError(
            f"--process-id must be in 0 .. {args.num_processes - 1} and --num-processes >= 1; "
            f"got {args.process_id} of {args.num_processes}"
        )
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
    )


def _cmd_train(args) -> int:
    from fmjax import runs

    config = _config_from_args(args)
    _init_distributed(args)
    import jax

    run_dir = args.out or _default_run_dir()
    if jax.process_count() == 1:  # a quick answer before the data are read (train checks it again)
        try:
            runs.check_run_dir(config, run_dir)
        except ValueError as error:
            raise _UsageError(str(error)) from None
    if _interrupts.requested():
        return _interrupted("interrupted before training started; nothing was written")

    loggers = []
    if args.wandb is not None and jax.process_index() == 0:
        from fmjax.tensorboard import WandbLogger

        try:
            name = os.path.basename(os.path.normpath(run_dir))
            loggers.append(WandbLogger(project=args.wandb, name=name, config=config.to_json()))
        except ModuleNotFoundError as error:
            raise _UsageError(str(error)) from None
    try:
        return _train_and_evaluate(args, config, run_dir, loggers)
    finally:
        for logger in loggers:
            logger.close()


def _add_reflow(sub) -> None:
    from fmjax.sampling import SOLVERS

    p = sub.add_parser(
        "reflow",
        formatter_class=_HELP_FORMAT,
        help=COMMAND_HELP["reflow"],
    )
    p.add_argument("run_dir", help="the teacher: a directory written by fmjax train (or fmjax reflow)")
    p.add_argument("--out", required=True, help="the new run's directory (its pairs go to OUT/pairs.npz)")
    p.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="source points solved into pairs (default 20000; 4096 for images)",
    )
    p.add_argument(
        "--solver", default="dopri5", help=f"solver of the teacher's flow, one of {', '.join(SOLVERS)}"
    )
    p.add_argument("--solver-steps", type=int, default=None, help="fixed solver steps (default: adaptive)")
    p.add_argument(
        "--init",
        default="scratch",
        help="'scratch' (the default: a fresh model, as the reflow experiment trains) or 'teacher' (start "
        "from the teacher's parameters with a fresh optimiser)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="optimiser steps of the new run (default: the teacher's)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: the teacher's")
    p.add_argument(
        "--data-dir", default=None, help="tfds data directory of an image run (for its evaluation)"
    )
    p.add_argument("--devices", type=int, default=None, help="shard the batch over the first N devices")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-eval", action="store_true", help="train only; the same command again evaluates")
    p.set_defaults(pipeline=True, wandb=None)


def _say(message: str) -> None:
    print(f"fmjax: {message}", file=sys.stderr)


def _cmd_reflow(args) -> int:
    from fmjax import runs

    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size)) if v is not None}
    if _interrupts.requested():
        return _interrupted("interrupted before it started; nothing was written")
    try:
        config, initial = runs.prepare_reflow(
            args.run_dir, args.out, pairs=args.pairs, solver=args.solver, solver_steps=args.solver_steps,
            init=args.init, overrides=overrides, log=_say,
        )  # fmt: skip
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise _UsageError(str(error)) from None
    return _train_and_evaluate(args, config, args.out, [], initial_state=initial)


class _BarLoss:
    """A logger of ``runs.train`` that shows the latest logged loss in the progress bar."""

    def __init__(self, bar):
        self.bar = bar

    def scalars(self, values: dict, step: int) -> None:
        if "train/loss" in values:
            self.bar.set_postfix(loss=f"{values['train/loss']:.4g}", refresh=False)


def _train_and_evaluate(args, config, run_dir: str, loggers: list, initial_state=None) -> int:
    import jax
    from tqdm import tqdm

    from fmjax import runs

    for note in config.warnings():
        _warn(_name_flags(note, "train"))
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
    _interrupts.defer = True
    try:
        run = runs.train(
            config,
            run_dir,
            progress=progress,
            log=lambda message: bar.write(_name_flags(message, "train")),
            data_dir=args.data_dir,
            devices=args.devices,
            pipeline=args.pipeline,
            stop=_interrupts.requested,
            tensorboard=args.tensorboard,
            loggers=[*loggers, _BarLoss(bar)],
            initial_state=initial_state,
        )
    except runs.TrainingInterrupted as stopped:
        bar.close()
        print(f"fmjax: {stopped}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError) as error:
        raise _UsageError(str(error)) from None
    finally:
        _interrupts.defer = False
        bar.close()
    train_time = time.perf_counter() - start
    if _interrupts.requested():  # after the last dispatch
        steps = int(run.state.step)
        return _interrupted(f"interrupted after training {steps} steps (saved); rerun to evaluate")
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
                loggers=loggers, log=_say,
            )  # fmt: skip
        except KeyboardInterrupt:
            return _interrupted(in_evaluation)
        if _interrupts.requested():
            return _interrupted(in_evaluation)
    _print_summary(config, summary, run_dir)
    return 0


def _current_summary(run_dir: str, steps: int) -> dict | None:
    """The run's ``summary.json`` if it evaluates its final step, else None (evaluate again)."""
    import json

    from fmjax import runs

    try:
        with open(os.path.join(run_dir, runs.SUMMARY_FILE)) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("step") == steps else None


def _print_summary(config, summary: dict, run_dir: str) -> None:
    if config.dataset is not None:
        print(
            f"samples: {os.path.join(run_dir, 'samples.png')} (NFE = {summary['nfe']}); "
            f"bits/dim = {summary['bits_per_dim']:.3f} +- {summary['bits_per_dim_stderr']:.3f} on "
            f"{summary['n']} test images (Hutchinson, 4 probes; fmjax nll for the exact value)"
        )
        if "fd_euler_steps" in summary:
            few = ", ".join(f"{steps}: {fd:.4f}" for steps, fd in summary["fd_euler_steps"].items())
            images = summary["fd_test_images"]
            print(f"pixel Fréchet distance to {images} test images after few Euler steps ({few})")
        return
    print(
        f"W2 = {summary['w2']:.4f} ({summary['solver']}, NFE = {summary['nfe']}); "
        f"W2 = {summary['w2_euler100']:.4f} (euler, NFE = 100); NPE = {summary['npe']:.3f}; "
        f"target sample floor W2 = {summary['w2_target_floor']:.4f}"
    )
    if "w2_euler_steps" in summary:
        few = ", ".join(f"{steps}: {w2:.4f}" for steps, w2 in summary["w2_euler_steps"].items())
        print(f"W2 after few Euler steps ({few})")
    if config.conditional:
        per_class = ", ".join(f"{w:.3f}" for w in summary["w2_per_class"])
        classes = f"0 .. {config.num_classes - 1}"
        print(f"conditional on the target's labels; W2 per class ({classes}): {per_class}")


def _add_sample(sub) -> None:
    from fmjax.sampling import SOLVERS

    p = sub.add_parser("sample", help=COMMAND_HELP["sample"], formatter_class=_HELP_FORMAT)
    p.add_argument("run_dir", help="a directory written by fmjax train")
    p.add_argument("--n", type=int, default=2000, help="number of samples")
    p.add_argument("--solver", default="dopri5", help=f"one of {', '.join(SOLVERS)}")
    p.add_argument("--steps", type=int, default=None, help="fixed steps (default: adaptive)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--class",
        dest="label",
        type=int,
        default=None,
        help="conditional runs: draw every sample from this class (default: a panel or grid row per class)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        help="conditional runs: classifier-free guidance weight w, v_null + w (v_cond - v_null); 1 is the "
        "conditional model, 0 the unconditional one (needs a run trained with --cond-dropout > 0)",
    )
    p.add_argument(
        "--out", default=None, help="PNG to write (default: RUN_DIR/samples-<solver>-<n>[-class-K][-wW].png)"
    )


def _add_nll(sub) -> None:
    from fmjax.likelihood import DIVERGENCES, PROBES
    from fmjax.sampling import SOLVERS

    p = sub.add_parser("nll", help=COMMAND_HELP["nll"], formatter_class=_HELP_FORMAT)
    p.add_argument("run_dir", help="a directory written by fmjax train")
    p.add_argument("--n", type=int, default=1000, help="number of target points")
    p.add_argument("--divergence", default="exact", help=f"one of {', '.join(DIVERGENCES)}")
    p.add_argument("--num-probes", type=int, default=1, help="Hutchinson probes")
    p.add_argument("--probe", default="rademacher", help=f"Hutchinson probe, one of {', '.join(PROBES)}")
    p.add_argument("--data-dir", default=None, help="tfds data directory of an image run")
    adaptive = ", ".join(name for name, spec in SOLVERS.items() if spec.adaptive)
    p.add_argument("--solver", default="dopri5", help=f"adaptive solver, one of {adaptive}")
    p.add_argument("--seed", type=int, default=0)


def _interrupted(message: str) -> int:
    print(f"fmjax: {message}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _warn(message: str) -> None:
    print(f"fmjax: warning: {message}", file=sys.stderr)


def _load(run_dir: str):
    """The run, from its newest checkpoint that reads back (a warning line for each newer one that
    does not); its evaluated parameters must be finite."""
    from fmjax import runs

    try:
        run = runs.load_run(run_dir, log=_warn)
        runs.check_finite_params(run)
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise _UsageError(str(error)) from None
    return run


def _check_conditional_options(run, args) -> None:
    """--class and --guidance: only for a conditional run, a class it has, and a warning when the guided
    model's unconditional half was never trained."""
    config = run.config
    if not config.conditional:
        if args.label is not None or args.guidance != 1.0:
            raise _UsageError(
                f"--class and --guidance need a conditional run (fmjax train --conditional); "
                f"{args.run_dir!r} is unconditional"
            )
        return
    if args.label is not None and not 0 <= args.label < config.num_classes:
        raise _UsageError(f"--class must be in 0 .. {config.num_classes - 1}; got {args.label}")
    if args.guidance != 1.0 and config.cond_dropout == 0:
        _warn(
            "this run was trained without --cond-dropout: its null class never trained, so --guidance "
            "other than 1 mixes in an untrained field"
        )


def _cmd_sample(args) -> int:
    from fmjax import plotting, runs
    from fmjax.data.toy import sample as toy_sample

    run = _load(args.run_dir)
    _check_conditional_options(run, args)
    _check_sample_options(args)
    config = run.config
    suffix = "" if args.label is None else f"-class-{args.label}"
    suffix += "" if args.guidance == 1.0 else f"-w{args.guidance:g}"
    out = args.out or os.path.join(args.run_dir, f"samples-{args.solver}-{args.n}{suffix}.png")
    if os.path.exists(out):
        raise _UsageError(f"--out {out!r} already exists; choose another file")
    what = f"{args.solver}"
    if config.conditional:
        what += f", guidance {args.guidance:g}" + ("" if args.label is None else f", class {args.label}")
    if config.dataset is not None:
        from fmjax import image_runs

        _say(f"sampling {args.n} images ({what})")
        try:
            images, nfe = image_runs.generate_images(
                run, n=args.n, solver=args.solver, steps=args.steps, seed=args.seed, label=args.label,
                guidance=args.guidance,
            )  # fmt: skip
        except (ValueError, TypeError) as error:
            raise _UsageError(str(error)) from None
        rows = " (a row per class)" if config.conditional and args.label is None else ""
        plotting.image_grid(out, images, title=f"{what}: NFE = {nfe}{rows}")
        print(f"wrote {out}")
        print(f"NFE = {nfe} ({args.n} images, {what})")
        return 0
    import jax
    import numpy as np

    if config.conditional and args.label is None:  # a panel per class
        panels = []
        try:
            for k in range(config.num_classes):
                _say(f"sampling {args.n} points of class {k} ({what})")
                x1, nfe, w2 = runs.generate(
                    run, n=args.n, solver=args.solver, steps=args.steps, seed=args.seed, label=k,
                    guidance=args.guidance,
                )  # fmt: skip
                target = runs.class_points(config.target, jax.random.PRNGKey(args.seed + 1), k, args.n)
                panels.append((x1, target, f"class {k}: W2 = {w2:.3f}, NFE = {nfe}"))
        except (ValueError, TypeError) as error:
            raise _UsageError(str(error)) from None
        plotting.samples_by_class(
            out, panels, title=f"{config.target}, conditional: {args.n} samples per class, {what}"
        )
        print(f"wrote {out}")
        for k, (_, _, title) in enumerate(panels):
            print(f"{title} ({args.n} samples, {what})" if k == 0 else title)
        return 0
    _say(f"sampling {args.n} points ({what})")
    try:
        x1, nfe, w2 = runs.generate(
            run, n=args.n, solver=args.solver, steps=args.steps, seed=args.seed, label=args.label,
            guidance=args.guidance,
        )  # fmt: skip
    except (ValueError, TypeError) as error:
        raise _UsageError(str(error)) from None

    def targets(seed: int) -> np.ndarray:
        key = jax.random.PRNGKey(seed)
        if args.label is not None:
            return runs.class_points(config.target, key, args.label, args.n)
        return np.asarray(toy_sample(config.target, key, args.n))

    from fmjax.metrics import wasserstein2

    target = targets(args.seed + 1)
    floor = wasserstein2(target, targets(args.seed + 2))  # what two target samples of this size are apart
    name = config.target + ("" if args.label is None else f", class {args.label}")
    title = f"{name}: {args.n} samples, {what}, NFE = {nfe}; W2 = {w2:.3f} (target floor {floor:.3f})"
    plotting.samples(out, x1, target, title=title)
    print(f"wrote {out}")
    print(
        f"NFE = {nfe}; W2 = {w2:.4f} ({args.n} samples, {what}); target sample floor W2 = {floor:.4f} "
        f"(two target samples of {args.n})"
    )
    return 0


def _check_nll_options(args) -> None:
    """The options of ``fmjax nll``, checked before anything is announced or computed."""
    from fmjax._checks import check_choice, check_int
    from fmjax.likelihood import DIVERGENCES, PROBES
    from fmjax.sampling import SOLVERS

    check_int("n", args.n, low=2)
    check_choice("solver", args.solver, SOLVERS)
    check_choice("divergence", args.divergence, DIVERGENCES)
    if args.divergence == "hutchinson":
        check_int("num_probes", args.num_probes, low=1)
        check_choice("probe", args.probe, PROBES)


def _check_sample_options(args) -> None:
    """The options of ``fmjax sample``, checked before anything is announced or computed."""
    from fmjax._checks import check_choice, check_int
    from fmjax.sampling import SOLVERS

    check_int("n", args.n, low=1)
    check_choice("solver", args.solver, SOLVERS)
    if args.steps is not None:
        check_int("steps", args.steps, low=1)
    elif not SOLVERS[args.solver].adaptive:
        adaptive = ", ".join(name for name, spec in SOLVERS.items() if spec.adaptive)
        raise ValueError(
            f"--steps is required for solver {args.solver!r}, which is not adaptive ({adaptive} are)"
        )


def _cmd_nll(args) -> int:
    from fmjax import runs
    from fmjax.sampling import SOLVERS

    if args.solver in SOLVERS and not SOLVERS[args.solver].adaptive:
        adaptive = ", ".join(name for name, solver in SOLVERS.items() if solver.adaptive)
        raise _UsageError(f"--solver must be adaptive ({adaptive}); got {args.solver!r}")
    run = _load(args.run_dir)
    _check_nll_options(args)
    what = "images" if run.config.dataset is not None else "target points"
    _say(f"integrating the log-likelihood of {args.n} {what} ({args.divergence} divergence, {args.solver})")
    if run.config.dataset is not None:
        from fmjax import image_runs

        params = run.state.ema_params if run.config.eval_ema else run.state.params
        try:
            result = image_runs.image_bits_per_dim(
                run.config, run.apply_fn, params, n=args.n, divergence=args.divergence,
                num_probes=args.num_probes, probe=args.probe, data_dir=args.data_dir, seed=args.seed,
            )  # fmt: skip
        except (ValueError, TypeError) as error:
            raise _UsageError(str(error)) from None
        message = (
            f"bits/dim = {result['bits_per_dim']:.4f} +- {result['bits_per_dim_stderr']:.4f} on "
            f"{result['n']} {run.config.dataset} test images; {result['divergence']} divergence, "
            "uniform dequantisation"
        )
        return _report_nll(args.run_dir, result, message)
    try:
        result = runs.negative_log_likelihood(
            run,
            n=args.n,
            divergence=args.divergence,
            num_probes=args.num_probes,
            probe=args.probe,
            solver=args.solver,
            seed=args.seed,
        )
    except (ValueError, TypeError) as error:
        raise _UsageError(str(error)) from None
    message = (
        f"NLL = {result['nll']:.4f} +- {result['nll_stderr']:.4f} nats "
        f"({result['bits_per_dim']:.4f} bits/dim) on {result['n']} target points; "
        f"{result['divergence']} divergence, NFE = {result['nfe']}"
    )
    return _report_nll(args.run_dir, result, message)


def _report_nll(run_dir: str, result: dict, message: str) -> int:
    """Append the result to the run's metrics (nothing is overwritten; safe beside a training run) and
    print it."""
    from fmjax import runs

    runs.append_record(os.path.join(run_dir, runs.METRICS_FILE), {"event": "nll", **result})
    print(message)
    return 0


COMMANDS = {"train": _cmd_train, "reflow": _cmd_reflow, "sample": _cmd_sample, "nll": _cmd_nll}


def _command_in(argv: list[str]) -> str | None:
    """The command named in ``argv`` (its first word that is not an option), if any."""
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def _drop_closed_loop_noise(unraisable: Any) -> None:
    """Drop the ``Event loop is closed`` errors left behind by an aborted checkpoint write.

    When a write fails (a full disk), orbax closes its event loop while tensorstore still holds
    callbacks into it; each of those then raises an unraisable RuntimeError that Python would print
    as a bare traceback. The CLI reports the failure itself in one line; anything else still goes
    to Python's default hook.
    """
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fmjax`` console script; returns the exit status."""
    # orbax reports a failed background save through absl logging and asyncio with tracebacks;
    # the CLI says it in one line
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    sys.unraisablehook = _drop_closed_loop_noise
    parser = _Parser(prog="fmjax", description="Flow matching in JAX.")
    parser.add_argument(
        "--version", action=_Version, help="print the versions and the OT solver in use, and exit"
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    # only the chosen command's options are built (they import jax and the rest): --help is quick
    chosen = _command_in(sys.argv[1:] if argv is None else argv)
    builders = {"train": _add_train, "reflow": _add_reflow, "sample": _add_sample, "nll": _add_nll}
    for name, build in builders.items():
        if name == chosen:
            build(sub)
        else:
            sub.add_parser(name, help=COMMAND_HELP[name])
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        if _interrupts.requested():  # while the console script loaded
            return _interrupted("interrupted before it started; nothing was written")
        _interrupts.count, _interrupts.defer = 0, False
        previous = signal.signal(signal.SIGINT, _interrupts)
    command = None
    try:
        args = parser.parse_args(argv)
        command = args.command
        if args.command is None:
            raise _UsageError(f"a command is required: one of {', '.join(COMMANDS)}")
        from fmjax._checks import check_choice

        return COMMANDS[check_choice("command", args.command, COMMANDS)](args)
    except (_UsageError, FloatingPointError, OSError, ValueError, TypeError) as error:
        # OSError: missing paths, a locked run directory, a full disk while writing (the checkpoints already
        # written stay); ValueError/TypeError: bad values the library found
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"fmjax: error: {_name_flags(message, command)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return _interrupted("interrupted; nothing already written was changed")
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())

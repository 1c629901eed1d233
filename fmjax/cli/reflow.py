"""``fmjax reflow``: solve a trained run's flow for (x0, x1) pairs and train a new run on them."""

from __future__ import annotations

from fmjax import runs
from fmjax.cli.common import HelpFormat, interrupted, say
from fmjax.cli.train import add_run_options, train_and_evaluate
from fmjax.sampling import SOLVERS

ALIASES = {"run_dir": "--out"}  # the new run's directory (the teacher is the positional RUN_DIR)


def add_parser(sub, help_text: str) -> None:
    """Add the command's parser to ``sub``; ``help_text`` is its line in ``fmjax.cli.main.COMMANDS``."""
    p = sub.add_parser("reflow", formatter_class=HelpFormat, help=help_text)
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
    add_run_options(p)
    p.set_defaults(pipeline=True, wandb=None)


def run(args, interrupts) -> int:
    """``fmjax reflow``."""
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size)) if v is not None}
    if interrupts.requested():
        return interrupted("interrupted before it started; nothing was written")
    config, initial = runs.prepare_reflow(
        args.run_dir, args.out, pairs=args.pairs, solver=args.solver, solver_steps=args.solver_steps,
        init=args.init, overrides=overrides, log=say,
    )  # fmt: skip
    return train_and_evaluate(args, interrupts, config, args.out, [], initial_state=initial)

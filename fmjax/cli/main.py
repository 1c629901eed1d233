"""The ``fmjax`` command: its parser, its subcommands and how it fails.

    fmjax train [--source 8gaussians] [--target moons] [--path linear] [--coupling independent] ...

Errors in the arguments or the data print one line on stderr, naming the option as typed (``--sigma``,
``--out``), and exit with status 2. Ctrl-C during ``fmjax train`` stops at the next dispatch, saves the
step if it can, prints one line and exits with status 130; the same command resumes the run (a second
Ctrl-C exits at once, keeping the checkpoints already written).

Only the chosen subcommand's module builds its options (they import jax and the rest), so ``fmjax
--help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from typing import Any

from fmjax.cli.common import EXIT_USAGE, Interrupts, Parser, UsageError, interrupted, one_line, parser_naming

# subcommand -> (its module, its one-line help)
COMMANDS = {
    "train": ("fmjax.cli.train", "train a flow (2D toy data, or images with --dataset) and evaluate it"),
    "reflow": (
        "fmjax.cli.reflow",
        "rectified flow's reflow: solve a run's flow for (x0, x1) pairs, train a new run on them",
    ),
    "sample": ("fmjax.cli.sample", "sample a trained run: a PNG of the samples, NFE and W2"),
    "nll": ("fmjax.cli.nll", "negative log-likelihood of fresh target points under a trained run"),
}


class _Version(argparse.Action):
    """``fmjax --version``: fmjax's and jax's versions and the exact coupling's host solver."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import version

        from fmjax._assignment import SOLVER_NAME

        print(f"fmjax {version('fmjax')} (jax {version('jax')}; exact coupling solver: {SOLVER_NAME})")
        parser.exit()


def _command_in(argv: list[str]) -> str | None:
    """The command named in ``argv`` (its first word that is not an option), if any."""
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def _drop_reported_unraisables(unraisable: Any) -> None:
    """Drop the unraisable errors the CLI reports itself, in one line.

    ``Event loop is closed``: when a checkpoint write fails (a full disk), orbax closes its event loop
    while tensorstore still holds callbacks into it; each of those then raises an unraisable
    RuntimeError that Python would print as a bare traceback. KeyboardInterrupt: a Ctrl-C that lands
    in a garbage-collection callback (jax's) is swallowed there; ``Interrupts`` counted it and the
    command reports the interruption. Anything else still goes to Python's default hook.
    """
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return
    if isinstance(error, KeyboardInterrupt):
        return
    sys.__unraisablehook__(unraisable)


def _parser(chosen: str | None) -> tuple[Parser, dict[str, Parser]]:
    """The command's parser, and its subcommands' parsers (only the chosen one has its options)."""
    parser = Parser(prog="fmjax", description="Flow matching in JAX.")
    parser.add_argument(
        "--version", action=_Version, help="print the versions and the OT solver in use, and exit"
    )
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    for name, (module, help_text) in COMMANDS.items():
        if name == chosen:
            importlib.import_module(module).add_parser(sub, help_text)
        else:
            sub.add_parser(name, help=help_text)
    return parser, sub.choices


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fmjax`` console script; returns the exit status."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    interrupts = Interrupts()
    if in_main_thread:  # first, so that a Ctrl-C while the rest loads is answered in one line
        previous = signal.signal(signal.SIGINT, interrupts)
    # orbax reports a failed background save through absl logging and asyncio with tracebacks;
    # the CLI says it in one line
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    sys.unraisablehook = _drop_reported_unraisables
    naming, started = None, False
    try:
        parser, commands = _parser(_command_in(sys.argv[1:] if argv is None else argv))
        args = parser.parse_args(argv)
        if args.command is None:
            raise UsageError(f"a command is required: one of {', '.join(COMMANDS)}")
        module = importlib.import_module(COMMANDS[args.command][0])
        # errors name the library's arguments by the options that set them
        naming = args.naming = parser_naming(commands[args.command], module.ALIASES)
        if interrupts.requested():  # while the command's modules loaded (swallowed by a gc callback)
            return interrupted("interrupted before it started; nothing was written")
        started = True
        return module.run(args, interrupts)
    except (UsageError, FloatingPointError, OSError, ValueError, TypeError) as error:
        # OSError: missing paths, a locked run directory, a full disk while writing (the checkpoints already
        # written stay); ValueError/TypeError: bad values the library found
        print(f"fmjax: error: {one_line(error, naming or (lambda name: name))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if not started:  # while the command's modules loaded
            return interrupted("interrupted before it started; nothing was written")
        return interrupted("interrupted; nothing already written was changed")
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())

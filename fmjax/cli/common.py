"""What every ``fmjax`` command shares: one-line errors, Ctrl-C handling, messages, loading a run."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from fmjax._errors import message_of

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A bad command line or input: printed as one line, exit status 2."""


class Interrupts:
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


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so every error is one line."""

    def error(self, message: str):
        raise UsageError(message)


class HelpFormat(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default where argparse holds it (``fmjax train``'s options, whose
    defaults depend on the kind of run, default to None and say their defaults themselves)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def parser_naming(parser: argparse.ArgumentParser, aliases: dict[str, str]) -> Callable[[str], str]:
    """How a command's errors name the library's arguments (``fmjax._errors.ArgumentError.named``): an
    argument is named by the option that sets it (its ``dest``: ``batch_size`` -> ``--batch-size``), by
    ``aliases`` where the library spells it otherwise (``run_dir`` -> ``--out``), else as it is."""
    flags = {
        action.dest: max(action.option_strings, key=len)
        for action in parser._actions
        if action.option_strings
    }
    flags.update(aliases)
    return lambda name: flags.get(name, name)


def one_line(error: BaseException, naming: Callable[[str], str]) -> str:
    """The first line of ``error``'s message, naming the command's options."""
    message = message_of(error, naming)
    return message.splitlines()[0] if message else type(error).__name__


def say(message: str) -> None:
    print(f"fmjax: {message}", file=sys.stderr)


def warn(message: str) -> None:
    print(f"fmjax: warning: {message}", file=sys.stderr)


def interrupted(message: str) -> int:
    print(f"fmjax: {message}", file=sys.stderr)
    return EXIT_INTERRUPTED


def load(run_dir: str):
    """The run, from its newest checkpoint that reads back (a warning line for each newer one that
    does not); its evaluated parameters must be finite."""
    from fmjax import runs

    run = runs.load_run(run_dir, log=warn)
    runs.check_finite_params(run)
    return run

"""The ``fmjax`` command (``fmjax.cli.main.main``): one module per subcommand (``train``, ``reflow``,
``sample``, ``nll``), ``fmjax train``'s options generated from ``RunConfig`` (``options``), and what the
commands share (``common``). Importing it loads the standard library only."""

from fmjax.cli.main import main

__all__ = ["main"]

"""Command-line pieces shared by the experiments."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def add_setting_options(parser: argparse.ArgumentParser, full: dict[str, Any], quick: dict[str, Any]) -> None:
    """An option ``--name`` (default None: the setting's value) for every number of the ``full`` setting,
    its help naming the full and the quick values."""
    for name, value in full.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None,
                                help=f"default {value} (quick: {quick[name]})")  # fmt: skip


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines log (none when the file does not exist yet); blank lines skipped."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

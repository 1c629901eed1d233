"""MkDocs hooks of fmjax's site: pages whose text comes from the code at build time.

- the notebooks of ``notebooks/`` join the site as they are stored (mkdocs-jupyter renders them, unexecuted);
- ``<!-- fmjax-cli-help -->`` in a page becomes the help text of ``fmjax`` and of each of its subcommands;
- ``<!-- fmjax-exports -->`` becomes the table of the names ``import fmjax`` offers, each linked to its
  module's reference page (read from ``fmjax._EXPORTS``, so the table cannot fall behind the package).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Run in a child process, so the build needs fmjax installed (it is, in the docs extra) but does not load
# jax into mkdocs' own process.
_HELP_SCRIPT = r"""
import contextlib, io, json, re, sys
from fmjax.cli import main

def help_text(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main([*argv, "--help"])
    return out.getvalue()

top = help_text([])
usage = re.search(r"\{([\w,-]+)\}", top)
commands = usage.group(1).split(",") if usage else []
print(json.dumps({"": top, **{command: help_text([command]) for command in commands}}))
"""

_EXPORTS_SCRIPT = "import json, fmjax; print(json.dumps(fmjax._EXPORTS))"


def _run(script: str) -> str:
    environment = {**os.environ, "COLUMNS": "80", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, cwd=ROOT, timeout=300
    )
    if result.returncode != 0:
        raise RuntimeError(f"fmjax docs hook: the child process failed:\n{result.stderr}")
    return result.stdout


@event_priority(100)  # before mkdocs-jupyter turns the .ipynb files into pages
def on_files(files, config):
    """Add the notebooks of ``notebooks/`` as ``notebooks/<name>.ipynb`` pages."""
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        # a plain File read from the repository root (not File.generated: mkdocs-jupyter's wrapper of a
        # file loses a generated file's source path)
        files.append(
            File(
                f"notebooks/{path.name}",
                src_dir=str(ROOT),
                dest_dir=config.site_dir,
                use_directory_urls=config.use_directory_urls,
            )
        )
    return files


_cache: dict[str, str] = {}


def _cli_markdown() -> str:
    if "cli" not in _cache:
        helps = json.loads(_run(_HELP_SCRIPT))
        sections = []
        for command, text in helps.items():
            title = f"fmjax {command}".strip()
            sections.append(f"## `{title}`\n\n```text\n{text.rstrip()}\n```\n")
        _cache["cli"] = "\n".join(sections)
    return _cache["cli"]


def _exports_markdown() -> str:
    if "exports" not in _cache:
        exports = json.loads(_run(_EXPORTS_SCRIPT))
        rows = ["| name | defined in |", "|---|---|"]
        for name, module in sorted(exports.items(), key=lambda item: (item[1], item[0].lower())):
            rows.append(f"| [`fmjax.{name}`][{module}.{name}] | [`{module}`][{module}] |")
        _cache["exports"] = "\n".join(rows) + "\n"
    return _cache["exports"]


_MARKERS = {"<!-- fmjax-cli-help -->": _cli_markdown, "<!-- fmjax-exports -->": _exports_markdown}


def on_page_markdown(markdown, page, config, files):
    """Replace the markers above with the text the code gives now."""
    for marker, make in _MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown


def on_pre_build(config):
    """Each build (a ``mkdocs serve`` rebuild too) reads the CLI and the exports again."""
    _cache.clear()

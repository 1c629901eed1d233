"""The documentation site stays complete and true: every public module has a reference page, the nav lists
every page, the install commands are the README's, and the getting-started code runs.

The site itself is built by CI (`mkdocs build --strict`, see .ci/run); these checks need no docs packages.
"""

from __future__ import annotations

import importlib.util
import pathlib
import pkgutil
import re
import sys
import types

import yaml

import fmjax

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIG = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
# the CLI, documented by its help text (docs/cli.md), and fmjax.image_runs, the former name of
# fmjax.runs.tasks.images, documented there
NOT_REFERENCED = ("fmjax.cli", "fmjax.image_runs")


def _public_modules() -> set[str]:
    names = set()
    for info in pkgutil.walk_packages(fmjax.__path__, "fmjax."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.add(info.name)
    return {name for name in names if not name.startswith(NOT_REFERENCED)}


def _referenced() -> set[str]:
    """The ``::: module`` blocks of the API pages."""
    found = set()
    for page in (DOCS / "api").glob("*.md"):
        found.update(re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), flags=re.M))
    return found


def _nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages.extend(_nav_pages(value) if isinstance(value, list) else [value])
    return pages


def test_every_public_module_has_a_reference_page():
    missing = _public_modules() - _referenced()
    assert not missing, f"add `::: NAME` to a page under docs/api/ for: {sorted(missing)}"


def test_reference_blocks_name_real_modules():
    assert _referenced() <= _public_modules() | {"fmjax"}
    assert set(fmjax._EXPORTS.values()) <= _referenced()


def test_nav_lists_every_page_and_only_pages_that_exist():
    nav = _nav_pages(CONFIG["nav"])
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "_hooks" not in p.parts}
    notebooks = {f"notebooks/{p.name}" for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert len(nav) == len(set(nav))
    assert set(nav) == pages | notebooks


def test_index_gives_the_readme_install_commands():
    readme_commands = [
        line for line in (ROOT / "README.md").read_text().splitlines()[:10] if "python3 -m venv" in line
    ]
    assert len(readme_commands) == 2
    index = (DOCS / "index.md").read_text().splitlines()
    for command in readme_commands:
        assert command in index


def test_getting_started_runs():
    """Every python block of the page, in order, in one namespace (as the page says they run)."""
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "getting-started.md").read_text(), flags=re.S)
    assert len(blocks) >= 6
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/getting-started.md", "exec"), namespace)
    assert int(namespace["state"].step) == 300
    assert namespace["euler"].trajectory.xs.shape == (21, 1000, 2)
    # the page says 300 steps bring the samples much closer to the moons than the source was
    target = namespace["target"]
    assert fmjax.wasserstein2(namespace["adaptive"].x1, target) < 0.5 * fmjax.wasserstein2(
        namespace["source"], target
    )


def _extension(monkeypatch):
    """docs/_hooks/griffe_fmjax.py; its text functions need no griffe, so a stand-in serves where the docs
    extra is not installed (CI runs the tests before it installs the docs extra and builds the site)."""
    try:
        import griffe  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "griffe", types.SimpleNamespace(Extension=object))
    spec = importlib.util.spec_from_file_location("griffe_fmjax", DOCS / "_hooks" / "griffe_fmjax.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grouped_parameters_are_split(monkeypatch):
    lines = [
        "Integrate.",
        "",
        "Args:",
        "  x0: start.",
        "  rtol, atol: tolerances (> 0),",
        "    of the controller.",
        "  t0, t1 (float): interval.",
        "",
        "Returns:",
        "  a, b: not a parameter section.",
    ]
    split = [
        *lines[:4],
        "  rtol: tolerances (> 0),",
        "    of the controller.",
        "  atol: tolerances (> 0),",
        "    of the controller.",
        "  t0 (float): interval.",
        "  t1 (float): interval.",
        *lines[7:],
    ]
    assert _extension(monkeypatch).split_grouped_names("\n".join(lines)) == "\n".join(split)


def test_doctests_are_fenced(monkeypatch):
    lines = [
        "Add.",
        "",
        ">>> 1 + 1",
        "2",
        "",
        "Text.",
        "```python",
        ">>> fenced already",
        "```",
        "  >>> indented",
    ]
    fenced = [*lines[:2], "```pycon", *lines[2:4], "```", *lines[4:]]
    assert _extension(monkeypatch).fence_doctests("\n".join(lines)) == "\n".join(fenced)

"""fmjax as a package: its public names are documented, names and submodules resolve lazily, and the
import graph keeps its layers.

The import graph is read from the source (every ``import`` statement, also those inside functions), so
an import cycle or an upward import fails here before it can fail at run time in one order of imports.
"""

from __future__ import annotations

import ast
import importlib
import json
import pathlib
import subprocess
import sys
import typing

import pytest

import fmjax

PACKAGE = pathlib.Path(fmjax.__file__).parent

# The layers, from the bottom: a module may import its own layer and those below, never one above.
# Maths (paths, couplings, losses, training, sampling, likelihoods, metrics) never imports models, runs
# or the CLI; runs never import the CLI; nothing imports the CLI.
LAYERS = [
    ("maths", ("fmjax._", "fmjax.manifolds", "fmjax.paths", "fmjax.couplings", "fmjax.losses",
               "fmjax.training", "fmjax.sampling", "fmjax.sde", "fmjax.likelihood", "fmjax.metrics",
               "fmjax.guidance", "fmjax.reflow")),
    ("support", ("fmjax.checkpoint", "fmjax.data", "fmjax.models", "fmjax.plotting", "fmjax.tensorboard",
                 "fmjax.digits_classifier")),
    ("runs", ("fmjax.runs", "fmjax.image_runs")),
    ("cli", ("fmjax.cli",)),
]  # fmt: skip


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _target(name: str) -> str | None:
    """The fmjax module that importing ``name`` (a module or a name inside one) executes, if any."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """The fmjax modules ``module`` imports, anywhere in its source."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # ``from P import x`` runs P (its __init__ too) and, if x is a submodule, P.x
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            if name == "fmjax" or name.startswith("fmjax."):
                target = _target(name)
                if target is not None and target != module:
                    found.add(target)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _layer(module: str) -> int:
    if module == "fmjax":  # the package imports its names lazily, by name: nothing statically
        return 0
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p if p.endswith("_") else p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_package.py: add it to LAYERS")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_graph_reader_sees_imports_inside_functions_and_packages():
    assert "fmjax.runs.config" in GRAPH["fmjax.runs.loop"]
    assert "fmjax.runs.pipeline" in GRAPH["fmjax.runs.loop"]  # from fmjax.runs import pipeline
    assert "fmjax.runs.tasks.images" in GRAPH["fmjax.cli.sample"]  # imported inside a function


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_inside_fmjax():
    assert _cycles(GRAPH) == []


def test_no_module_imports_a_layer_above_its_own():
    upward = [
        f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
        for module, targets in sorted(GRAPH.items())
        for target in sorted(targets)
        if _layer(target) > _layer(module)
    ]
    assert upward == []


# every submodule the package docstring and the API docs name
DOCUMENTED = ["paths", "manifolds", "couplings", "losses", "training", "sampling", "sde", "guidance",
              "likelihood", "metrics", "reflow", "checkpoint", "data", "models", "runs", "cli", "plotting",
              "tensorboard", "digits_classifier"]  # fmt: skip


def test_submodules_resolve_after_import_fmjax():
    script = (
        "import json, fmjax; "
        f"print(json.dumps({{name: getattr(fmjax, name).__name__ for name in {DOCUMENTED!r}}}))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == {name: f"fmjax.{name}" for name in DOCUMENTED}


def test_import_fmjax_and_the_command_s_help_load_no_jax():
    script = (
        "import sys, contextlib, io, fmjax; from fmjax.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('jax', 'numpy', 'flax') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fmjax.nope  # noqa: B018


def _declares_all(path: pathlib.Path) -> bool:
    tree = ast.parse(path.read_text())
    targets = [target for node in tree.body if isinstance(node, ast.Assign) for target in node.targets]
    return any(getattr(target, "id", None) == "__all__" for target in targets)


# every public module (no component starting with "_") that declares __all__, read from the source
PUBLIC_MODULES = sorted(
    name for name, path in MODULES.items()
    if not any(part.startswith("_") for part in name.split(".")) and _declares_all(path)
)  # fmt: skip


def test_the_public_modules_are_found():
    for name in ["fmjax", "fmjax.paths", "fmjax.couplings", "fmjax.losses", "fmjax.runs", "fmjax.cli",
                 "fmjax.runs.tasks.images", "fmjax.data.pairs", "fmjax.image_runs"]:  # fmt: skip
        assert name in PUBLIC_MODULES


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_every_public_name_exists_and_has_a_docstring(name):
    module = importlib.import_module(name)
    assert module.__doc__, f"{name} has no docstring"
    for public in module.__all__:
        obj = getattr(module, public)
        if typing.get_origin(obj) is not None:
            continue  # a type alias (ApplyFn = Callable[..., Array]) has no docstring of its own
        if callable(obj) or isinstance(obj, type):
            assert obj.__doc__, f"{name}.{public} has no docstring"


def test_the_design_s_entry_points_are_top_level():
    entry_points = [
        "sample", "log_likelihood", "bits_per_dim", "cfm_loss", "make_train_step", "TrainState",
        "as_velocity", "guided_velocity",
        "independent", "exact", "sinkhorn", "schrodinger_bridge", "CondOT", "Linear", "SchrodingerBridge",
        "VariancePreserving", "VPDiffusion", "wasserstein2",
        "sample_sde", "sf2m_loss", "sf2m_drift", "sf2m_velocity", "reflow_pairs",
    ]  # fmt: skip
    for public in entry_points:
        assert public in fmjax.__all__ and hasattr(fmjax, public)

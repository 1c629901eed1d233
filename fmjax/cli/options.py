"""``fmjax train``'s options, generated from ``RunConfig``'s fields: flag, type, help, choices and the
default a run of each kind uses (``RunConfig.defaults``). Adding a field adds its flag."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from fmjax.data.earth import DATASETS as EARTH_DATASETS
from fmjax.data.tfds_sources import DATASETS
from fmjax.runs.config import IMAGES, SPHERE, TOY, RunConfig

__all__ = ["add_config_options", "config_from_args", "foreign_flags", "runs_of", "int_list"]

_KIND_WORDS = {TOY: "2D runs", IMAGES: "image runs", SPHERE: "sphere runs"}


def int_list(text: str) -> tuple[int, ...]:
    """``"1,2,2,2"`` -> (1, 2, 2, 2); ``""`` -> () (argparse reports a ValueError as an invalid value)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        message = f"must be comma-separated integers, e.g. 1,2,2,2; got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value else "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _default_text(name: str, kinds: tuple[str, ...]) -> str:
    """The default of field ``name`` for the runs it applies to, as the help says it."""
    toy = RunConfig.defaults()[name]
    images = {dataset: RunConfig.defaults(dataset)[name] for dataset in DATASETS}
    sphere = RunConfig.defaults(EARTH_DATASETS[0])[name]  # the same for every Earth dataset
    same_images = len({repr(v) for v in images.values()}) == 1
    image_text = (
        _shown(next(iter(images.values())))
        if same_images
        else "; ".join(f"{dataset} {_shown(value)}" for dataset, value in images.items())
    )
    sphere_text = (
        f", {_shown(sphere)} for sphere runs" if SPHERE in kinds and repr(sphere) != repr(toy) else ""
    )
    if IMAGES not in kinds:
        return f"default {_shown(toy)}{sphere_text}"
    if kinds == (IMAGES,):
        return f"default {image_text}" if same_images else f"default: {image_text}"
    if same_images and repr(toy) == repr(next(iter(images.values()))):
        return f"default {_shown(toy)}{sphere_text}"
    return f"default {_shown(toy)} for 2D runs, {image_text} for image runs{sphere_text}"


def _help(field: dataclasses.Field) -> str:
    metadata = field.metadata
    kinds = metadata["kinds"]
    text = metadata["help"]
    if len(kinds) < len(_KIND_WORDS):
        text = f"{' and '.join(_KIND_WORDS[kind] for kind in kinds)}: {text}"
    if metadata["choices"] is not None:
        text += f"; one of {', '.join(metadata['choices'])}"
    if metadata["shown_default"] is not None:
        text += f" (default {metadata['shown_default']})"
    elif "bool" not in str(field.type):
        text += f" ({_default_text(field.name, kinds)})"
    return text


def _config_fields() -> list[dataclasses.Field]:
    return [field for field in dataclasses.fields(RunConfig) if field.metadata.get("cli", True)]


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """A flag for every ``RunConfig`` field (default None: the run's kind decides, see the help)."""
    for field in _config_fields():
        flag, kind = RunConfig.flag(field.name), str(field.type)
        common = {"dest": field.name, "default": None, "help": _help(field)}
        if "bool" in kind:
            # a flag turns the field from its default to the other value
            parser.add_argument(flag, action="store_const", const=not field.default, **common)
        elif "tuple" in kind:
            parser.add_argument(flag, type=int_list, metavar="N,N,...", **common)
        elif "int" in kind:
            parser.add_argument(flag, type=int, **common)
        elif "float" in kind:
            parser.add_argument(flag, type=float, **common)
        else:
            parser.add_argument(flag, metavar=field.metadata["metavar"] or field.name.upper(), **common)


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``RunConfig`` fields given on the command line (the others take their kind's defaults)."""
    given = {field.name: getattr(args, field.name) for field in _config_fields()}
    return {name: value for name, value in given.items() if value is not None}


def foreign_flags(given: dict[str, Any]) -> list[str]:
    """The flags among ``given`` fields that an image or sphere run has no use for (an image run: the 2D
    runs' MLP and samplers; a sphere run: the samplers); an image field in a 2D or sphere run is refused
    by ``RunConfig`` itself."""
    dataset = given.get("dataset")
    if dataset is None:
        return []
    kind = SPHERE if dataset in EARTH_DATASETS else IMAGES
    fields = {field.name: field for field in _config_fields()}
    return [RunConfig.flag(name) for name in given if kind not in fields[name].metadata["kinds"]]


def runs_of(flag: str) -> str:
    """The runs a flag applies to, in words: ``"2D runs"``, ``"image runs"``, ``"2D and sphere runs"``."""
    field = next(f for f in _config_fields() if RunConfig.flag(f.name) == flag)
    return " and ".join(_KIND_WORDS[kind] for kind in field.metadata["kinds"])

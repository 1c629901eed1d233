"""What ``RunConfig``'s fields are made of: ``option(...)``, a dataclass field that carries its CLI help,
the kinds of run it applies to and its choices; the named values the fields' defaults and checks use (the
kinds of run, the paths a run takes by name, the image runs' UNet defaults, ...); and the rules between
options that no single field can check (``check_path``, ``check_conditions``, ``check_sigma``, which
``RunConfig._check`` calls with the configuration being built).

``fmjax.runs.config`` re-exports these names, so ``from fmjax.runs.config import KINDS`` keeps working;
``fmjax.cli`` reads the metadata ``option`` leaves on each field to build ``fmjax train``'s flags.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fmjax._checks import ArgumentError, check_choice, check_real
from fmjax.data.earth import DATASETS as EARTH_DATASETS
from fmjax.data.toy import TOY_NUM_CLASSES
from fmjax.paths import PATHS, SIGMA_FIELDS

__all__ = [
    "option",
    "KINDS",
    "PATH_NAMES",
    "GEODESIC",
    "IMAGE_DEFAULTS",
    "DATASET_CHANNEL_MULTS",
    "DATASET_NUM_CLASSES",
    "DEFAULT_SIGMA",
    "DEFAULT_SIGMA_IMAGES",
]

TOY, IMAGES, SPHERE = "toy", "images", "sphere"
KINDS = (TOY, IMAGES, SPHERE)
"""The kinds of run: 2D toy data (an MLP between two samplers), images (a UNet from noise) and points on
the sphere S^2 (a tangent MLP from the uniform distribution to an Earth dataset, ``fmjax.data.earth``)."""
GEODESIC = "geodesic"
PATH_NAMES = (*PATHS, GEODESIC)
"""The paths a run takes by name: ``PATHS`` (2D and image runs) and the sphere's geodesic (sphere runs)."""

DEFAULT_SIGMA = 0.1
DEFAULT_SIGMA_IMAGES = 1e-4
NONFINITE_POLICIES = ("stop", "skip")
PRECISIONS = ("float32", "bf16")
DATASET_NUM_CLASSES = {"digits": 10, "mnist": 10, "cifar10": 10}
LABEL_AWARE_COUPLINGS = ("exact", "sinkhorn", "sb")
DATASET_CHANNEL_MULTS = {"digits": (1, 2), "mnist": (1, 2, 2), "cifar10": (1, 2, 2, 2)}
# The UNet and augmentation fields of an image run, with their defaults (None in a 2D run's config).
# num_head_channels None: heads of channels / num_heads.
IMAGE_DEFAULTS: dict[str, Any] = {
    "channel_mults": None,  # the dataset's: DATASET_CHANNEL_MULTS
    "num_res_blocks": 1,
    "groups": 8,
    "attention_resolutions": (),
    "num_heads": 4,
    "num_head_channels": None,
    "dropout": 0.0,
    "hflip": False,
}
TOY_FIELDS = ("source", "target", "depth", "activation")
MLP_FIELDS = ("depth", "activation")  # 2D and sphere runs train an MLP
EULER_STEPS = (1, 2, 4, 8)
"""The few Euler steps every evaluation measures its distance to the target after."""


def option(
    default: Any,
    help: str,
    *,
    kinds: tuple[str, ...] = KINDS,
    choices: Mapping[str, Any] | tuple[str, ...] | None = None,
    flag: str | None = None,
    metavar: str | None = None,
    cli: bool = True,
    shown_default: str | None = None,
) -> Any:
    """A ``RunConfig`` field with what the CLI needs to offer it.

    Args:
      default: the field's default (None: resolved per kind of run by ``RunConfig.defaults``).
      help: one line for ``fmjax train --help`` (the default is added to it).
      kinds: the kinds of run it applies to (``KINDS``); a flag of another kind is refused.
      choices: the allowed names (a registry's keys), listed in the help.
      flag: the flag when it is not ``--field-name`` (``--no-eval-ema`` for ``eval_ema``).
      metavar, cli: the flag's metavar; ``cli=False`` for fields another command sets (``pairs``).
      shown_default: what the help says of the default where its value alone says too little.
    """
    metadata = {
        "help": help,
        "kinds": kinds,
        "choices": choices,
        "flag": flag,
        "metavar": metavar,
        "cli": cli,
        "shown_default": shown_default,
    }
    return dataclasses.field(default=default, metadata=metadata)


def check_path(config: Any) -> None:
    """A sphere run takes the geodesic path; the other runs one of ``PATHS``."""
    if config.kind == SPHERE:
        if config.path != GEODESIC:
            raise ArgumentError(
                lambda n: (
                    f"{n('path')} must be {GEODESIC!r} for a sphere run (dataset {config.dataset!r}: "
                    f"points on S^2); got {config.path!r}"
                )
            )
    elif config.path == GEODESIC:
        raise ArgumentError(
            lambda n: (
                f"{n('path')} {GEODESIC!r} is for sphere runs ({n('dataset')} one of "
                f"{', '.join(EARTH_DATASETS)}); paths of this run: {', '.join(PATHS)}"
            )
        )
    else:
        check_choice("path", config.path, PATHS)


def check_conditions(config: Any) -> None:
    """The options of conditional and reflow runs, which exclude each other in places."""
    if config.conditional and config.kind == SPHERE:
        raise ArgumentError(
            lambda n: (
                f"{n('conditional')} needs class labels; the Earth datasets ({config.dataset!r}) have none"
            )
        )
    if config.conditional and config.dataset is None and config.target not in TOY_NUM_CLASSES:
        labelled = ", ".join(TOY_NUM_CLASSES)
        raise ArgumentError(
            lambda n: (
                f"{n('conditional')} needs a target with class labels ({labelled}) or a dataset; "
                f"got {n('target')} {config.target!r}"
            )
        )
    if config.cond_dropout > 0 and not config.conditional:
        raise ArgumentError(
            lambda n: (
                f"{n('cond_dropout')} needs conditional=True; got {n('cond_dropout')} {config.cond_dropout}"
            )
        )
    if config.by_label and not config.conditional:
        raise ArgumentError(
            lambda n: f"{n('by_label')} needs conditional=True (the labels come with the target points)"
        )
    if config.pairs is not None:
        if not isinstance(config.pairs, str) or not config.pairs:
            raise TypeError(f"pairs must be the path of a pairs file (str); got {config.pairs!r}")
        if config.coupling != "independent":
            raise ArgumentError(
                lambda n: (
                    "pairs are trained on as stored: "
                    f"{n('coupling')} must be 'independent' (it keeps the pairing); got {config.coupling!r}"
                )
            )
        if config.conditional:
            raise ValueError("pairs carry no labels: a reflow run cannot be conditional")
    if config.by_label and config.coupling not in LABEL_AWARE_COUPLINGS:
        aware = ", ".join(LABEL_AWARE_COUPLINGS)
        raise ArgumentError(
            lambda n: (
                f"{n('by_label')} needs a coupling that pairs by label ({aware}); "
                f"got {n('coupling')} {config.coupling!r}"
            )
        )


def check_sigma(config: Any) -> None:
    """``sigma`` is a noise level >= 0 of a path that has one (an unset one takes the default)."""
    if config.sigma is not None:
        if config.path not in SIGMA_FIELDS:
            with_sigma = ", ".join(SIGMA_FIELDS)
            raise ArgumentError(
                lambda n: (
                    f"{n('sigma')} is not a parameter of {n('path')} {config.path!r}; "
                    f"paths with one: {with_sigma}"
                )
            )
        check_real("sigma", config.sigma, low=0.0)
    sigma = (
        config.sigma
        if config.sigma is not None
        else config.defaults(config.dataset, path=config.path)["sigma"]
    )
    if config.coupling == "sb" and not sigma:
        raise ArgumentError(
            lambda n: (
                f"{n('coupling')} 'sb' needs a path with sigma > 0 (its epsilon is 2 sigma^2); "
                f"got {n('path')} {config.path!r} with sigma {sigma!r}"
            )
        )

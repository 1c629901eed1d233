"""``RunConfig``: every hyperparameter of a training run, the one source of ``fmjax train``'s options.

Each field carries its help text, the kinds of run it applies to (2D ``toy`` runs, ``images`` runs,
``sphere`` runs on the Earth datasets)
and, for fields whose default depends on the kind of run, nothing else: ``RunConfig.defaults(dataset)``
resolves every default for a kind in one place, and the CLI's help prints what it returns. Adding an
option is adding a field here with ``option(...)``; ``fmjax.cli`` builds its flag from the field.

Errors name fields through ``fmjax._checks.ArgumentError``: ``str(error)`` says ``batch_size``, the
CLI says ``--batch-size``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fmjax._checks import ArgumentError, ArgumentTypeError, check_choice, check_int, check_real
from fmjax._time import TIME_SAMPLERS
from fmjax.couplings import COUPLINGS, SCOPES, Coupling, independent, make_coupling
from fmjax.data.earth import DATASETS as EARTH_DATASETS
from fmjax.data.tfds_sources import DATASETS
from fmjax.data.toy import TOY_NUM_CLASSES, TOY_SAMPLERS
from fmjax.manifolds import Sphere
from fmjax.models import ACTIVATIONS
from fmjax.paths import SIGMA_FIELDS, Geodesic, Path, make_path
from fmjax.runs.options import (
    DATASET_CHANNEL_MULTS,
    DATASET_NUM_CLASSES,
    DEFAULT_SIGMA,
    DEFAULT_SIGMA_IMAGES,
    EULER_STEPS,  # noqa: F401  (re-exported: the tasks import it from here)
    GEODESIC,
    IMAGE_DEFAULTS,
    IMAGES,
    KINDS,
    LABEL_AWARE_COUPLINGS,  # noqa: F401  (re-exported)
    MLP_FIELDS,  # noqa: F401  (re-exported)
    NONFINITE_POLICIES,
    PATH_NAMES,
    PRECISIONS,
    SPHERE,
    TOY,
    TOY_FIELDS,
    check_conditions,
    check_path,
    check_sigma,
    option,
)
from fmjax.sampling import SOLVERS
from fmjax.training import make_train_step

__all__ = [
    "RunConfig",
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


def _adaptive_solvers() -> tuple[str, ...]:
    return tuple(name for name, spec in SOLVERS.items() if spec.adaptive)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Hyperparameters of a training run; every field is a CLI option of ``fmjax train``.

    The defaults are the TorchCFM tutorial task (8gaussians -> moons) with the OT-CFM papers' 2D
    protocol: a 3x64 SELU MLP, AdamW (lr 1e-3, weight decay 1e-5), I-CFM path with sigma = 0.1.
    Evaluation uses the EMA of the parameters unless ``eval_ema=False``. ``sigma=None`` means 0.1
    for the paths that have a noise level (condot, linear, sb) and none for the others.

    Conditional runs (``conditional=True``): the model takes the class label of each target point (the
    mixture component of 8gaussians, the moon of moons, the square of checkerboard, the digit or class
    of an image dataset) through an embedding with one extra null class, id ``num_classes``; with
    ``cond_dropout=p`` each label is replaced by the null class with probability p, so the same model
    is also unconditional and can be sampled with classifier-free guidance. ``by_label=True`` makes
    the OT coupling (exact, sinkhorn, sb) pair only within a class.

    Image runs (``dataset``) train ``fmjax.models.UNet(channels=width, channel_mults, num_res_blocks,
    groups, attention_resolutions, num_heads, num_head_channels, dropout)`` on the dataset's images; left
    None, these take ``IMAGE_DEFAULTS`` (channel_mults: (1, 2) digits, (1, 2, 2) mnist, (1, 2, 2, 2)
    cifar10) and are recorded with their values. ``dropout`` acts in the training step only (a fresh key
    per step); ``hflip=True`` flips each training image left-right with probability 1/2. A 2D run leaves
    them None; an image run records the 2D fields (source, target, depth, activation) as None.

    Reflow runs (``pairs``, written by ``fmjax reflow`` / ``prepare_reflow``): the model trains on the
    stored (x0, x1) pairs of a ``.npz`` file (``fmjax.data.pairs``; a path relative to the run
    directory, or absolute) with the independent coupling, which keeps their pairing.

    Every default that depends on the kind of run (``path``, ``sigma``, the UNet's fields) comes from
    ``RunConfig.defaults``.
    """

    source: str | None = option("8gaussians", "the source distribution", kinds=(TOY,), choices=TOY_SAMPLERS)
    target: str | None = option("moons", "the target distribution", kinds=(TOY,), choices=TOY_SAMPLERS)
    dataset: str | None = option(
        None,
        "train a UNet from Gaussian noise to these images (digits is offline), or a field on the sphere "
        "from the uniform distribution to these Earth events (shipped)",
        choices=(*DATASETS, *EARTH_DATASETS),
        shown_default="none: a 2D run",
    )
    path: str | None = option(None, "the probability path (geodesic: sphere runs)", choices=PATH_NAMES)
    sigma: float | None = option(
        None, "the path's noise: sigma_min of condot, sigma of linear and sb (the others have none)"
    )
    coupling: str = option(
        "independent", "how each batch is paired (sb takes the path's sigma)", choices=COUPLINGS
    )
    coupling_scope: str = option(
        "global",
        "with several devices or processes: 'global' couples the whole global batch, 'local' each "
        "device's shard",
        choices=SCOPES,
    )
    steps: int = option(20_000, "optimiser steps")
    batch_size: int = option(256, "the global batch (split over the devices)")
    width: int = option(64, "the MLP's hidden width; an image run's UNet base channels")
    depth: int | None = option(3, "the MLP's hidden layers", kinds=(TOY, SPHERE))
    activation: str | None = option("selu", "the MLP's activation", kinds=(TOY, SPHERE), choices=ACTIVATIONS)
    learning_rate: float = option(1e-3, "AdamW's learning rate")
    weight_decay: float = option(1e-5, "AdamW's weight decay (0: Adam)")
    warmup_steps: int = option(0, "linear warm-up of the learning rate from 0 over this many steps (0: none)")
    grad_clip: float | None = option(
        None, "clip the gradient to this global L2 norm before the optimiser", shown_default="none: no clip"
    )
    ema_decay: float = option(0.999, "decay of the parameters' exponential moving average")
    seed: int = option(0, "seed of every random stream of the run (fmjax.runs.STREAMS)")
    eval_samples: int = option(5_000, "samples drawn for the final evaluation")
    eval_solver: str = option("dopri5", "the evaluation's adaptive ODE solver", choices=_adaptive_solvers())
    eval_ema: bool = option(
        True,
        "evaluate the raw parameters, not their EMA (which runs evaluate by default)",
        flag="--no-eval-ema",
    )
    log_every: int = option(100, "steps per logged record (and per dispatch at most)")
    checkpoint_every: int = option(5_000, "steps between checkpoints")
    keep_checkpoints: int = option(3, "newest checkpoints kept")
    on_nonfinite: str = option(
        "stop",
        "a NaN/inf loss, gradient norm or updated state: 'stop' (an error naming the step; that state is "
        "never saved, the last good checkpoint is kept) or 'skip' (leave the state unchanged for that step)",
        choices=NONFINITE_POLICIES,
    )
    precision: str = option(
        "float32",
        "float32, or bf16: bfloat16 activations with float32 parameters and optimiser state",
        choices=PRECISIONS,
    )
    conditional: bool = option(
        False,
        "condition the model on the class of each target point: the component of 8gaussians, the moon of "
        "moons, the square of checkerboard, the digit or class of an image dataset (a class embedding with a "
        "null class, id = number of classes)",
    )
    cond_dropout: float = option(
        0.0,
        "with --conditional: probability of replacing a label by the null class while training, for "
        "classifier-free guidance (e.g. 0.1)",
    )
    by_label: bool = option(
        False, "with --conditional and an OT coupling (exact, sinkhorn, sb): pair only within a class"
    )
    pairs: str | None = option(None, "a reflow run's stored pairs (set by fmjax reflow)", cli=False)
    time_sampler: str = option(
        "uniform",
        "distribution of the training times t: uniform on [0, 1], or logit-normal (sigmoid of N(0, 1))",
        choices=TIME_SAMPLERS,
    )
    channel_mults: tuple[int, ...] | None = option(
        None, "the UNet's channel multiplier per level, e.g. 1,2,2,2", kinds=(IMAGES,)
    )
    num_res_blocks: int | None = option(None, "the UNet's residual blocks per level", kinds=(IMAGES,))
    groups: int | None = option(None, "the UNet's GroupNorm groups", kinds=(IMAGES,))
    attention_resolutions: tuple[int, ...] | None = option(
        None, "feature-map sides where the UNet has self-attention, e.g. 16", kinds=(IMAGES,)
    )
    num_heads: int | None = option(None, "the UNet's attention heads", kinds=(IMAGES,))
    num_head_channels: int | None = option(
        None,
        "the UNet's channels per attention head (replaces --num-heads)",
        kinds=(IMAGES,),
        shown_default="none: channels / num_heads",
    )
    dropout: float | None = option(
        None, "the UNet's residual blocks' dropout (training only)", kinds=(IMAGES,)
    )
    hflip: bool | None = option(
        None, "flip each training image left-right with probability 1/2", kinds=(IMAGES,)
    )

    @classmethod
    def defaults(cls, dataset: str | None = None, *, path: str | None = None) -> dict[str, Any]:
        """Every field's default for a run of ``dataset`` (None: a 2D run) on ``path`` (None: the
        kind's default path): the one place where the defaults of the kinds of run differ.

        >>> RunConfig.defaults()["sigma"], RunConfig.defaults("digits")["sigma"]
        (0.1, 0.0001)
        >>> RunConfig.defaults("mnist")["channel_mults"], RunConfig.defaults()["channel_mults"] is None
        ((1, 2, 2), True)
        """
        values = {field.name: field.default for field in dataclasses.fields(cls)}
        values["dataset"] = dataset
        if dataset is None:
            values["path"] = path or "linear"
            sigma = DEFAULT_SIGMA
        elif dataset in EARTH_DATASETS:
            values.update({name: None for name in ("source", "target")})
            values.update({name: None for name in IMAGE_DEFAULTS})
            values["path"] = path or GEODESIC
            sigma = None
        else:
            values.update({name: None for name in TOY_FIELDS})
            values.update(IMAGE_DEFAULTS, channel_mults=DATASET_CHANNEL_MULTS.get(dataset))
            values["path"] = path or "condot"
            sigma = DEFAULT_SIGMA_IMAGES
        values["sigma"] = sigma if values["path"] in SIGMA_FIELDS else None
        return values

    @classmethod
    def flag(cls, name: str) -> str:
        """The CLI flag of field ``name`` (``--batch-size``; ``--no-eval-ema`` for ``eval_ema``)."""
        field = {f.name: f for f in dataclasses.fields(cls)}[name]
        return field.metadata.get("flag") or "--" + name.replace("_", "-")

    def __post_init__(self):
        if self.dataset is not None:
            check_choice("dataset", self.dataset, (*DATASETS, *EARTH_DATASETS))
        if self.kind != IMAGES:
            for name in IMAGE_DEFAULTS:
                if getattr(self, name) is not None:
                    value = getattr(self, name)
                    raise ArgumentError(
                        lambda n, name=name, value=value: (
                            f"{n(name)} is for image runs only (it needs an image {n('dataset')}; 2D and "
                            f"sphere runs train an MLP); got {value!r}"
                        )
                    )
        defaults = self.defaults(self.dataset, path=self.path)
        for name in (*IMAGE_DEFAULTS, "path") if self.kind == IMAGES else ("path",):
            if getattr(self, name) is None:
                object.__setattr__(self, name, defaults[name])
        if self.kind == IMAGES:
            # the 2D fields mean nothing to an image run (noise -> images, a UNet): not recorded
            for name in TOY_FIELDS:
                object.__setattr__(self, name, None)
            self._check_image_fields()
        elif self.kind == SPHERE:  # the source is the sphere's uniform distribution, the target the dataset
            for name in ("source", "target"):
                object.__setattr__(self, name, None)
        self._check()
        if self.sigma is None:
            object.__setattr__(self, "sigma", defaults["sigma"])

    def _check_image_fields(self) -> None:
        for name in ("channel_mults", "attention_resolutions"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, tuple | list):
                raise ArgumentTypeError(
                    lambda n, name=name, value=value: f"{n(name)} must be a tuple of ints; got {value!r}"
                )
            value = tuple(check_int(f"{name}[{k}]", v, low=1) for k, v in enumerate(value))
            object.__setattr__(self, name, value)  # a list from config.json compares equal as a tuple
        if not self.channel_mults:
            raise ArgumentError(lambda n: f"{n('channel_mults')} must hold at least one level; got ()")
        for name in ("num_res_blocks", "groups", "num_heads"):
            check_int(name, getattr(self, name), low=1)
        if self.num_head_channels != IMAGE_DEFAULTS["num_head_channels"]:
            check_int("num_head_channels", self.num_head_channels, low=1)
        check_real("dropout", self.dropout, low=0.0, high=1.0, high_inclusive=False)
        if not isinstance(self.hflip, bool):
            raise ArgumentTypeError(lambda n: f"{n('hflip')} must be a bool; got {self.hflip!r}")

    def _check(self) -> None:
        """Check every field (an image run's UNet fields are checked by ``_check_image_fields``)."""
        check_choice("time_sampler", self.time_sampler, TIME_SAMPLERS)
        if self.kind == TOY:
            for name in ("source", "target"):
                check_choice(name, getattr(self, name), TOY_SAMPLERS)
        if self.kind != IMAGES:
            check_choice("activation", self.activation, ACTIVATIONS)
        check_path(self)
        for name, registry in (
            ("coupling", COUPLINGS),
            ("coupling_scope", SCOPES),
            ("eval_solver", SOLVERS),
            ("on_nonfinite", NONFINITE_POLICIES),
            ("precision", PRECISIONS),
        ):
            check_choice(name, getattr(self, name), registry)
        if not SOLVERS[self.eval_solver].adaptive:
            adaptive = ", ".join(_adaptive_solvers())
            raise ArgumentError(
                lambda n: f"{n('eval_solver')} must be adaptive ({adaptive}); got {self.eval_solver!r}"
            )
        positive = ("steps", "batch_size", "width", *(("depth",) if self.kind != IMAGES else ()))
        for name in (*positive, "eval_samples", "log_every", "checkpoint_every", "keep_checkpoints"):
            check_int(name, getattr(self, name), low=1)
        check_int("seed", self.seed, low=0)
        for name in ("eval_ema", "conditional", "by_label"):
            if not isinstance(getattr(self, name), bool):
                value = getattr(self, name)
                raise ArgumentTypeError(
                    lambda n, name=name, value=value: f"{n(name)} must be a bool; got {value!r}"
                )
        check_real("cond_dropout", self.cond_dropout, low=0.0, high=1.0)
        check_conditions(self)
        check_real("learning_rate", self.learning_rate, low=0.0, low_inclusive=False)
        check_real("weight_decay", self.weight_decay, low=0.0)
        check_int("warmup_steps", self.warmup_steps, low=0)
        if self.grad_clip is not None:
            check_real("grad_clip", self.grad_clip, low=0.0, low_inclusive=False)
        check_real("ema_decay", self.ema_decay, low=0.0, high=1.0, high_inclusive=False)
        check_sigma(self)

    @property
    def kind(self) -> str:
        """The kind of run: ``"toy"`` (2D samplers and an MLP), ``"images"`` (a dataset and a UNet) or
        ``"sphere"`` (an Earth dataset and a tangent MLP on S^2)."""
        if self.dataset is None:
            return TOY
        return SPHERE if self.dataset in EARTH_DATASETS else IMAGES

    @property
    def num_classes(self) -> int | None:
        """Classes of a conditional run's labels (the null class is id ``num_classes``); None otherwise."""
        if not self.conditional:
            return None
        if self.dataset is not None:
            return DATASET_NUM_CLASSES[self.dataset]
        return TOY_NUM_CLASSES[self.target]

    def null_cond(self) -> jax.Array | None:
        """The null condition of a conditional run (the null class id), else None."""
        return None if self.num_classes is None else jnp.int32(self.num_classes)

    def warnings(self, naming: Callable[[str], str] = str) -> list[str]:
        """What in this configuration is allowed but probably not meant, in words (one line each); fields
        are named by ``naming`` (the CLI passes its flags)."""
        notes = []
        if self.path == "condot" and self.sigma and self.dataset is None and self.source != "gaussian":
            n = naming
            notes.append(
                f"{n('path')} condot ends at x1 + sigma_min x0, which assumes a N(0, I) source; from "
                f"{self.source} (spread far beyond 1) it learns the target blurred by {self.sigma} x0: use "
                f"{n('path')} linear, or {n('source')} gaussian"
            )
        return notes

    def manifold(self) -> Sphere | None:
        """The manifold the run's points live on: ``Sphere()`` for a sphere run, else None (R^d)."""
        return Sphere() if self.kind == SPHERE else None

    def make_path(self) -> Path:
        """The probability path (``path`` with ``sigma``, checked when the configuration was built); a
        sphere run's is ``Geodesic(Sphere())``."""
        if self.path == GEODESIC:
            return Geodesic(manifold=Sphere())
        return make_path(self.path, sigma=self.sigma)

    def make_optimizer(self) -> optax.GradientTransformation:
        """AdamW at ``learning_rate`` with ``weight_decay``, after a warm-up and a gradient clip if set.

        The update of step k (k updates done before it, k = 0, 1, ...) uses the learning rate
        ``learning_rate * min(k, warmup_steps) / warmup_steps`` (a linear warm-up from 0, PyTorch's
        ``LambdaLR(lambda k: min(k, W) / W)`` as Tong et al.'s CIFAR-10 recipe uses it), then
        ``learning_rate``; with ``grad_clip`` the gradient g is first scaled to
        ``g * min(1, grad_clip / ||g||)`` (global L2 norm over all parameters). The logged ``grad_norm``
        is ``||g||`` before the clip. ``weight_decay=0`` is plain Adam. With neither warm-up nor clip
        the optimiser (and its state) is ``optax.adamw(learning_rate, weight_decay=weight_decay)``.

        >>> import jax.numpy as jnp
        >>> opt = RunConfig(warmup_steps=4, grad_clip=1.0).make_optimizer()
        >>> params = {"w": jnp.ones(3)}
        >>> updates, _ = opt.update({"w": jnp.full(3, 5.0)}, opt.init(params), params)
        >>> bool((updates["w"] == 0).all())  # the first update's learning rate is 0
        True
        """
        learning_rate = self.learning_rate
        if self.warmup_steps:
            learning_rate = optax.linear_schedule(0.0, self.learning_rate, self.warmup_steps)
        optimizer = optax.adamw(learning_rate, weight_decay=self.weight_decay)
        if self.grad_clip is not None:
            optimizer = optax.chain(optax.clip_by_global_norm(self.grad_clip), optimizer)
        return optimizer

    def make_coupling(self) -> Coupling:
        """The coupling; SB-CFM's entropic coupling takes the path's sigma; a sphere run's OT couplings
        (exact, sinkhorn) take the squared geodesic distance as their cost.

        ``coupling_scope`` matters only on several devices: "global" (the default) couples the whole
        global batch, so a run of several processes trains what one process trains; "local" couples each
        device's shard, as TorchCFM's DDP training does. The independent coupling pairs each x0 with its
        own x1 in either scope, so it stays local (gathering the batch would only cost time).
        """
        scope = "local" if self.coupling == "independent" else self.coupling_scope
        options = {"by_label": True} if self.by_label else {}
        if self.kind == SPHERE and self.coupling in ("exact", "sinkhorn"):
            options["manifold"] = Sphere()  # the squared geodesic distance as the cost
        if self.coupling == "sb":
            return make_coupling("sb", sigma=self.sigma, scope=scope, **options)
        return make_coupling(self.coupling, scope=scope, **options)

    def make_step(self, apply_fn, optimizer, *, mesh=None, host_pairs: bool = False):
        """The jitted train step of this configuration (toy and image runs alike).

        With ``host_pairs`` the step couples nothing: the loop gives it batches already paired by a
        host-solved coupling.
        """
        return make_train_step(
            apply_fn,
            optimizer,
            path=self.make_path(),
            coupling=independent() if host_pairs else self.make_coupling(),
            ema_decay=self.ema_decay,
            log_grad_norm=True,
            check_finite=True,
            skip_nonfinite=self.on_nonfinite == "skip",
            time_sampler=self.time_sampler,
            cond_dropout=self.cond_dropout,
            null_cond=self.null_cond() if self.cond_dropout > 0 else None,
            mesh=mesh,
        )

    def to_json(self) -> dict[str, Any]:
        """The configuration as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunConfig:
        """Rebuild a configuration from ``to_json``'s dict; unknown keys are an error.

        The ``environment`` record that ``config.json`` keeps beside the configuration (devices of the
        first start) is not part of it and is ignored.
        """
        data = {k: v for k, v in data.items() if k != "environment"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def differing(self, other: RunConfig) -> list[str]:
        """The fields in which ``other`` differs from this configuration, sorted."""
        mine, theirs = self.to_json(), other.to_json()
        return sorted(name for name, value in mine.items() if theirs.get(name) != value)

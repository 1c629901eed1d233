"""Training runs: configuration, the one training loop (2D toy data and images alike) and evaluation, as used
by ``fmjax train``. The data come from a source of ``fmjax.data.sources``; what is image-specific (the UNet,
bits/dim, image grids) lives in ``fmjax.image_runs``.

A run directory holds:

- ``config.json``: the ``RunConfig``, and under ``environment`` the devices of the first start;
- ``metrics.jsonl``: one JSON object a line (training records with the host's input and solve time, then the
  evaluation); lines that do not parse (a record cut short by a killed process, a garbled line) are moved
  to ``metrics.jsonl.corrupt`` when training resumes, and reported;
- ``checkpoints/<step>/``: orbax checkpoints of the ``TrainState``; an unreadable one is renamed
  ``<step>.corrupt``, never deleted;
- ``train.lock``: present while an ``fmjax train`` writes the directory (its pid and host inside);
- ``samples.png``, ``trajectories.png``, ``loss.png``: plots;
- ``summary.json``: the final evaluation;
- ``tensorboard/``: with ``train(..., tensorboard=True)`` (``fmjax train --tensorboard``), the training
  records (``train/...``) and the evaluation (``eval/...``) as TensorBoard event files.

Nothing is written before the configuration and the data have been checked, and a readable checkpoint is
never renamed, moved or deleted by a failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fmjax._checks import check_choice, check_int, check_real
from fmjax._time import TIME_SAMPLERS
from fmjax.checkpoint import Checkpointer
from fmjax.couplings import COUPLINGS, SCOPES, independent, make_coupling
from fmjax.data.tfds_sources import DATASETS
from fmjax.data.toy import TOY_NUM_CLASSES, TOY_SAMPLERS, sample_labeled
from fmjax.data.toy import sample as toy_sample
from fmjax.metrics import normalized_path_energy, path_energy, wasserstein2
from fmjax.models import ACTIVATIONS, MLP, functional
from fmjax.paths import PATHS, make_path
from fmjax.sampling import SOLVERS, as_velocity, sample
from fmjax.training import TrainState, make_train_step

STREAMS = {"init": 1, "data": 2, "eval": 3, "generate": 4, "nll": 5, "reflow": 6, "few_step": 7}


def stream_key(seed: int, name: str) -> jax.Array:
    """The key of the run's random stream ``name`` (STREAMS) for ``seed``."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), STREAMS[name])


__all__ = [
    "RunConfig",
    "Run",
    "TrainingInterrupted",
    "train",
    "evaluate",
    "load_run",
    "generate",
    "negative_log_likelihood",
    "prepare_reflow",
]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = "train.lock"
TENSORBOARD_DIR = "tensorboard"
PAIRS_FILE = "pairs.npz"
EULER_STEPS = (1, 2, 4, 8)
SIGMA_PATHS = ("condot", "linear", "sb")
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Hyperparameters of a 2D training run; every field is a CLI option of ``fmjax train``.

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
    them None.

    Reflow runs (``pairs``, written by ``fmjax reflow`` / ``prepare_reflow``): the model trains on the
    stored (x0, x1) pairs of a ``.npz`` file (``fmjax.data.pairs``; a path relative to the run
    directory, or absolute) with the independent coupling, which keeps their pairing.
    """

    source: str = "8gaussians"
    target: str = "moons"
    dataset: str | None = None
    path: str | None = None
    sigma: float | None = None
    coupling: str = "independent"
    coupling_scope: str = "global"
    steps: int = 20_000
    batch_size: int = 256
    width: int = 64
    depth: int = 3
    activation: str = "selu"
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    warmup_steps: int = 0
    grad_clip: float | None = None
    ema_decay: float = 0.999
    seed: int = 0
    eval_samples: int = 5_000
    eval_solver: str = "dopri5"
    eval_ema: bool = True
    log_every: int = 100
    checkpoint_every: int = 5_000
    keep_checkpoints: int = 3
    on_nonfinite: str = "stop"
    precision: str = "float32"
    conditional: bool = False
    cond_dropout: float = 0.0
    by_label: bool = False
    pairs: str | None = None
    time_sampler: str = "uniform"
    channel_mults: tuple[int, ...] | None = None
    num_res_blocks: int | None = None
    groups: int | None = None
    attention_resolutions: tuple[int, ...] | None = None
    num_heads: int | None = None
    num_head_channels: int | None = None
    dropout: float | None = None
    hflip: bool | None = None

    def __post_init__(self):
        if self.dataset is not None:
            check_choice("dataset", self.dataset, DATASETS)
            # the 2D fields mean nothing to an image run (noise -> images, a UNet): not recorded
            for name in ("source", "target", "depth", "activation"):
                object.__setattr__(self, name, None)
            self._check_image_fields()
        else:
            for name in IMAGE_DEFAULTS:
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} is for image runs only (it needs a dataset; a 2D run trains an MLP); "
                        f"got {getattr(self, name)!r}"
                    )
        check_choice("time_sampler", self.time_sampler, TIME_SAMPLERS)
        if self.path is None:
            object.__setattr__(self, "path", "linear" if self.dataset is None else "condot")
        if self.dataset is None:
            check_choice("source", self.source, TOY_SAMPLERS)
            check_choice("target", self.target, TOY_SAMPLERS)
            check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("path", self.path, PATHS)
        check_choice("coupling", self.coupling, COUPLINGS)
        check_choice("coupling_scope", self.coupling_scope, SCOPES)
        check_choice("eval_solver", self.eval_solver, SOLVERS)
        check_choice("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        check_choice("precision", self.precision, PRECISIONS)
        if not SOLVERS[self.eval_solver].adaptive:
            raise ValueError(
                f"eval_solver must be adaptive ({', '.join(n for n, s in SOLVERS.items() if s.adaptive)});"
                f" got {self.eval_solver!r}"
            )
        for name in (
            "steps",
            "batch_size",
            "width",
            *(("depth",) if self.dataset is None else ()),
            "eval_samples",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            check_int(name, getattr(self, name), low=1)
        check_int("seed", self.seed, low=0)
        for name in ("eval_ema", "conditional", "by_label"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool; got {getattr(self, name)!r}")
        check_real("cond_dropout", self.cond_dropout, low=0.0, high=1.0)
        if self.conditional and self.dataset is None and self.target not in TOY_NUM_CLASSES:
            raise ValueError(
                f"conditional needs a target with class labels ({', '.join(TOY_NUM_CLASSES)}) or a dataset;"
                f" got target {self.target!r}"
            )
        if self.cond_dropout > 0 and not self.conditional:
            raise ValueError(f"cond_dropout needs conditional=True; got cond_dropout {self.cond_dropout}")
        if self.by_label and not self.conditional:
            raise ValueError("by_label needs conditional=True (the labels come with the target points)")
        if self.pairs is not None:
            if not isinstance(self.pairs, str) or not self.pairs:
                raise TypeError(f"pairs must be the path of a pairs file (str); got {self.pairs!r}")
            if self.coupling != "independent":
                raise ValueError(
                    "pairs are trained on as stored: coupling must be 'independent' (it keeps the pairing); "
                    f"got coupling {self.coupling!r}"
                )
            if self.conditional:
                raise ValueError("pairs carry no labels: a reflow run cannot be conditional")
        if self.by_label and self.coupling not in LABEL_AWARE_COUPLINGS:
            raise ValueError(
                f"by_label needs a coupling that pairs by label ({', '.join(LABEL_AWARE_COUPLINGS)}); "
                f"got coupling {self.coupling!r}"
            )
        check_real("learning_rate", self.learning_rate, low=0.0, low_inclusive=False)
        check_real("weight_decay", self.weight_decay, low=0.0)
        check_int("warmup_steps", self.warmup_steps, low=0)
        if self.grad_clip is not None:
            check_real("grad_clip", self.grad_clip, low=0.0, low_inclusive=False)
        check_real("ema_decay", self.ema_decay, low=0.0, high=1.0, high_inclusive=False)
        if self.sigma is None and self.path in SIGMA_PATHS:
            object.__setattr__(self, "sigma", DEFAULT_SIGMA if self.dataset is None else DEFAULT_SIGMA_IMAGES)
        make_path(self.path, sigma=self.sigma)  # validates sigma for this path
        if self.coupling == "sb" and not self.sigma:
            raise ValueError(
                "coupling 'sb' needs a path with sigma > 0 (its epsilon is 2 sigma^2); "
                f"got path {self.path!r} with sigma {self.sigma!r}"
            )

    def _check_image_fields(self) -> None:
        """Fill an image run's unset UNet and augmentation fields with their defaults; check them."""
        defaults = {**IMAGE_DEFAULTS, "channel_mults": DATASET_CHANNEL_MULTS[self.dataset]}
        for name, default in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        for name in ("channel_mults", "attention_resolutions"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, tuple | list):
                raise TypeError(f"{name} must be a tuple of ints; got {value!r}")
            value = tuple(check_int(f"{name}[{k}]", v, low=1) for k, v in enumerate(value))
            object.__setattr__(self, name, value)  # a list from config.json compares equal as a tuple
        if not self.channel_mults:
            raise ValueError("channel_mults must hold at least one level; got ()")
        for name in ("num_res_blocks", "groups", "num_heads"):
            check_int(name, getattr(self, name), low=1)
        if self.num_head_channels != IMAGE_DEFAULTS["num_head_channels"]:
            check_int("num_head_channels", self.num_head_channels, low=1)
        check_real("dropout", self.dropout, low=0.0, high=1.0, high_inclusive=False)
        if not isinstance(self.hflip, bool):
            raise TypeError(f"hflip must be a bool; got {self.hflip!r}")

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

    def warnings(self) -> list[str]:
        """What in this configuration is allowed but probably not meant, in words (one line each)."""
        notes = []
        if self.path == "condot" and self.sigma and self.dataset is None and self.source != "gaussian":
            notes.append(
                f"path condot ends at x1 + sigma_min x0, which assumes a N(0, I) source; from {self.source} "
                f"(spread far beyond 1) it learns the target blurred by {self.sigma} x0: use --path linear, "
                "or --source gaussian"
            )
        return notes

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

    def make_coupling(self):
        """The coupling; SB-CFM's entropic coupling takes the path's sigma.

        ``coupling_scope`` matters only on several devices: "global" (the default) couples the whole
        global batch, so a run of several processes trains what one process trains; "local" couples each
        device's shard, as TorchCFM's DDP training does. The independent coupling pairs each x0 with its
        own x1 in either scope, so it stays local (gathering the batch would only cost time).
        """
        scope = "local" if self.coupling == "independent" else self.coupling_scope
        options = {"by_label": True} if self.by_label else {}
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
            path=make_path(self.path, sigma=self.sigma),
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


@dataclasses.dataclass
class Run:
    """The pieces of a run built from its configuration."""

    config: RunConfig
    apply_fn: Callable[[Any, jax.Array, jax.Array], jax.Array]
    optimizer: optax.GradientTransformation
    state: TrainState
    environment: dict[str, Any] | None = None  # devices it trained on, set by ``train``
    trained_steps: int = 0  # steps the last ``train`` call ran (0 when it found the run complete)

    @classmethod
    def build(cls, config: RunConfig) -> Run:
        """Model, optimiser and initial state for ``config``.

        With ``precision="bf16"`` the model computes in bfloat16 (parameters cast on the way in, the
        velocity returned as float32); parameters, optimiser state and EMA stay float32.
        """
        if config.dataset is not None:
            from fmjax import image_runs

            apply_fn, optimizer, state = image_runs.build(config)
        else:
            model = MLP(
                dim=2,
                width=config.width,
                depth=config.depth,
                activation=config.activation,
                num_classes=config.num_classes,
                seed=config.seed,
            )
            apply_fn, params = functional(model)
            optimizer = config.make_optimizer()
            key = jax.random.PRNGKey(config.seed)
            state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.fold_in(key, 1))
        if config.precision == "bf16":
            from fmjax.models import mixed_precision

            apply_fn = mixed_precision(apply_fn, jnp.bfloat16)
        return cls(config=config, apply_fn=apply_fn, optimizer=optimizer, state=state)


class TrainingInterrupted(Exception):
    """``train`` stopped because its ``stop`` callback asked it to (Ctrl-C in ``fmjax train``).

    Attributes:
      step: the steps trained.
      checkpoint: the newest checkpoint on disk (None if none); the same command resumes from it.
    """

    def __init__(self, step: int, checkpoint: int | None):
        self.step, self.checkpoint = step, checkpoint
        saved = f"checkpoint {checkpoint} is saved" if checkpoint is not None else "no checkpoint yet"
        super().__init__(f"interrupted at step {step} ({saved}); resume with the same command")


def _metrics_record(line: str) -> dict | None:
    """The record of one metrics line, or None if it is not one (cut short, garbled, not an object)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    if "event" in record or (isinstance(record.get("step"), int) and not isinstance(record["step"], bool)):
        return record
    return None


def resume_metrics(metrics_path: str, done: int, log: Callable[[str], Any] | None = None) -> None:
    """Drop the training records of ``metrics_path`` past step ``done`` (the resumed checkpoint); move the
    lines that are not records to ``metrics_path + ".corrupt"``.

    Those steps are recomputed identically after a resume, so keeping them would log them twice; event
    records (evaluations, notes) and the records up to ``done`` stay, byte for byte. A line that does not
    parse (a last record cut short by a killed process, a garbled line anywhere) is appended to the
    ``.corrupt`` file (kept, never deleted) and reported through ``log`` with its line number: a resume
    never fails on the metrics. The file is rewritten atomically, under the lock ``append_record`` takes.
    """
    if not os.path.exists(metrics_path):
        return
    with open(metrics_path, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # an `fmjax nll` appending now waits, then appends to the new file
        text = f.read().decode("utf-8", errors="replace")
        lines = text.split("\n")
        kept, bad, dropped = [], [], False
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = _metrics_record(line)
            if record is None:
                bad.append((number, line))
            elif "event" in record or record["step"] <= done:
                kept.append(line)
            else:
                dropped = True
        if not (bad or dropped or (text and not text.endswith("\n"))):
            return
        if bad:
            with open(metrics_path + ".corrupt", "a") as corrupt:
                corrupt.write("".join(line + "\n" for _, line in bad))
            numbers = ", ".join(str(n) for n, _ in bad)
            cut = " (the last one cut short by an interrupted write)" if bad[-1][0] == len(lines) else ""
            if log is not None:
                log(
                    f"{metrics_path}: line(s) {numbers} are not metrics records{cut}; moved to "
                    f"{os.path.basename(metrics_path)}.corrupt"
                )
        write_atomic(metrics_path, "".join(line + "\n" for line in kept))


def append_record(path: str, record: dict[str, Any]) -> None:
    """Append one JSON record as a line to ``path`` (created if missing), under an exclusive ``flock``.

    Safe beside a training run: a rewrite by ``resume_metrics`` is waited for and the record goes to the new
    file; a last line cut short by a killed writer is ended first, so the record stays a line of its own.
    """
    line = (json.dumps(record) + "\n").encode()
    while True:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if not current:  # replaced by a rewrite while this waited: append to the new file
                continue
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            os.write(fd, line)
            return
        finally:
            os.close(fd)


def first_nonfinite(nonfinite: np.ndarray, skipped: np.ndarray) -> int | None:
    """Index of the first step whose loss, gradient or updated state is not finite (``nonfinite`` != 0)
    among the steps that were not skipped, or None."""
    bad = np.flatnonzero((nonfinite != 0) & (skipped == 0))
    return int(bad[0]) if bad.size else None


def _nonfinite_message(code: int, loss: float, grad_norm: float) -> str:
    from fmjax.training import NONFINITE_GRADIENT, NONFINITE_LOSS, NONFINITE_STATE

    parts = []
    if code & NONFINITE_LOSS:
        parts.append(f"the loss ({loss})")
    if code & NONFINITE_GRADIENT:
        parts.append(f"the gradient norm ({grad_norm})")
    if code & NONFINITE_STATE:
        parts.append("the updated parameters or optimiser state")
    joined = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{joined} became non-finite"


def _next_chunk(step: int, config: RunConfig) -> int:
    """Steps to the next log or checkpoint boundary; depends on the step alone, so a resumed run
    chunks (and so computes) exactly as an uninterrupted one."""
    boundaries = (
        (step // config.log_every + 1) * config.log_every,
        (step // config.checkpoint_every + 1) * config.checkpoint_every,
        config.steps,
    )
    return min(boundaries) - step


def barrier(name: str) -> None:
    """Wait for every process of a multi-process run (jax.distributed) to get here; one process: no-op."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_config(run_dir: str) -> RunConfig:
    path = os.path.join(run_dir, CONFIG_FILE)
    try:
        with open(path) as f:
            return RunConfig.from_json(json.load(f))
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{path!r} is not an fmjax run configuration ({error})") from None


def _differing(config: RunConfig, existing: RunConfig) -> list[str]:
    return sorted(k for k, v in config.to_json().items() if existing.to_json().get(k) != v)


def check_run_dir(config: RunConfig, run_dir: str | os.PathLike) -> None:
    """Raise a ValueError if ``run_dir`` cannot hold a run of ``config``; a new directory passes.

    Refused: a file in place of the directory (or of its ``checkpoints``, ``config.json`` or
    ``metrics.jsonl``), a directory that holds files but no fmjax run, a run of another configuration
    that has saved checkpoints. A run of another configuration that never saved a checkpoint (it failed
    or was stopped before its first) passes: ``train`` starts it again (see there). Nothing is written.
    """
    run_dir = os.fspath(run_dir)
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"run_dir {run_dir!r} is a file, not a directory")
    if not os.path.isdir(run_dir):
        return
    for name, is_kind, kind in (
        (CHECKPOINT_DIR, os.path.isdir, "directory"),
        (CONFIG_FILE, os.path.isfile, "file"),
        (METRICS_FILE, os.path.isfile, "file"),
    ):
        path = os.path.join(run_dir, name)
        if os.path.lexists(path) and not is_kind(path):
            raise ValueError(
                f"run_dir {run_dir!r}: {name} is not a {kind}; move it away to use this directory "
                "(nothing was changed)"
            )
    if not os.path.exists(os.path.join(run_dir, CONFIG_FILE)):
        if set(os.listdir(run_dir)) - {LOCK_FILE, PAIRS_FILE}:  # pairs: a reflow run being prepared
            raise ValueError(
                f"run_dir {run_dir!r} already holds files but no fmjax run; choose a new directory"
            )
        return
    existing = _read_config(run_dir)
    if existing != config and _has_checkpoints(run_dir):
        raise ValueError(
            f"run directory {run_dir!r} belongs to a different configuration "
            f"(differs in {', '.join(_differing(config, existing))}); use a new --out"
        )


def _has_checkpoints(run_dir: str) -> bool:
    """Whether anything was ever saved in the run's checkpoint directory (step folders, set aside ones)."""
    directory = os.path.join(run_dir, CHECKPOINT_DIR)
    return os.path.isdir(directory) and bool(os.listdir(directory))


class RunLock:
    """An exclusive lock on a run directory: ``flock`` on ``RUN/train.lock``, which holds the pid and host.

    The kernel releases a ``flock`` when its process ends, however it ends, so a lock file left behind by
    a killed run does not lock anything: the next ``acquire`` takes it over. ``release`` removes the file.
    """

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise BlockingIOError naming the holder (one line) if another process has it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process"
                os.close(fd)
                raise BlockingIOError(
                    f"run_dir {self.run_dir!r} is in use by another fmjax train ({holder}); wait for it to "
                    "finish or choose another directory"
                ) from None
            try:  # a holder releasing removes the file: this one may be locked but no longer in place
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and release the lock; a no-op when not held."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def _take_run_dir(config: RunConfig, run_dir: str, environment: dict, say: Callable[[str], Any]) -> RunLock:
    """Check ``run_dir``, lock it and write the configuration of a new run (process 0)."""
    check_run_dir(config, run_dir)  # before anything is written
    created = not os.path.isdir(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    lock = RunLock(run_dir)
    try:
        lock.acquire()
        check_run_dir(config, run_dir)  # again under the lock: another run may have written it meanwhile
        config_path = os.path.join(run_dir, CONFIG_FILE)
        if os.path.exists(config_path):
            existing = _read_config(run_dir)
            if existing != config:  # it never saved a checkpoint (check_run_dir): start it again
                kept = [_keep_aside(os.path.join(run_dir, name)) for name in (CONFIG_FILE, METRICS_FILE)]
                differs = ", ".join(_differing(config, existing))
                names = ", ".join(os.path.basename(k) for k in kept if k)
                say(
                    f"run directory {run_dir} held a run of another configuration (differs in {differs}) "
                    f"that saved no checkpoint; starting again with this one (kept: {names})"
                )
        if not os.path.exists(config_path):
            write_atomic(config_path, json.dumps({**config.to_json(), "environment": environment}, indent=2))
    except BaseException:
        lock.release()
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(run_dir)
        raise
    return lock


def _keep_aside(path: str) -> str | None:
    """Rename ``path`` to ``path.old`` (``.old1``, ... if taken); the new name, or None if it is missing."""
    if not os.path.exists(path):
        return None
    destination, suffix = path + ".old", 1
    while os.path.lexists(destination):
        destination, suffix = f"{path}.old{suffix}", suffix + 1
    os.rename(path, destination)
    return destination


def _agree(run_dir: str, config: RunConfig, error: BaseException | None) -> None:
    """Every process of a multi-process run checks that it was given process 0's run directory and
    configuration, and started; if any did not, every process raises (one line) instead of waiting."""
    from jax.experimental import multihost_utils

    from fmjax.checkpoint import _from_process_0

    mine = {"run_dir": os.path.abspath(run_dir), "config": config.to_json()}
    first = _from_process_0(mine if jax.process_index() == 0 else None)
    code = (
        (mine["run_dir"] != first["run_dir"]) * 1
        + (mine["config"] != first["config"]) * 2
        + (error is not None) * 4
    )
    codes = np.asarray(multihost_utils.process_allgather(np.int32(code))).reshape(-1)
    if not codes.any():
        return
    if error is not None:
        raise error
    parts = []
    if (codes & 1).any():
        parts.append(
            f"process(es) {np.flatnonzero(codes & 1).tolist()} got another run_dir than process 0's "
            f"{first['run_dir']!r}"
        )
    if (codes & 2).any():
        differs = _differing(config, RunConfig.from_json(first["config"])) if code & 2 else []
        parts.append(
            f"process(es) {np.flatnonzero(codes & 2).tolist()} got another configuration than process 0"
            + (f" (differs in {', '.join(differs)})" if differs else "")
        )
    if (codes & 4).any():
        parts.append(f"process(es) {np.flatnonzero(codes & 4).tolist()} failed to start (see their output)")
    raise ValueError(
        "the processes of a multi-process run must be given the same run_dir and configuration: "
        + "; ".join(parts)
    )


def _broadcast_outcome(error: BaseException | None) -> None:
    """Process 0's outcome (an error or none) on every process: the others raise it as one line too."""
    from fmjax.checkpoint import _from_process_0

    if jax.process_index() == 0:
        message = (str(error).splitlines() or [type(error).__name__])[0] if error is not None else None
        outcome = {"error": message, "value": isinstance(error, ValueError)}
        _from_process_0(outcome)
        if error is not None:
            raise error
        return
    outcome = _from_process_0(None)
    if outcome["error"] is not None:
        raise (ValueError if outcome["value"] else OSError)(f"process 0: {outcome['error']}")


def make_mesh(devices: int | None = None) -> Mesh | None:
    """A data-parallel mesh (axis "data") over the first ``devices`` devices of the run (default: all).

    ``None`` when the run has a single device: the step then runs unsharded. With several processes
    (jax.distributed) every process must see the same count, and ``devices`` must use all of them.
    """
    available = jax.devices()
    if devices is None:
        devices = len(available)
    check_int("devices", devices, low=1)
    if devices > len(available):
        raise ValueError(f"devices must be at most the {len(available)} devices this run sees; got {devices}")
    if jax.process_count() > 1 and devices != len(available):
        raise ValueError(
            f"devices must be all {len(available)} devices of a multi-process run; got {devices}"
        )
    if devices == 1:
        return None
    return Mesh(np.array(available[:devices]), ("data",))


VERSIONED = ("fmjax", "jax", "jaxlib", "flax", "optax", "diffrax", "ott-jax", "orbax-checkpoint")


def versions() -> dict[str, str]:
    """The installed versions of fmjax and the libraries a run's results depend on."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def environment(mesh: Mesh | None) -> dict[str, Any]:
    """What the run trains on: device count, kind and platform, process count, the exact coupling's host
    solver and the versions of the libraries (``versions``)."""
    from fmjax._assignment import SOLVER_NAME

    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    return {
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "processes": jax.process_count(),
        "assignment_solver": SOLVER_NAME,
        "versions": versions(),
    }


def pairs_path(config: RunConfig, run_dir: str | os.PathLike) -> str:
    """The pairs file of a reflow run: ``config.pairs``, relative to ``run_dir`` unless absolute."""
    return os.path.join(os.fspath(run_dir), config.pairs)


def _source(config: RunConfig, data_dir: str | None, run_dir: str):
    if config.pairs is not None:
        from fmjax.data.pairs import PairSource

        path = pairs_path(config, run_dir)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pairs file {path!r} of this reflow run does not exist")
        source = PairSource(
            path,
            batch_size=config.batch_size,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        dims = source.host_spec()["x0"][0][1:]
        if config.dataset is None:
            expected = (2,)
        else:
            from fmjax.image_runs import image_shape

            expected = image_shape(config)
        if tuple(dims) != tuple(expected):
            raise ValueError(
                f"pairs file {path!r} holds points of shape {tuple(dims)}; this run's model takes {expected}"
            )
        return source
    if config.dataset is None:
        from fmjax.data.sources import ToySource

        return ToySource(source=config.source, target=config.target, batch_size=config.batch_size)
    from fmjax.data.sources import ImageSource
    from fmjax.data.tfds_sources import data_source

    return ImageSource(
        data_source(config.dataset, split="train", data_dir=data_dir),
        batch_size=config.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        labels=config.conditional,
        hflip=config.hflip,
    )


def _pair(config: RunConfig, source, key: jax.Array, host) -> tuple[jax.Array, jax.Array, Any]:
    """``(x0, x1, cond)`` of one step: cond is x1's labels in a conditional run, else None."""
    if config.conditional:
        return source.pair_cond(key, host)
    x0, x1 = source.pair(key, host)
    return x0, x1, None


def _host_inputs(config: RunConfig, coupling, x0, x1, cond) -> tuple:
    """What a host-solved coupling needs of one step (x1's labels too when it pairs by label)."""
    if config.by_label:
        return coupling.host_inputs(x0, x1, labels1=cond)
    return coupling.host_inputs(x0, x1)


# Upper bound on the device memory one dispatch's inputs (host data and host-solved pairs' inputs) take:
# the chunk of steps per dispatch is cut shorter where a step's inputs are large (images, cost matrices).
CHUNK_INPUT_BYTES = 64 * 2**20
# Threads reading the steps of a chunk from the data source (array_record reads and image decoding release
# the GIL for most of their time).
INPUT_THREADS = 4


def _steps_per_dispatch(config: RunConfig, source, coupling) -> int:
    if config.dataset is not None and jax.default_backend() == "cpu":
        # XLA:CPU gives the convolutions of a UNet's backward pass non-canonical layouts inside a loop body
        # and runs them on its slow generic path: a scanned digits step takes 0.5 s against 0.02 s for the
        # same step dispatched alone (benchmarks/scan_cpu.py). Accelerators scan as everywhere else.
        return 1
    spec = source.host_spec().values()
    per_step = sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in spec)
    if coupling is not None:
        inputs = jax.eval_shape(
            lambda key, host: _host_inputs(config, coupling, *_pair(config, source, key, host)),
            jax.random.PRNGKey(0),
            _abstract_host(source),
        )
        per_step += sum(math.prod(a.shape) * a.dtype.itemsize for a in inputs)
    return max(1, min(config.log_every, CHUNK_INPUT_BYTES // max(per_step, 1)))


def _abstract_host(source) -> dict[str, jax.ShapeDtypeStruct]:
    return {name: jax.ShapeDtypeStruct(shape, dtype) for name, (shape, dtype) in source.host_spec().items()}


def _chunks(done: int, config: RunConfig, limit: int):
    """The (first step, length) of every dispatch from ``done`` to the end; a function of the step alone,
    so a resumed run cuts (and so computes) its chunks exactly as an uninterrupted one."""
    while done < config.steps:
        n = min(_next_chunk(done, config), limit - done % limit)
        yield done, n
        done += n


def _record(step: int, logged: list, elapsed: float) -> dict[str, Any]:
    """The metrics record of the chunks since the last one: mean loss of the applied steps, mean gradient
    norm, skipped steps."""
    losses, skipped, grad_norms = (np.concatenate(parts) for parts in zip(*logged, strict=True))
    applied = skipped == 0
    record = {
        "step": step,
        "loss": float(losses[applied].mean()) if applied.any() else math.nan,
        "grad_norm": float(grad_norms.mean()),
        "time": round(elapsed, 3),
    }
    if skipped.any():
        record["skipped"] = int(skipped.sum())
    return record


def train(
    config: RunConfig,
    run_dir: str | os.PathLike,
    *,
    progress: Callable[[int], Any] | None = None,
    log: Callable[[str], Any] | None = None,
    data_dir: str | None = None,
    devices: int | None = None,
    pipeline: bool = True,
    solver_threads: int | None = None,
    source: Any = None,
    stop: Callable[[], bool] | None = None,
    tensorboard: bool = False,
    loggers: Sequence[Any] = (),
    initial_state: TrainState | None = None,
) -> Run:
    """Train ``config`` in ``run_dir``, resuming exactly from its latest good checkpoint if it has one.

    One loop for every data source (2D samplers, tfds images). A new directory gets the config; one that
    holds a run must hold the same config (else a ValueError names the differing fields), unless that
    run never saved a checkpoint: then it starts again with ``config`` (its ``config.json`` and
    ``metrics.jsonl`` kept as ``.old``, reported through ``log``).

    Before anything is written, the configuration, devices, data and model are checked (ValueError /
    TypeError naming the argument), then ``run_dir`` (see ``check_run_dir``). The directory is locked
    while training (``train.lock``): a second ``train`` of it raises BlockingIOError at once, and a lock
    left by a killed process is taken over. With several processes (jax.distributed) every process
    must be given the same ``run_dir`` and ``config``; if one is not, or fails to start, all raise
    within the start-up instead of waiting for each other. Process 0 alone locks and writes.

    Devices: the batch is sharded over ``devices`` devices (default: every device the run sees, over all
    processes), the state replicated; the loss is the mean over the global batch, so the run trains what
    one device would, up to the order of floating-point reductions.

    Each dispatch runs several steps under ``lax.scan`` (up to the next log or checkpoint boundary, fewer
    where a step's inputs are large). Randomness and data are functions of (seed, step): a run killed at
    any moment and started again ends with the same parameters, bit for bit. Host work overlaps the
    device: a thread reads and places the next chunks' host data; with ``pipeline`` (default) a
    host-solved coupling (exact OT) is solved for chunk k+1 on ``solver_threads`` host threads while the
    device runs chunk k, once per global batch, and the step receives the pairs as a sharded input
    (``pipeline=False`` solves inside the step, where the device waits for the host). Checkpoints are
    written asynchronously every ``checkpoint_every`` steps and at the end, keeping the last
    ``keep_checkpoints``; unreadable ones are reported through ``log`` and set aside, and so are
    unparsable lines of ``metrics.jsonl`` (``resume_metrics``).
    ``progress(n)`` is called after every chunk of n steps.

    Non-finite values: every step reports whether its loss, gradient norm and updated parameters and
    optimiser state are finite. With ``on_nonfinite="stop"`` the first bad step raises
    FloatingPointError naming the step and the quantity; that state is never saved, and the checkpoints
    already written are kept. With ``"skip"`` such steps leave the state unchanged and are counted.

    ``stop()`` (e.g. set by Ctrl-C) is polled before every dispatch (by all processes together); when it
    returns True the loop saves the current step if it is at a log boundary and not saved yet, waits for
    the checkpoint writes and raises ``TrainingInterrupted``. The same call resumes it, bit for bit.

    ``source`` replaces the data the configuration names (``fmjax.data.sources``: an object with
    ``host_spec()``, ``host_batch(step)`` and ``pair(key, host)``, e.g. an ``ImageSource`` over any
    random-access records); the model still follows ``config`` (``dataset`` picks the UNet's shape).

    Metrics also go, from process 0, to TensorBoard event files in ``run_dir/tensorboard`` when
    ``tensorboard`` (a resumed run's new file purges the steps after its checkpoint) and to each of
    ``loggers`` (objects with ``scalars(dict, step)``, e.g. ``fmjax.tensorboard.WandbLogger``), as
    ``train/<name>``.

    ``initial_state`` (e.g. a teacher's parameters for a reflow run) replaces the configuration's
    initial state when the run starts without a checkpoint; it must have that state's structure.
    """
    run_dir = os.fspath(run_dir)
    say = log or (lambda message: None)

    def prepare():
        mesh = make_mesh(devices)
        device_count = 1 if mesh is None else mesh.devices.size
        if config.batch_size % device_count:
            raise ValueError(
                f"batch_size {config.batch_size} cannot be split evenly over {device_count} devices; "
                f"use a multiple of {device_count} or restrict the devices (--devices)"
            )
        data = _source(config, data_dir, run_dir) if source is None else source
        run = Run.build(config)
        if initial_state is not None:
            expected, given = jax.tree.structure(run.state), jax.tree.structure(initial_state)
            if expected != given:
                raise ValueError("initial_state must have the structure of this configuration's TrainState")
            run.state = initial_state
        return mesh, data, run

    # everything that can be checked is checked before anything is written
    if jax.process_count() == 1:
        mesh, data, run = prepare()
    else:
        prepared, failure = None, None
        try:
            prepared = prepare()
        except Exception as error:  # any failure to start: the other processes must not wait for this one
            failure = error
        _agree(run_dir, config, failure)
        mesh, data, run = prepared
    env = environment(mesh)
    lock, failure = None, None
    if jax.process_index() == 0:
        try:
            lock = _take_run_dir(config, run_dir, env, say)
        except Exception as error:
            failure = error
    if jax.process_count() > 1:
        _broadcast_outcome(failure)  # the others wait for process 0's directory; it raises its own error
    elif failure is not None:
        raise failure
    try:
        sinks = (tensorboard, tuple(loggers))
        state, start = _train_loop(
            config, run_dir, run, mesh, data, say, progress, pipeline, solver_threads, stop, sinks
        )
    finally:
        if lock is not None:
            lock.release()
    if mesh is not None:  # a host copy of the replicated state, for evaluation on one process
        state = jax.tree.map(lambda a: jnp.asarray(a.addressable_data(0)), state)
    run.state = state
    run.environment = env
    run.trained_steps = config.steps - start
    return run


def _stop_requested(stop: Callable[[], bool] | None) -> bool:
    """``stop()``, agreed by all processes (any of them asking stops all, at the same chunk)."""
    if stop is None:
        return False
    asked = bool(stop())
    if jax.process_count() == 1:
        return asked
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(asked))).any())


def _metric_sinks(stack: contextlib.ExitStack, run_dir: str, sinks, resumed: int | None) -> list:
    """The writers the records also go to (process 0): TensorBoard files when asked, and the loggers."""
    tensorboard, loggers = sinks
    out = list(loggers)
    if tensorboard:
        from fmjax.tensorboard import SummaryWriter

        directory = os.path.join(run_dir, TENSORBOARD_DIR)
        # a resumed run's records after its checkpoint were logged by the run that stopped: TensorBoard drops
        # them (the records up to the checkpoint's step belong to it and stay)
        purge = None if resumed is None else resumed + 1
        out.append(stack.enter_context(SummaryWriter(directory, purge_step=purge)))
    return out


def log_to_sinks(sinks: Sequence[Any], prefix: str, record: dict[str, Any], step: int) -> None:
    """``record``'s real scalars as ``prefix/name`` at ``step`` to each sink (``scalars(dict, step)``)."""
    from fmjax.tensorboard import scalar_values

    values = {f"{prefix}/{name}": value for name, value in scalar_values(record).items()}
    for sink in sinks:
        sink.scalars(values, step)


def _train_loop(config, run_dir, run, mesh, source, say, progress, pipeline, solver_threads, stop, sinks):
    """The training loop of ``train`` in a locked, checked run directory; returns the final state and the
    step it started from."""
    from fmjax._pipeline import HostPairs, Prefetcher

    writer = jax.process_index() == 0
    coupling = config.make_coupling()
    host_solved = pipeline and hasattr(coupling, "solve_host")
    step = config.make_step(run.apply_fn, run.optimizer, mesh=mesh, host_pairs=host_solved)
    data_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)
    if mesh is not None:
        replicated = NamedSharding(mesh, PartitionSpec())
        batch = NamedSharding(mesh, PartitionSpec("data"))
        chunked = NamedSharding(mesh, PartitionSpec(None, "data"))
    constrain = (lambda x: x) if mesh is None else (lambda x: jax.lax.with_sharding_constraint(x, batch))

    def pair(step_index, host):
        x0, x1, cond = _pair(config, source, jax.random.fold_in(data_key, step_index), host)
        return constrain(x0), constrain(x1), None if cond is None else constrain(cond)

    def one(state, inputs):
        host, j = inputs
        x0, x1, cond = pair(state.step, host)
        if j is not None:  # pairs solved on the host: (x0[k], x1[j[k]]); the labels move with x1
            x1 = constrain(x1[j])
            cond = None if cond is None else constrain(cond[j])
        return step(state, x0, x1) if cond is None else step(state, x0, x1, cond)

    def scan(state, host, pairs, n):
        if n == 1:  # no loop (see _steps_per_dispatch): the step's outputs gain the chunk's axis
            state, metrics = one(state, jax.tree.map(lambda a: a[0], (host, pairs)))
            metrics = jax.tree.map(lambda a: a[None], metrics)
        else:
            state, metrics = jax.lax.scan(one, state, (host, pairs), length=n)
        skipped = metrics.get("skipped", jnp.zeros(n, jnp.int32))
        return state, metrics["loss"], metrics["grad_norm"], skipped, metrics["nonfinite"]

    def host_inputs(first, host, n):
        steps = first + jnp.arange(n)
        return jax.vmap(lambda s, h: _host_inputs(config, coupling, *pair(s, h)))(steps, host)

    initial = run.state
    if mesh is None:
        chunk = jax.jit(scan, static_argnums=3, donate_argnums=0)
        prepare = jax.jit(host_inputs, static_argnums=2)
    else:
        initial = jax.device_put(initial, replicated)
        chunk = jax.jit(scan, static_argnums=3, donate_argnums=0, out_shardings=replicated)
        prepare = jax.jit(host_inputs, static_argnums=2, out_shardings=replicated)
    limit = _steps_per_dispatch(config, source, coupling if host_solved else None)

    def place(item):
        """The host data of a chunk, stacked [n, local batch, ...] and placed with the batch sharding."""
        first, n = item
        host = list(readers.map(source.host_batch, range(first, first + n)))
        stacked = {name: np.stack([h[name] for h in host]) for name in source.host_spec()}
        if mesh is None:
            return jax.device_put(stacked)
        return {k: jax.make_array_from_process_local_data(chunked, v) for k, v in stacked.items()}

    def put_pairs(j):
        """The pairs of a chunk ([n, global batch], the same in every process), sharded like the batch."""
        if mesh is None:
            return jnp.asarray(j)
        return jax.make_array_from_callback(j.shape, chunked, lambda index: j[index])

    metrics_path = os.path.join(run_dir, METRICS_FILE)
    solver = HostPairs(coupling, threads=solver_threads) if host_solved else None
    from fmjax._assignment import HAVE_NATIVE

    if config.coupling == "exact" and not HAVE_NATIVE and writer:
        say(
            "the exact coupling is solved by POT: fmjax's C solver was not built (no C compiler at install), "
            "which is 3-6x slower; reinstall with a C compiler to build it"
        )
    with contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(
            Checkpointer(os.path.join(run_dir, CHECKPOINT_DIR), max_to_keep=config.keep_checkpoints)
        )
        if solver is not None:
            stack.callback(solver.close)
        state, resumed, skipped = ckpt.restore_latest_good(initial, accept=_holds_its_step)
        for bad, reason in skipped:
            say(f"checkpoint {bad} is unreadable ({reason}); set aside as {bad}.corrupt")
        done = 0 if resumed is None else int(state.step)
        start_step = done
        saved = done  # the newest step known to be saved (or the start)
        if writer:
            resume_metrics(metrics_path, done, say)
        if resumed is not None:
            say(f"resuming from checkpoint {resumed}")
            if progress is not None:
                progress(done)
        metrics_log = stack.enter_context(open(metrics_path if writer else os.devnull, "a"))
        sinks = _metric_sinks(stack, run_dir, sinks, resumed) if writer else []
        readers = stack.enter_context(ThreadPoolExecutor(INPUT_THREADS, thread_name_prefix="fmjax-input"))
        prefetch = Prefetcher(_chunks(done, config, limit), place)
        stack.callback(prefetch.close)
        upcoming = next(prefetch, None)
        pairs = None
        if solver is not None and upcoming is not None:
            (first, n), host = upcoming
            pairs = put_pairs(solver.solve(prepare(first, host, n)))
        start, logged, host_busy = time.perf_counter(), [], (0.0, 0.0)
        while upcoming is not None:
            if _stop_requested(stop):
                if not logged and done != saved:  # a log boundary: records and state agree here
                    ckpt.save(done, state)
                ckpt.wait()
                raise TrainingInterrupted(done, ckpt.latest_step())
            (first, n), host = upcoming
            upcoming = next(prefetch, None)
            ahead = None
            if solver is not None and upcoming is not None:  # queued before chunk k, so it runs first
                (next_first, next_n), next_host = upcoming
                ahead = prepare(next_first, next_host, next_n)
            state, losses, grad_norm, skip_flags, nonfinite = chunk(state, host, pairs, n)
            if ahead is not None:  # solved on host threads while the device runs chunk k
                pairs = put_pairs(solver.solve(ahead))
            losses, skip_flags, grad_norm = np.asarray(losses), np.asarray(skip_flags), np.asarray(grad_norm)
            nonfinite = np.asarray(nonfinite)
            bad = first_nonfinite(nonfinite, skip_flags)
            if bad is not None:  # "stop": this chunk's state is never saved
                ckpt.wait()
                last = ckpt.latest_step()
                kept = f"the last good checkpoint is step {last}" if last is not None else "no checkpoint yet"
                what = _nonfinite_message(int(nonfinite[bad]), float(losses[bad]), float(grad_norm[bad]))
                raise FloatingPointError(
                    f"{what} at step {done + bad + 1}; training stopped. {kept}"
                    " (lower the learning rate, or pass --on-nonfinite skip)"
                )
            done += n
            logged.append((losses, skip_flags, grad_norm))
            if skip_flags.any():
                say(
                    f"skipped {int(skip_flags.sum())} step(s) with a non-finite loss, gradient or state, "
                    f"first at step {done - n + int(np.flatnonzero(skip_flags)[0]) + 1}"
                )
            if done % config.log_every == 0 or done == config.steps:
                record = _record(done, logged, time.perf_counter() - start)
                # host work since the last record (the input thread runs up to two chunks ahead)
                busy = (prefetch.busy_seconds, solver.busy_seconds if solver is not None else 0.0)
                record["host_input_s"] = round(busy[0] - host_busy[0], 4)
                if solver is not None:
                    record["host_solve_s"] = round(busy[1] - host_busy[1], 4)
                host_busy = busy
                metrics_log.write(json.dumps(record) + "\n")
                metrics_log.flush()
                log_to_sinks(sinks, "train", record, done)
                logged = []
            if done % config.checkpoint_every == 0 or done == config.steps:
                ckpt.save(done, state, wait=done == config.steps)
                saved = done
            if progress is not None:
                progress(n)
        ckpt.wait()
    return state, start_step


def _holds_its_step(state: TrainState, step: int) -> str | None:
    """A checkpoint named ``step`` must hold the state of that step (not a copy of another's)."""
    held = int(np.asarray(state.step.addressable_data(0)))  # replicated: this process's copy
    return None if held == step else f"it holds the state of step {held}"


def load_run(run_dir: str | os.PathLike, *, log: Callable[[str], Any] | None = None) -> Run:
    """Rebuild a run from its directory: configuration and the newest checkpoint that reads back.

    Only reads (nothing is renamed or written, so it may run beside ``train``): a newer checkpoint that
    does not read back is reported through ``log`` ("checkpoint N in DIR is unreadable (...); using
    checkpoint M") and skipped.

    Raises:
      FileNotFoundError: ``run_dir`` is not a run, or has no checkpoint that reads back (one line naming
        the unreadable ones).
      ValueError: its configuration does not parse, or its ``checkpoints`` is not a directory.
    """
    run_dir = os.fspath(run_dir)
    config_path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{run_dir!r} is not an fmjax run: no {CONFIG_FILE}")
    config = _read_config(run_dir)
    run = Run.build(config)
    directory = os.path.join(run_dir, CHECKPOINT_DIR)
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise ValueError(f"run {run_dir!r}: {CHECKPOINT_DIR} is not a directory")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"run {run_dir!r} has no checkpoint yet")
    with Checkpointer(directory, read_only=True) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"run {run_dir!r} has no checkpoint yet")
        state, step, skipped = ckpt.restore_latest_good(run.state, accept=_holds_its_step)
    if step is None:
        unreadable = ", ".join(f"{s} ({reason})" for s, reason in skipped)
        raise FileNotFoundError(f"run {run_dir!r} has no checkpoint that reads back: {unreadable}"[:400])
    for bad, reason in skipped:
        if log is not None:
            log(f"checkpoint {bad} in {directory} is unreadable ({reason}); using checkpoint {step}")
    run.state = state
    return run


def check_finite_params(run: Run) -> Any:
    """The parameters a run evaluates with (EMA unless ``eval_ema=False``); ValueError if any is NaN/inf."""
    params = run.state.ema_params if run.config.eval_ema else run.state.params
    leaves = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if leaves and not bool(jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))):
        which = "EMA parameters" if run.config.eval_ema else "parameters"
        raise ValueError(
            f"run's {which} at step {int(run.state.step)} are not finite (NaN or inf): nothing to evaluate; "
            "train it again with a lower learning rate"
        )
    return params


def run_velocity(config: RunConfig, apply_fn, params, *, labels: Any = None, guidance: float = 1.0):
    """The velocity field of a run's model: unconditional, or conditioned on ``labels`` (int [n]).

    ``guidance`` w (conditional runs): v_null + w (v_cond - v_null) through ``fmjax.guided_velocity``
    (w = 1 is the conditional field, 0 the unconditional one; one model call per evaluation at w = 1,
    one batched call of twice the batch otherwise).
    """
    guidance = check_real("guidance", guidance)
    if not config.conditional:
        if labels is not None or guidance != 1.0:
            raise ValueError("class and guidance need a conditional run (trained with --conditional)")
        return as_velocity(apply_fn, params)
    if labels is None:
        raise ValueError("labels are required for a conditional run's model")
    labels = jnp.asarray(labels, jnp.int32)
    if guidance == 1.0:
        return as_velocity(apply_fn, params, cond=labels)
    from fmjax.guidance import guided_velocity

    return guided_velocity(apply_fn, params, labels, scale=guidance, null_cond=config.null_cond())


def check_class(config: RunConfig, label: Any) -> int:
    """``label`` as a class id of a conditional run (0 .. num_classes - 1), named when it is not one."""
    if not config.conditional:
        raise ValueError("class needs a conditional run (trained with --conditional)")
    return check_int("class", label, low=0, high=config.num_classes - 1)


def class_points(name: str, key: jax.Array, label: int, n: int) -> np.ndarray:
    """``n`` points [n, 2] of toy distribution ``name`` drawn from class ``label`` alone (the labelled
    draws of ``fmjax.data.toy.sample_labeled`` whose label is ``label``, in order)."""
    kept, have, draw = [], 0, 0
    while have < n:
        points, labels = sample_labeled(name, jax.random.fold_in(key, draw), 4 * n)
        mine = np.asarray(points)[np.asarray(labels) == label]
        kept.append(mine)
        have += len(mine)
        draw += 1
    return np.concatenate(kept)[:n]


def evaluate(
    run: Run,
    run_dir: str | os.PathLike,
    *,
    plots: bool = True,
    data_dir: str | None = None,
    tensorboard: bool = False,
    loggers: Sequence[Any] = (),
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Sample from the trained model and measure it against fresh target samples.

    Writes ``summary.json`` (and the plots) into ``run_dir`` and appends the result to the metrics.
    W2 is exact (POT) on ``eval_samples`` points with the adaptive ``eval_solver``; path energy and
    NPE come from a 100-step Euler solve, as in the OT-CFM papers; ``w2_euler_steps`` is the W2 after
    1, 2, 4 and 8 Euler steps (what fewer steps cost; image runs: ``fd_euler_steps``, the pixel-space
    Fréchet distance to test images, see ``fmjax.image_runs.evaluate_images``). ``w2_target_floor`` is the W2
    between two independent target samples of the same size: no model can be expected to go below it.
    The summary's real scalars also go to ``run_dir/tensorboard`` (``tensorboard``) and ``loggers`` as
    ``eval/<name>`` at the run's step. ``log`` hears what each stage is doing (a line before each).
    """
    summary = _evaluate(run, run_dir, plots=plots, data_dir=data_dir, say=log or (lambda message: None))
    with contextlib.ExitStack() as stack:
        sinks = _metric_sinks(stack, os.fspath(run_dir), (tensorboard, tuple(loggers)), None)
        log_to_sinks(sinks, "eval", summary, summary["step"])
    return summary


def _evaluate(
    run: Run, run_dir, *, plots: bool, data_dir: str | None, say: Callable[[str], Any]
) -> dict[str, Any]:
    config = run.config
    check_finite_params(run)
    if config.dataset is not None:
        from fmjax import image_runs

        summary = image_runs.evaluate_images(
            config, run.apply_fn, run.state, os.fspath(run_dir), data_dir=data_dir, plots=plots,
            environment=run.environment, log=say,
        )  # fmt: skip
        append_record(os.path.join(os.fspath(run_dir), METRICS_FILE), {"event": "eval", **summary})
        return summary
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 3)
    k_source, k_target, k_floor = jax.random.split(key, 3)
    x0 = toy_sample(config.source, k_source, config.eval_samples)
    labels = None
    if config.conditional:  # the target points' own labels: the conditional model draws their classes
        x1_true, labels = sample_labeled(config.target, k_target, config.eval_samples)
    else:
        x1_true = toy_sample(config.target, k_target, config.eval_samples)
    params = run.state.ema_params if config.eval_ema else run.state.params
    velocity = run_velocity(config, run.apply_fn, params, labels=labels)

    say(f"evaluating: sampling {config.eval_samples} points ({config.eval_solver}, then 100 Euler steps)")
    adaptive = sample(velocity, x0, solver=config.eval_solver)
    euler = sample(velocity, x0, solver="euler", steps=100, save_trajectory=True)
    say(
        f"evaluating: exact W2 to {config.eval_samples} target points (POT), and after 1, 2, 4, 8 Euler steps"
    )
    w2 = wasserstein2(adaptive.x1, x1_true)
    w2_euler = wasserstein2(euler.x1, x1_true)
    w2_source = wasserstein2(x0, x1_true)
    w2_floor = wasserstein2(toy_sample(config.target, k_floor, config.eval_samples), x1_true)
    w2_few = {
        str(steps): wasserstein2(sample(velocity, x0, solver="euler", steps=steps).x1, x1_true)
        for steps in EULER_STEPS
    }
    energy = float(path_energy(euler.trajectory))
    summary = {
        "step": int(run.state.step),
        "w2": w2,
        "nfe": int(adaptive.nfe),
        "solver": config.eval_solver,
        "w2_euler100": w2_euler,
        "w2_euler_steps": w2_few,
        "path_energy": energy,
        "npe": normalized_path_energy(energy, w2_source),
        "w2_source_target": w2_source,
        "w2_target_floor": w2_floor,
        "params": "ema" if config.eval_ema else "raw",
        "eval_samples": config.eval_samples,
        **(_per_class_w2(adaptive.x1, x1_true, labels, config.num_classes) if config.conditional else {}),
        **({"environment": run.environment} if run.environment else {}),
    }
    run_dir = os.fspath(run_dir)
    write_atomic(os.path.join(run_dir, SUMMARY_FILE), json.dumps(summary, indent=2))
    append_record(os.path.join(run_dir, METRICS_FILE), {"event": "eval", **summary})
    if plots:
        from fmjax import plotting

        say("evaluating: plots")
        params_used = "EMA parameters" if config.eval_ema else "raw parameters"
        plotting.samples(
            os.path.join(run_dir, "samples.png"),
            np.asarray(adaptive.x1),
            np.asarray(x1_true),
            title=f"{config.source} -> {config.target}, step {summary['step']} ({params_used}): "
            f"{config.eval_solver}, NFE = {summary['nfe']}, W2 = {w2:.3f} (floor {w2_floor:.3f})",
        )
        plotting.trajectories(
            os.path.join(run_dir, "trajectories.png"),
            euler.trajectory,
            count=300,
            title=f"300 trajectories, 100 Euler steps ({params_used}); NPE = {summary['npe']:.3f}",
        )
        plotting.loss_curve(
            os.path.join(run_dir, "loss.png"),
            os.path.join(run_dir, METRICS_FILE),
            title=f"training loss: path {config.path}, coupling {config.coupling}, batch {config.batch_size}",
        )
    return summary


def _per_class_w2(generated, target, labels, num_classes: int) -> dict[str, Any]:
    """W2 between the generated and the target points of each class (they share the labels)."""
    generated, target, labels = np.asarray(generated), np.asarray(target), np.asarray(labels)
    per_class = [
        wasserstein2(generated[labels == k], target[labels == k]) if (labels == k).sum() > 1 else math.nan
        for k in range(num_classes)
    ]
    return {"conditional": True, "w2_per_class": per_class}


def generate(
    run: Run,
    *,
    n: int,
    solver: str = "dopri5",
    steps: int | None = None,
    seed: int = 0,
    label: int | None = None,
    guidance: float = 1.0,
) -> tuple[np.ndarray, int, float]:
    """Draw ``n`` samples from a trained run; return (samples, nfe, W2 to fresh target samples).

    Conditional runs: ``label`` K draws every sample of class K and compares with target points of
    class K; without it the classes are drawn as the target's are (and compared with the whole
    target). ``guidance`` w is classifier-free guidance (see ``run_velocity``).
    """
    check_int("n", n, low=1)
    config = run.config
    if label is not None:
        label = check_class(config, label)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 4)
    k_source, k_target = jax.random.split(key)
    params = check_finite_params(run)
    x0 = toy_sample(config.source, k_source, n)
    labels = None
    if label is not None:
        labels = np.full(n, label, np.int32)
        target = class_points(config.target, k_target, label, n)
    elif config.conditional:
        target, labels = sample_labeled(config.target, k_target, n)
    else:
        target = toy_sample(config.target, k_target, n)
    velocity = run_velocity(config, run.apply_fn, params, labels=labels, guidance=guidance)
    result = sample(velocity, x0, solver=solver, steps=steps)
    x1 = np.asarray(result.x1)
    return x1, int(result.nfe), wasserstein2(x1, target)


def negative_log_likelihood(
    run: Run,
    *,
    n: int,
    divergence: str = "exact",
    num_probes: int = 1,
    probe: str = "rademacher",
    solver: str = "dopri5",
    seed: int = 0,
) -> dict[str, float]:
    """Mean negative log-likelihood (nats per point) of ``n`` fresh target points under the trained flow.

    Needs a source with a closed-form density (``fmjax.data.TOY_LOG_DENSITIES``). A conditional run's
    is of each point given its label, -log p(x | y).
    """
    from fmjax.data.toy import log_density
    from fmjax.likelihood import log_likelihood

    check_int("n", n, low=2)
    log_p0 = log_density(run.config.source)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 5)
    k_target, k_probe = jax.random.split(key)
    labels = None
    if run.config.conditional:
        x1, labels = sample_labeled(run.config.target, k_target, n)
    else:
        x1 = toy_sample(run.config.target, k_target, n)
    params = check_finite_params(run)
    result = log_likelihood(
        run_velocity(run.config, run.apply_fn, params, labels=labels),
        x1,
        log_p0=log_p0,
        divergence=divergence,
        num_probes=num_probes,
        probe=probe,
        key=k_probe if divergence == "hutchinson" else None,
        solver=solver,
    )
    nll = -np.asarray(result.log_p, np.float64)
    return {
        "nll": float(nll.mean()),
        "nll_stderr": float(nll.std(ddof=1) / math.sqrt(n)),
        "bits_per_dim": float(nll.mean() / (2 * math.log(2))),
        "nfe": int(result.nfe),
        "divergence": divergence,
        "n": n,
        **({"conditional": True} if run.config.conditional else {}),
    }


REFLOW_INITS = ("scratch", "teacher")
DEFAULT_REFLOW_PAIRS = {"toy": 20_000, "images": 4_096}


def prepare_reflow(
    teacher_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    pairs: int | None = None,
    solver: str = "dopri5",
    solver_steps: int | None = None,
    init: str = "scratch",
    overrides: dict[str, Any] | None = None,
    log: Callable[[str], Any] | None = None,
) -> tuple[RunConfig, TrainState | None]:
    """Prepare a reflow run (rectified flow's k-th reflow, k = the teacher's + 1) in ``run_dir``.

    Solves the teacher's flow (``fmjax.reflow.reflow_pairs``, with its EMA parameters unless it
    evaluates raw ones) from ``pairs`` fresh source points, drawn from (the configuration's seed, 6),
    and stores the pairs as ``run_dir/pairs.npz`` with their provenance. The student's configuration
    is the teacher's with the straight path without noise (``linear``, sigma 0: rectified flow's
    interpolation of deterministic pairs), the independent coupling (which keeps the pairing) and
    ``pairs`` set, then ``overrides`` (e.g. ``{"steps": 5000}``). Returns it and the state to start
    from: None (``init="scratch"``, the configuration's own initialisation) or the teacher's
    parameters with a fresh optimiser (``init="teacher"``); pass both to ``train``.

    Prepared again (the same command after an interruption), the stored pairs are used if they come
    from the same teacher and settings; other pairs are refused. ValueError names a bad argument, a
    conditional teacher (pairs carry no labels) or a ``run_dir`` that cannot hold the run.
    """
    from fmjax._checks import check_choice as choice
    from fmjax.data.pairs import load_pairs, save_pairs
    from fmjax.reflow import reflow_pairs

    say = log or (lambda message: None)
    run_dir = os.fspath(run_dir)
    init = choice("init", init, REFLOW_INITS)
    teacher = load_run(teacher_dir, log=log)
    tconfig = teacher.config
    if tconfig.conditional:
        raise ValueError(
            "teacher is a conditional run: reflow pairs carry no labels (reflow an unconditional run)"
        )
    if pairs is None:
        pairs = DEFAULT_REFLOW_PAIRS["toy" if tconfig.dataset is None else "images"]
    n = check_int("pairs", pairs, low=1)
    fields = {
        **tconfig.to_json(),
        "path": "linear",
        "sigma": 0.0,
        "coupling": "independent",
        "pairs": PAIRS_FILE,
        **(overrides or {}),
    }
    config = RunConfig(**fields)
    if config.batch_size > n:
        raise ValueError(f"pairs must be at least the batch size {config.batch_size}; got {n}")
    if solver_steps is not None:
        check_int("solver_steps", solver_steps, low=1)
    check_choice("solver", solver, SOLVERS)
    check_run_dir(config, run_dir)
    provenance = {
        "teacher": os.path.abspath(os.fspath(teacher_dir)),
        "teacher_step": int(teacher.state.step),
        "pairs": n,
        "solver": solver,
        "solver_steps": solver_steps,
        "seed": config.seed,
    }
    path = pairs_path(config, run_dir)
    if os.path.isfile(path):
        stored = load_pairs(path)[2]
        differing = sorted(k for k, v in provenance.items() if stored.get(k) != v)
        if differing:
            raise ValueError(
                f"run_dir {run_dir!r} holds pairs of another reflow (differs in {', '.join(differing)}); "
                "use a new --out"
            )
        say(f"using the {n} pairs already solved in {path}")
    else:
        params = check_finite_params(teacher)
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 6)
        if tconfig.dataset is None:
            x0 = toy_sample(tconfig.source, key, n)
        else:
            from fmjax.image_runs import image_shape

            x0 = jax.random.normal(key, (n, *image_shape(tconfig)))
        say(f"solving the teacher's flow ({solver}) from {n} source points for the reflow pairs")
        start = time.perf_counter()
        solved = reflow_pairs(
            as_velocity(teacher.apply_fn, params), x0, solver=solver, steps=solver_steps, batch_size=4096
        )
        seconds = time.perf_counter() - start
        os.makedirs(run_dir, exist_ok=True)
        metadata = {**provenance, "nfe": int(solved.nfe.sum()), "seconds": round(seconds, 3)}
        save_pairs(path, solved.x0, solved.x1, metadata=metadata)
        say(f"solved {n} pairs in {seconds:.1f} s ({metadata['nfe']} field evaluations); wrote {path}")
    if init == "scratch":
        return config, None
    student = Run.build(config)
    if jax.tree.structure(student.state.params) != jax.tree.structure(teacher.state.params):
        raise ValueError(
            "init 'teacher' needs the teacher's architecture; leave width, depth and activation as they are"
        )
    params = teacher.state.ema_params if tconfig.eval_ema else teacher.state.params
    return config, TrainState.create(params=params, optimizer=student.optimizer, key=student.state.key)

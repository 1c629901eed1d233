"""Tong et al.'s CIFAR-10 recipe (I-CFM / OT-CFM, FID 3.5 at 400k steps) with fmjax's pieces, resumable.

The recipe is TorchCFM's examples/images/cifar10/train_cifar10.py; each choice and where fmjax stands:

- model: a UNet with 128 base channels, channel multipliers (1, 2, 2, 2), 2 residual blocks per level,
  GroupNorm in 32 groups, self-attention at 16x16 (heads of 64 channels: 4 heads at its 256 channels)
  and dropout 0.1 in the residual blocks, their ``UNetModelWrapper(num_res_blocks=2, num_channels=128,
  channel_mult=[1, 2, 2, 2], num_heads=4, num_head_channels=64, attention_resolutions="16",
  dropout=0.1)`` (``fmjax.models.UNet(in_channels=3, channels=128, channel_mults=(1, 2, 2, 2),
  num_res_blocks=2, groups=32, image_size=32, attention_resolutions=(16,), num_head_channels=64,
  dropout=0.1)``, see ``make_model``). Dropout acts in the training step only (``make_train_step``
  gives the model a fresh dropout key each step); the EMA samples are drawn without it;
- path: the linear path with sigma = 0 (``Linear(sigma=0)``: x_t = (1 - t) x0 + t x1, u_t = x1 - x0),
  uniform t, from N(0, I); coupling ``exact`` (OT-CFM, their default ``--model otcfm``) or
  ``independent`` (I-CFM, ``--model icfm``), on each batch;
- optimiser: Adam (b1 0.9, b2 0.999, eps 1e-8, no weight decay; PyTorch's defaults), learning rate
  2e-4 after a linear warm-up from 0 over 5000 steps (their ``LambdaLR(min(step, 5000) / 5000)``: the
  update of step k uses 2e-4 min(k, 5000) / 5000, so the first update uses 0), then constant; the
  gradient clipped to global norm 1.0 first: ``optax.chain(clip_by_global_norm(1.0),
  adam(linear_schedule(0, 2e-4, 5000)))``;
- 400k steps of batch 128, EMA of the parameters with decay 0.9999 updated every step;
- data: the 50k CIFAR-10 training images, each epoch shuffled, flipped left-right with probability
  1/2 and scaled to [-1, 1] as x / 127.5 - 1 (their ToTensor + Normalize(0.5, 0.5); no dequantisation);
- every 20k steps: a checkpoint and a grid of 64 EMA samples with 100 Euler steps (their
  ``generate_samples``). Their FID (50k dopri5 samples at rtol = atol = 1e-5, clean-fid against the
  training set) is computed afterwards from the EMA parameters of the last checkpoint.

The loop is fmjax's pieces: ``make_train_step`` (jitted; data-parallel over all local devices when
there are several), ``fmjax.data.sources.ImageSource`` on ``data_source("cifar10")`` (a step's
images are a function of the step alone), and ``fmjax.checkpoint.Checkpointer`` (orbax). Run again
with the same ``--out`` to resume from the newest checkpoint that reads back; the steps after it are
repeated exactly (same images, flips, noise and times). The random streams are the runs' own
(``fmjax.runs.stream_key``): the initial state from "init", each step's flips and noise from "data".

Why a loop of its own and not ``fmjax.runs.train``: a ``RunConfig`` expresses the model, the optimiser
(Adam is AdamW with weight decay 0; warm-up and clip) and the step, and a source of this file's own could
give it the recipe's batches (x / 127.5 - 1 with flips, no dequantisation). What ``fmjax.runs.train``
lacks is the rest of the recipe's run: a grid of EMA samples at every save point, drawn while the run
goes on (it has no hook with the state at a checkpoint); resuming with a larger ``steps`` (or another
``save_every``, ``log_every``, ``keep_checkpoints``), which it refuses once a checkpoint exists because the
configuration differs; keeping every checkpoint (``keep_checkpoints`` must be a number there); and the
learning rate of each record in ``metrics.jsonl``.

On a machine with the data (tfds's ``cifar10`` prepared under ``--data-dir``; the first use downloads
it) and an accelerator:

    python -m experiments.cifar10 --data-dir ~/tensorflow_datasets --out runs/cifar10_otcfm
    python -m experiments.cifar10 --coupling independent --out runs/cifar10_icfm    # I-CFM

The run directory holds ``recipe.json`` (the settings; a resumed run must match them, except
``steps``), ``metrics.jsonl`` (step, loss, gradient norm before clipping, learning rate, seconds),
``checkpoints/<step>/`` (the ``TrainState``: step, params, Adam state, EMA params, key) and
``samples_<step>.png``. tests/experiments/test_cifar10.py runs it for a few steps at a tiny width on tfds's
mock data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmjax.checkpoint import Checkpointer
from fmjax.couplings import make_coupling
from fmjax.data.sources import ImageSource
from fmjax.data.tfds_sources import data_source
from fmjax.models import UNet, functional
from fmjax.paths import Linear
from fmjax.runs import stream_key
from fmjax.sampling import as_velocity, sample
from fmjax.training import TrainState, make_train_step

__all__ = [
    "Recipe",
    "RECIPE",
    "NOT_IN_FMJAX",
    "learning_rate",
    "make_optimizer",
    "augment",
    "make_model",
    "build",
    "train",
]

IMAGE_SHAPE = (32, 32, 3)
RECIPE_FILE = "recipe.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
# Parts of TorchCFM's UNetModelWrapper(num_res_blocks=2, num_channels=128, channel_mult=[1, 2, 2, 2],
# num_heads=4, num_head_channels=64, attention_resolutions="16", dropout=0.1) that fmjax's UNet lacks:
# none since it has self-attention and dropout (recorded in recipe.json all the same).
NOT_IN_FMJAX: dict[str, Any] = {}
# Fields a resumed run may change: how long it runs and how often it reports.
RESUMABLE_CHANGES = ("steps", "save_every", "log_every", "keep_checkpoints")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """The hyperparameters of a CIFAR-10 CFM run; the defaults are Tong et al.'s (TorchCFM)."""

    channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    groups: int = 32
    attention_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 4
    num_head_channels: int | None = 64
    dropout: float = 0.1
    coupling: str = "exact"
    sigma: float = 0.0
    learning_rate: float = 2e-4
    warmup_steps: int = 5_000
    grad_clip: float = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    batch_size: int = 128
    steps: int = 400_000
    ema_decay: float = 0.9999
    horizontal_flip: bool = True
    seed: int = 0
    save_every: int = 20_000
    keep_checkpoints: int | None = None
    log_every: int = 100
    sample_count: int = 64
    sample_steps: int = 100

    def __post_init__(self):
        for name in ("channels", "num_res_blocks", "groups", "num_heads", "warmup_steps", "batch_size",
                     "steps", "save_every", "log_every", "sample_count", "sample_steps"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        if self.coupling not in ("exact", "independent"):
            raise ValueError(f"coupling must be one of 'exact', 'independent'; got {self.coupling!r}")
        for name in ("learning_rate", "grad_clip", "adam_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1); got {self.ema_decay!r}")
        heads = self.num_head_channels
        if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
            raise ValueError(f"num_head_channels must be None or an int >= 1; got {heads!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout!r}")
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON values."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


RECIPE = Recipe()


def learning_rate(recipe: Recipe) -> optax.Schedule:
    """lr(k) = learning_rate * min(k, warmup_steps) / warmup_steps, k the number of updates done."""
    return optax.linear_schedule(0.0, recipe.learning_rate, recipe.warmup_steps)


def make_optimizer(recipe: Recipe) -> optax.GradientTransformation:
    """Clip the gradient to global norm ``grad_clip``, then Adam with the warm-up ``learning_rate``."""
    return optax.chain(
        optax.clip_by_global_norm(recipe.grad_clip),
        optax.adam(learning_rate(recipe), b1=recipe.adam_b1, b2=recipe.adam_b2, eps=recipe.adam_eps),
    )


def augment(key: jax.Array, images: jax.Array, *, flip: bool = True) -> jax.Array:
    """uint8 images [n, H, W, C] to float32 in [-1, 1] (x / 127.5 - 1), each flipped left-right with
    probability 1/2 (from ``key``) when ``flip``."""
    x = images.astype(jnp.float32) / 127.5 - 1.0
    if not flip:
        return x
    flipped = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
    return jnp.where(flipped, x[:, :, ::-1, :], x)


def make_model(recipe: Recipe) -> UNet:
    """The recipe's UNet for 32x32x3 images, initialised from ``recipe.seed``."""
    return UNet(
        in_channels=IMAGE_SHAPE[-1],
        channels=recipe.channels,
        channel_mults=recipe.channel_mults,
        num_res_blocks=recipe.num_res_blocks,
        groups=recipe.groups,
        image_size=IMAGE_SHAPE[0],
        attention_resolutions=recipe.attention_resolutions,
        num_heads=recipe.num_heads,
        num_head_channels=recipe.num_head_channels,
        dropout=recipe.dropout,
        seed=recipe.seed,
    )


def build(recipe: Recipe) -> tuple[Any, optax.GradientTransformation, TrainState]:
    """``(apply_fn, optimizer, initial TrainState)`` of the recipe's UNet. ``apply_fn(params, t, x)`` is
    deterministic; ``apply_fn(params, t, x, dropout_key=key)`` applies the recipe's dropout."""
    apply_fn, params = functional(make_model(recipe))
    optimizer = make_optimizer(recipe)
    key = stream_key(recipe.seed, "init")
    return apply_fn, optimizer, TrainState.create(params=params, optimizer=optimizer, key=key)


def _check_recipe_file(recipe: Recipe, out: str) -> None:
    """Write ``recipe.json`` on the first start; on a resume refuse a recipe that differs from it other
    than in ``RESUMABLE_CHANGES``."""
    path = os.path.join(out, RECIPE_FILE)
    record = {**recipe.to_json(), "not_in_fmjax": NOT_IN_FMJAX}
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        differing = sorted(k for k in record if k not in RESUMABLE_CHANGES and stored.get(k) != record[k])
        if differing:
            raise ValueError(
                f"{out} holds a run of another recipe (differs in {', '.join(differing)}); use another --out"
            )
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)


def _mesh():
    """A data-parallel mesh over the local devices when there are several, else None."""
    devices = jax.local_devices()
    if len(devices) < 2:
        return None
    return jax.sharding.Mesh(np.array(devices), ("data",))


def _sample_grid(recipe: Recipe, apply_fn, params, path: str, step: int) -> None:
    from fmjax import plotting

    x0 = jax.random.normal(jax.random.PRNGKey(recipe.seed + 7), (recipe.sample_count, *IMAGE_SHAPE))
    x1 = sample(as_velocity(apply_fn, params), x0, solver="euler", steps=recipe.sample_steps).x1
    images = np.clip(np.round((np.asarray(x1) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    plotting.image_grid(path, images, title=f"EMA, step {step}, Euler {recipe.sample_steps} steps")


def train(
    recipe: Recipe,
    out: str | os.PathLike,
    *,
    data_dir: str | None = None,
    records: Any = None,
    log=print,
) -> TrainState:
    """Train (or resume) the recipe in ``out``; returns the final ``TrainState``.

    ``records`` (optional): the training images' data source in place of ``data_source("cifar10",
    split="train", data_dir=data_dir)`` (records with a uint8 [32, 32, 3] ``image``).
    """
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    _check_recipe_file(recipe, out)
    if records is None:
        records = data_source("cifar10", split="train", data_dir=data_dir)
    source = ImageSource(records, batch_size=recipe.batch_size, seed=recipe.seed)
    if source.image_shape != IMAGE_SHAPE:
        raise ValueError(f"the images must have shape {IMAGE_SHAPE}; got {source.image_shape}")
    apply_fn, optimizer, state = build(recipe)
    mesh = _mesh()
    step_fn = make_train_step(
        apply_fn,
        optimizer,
        path=Linear(sigma=recipe.sigma),
        coupling=make_coupling(recipe.coupling),
        model_dropout=recipe.dropout > 0,
        ema_decay=recipe.ema_decay,
        log_grad_norm=True,
        mesh=mesh,
    )
    data_key = stream_key(recipe.seed, "data")
    flip = recipe.horizontal_flip

    @jax.jit
    def pair(step: jax.Array, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        k_flip, k_noise = jax.random.split(jax.random.fold_in(data_key, step))
        x1 = augment(k_flip, images, flip=flip)
        return jax.random.normal(k_noise, x1.shape), x1

    schedule = learning_rate(recipe)
    metrics_path = os.path.join(out, METRICS_FILE)
    with Checkpointer(os.path.join(out, CHECKPOINT_DIR), max_to_keep=recipe.keep_checkpoints) as ckpt:
        state, resumed, skipped = ckpt.restore_latest_good(state)
        for bad, reason in skipped:
            log(f"checkpoint {bad} is unreadable ({reason}); set aside as {bad}.corrupt")
        done = int(state.step)
        if resumed is not None:
            log(f"resuming from step {done}")
            _drop_records_after(metrics_path, done)
        losses, grad_norms, start = [], [], time.perf_counter()
        for k in range(done, recipe.steps):
            x0, x1 = pair(jnp.int32(k), jnp.asarray(source.host_batch(k)["image"]))
            state, metrics = step_fn(state, x0, x1)
            losses.append(metrics["loss"])
            grad_norms.append(metrics["grad_norm"])
            if (k + 1) % recipe.log_every == 0 or k + 1 == recipe.steps:
                loss, grad_norm = (float(np.mean(jax.device_get(v))) for v in (losses, grad_norms))
                if not np.isfinite(loss):
                    raise FloatingPointError(f"the loss became {loss} by step {k + 1}")
                record = {
                    "step": k + 1,
                    "loss": loss,
                    "grad_norm": grad_norm,
                    "learning_rate": float(schedule(k)),
                    "seconds": round(time.perf_counter() - start, 3),
                }
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                lr = record["learning_rate"]
                log(f"step {k + 1}: loss {loss:.4f}, grad norm {grad_norm:.3f}, lr {lr:.3g}")
                losses, grad_norms, start = [], [], time.perf_counter()
            if (k + 1) % recipe.save_every == 0 or k + 1 == recipe.steps:
                if k + 1 not in ckpt.all_steps():
                    ckpt.save(k + 1, state, wait=False)
                _sample_grid(
                    recipe, apply_fn, state.ema_params, os.path.join(out, f"samples_{k + 1}.png"), k + 1
                )
        ckpt.wait()
    return state


def _drop_records_after(path: str, step: int) -> None:
    """Keep the metrics records up to ``step`` (the resumed run writes the later ones again)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def main(argv=None) -> TrainState:
    parser = argparse.ArgumentParser(prog="python -m experiments.cifar10", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None, help="where tfds keeps cifar10 (default: fmjax's)")
    parser.add_argument("--out", default="runs/cifar10", help="run directory (resumed when it holds one)")
    parser.add_argument("--coupling", default=RECIPE.coupling, choices=("exact", "independent"),
                        help="exact: OT-CFM (default); independent: I-CFM")  # fmt: skip
    for name in ("steps", "batch_size", "channels", "save_every", "log_every", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(RECIPE, name),
                            help=f"default {getattr(RECIPE, name)}")  # fmt: skip
    args = parser.parse_args(argv)
    recipe = dataclasses.replace(
        RECIPE,
        **{
            k: getattr(args, k)
            for k in ("coupling", "steps", "batch_size", "channels", "save_every", "log_every", "seed")
        },  # fmt: skip
    )
    return train(recipe, args.out, data_dir=args.data_dir)


if __name__ == "__main__":
    main()

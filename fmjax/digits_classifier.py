"""A small classifier of the 8x8 digits, for judging generated digits: class accuracy, and a Fréchet
distance in its penultimate features as FID uses Inception's (``digits_frechet_distance``).

A Flax NNX CNN (two 3x3 convolutions, the second with stride 2, a 64-unit dense layer whose SiLU
activations are the features, a 10-way linear head) trained with Adam on fmjax's offline digits train
split (1437 images), seeded, in a few seconds on a CPU; its accuracy on the 360 test digits is stored
on the result (about 99% for seed 0).

Input representation. Generative digits models produce images in [-1, 1]; the classifier accepts
either of fmjax's two conventions (``space``):

- ``"levels"`` (experiments/digits.py, experiments/conditional_digits.py): the digits' 17 grey
  levels k = 0..16 dequantised as z = 2 (k + u) / 17 - 1, u in [0, 1);
- ``"bytes"`` (``fmjax train --dataset digits``, fmjax/runs/tasks/images.py): the stored 0..255 copy
  x = round(255 k / 16) dequantised as z = 2 (x + u) / 256 - 1.

``"bytes"`` images are mapped to the levels space by the affine map that sends the middle of every
byte cell, x + 1/2, to the middle of its level's cell, k + 1/2 (k = 16 x / 255). Images are then
clipped to [-1, 1] (a sample slightly outside is an image at the extreme grey level) and may be
shaped [n, 8, 8, 1], [n, 8, 8] or [n, 64]. The network is trained on the levels space with a fresh
dequantisation draw u every epoch, so it sees the whole cell of each grey level, as samples from a
flow trained on dequantised digits fill it.

    from fmjax.digits_classifier import train_classifier, classifier_frechet_distance
    classifier = train_classifier(seed=0)          # ~5 s on a 2-core CPU
    classifier.test_accuracy                       # on the 360 test digits
    classifier.logits(images)                      # [n, 10]
    classifier.features(images)                    # [n, 64], the penultimate layer
    classifier_frechet_distance(classifier, generated, reference)

``trained_classifier(seed)`` returns a classifier trained once per process and seed, and
``digits_frechet_distance(generated)`` (also ``fmjax.digits_frechet_distance``) the FID-style distance of
generated digits to the test digits in its features. ``fmjax.metrics`` knows nothing of it: metrics hold
no trained model.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fmjax._checks import check_choice, is_traced
from fmjax.data.tfds_sources import data_source, read_batch
from fmjax.metrics import frechet_distance

__all__ = [
    "LEVELS",
    "SPACES",
    "Classifier",
    "load_digits",
    "dequantise",
    "to_levels_space",
    "train_classifier",
    "classifier_frechet_distance",
    "trained_classifier",
    "digits_frechet_distance",
    "FEATURES",
]

LEVELS = 17  # grey levels 0..16 of scikit-learn's digits
SPACES = ("levels", "bytes")
FEATURES = 64


def load_digits(split: str, *, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All digits of ``split`` ("train": 1437, "test": 360) as ``(levels, labels)``: grey levels 0..16,
    uint8 [n, 8, 8, 1], and int32 [n], in the data source's order.

    The levels are recovered exactly from the stored 0..255 copy (round(255 k / 16)); a source that is
    not that copy raises ValueError.
    """
    source = data_source("digits", split=split, data_dir=data_dir)
    stored, labels = read_batch(source, np.arange(len(source)))
    levels = np.round(stored.astype(np.float64) * (LEVELS - 1) / 255.0).astype(np.uint8)
    if not np.array_equal(np.round(levels * (255.0 / (LEVELS - 1))), stored):
        raise ValueError("the digits source is not the 0..16 levels rescaled to 0..255")
    return levels, labels.astype(np.int32)


def dequantise(levels: np.ndarray | jax.Array, u: np.ndarray | jax.Array) -> jax.Array:
    """Grey levels k (0..16) to the levels space: z = 2 (k + u) / 17 - 1, u in [0, 1) of k's shape."""
    return 2.0 * (jnp.asarray(levels, jnp.float32) + u) / LEVELS - 1.0


def to_levels_space(images: np.ndarray | jax.Array, *, space: str = "levels") -> jax.Array:
    """Images in ``space`` ("levels" or "bytes", see the module docstring) as the classifier's input:
    the levels space, clipped to [-1, 1], float32 [n, 8, 8, 1].

    ``images`` has shape [n, 8, 8, 1], [n, 8, 8] or [n, 64] and must be finite (checked when concrete).
    """
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}; got {space!r}")
    images = jnp.asarray(images, jnp.float32)
    if images.ndim < 2 or images.shape[1:] not in ((8, 8, 1), (8, 8), (64,)):
        raise ValueError(f"images must have shape [n, 8, 8, 1], [n, 8, 8] or [n, 64]; got {images.shape}")
    if not is_traced(images) and not bool(jnp.isfinite(images).all()):
        raise ValueError("images must be finite (found NaN or inf)")
    images = images.reshape(images.shape[0], 8, 8, 1)
    if space == "bytes":
        # byte cell [x, x + 1) -> x + 1/2 -> k + 1/2 with k = 16 x / 255, then z = 2 (k + 1/2) / 17 - 1
        level = ((images + 1.0) * 128.0 - 0.5) * (LEVELS - 1) / 255.0 + 0.5
        images = 2.0 * level / LEVELS - 1.0
    return jnp.clip(images, -1.0, 1.0)


class _Net(nnx.Module):
    """conv 3x3 (16) -> SiLU -> conv 3x3 stride 2 (32) -> SiLU -> dense 64 -> SiLU (features) -> dense 10."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), rngs=rngs)
        self.hidden = nnx.Linear(4 * 4 * 32, FEATURES, rngs=rngs)
        self.head = nnx.Linear(FEATURES, 10, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        h = jax.nn.silu(self.conv2(jax.nn.silu(self.conv1(x))))
        return jax.nn.silu(self.hidden(h.reshape(h.shape[0], -1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


@functools.partial(jax.jit, static_argnames=("graphdef", "output"))
def _forward(graphdef: Any, params: Any, images: jax.Array, output: str) -> jax.Array:
    net = nnx.merge(graphdef, params)
    return net(images) if output == "logits" else net.features(images)


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A trained digits classifier (built by ``train_classifier``).

    ``logits(images)`` [n, 10] and ``features(images)`` [n, 64] (the penultimate layer, for
    ``classifier_frechet_distance``) take images in ``space`` ("levels" or "bytes"; see the module
    docstring) of shape [n, 8, 8, 1], [n, 8, 8] or [n, 64]. ``test_accuracy`` is the fraction of the
    360 test digits (dequantised at the middle of their cells, u = 1/2) classified correctly.
    """

    graphdef: Any
    params: Any
    test_accuracy: float
    train_seconds: float
    seed: int

    def logits(self, images: np.ndarray | jax.Array, *, space: str = "levels") -> jax.Array:
        """Class logits, float32 [n, 10]."""
        return _forward(self.graphdef, self.params, to_levels_space(images, space=space), "logits")

    def features(self, images: np.ndarray | jax.Array, *, space: str = "levels") -> jax.Array:
        """Penultimate-layer features (SiLU of the 64-unit dense layer), float32 [n, 64]."""
        return _forward(self.graphdef, self.params, to_levels_space(images, space=space), "features")

    def predict(self, images: np.ndarray | jax.Array, *, space: str = "levels") -> np.ndarray:
        """The most likely class of each image, int [n]."""
        return np.asarray(jnp.argmax(self.logits(images, space=space), axis=-1))


def train_classifier(
    seed: int = 0,
    *,
    epochs: int = 40,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    data_dir: str | None = None,
) -> Classifier:
    """Train the digits CNN on the train split and measure it on the test split.

    Adam with a cosine decay from ``learning_rate`` to 1% of it and weight decay 1e-4, cross-entropy,
    minibatches of ``batch_size`` in a seeded order per epoch, each epoch's images dequantised with a
    fresh u ~ U[0, 1). Everything is drawn from ``seed`` (the initial weights too), so a seed gives
    the same classifier on the same machine.
    """
    start = time.perf_counter()
    levels, labels = load_digits("train", data_dir=data_dir)
    test_levels, test_labels = load_digits("test", data_dir=data_dir)
    net = _Net(rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(net, nnx.Param)
    per_epoch = len(levels) // batch_size
    schedule = optax.cosine_decay_schedule(learning_rate, epochs * per_epoch, alpha=0.01)
    optimizer = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = optimizer.init(params)
    levels, labels = jnp.asarray(levels), jnp.asarray(labels)

    def loss_fn(params, images, targets):
        logits = nnx.merge(graphdef, params)(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def step(params, opt_state, images, targets):
        grads = jax.grad(loss_fn)(params, images, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def epoch_batches(key):
        k_order, k_noise = jax.random.split(key)
        order = jax.random.permutation(k_order, len(levels))[: per_epoch * batch_size]
        images = dequantise(levels[order], jax.random.uniform(k_noise, levels[order].shape))
        return images.reshape(per_epoch, batch_size, 8, 8, 1), labels[order].reshape(per_epoch, batch_size)

    # one jitted step per call: a scanned convolution backward pass is slow on XLA:CPU, an unrolled
    # epoch slow to compile
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    for k in range(epochs):
        images, targets = epoch_batches(jax.random.fold_in(key, k))
        for b in range(per_epoch):
            params, opt_state = step(params, opt_state, images[b], targets[b])
    test_images = dequantise(test_levels, 0.5)
    predicted = jnp.argmax(_forward(graphdef, params, test_images, "logits"), axis=-1)
    accuracy = float(np.mean(np.asarray(predicted) == test_labels))
    return Classifier(
        graphdef=graphdef,
        params=params,
        test_accuracy=accuracy,
        train_seconds=time.perf_counter() - start,
        seed=seed,
    )


def classifier_frechet_distance(
    classifier: Classifier,
    generated: np.ndarray | jax.Array,
    reference: np.ndarray | jax.Array,
    *,
    space: str = "levels",
) -> float:
    """``fmjax.metrics.frechet_distance`` between the classifier's features of ``generated`` and of
    ``reference`` (both images in ``space``, each at least 2): an FID computed with this digits
    classifier in place of Inception. It is biased upwards for small sets; compare values computed
    with the same numbers of images.
    """
    return frechet_distance(
        np.asarray(classifier.features(generated, space=space)),
        np.asarray(classifier.features(reference, space=space)),
    )


@functools.cache
def trained_classifier(seed: int = 0) -> Classifier:
    """The digits CNN, trained on the train split with ``seed`` (``train_classifier``).

    Trained on first use (a few seconds on a CPU) and kept for the rest of the process, one per seed;
    ``.test_accuracy`` is its accuracy on the 360 test digits (0.99 for seed 0), ``.features(images,
    space=...)`` its penultimate features [n, 64], ``.predict(images, space=...)`` its classes [n].
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int; got {type(seed).__name__}")
    return train_classifier(seed=int(seed))


def digits_frechet_distance(
    generated: jax.Array | np.ndarray,
    reference: jax.Array | np.ndarray | None = None,
    *,
    space: str = "bytes",
    classifier: Classifier | None = None,
    seed: int = 0,
) -> float:
    """FID for the 8x8 digits: ``frechet_distance`` between a digits classifier's penultimate features
    [n, 64] of ``generated`` and of ``reference``.

    ``generated`` (and ``reference``, when given) are images in [-1, 1] of shape [n, 8, 8, 1],
    [n, 8, 8] or [n, 64], n >= 2, in ``space``: ``"bytes"`` (z = 2 (x + u) / 256 - 1 for the stored
    0..255 pixel x, as ``fmjax train --dataset digits`` models them) or ``"levels"`` (z = 2 (k + u) / 17
    - 1 for the grey level k = 0..16); see ``fmjax.digits_classifier``. ``reference=None`` means the
    360 test digits, dequantised once with u ~ U[0, 1) drawn from ``seed`` (whatever ``space`` is).
    ``classifier`` defaults to ``trained_classifier(seed)``.

    The distance is biased upwards for small sets: compare values computed with the same numbers of
    images. With seed 0, the 1437 train digits score about 8.6 against the 360 test digits, uniform
    noise about 880.

    >>> import jax
    >>> noise = jax.random.uniform(jax.random.key(0), (360, 8, 8, 1), minval=-1.0, maxval=1.0)
    >>> digits_frechet_distance(noise) > 100.0  # uniform noise is far from every digit
    True
    """
    space = check_choice("space", space, SPACES)
    if classifier is None:
        classifier = trained_classifier(seed)
    elif not isinstance(classifier, Classifier):
        raise TypeError(
            "classifier must be a fmjax.digits_classifier.Classifier or None; "
            f"got {type(classifier).__name__}"
        )
    reference_space = space
    if reference is None:
        levels, _ = load_digits("test")
        u = np.random.default_rng(seed).uniform(size=levels.shape)
        reference, reference_space = dequantise(levels, u), "levels"
    return frechet_distance(
        np.asarray(classifier.features(generated, space=space)),
        np.asarray(classifier.features(reference, space=reference_space)),
    )

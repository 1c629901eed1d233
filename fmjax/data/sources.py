"""Data sources of the training loop: what ``fmjax train`` asks for the batches of a step.

A source splits a global batch into the part the host must provide and the part the device draws:

- ``host_batch(step)`` returns this process's rows of the host data of ``step`` as numpy arrays (a dict,
  possibly empty), a pure function of ``step``, so a resumed run reads exactly what an uninterrupted one
  read;
- ``pair(key, host)`` runs on the device (inside the jitted, scanned step) and turns the global host data
  of one step and a key into the source and target batches ``(x0, x1)``, each of shape
  [batch_size, *dims];
- ``pair_cond(key, host)`` (conditional runs) returns ``(x0, x1, cond)`` with the condition paired
  with x1: the int32 class labels [batch_size] of the target points.

``ToySource`` draws both batches on the device from the key (no host data); ``ImageSource`` reads the
images of the step from a tfds data source (the epoch's permutation from (seed, epoch), the step's
contiguous slice of it) and dequantises them on the device, with Gaussian noise as the source;
``PointSource`` reads the step's points of a fixed array (an Earth dataset on the sphere) the same way,
with the source drawn on the device from a base distribution (the sphere's uniform one).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fmjax._checks import check_bool, check_int
from fmjax._errors import ArgumentError
from fmjax.data.toy import sample as toy_sample
from fmjax.data.toy import sample_labeled

__all__ = ["ToySource", "ImageSource", "PointSource", "EpochBatches", "dequantise"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToySource:
    """Both batches drawn on the device: ``x0 ~ source``, ``x1 ~ target`` (2D samplers of ``fmjax.data``).

    ``pair_cond`` adds the target's class labels (``fmjax.data.toy.sample_labeled``); its x0 and x1 are
    those ``pair`` draws from the same key.
    """

    source: str
    target: str
    batch_size: int

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        """No host data: everything is drawn on the device."""
        del step
        return {}

    def host_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Global shape and dtype of each host array of one step (none here)."""
        return {}

    def pair(self, key: jax.Array, host: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """``(x0, x1)`` of shape [batch_size, 2] from ``key``."""
        del host
        k0, k1 = jax.random.split(key)
        return toy_sample(self.source, k0, self.batch_size), toy_sample(self.target, k1, self.batch_size)

    def pair_cond(self, key: jax.Array, host: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(x0, x1, labels)``: ``pair``'s batches and the int32 class labels [batch_size] of x1."""
        del host
        k0, k1 = jax.random.split(key)
        x1, labels = sample_labeled(self.target, k1, self.batch_size)
        return toy_sample(self.source, k0, self.batch_size), x1, labels


def dequantise(key: jax.Array, images: jax.Array) -> jax.Array:
    """Uniform dequantisation of uint8 images to [-1, 1): z = 2 (x + u) / 256 - 1 with u ~ U[0, 1)."""
    u = jax.random.uniform(key, images.shape)
    return 2.0 * (images.astype(jnp.float32) + u) / 256.0 - 1.0


def epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of the records of ``epoch``: a function of (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch]).permutation(size)


class EpochBatches:
    """Which of ``size`` records each step reads: every epoch a fresh permutation (``epoch_order``) cut
    into global batches of ``batch_size`` (an incomplete last one dropped); step s reads global batch
    s % steps_per_epoch of epoch s // steps_per_epoch, and process p of P its contiguous share. A batch
    is a function of (seed, step), so a resumed run reads what an uninterrupted one read.

    ``what`` names the records in the error of a batch larger than them (``"the dataset (N records)"``).
    """

    def __init__(
        self, size: int, *, batch_size: int, seed: int, process_index: int, process_count: int, what: str
    ):
        if batch_size % process_count:
            raise ArgumentError(
                lambda n: (
                    f"{n('batch_size')} {batch_size} must be a multiple of the {process_count} processes"
                )
            )
        if size < batch_size:
            raise ArgumentError(lambda n: f"{n('batch_size')} {batch_size} is larger than {what}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.process_index = process_index
        self.local_batch = batch_size // process_count
        self.steps_per_epoch = size // batch_size
        self._order_cache: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, epoch_order(self.size, self.seed, epoch))
        return self._order_cache[1]

    def indices(self, step: int) -> np.ndarray:
        """Record indices this process reads at ``step`` (shape [batch_size / process_count])."""
        epoch, batch = divmod(step, self.steps_per_epoch)
        begin = batch * self.batch_size + self.process_index * self.local_batch
        return self._order(epoch)[begin : begin + self.local_batch]


class ImageSource(EpochBatches):
    """Images of a tfds data source as the target; N(0, I) noise of the same shape as the source.

    Every epoch is a fresh permutation of the source (``epoch_order``), cut into global batches of
    ``batch_size`` (an incomplete last one is dropped); step s reads global batch s % steps_per_epoch of
    epoch s // steps_per_epoch, and process p of P reads its contiguous share of it. Reads go through
    ``read_batch`` (the data source's batch access). A dataset whose images take at most ``cache_bytes``
    (digits, MNIST, CIFAR-10 under the default 1 GiB) is read once, in batches, into one uint8 array, and a
    step's images are then a gather from it (microseconds instead of a read and decode per record).
    With ``labels=True`` the host data also hold the records' int32 labels, for ``pair_cond``. With
    ``hflip=True`` ``pair`` flips each image left-right (its W axis) with probability 1/2.
    """

    def __init__(
        self,
        records: Any,
        *,
        batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        cache_bytes: int = 2**30,
        labels: bool = False,
        hflip: bool = False,
    ):
        check_int("batch_size", batch_size, low=1)
        self.hflip = check_bool("hflip", hflip)
        size = len(records)
        super().__init__(
            size, batch_size=batch_size, seed=seed, process_index=process_index, process_count=process_count,
            what=f"the dataset ({size} records)",
        )  # fmt: skip
        self.records = records
        first = np.asarray(records[0]["image"])
        self.image_shape = tuple(first.shape)
        self.labels = bool(labels)
        self._images = self._labels = None
        if size * first.nbytes <= cache_bytes:
            self._images, self._labels = self._read_all(size)

    def _read_all(self, size: int, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        from fmjax.data.tfds_sources import read_batch

        parts = [read_batch(self.records, np.arange(k, min(k + chunk, size))) for k in range(0, size, chunk)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's uint8 images of ``step``, shape [batch_size / process_count, H, W, C] (and
        their int32 labels [batch_size / process_count] with ``labels``)."""
        indices = self.indices(step)
        if self._images is not None:
            images, labels = self._images[indices], self._labels[indices]
        else:
            from fmjax.data.tfds_sources import read_batch

            images, labels = read_batch(self.records, indices)
        return {"image": images, "label": labels} if self.labels else {"image": images}

    def host_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Global shape and dtype of each host array of one step."""
        spec = {"image": ((self.batch_size, *self.image_shape), np.uint8)}
        if self.labels:
            spec["label"] = ((self.batch_size,), np.int32)
        return spec

    def pair(self, key: jax.Array, host: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """``(noise, dequantised images)``, each [batch_size, H, W, C] float32 (flipped with ``hflip``)."""
        k_noise, k_deq = jax.random.split(key)
        images = host["image"]
        if self.hflip:
            k_deq, k_flip = jax.random.split(k_deq)
            flip = jax.random.bernoulli(k_flip, 0.5, images.shape[:1])
            images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
        x1 = dequantise(k_deq, images)
        return jax.random.normal(k_noise, x1.shape), x1

    def pair_cond(self, key: jax.Array, host: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``pair``'s batches and the images' int32 labels [batch_size] (needs ``labels=True``)."""
        if "label" not in host:
            raise ValueError("pair_cond needs the labels: build the ImageSource with labels=True")
        x0, x1 = self.pair(key, host)
        return x0, x1, host["label"]


class PointSource(EpochBatches):
    """The points of an array [N, D] as the target, in epochs of fresh permutations (``EpochBatches``);
    the source batch drawn on the device by ``base_sample(key, (batch_size, D))`` (e.g. a manifold's
    ``base_sample``). ``host_batch`` gives this process's rows ``{"x1": float32 [batch_size / P, D]}``.
    """

    def __init__(
        self,
        points: np.ndarray,
        *,
        base_sample: Any,
        batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        check_int("batch_size", batch_size, low=1)
        self.points = np.asarray(points, np.float32)
        if self.points.ndim != 2:
            raise ValueError(f"points must have shape [N, D]; got {self.points.shape}")
        size = len(self.points)
        super().__init__(
            size, batch_size=batch_size, seed=seed, process_index=process_index, process_count=process_count,
            what=f"the training points ({size})",
        )  # fmt: skip
        self.base_sample = base_sample

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's points of ``step``, shape [batch_size / process_count, D]."""
        return {"x1": self.points[self.indices(step)]}

    def host_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Global shape and dtype of each host array of one step."""
        return {"x1": ((self.batch_size, self.points.shape[1]), np.float32)}

    def pair(self, key: jax.Array, host: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """``(x0 ~ base, the step's points)``, each [batch_size, D] float32."""
        x1 = host["x1"]
        return self.base_sample(key, x1.shape).astype(x1.dtype), x1

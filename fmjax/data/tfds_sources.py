"""Image datasets through tensorflow-datasets data sources (array_record files, no TensorFlow needed).

- ``digits``: scikit-learn's bundled 1797 8x8 digits, prepared offline by ``SklearnDigits`` (pixel values
  0..16 rescaled to 0..255, shape [8, 8, 1] uint8; a fixed 80/20 train/test split).
- ``mnist``, ``cifar10``: ``tfds.data_source`` on tfds's own builders (these download on first use; tests use
  ``tfds.testing.mock_data``).

``read_batch`` reads many records at once (one batched array_record read, only image and label decoded);
``batches`` turns a data source into deterministic, per-epoch shuffled, per-process sharded, prefetched
batches read with it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from array_record.python.array_record_data_source import ArrayRecordDataSource as _ArrayRecordReader
from tensorflow_datasets.core.data_sources.array_record import ArrayRecordDataSource as _TfdsArrayRecordSource
from tensorflow_datasets.core.data_sources.base import BaseDataSource as _TfdsDataSource
from tensorflow_datasets.proto import tf_example_pb2

from fmjax._checks import check_choice, check_int
from fmjax._errors import ArgumentError

__all__ = ["SklearnDigits", "DATASETS", "data_source", "read_batch", "batches", "to_model_space"]

DATASETS = ("digits", "mnist", "cifar10")
SPLITS = ("train", "test")


def default_data_dir() -> str:
    """Where prepared datasets live: $FMJAX_DATA_DIR, else ~/.cache/fmjax/tensorflow_datasets."""
    return os.environ.get("FMJAX_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "fmjax", "tfds"))


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's digits as a tfds dataset: 1437 train and 360 test images of shape [8, 8, 1], uint8."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "scikit-learn's load_digits, values scaled 16 -> 255, 80/20 split with seed 0."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ships with scikit-learn
        return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

    def _generate_examples(self, split: str):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        order = np.random.default_rng(0).permutation(len(images))
        cut = int(0.8 * len(order))
        for index in order[:cut] if split == "train" else order[cut:]:
            yield int(index), {"image": images[index], "label": int(digits.target[index])}


def data_source(name: str, *, split: str = "train", data_dir: str | None = None) -> Any:
    """A random-access data source of ``name`` (one of ``DATASETS``); records are dicts with image and label.

    ``digits`` is prepared on first use from scikit-learn's copy (offline, well under a second). What
    tfds prints while it prepares a dataset goes to stderr: stdout holds only what the caller prints.
    """
    check_choice("dataset", name, DATASETS)
    check_choice("split", split, SPLITS)
    data_dir = data_dir or default_data_dir()
    with contextlib.redirect_stdout(sys.stderr):
        if name == "digits":
            builder = SklearnDigits(data_dir=data_dir, file_format="array_record")
            builder.download_and_prepare()
            return builder.as_data_source(split=split)
        return tfds.data_source(name, split=split, data_dir=data_dir)


def to_model_space(images: np.ndarray) -> np.ndarray:
    """uint8 images in 0..255 to float32 in [-1, 1]: x / 127.5 - 1."""
    return images.astype(np.float32) / 127.5 - 1.0


def read_batch(source: Any, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Records ``indices`` of ``source`` as ``(images, labels)``: uint8 [n, H, W, C] and int32 [n].

    The result is bitwise what stacking ``source[i]["image"]`` and ``source[i]["label"]`` for i in
    ``indices`` gives, read faster where the source allows:

    - a tfds array_record data source of tf.Examples whose ``image`` is a uint8 ``tfds.features.Image``
      or plain ``tfds.features.Tensor`` and whose ``label`` is a ``ClassLabel``: one batched read of the
      raw records (the array_record reader's ``__getitems__``), then only image and label are decoded,
      with tfds's own image decoder (a plain Tensor's pixels are gathered for the whole batch at once).
      tfds's own ``__getitems__`` batches the read too but decodes every feature of every record through
      its generic per-record parser, which costs more than the read;
    - another source with ``__getitems__`` (another tfds data source, a Grain-style source): through it;
    - anything else, e.g. a list of dicts: one record at a time.

    Args:
      source: a random-access source of dicts with ``image`` and ``label``.
      indices: record indices, shape [n] with n >= 1, any order, repeats allowed.

    >>> images, labels = read_batch([{"image": np.zeros((2, 2, 1), np.uint8), "label": 3}], [0, 0])
    >>> images.shape, labels.tolist()
    ((2, 2, 2, 1), [3, 3])
    """
    keys = np.asarray(indices).reshape(-1)
    if keys.size == 0 or not np.issubdtype(keys.dtype, np.integer):
        raise ValueError(f"indices must be a non-empty sequence of ints; got {indices!r}")
    keys = keys.tolist()
    decode = _example_decoder(source)
    if decode is not None:
        return decode(source.data_source.__getitems__(keys))
    if _has_batch_access(source):
        records = source.__getitems__(keys)
    else:
        records = [source[k] for k in keys]
    return np.stack([r["image"] for r in records]), np.asarray([r["label"] for r in records], np.int32)


def _has_batch_access(source: Any) -> bool:
    if isinstance(source, _TfdsDataSource):
        # tfds.testing.mock_data swaps the array_record reader for a mock whose __getitems__ fails
        return isinstance(source.data_source, _ArrayRecordReader)
    return callable(getattr(type(source), "__getitems__", None))


def _example_decoder(source: Any) -> Callable[[Sequence[bytes]], tuple[np.ndarray, np.ndarray]] | None:
    """A decoder of raw tf.Example records to (images, labels) for the sources it can read, else None."""
    if not (
        isinstance(source, _TfdsArrayRecordSource)
        and isinstance(source.data_source, _ArrayRecordReader)
        and source.decoders is None
        and source.deserialize_method == tfds.decode.DeserializeMethod.DESERIALIZE_AND_DECODE
    ):
        return None
    features = source.dataset_info.features
    if not isinstance(features, tfds.features.FeaturesDict) or not {"image", "label"} <= set(features.keys()):
        return None
    image, label = features["image"], features["label"]
    if not isinstance(label, tfds.features.ClassLabel) or np.dtype(image.np_dtype) != np.uint8:
        return None
    if isinstance(image, tfds.features.Image):
        decode_image = image.decode_example_np

        def decode_images(examples):
            return np.stack([decode_image(e["image"].bytes_list.value[0]) for e in examples])

    elif (
        type(image) is tfds.features.Tensor
        and None not in image.shape
        and image.get_serialized_info() == tfds.features.TensorInfo(shape=image.shape, dtype=np.uint8)
    ):
        shape = tuple(image.shape)
        size = int(np.prod(shape))

        def decode_images(examples):
            pixels = itertools.chain.from_iterable(e["image"].int64_list.value for e in examples)
            return np.fromiter(pixels, np.uint8, count=len(examples) * size).reshape(len(examples), *shape)

    else:
        return None

    def decode(records: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        examples = [tf_example_pb2.Example.FromString(r).features.feature for r in records]
        labels = np.fromiter(
            (e["label"].int64_list.value[0] for e in examples), np.int32, count=len(examples)
        )
        return decode_images(examples), labels

    return decode


def _epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(size)


def batches(
    source: Any,
    *,
    batch_size: int,
    seed: int = 0,
    start_epoch: int = 0,
    skip_batches: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 2,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(epoch, images, labels)`` batches forever, ``batch_size`` per process.

    Every epoch is a fresh permutation of the whole source drawn from (seed, epoch), so the order is
    deterministic and a resumed run can start at any epoch (and skip ``skip_batches`` batches of
    it without reading them). The epoch is cut into global batches of ``batch_size * process_count``
    and process ``process_index`` takes its contiguous slice of each, so processes see disjoint
    shares and together the same global batches one process would.
    Incomplete final batches are dropped. A background thread reads batches with ``read_batch`` and keeps
    ``prefetch`` of them ready.
    """
    check_int("batch_size", batch_size, low=1)
    check_int("process_count", process_count, low=1)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in 0 .. {process_count - 1}; got {process_index}")
    size = len(source)
    if size == 0:
        raise ValueError("the data source is empty")
    if size // process_count < batch_size:
        raise ArgumentError(
            lambda n: (
                f"{n('batch_size')} {batch_size} is larger than this process's share of the data "
                f"({size // process_count})"
            )
        )
    global_batch = batch_size * process_count

    def produce(out: queue.Queue, stop: threading.Event):
        try:
            fill(out, stop)
        except Exception as error:  # handed to the consumer, which raises it
            out.put(error)

    def fill(out: queue.Queue, stop: threading.Event):
        epoch, skip = start_epoch, skip_batches
        while not stop.is_set():
            order = _epoch_order(size, seed, epoch)
            for begin in range(skip * global_batch, size - global_batch + 1, global_batch):
                mine = order[begin + process_index * batch_size : begin + (process_index + 1) * batch_size]
                item = (epoch, *read_batch(source, mine))
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            epoch, skip = epoch + 1, 0

    ready: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    worker = threading.Thread(target=produce, args=(ready, stop), daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()

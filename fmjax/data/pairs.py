"""Stored (x0, x1) pairs as a data source of the training loop (reflow datasets).

``save_pairs`` writes the pairs, e.g. ``fmjax.reflow.reflow_pairs``' output, to one ``.npz`` file
(arrays ``x0``, ``x1`` and a JSON ``metadata`` string), atomically: a reader sees the old file or the
complete new one, never a partial write. ``PairSource`` reads them back as a source for
``fmjax.runs.train(..., source=...)``: it keeps the pairing, so x0[k] is trained towards x1[k] as long
as the run's coupling is "independent" (which pairs row k with row k).

>>> import os, tempfile, numpy as np
>>> from fmjax.data.pairs import PairSource, save_pairs
>>> path = os.path.join(tempfile.mkdtemp(), "pairs.npz")
>>> x0 = np.arange(8.0).reshape(4, 2)
>>> save_pairs(path, x0, 10 * x0, metadata={"teacher": "toy"})
>>> source = PairSource(path, batch_size=2, seed=0)
>>> host = source.host_batch(0)
>>> bool(np.all(host["x1"] == 10 * host["x0"])), source.metadata["teacher"]
(True, 'toy')
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from fmjax._checks import check_finite, check_int, check_pair
from fmjax.data.sources import EpochBatches

__all__ = ["save_pairs", "load_pairs", "PairSource"]

_KEYS = ("x0", "x1", "metadata")


def save_pairs(
    path: str | os.PathLike,
    x0: Any,
    x1: Any,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write the pairs (x0[k], x1[k]) and a JSON-serialisable ``metadata`` dict to ``path`` atomically.

    The file is an uncompressed ``.npz`` holding ``x0`` and ``x1`` (shape [n, *dims] each, their dtype
    kept) and ``metadata`` as a JSON string; it is written beside ``path`` and renamed over it once
    complete and synced, so an interrupted write leaves any earlier file intact.
    """
    check_pair(x0, x1)
    check_finite("x0", x0)
    check_finite("x1", x1)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict (JSON-serialisable); got {type(metadata).__name__}")
    try:
        text = json.dumps(dict(metadata))
    except (TypeError, ValueError) as error:
        raise TypeError(f"metadata must be JSON-serialisable ({error})") from None
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, x0=np.asarray(x0), x1=np.asarray(x1), metadata=np.array(text))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_pairs(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read ``save_pairs``' file: ``(x0, x1, metadata)``.

    Raises FileNotFoundError if there is no file, and a ValueError naming the file if it is not a pairs
    file (unreadable, truncated, missing arrays, or x0 and x1 of different shapes).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pairs file {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in _KEYS if key not in data.files]
            if missing:
                raise ValueError(f"it lacks the arrays {missing}")
            x0, x1 = data["x0"], data["x1"]
            metadata = json.loads(str(data["metadata"]))
            if not isinstance(metadata, dict):
                raise ValueError(f"its metadata is a JSON {type(metadata).__name__}, not an object")
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path!r} is not a pairs file written by save_pairs ({error})") from None
    try:
        check_pair(x0, x1)
    except (TypeError, ValueError) as error:
        raise ValueError(f"pairs file {path!r} holds invalid pairs: {error}") from None
    return x0, x1, metadata


class PairSource(EpochBatches):
    """Stored pairs as the training loop's data: step s trains on a batch of pairs (x0[k], x1[k]).

    The source interface of ``fmjax.data.sources``: ``host_batch(step)`` returns this process's rows of
    the step's global batch, ``{"x0": [batch_size / process_count, *dims], "x1": same}`` as float32 numpy
    arrays; ``pair(key, host)`` returns ``(host["x0"], host["x1"])`` unchanged (no randomness: the pairs
    are the data). Batches follow ``ImageSource``'s scheme: every epoch is a fresh permutation of the n
    pairs from (seed, epoch) alone (``epoch_order``), cut into global batches of ``batch_size`` (an
    incomplete last one is dropped); step s reads global batch s % (n // batch_size) of epoch
    s // (n // batch_size), and process p of P its contiguous share. So a batch is a function of
    (seed, step), and a resumed run reads what an uninterrupted one read.

    Attributes:
      x0, x1: all the pairs, float32, shape [n, *dims].
      metadata: the dict stored with them.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        check_int("batch_size", batch_size, low=1)
        check_int("seed", seed, low=0)
        check_int("process_count", process_count, low=1)
        check_int("process_index", process_index, low=0)
        if process_index >= process_count:
            raise ValueError(f"process_index must be < process_count {process_count}; got {process_index}")
        x0, x1, self.metadata = load_pairs(path)
        size = len(x0)
        super().__init__(
            size, batch_size=batch_size, seed=seed, process_index=process_index, process_count=process_count,
            what=f"the {size} pairs in {os.fspath(path)!r}",
        )  # fmt: skip
        self.x0, self.x1 = x0.astype(np.float32), x1.astype(np.float32)

    def __len__(self) -> int:
        return len(self.x0)

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's pairs of ``step``: ``{"x0", "x1"}``, each [batch_size / process_count, *dims]."""
        rows = self.indices(step)
        return {"x0": self.x0[rows], "x1": self.x1[rows]}

    def host_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Global shape and dtype of each host array of one step."""
        shape = (self.batch_size, *self.x0.shape[1:])
        return {"x0": (shape, np.float32), "x1": (shape, np.float32)}

    def pair(self, key: jax.Array, host: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """``(x0, x1)`` of the step, each [batch_size, *dims], the stored pairing kept."""
        del key
        return host["x0"], host["x1"]

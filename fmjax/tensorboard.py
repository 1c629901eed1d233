"""Training metrics as TensorBoard event files, written without TensorFlow; optionally to Weights & Biases.

An event file is a sequence of TFRecords, each framing one serialised ``tensorflow.Event`` protobuf:

    uint64 length | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)

(little-endian; ``masked_crc32c(b) = ((c >> 15 | c << 17) + 0xa282ead8) mod 2**32`` with ``c`` the CRC-32C,
Castagnoli, of ``b``). The first record is an ``Event`` with ``file_version = "brain.Event:2"``; each
later one holds ``wall_time``, ``step`` and a ``Summary`` of ``simple_value`` scalars. The few protobuf
fields this needs are encoded here by hand, so fmjax writes TensorBoard logs with neither TensorFlow nor
the ``tensorboard`` package installed (``tensorboard --logdir RUN`` reads them; install it to view).

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as logdir:
...     with SummaryWriter(logdir) as writer:
...         writer.scalars({"loss": 0.25, "grad_norm": 1.5}, step=100)
...     os.path.basename(writer.path).startswith("events.out.tfevents.")
True

``WandbLogger`` logs the same dictionaries to a Weights & Biases run when the ``wandb`` package is installed.
"""

from __future__ import annotations

import numbers
import os
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["SummaryWriter", "WandbLogger", "scalar_values", "crc32c", "masked_crc32c"]

FILE_VERSION = "brain.Event:2"
_SESSION_START = 1  # tensorflow.SessionLog.SessionStatus.START


def _crc32c_table() -> tuple[int, ...]:
    """The byte-at-a-time table of CRC-32C (reflected polynomial 0x82F63B78)."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``, as an unsigned 32-bit int.

    >>> hex(crc32c(b"123456789"))
    '0xe3069283'
    """
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: ``((c >> 15 | c << 17) + 0xa282ead8) mod 2**32`` with ``c = crc32c(data)``.

    The mask keeps a CRC stored next to the bytes it covers from being a CRC of itself.
    """
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    """One protobuf field: key (number << 3 | wire type), then the payload (length-prefixed for type 2)."""
    key = _varint(number << 3 | wire_type)
    return key + (_varint(len(payload)) + payload if wire_type == 2 else payload)


def _float32_bytes(value: float) -> bytes:
    with np.errstate(over="ignore"):  # beyond float32's range is +-inf, as TensorFlow stores it
        return np.asarray(value, dtype="<f4").tobytes()


def _event(
    wall_time: float,
    step: int,
    *,
    file_version: str | None = None,
    scalars: Mapping[str, float] | None = None,
    session_start: bool = False,
) -> bytes:
    """A serialised ``tensorflow.Event``: wall_time = 1 (double), step = 2 (int64), file_version = 3
    (string), summary = 5 (Summary: value = 1, each Summary.Value with tag = 1, simple_value = 2 (float)),
    session_log = 7 (SessionLog: status = 1)."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        out += _field(3, 2, file_version.encode())
    if scalars:
        summary = b"".join(
            _field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, _float32_bytes(value)))
            for tag, value in scalars.items()
        )
        out += _field(5, 2, summary)
    if session_start:
        out += _field(7, 2, _field(1, 0, _varint(_SESSION_START)))
    return out


def _record(data: bytes) -> bytes:
    """``data`` framed as one TFRecord."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def _check_tag(tag: Any) -> str:
    if not isinstance(tag, str) or not tag:
        raise TypeError(f"tag must be a non-empty str, got {tag!r}")
    return tag


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return int(step)


def _check_value(tag: str, value: Any) -> float:
    """A real scalar (Python number, NumPy or JAX 0-d array) as a float."""
    array = np.asarray(value)
    if array.ndim != 0 or array.dtype.kind not in "biuf":
        raise TypeError(
            f"the value of {tag!r} must be a real scalar (int, float, or a 0-d array), "
            f"got {type(value).__name__} of shape {array.shape} and dtype {array.dtype}"
        )
    return float(array)


def scalar_values(record: Mapping[str, Any], *, exclude: tuple[str, ...] = ("step",)) -> dict[str, float]:
    """The entries of a metrics record that are real scalars, as floats; others (strings, lists, nested
    dicts, None) and the keys in ``exclude`` are left out.

    >>> scalar_values({"step": 100, "loss": 0.5, "skipped": 2, "solver": "dopri5", "env": {"a": 1}})
    {'loss': 0.5, 'skipped': 2.0}
    """
    values = {}
    for key, value in record.items():
        if key in exclude or value is None or isinstance(value, str | bytes | Mapping):
            continue
        array = np.asarray(value)
        if array.ndim == 0 and array.dtype.kind in "biuf":
            values[key] = float(array)
    return values


class SummaryWriter:
    """Appends scalar summaries to a new TensorBoard event file in ``logdir`` (created if missing).

    The file is ``logdir/events.out.tfevents.<unix time>.<host>`` (``.<pid>`` then ``.<n>`` added if
    another writer already made that name). Every ``scalar``/``scalars`` call appends one event and
    flushes it to the operating system, so a run killed at any moment leaves a file that reads back up to
    its last call. TensorBoard reads every event file in a directory; a resumed run opens a new file.

    Args:
      logdir: directory of the event files (``tensorboard --logdir`` takes it or a parent).
      purge_step: when resuming a run from a checkpoint at this step, pass it: the file starts with a
        ``SessionLog.START`` at ``purge_step``, and TensorBoard drops the events of earlier files at
        steps ``>= purge_step`` (logged after that checkpoint by the run that was killed), so resumed
        curves do not fold back on themselves.

    Use it as a context manager, or call ``close()``.
    """

    def __init__(self, logdir: str | os.PathLike, *, purge_step: int | None = None) -> None:
        logdir = os.fspath(logdir)
        if purge_step is not None:
            purge_step = _check_step(purge_step)
        os.makedirs(logdir, exist_ok=True)
        base = os.path.join(logdir, f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}")
        candidates = [base, f"{base}.{os.getpid()}"]
        self._file = None
        for n in range(1000):
            name = candidates[n] if n < 2 else f"{candidates[1]}.{n - 1}"
            try:
                self._file = open(name, "xb")  # never append to another writer's file
            except FileExistsError:
                continue
            self.path = name
            break
        if self._file is None:
            raise FileExistsError(f"no free event file name in {logdir!r} (tried {base}[.pid[.n]])")
        now = time.time()
        self._write(_event(now, 0 if purge_step is None else purge_step, file_version=FILE_VERSION))
        if purge_step is not None:
            self._write(_event(now, purge_step, session_start=True))

    def _write(self, event: bytes) -> None:
        if self._file is None:
            raise ValueError(f"the SummaryWriter of {self.path!r} is closed")
        self._file.write(_record(event))
        self._file.flush()

    def scalar(self, tag: str, value: Any, step: int, *, wall_time: float | None = None) -> None:
        """Append ``value`` (a real scalar) under ``tag`` at ``step`` (an int >= 0).

        ``wall_time`` (seconds since the epoch) defaults to now. Raises TypeError / ValueError naming the
        tag, value or step when one is not of that kind; nothing is written then.
        """
        self.scalars({tag: value}, step, wall_time=wall_time)

    def scalars(self, values: Mapping[str, Any], step: int, *, wall_time: float | None = None) -> None:
        """Append every ``tag: value`` of ``values`` at ``step``, as one event (see ``scalar``).

        An empty mapping writes nothing. For a metrics record holding other entries too (strings, the step
        itself), pass ``scalar_values(record)``.
        """
        if not isinstance(values, Mapping):
            raise TypeError(f"values must be a mapping of tag -> scalar, got {type(values).__name__}")
        step = _check_step(step)
        checked = {_check_tag(tag): _check_value(tag, value) for tag, value in values.items()}
        if checked:
            self._write(_event(time.time() if wall_time is None else float(wall_time), step, scalars=checked))

    def flush(self) -> None:
        """Flush buffered events to the operating system (every write already does)."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Flush and close the file; closing twice is allowed, writing after it raises ValueError."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class WandbLogger:
    """Logs the same metric dictionaries to a Weights & Biases run (needs the optional ``wandb`` package).

    ``WandbLogger(project="fmjax", name=..., config={...}, dir=RUN)`` calls ``wandb.init(**kwargs)`` with
    the keyword arguments given; ``scalars(values, step)`` calls ``run.log(values, step=step)``;
    ``close()`` finishes the run. It has ``SummaryWriter``'s interface, so a training loop can hold a list
    of both. Raises ModuleNotFoundError naming the ``--wandb`` option and the install command when
    ``wandb`` is not installed; fmjax never installs or imports it otherwise.

    Args:
      option: the name of the option that asked for this logger, for the error message.
      **init_kwargs: passed to ``wandb.init`` (``project``, ``name``, ``config``, ``dir``, ``mode``, ...).
    """

    def __init__(self, *, option: str = "--wandb", **init_kwargs: Any) -> None:
        try:
            import wandb
        except ImportError as error:
            raise ModuleNotFoundError(
                f"{option} logs to Weights & Biases, which needs the wandb package: pip install wandb "
                f"(or leave out {option})"
            ) from error
        self._run = wandb.init(**init_kwargs)

    def scalar(self, tag: str, value: Any, step: int) -> None:
        """Log ``value`` under ``tag`` at ``step``."""
        self.scalars({tag: value}, step)

    def scalars(self, values: Mapping[str, Any], step: int) -> None:
        """Log every ``tag: value`` of ``values`` at ``step`` (checked as ``SummaryWriter.scalars`` does)."""
        if self._run is None:
            raise ValueError("the WandbLogger is closed")
        step = _check_step(step)
        checked = {_check_tag(tag): _check_value(tag, value) for tag, value in values.items()}
        if checked:
            self._run.log(checked, step=step)

    def flush(self) -> None:
        """Nothing to do: wandb sends in the background."""

    def close(self) -> None:
        """Finish the wandb run (once)."""
        if self._run is not None:
            self._run.finish()
            self._run = None

    def __enter__(self) -> WandbLogger:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

"""TensorBoard event files: framing, CRCs and protobuf fields decoded by an independent reader, then read
back by TensorBoard's own EventAccumulator; the optional wandb logger."""

from __future__ import annotations

import glob
import os
import struct
import subprocess
import sys
import time
import types

import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import tensorboard as tb


def _crc32c_bitwise(data: bytes) -> int:
    """CRC-32C bit by bit (not fmjax's table), reflected polynomial 0x82F63B78."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = _crc32c_bitwise(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32


def _read_records(path: str) -> list[bytes]:
    """TFRecord framing: u64 length, u32 masked CRC of the length, data, u32 masked CRC of the data."""
    with open(path, "rb") as f:
        blob = f.read()
    records, at = [], 0
    while at < len(blob):
        header = blob[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", blob[at + 8 : at + 12])
        assert length_crc == _masked(header)
        data = blob[at + 12 : at + 12 + length]
        (data_crc,) = struct.unpack("<I", blob[at + 12 + length : at + 16 + length])
        assert len(data) == length and data_crc == _masked(data)
        records.append(data)
        at += 16 + length
    assert at == len(blob)
    return records


def _fields(data: bytes) -> dict[int, list]:
    """A protobuf message as {field number: [raw values]}: varints as int, fixed64/fixed32 as bytes,
    length-delimited as bytes."""

    def varint(at):
        value, shift = 0, 0
        while True:
            byte = data[at]
            value |= (byte & 0x7F) << shift
            at, shift = at + 1, shift + 7
            if not byte & 0x80:
                return value, at

    fields, at = {}, 0
    while at < len(data):
        key, at = varint(at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = varint(at)
        elif wire == 1:
            value, at = data[at : at + 8], at + 8
        elif wire == 5:
            value, at = data[at : at + 4], at + 4
        elif wire == 2:
            length, at = varint(at)
            value, at = data[at : at + length], at + length
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def _decode_event(data: bytes) -> dict:
    """tensorflow.Event: wall_time 1 (double), step 2, file_version 3, summary 5, session_log 7."""
    fields = _fields(data)
    event = {
        "wall_time": struct.unpack("<d", fields[1][0])[0],
        "step": fields.get(2, [0])[0],
    }
    if 3 in fields:
        event["file_version"] = fields[3][0].decode()
    if 5 in fields:
        event["scalars"] = {}
        for value in _fields(fields[5][0]).get(1, []):
            value_fields = _fields(value)
            tag = value_fields[1][0].decode()
            event["scalars"][tag] = struct.unpack("<f", value_fields[2][0])[0]
    if 7 in fields:
        event["session_status"] = _fields(fields[7][0])[1][0]
    return event


def _events(logdir) -> list[dict]:
    (path,) = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
    return [_decode_event(record) for record in _read_records(path)]


# RFC 3720 (iSCSI), appendix B.4, and the common "123456789" check value
CRC32C_VECTORS = [
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


@pytest.mark.parametrize("data, expected", CRC32C_VECTORS)
def test_crc32c_known_vectors(data, expected):
    assert tb.crc32c(data) == expected
    assert _crc32c_bitwise(data) == expected


def test_masked_crc32c_formula():
    for data, crc in CRC32C_VECTORS:
        assert tb.masked_crc32c(data) == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32
    # tensorflow/core/lib/hash/crc32c.h: Unmask(Mask(c)) == c and Mask(c) != c
    assert tb.masked_crc32c(b"123456789") != 0xE3069283


def test_events_round_trip(tmp_path):
    before = time.time()
    with tb.SummaryWriter(tmp_path / "logs") as writer:
        writer.scalar("loss", 0.5, step=1)
        writer.scalars({"loss": 0.25, "grad_norm": np.float32(3.0), "lr": jnp.asarray(1e-3)}, step=200)
        writer.scalar("big_step", 7, step=2**40)
        writer.scalar("pinned", -1.5, step=3, wall_time=1234.5)
        writer.scalars({}, step=4)  # writes nothing
    name = os.path.basename(writer.path)
    assert name.startswith("events.out.tfevents.") and name.split(".")[4] == os.uname().nodename
    assert before - 1 <= int(name.split(".")[3]) <= time.time()

    events = _events(tmp_path / "logs")
    assert [e.get("file_version") for e in events] == ["brain.Event:2", None, None, None, None]
    assert [e["step"] for e in events] == [0, 1, 200, 2**40, 3]
    assert events[1]["scalars"] == {"loss": 0.5}
    assert events[2]["scalars"] == {"loss": 0.25, "grad_norm": 3.0, "lr": pytest.approx(1e-3, rel=1e-7)}
    assert events[3]["scalars"] == {"big_step": 7.0}
    assert events[4]["scalars"] == {"pinned": -1.5} and events[4]["wall_time"] == 1234.5
    assert all(before <= e["wall_time"] <= time.time() for e in events[:4])


def test_special_values_as_float32(tmp_path):
    with tb.SummaryWriter(tmp_path) as writer:
        writer.scalars({"nan": float("nan"), "inf": -np.inf, "huge": 1e300, "true": True}, step=5)
    scalars = _events(tmp_path)[1]["scalars"]
    assert np.isnan(scalars["nan"]) and scalars["inf"] == -np.inf
    assert scalars["huge"] == np.inf  # beyond float32's range, as TensorFlow would store it
    assert scalars["true"] == 1.0


def test_each_write_is_readable_before_close(tmp_path):
    """A run killed between writes leaves a file that reads back up to its last write."""
    script = (
        "import os, sys\n"
        "from fmjax.tensorboard import SummaryWriter\n"
        "w = SummaryWriter(sys.argv[1])\n"
        "for step in range(3):\n"
        "    w.scalar('loss', step / 4, step)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, timeout=120)
    assert result.returncode == -9
    events = _events(tmp_path)
    assert [e["scalars"]["loss"] for e in events[1:]] == [0.0, 0.25, 0.5]


def test_two_writers_never_share_a_file(tmp_path):
    with tb.SummaryWriter(tmp_path) as first, tb.SummaryWriter(tmp_path) as second:
        first.scalar("a", 1.0, 1)
        second.scalar("b", 2.0, 1)
    assert first.path != second.path
    assert [_decode_event(r)["scalars"] for r in _read_records(first.path)[1:]] == [{"a": 1.0}]
    assert [_decode_event(r)["scalars"] for r in _read_records(second.path)[1:]] == [{"b": 2.0}]


def test_purge_step_starts_with_session_start(tmp_path):
    with tb.SummaryWriter(tmp_path, purge_step=300) as writer:
        writer.scalar("loss", 1.0, 301)
    events = _events(tmp_path)
    assert events[0]["file_version"] == "brain.Event:2" and events[0]["step"] == 300
    assert events[1]["session_status"] == 1 and events[1]["step"] == 300  # SessionLog.START
    assert events[2]["scalars"] == {"loss": 1.0} and events[2]["step"] == 301


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda w: w.scalar("loss", "high", 1), TypeError, "'loss' must be a real scalar"),
        (lambda w: w.scalar("loss", np.ones(2), 1), TypeError, r"shape \(2,\)"),
        (lambda w: w.scalar("loss", 1 + 2j, 1), TypeError, "complex"),
        (lambda w: w.scalar("", 1.0, 1), TypeError, "tag must be a non-empty str"),
        (lambda w: w.scalar("loss", 1.0, -1), ValueError, "step must be >= 0"),
        (lambda w: w.scalar("loss", 1.0, 1.5), TypeError, "step must be an int"),
        (lambda w: w.scalars([("loss", 1.0)], 1), TypeError, "values must be a mapping"),
        (lambda w: w.scalars({"ok": 1.0, "bad": None}, 1), TypeError, "'bad'"),
    ],
)
def test_bad_input_names_the_argument_and_writes_nothing(tmp_path, call, error, match):
    with tb.SummaryWriter(tmp_path) as writer:
        with pytest.raises(error, match=match):
            call(writer)
    assert len(_events(tmp_path)) == 1  # the file version alone


def test_write_after_close_raises(tmp_path):
    writer = tb.SummaryWriter(tmp_path)
    writer.close()
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.scalar("loss", 1.0, 1)


def test_scalar_values_keeps_real_scalars_only():
    record = {
        "event": "eval",
        "step": 9,
        "w2": 0.17,
        "nfe": 62,
        "solver": "dopri5",
        "env": {"jax": "0.6"},
        "skipped": np.int64(2),
        "vector": [1, 2],
        "none": None,
        "lr": jnp.asarray(0.5),
    }
    assert tb.scalar_values(record) == {"w2": 0.17, "nfe": 62.0, "skipped": 2.0, "lr": 0.5}
    assert tb.scalar_values({"step": 3, "loss": 1.0}, exclude=()) == {"step": 3.0, "loss": 1.0}


def _fake_wandb(calls):
    """A stand-in for the wandb module: records init's arguments and the run's log/finish calls."""

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    return types.SimpleNamespace(init=init)


def test_wandb_logger_not_installed_names_the_option(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ModuleNotFoundError, match=r"--wandb .*pip install wandb"):
        tb.WandbLogger(project="fmjax")
    with pytest.raises(ModuleNotFoundError, match="--log-to-wandb"):
        tb.WandbLogger(option="--log-to-wandb")


def test_wandb_logger_logs_the_same_dict(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    with tb.WandbLogger(project="fmjax", config={"steps": 10}) as logger:
        logger.scalars({"loss": np.float32(0.5), "grad_norm": 2}, step=10)
        logger.scalar("loss", 0.25, step=20)
        logger.scalars({}, step=30)
        with pytest.raises(TypeError, match="'solver'"):
            logger.scalars({"solver": "dopri5"}, step=40)
    logger.close()
    assert calls == [
        ("init", {"project": "fmjax", "config": {"steps": 10}}),
        ("log", {"loss": 0.5, "grad_norm": 2.0}, 10),
        ("log", {"loss": 0.25}, 20),
        ("finish",),
    ]


# TensorBoard's own reader, as a user's `tensorboard --logdir` reads the files (no TensorFlow needed).
try:
    from tensorboard.backend.event_processing import event_accumulator
except ImportError:
    event_accumulator = None
needs_tensorboard = pytest.mark.skipif(
    event_accumulator is None,
    reason="the tensorboard package is not installed (pip install tensorboard); fmjax writes without it",
)


def _accumulate(logdir):
    accumulator = event_accumulator.EventAccumulator(str(logdir))
    accumulator.Reload()
    return accumulator


@needs_tensorboard
def test_tensorboard_reads_the_scalars(tmp_path):
    with tb.SummaryWriter(tmp_path) as writer:
        for step in range(1, 6):
            writer.scalars({"train/loss": 1.0 / step, "train/grad_norm": float(step)}, step=step)
    accumulator = _accumulate(tmp_path)
    assert sorted(accumulator.Tags()["scalars"]) == ["train/grad_norm", "train/loss"]
    loss = accumulator.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([e.value for e in loss], [1.0 / s for s in range(1, 6)], rtol=1e-7)
    assert [e.value for e in accumulator.Scalars("train/grad_norm")] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert accumulator.file_version == 2.0

    # the TensorBoard server reads through the plugin accumulator, which turns simple_value into tensors
    # of the scalars plugin
    from tensorboard.backend.event_processing import plugin_event_accumulator
    from tensorboard.util import tensor_util

    served = plugin_event_accumulator.EventAccumulator(str(tmp_path))
    served.Reload()
    assert sorted(served.PluginTagToContent("scalars")) == ["train/grad_norm", "train/loss"]
    grad_norm = [
        (e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in served.Tensors("train/grad_norm")
    ]
    assert grad_norm == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0)]


@needs_tensorboard
def test_tensorboard_rejects_a_corrupted_record(tmp_path):
    """TensorBoard checks the CRCs this writer computes: one flipped data byte loses that record."""
    with tb.SummaryWriter(tmp_path) as writer:
        writer.scalar("loss", 1.0, 1)
        writer.scalar("loss", 2.0, 2)
    with open(writer.path, "r+b") as f:
        blob = bytearray(f.read())
        blob[-5] ^= 0xFF  # last byte of the last record's data
        f.seek(0)
        f.write(blob)
    assert [e.step for e in _accumulate(tmp_path).Scalars("loss")] == [1]


@needs_tensorboard
def test_tensorboard_purges_steps_after_a_resume(tmp_path):
    """A run killed after step 400 and resumed from its checkpoint at step 300: the new file's purge_step
    drops the first run's events at steps >= 300, so each step has one value."""
    with tb.SummaryWriter(tmp_path) as first:
        for step in (100, 200, 300, 400):
            first.scalar("loss", 1.0, step, wall_time=1000.0 + step)
    # TensorBoard reads a directory's files in name order, and the name starts with the second the file
    # was made: date the first run's file one second back rather than sleep
    parts = os.path.basename(first.path).split(".")
    parts[3] = f"{int(parts[3]) - 1:010d}"
    earlier = os.path.join(tmp_path, ".".join(parts))
    os.rename(first.path, earlier)
    with tb.SummaryWriter(tmp_path, purge_step=300) as resumed:
        for step in (300, 400, 500):
            resumed.scalar("loss", 2.0, step)
    assert sorted(glob.glob(str(tmp_path / "events.*"))) == [earlier, resumed.path]
    events = _accumulate(tmp_path).Scalars("loss")
    assert [(e.step, e.value) for e in events] == [(100, 1.0), (200, 1.0), (300, 2.0), (400, 2.0), (500, 2.0)]

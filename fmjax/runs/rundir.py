"""The run directory: its files, its lock, atomic writes and the metrics log.

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
  records (``train/...``) and the evaluation (``eval/...``) as TensorBoard event files;
- ``pairs.npz``: a reflow run's stored pairs.

Nothing is written before the configuration and the data have been checked, and a readable checkpoint is
never renamed, moved or deleted by a failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Callable
from typing import Any

from fmjax._checks import ArgumentError, NamedMessage, NamedText
from fmjax.runs.config import RunConfig

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "SUMMARY_FILE",
    "CHECKPOINT_DIR",
    "LOCK_FILE",
    "TENSORBOARD_DIR",
    "PAIRS_FILE",
    "RunLock",
    "append_record",
    "check_run_dir",
    "keep_aside",
    "pairs_path",
    "read_config",
    "resume_metrics",
    "take_run_dir",
    "write_atomic",
]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = "train.lock"
TENSORBOARD_DIR = "tensorboard"
PAIRS_FILE = "pairs.npz"


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


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed over it: readers see the old file or
    the new one, never a part."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_config(run_dir: str) -> RunConfig:
    """The ``RunConfig`` of the run in ``run_dir``; ValueError (naming the file) if it does not parse."""
    path = os.path.join(run_dir, CONFIG_FILE)
    try:
        with open(path) as f:
            return RunConfig.from_json(json.load(f))
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{path!r} is not an fmjax run configuration ({error})") from None


def check_run_dir(config: RunConfig, run_dir: str | os.PathLike) -> None:
    """Raise a ValueError if ``run_dir`` cannot hold a run of ``config``; a new directory passes.

    Refused: a file in place of the directory (or of its ``checkpoints``, ``config.json`` or
    ``metrics.jsonl``), a directory that holds files but no fmjax run, a run of another configuration
    that has saved checkpoints. A run of another configuration that never saved a checkpoint (it failed
    or was stopped before its first) passes: ``train`` starts it again (see there). Nothing is written.
    """
    run_dir = os.fspath(run_dir)
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise ArgumentError(lambda n: f"{n('run_dir')} {run_dir!r} is a file, not a directory")
    if not os.path.isdir(run_dir):
        return
    for name, is_kind, kind in (
        (CHECKPOINT_DIR, os.path.isdir, "directory"),
        (CONFIG_FILE, os.path.isfile, "file"),
        (METRICS_FILE, os.path.isfile, "file"),
    ):
        path = os.path.join(run_dir, name)
        if os.path.lexists(path) and not is_kind(path):
            raise ArgumentError(
                lambda n, name=name, kind=kind: (
                    f"{n('run_dir')} {run_dir!r}: {name} is not a {kind}; move it "
                    "away to use this directory (nothing was changed)"
                )
            )
    if not os.path.exists(os.path.join(run_dir, CONFIG_FILE)):
        if set(os.listdir(run_dir)) - {LOCK_FILE, PAIRS_FILE}:  # pairs: a reflow run being prepared
            raise ArgumentError(
                lambda n: (
                    f"{n('run_dir')} {run_dir!r} already holds files but no fmjax run; choose a new directory"
                )
            )
        return
    existing = read_config(run_dir)
    if existing != config and _has_checkpoints(run_dir):
        differs = config.differing(existing)
        raise ArgumentError(
            lambda n: (
                f"run directory {run_dir!r} belongs to a different configuration "
                f"(differs in {', '.join(map(n, differs))}); use a new {n('run_dir')}"
            )
        )


def _has_checkpoints(run_dir: str) -> bool:
    """Whether anything was ever saved in the run's checkpoint directory (step folders, set aside ones)."""
    directory = os.path.join(run_dir, CHECKPOINT_DIR)
    return os.path.isdir(directory) and bool(os.listdir(directory))


class RunDirInUse(NamedMessage, BlockingIOError):
    """Another process holds the run directory's lock (a BlockingIOError naming the directory)."""


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
                raise RunDirInUse(
                    lambda n, holder=holder: (
                        f"{n('run_dir')} {self.run_dir!r} is in use by another fmjax train ({holder}); "
                        "wait for it to finish or choose another directory"
                    )
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


def take_run_dir(config: RunConfig, run_dir: str, environment: dict, say: Callable[[str], Any]) -> RunLock:
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
            existing = read_config(run_dir)
            if existing != config:  # it never saved a checkpoint (check_run_dir): start it again
                kept = [keep_aside(os.path.join(run_dir, name)) for name in (CONFIG_FILE, METRICS_FILE)]
                differs = config.differing(existing)
                names = ", ".join(os.path.basename(k) for k in kept if k)
                say(
                    NamedText(
                        lambda n: (
                            f"run directory {run_dir} held a run of another configuration (differs in "
                            f"{', '.join(map(n, differs))}) that saved no checkpoint; starting again with "
                            f"this one (kept: {names})"
                        )
                    )
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


def keep_aside(path: str) -> str | None:
    """Rename ``path`` to ``path.old`` (``.old1``, ... if taken); the new name, or None if it is missing."""
    if not os.path.exists(path):
        return None
    destination, suffix = path + ".old", 1
    while os.path.lexists(destination):
        destination, suffix = f"{path}.old{suffix}", suffix + 1
    os.rename(path, destination)
    return destination


def pairs_path(config: RunConfig, run_dir: str | os.PathLike) -> str:
    """The pairs file of a reflow run: ``config.pairs``, relative to ``run_dir`` unless absolute."""
    return os.path.join(os.fspath(run_dir), config.pairs)

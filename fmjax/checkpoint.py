"""Checkpoints of a ``TrainState`` (or any pytree of arrays) with orbax's CheckpointManager.

A save copies the state to host memory before it returns; with ``wait=False`` the write to disk goes on
in the background while training continues, and the next ``save``, ``wait()`` or ``close()`` reports its
outcome. Only committed checkpoints are listed, and nothing already committed is renamed, moved or
deleted by a failed write, nor by a stray entry of the directory (an unknown folder or file, a file or
empty folder named like a step, a temporary folder left by a killed write): only a checkpoint that fails
to read is set aside, as ``<step>.corrupt``.

>>> import tempfile, jax.numpy as jnp
>>> from fmjax.checkpoint import Checkpointer
>>> with Checkpointer(tempfile.mkdtemp()) as ckpt:
...     _ = ckpt.save(3, {"w": jnp.ones(2)}, wait=False)  # returns once the arrays are on the host
...     ckpt.wait()  # step 3 is committed on disk
...     ckpt.latest_step(), ckpt.restore({"w": jnp.zeros(2)})["w"].tolist()
(3, [1.0, 1.0])
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from collections.abc import Callable
from typing import Any, NoReturn

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_manager import DEFAULT_ITEM_NAME

from fmjax._checks import check_int

__all__ = ["Checkpointer"]

# orbax writes this file into a step folder just before renaming it into place: a folder of the failed
# step that has it was written completely
_COMMIT_MARKER = "commit_success.txt"


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_storable(tree: Any) -> Any:
    """Typed PRNG keys become their raw uint32 data, which orbax can write."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _from_storable(tree: Any, target: Any) -> Any:
    return jax.tree.map(
        lambda x, like: jax.random.wrap_key_data(x, impl=jax.random.key_impl(like)) if _is_key(like) else x,
        tree,
        target,
    )


def _reason(error: BaseException, limit: int) -> str:
    """The first line of an error's message (orbax and tensorstore errors run to many lines)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:limit]


def _release_stuck_helpers() -> None:
    """Let orbax's helper threads of a failed save return at once.

    Those threads wait for a "step directory created" signal before they write; when creating the
    directory failed, the signal never comes and they wait out orbax's coordination timeout (300 s), and
    as they are not daemon threads, the process cannot exit meanwhile. Cancelled and sent the signals
    they wait for, they return without writing.
    """
    try:
        from orbax.checkpoint._src.futures import future as orbax_future

        helper = orbax_future._SignalingThread
    except (ImportError, AttributeError):  # another orbax version: nothing known to release
        return
    for thread in threading.enumerate():
        if isinstance(thread, helper) and thread.is_alive():
            with contextlib.suppress(Exception):
                thread.cancel()
                orbax_future.set_signals(thread._receive_signals, operation_id=thread._operation_id)


def from_process_0(decision: dict | None) -> dict:
    """Process 0's ``decision`` (JSON-able) on every process; two broadcasts, the length then the bytes."""
    data = np.frombuffer(json.dumps(decision).encode(), np.uint8).astype(np.int32) if decision else None
    length = int(multihost_utils.broadcast_one_to_all(np.int32(0 if data is None else data.size)))
    data = multihost_utils.broadcast_one_to_all(np.zeros(length, np.int32) if data is None else data)
    return json.loads(np.asarray(data, np.uint8).tobytes())


class Checkpointer:
    """Save and restore numbered checkpoints of a pytree under ``directory``.

    Every method is called by all processes of a multi-process run alike; orbax writes each array once.

    Args:
      directory: where the step folders go; created if missing (unless ``read_only``).
      max_to_keep: how many of the newest checkpoints to keep (None keeps all). The older ones are
        deleted only after a newer one has been committed.
      read_only: only read: nothing is created, saved, renamed or deleted (``save`` raises
        ValueError; ``restore_latest_good`` reports unreadable checkpoints without setting them
        aside), so a reader may run beside a training run writing the same directory.

    Raises:
      NotADirectoryError: ``directory`` is a file (or a link to one), not a directory.
      OSError: the directory cannot be created or listed (permissions).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, read_only: bool = False):
        if max_to_keep is not None:
            check_int("max_to_keep", max_to_keep, low=1)
        self.directory = os.path.abspath(os.fspath(directory))
        self.read_only = bool(read_only)
        if os.path.lexists(self.directory) and not os.path.isdir(self.directory):
            raise NotADirectoryError(
                f"checkpoint directory {self.directory} is not a directory (a file or a broken link is in "
                "its place); move it away, nothing there was changed"
            )
        options = (
            ocp.CheckpointManagerOptions(read_only=True)
            if self.read_only
            else ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as error:  # permissions, a vanished parent: one line, not orbax's stack
            reason = _reason(error, 200)
            raise OSError(f"cannot open checkpoint directory {self.directory} ({reason})") from None
        self._pending: int | None = None  # the step being written in the background
        self._reported = False  # a failed write was raised as OSError already

    def save(self, step: int, state: Any, *, wait: bool = True) -> bool:
        """Write ``state`` as checkpoint ``step``; returns whether a save was started (always True).

        Guarantees:
          - When it returns, the arrays of ``state`` have been copied to host memory (orbax transfers
            them before it hands the write to its background thread): the caller may donate, delete or
            overwrite their device buffers at once, and the checkpoint holds the values at the call.
            (On CPU the host copy is a view of the buffer; until the write is done, a step that donates
            it gets a copy instead, as XLA does for any buffer with an outside reference.)
          - ``wait=True``: the checkpoint is committed on disk when it returns. ``wait=False``: it is
            written in the background; ``wait()``, the next ``save`` or ``close()`` blocks until it is
            committed. Until then ``all_steps()`` does not list it.
          - A pending background save is finished first; if it failed, this raises its OSError and
            ``state`` is not saved.
          - A failed write raises one ``OSError("could not write checkpoint N in DIR (reason); the
            checkpoints already written are intact: [...]")``. Committed checkpoints are never
            renamed, moved or deleted by it; the temporary folder of step N is removed, and a step
            folder N renamed into place but never completed is kept as ``N.corrupt``.
          - An entry named ``N`` that is not a committed checkpoint (a file, a link, a folder without
            a checkpoint in it), which orbax would delete to make room, is renamed ``N.corrupt``
            first: nothing in the directory is deleted by a save.

        Raises:
          ValueError: ``step`` is negative, or already a committed checkpoint (never overwritten), or
            this Checkpointer is read-only.
          OSError: this write, or the pending one, failed.
        """
        check_int("step", step, low=0)
        if self.read_only:
            raise ValueError(f"this Checkpointer of {self.directory} is read-only: it saves nothing")
        self.wait()
        if step in self.all_steps():
            raise ValueError(
                f"step must not be one of the saved steps {self.all_steps()} (a checkpoint is never "
                f"overwritten); got {step}"
            )
        if jax.process_index() == 0 and os.path.lexists(self._step_path(step)):
            self._set_aside(step)  # orbax removes what is in the way of a save
        try:
            saved = self._manager.save(step, args=ocp.args.StandardSave(_to_storable(state)), force=True)
        except Exception as error:  # a full disk, a quota, a vanished directory: tensorstore and orbax errors
            self._failed(step, error)
        self._pending = step if saved else None
        if wait:
            self.wait()
        return saved

    def wait(self) -> None:
        """Block until the pending background save, if any, is committed on disk.

        Raises the OSError of ``save`` (see there) if that write failed; afterwards nothing is pending
        and the checkpoints already written are intact.
        """
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as error:  # the background write's error, re-raised by orbax
            self._failed(step, error)

    def _failed(self, step: int, error: Exception) -> NoReturn:
        self._reported = True
        with contextlib.suppress(Exception):  # no background write may still use the folders cleaned below
            self._manager.wait_until_finished()
        _release_stuck_helpers()
        self._discard_partial(step)
        raise OSError(
            f"could not write checkpoint {step} in {self.directory} ({_reason(error, 300)}); "
            f"the checkpoints already written are intact: {self.all_steps() or 'none'}",
        ) from error

    def _discard_partial(self, step: int) -> None:
        """Remove orbax's temporary folder of the failed ``step``; set aside a step folder of it that was
        renamed into place but not completed. Process 0 alone changes the directory (if it is still
        one: it may have been replaced or removed, which is what made the write fail)."""
        if jax.process_index() == 0 and os.path.isdir(self.directory):
            for name in os.listdir(self.directory):
                if name.startswith(f"{step}.orbax-checkpoint-tmp"):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            final = os.path.join(self.directory, str(step))
            if os.path.isdir(final) and not os.path.exists(os.path.join(final, _COMMIT_MARKER)):
                self._set_aside(step)
        with contextlib.suppress(OSError):
            self._manager.reload()

    def all_steps(self) -> list[int]:
        """Steps of the committed checkpoints, oldest first.

        A save still written in the background is listed once ``wait()`` or the next ``save`` has
        confirmed it; while it is pending, the checkpoints it will retire (``max_to_keep``) are not
        listed either, though still on disk until it commits. Listed means a folder with a step's
        name, as orbax lists them: whether it reads back is known only when it is read.
        """
        return sorted(s for s in self._manager.all_steps() if s != self._pending)

    def latest_step(self) -> int | None:
        """The newest committed checkpoint's step (see ``all_steps``), or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, target: Any, step: int | None = None) -> Any:
        """Read checkpoint ``step`` (default: latest) into the structure, shapes, dtypes and shardings of
        ``target``; bitwise the saved values when the dtypes match. Finishes a pending save first (its
        failure raises OSError here).

        Raises:
          FileNotFoundError: there is no checkpoint (and ``step`` is None).
          ValueError: ``step`` is not a committed checkpoint, or ``target`` does not fit it.
        """
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        elif step not in self.all_steps():
            raise ValueError(f"step must be one of the saved steps {self.all_steps()}; got {step}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_storable(target))
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        return _from_storable(restored, target)

    def restore_latest_good(
        self, target: Any, *, accept: Callable[[Any, int], str | None] | None = None
    ) -> tuple[Any, int | None, list[tuple[int, str]]]:
        """Restore the newest checkpoint that reads back; set aside the ones that do not.

        Returns ``(state, step, skipped)``: ``state`` is ``target`` and ``step`` None when no
        checkpoint reads back; ``skipped`` lists (step, reason) for every checkpoint set aside, each
        renamed to ``<step>.corrupt`` (kept, never deleted) so that training can write that step
        again: the newer ones that failed to read, newest first, then the older ones that hold no data
        (an empty folder named like a step). With ``read_only`` nothing is renamed and ``skipped``
        lists the newer ones that failed to read.

        ``accept(state, step)`` (optional, process 0) may refuse a checkpoint that reads back by
        returning the reason (e.g. it holds another step than its name says); it is then treated as
        unreadable.

        Guarantees:
          - Only a checkpoint whose read fails (or that ``accept`` refuses) is set aside: the one
            restored is left as it is, and so is every older one that holds data.
          - A checkpoint whose structure or shapes differ from ``target``'s is set aside only when an
            older one fits ``target`` (it belongs to something else); when none fits, ``target`` is
            at fault: ValueError, and nothing is renamed.
          - With several processes, process 0 alone tries the candidates and renames; the others wait
            for its choice (a broadcast, sent after its renames), then read that step, and every process
            returns the same ``step`` and ``skipped``. If the chosen step does not read back on some
            process, all raise OSError. One process uses no collectives.
        """
        self.wait()
        if jax.process_count() == 1:
            return self._first_readable(target, accept)
        decision = None
        if jax.process_index() == 0:
            try:
                state, step, skipped = self._first_readable(target, accept)
                decision = {"step": step, "skipped": skipped}
            except Exception as error:  # broadcast it: the other processes wait for a decision
                decision = {"error": str(error), "value_error": isinstance(error, ValueError)}
                failure = error
        # process 0 sends its decision after its renames, so the others see the directory it left
        decision = from_process_0(decision)
        if "error" in decision:
            if jax.process_index() == 0:
                raise failure
            raise (ValueError if decision["value_error"] else OSError)(decision["error"])
        self._manager.reload()  # process 0's renames
        step, skipped = decision["step"], [tuple(s) for s in decision["skipped"]]
        if step is None:
            return target, None, skipped
        failure = None
        if jax.process_index() != 0:
            try:
                state = self._read_alone(target, step)
            except Exception as error:  # this process's shards of it are damaged
                failure = error
        read_back = np.asarray(multihost_utils.process_allgather(np.int32(failure is None)))
        if not read_back.all():
            reason = f" ({_reason(failure, 200)})" if failure else ""
            raise OSError(
                f"checkpoint {step} in {self.directory}, chosen by process 0, does not read back on "
                f"process(es) {np.flatnonzero(read_back == 0).tolist()}{reason}"
            ) from failure
        return state, step, skipped

    def _first_readable(
        self, target: Any, accept: Callable[[Any, int], str | None] | None
    ) -> tuple[Any, int | None, list[tuple[int, str]]]:
        """Process 0's decision: ``(state, step, skipped)`` of the newest step that reads into ``target``
        (``target`` and None if none does); see ``restore_latest_good``."""
        failed, misfit = [], None
        for step in reversed(self.all_steps()):
            try:
                state = self._read_alone(target, step)
            except Exception as error:  # any failure to read: truncated, partial or garbled files
                mismatch = self._misfit(step, target)
                if mismatch is not None:
                    misfit = misfit or mismatch
                    failed.append((step, f"its structure or shapes differ from this state's: {mismatch[1]}"))
                else:
                    failed.append((step, _reason(error, 200)))
                continue
            refused = accept(state, step) if accept is not None else None
            if refused is not None:
                failed.append((step, refused))
                continue
            self._set_aside_all(failed)
            return state, step, failed + self._set_aside_empty(below=step)
        if misfit is not None:  # nothing fits: the target, not the checkpoints, is at fault
            raise ValueError(misfit[0])
        self._set_aside_all(failed)
        return target, None, failed

    def _set_aside_all(self, failed: list[tuple[int, str]]) -> None:
        if not self.read_only:
            for step, _ in failed:
                self._set_aside(step)

    def _set_aside_empty(self, below: int) -> list[tuple[int, str]]:
        """Set aside the listed steps older than ``below`` whose folder holds no checkpoint data (an empty
        folder named like a step): orbax would count them among the checkpoints it keeps."""
        if self.read_only:
            return []
        empty = []
        for step in self.all_steps():
            item = self._item_path(step)
            if step < below and not (os.path.isdir(item) and os.listdir(item)):
                empty.append((step, "it holds no checkpoint data"))
        self._set_aside_all(empty)
        return empty

    def _read_alone(self, target: Any, step: int) -> Any:
        """Read step ``step`` into ``target`` as ``restore`` does, by this process alone: orbax's handler,
        without the barrier its checkpointers add (the other processes may be waiting elsewhere)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_storable(target))
        handler = ocp.StandardCheckpointHandler()
        try:
            restored = handler.restore(self._item_path(step), args=ocp.args.StandardRestore(abstract))
        finally:
            handler.close()
        return _from_storable(restored, target)

    def _item_path(self, step: int) -> epath.Path:
        return epath.Path(self._step_path(step)) / DEFAULT_ITEM_NAME

    def _step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _misfit(self, step: int, target: Any) -> tuple[str, str] | None:
        """(message, short reason) if step ``step``'s stored tree is readable and differs from ``target``
        in structure or shapes; None if it fits or its metadata does not read."""
        handler = ocp.PyTreeCheckpointHandler()
        try:
            stored = ocp.tree.to_flat_dict(handler.metadata(self._item_path(step)).tree)
        except Exception:  # unreadable metadata: the checkpoint is at fault
            return None
        finally:
            handler.close()
        wanted = ocp.tree.to_flat_dict(_to_storable(target))
        for key in sorted(stored.keys() | wanted.keys()):
            have = tuple(stored[key].shape) if hasattr(stored.get(key), "shape") else "missing"
            want = np.shape(wanted[key]) if key in wanted else "missing"
            if have != want:
                short = f"{'/'.join(key)} is {want} in target, {have} in the checkpoint"
                return (
                    f"target must have the structure and shapes of checkpoint {step} in {self.directory}: "
                    f"{short}; nothing was set aside",
                    short,
                )
        return None

    def _set_aside(self, step: int) -> None:
        source = self._step_path(step)
        destination = source + ".corrupt"
        suffix = 1
        while os.path.exists(destination):
            destination = f"{source}.corrupt{suffix}"
            suffix += 1
        os.rename(source, destination)
        self._manager.reload()

    def close(self) -> None:
        """Wait for the pending save (its failure raises OSError, see ``save``) and release the manager.

        Releasing the manager can re-raise the error of a write that already failed (and was reported by
        ``save`` or ``wait``); that one is not raised again.
        """
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception as error:  # orbax's background thread re-raising a failure
                if not self._reported:
                    raise OSError(
                        f"could not finish writing checkpoints in {self.directory} ({_reason(error, 300)}); "
                        f"the checkpoints already written are intact: {self.all_steps() or 'none'}"
                    ) from error

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(Exception):  # the error already leaving the block is the one to report
            self.close()

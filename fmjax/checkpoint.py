"""Checkpoints of a ``TrainState`` (or any pytree of arrays) with orbax's CheckpointManager.

>>> import tempfile, jax.numpy as jnp
>>> from fmjax.checkpoint import Checkpointer
>>> with Checkpointer(tempfile.mkdtemp()) as ckpt:
...     _ = ckpt.save(3, {"w": jnp.ones(2)})
...     ckpt.latest_step(), ckpt.restore({"w": jnp.zeros(2)})["w"].tolist()
(3, [1.0, 1.0])
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from fmjax._checks import check_int

__all__ = ["Checkpointer"]


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


class Checkpointer:
    """Save and restore numbered checkpoints of a pytree under ``directory``.

    Args:
      directory: where the step folders go; created if missing.
      max_to_keep: how many of the newest checkpoints to keep (None keeps all).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3):
        if max_to_keep is not None:
            check_int("max_to_keep", max_to_keep, low=1)
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def save(self, step: int, state: Any, *, wait: bool = True) -> bool:
        """Write ``state`` as checkpoint ``step``; returns whether it was saved."""
        check_int("step", step, low=0)
        try:
            saved = self._manager.save(step, args=ocp.args.StandardSave(_to_storable(state)), force=True)
            if wait:
                self._manager.wait_until_finished()
        except Exception as error:  # a full disk, a quota, a vanished directory: tensorstore and orbax errors
            self._discard_partial(step)
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise OSError(
                f"could not write checkpoint {step} in {self.directory} ({reason[:300]}); "
                f"the checkpoints already written are intact: {self.all_steps() or 'none'}",
            ) from error
        return saved

    def _discard_partial(self, step: int) -> None:
        """Remove orbax's temporary folder of a failed save; set aside a half-committed step folder."""
        for name in os.listdir(self.directory):
            if name.startswith(f"{step}.orbax-checkpoint-tmp"):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        self._manager.reload()
        if os.path.isdir(os.path.join(self.directory, str(step))):  # renamed, but its commit failed
            self._set_aside(step)

    def all_steps(self) -> list[int]:
        """Steps of the checkpoints on disk, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def restore(self, target: Any, step: int | None = None) -> Any:
        """Read checkpoint ``step`` (default: latest) into the structure, shapes and dtypes of ``target``."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        elif step not in self.all_steps():
            raise ValueError(f"step must be one of the saved steps {self.all_steps()}; got {step}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_storable(target))
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        return _from_storable(restored, target)

    def restore_latest_good(self, target: Any) -> tuple[Any, int | None, list[tuple[int, str]]]:
        """Restore the newest checkpoint that reads back; set aside the ones that do not.

        Returns ``(state, step, skipped)``: ``state`` is ``target`` and ``step`` None when no
        checkpoint reads back; ``skipped`` lists (step, reason) for every unreadable checkpoint,
        each renamed to ``<step>.corrupt`` (kept, never deleted) so that training can write that
        step again.
        """
        skipped = []
        for step in reversed(self.all_steps()):
            try:
                return self.restore(target, step), step, skipped
            except Exception as error:  # any failure to read: truncated, partial or garbled files
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                skipped.append((step, reason[:200]))
                self._set_aside(step)
        return target, None, skipped

    def _set_aside(self, step: int) -> None:
        source = os.path.join(self.directory, str(step))
        destination = source + ".corrupt"
        suffix = 1
        while os.path.exists(destination):
            destination = f"{source}.corrupt{suffix}"
            suffix += 1
        os.rename(source, destination)
        self._manager.reload()

    def close(self) -> None:
        """Wait for pending writes and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Host work of the training loop, overlapped with the device: prefetched input chunks and host-solved pairs.

The loop runs its steps in chunks (several steps per dispatch under ``lax.scan``). While the device runs
chunk k:

- ``Prefetcher`` has a thread read the host data of the next chunks and place them on the devices with the
  batch's sharding (double-buffered);
- ``HostPairs`` solves the couplings of chunk k+1 on host threads (the C assignment solver releases the GIL),
  from the inputs the device computed for that chunk ahead of chunk k's steps.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

__all__ = ["Prefetcher", "HostPairs", "default_solver_threads"]


def default_solver_threads() -> int:
    """Host threads for the coupling solves: the cores this process may use, less one for the driver."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


class Prefetcher:
    """Produce ``make(item)`` for each item of ``items`` on a background thread, ``depth`` ahead.

    Iterating yields the results in order; an exception raised by ``make`` is re-raised by the iterator.
    ``close()`` stops the thread (also on garbage collection of the iterator).
    """

    def __init__(self, items: Iterator[Any], make: Callable[[Any], Any], *, depth: int = 2):
        self._ready: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.busy_seconds = 0.0  # time spent in ``make`` so far (host input work)
        self._thread = threading.Thread(target=self._fill, args=(items, make), daemon=True)
        self._thread.start()

    def _fill(self, items, make):
        try:
            for item in items:
                start = time.perf_counter()
                result = (item, make(item))
                self.busy_seconds += time.perf_counter() - start
                while not self._stop.is_set():
                    try:
                        self._ready.put(result, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._ready.put(StopIteration())
        except BaseException as error:  # handed to the consumer, which raises it
            self._ready.put(error)

    def __iter__(self):
        return self

    def __next__(self):
        result = self._ready.get()
        if isinstance(result, StopIteration):
            raise StopIteration
        if isinstance(result, BaseException):
            raise result
        return result

    def close(self) -> None:
        """Stop producing; the thread ends at its next check."""
        self._stop.set()


class HostPairs:
    """Solve a host-solved coupling (e.g. ``fmjax.couplings.Exact``) for every step of a chunk.

    ``solve(inputs)`` takes the coupling's ``host_inputs`` for n steps (each array with a leading axis of
    n, as numpy arrays or replicated device arrays) and returns ``j`` of shape [n, batch] (int32): one
    solve per step of the global batch, spread over ``threads`` host threads. With several processes the
    steps are dealt round-robin to the processes and the answers exchanged, so each global batch is
    solved once in the whole run, not once per process or device.

    A failed solve never raises on a worker thread: each solve returns a status code (the coupling's
    ``solve_host_status``, or ``solve_host`` with its exception caught), the codes are exchanged with
    the answers, and ``solve`` raises one RuntimeError in the calling thread, on every process, naming
    the first failed step and the cause.
    """

    def __init__(self, coupling: Any, *, threads: int | None = None):
        self.coupling = coupling
        self.threads = threads or default_solver_threads()
        self.busy_seconds = 0.0  # wall time spent in ``solve`` so far (inputs' copy to the host included)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="fmjax-coupling")

    def solve(self, inputs: tuple, *, first_step: int | None = None) -> np.ndarray:
        """``j`` of shape [n, batch] for the n steps of ``inputs``; ``first_step`` (the training step of
        ``inputs[k][0]``) only names the step in the error raised when a solve fails."""
        start = time.perf_counter()
        try:
            return self._solve(inputs, first_step)
        finally:
            self.busy_seconds += time.perf_counter() - start

    def _solve(self, inputs: tuple, first_step: int | None) -> np.ndarray:
        arrays = tuple(_to_host(a) for a in inputs)
        n = arrays[0].shape[0]
        processes, rank = jax.process_count(), jax.process_index()
        mine = range(rank, n, processes)
        futures = [self._pool.submit(_solve_one, self.coupling, tuple(a[k] for a in arrays)) for k in mine]
        solved = [f.result() for f in futures]
        batch = arrays[0].shape[1]
        j = np.zeros((n, batch), np.int32)
        codes = np.zeros(n, np.int32)
        reasons = {}
        for k, (jk, code, reason) in zip(mine, solved, strict=True):
            j[k], codes[k] = jk, code
            reasons[k] = reason
        if processes > 1:
            from jax.experimental import multihost_utils

            gathered_j, gathered_codes = (
                np.asarray(a) for a in multihost_utils.process_allgather((j, codes))
            )  # [processes, n, batch], [processes, n]
            j = np.stack([gathered_j[k % processes, k] for k in range(n)])
            codes = np.array([gathered_codes[k % processes, k] for k in range(n)], np.int32)
        failed = np.flatnonzero(codes)
        if failed.size:
            k = int(failed[0])
            step = (
                f"step {first_step + k}" if first_step is not None else f"step {k + 1} of {n} in this chunk"
            )
            reason = reasons.get(k) or _describe(self.coupling, int(codes[k]))
            raise RuntimeError(
                f"{type(self.coupling).__name__} coupling: the host solve of {step} failed: {reason}"
                + (f" ({failed.size} of {n} steps failed)" if failed.size > 1 else "")
            )
        return j

    def close(self) -> None:
        """Release the threads."""
        self._pool.shutdown(wait=True)


def _describe(coupling: Any, code: int) -> str:
    from fmjax.couplings import HOST_STATUS

    return HOST_STATUS.get(code, f"status code {code}")


def _solve_one(coupling: Any, inputs: tuple) -> tuple[np.ndarray, int, str | None]:
    """``(j, code, reason)`` for one step; never raises (``reason`` is None unless an exception says it)."""
    n = int(np.shape(inputs[0])[0])
    try:
        if hasattr(coupling, "solve_host_status"):
            j, code = coupling.solve_host_status(inputs)
        else:
            j, code = coupling.solve_host(inputs), 0
        j = np.asarray(j, np.int32)
        if j.shape != (n,):
            return np.arange(n, dtype=np.int32), 2, f"the solve returned shape {j.shape}, not ({n},)"
        return j, int(code), None
    except Exception as error:  # raised in the calling thread by ``HostPairs.solve``
        return np.arange(n, dtype=np.int32), 2, f"{type(error).__name__}: {error}"


def _to_host(array: Any) -> np.ndarray:
    """A numpy copy of a replicated (or single-device) array, using this process's first shard."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        array = array.addressable_data(0)
    return np.asarray(array)

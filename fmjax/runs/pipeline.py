"""Host work of the training loop, overlapped with the device: chunks of steps, prefetched input and
host-solved pairs.

The loop runs its steps in chunks (several steps per dispatch under ``lax.scan``), cut at the same steps
in a resumed run as in an uninterrupted one (``chunks``). While the device runs chunk k:

- ``Prefetcher`` has a thread read the host data of the next chunks and place them on the devices with the
  batch's sharding (double-buffered);
- ``HostPairs`` solves the couplings of chunk k+1 on host threads (the C assignment solver releases the GIL),
  from the inputs the device computed for that chunk ahead of chunk k's steps.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from fmjax.couplings import HOST_STATUS
from fmjax.runs.config import RunConfig

__all__ = [
    "Prefetcher",
    "HostPairs",
    "default_solver_threads",
    "chunks",
    "next_chunk",
    "steps_per_dispatch",
    "pair",
    "host_inputs",
    "CHUNK_INPUT_BYTES",
    "INPUT_THREADS",
]


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


def next_chunk(step: int, config: RunConfig) -> int:
    """Steps to the next log or checkpoint boundary; depends on the step alone, so a resumed run
    chunks (and so computes) exactly as an uninterrupted one."""
    boundaries = (
        (step // config.log_every + 1) * config.log_every,
        (step // config.checkpoint_every + 1) * config.checkpoint_every,
        config.steps,
    )
    return min(boundaries) - step


def pair(config: RunConfig, source, key: jax.Array, host) -> tuple[jax.Array, jax.Array, Any]:
    """``(x0, x1, cond)`` of one step: cond is x1's labels in a conditional run, else None."""
    if config.conditional:
        return source.pair_cond(key, host)
    x0, x1 = source.pair(key, host)
    return x0, x1, None


def host_inputs(config: RunConfig, coupling, x0, x1, cond) -> tuple:
    """What a host-solved coupling needs of one step (x1's labels too when it pairs by label)."""
    if config.by_label:
        return coupling.host_inputs(x0, x1, labels1=cond)
    return coupling.host_inputs(x0, x1)


# Upper bound on the device memory one dispatch's inputs (host data and host-solved pairs' inputs) take:
# the chunk of steps per dispatch is cut shorter where a step's inputs are large (images, cost matrices).
CHUNK_INPUT_BYTES = 64 * 2**20
# Threads reading the steps of a chunk from the data source (array_record reads and image decoding release
# the GIL for most of their time).
INPUT_THREADS = 4


def steps_per_dispatch(config: RunConfig, source, coupling, *, scan: bool = True) -> int:
    """Steps per dispatch: up to a log boundary, fewer where a step's inputs are large; 1 without ``scan``."""
    if not scan:  # the task's step is faster dispatched alone on this backend (see ``Task.scans``)
        return 1
    spec = source.host_spec().values()
    per_step = sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in spec)
    if coupling is not None:
        inputs = jax.eval_shape(
            lambda key, host: host_inputs(config, coupling, *pair(config, source, key, host)),
            jax.random.PRNGKey(0),
            abstract_host(source),
        )
        per_step += sum(math.prod(a.shape) * a.dtype.itemsize for a in inputs)
    return max(1, min(config.log_every, CHUNK_INPUT_BYTES // max(per_step, 1)))


def abstract_host(source) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes and dtypes of one step's host data, as ``jax.eval_shape`` takes them."""
    return {name: jax.ShapeDtypeStruct(shape, dtype) for name, (shape, dtype) in source.host_spec().items()}


def chunks(done: int, config: RunConfig, limit: int):
    """The (first step, length) of every dispatch from ``done`` to the end; a function of the step alone,
    so a resumed run cuts (and so computes) its chunks exactly as an uninterrupted one."""
    while done < config.steps:
        n = min(next_chunk(done, config), limit - done % limit)
        yield done, n
        done += n

"""The one training loop: ``train(config, run_dir)`` for every kind of run and data source."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import fmjax.runs.distributed as distributed
import fmjax.runs.pipeline as pipeline
from fmjax._assignment import HAVE_NATIVE
from fmjax._checks import ArgumentError
from fmjax.checkpoint import Checkpointer
from fmjax.runs.config import RunConfig
from fmjax.runs.run import Run, holds_its_step
from fmjax.runs.rundir import CHECKPOINT_DIR, METRICS_FILE, resume_metrics, take_run_dir
from fmjax.runs.sinks import log_to_sinks, metric_sinks
from fmjax.runs.streams import stream_key
from fmjax.runs.tasks import make_source, task_of
from fmjax.training import NONFINITE_GRADIENT, NONFINITE_LOSS, NONFINITE_STATE, TrainState

__all__ = ["train", "TrainingInterrupted", "first_nonfinite"]


class TrainingInterrupted(Exception):
    """``train`` stopped because its ``stop`` callback asked it to (Ctrl-C in ``fmjax train``).

    Attributes:
      step: the steps trained.
      checkpoint: the newest checkpoint on disk (None if none); the same command resumes from it.
    """

    def __init__(self, step: int, checkpoint: int | None):
        self.step, self.checkpoint = step, checkpoint
        saved = f"checkpoint {checkpoint} is saved" if checkpoint is not None else "no checkpoint yet"
        super().__init__(f"interrupted at step {step} ({saved}); resume with the same command")


def first_nonfinite(nonfinite: np.ndarray, skipped: np.ndarray) -> int | None:
    """Index of the first step whose loss, gradient or updated state is not finite (``nonfinite`` != 0)
    among the steps that were not skipped, or None."""
    bad = np.flatnonzero((nonfinite != 0) & (skipped == 0))
    return int(bad[0]) if bad.size else None


def _nonfinite_message(code: int, loss: float, grad_norm: float) -> str:
    parts = []
    if code & NONFINITE_LOSS:
        parts.append(f"the loss ({loss})")
    if code & NONFINITE_GRADIENT:
        parts.append(f"the gradient norm ({grad_norm})")
    if code & NONFINITE_STATE:
        parts.append("the updated parameters or optimiser state")
    joined = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{joined} became non-finite"


def _record(step: int, logged: list, elapsed: float) -> dict[str, Any]:
    """The metrics record of the chunks since the last one: mean loss of the applied steps, mean gradient
    norm, skipped steps."""
    losses, skipped, grad_norms = (np.concatenate(parts) for parts in zip(*logged, strict=True))
    applied = skipped == 0
    record = {
        "step": step,
        "loss": float(losses[applied].mean()) if applied.any() else math.nan,
        "grad_norm": float(grad_norms.mean()),
        "time": round(elapsed, 3),
    }
    if skipped.any():
        record["skipped"] = int(skipped.sum())
    return record


def train(
    config: RunConfig,
    run_dir: str | os.PathLike,
    *,
    progress: Callable[[int], Any] | None = None,
    log: Callable[[str], Any] | None = None,
    data_dir: str | None = None,
    devices: int | None = None,
    pipeline: bool = True,
    solver_threads: int | None = None,
    source: Any = None,
    stop: Callable[[], bool] | None = None,
    tensorboard: bool = False,
    loggers: Sequence[Any] = (),
    initial_state: TrainState | None = None,
) -> Run:
    """Train ``config`` in ``run_dir``, resuming exactly from its latest good checkpoint if it has one.

    One loop for every data source (2D samplers, tfds images, stored pairs). A new directory gets the
    config; one that holds a run must hold the same config (else a ValueError names the differing fields),
    unless that run never saved a checkpoint: then it starts again with ``config`` (its ``config.json`` and
    ``metrics.jsonl`` kept as ``.old``, reported through ``log``).

    Before anything is written, the configuration, devices, data and model are checked (ValueError /
    TypeError naming the argument), then ``run_dir`` (see ``check_run_dir``). The directory is locked
    while training (``train.lock``): a second ``train`` of it raises BlockingIOError at once, and a lock
    left by a killed process is taken over. With several processes (jax.distributed) every process
    must be given the same ``run_dir`` and ``config``; if one is not, or fails to start, all raise
    within the start-up instead of waiting for each other. Process 0 alone locks and writes.

    Devices: the batch is sharded over ``devices`` devices (default: every device the run sees, over all
    processes), the state replicated; the loss is the mean over the global batch, so the run trains what
    one device would, up to the order of floating-point reductions.

    Each dispatch runs several steps under ``lax.scan`` (up to the next log or checkpoint boundary, fewer
    where a step's inputs are large). Randomness and data are functions of (seed, step): a run killed at
    any moment and started again ends with the same parameters, bit for bit. Host work overlaps the
    device: a thread reads and places the next chunks' host data; with ``pipeline`` (default) a
    host-solved coupling (exact OT) is solved for chunk k+1 on ``solver_threads`` host threads while the
    device runs chunk k, once per global batch, and the step receives the pairs as a sharded input
    (``pipeline=False`` solves inside the step, where the device waits for the host). Checkpoints are
    written asynchronously every ``checkpoint_every`` steps and at the end, keeping the last
    ``keep_checkpoints``; unreadable ones are reported through ``log`` and set aside, and so are
    unparsable lines of ``metrics.jsonl`` (``resume_metrics``).
    ``progress(n)`` is called after every chunk of n steps.

    Non-finite values: every step reports whether its loss, gradient norm and updated parameters and
    optimiser state are finite. With ``on_nonfinite="stop"`` the first bad step raises
    FloatingPointError naming the step and the quantity; that state is never saved, and the checkpoints
    already written are kept. With ``"skip"`` such steps leave the state unchanged and are counted.

    ``stop()`` (e.g. set by Ctrl-C) is polled before every dispatch (by all processes together); when it
    returns True the loop saves the current step if it is at a log boundary and not saved yet, waits for
    the checkpoint writes and raises ``TrainingInterrupted``. The same call resumes it, bit for bit.

    ``source`` replaces the data the configuration names (``fmjax.data.sources``: an object with
    ``host_spec()``, ``host_batch(step)`` and ``pair(key, host)``, e.g. an ``ImageSource`` over any
    random-access records); the model still follows ``config`` (``dataset`` picks the UNet's shape).

    Metrics also go, from process 0, to TensorBoard event files in ``run_dir/tensorboard`` when
    ``tensorboard`` (a resumed run's new file purges the steps after its checkpoint) and to each of
    ``loggers`` (objects with ``scalars(dict, step)``, e.g. ``fmjax.tensorboard.WandbLogger``), as
    ``train/<name>``.

    ``initial_state`` (e.g. a teacher's parameters for a reflow run) replaces the configuration's
    initial state when the run starts without a checkpoint; it must have that state's structure.
    """
    run_dir = os.fspath(run_dir)
    say = log or (lambda message: None)

    def prepare():
        mesh = distributed.make_mesh(devices)
        device_count = 1 if mesh is None else mesh.devices.size
        if config.batch_size % device_count:
            raise ArgumentError(
                lambda n: (
                    f"{n('batch_size')} {config.batch_size} cannot be split evenly over {device_count} "
                    f"devices; use a multiple of {device_count} or restrict the devices ({n('devices')})"
                )
            )
        data = make_source(config, data_dir, run_dir) if source is None else source
        run = Run.build(config)
        if initial_state is not None:
            expected, given = jax.tree.structure(run.state), jax.tree.structure(initial_state)
            if expected != given:
                raise ValueError("initial_state must have the structure of this configuration's TrainState")
            run.state = initial_state
        return mesh, data, run

    # everything that can be checked is checked before anything is written
    if jax.process_count() == 1:
        mesh, data, run = prepare()
    else:
        prepared, failure = None, None
        try:
            prepared = prepare()
        except Exception as error:  # any failure to start: the other processes must not wait for this one
            failure = error
        distributed.agree(run_dir, config, failure)
        mesh, data, run = prepared
    env = distributed.environment(mesh)
    lock, failure = None, None
    if jax.process_index() == 0:
        try:
            lock = take_run_dir(config, run_dir, env, say)
        except Exception as error:
            failure = error
    if jax.process_count() > 1:
        distributed.broadcast_outcome(failure)  # the others wait for process 0's directory
    elif failure is not None:
        raise failure
    try:
        loop = _Loop(config, run_dir, run, mesh, data, host_solved=pipeline, solver_threads=solver_threads)
        state, start = loop.run(say=say, progress=progress, stop=stop, sinks=(tensorboard, tuple(loggers)))
    finally:
        if lock is not None:
            lock.release()
    if mesh is not None:  # a host copy of the replicated state, for evaluation on one process
        state = jax.tree.map(lambda a: jnp.asarray(a.addressable_data(0)), state)
    run.state = state
    run.environment = env
    run.trained_steps = config.steps - start
    return run


class _Loop:
    """The compiled pieces of one run's training: the chunked step, the input placement and the pairs.

    ``run`` drives them: chunk k runs on the device while the host reads chunk k+1's data (a
    ``Prefetcher`` thread) and solves its pairs (``HostPairs``), then logs and checkpoints at the
    boundaries of ``pipeline.chunks``.
    """

    def __init__(
        self,
        config: RunConfig,
        run_dir: str,
        run: Run,
        mesh: Mesh | None,
        source: Any,
        *,
        host_solved: bool,
        solver_threads: int | None,
    ):
        self.config, self.run_dir, self.mesh, self.source = config, run_dir, mesh, source
        self.coupling = config.make_coupling()
        self.host_solved = host_solved and hasattr(self.coupling, "solve_host")
        self.solver_threads = solver_threads
        self.step = config.make_step(run.apply_fn, run.optimizer, mesh=mesh, host_pairs=self.host_solved)
        self.data_key = stream_key(config.seed, "data")
        self.initial = run.state
        if mesh is None:
            self.chunk = jax.jit(self._scan, static_argnums=3, donate_argnums=0)
            self.prepare = jax.jit(self._host_inputs, static_argnums=2)
        else:
            replicated = NamedSharding(mesh, PartitionSpec())
            self.batch = NamedSharding(mesh, PartitionSpec("data"))
            self.chunked = NamedSharding(mesh, PartitionSpec(None, "data"))
            self.initial = jax.device_put(self.initial, replicated)
            self.chunk = jax.jit(self._scan, static_argnums=3, donate_argnums=0, out_shardings=replicated)
            self.prepare = jax.jit(self._host_inputs, static_argnums=2, out_shardings=replicated)
        scan = task_of(config).scans(jax.default_backend())
        coupling = self.coupling if self.host_solved else None
        self.limit = pipeline.steps_per_dispatch(config, source, coupling, scan=scan)
        self.readers: ThreadPoolExecutor | None = None

    # --- traced: one step and a chunk of steps ---------------------------------------------------------

    def _constrain(self, x):
        return x if self.mesh is None else jax.lax.with_sharding_constraint(x, self.batch)

    def _pair(self, step_index, host):
        key = jax.random.fold_in(self.data_key, step_index)
        x0, x1, cond = pipeline.pair(self.config, self.source, key, host)
        return self._constrain(x0), self._constrain(x1), None if cond is None else self._constrain(cond)

    def _one(self, state, inputs):
        host, j = inputs
        x0, x1, cond = self._pair(state.step, host)
        if j is not None:  # pairs solved on the host: (x0[k], x1[j[k]]); the labels move with x1
            x1 = self._constrain(x1[j])
            cond = None if cond is None else self._constrain(cond[j])
        return self.step(state, x0, x1) if cond is None else self.step(state, x0, x1, cond)

    def _scan(self, state, host, pairs, n):
        if n == 1:  # no loop (see steps_per_dispatch): the step's outputs gain the chunk's axis
            state, metrics = self._one(state, jax.tree.map(lambda a: a[0], (host, pairs)))
            metrics = jax.tree.map(lambda a: a[None], metrics)
        else:
            state, metrics = jax.lax.scan(self._one, state, (host, pairs), length=n)
        skipped = metrics.get("skipped", jnp.zeros(n, jnp.int32))
        return state, metrics["loss"], metrics["grad_norm"], skipped, metrics["nonfinite"]

    def _host_inputs(self, first, host, n):
        steps = first + jnp.arange(n)
        solve_inputs = lambda s, h: pipeline.host_inputs(self.config, self.coupling, *self._pair(s, h))  # noqa: E731
        return jax.vmap(solve_inputs)(steps, host)

    # --- host: placing a chunk's inputs ----------------------------------------------------------------

    def _place(self, item):
        """The host data of a chunk, stacked [n, local batch, ...] and placed with the batch sharding."""
        first, n = item
        host = list(self.readers.map(self.source.host_batch, range(first, first + n)))
        stacked = {name: np.stack([h[name] for h in host]) for name in self.source.host_spec()}
        if self.mesh is None:
            return jax.device_put(stacked)
        return {k: jax.make_array_from_process_local_data(self.chunked, v) for k, v in stacked.items()}

    def _put_pairs(self, j):
        """The pairs of a chunk ([n, global batch], the same in every process), sharded like the batch."""
        if self.mesh is None:
            return jnp.asarray(j)
        return jax.make_array_from_callback(j.shape, self.chunked, lambda index: j[index])

    # --- the loop ----------------------------------------------------------------------------------------

    def run(self, *, say, progress, stop, sinks) -> tuple[TrainState, int]:
        """Train from the latest good checkpoint (or the start) to ``config.steps``; the final state and
        the step it started from."""
        config, writer = self.config, jax.process_index() == 0
        metrics_path = os.path.join(self.run_dir, METRICS_FILE)
        solver = pipeline.HostPairs(self.coupling, threads=self.solver_threads) if self.host_solved else None
        if config.coupling == "exact" and not HAVE_NATIVE and writer:
            say(
                "the exact coupling is solved by POT: fmjax's C solver was not built (no C compiler at "
                "install), which is 3-6x slower; reinstall with a C compiler to build it"
            )
        with contextlib.ExitStack() as stack:
            ckpt = stack.enter_context(
                Checkpointer(os.path.join(self.run_dir, CHECKPOINT_DIR), max_to_keep=config.keep_checkpoints)
            )
            if solver is not None:
                stack.callback(solver.close)
            state, resumed, skipped = ckpt.restore_latest_good(self.initial, accept=holds_its_step)
            for bad, reason in skipped:
                say(f"checkpoint {bad} is unreadable ({reason}); set aside as {bad}.corrupt")
            done = 0 if resumed is None else int(state.step)
            start_step = done
            saved = done  # the newest step known to be saved (or the start)
            if writer:
                resume_metrics(metrics_path, done, say)
            if resumed is not None:
                say(f"resuming from checkpoint {resumed}")
                if progress is not None:
                    progress(done)
            metrics_log = stack.enter_context(open(metrics_path if writer else os.devnull, "a"))
            sinks = metric_sinks(stack, self.run_dir, sinks, resumed) if writer else []
            self.readers = stack.enter_context(
                ThreadPoolExecutor(pipeline.INPUT_THREADS, thread_name_prefix="fmjax-input")
            )
            prefetch = pipeline.Prefetcher(pipeline.chunks(done, config, self.limit), self._place)
            stack.callback(prefetch.close)
            upcoming = next(prefetch, None)
            pairs = None
            if solver is not None and upcoming is not None:
                (first, n), host = upcoming
                pairs = self._put_pairs(solver.solve(self.prepare(first, host, n)))
            start, logged, host_busy = time.perf_counter(), [], (0.0, 0.0)
            while upcoming is not None:
                if distributed.stop_requested(stop):
                    if not logged and done != saved:  # a log boundary: records and state agree here
                        ckpt.save(done, state)
                    ckpt.wait()
                    raise TrainingInterrupted(done, ckpt.latest_step())
                (first, n), host = upcoming
                upcoming = next(prefetch, None)
                ahead = None
                if solver is not None and upcoming is not None:  # queued before chunk k, so it runs first
                    (next_first, next_n), next_host = upcoming
                    ahead = self.prepare(next_first, next_host, next_n)
                state, losses, grad_norm, skip_flags, nonfinite = self.chunk(state, host, pairs, n)
                if ahead is not None:  # solved on host threads while the device runs chunk k
                    pairs = self._put_pairs(solver.solve(ahead))
                losses, skip_flags, grad_norm = (
                    np.asarray(losses),
                    np.asarray(skip_flags),
                    np.asarray(grad_norm),
                )
                nonfinite = np.asarray(nonfinite)
                bad = first_nonfinite(nonfinite, skip_flags)
                if bad is not None:  # "stop": this chunk's state is never saved
                    ckpt.wait()
                    last = ckpt.latest_step()
                    kept = (
                        f"the last good checkpoint is step {last}"
                        if last is not None
                        else "no checkpoint yet"
                    )
                    what = _nonfinite_message(int(nonfinite[bad]), float(losses[bad]), float(grad_norm[bad]))
                    raise FloatingPointError(
                        f"{what} at step {done + bad + 1}; training stopped. {kept}"
                        " (lower the learning rate, or pass --on-nonfinite skip)"
                    )
                done += n
                logged.append((losses, skip_flags, grad_norm))
                if skip_flags.any():
                    say(
                        f"skipped {int(skip_flags.sum())} step(s) with a non-finite loss, gradient or state, "
                        f"first at step {done - n + int(np.flatnonzero(skip_flags)[0]) + 1}"
                    )
                if done % config.log_every == 0 or done == config.steps:
                    record = _record(done, logged, time.perf_counter() - start)
                    # host work since the last record (the input thread runs up to two chunks ahead)
                    busy = (prefetch.busy_seconds, solver.busy_seconds if solver is not None else 0.0)
                    record["host_input_s"] = round(busy[0] - host_busy[0], 4)
                    if solver is not None:
                        record["host_solve_s"] = round(busy[1] - host_busy[1], 4)
                    host_busy = busy
                    metrics_log.write(json.dumps(record) + "\n")
                    metrics_log.flush()
                    log_to_sinks(sinks, "train", record, done)
                    logged = []
                if done % config.checkpoint_every == 0 or done == config.steps:
                    ckpt.save(done, state, wait=done == config.steps)
                    saved = done
                if progress is not None:
                    progress(n)
            ckpt.wait()
        return state, start_step

"""Device check: what fmjax does on the device this runs on, written to ``benchmarks/DEVICE.md``.

    python -m benchmarks.device [--quick | --full] [--budget-s 420] [--out benchmarks/DEVICE.md]

1. Training throughput (steps/s, samples/s) through ``fmjax.runs.train``, the loop ``fmjax train`` runs, for
   a 2D MLP (3 x 256 SELU, 8gaussians -> moons) and a 32x32x3 UNet (the cifar10 configuration, on random
   uint8 images held in memory: nothing is downloaded), at batch 256, 1024 and 4096, with I-CFM, OT-CFM
   (exact coupling, solved on the host while the device runs the previous chunk: fmjax's default) and
   Sinkhorn OT (in the step). Each run's steady state comes from its own ``metrics.jsonl`` ("time" of
   each logged chunk, past the first chunk, which holds the compilation); a run is stopped once it has
   measured ``--cell-s`` seconds.
2. The device's peak matmul rate (a large product in float32 at precision HIGHEST, at the default precision,
   and in bfloat16), and each training run's FLOP rate (XLA's cost analysis of the I-CFM step divided by the
   measured step time) as a fraction of it.
3. dopri5 sampling and exact log-likelihood of the trained 2D MLP (10k points), and of the UNet on a small
   batch, with NFE.

The report is rewritten after every row, so a run cut short still leaves its figures. New measurements
start only while ``--budget-s`` lasts; a coupling is not tried at larger batches once one of its steps
takes more than ``--max-step-s``. On a CPU the default is a tiny setting (``--quick``); ``--full`` forces
the accelerator setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._timing import interleaved, markdown_table
from fmjax.data.sources import ImageSource, ToySource, dequantise
from fmjax.data.toy import sample as toy_sample
from fmjax.likelihood import divergence_exact, log_likelihood
from fmjax.runs import Run, RunConfig, train
from fmjax.runs.pipeline import steps_per_dispatch
from fmjax.runs.tasks import images as image_runs
from fmjax.runs.tasks import task_of
from fmjax.sampling import as_velocity, sample

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "DEVICE.md")
TRAININGS = (  # label, coupling: the exact coupling is solved on the host (pipelined), Sinkhorn in the step
    ("I-CFM", "independent"),
    ("OT-CFM (exact, pipelined)", "exact"),
    ("Sinkhorn (in step)", "sinkhorn"),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setting:
    """Sizes of one device check."""

    name: str
    batches: tuple[int, ...]
    mlp_width: int
    unet_width: int
    image_dataset: str
    chunk: int  # steps per dispatch (and per logged record) where the inputs allow
    cell_s: float  # seconds of steady state measured per training run
    max_step_s: float
    matmul: int
    points: int
    ll_images: int
    mlp_train_steps: int  # steps of the I-CFM run at the first batch, whose model section 3 uses
    unet_train_steps: int


FULL = Setting(
    name="full",
    batches=(256, 1024, 4096),
    mlp_width=256,
    unet_width=64,
    image_dataset="cifar10",
    chunk=100,
    cell_s=3.0,
    max_step_s=2.0,
    matmul=8192,
    points=10_000,
    ll_images=1,
    mlp_train_steps=3000,
    unet_train_steps=300,
)
TINY = Setting(
    name="tiny",
    batches=(32, 128),
    mlp_width=32,
    unet_width=8,
    image_dataset="cifar10",
    chunk=10,
    cell_s=1.0,
    max_step_s=1.0,
    matmul=512,
    points=10_000,
    ll_images=1,
    mlp_train_steps=300,
    unet_train_steps=20,
)


class MemoryImages(ImageSource):
    """Random uint8 images held in a numpy array, served as an ``ImageSource`` serves a tfds source.

    Step s reads the (s mod pool)-th contiguous slice of ``batch_size`` images; ``pair`` (noise, dequantised
    images) is ``ImageSource.pair``.
    """

    def __init__(self, shape: tuple[int, ...], *, batch_size: int, pool: int = 2, seed: int = 0):
        self.images = np.random.default_rng(seed).integers(
            0, 256, (pool * batch_size, *shape), dtype=np.uint8
        )
        records = [{"image": image} for image in self.images]
        # the images are in memory already: no cache of the records (which carry no labels)
        super().__init__(records, batch_size=batch_size, seed=seed, cache_bytes=0)

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        begin = (step % self.steps_per_epoch) * self.batch_size
        return {"image": self.images[begin : begin + self.batch_size]}


class _Enough(Exception):
    """Raised from ``train``'s progress callback: the run has measured enough."""


class Report:
    """The markdown report, rewritten whole after every row."""

    def __init__(self, out: str, header: str):
        self.out = out
        self.header = header
        self.status = "in progress"
        self.peak: list[list[object]] = []
        self.train: list[list[object]] = []
        self.solves: list[list[object]] = []
        self.train_note = ""
        self.solve_note = ""

    def text(self) -> str:
        parts = [self.header, f"Status: {self.status}.", "## Peak matmul rate"]
        parts.append(markdown_table(["product", "dtype, precision", "ms", "TFLOP/s"], self.peak))
        parts += ["## Training throughput through `fmjax.runs.train`", self.train_note]
        parts.append(
            markdown_table(
                [
                    "model",
                    "batch",
                    "training",
                    "steps/s",
                    "samples/s",
                    "GFLOP/step",
                    "TFLOP/s",
                    "of f32 peak",
                    "of bf16 peak",
                    "steps measured",
                    "steps/dispatch",
                    "first chunk s",
                ],
                self.train,
            )
        )
        parts += ["## Sampling and log-likelihood", self.solve_note]
        parts.append(
            markdown_table(["task", "model", "batch", "NFE", "compile s", "run s", "points/s"], self.solves)
        )
        return "\n\n".join(parts) + "\n"

    def write(self) -> None:
        tmp = f"{self.out}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(self.text())
        os.replace(tmp, self.out)


def say(message: str) -> None:
    print(message, flush=True)


def _seconds(fn, *, budget: float, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` (which blocks) after a warm-up call; repeated only while that is cheap."""
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    if once > budget:
        return once
    inner = max(1, int(budget / repeats / max(once, 1e-6)))
    return interleaved({"fn": fn}, repeats=repeats, inner=inner)["fn"]


def matmul_rates(n: int, *, budget: float) -> dict[str, float]:
    """FLOP/s of an [n, n] x [n, n] product: float32 HIGHEST, float32 default precision, bfloat16."""
    rates = {}
    for label, dtype, precision in (
        ("float32, HIGHEST", jnp.float32, jax.lax.Precision.HIGHEST),
        ("float32, DEFAULT", jnp.float32, jax.lax.Precision.DEFAULT),
        ("bfloat16, DEFAULT", jnp.bfloat16, jax.lax.Precision.DEFAULT),
    ):
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        product = jax.jit(lambda a, b, precision=precision: jnp.matmul(a, b, precision=precision))
        rates[label] = 2 * n**3 / _seconds(lambda: jax.block_until_ready(product(a, b)), budget=budget)  # noqa: B023
    return rates


def step_flops(config: RunConfig, shape: tuple[int, ...]) -> float:
    """FLOPs of one I-CFM train step of ``config`` (model, loss, optimiser, EMA), from XLA's cost analysis."""
    run = Run.build(config)
    step = config.make_step(run.apply_fn, run.optimizer, host_pairs=True)
    x = jax.ShapeDtypeStruct((config.batch_size, *shape), jnp.float32)
    return float(step.lower(run.state, x, x).cost_analysis()["flops"])


def _throughput(run_dir: str) -> tuple[float, int]:
    """Steady-state steps/s from the run's metrics, past the first logged chunk, and the steps it covers."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if "event" not in r]
    if len(records) < 2:
        raise RuntimeError("fewer than two logged chunks")
    first, last = records[0], records[-1]
    return (last["step"] - first["step"]) / (last["time"] - first["time"]), last["step"] - first["step"]


def train_cell(
    config: RunConfig,
    source,
    *,
    cell_s: float,
    max_step_s: float,
    deadline: float,
    steps: int | None = None,
) -> dict:
    """Train ``config`` until it has measured ``cell_s`` seconds past its first chunk; return its figures.

    A run stops early once a step takes more than ``max_step_s``. With ``steps`` the run instead goes on to
    that step (rounded up to whole dispatches, at least two) and its ``Run`` is returned too, unless the
    steps left would take more than ten times ``cell_s``. Any run stops once the ``deadline`` has passed.
    """
    if steps is not None:
        steps = config.log_every * max(2, -(-steps // config.log_every))
        config = dataclasses.replace(config, steps=steps, checkpoint_every=steps)
    marks: list[tuple[float, int]] = []

    def progress(n: int) -> None:
        marks.append((time.perf_counter(), n))
        done = sum(k for _, k in marks)
        if len(marks) < 2 or (steps is not None and done >= steps):  # the last chunk: let the run return
            return
        span = marks[-1][0] - marks[0][0]
        per_step = span / sum(k for _, k in marks[1:])
        if steps is None:
            enough = (len(marks) >= 3 and span >= cell_s) or per_step > max_step_s
        else:
            enough = per_step * (steps - done) > 10 * cell_s
        if enough or marks[-1][0] > deadline:
            raise _Enough

    start = time.perf_counter()
    run = None
    with tempfile.TemporaryDirectory() as run_dir:
        try:
            run = train(config, run_dir, devices=1, source=source, progress=progress)
        except _Enough:
            pass
        rate, measured = _throughput(run_dir)
    return {"steps/s": rate, "measured": measured, "first": marks[0][0] - start, "run": run}


def _config(model: str, setting: Setting, batch: int, coupling: str) -> RunConfig:
    common = {"batch_size": batch, "coupling": coupling, "steps": 10**8, "checkpoint_every": 10**8}
    if model == "mlp":
        return RunConfig(width=setting.mlp_width, depth=3, log_every=setting.chunk, **common)
    return RunConfig(
        dataset=setting.image_dataset, width=setting.unet_width, log_every=setting.chunk, **common
    )


def _chunked(config: RunConfig, source) -> RunConfig:
    """``config`` logging once per dispatch, so every logged record times whole dispatches of equal size."""
    coupling = config.make_coupling()
    host = coupling if hasattr(coupling, "solve_host") else None  # solved on the host, as train does
    scan = task_of(config).scans(jax.default_backend())  # as train does: one step per dispatch if not
    return dataclasses.replace(config, log_every=steps_per_dispatch(config, source, host, scan=scan))


def _failure(error: BaseException) -> str:
    """The error's type and the first line of its message."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def _fmt(x: float) -> str:
    return f"{x:.4g}"


class Check:
    """One device check: the measurements in order, each written to the report as it completes."""

    def __init__(self, setting: Setting, report: Report, deadline: float):
        self.setting = setting
        self.report = report
        self.deadline = deadline
        self.peak: dict[str, float] = {}
        self.first_chunk: dict[str, float] = {}  # model -> longest first chunk seen (compilation)
        self.too_slow: dict[tuple[str, str], str] = {}
        self.flops: dict[tuple[str, int], float] = {}
        self.trained: dict[str, Run] = {}  # model -> the I-CFM run at the first batch

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def measure_peak(self) -> None:
        n = self.setting.matmul
        say(f"peak: [{n}, {n}] x [{n}, {n}] matmuls")
        self.peak = matmul_rates(n, budget=self.setting.cell_s / 2)
        for label, rate in self.peak.items():
            self.report.peak.append(
                [f"[{n}, {n}] x [{n}, {n}]", label, _fmt(2 * n**3 / rate * 1e3), _fmt(rate / 1e12)]
            )
            say(f"  {label}: {rate / 1e12:.4g} TFLOP/s")
        self.report.write()

    def image_shape(self) -> tuple[int, int, int]:
        return image_runs.image_shape(RunConfig(dataset=self.setting.image_dataset))

    def source(self, model: str, batch: int):
        if model == "mlp":
            return ToySource(source="8gaussians", target="moons", batch_size=batch)
        return MemoryImages(self.image_shape(), batch_size=batch)

    def train_row(self, model: str, batch: int, label: str, coupling: str, keep: bool) -> None:
        """Measure one training run and add its row; with ``keep``, train a fixed number of steps and keep
        the trained ``Run`` for the sampling and likelihood section."""
        name = "MLP 2D" if model == "mlp" else "UNet " + "x".join(map(str, self.image_shape()))
        row = [name, batch, label]
        reason = self.too_slow.get((model, coupling))
        needed = self.setting.cell_s + self.first_chunk.get(model, 0.0)
        if reason is None and self.left() < needed:
            reason = f"budget: {self.left():.0f} s left, a run needs about {needed:.0f} s"
        if reason is not None:
            self.report.train.append(row + [f"skipped: {reason}"] + [""] * 8)
            say(f"train {name} batch {batch} {label}: skipped ({reason})")
            self.report.write()
            return
        say(f"train {name} batch {batch} {label} ...")
        try:
            source = self.source(model, batch)
            config = _chunked(_config(model, self.setting, batch, coupling), source)
            if (model, batch) not in self.flops:
                shape = (2,) if model == "mlp" else self.image_shape()
                self.flops[(model, batch)] = step_flops(
                    dataclasses.replace(config, coupling="independent"), shape
                )
            figures = train_cell(
                config,
                source,
                cell_s=self.setting.cell_s,
                max_step_s=self.setting.max_step_s,
                deadline=self.deadline,
                steps=getattr(self.setting, f"{model}_train_steps") if keep else None,
            )
        except Exception as error:  # an out-of-memory batch is a result too; the check goes on
            message = _failure(error)
            self.report.train.append(row + [f"failed: {message}"] + [""] * 8)
            say(f"  failed: {message}")
            self.report.write()
            return
        rate = figures["steps/s"]
        if figures["run"] is not None:
            self.trained[model] = figures["run"]
        flops = self.flops[(model, batch)]
        self.first_chunk[model] = max(self.first_chunk.get(model, 0.0), figures["first"])
        if 1 / rate > self.setting.max_step_s:
            self.too_slow[(model, coupling)] = f"batch {batch} took {1 / rate:.2f} s/step"
        row += [
            _fmt(rate),
            _fmt(rate * batch),
            _fmt(flops / 1e9),
            _fmt(flops * rate / 1e12),
            f"{flops * rate / self.peak['float32, HIGHEST']:.2%}",
            f"{flops * rate / self.peak['bfloat16, DEFAULT']:.2%}",
            figures["measured"],
            config.log_every,
            f"{figures['first']:.1f}",
        ]
        self.report.train.append(row)
        say(
            f"  {rate:.4g} steps/s, {rate * batch:.4g} samples/s ({figures['first']:.1f} s to the 1st record)"
        )
        self.report.write()

    def train_rows(self, model: str, batches: tuple[int, ...], couplings: tuple[str, ...]) -> None:
        for batch in batches:
            for label, coupling in TRAININGS:
                if coupling in couplings:
                    keep = batch == self.setting.batches[0] and coupling == "independent"
                    self.train_row(model, batch, label, coupling, keep)

    def solve_row(self, task: str, model: str, batch: int, fn, *args) -> dict:
        """Compile ``fn`` (returning (values, nfe)) ahead of time, run it, and add a row."""
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        compile_s = time.perf_counter() - start
        result = {}

        def call():
            result["out"] = jax.block_until_ready(compiled(*args))

        seconds = _seconds(call, budget=self.setting.cell_s / 2, repeats=3)
        nfe = int(result["out"][1])
        self.report.solves.append(
            [task, model, batch, nfe, f"{compile_s:.2f}", _fmt(seconds), _fmt(batch / seconds)]
        )
        say(f"  {task} ({model}, batch {batch}): NFE {nfe}, {seconds:.4g} s (compile {compile_s:.1f} s)")
        self.report.write()
        return {"seconds": seconds, "nfe": nfe, "compile": compile_s}

    def note_solve(self, task: str, model: str, batch: int, note: str) -> None:
        """A row without figures: "skipped: why" or "failed: the error"."""
        self.report.solves.append([task, model, batch, note, "", "", ""])
        say(f"  {task} ({model}): {note}")
        self.report.write()

    def solves(self, tasks: tuple[str, ...], model: str, batch: int, body) -> None:
        """Run ``body`` (which adds the rows of ``tasks``) if the budget allows; a failure fills the rest."""
        if self.left() < 10 * self.setting.cell_s:
            for task in tasks:
                self.note_solve(task, model, batch, f"skipped: budget: {self.left():.0f} s left")
            return
        first = len(self.report.solves)
        try:
            body(model, batch)
        except Exception as error:
            done = {row[0] for row in self.report.solves[first:]}
            for task in tasks:
                if task not in done:
                    self.note_solve(task, model, batch, f"failed: {_failure(error)}")

    def trained_model(self, model: str) -> tuple[str, Callable, Any]:
        """Name, apply_fn and parameters of ``model`` as its kept I-CFM run left it (else as initialised)."""
        s = self.setting
        if model == "mlp":
            name = f"MLP 3x{s.mlp_width}"
            config = RunConfig(width=s.mlp_width, depth=3)
        else:
            name = f"UNet {'x'.join(map(str, self.image_shape()))} width {s.unet_width}"
            config = RunConfig(dataset=s.image_dataset, width=s.unet_width)
        run = self.trained.get(model)
        if run is None:
            run = Run.build(config)
            return f"{name}, untrained", run.apply_fn, run.state.params
        return f"{name}, {int(run.state.step)} steps", run.apply_fn, run.state.params

    def mlp_solves(self) -> None:
        tasks = ("dopri5 sample", "exact log-likelihood")
        self.solves(tasks, f"MLP 3x{self.setting.mlp_width}", self.setting.points, self._mlp_solves)

    def _mlp_solves(self, _: str, points: int) -> None:
        name, apply_fn, params = self.trained_model("mlp")
        say(f"sampling and likelihood: {name}")
        x0 = toy_sample("8gaussians", jax.random.key(0), points)
        x1 = toy_sample("moons", jax.random.key(1), points)
        self.solve_row("dopri5 sample", name, points, _drawn(apply_fn), params, x0)
        self.solve_row("exact log-likelihood", name, points, _density(apply_fn), params, x1)

    def unet_solves(self) -> None:
        tasks = ("dopri5 sample", "exact divergence, one evaluation", "exact log-likelihood")
        name = f"UNet {'x'.join(map(str, self.image_shape()))} width {self.setting.unet_width}"
        self.solves(tasks, name, self.setting.ll_images, self._unet_solves)

    def _unet_solves(self, _: str, n: int) -> None:
        name, apply_fn, params = self.trained_model("unet")
        say(f"sampling and likelihood: {name}")
        shape = self.image_shape()
        x0 = jax.random.normal(jax.random.key(0), (n, *shape))
        images = jnp.asarray(MemoryImages(shape, batch_size=n).host_batch(0)["image"])
        x1 = dequantise(jax.random.key(1), images)

        def divergence(params, x):
            return divergence_exact(as_velocity(apply_fn, params), jnp.asarray(0.5), x)[1], jnp.asarray(1)

        drawn = self.solve_row("dopri5 sample", name, n, _drawn(apply_fn), params, x0)
        one = self.solve_row("exact divergence, one evaluation", name, n, divergence, params, x1)
        estimate = drawn["nfe"] * one["seconds"] + one["compile"]
        if estimate > self.left():
            reason = (
                f"skipped: estimated {estimate:.0f} s (NFE ~{drawn['nfe']} x {one['seconds']:.3g} s a "
                f"divergence, plus compilation) > the {self.left():.0f} s left"
            )
            self.note_solve("exact log-likelihood", name, n, reason)
            return
        self.solve_row("exact log-likelihood", name, n, _density(apply_fn), params, x1)


def _drawn(apply_fn):
    """``(params, x0) -> (x1, nfe)``: a dopri5 solve of the model's flow."""

    def draw(params, x0):
        result = sample(as_velocity(apply_fn, params), x0)
        return result.x1, result.nfe

    return draw


def _density(apply_fn):
    """``(params, x1) -> (log_p, nfe)``: the exact log-likelihood under the model's flow."""

    def density(params, x1):
        result = log_likelihood(as_velocity(apply_fn, params), x1, divergence="exact")
        return result.log_p, result.nfe

    return density


def _header(setting: Setting, argv: list[str]) -> str:
    from fmjax._assignment import HAVE_NATIVE

    device = jax.devices()[0]
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    command = " ".join(["python -m benchmarks.device", *argv])
    lines = [f"# Device check: {device.device_kind} ({device.platform}), {setting.name} setting", ""]
    if setting.name != "full":
        where = "on a CPU** (no GPU has been lent so far)" if device.platform == "cpu" else "** (`--quick`)"
        lines += [
            f"**This is the {setting.name} setting {where}: tiny models and batches, so the figures show "
            "only that the check runs end to end and say nothing about an accelerator. "
            "`python -m benchmarks.device` on a GPU runs the full setting "
            "(MLP 3x256, UNet width 64 on 32x32x3, batch 256 / 1024 / 4096; about 7 minutes) and replaces "
            "this file.",
            "",
        ]
    lines += [
        f"- command: `{command}`",
        f"- date: {datetime.date.today().isoformat()}",
        f"- device: {device.device_kind}, platform {device.platform}, {jax.device_count()} device(s) "
        "visible, 1 used (`devices=1`)",
        f"- jax {jax.__version__}, Python {platform.python_version()}, {cores} CPU cores "
        f"({platform.processor() or platform.machine()})",
        f"- exact OT solver: {'fmjax C' if HAVE_NATIVE else 'POT'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the tiny setting (the default on a CPU)")
    size.add_argument("--full", action="store_true", help="the accelerator setting (the default elsewhere)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="no new measurement starts after this")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--models", default="mlp,unet", help="comma-separated: mlp, unet")
    parser.add_argument("--couplings", default="independent,exact,sinkhorn")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument("--mlp-width", type=int, default=None)
    parser.add_argument("--unet-width", type=int, default=None)
    parser.add_argument("--image-dataset", default=None, choices=("digits", "mnist", "cifar10"))
    parser.add_argument("--chunk", type=int, default=None, help="steps per dispatch where the inputs allow")
    parser.add_argument("--cell-s", type=float, default=None, help="steady-state seconds per training run")
    parser.add_argument("--max-step-s", type=float, default=None)
    parser.add_argument("--matmul", type=int, default=None, help="n of the [n, n] x [n, n] peak product")
    parser.add_argument("--points", type=int, default=None, help="2D points sampled and evaluated")
    parser.add_argument("--ll-images", type=int, default=None, help="images of the UNet likelihood")
    parser.add_argument("--mlp-train-steps", type=int, default=None, help="steps of the kept MLP run")
    parser.add_argument("--unet-train-steps", type=int, default=None, help="steps of the kept UNet run")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)

    start = time.perf_counter()
    tiny = args.quick or (not args.full and jax.devices()[0].platform == "cpu")
    setting = TINY if tiny else FULL
    overrides = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(Setting)
        if getattr(args, field.name, None) is not None
    }
    if args.batches:
        overrides["batches"] = tuple(int(b) for b in args.batches.split(","))
    setting = dataclasses.replace(setting, **overrides)
    models = [m.strip() for m in args.models.split(",")]
    couplings = tuple(c.strip() for c in args.couplings.split(","))
    for value, allowed, option in (
        (models, ("mlp", "unet"), "--models"),
        (couplings, [c for _, c in TRAININGS], "--couplings"),
    ):
        unknown = [v for v in value if v not in allowed]
        if unknown:
            parser.error(f"{option}: unknown {unknown}; choose from {', '.join(allowed)}")

    report = Report(args.out, _header(setting, argv))
    report.train_note = (
        f"MLP: 3 x {setting.mlp_width} SELU, 2D, 8gaussians -> moons, on the device. UNet: width "
        f"{setting.unet_width}, the {setting.image_dataset} configuration, random uint8 images held in host "
        "memory (`MemoryImages`), dequantised on the device, Gaussian noise as the source. steps/s: steady "
        "state from the run's `metrics.jsonl` past the first logged chunk (which holds the compilation); one "
        "record per dispatch of `steps/dispatch` steps under `lax.scan`. GFLOP/step: XLA's cost analysis of "
        "the I-CFM step (model, loss, AdamW, EMA), also for the OT rows, whose coupling work it does not "
        "count; TFLOP/s = GFLOP/step x steps/s, as a fraction of the float32 HIGHEST and bfloat16 matmul "
        "rates above (the runs compute in float32 at the default precision)."
    )
    report.solve_note = (
        'fmjax.sample (dopri5, rtol = atol = 1e-5) and fmjax.log_likelihood (divergence="exact"), jitted '
        "and compiled ahead of time; run s is the median of repeated calls when a call is short. The "
        f"models are those of the I-CFM runs at batch {setting.batches[0]} above, which train a fixed number "
        'of steps (the model column says how many; raw parameters; "untrained" where that run did not '
        "finish). A UNet after a few hundred steps is far from trained, so its NFE need not match a "
        "trained one's."
    )
    report.write()
    check = Check(setting, report, start + args.budget_s)
    say(f"device check ({setting.name} setting) on {jax.devices()[0].device_kind}; report: {args.out}")
    check.measure_peak()
    if "mlp" in models:
        check.train_rows("mlp", setting.batches, couplings)
        check.mlp_solves()
    if "unet" in models:
        check.train_rows("unet", setting.batches, couplings)
        check.unet_solves()
    elapsed = time.perf_counter() - start
    budget_hit = check.left() < 0
    report.status = f"complete in {elapsed:.0f} s" + (
        " (budget spent: later rows skipped)" if budget_hit else ""
    )
    report.write()
    say(f"done in {elapsed:.0f} s; wrote {args.out}")
    return report.text()


if __name__ == "__main__":
    main()

"""Train-step benchmark: fmjax's ``make_train_step`` (I-CFM and OT-CFM) against a plain jitted JAX/optax step.

All train the same MLP (2D input, ``--depth`` hidden layers of ``--width`` SELU units, time
concatenated) with Adam on the same 8gaussians -> moons batches (64 of them, cycled). The plain step
and fmjax I-CFM do the same maths (linear path, sigma = 0, independent pairs, uniform t), so their
ratio is what fmjax adds: the TrainState pytree and the EMA of the parameters. fmjax OT-CFM adds the
exact minibatch OT coupling inside the jitted step. These rows dispatch one step per call, as a
Python training loop does; the "steps per dispatch" rows run 32 steps in one ``lax.scan`` call, as
``fmjax train`` does, which removes the per-call dispatch cost. With ``--peer-python`` the same steps run in
TorchCFM (``ConditionalFlowMatcher`` / ``ExactOptimalTransportConditionalFlowMatcher``, torch Adam) on
the same batches.

A second table gives the FLOP rate of fmjax's I-CFM step at ``--flop-width`` / ``--flop-batch``
(default MLP width 512, batch 1024): model FLOPs (forward = 2 x multiply-adds, a training step = 3 x
forward) per second, as a fraction of a plain [batch, width] x [width, width] matmul's rate measured
in the same run.

    python -m benchmarks.train_step            # batch 256, width 256, 3 hidden layers
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks._peer import peer_python, run_peer
from benchmarks._timing import interleaved, markdown_table
from fmjax.couplings import exact
from fmjax.data import sample as toy
from fmjax.models import MLP, functional
from fmjax.paths import Linear
from fmjax.training import TrainState, make_train_step

SCAN = 32  # steps per dispatch in the scanned rows


def plain_step_factory(params, optimizer):
    """The step a user writes by hand: a pure-jnp MLP, the I-CFM loss, optax, jit."""

    def mlp(params, t, x):
        h = jnp.concatenate([x, t[:, None]], axis=-1)
        for layer in params["hidden"].values():
            h = jax.nn.selu(h @ layer["kernel"] + layer["bias"])
        return h @ params["out"]["kernel"] + params["out"]["bias"]

    def loss_fn(params, key, x0, x1):
        t = jax.random.uniform(key, (x0.shape[0],))
        xt = (1 - t[:, None]) * x0 + t[:, None] * x1
        return jnp.mean((mlp(params, t, xt) - (x1 - x0)) ** 2)

    @jax.jit
    def step(params, opt_state, key, x0, x1):
        key, sub = jax.random.split(key)
        loss, grads = jax.value_and_grad(loss_fn)(params, sub, x0, x1)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, loss

    return step


def toy_batches(batch: int, count: int = 64) -> list[tuple[jax.Array, jax.Array]]:
    """``count`` (x0, x1) batches of 8gaussians -> moons."""
    keys = jax.random.split(jax.random.key(0), count)
    return [(toy("8gaussians", k, batch), toy("moons", jax.random.fold_in(k, 1), batch)) for k in keys]


def run(*, batch: int, width: int, depth: int, repeats: int, inner: int, dim: int = 2) -> dict[str, float]:
    """Seconds per step for each implementation, timed side by side."""
    apply_fn, params = functional(MLP(dim=dim, width=width, depth=depth, activation="selu", seed=0))
    optimizer = optax.adam(1e-3)
    if dim == 2:
        batches = toy_batches(batch)
    else:
        keys = jax.random.split(jax.random.key(0), 8)
        batches = [(jax.random.normal(k, (batch, dim)), jax.random.normal(k, (batch, dim)) + 1) for k in keys]
    counter = {"k": 0}

    def next_batch():
        counter["k"] += 1
        return batches[counter["k"] % len(batches)]

    def fmjax_candidate(coupling):
        step = make_train_step(apply_fn, optimizer, path=Linear(sigma=0.0), **coupling)
        box = {"state": TrainState.create(params=params, optimizer=optimizer, key=jax.random.key(1))}

        def call():
            box["state"], metrics = step(box["state"], *next_batch())
            jax.block_until_ready(metrics["loss"])

        return call

    plain = plain_step_factory(params, optimizer)
    plain_box = [jax.tree.map(jnp.array, params), optimizer.init(params), jax.random.key(1)]

    def call_plain():
        p, o, k, loss = plain(*plain_box, *next_batch())
        plain_box[:] = [p, o, k]
        jax.block_until_ready(loss)

    def fmjax_scanned(coupling):
        """SCAN steps per dispatch under ``lax.scan``, the way ``fmjax train`` runs its steps."""
        step = make_train_step(apply_fn, optimizer, path=Linear(sigma=0.0), donate=False, **coupling)
        stacked = [
            (jnp.stack([b[0] for b in group]), jnp.stack([b[1] for b in group]))
            for group in (batches[k : k + SCAN] for k in range(0, len(batches) - SCAN + 1, SCAN))
        ]
        many = jax.jit(lambda state, x0s, x1s: jax.lax.scan(lambda s, b: step(s, *b), state, (x0s, x1s)))
        box = {"state": TrainState.create(params=params, optimizer=optimizer, key=jax.random.key(1)), "k": 0}

        def call():
            box["k"] += 1
            box["state"], metrics = many(box["state"], *stacked[box["k"] % len(stacked)])
            jax.block_until_ready(metrics["loss"])

        return call

    candidates = {"plain I-CFM": call_plain, "fmjax I-CFM": fmjax_candidate({})}
    if dim == 2:
        candidates["fmjax OT-CFM (exact)"] = fmjax_candidate({"coupling": exact()})
    scanned = {f"fmjax I-CFM, {SCAN} steps per dispatch": fmjax_scanned({})}
    if dim == 2:
        scanned[f"fmjax OT-CFM (exact), {SCAN} steps per dispatch"] = fmjax_scanned({"coupling": exact()})
    candidates.update(scanned)
    return interleaved(candidates, repeats=repeats, inner=inner, per_call=dict.fromkeys(scanned, SCAN))


def flop_table(*, batch: int, width: int, depth: int, repeats: int, inner: int) -> str:
    """Model FLOP rate of the I-CFM step (2D data) against a plain matmul's, measured in one run."""
    from benchmarks.likelihood import matmul_rate

    times = run(batch=batch, width=width, depth=depth, repeats=repeats, inner=inner)
    dim = 2
    multiply_adds = (dim + 1) * width + (depth - 1) * width * width + width * dim
    step_flops = 3 * 2 * multiply_adds * batch
    mm = matmul_rate(batch, width, width)
    rows = [
        [
            name,
            f"{times[name] * 1e3:.3f}",
            f"{step_flops / times[name] / 1e9:.1f}",
            f"{step_flops / times[name] / mm:.0%}",
        ]
        for name in ("plain I-CFM", "fmjax I-CFM")
    ]
    rows.append([f"matmul [{batch}, {width}] x [{width}, {width}]", "", f"{mm / 1e9:.1f}", "100%"])
    return (
        f"FLOP rate: batch {batch}, MLP {depth}x{width} SELU, 2D; {step_flops / 1e9:.3f} GFLOP per step "
        "(3 x forward)\n\n" + markdown_table(["step", "ms / step", "GFLOP/s", "of matmul rate"], rows)
    )


def peer_times(python: str, *, batch: int, width: int, depth: int, repeats: int, inner: int) -> dict:
    """TorchCFM's I-CFM and OT-CFM steps on the same batches, in the peer interpreter."""
    batches = toy_batches(batch)
    arrays = {
        "x0": np.stack([np.asarray(b[0]) for b in batches]),
        "x1": np.stack([np.asarray(b[1]) for b in batches]),
    }
    cfg = {"width": width, "depth": depth, "repeats": repeats, "inner": inner}
    return run_peer(python, "train_step", cfg, arrays)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--inner", type=int, default=200)
    parser.add_argument("--flop-width", type=int, default=512)
    parser.add_argument("--flop-batch", type=int, default=1024)
    parser.add_argument("--peer-python", default=None, help="python with torch and torchcfm")
    args = parser.parse_args(argv)
    shape = {"batch": args.batch, "width": args.width, "depth": args.depth}
    times = run(**shape, repeats=args.repeats, inner=args.inner)
    rows = [
        [name, f"{t * 1e3:.4f}", f"{t / times['plain I-CFM']:.3f}", f"{t / times['fmjax I-CFM']:.3f}"]
        for name, t in times.items()
    ]
    python = peer_python(args.peer_python)
    if python:
        peer = peer_times(python, **shape, repeats=args.repeats, inner=max(1, args.inner // 4))
        for name, t in peer["seconds"].items():
            rows.append(
                [name, f"{t * 1e3:.4f}", f"{t / times['plain I-CFM']:.3f}", f"{t / times['fmjax I-CFM']:.3f}"]
            )
        ratio = peer["seconds"]["TorchCFM OT-CFM (exact)"] / peer["seconds"]["TorchCFM I-CFM"]
        peer_note = f"\n\nTorchCFM: {peer['versions']}; its OT-CFM / I-CFM = {ratio:.2f}"
    else:
        rows.append(["TorchCFM", "not installed (pass --peer-python)", "", ""])
        peer_note = ""
    if "fmjax OT-CFM (exact)" in times:
        peer_note += f"; fmjax OT-CFM / I-CFM = {times['fmjax OT-CFM (exact)'] / times['fmjax I-CFM']:.2f}"
    device = jax.devices()[0]
    table = markdown_table(["step", "ms / step", "ratio to plain I-CFM", "ratio to fmjax I-CFM"], rows)
    flops = flop_table(
        batch=args.flop_batch,
        width=args.flop_width,
        depth=args.depth,
        repeats=args.repeats,
        inner=max(1, args.inner // 10),
    )
    report = (
        f"batch {args.batch}, MLP {args.depth}x{args.width} SELU, 2D; device {device.device_kind} "
        f"({device.platform}), {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"median of {args.repeats} interleaved repeats\n\n{table}{peer_note}\n\n{flops}"
    )
    print(report)
    return report


if __name__ == "__main__":
    main()

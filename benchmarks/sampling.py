"""Sampling benchmark: fmjax ``sample(solver="dopri5")`` vs TorchCFM's sampler (torchdyn NeuralODE, dopri5).

A 2D field is trained first (fmjax I-CFM, 8gaussians -> moons, MLP 3x``--width`` SELU, ``--train-steps``
steps) so the ODE has the stiffness of a real model; both sides then push the same ``--points`` source
points through the same weights from t = 0 to 1 with dopri5 at rtol = atol = ``--tol``. Reported: NFE,
seconds per solve, and the largest difference between the two endpoints.

    python -m benchmarks.sampling [--peer-python /path/to/peers/bin/python]
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import numpy as np
import optax

from benchmarks._peer import mlp_arrays, peer_python, run_peer
from benchmarks._timing import interleaved, markdown_table, relative
from fmjax.data import sample as toy
from fmjax.models import MLP, functional
from fmjax.paths import Linear
from fmjax.sampling import as_velocity, sample
from fmjax.training import TrainState, make_train_step

DEPTH = 3


def trained_field(width: int, steps: int):
    """(apply_fn, params) of an I-CFM model trained for ``steps`` steps on 8gaussians -> moons."""
    apply_fn, params = functional(MLP(dim=2, width=width, depth=DEPTH, activation="selu", seed=0))
    optimizer = optax.adam(1e-3)
    state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.key(0))
    step = make_train_step(apply_fn, optimizer, path=Linear(sigma=0.0))

    def one(state, _):
        k0, k1 = jax.random.split(jax.random.fold_in(jax.random.key(1), state.step))
        return step(state, toy("8gaussians", k0, 256), toy("moons", k1, 256))

    state, _ = jax.jit(lambda s: jax.lax.scan(one, s, None, length=steps))(state)
    return apply_fn, state.params


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=2000)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peer-python", default=None, help="python with torch, torchcfm and torchdyn")
    args = parser.parse_args(argv)

    apply_fn, params = trained_field(args.width, args.train_steps)
    x0 = toy("8gaussians", jax.random.key(5), args.points)
    velocity = as_velocity(apply_fn, params)
    solve = jax.jit(lambda x: sample(velocity, x, solver="dopri5", rtol=args.tol, atol=args.tol))
    out = {}

    def call():
        out["result"] = jax.block_until_ready(solve(x0))

    seconds = interleaved({"fmjax": call}, repeats=args.repeats, inner=1)["fmjax"]
    result = out["result"]
    rows = [["fmjax dopri5", int(result.nfe), f"{seconds * 1e3:.1f}", "1.00x", ""]]
    python = peer_python(args.peer_python)
    if python:
        arrays = {"x0": np.asarray(x0), **mlp_arrays(params, DEPTH)}
        cfg = {
            "width": args.width,
            "depth": DEPTH,
            "rtol": args.tol,
            "atol": args.tol,
            "repeats": args.repeats,
        }
        peer = run_peer(python, "sample", cfg, arrays)
        diff = float(np.max(np.abs(np.asarray(peer["x1"]) - np.asarray(result.x1))))
        rows.append(
            [
                f"TorchCFM sampler: torchdyn dopri5 ({peer['versions']})",
                peer["nfe"],
                f"{peer['seconds'] * 1e3:.1f}",
                relative(peer["seconds"], seconds),
                f"{diff:.1e}",
            ]
        )
    else:
        rows.append(["torchdyn dopri5", "not installed (pass --peer-python)", "", "", ""])
    report = (
        f"dopri5 from t = 0 to 1, rtol = atol = {args.tol:g}, {args.points} points, MLP {DEPTH}x{args.width} "
        f"SELU trained {args.train_steps} steps; {jax.devices()[0].platform}, {platform.machine()}, "
        f"{os.cpu_count()} cores; median of {args.repeats}\n\n"
        + markdown_table(["sampler", "NFE", "ms / solve", "vs fmjax", "max |x1 difference|"], rows)
    )
    print(report)
    return report


if __name__ == "__main__":
    main()

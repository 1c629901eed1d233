"""Why image runs dispatch one step at a time on a CPU: a train step alone against it under ``lax.scan``.

XLA:CPU gives the convolutions of a UNet's backward pass non-canonical dimension layouts inside a loop
body (``b01f_01oi``, ``f01b_i01o->01bf`` in the optimised HLO, against ``b01f_01io->b01f`` everywhere in
the step compiled alone) and runs them on its generic path instead of Eigen's. An MLP, without
convolutions, is not affected. ``fmjax.runs`` therefore scans several steps per dispatch everywhere
except for image models on the CPU backend (``fmjax.runs.tasks.images.ImageTask.scans``).

Rows: seconds per step of fmjax's jitted step (I-CFM, CondOT, Adam, EMA) called once per step, and of
the same step under ``lax.scan`` of ``--scan`` steps in one call, for the digits UNet and a 2D MLP.

    python -m benchmarks.scan_cpu [--scan 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform

import jax
import optax

from benchmarks._timing import interleaved, markdown_table
from fmjax.models import MLP, UNet, functional
from fmjax.paths import CondOT
from fmjax.training import TrainState, make_train_step


def _candidates(model, shape, scan: int):
    apply_fn, params = functional(model)
    optimizer = optax.adam(1e-3)
    step = make_train_step(apply_fn, optimizer, path=CondOT(sigma_min=1e-4), donate=False)
    state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.key(1))
    x0 = jax.random.normal(jax.random.key(0), shape)
    x1 = 0.5 * x0 + 0.1

    def alone():
        jax.block_until_ready(step(state, x0, x1))

    scanned_fn = jax.jit(lambda s: jax.lax.scan(lambda c, _: step(c, x0, x1), s, None, length=scan))

    def scanned():
        jax.block_until_ready(scanned_fn(state))

    return {"alone": alone, "scanned": scanned}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", type=int, default=8, help="steps per scanned call")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    models = {
        "UNet digits (8x8x1, channels 16, mults 1,2)": (
            UNet(in_channels=1, channels=16, channel_mults=(1, 2), seed=0),
            (args.batch, 8, 8, 1),
        ),
        "MLP 2D (3 x 64)": (MLP(dim=2, width=64, depth=3, seed=0), (args.batch, 2)),
    }
    rows = []
    for name, (model, shape) in models.items():
        seconds = interleaved(
            _candidates(model, shape, args.scan),
            repeats=args.repeats,
            inner=args.scan,
            per_call={"scanned": args.scan},
        )
        rows.append(
            [name, f"{seconds['alone'] * 1e3:.2f}", f"{seconds['scanned'] * 1e3:.2f}",
             f"{seconds['scanned'] / seconds['alone']:.1f}x"]
        )  # fmt: skip
    device = jax.devices()[0]
    report = "\n".join(
        [
            f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}; "
            f"{platform.machine()}; batch {args.batch}; {args.scan} steps per scanned call",
            "",
            markdown_table(["model", "ms/step alone", "ms/step scanned", "scanned / alone"], rows),
        ]
    )
    print(report)
    return report


if __name__ == "__main__":
    main()

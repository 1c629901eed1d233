"""Train-step benchmark: fmjax's ``make_train_step`` (I-CFM and OT-CFM) against a plain jitted JAX/optax step.

All train the same MLP (2D input, ``--depth`` hidden layers of ``--width`` SELU units, time
concatenated) with Adam on the same 8gaussians -> moons batches (64 of them, cycled). The plain step
and fmjax I-CFM do the same maths (linear path, sigma = 0, independent pairs, uniform t), so their
ratio is what fmjax adds: the TrainState pytree and the EMA of the parameters. fmjax OT-CFM adds the
exact minibatch OT coupling inside the jitted step.

    python -m benchmarks.train_step            # batch 256, width 256, 3 hidden layers
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp
import optax

from benchmarks._timing import interleaved, markdown_table
from fmjax.couplings import exact
from fmjax.data import sample as toy
from fmjax.models import MLP, functional
from fmjax.paths import Linear
from fmjax.training import TrainState, make_train_step


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


def run(*, batch: int, width: int, depth: int, repeats: int, inner: int) -> dict[str, float]:
    """Seconds per step for each implementation, timed side by side."""
    apply_fn, params = functional(MLP(dim=2, width=width, depth=depth, activation="selu", seed=0))
    optimizer = optax.adam(1e-3)
    keys = jax.random.split(jax.random.key(0), 64)
    batches = [(toy("8gaussians", k, batch), toy("moons", jax.random.fold_in(k, 1), batch)) for k in keys]
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

    candidates = {
        "plain I-CFM": call_plain,
        "fmjax I-CFM": fmjax_candidate({}),
        "fmjax OT-CFM (exact)": fmjax_candidate({"coupling": exact()}),
    }
    return interleaved(candidates, repeats=repeats, inner=inner)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--inner", type=int, default=200)
    args = parser.parse_args(argv)
    times = run(batch=args.batch, width=args.width, depth=args.depth, repeats=args.repeats, inner=args.inner)
    device = jax.devices()[0]
    table = markdown_table(
        ["step", "ms / step", "ratio to plain I-CFM", "ratio to fmjax I-CFM"],
        [
            [name, f"{t * 1e3:.4f}", f"{t / times['plain I-CFM']:.3f}", f"{t / times['fmjax I-CFM']:.3f}"]
            for name, t in times.items()
        ],
    )
    report = (
        f"batch {args.batch}, MLP {args.depth}x{args.width} SELU, 2D; device {device.device_kind} "
        f"({device.platform}), {platform.processor() or platform.machine()}; median of {args.repeats} x "
        f"{args.inner} steps, interleaved\n\n{table}"
    )
    print(report)
    return report


if __name__ == "__main__":
    main()

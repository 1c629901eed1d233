"""Likelihood benchmark: the cost of exact and Hutchinson divergences as the dimension grows, and
fmjax's exact log-likelihood against Meta's flow_matching on the same MLP field and points.

Part 1 times one divergence evaluation of an MLP field (batch 256, width 256, 3 hidden SELU layers)
at D = 2, 64, 784 with the ways to get an exact trace (fmjax's per-sample forward mode over basis
tangents; the same one-hot tangent pushed through the whole batch; per-sample ``jacfwd``; reverse
mode over basis cotangents) and with Hutchinson (1 probe).
Part 2 runs a whole exact log-likelihood solve (100 Euler steps, D = 64) and reports its FLOP rate as a
fraction of a plain matrix product's rate measured in the same run. Part 3, when ``--peer-python`` names
an interpreter with ``flow_matching`` and torch, runs ``ODESolver.compute_likelihood(exact_divergence=True)``
on the same weights and points there (see benchmarks/README.md for how that environment is made).

    python -m benchmarks.likelihood [--peer-python /path/to/peers/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._timing import interleaved, markdown_table, relative
from fmjax.likelihood import divergence_exact, divergence_hutchinson, log_likelihood
from fmjax.models import MLP, functional
from fmjax.sampling import as_velocity

BATCH, WIDTH, DEPTH = 256, 256, 3


def _field(dim: int):
    apply_fn, params = functional(MLP(dim=dim, width=WIDTH, depth=DEPTH, activation="selu", seed=0))
    return apply_fn, params, as_velocity(apply_fn, params)


def _forward_flops(dim: int) -> int:
    """Multiply-adds x 2 of one MLP forward pass for one sample."""
    return 2 * ((dim + 1) * WIDTH + (DEPTH - 1) * WIDTH * WIDTH + WIDTH * dim)


def divergence_table(dims: list[int], repeats: int) -> str:
    rows = []
    for dim in dims:
        rows += _divergence_rows(dim, repeats)
    return markdown_table(["D", "divergence (batch 256)", "ms", "cost vs Hutchinson"], rows)


def _divergence_rows(dim: int, repeats: int) -> list[list[object]]:
    rows = []
    _, _, velocity = _field(dim)
    x = jax.random.normal(jax.random.key(dim), (BATCH, dim))
    t = jnp.asarray(0.5)
    probes = jax.random.rademacher(jax.random.key(1), (1, BATCH, dim), jnp.float32)

    def per_sample_jacfwd(t, x):
        one = lambda xi: velocity(t, xi[None])[0]
        return jax.vmap(lambda xi: jnp.trace(jax.jacfwd(one)(xi)))(x)

    def whole_batch_basis(t, x):
        out, jvp_fn = jax.linearize(lambda z: velocity(t, z), x)

        def column(k):
            tangent = jnp.zeros(x.shape, x.dtype).at[:, k].set(1)
            return jvp_fn(tangent)[:, k]

        return jnp.sum(jax.lax.map(column, jnp.arange(dim), batch_size=min(dim, 128)), axis=0)

    def reverse_basis(t, x):
        _, vjp_fn = jax.vjp(lambda z: velocity(t, z), x)
        basis = jnp.eye(dim, dtype=x.dtype)
        rows_ = jax.lax.map(
            lambda e: vjp_fn(jnp.broadcast_to(e, x.shape))[0], basis, batch_size=min(dim, 128)
        )
        return jnp.einsum("kbk->b", rows_)

    fns = {
        "exact: per-sample forward mode (fmjax)": jax.jit(lambda t, x: divergence_exact(velocity, t, x)[1]),
        "exact: one tangent through the whole batch": jax.jit(whole_batch_basis),
        "exact: per-sample jacfwd": jax.jit(per_sample_jacfwd),
        "exact: reverse mode over basis": jax.jit(reverse_basis),
        "hutchinson, 1 probe (fmjax)": jax.jit(lambda t, x: divergence_hutchinson(velocity, t, x, probes)[1]),
    }
    reference = fns["exact: per-sample forward mode (fmjax)"](t, x)
    for name, fn in fns.items():
        if not name.startswith("hutchinson"):
            np.testing.assert_allclose(fn(t, x), reference, rtol=2e-3, atol=2e-3)
    times = interleaved(
        {k: (lambda f=f: jax.block_until_ready(f(t, x))) for k, f in fns.items()},
        repeats=repeats,
        inner=3 if dim > 100 else 20,
    )
    for name, seconds in times.items():
        rows.append(
            [dim, name, f"{seconds * 1e3:.3f}", f"{seconds / times['hutchinson, 1 probe (fmjax)']:.1f}x"]
        )
    return rows


def matmul_rate(m: int, k: int, n: int, repeats: int = 20) -> float:
    """FLOP/s of a plain float32 matrix product [m, k] x [k, n] on this device."""
    a = jax.random.normal(jax.random.key(0), (m, k))
    b = jax.random.normal(jax.random.key(1), (k, n))
    f = jax.jit(jnp.dot)
    seconds = interleaved({"mm": lambda: jax.block_until_ready(f(a, b))}, repeats=repeats, inner=5)["mm"]
    return 2 * m * k * n / seconds


def likelihood_run(dim: int, steps: int, repeats: int) -> tuple[float, float, dict]:
    apply_fn, params, velocity = _field(dim)
    x1 = jax.random.normal(jax.random.key(7), (BATCH, dim))
    fn = jax.jit(lambda p, x: log_likelihood(as_velocity(apply_fn, p), x, solver="euler", steps=steps).log_p)
    seconds = interleaved({"ll": lambda: jax.block_until_ready(fn(params, x1))}, repeats=repeats, inner=1)[
        "ll"
    ]
    flops = steps * BATCH * (dim + 1) * _forward_flops(dim)
    log_p = np.asarray(fn(params, x1))
    return seconds, flops / seconds, {"params": params, "x1": np.asarray(x1), "log_p": log_p}


PEER_SCRIPT = r"""
import json, sys, time, numpy as np, torch
from flow_matching.solver import ODESolver
from flow_matching.utils import ModelWrapper
data = np.load(sys.argv[1]); cfg = json.loads(sys.argv[2])
torch.set_num_threads(cfg["threads"])
dim, depth = cfg["dim"], cfg["depth"]
layers = []
for k in range(depth):
    lin = torch.nn.Linear(*data[f"hidden{k}_kernel"].shape)
    lin.weight.data = torch.tensor(data[f"hidden{k}_kernel"].T.copy())
    lin.bias.data = torch.tensor(data[f"hidden{k}_bias"])
    layers += [lin, torch.nn.SELU()]
out = torch.nn.Linear(*data["out_kernel"].shape)
out.weight.data = torch.tensor(data["out_kernel"].T.copy()); out.bias.data = torch.tensor(data["out_bias"])
net = torch.nn.Sequential(*layers, out)
class Field(ModelWrapper):
    def forward(self, x, t, **extras):
        return net(torch.cat([x, t.reshape(-1, 1).expand(x.shape[0], 1)], dim=-1))
solver = ODESolver(velocity_model=Field(net))
x1 = torch.tensor(data["x1"])
log_p0 = lambda x: -0.5 * (x ** 2).sum(-1) - 0.5 * x.shape[-1] * np.log(2 * np.pi)
def run():
    return solver.compute_likelihood(x_1=x1, log_p0=log_p0, step_size=1.0 / cfg["steps"], method="euler",
                                     exact_divergence=True)[1]
run()
times = []
for _ in range(cfg["repeats"]):
    t0 = time.perf_counter(); log_p = run(); times.append(time.perf_counter() - t0)
from importlib.metadata import version
print(json.dumps({"seconds": float(np.median(times)), "log_p": log_p.detach().numpy().tolist(),
                  "versions": f"flow_matching {version('flow_matching')}, torch {torch.__version__}"}))
"""


def peer_run(peer_python: str, dim: int, steps: int, repeats: int, params, x1) -> dict:
    arrays = {"x1": x1}
    for k in range(DEPTH):
        arrays[f"hidden{k}_kernel"] = np.asarray(params["hidden"][k]["kernel"])
        arrays[f"hidden{k}_bias"] = np.asarray(params["hidden"][k]["bias"])
    arrays["out_kernel"] = np.asarray(params["out"]["kernel"])
    arrays["out_bias"] = np.asarray(params["out"]["bias"])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "weights.npz")
        np.savez(path, **arrays)
        cfg = {"dim": dim, "depth": DEPTH, "steps": steps, "repeats": repeats, "threads": os.cpu_count()}
        done = subprocess.run(
            [peer_python, "-c", PEER_SCRIPT, path, json.dumps(cfg)],
            capture_output=True,
            text=True,
            timeout=3600,
        )
    if done.returncode != 0:
        raise RuntimeError(f"peer run failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 64, 784])
    parser.add_argument("--dim", type=int, default=64, help="dimension of the full likelihood solve")
    parser.add_argument("--steps", type=int, default=100, help="Euler steps of the full solve")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peer-python", default=None, help="python with flow_matching and torch installed")
    args = parser.parse_args(argv)

    parts = [
        f"{jax.devices()[0].platform}, {platform.machine()}, {os.cpu_count()} cores; MLP {DEPTH}x{WIDTH} SELU"
    ]
    parts.append(divergence_table(args.dims, args.repeats))

    seconds, rate, data = likelihood_run(args.dim, args.steps, args.repeats)
    mm = matmul_rate(BATCH * min(args.dim, 128), WIDTH, WIDTH)
    rows = [["fmjax exact", f"{seconds * 1e3:.1f}", f"{rate / 1e9:.1f}", f"{rate / mm:.0%}", "1.00x"]]
    if args.peer_python:
        peer = peer_run(args.peer_python, args.dim, args.steps, args.repeats, data["params"], data["x1"])
        diff = float(np.max(np.abs(np.asarray(peer["log_p"]) - data["log_p"])))
        rows.append(
            [
                f"{peer['versions']}, exact",
                f"{peer['seconds'] * 1e3:.1f}",
                f"{rate * seconds / peer['seconds'] / 1e9:.1f}",
                f"{rate * seconds / peer['seconds'] / mm:.0%}",
                relative(peer["seconds"], seconds),
            ]
        )
        rows.append(["max |log p difference|", f"{diff:.2e}", "", "", ""])
    else:
        rows.append(["flow_matching", "not installed (pass --peer-python)", "", "", ""])
    parts.append(
        f"Exact log-likelihood, D = {args.dim}, batch {BATCH}, {args.steps} Euler steps; plain matmul "
        f"[{BATCH * min(args.dim, 128)}, {WIDTH}] x [{WIDTH}, {WIDTH}]: {mm / 1e9:.1f} GFLOP/s\n\n"
        + markdown_table(["implementation", "ms", "GFLOP/s", "of matmul rate", "vs fmjax"], rows)
    )
    report = "\n\n".join(parts)
    print(report)
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)

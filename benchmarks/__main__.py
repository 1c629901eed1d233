"""Every benchmark side by side in one run, written as one markdown report.

    python -m benchmarks [--peer-python /tmp/peers/bin/python] [--out benchmarks/SUITE.md] [--quick]

Sections: train step (fmjax I-CFM / OT-CFM vs a plain jitted JAX step and TorchCFM, plus the step's
FLOP rate at width 512, batch 1024), couplings (vs POT and ott-jax's Hungarian), sampling (dopri5 vs
torchdyn, TorchCFM's sampler), likelihood (vs Meta's flow_matching). The peer interpreter comes from
``--peer-python`` or $FMJAX_PEER_PYTHON; without one the peer rows say "not installed". ``--quick``
shrinks every setting (for the tests; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from importlib.metadata import version

import jax

from benchmarks import couplings, likelihood, sampling, train_step
from benchmarks._peer import peer_python

FULL = {
    "train step": (train_step, []),
    "couplings": (couplings, []),
    "sampling": (sampling, []),
    "likelihood": (likelihood, []),
}
QUICK = {
    "train step": (
        train_step,
        ["--batch", "32", "--width", "16", "--repeats", "1", "--inner", "2"]
        + ["--flop-width", "16", "--flop-batch", "32"],
    ),
    "couplings": (couplings, ["--sizes", "32", "--repeats", "1", "--hungarian-max", "32"]),
    "sampling": (sampling, ["--points", "64", "--width", "16", "--train-steps", "10", "--repeats", "1"]),
    "likelihood": (likelihood, ["--dims", "2", "--dim", "3", "--steps", "2", "--repeats", "1"]),
}
PEER_SECTIONS = ("train step", "sampling", "likelihood")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--peer-python", default=None, help="python with torch, torchcfm, torchdyn, flow_matching"
    )
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "SUITE.md"))
    parser.add_argument("--quick", action="store_true", help="tiny settings, for testing the suite itself")
    parser.add_argument("--only", default=None, help="comma-separated sections to run")
    args = parser.parse_args(argv)
    sections = QUICK if args.quick else FULL
    if args.only:
        chosen = [s.strip() for s in args.only.split(",")]
        unknown = [s for s in chosen if s not in sections]
        if unknown:
            parser.error(f"--only: unknown sections {unknown}; choose from {', '.join(sections)}")
        sections = {k: v for k, v in sections.items() if k in chosen}
    python = peer_python(args.peer_python)
    versions = ", ".join(f"{p} {version(p)}" for p in ("jax", "flax", "optax", "diffrax", "ott-jax", "POT"))
    parts = [
        "# fmjax benchmark suite\n",
        f"{datetime.date.today()}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"JAX on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); {versions}; "
        f"peers: {python or 'none'}{' (quick settings)' if args.quick else ''}\n",
    ]
    for name, (module, module_args) in sections.items():
        extra = ["--peer-python", python] if python and name in PEER_SECTIONS else []
        start = time.perf_counter()
        report = module.main(module_args + extra)
        parts.append(f"## {name}\n\n{report}\n\n(section took {time.perf_counter() - start:.0f} s)\n")
    text = "\n".join(parts)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return text


if __name__ == "__main__":
    main()

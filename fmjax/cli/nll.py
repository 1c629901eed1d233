"""``fmjax nll``: the negative log-likelihood of fresh target points (2D), test points (sphere runs, nats
w.r.t. the sphere's area) or test images (bits/dim) under a trained run, appended to its metrics."""

from __future__ import annotations

import math
import os

from fmjax import runs
from fmjax._checks import check_choice, check_int
from fmjax.cli.common import HelpFormat, UsageError, load, say
from fmjax.likelihood import DIVERGENCES, PROBES
from fmjax.runs.tasks.images import image_bits_per_dim
from fmjax.runs.tasks.sphere import sphere_nll
from fmjax.sampling import SOLVERS

# the library's arguments are named as the options (see cli.common.parser_naming)
ALIASES: dict[str, str] = {}


def add_parser(sub, help_text: str) -> None:
    """Add the command's parser to ``sub``; ``help_text`` is its line in ``fmjax.cli.main.COMMANDS``."""
    p = sub.add_parser("nll", help=help_text, formatter_class=HelpFormat)
    p.add_argument("run_dir", help="a directory written by fmjax train")
    p.add_argument("--n", type=int, default=1000, help="number of target points")
    p.add_argument("--divergence", default="exact", help=f"one of {', '.join(DIVERGENCES)}")
    p.add_argument("--num-probes", type=int, default=1, help="Hutchinson probes")
    p.add_argument("--probe", default="rademacher", help=f"Hutchinson probe, one of {', '.join(PROBES)}")
    p.add_argument("--data-dir", default=None, help="tfds data directory of an image run")
    adaptive = ", ".join(name for name, spec in SOLVERS.items() if spec.adaptive)
    p.add_argument("--solver", default="dopri5", help=f"adaptive solver, one of {adaptive}")
    p.add_argument("--seed", type=int, default=0)


def _check_options(args) -> None:
    """The options, checked before anything is announced or computed."""
    check_int("n", args.n, low=2)
    check_choice("solver", args.solver, SOLVERS)
    check_choice("divergence", args.divergence, DIVERGENCES)
    if args.divergence == "hutchinson":
        check_int("num_probes", args.num_probes, low=1)
        check_choice("probe", args.probe, PROBES)


def run(args, interrupts) -> int:
    """``fmjax nll``."""
    if args.solver in SOLVERS and not SOLVERS[args.solver].adaptive:
        adaptive = ", ".join(name for name, solver in SOLVERS.items() if solver.adaptive)
        raise UsageError(f"--solver must be adaptive ({adaptive}); got {args.solver!r}")
    run_ = load(args.run_dir)
    _check_options(args)
    what = {"images": "images", "toy": "target points", "sphere": "test points"}[run_.config.kind]
    say(f"integrating the log-likelihood of {args.n} {what} ({args.divergence} divergence, {args.solver})")
    nll_kind = {"images": _images, "toy": _points, "sphere": _sphere}[run_.config.kind]
    result, message = nll_kind(run_, args)
    return _report(args.run_dir, result, message)


def _images(run, args) -> tuple[dict, str]:
    params = run.state.ema_params if run.config.eval_ema else run.state.params
    result = image_bits_per_dim(
        run.config, run.apply_fn, params, n=args.n, divergence=args.divergence,
        num_probes=args.num_probes, probe=args.probe, data_dir=args.data_dir, seed=args.seed,
        solver=args.solver,
    )  # fmt: skip
    message = (
        f"bits/dim = {result['bits_per_dim']:.4f} +- {result['bits_per_dim_stderr']:.4f} on "
        f"{result['n']} {run.config.dataset} test images; {result['divergence']} divergence, "
        "uniform dequantisation"
    )
    return result, message


def _sphere(run, args) -> tuple[dict, str]:
    params = run.state.ema_params if run.config.eval_ema else run.state.params
    result = sphere_nll(
        run.config, run.apply_fn, params, split="test", n=args.n, divergence=args.divergence,
        num_probes=args.num_probes, probe=args.probe, seed=args.seed, solver=args.solver,
    )  # fmt: skip
    message = (
        f"NLL = {result['nll']:.4f} +- {result['nll_stderr']:.4f} nats (area measure; uniform "
        f"{math.log(4 * math.pi):.4f}) on {result['n']} {run.config.dataset} test points; "
        f"{result['divergence']} divergence, NFE = {result['nfe']}"
    )
    return result, message


def _points(run, args) -> tuple[dict, str]:
    result = runs.negative_log_likelihood(
        run,
        n=args.n,
        divergence=args.divergence,
        num_probes=args.num_probes,
        probe=args.probe,
        solver=args.solver,
        seed=args.seed,
    )
    message = (
        f"NLL = {result['nll']:.4f} +- {result['nll_stderr']:.4f} nats "
        f"({result['bits_per_dim']:.4f} bits/dim) on {result['n']} target points; "
        f"{result['divergence']} divergence, NFE = {result['nfe']}"
    )
    return result, message


def _report(run_dir: str, result: dict, message: str) -> int:
    """Append the result to the run's metrics (nothing is overwritten; safe beside a training run) and
    print it."""
    runs.append_record(os.path.join(run_dir, runs.METRICS_FILE), {"event": "nll", **result})
    print(message)
    return 0

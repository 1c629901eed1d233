"""``fmjax sample``: draw samples of a trained run into a PNG (a longitude/latitude map for sphere runs) and
report their NFE (and W2 in 2D)."""

from __future__ import annotations

import os

from fmjax import plotting, runs
from fmjax._checks import check_choice, check_int
from fmjax.cli.common import HelpFormat, UsageError, load, say, warn
from fmjax.data import earth
from fmjax.data.toy import sample as toy_sample
from fmjax.metrics import wasserstein2
from fmjax.runs.tasks.images import generate_images
from fmjax.runs.tasks.sphere import generate_points
from fmjax.sampling import SOLVERS

ALIASES = {"class": "--class"}  # the library's name of the option --class sets (args.label)


def add_parser(sub, help_text: str) -> None:
    """Add the command's parser to ``sub``; ``help_text`` is its line in ``fmjax.cli.main.COMMANDS``."""
    p = sub.add_parser("sample", help=help_text, formatter_class=HelpFormat)
    p.add_argument("run_dir", help="a directory written by fmjax train")
    p.add_argument("--n", type=int, default=2000, help="number of samples")
    p.add_argument("--solver", default="dopri5", help=f"one of {', '.join(SOLVERS)}")
    p.add_argument("--steps", type=int, default=None, help="fixed steps (default: adaptive)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--class",
        dest="label",
        type=int,
        default=None,
        help="conditional runs: draw every sample from this class (default: a panel or grid row per class)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        help="conditional runs: classifier-free guidance weight w, v_null + w (v_cond - v_null); 1 is the "
        "conditional model, 0 the unconditional one (needs a run trained with --cond-dropout > 0)",
    )
    p.add_argument(
        "--out", default=None, help="PNG to write (default: RUN_DIR/samples-<solver>-<n>[-class-K][-wW].png)"
    )


def _check_conditional_options(run, args) -> None:
    """--class and --guidance: only for a conditional run, a class it has, and a warning when the guided
    model's unconditional half was never trained."""
    config = run.config
    if not config.conditional:
        if args.label is not None or args.guidance != 1.0:
            raise UsageError(
                f"--class and --guidance need a conditional run (fmjax train --conditional); "
                f"{args.run_dir!r} is unconditional"
            )
        return
    if args.label is not None and not 0 <= args.label < config.num_classes:
        raise UsageError(f"--class must be in 0 .. {config.num_classes - 1}; got {args.label}")
    if args.guidance != 1.0 and config.cond_dropout == 0:
        warn(
            "this run was trained without --cond-dropout: its null class never trained, so --guidance "
            "other than 1 mixes in an untrained field"
        )


def _check_options(args) -> None:
    """The options, checked before anything is announced or computed."""
    check_int("n", args.n, low=1)
    check_choice("solver", args.solver, SOLVERS)
    if args.steps is not None:
        check_int("steps", args.steps, low=1)
    elif not SOLVERS[args.solver].adaptive:
        adaptive = ", ".join(name for name, spec in SOLVERS.items() if spec.adaptive)
        raise UsageError(
            f"--steps is required for --solver {args.solver!r}, which is not adaptive ({adaptive} are)"
        )


def run(args, interrupts) -> int:
    """``fmjax sample``."""
    run_ = load(args.run_dir)
    _check_conditional_options(run_, args)
    _check_options(args)
    config = run_.config
    suffix = "" if args.label is None else f"-class-{args.label}"
    suffix += "" if args.guidance == 1.0 else f"-w{args.guidance:g}"
    out = args.out or os.path.join(args.run_dir, f"samples-{args.solver}-{args.n}{suffix}.png")
    if os.path.exists(out):
        raise UsageError(f"--out {out!r} already exists; choose another file")
    what = f"{args.solver}"
    if config.conditional:
        what += f", guidance {args.guidance:g}" + ("" if args.label is None else f", class {args.label}")
    sample_kind = {"images": _images, "toy": _points, "sphere": _sphere}[config.kind]
    return sample_kind(run_, args, out, what)


def _options(args) -> dict:
    return {
        "n": args.n,
        "solver": args.solver,
        "steps": args.steps,
        "seed": args.seed,
        "guidance": args.guidance,
    }


def _images(run, args, out: str, what: str) -> int:
    say(f"sampling {args.n} images ({what})")
    images, nfe = generate_images(run, label=args.label, **_options(args))
    rows = " (a row per class)" if run.config.conditional and args.label is None else ""
    plotting.image_grid(out, images, title=f"{what}: NFE = {nfe}{rows}")
    print(f"wrote {out}")
    print(f"NFE = {nfe} ({args.n} images, {what})")
    return 0


def _sphere(run, args, out: str, what: str) -> int:
    say(f"sampling {args.n} points on the sphere ({what})")
    options = {key: value for key, value in _options(args).items() if key != "guidance"}
    points, nfe = generate_points(run, **options)
    data = earth.load(run.config.dataset, split="test", seed=run.config.seed)
    plotting.sphere_density(out, data, generated=points, title=f"{run.config.dataset}: {what}, NFE = {nfe}")
    print(f"wrote {out}")
    print(f"NFE = {nfe} ({args.n} points, {what})")
    return 0


def _points(run, args, out: str, what: str) -> int:
    import jax
    import numpy as np

    config = run.config
    if config.conditional and args.label is None:  # a panel per class
        panels = []
        for k in range(config.num_classes):
            say(f"sampling {args.n} points of class {k} ({what})")
            x1, nfe, w2 = runs.generate(run, label=k, **_options(args))
            target = runs.class_points(config.target, jax.random.PRNGKey(args.seed + 1), k, args.n)
            panels.append((x1, target, f"class {k}: W2 = {w2:.3f}, NFE = {nfe}"))
        plotting.samples_by_class(
            out, panels, title=f"{config.target}, conditional: {args.n} samples per class, {what}"
        )
        print(f"wrote {out}")
        for k, (_, _, title) in enumerate(panels):
            print(f"{title} ({args.n} samples, {what})" if k == 0 else title)
        return 0
    say(f"sampling {args.n} points ({what})")
    x1, nfe, w2 = runs.generate(run, label=args.label, **_options(args))

    def targets(seed: int) -> np.ndarray:
        key = jax.random.PRNGKey(seed)
        if args.label is not None:
            return runs.class_points(config.target, key, args.label, args.n)
        return np.asarray(toy_sample(config.target, key, args.n))

    target = targets(args.seed + 1)
    floor = wasserstein2(target, targets(args.seed + 2))  # what two target samples of this size are apart
    name = config.target + ("" if args.label is None else f", class {args.label}")
    title = f"{name}: {args.n} samples, {what}, NFE = {nfe}; W2 = {w2:.3f} (target floor {floor:.3f})"
    plotting.samples(out, x1, target, title=title)
    print(f"wrote {out}")
    print(
        f"NFE = {nfe}; W2 = {w2:.4f} ({args.n} samples, {what}); target sample floor W2 = {floor:.4f} "
        f"(two target samples of {args.n})"
    )
    return 0

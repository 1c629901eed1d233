"""Gaussian -> Gaussian Schrödinger bridge: SB-CFM and [SF]²M against the closed-form marginals.

Source N(-0.1 * 1, I_d), target N(0.1 * 1, I_d), Brownian reference with sigma = 1, d = 5, 20, 50.
The static bridge is entropic OT with epsilon = 2 sigma^2 (Janati et al. 2020): for identity
covariances its cross-covariance is c I with c = (sqrt(4 + sigma^4) - sigma^2) / 2, and the bridge
marginal at time t is N(m_t, s_t I) with

    m_t = (1 - t) a + t b,    s_t = (1 - t)^2 + t^2 + 2 t (1 - t) c + sigma^2 t (1 - t).

SB-CFM (fmjax's ``schrodinger_bridge`` coupling + ``SchrodingerBridge`` path) learns the probability
flow of these marginals. We push ``--eval-samples`` source points through the learned ODE (dopri5),
fit a Gaussian to the points at 21 times, and report KL(fit || closed form) at t = 1 and averaged
over the 21 times. A fitted Gaussian is biased even for exact samples (about d (d + 3) / (4 n)
nats); the ``floor`` column is that KL for n exact samples of the target, measured the same way.
Published SB-CFM KL(p1, p1*): 0.001 / 0.034 / 0.170 for d = 5 / 20 / 50.

[SF]²M (``--methods sf2m``; ``make_train_step(loss="sf2m")``, a flow and a score network joined by
``two_networks``, same coupling and path) learns the bridge itself: the SDE
dx = (v + sigma^2 / 2 s) dt + sigma dW (``sf2m_drift``, Euler-Maruyama, ``--sde-steps``) and the
ODE of its flow head (``sf2m_velocity``, dopri5) should both have the closed-form marginals. We
report KL(fit || closed form) at t = 0.25, 0.5, 0.75, 1 for each.

What the interior times measure. [SF]²M's flow head is trained exactly as SB-CFM's network (the
two losses share nothing; with ``two_networks`` and the same seed the flow parameters are equal), so
its ODE and SB-CFM's have the same marginals. Two things separate them from the bridge's s_t:

* Finite training. The marginal velocity of the bridge is affine, v = m' + k_t (x - m_t) with
  k_t = s'_t / (2 s_t), |k_t| <= 0.12 at sigma = 1; it explains E_t[k_t^2 s_t] ~ 0.005 per coordinate
  of a flow loss of ~6, almost all of it the variance of the conditional target's noise term
  sigma (1 - 2t) / (2 sqrt(t (1 - t))) eps (its mean over uniform t diverges logarithmically at the
  ends; the clip at 1e-5 keeps it ~5). Adam at 1e-3 (the earlier default) does not resolve that
  signal: both flows came out t-independent, x -> x + (b - a), the OT interpolation with variance 1
  at every t. At ``LEARNING_RATE`` = 1e-4 the same 10^4 steps learn most of it at d = 5,
  not yet at d = 50.
* Minibatch couplings. The training pairs come from the entropic plans of batches of
  ``--batch-size``, whose cross-covariance c_B falls short of the population's c as d grows
  (``minibatch_cross_covariance``: 0.60 / 0.50 / 0.35 at d = 5 / 20 / 50, batch 256, against 0.618).
  A perfectly fitted model learns the marginals with c_B, variance 1 + t (1 - t)(2 c_B - 2 + sigma^2):
  1.05 / 1.00 / 0.93 at t = 1/2. The variance table shows that row per d; larger batches move it to
  the bridge.

Why a loop of its own and not ``fmjax.runs.train``: a ``RunConfig`` without a dataset trains a 2D MLP
(``MLP(dim=2)``) on the named 2D samplers, so a data source of d-dimensional Gaussians would find no
model of its width; and its step is the CFM loss of one network, where [SF]²M needs
``make_train_step(loss="sf2m")`` with a flow and a score network (``two_networks``), which no
``RunConfig`` field asks for.

Results of each method are kept in ``gaussian_sb.json`` under ``--out``; a run replaces only the
methods it ran, and ``gaussian_sb.md`` is written from all of them (and from the json's "notes", a
reading of the tables kept across runs).

    python -m experiments.gaussian_sb                # writes experiments/results/gaussian_sb.md
    python -m experiments.gaussian_sb --dims 5 --steps 300 --eval-samples 2000 --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmjax.couplings import schrodinger_bridge
from fmjax.losses import two_networks
from fmjax.models import MLP, functional
from fmjax.paths import SchrodingerBridge
from fmjax.sampling import as_velocity, sample
from fmjax.sde import sample_sde, sf2m_drift, sf2m_velocity
from fmjax.training import TrainState, make_train_step

PUBLISHED_KL = {5: 0.001, 20: 0.034, 50: 0.170}
SOURCE_MEAN, TARGET_MEAN = -0.1, 0.1
METHODS = ("sbcfm", "sf2m")
SF2M_TIMES = (0.25, 0.5, 0.75, 1.0)
# Adam at 1e-3 (the earlier default) leaves both methods' flow on the OT interpolation (variance 1 at
# every t): the interior signal is ~0.1% of the flow loss (see the module docstring), below the
# parameter noise of that step size; 1e-4 resolves it in the same 10^4 steps.
LEARNING_RATE = 1e-4
# The experiment's random streams, PRNGKey(offset + seed): the training batches, the evaluation points
# and noise, the batches of ``minibatch_cross_covariance`` (the state's key, which draws the times, is
# PRNGKey(seed)).
SEED_OFFSETS = {"data": 10_000, "eval": 20_000, "plans": 30_000}


def cross_covariance(sigma: float) -> float:
    """c with Cov(X0, X1) = c I for the entropic OT (epsilon = 2 sigma^2) between N(a, I) and N(b, I)."""
    return (math.sqrt(4 + sigma**4) - sigma**2) / 2


def marginal(t: float, dim: int, sigma: float, c: float | None = None) -> tuple[np.ndarray, float]:
    """Mean vector and (isotropic) variance of the bridge marginal at time t; ``c`` (default: the
    population's ``cross_covariance(sigma)``) is Cov(x0, x1) / I of the coupling under the path."""
    c = cross_covariance(sigma) if c is None else c
    mean = np.full(dim, (1 - t) * SOURCE_MEAN + t * TARGET_MEAN)
    var = (1 - t) ** 2 + t**2 + 2 * t * (1 - t) * c + sigma**2 * t * (1 - t)
    return mean, var


def minibatch_cross_covariance(dim, *, sigma, batch_size, batches=20, seed=0):
    """c_B: Cov(x0, x1) / I under the entropic plans of ``batches`` batches of ``batch_size`` (mean over
    batches and coordinates, each batch centred). The training pairs come from these plans, not from
    the population's, so a perfectly fitted SB-CFM / [SF]²M learns the marginals of ``marginal(t, dim,
    sigma, c_B)``; c_B falls short of the population's c as d grows at a fixed batch size."""
    coupling = schrodinger_bridge(sigma)
    values = []
    for k in range(batches):
        k0, k1 = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(SEED_OFFSETS["plans"] + seed), k))
        x0 = SOURCE_MEAN + jax.random.normal(k0, (batch_size, dim))
        x1 = TARGET_MEAN + jax.random.normal(k1, (batch_size, dim))
        plan = np.asarray(coupling.plan(x0, x1), np.float64)
        z0 = np.asarray(x0, np.float64) - np.asarray(x0, np.float64).mean(axis=0)
        z1 = np.asarray(x1, np.float64) - np.asarray(x1, np.float64).mean(axis=0)
        values.append(np.einsum("ij,id,jd->", plan / plan.sum(), z0, z1) / dim)
    return float(np.mean(values))


def gaussian_kl_to_isotropic(points: np.ndarray, mean: np.ndarray, var: float) -> float:
    """KL(N(m_hat, S_hat) || N(mean, var I)) for the Gaussian fitted to ``points`` [n, d] (float64)."""
    points = np.asarray(points, np.float64)
    dim = points.shape[1]
    m_hat = points.mean(axis=0)
    s_hat = np.cov(points, rowvar=False).reshape(dim, dim)
    _, logdet = np.linalg.slogdet(s_hat)
    diff = m_hat - mean
    return 0.5 * (np.trace(s_hat) / var + diff @ diff / var - dim + dim * math.log(var) - logdet)


def build_model(dim, *, method, width, seed):
    """(apply_fn, params): one MLP (SB-CFM), or a flow and a score MLP joined by ``two_networks`` ([SF]²M)."""
    make = lambda seed: functional(MLP(dim=dim, width=width, depth=3, activation="selu", seed=seed))  # noqa: E731
    if method == "sbcfm":
        return make(seed)
    (flow_fn, flow_params), (score_fn, score_params) = make(seed), make(seed + 1)
    return two_networks(flow_fn, score_fn), {"flow": flow_params, "score": score_params}


def train_bridge(dim, *, sigma, steps, batch_size, width, learning_rate=LEARNING_RATE, seed, method="sbcfm"):
    """Train SB-CFM (or [SF]²M) between the two Gaussians; returns (apply_fn, params)."""
    apply_fn, params = build_model(dim, method=method, width=width, seed=seed)
    optimizer = optax.adamw(learning_rate, weight_decay=1e-5)
    state = TrainState.create(params=params, optimizer=optimizer, key=jax.random.PRNGKey(seed))
    step = make_train_step(
        apply_fn,
        optimizer,
        path=SchrodingerBridge(sigma=sigma),
        coupling=schrodinger_bridge(sigma),
        loss="sf2m" if method == "sf2m" else "cfm",
        donate=False,
    )
    data_key = jax.random.PRNGKey(SEED_OFFSETS["data"] + seed)

    def one(state, _):
        k0, k1 = jax.random.split(jax.random.fold_in(data_key, state.step))
        x0 = SOURCE_MEAN + jax.random.normal(k0, (batch_size, dim))
        x1 = TARGET_MEAN + jax.random.normal(k1, (batch_size, dim))
        return step(state, x0, x1)

    @functools.partial(jax.jit, static_argnums=1)
    def chunk(state, length):
        state, metrics = jax.lax.scan(one, state, None, length=length)
        return state, jnp.mean(metrics["loss"])

    done = 0
    while done < steps:
        length = min(500, steps - done)
        state, loss = chunk(state, length)
        done += length
    if not math.isfinite(float(loss)):
        raise FloatingPointError(f"{method} loss became {float(loss)} by step {done} (d = {dim})")
    return apply_fn, state.ema_params


def evaluate(apply_fn, params, dim, *, sigma, eval_samples, seed):
    """KL at t = 1, mean KL over 21 times, NFE, and the finite-sample floor."""
    key = jax.random.PRNGKey(SEED_OFFSETS["eval"] + seed)
    k0, k_floor = jax.random.split(key)
    x0 = SOURCE_MEAN + jax.random.normal(k0, (eval_samples, dim))
    result = sample(
        as_velocity(apply_fn, params), x0, solver="dopri5", save_trajectory=True, trajectory_points=21
    )
    ts, xs = result.trajectory
    kls = [
        gaussian_kl_to_isotropic(np.asarray(x), *marginal(float(t), dim, sigma))
        for t, x in zip(np.asarray(ts), xs, strict=True)
    ]
    exact = TARGET_MEAN + np.asarray(jax.random.normal(k_floor, (eval_samples, dim)), np.float64)
    at = [int(np.argmin(np.abs(np.asarray(ts) - t))) for t in SF2M_TIMES]
    return {
        "kl_t1": kls[-1],
        "var_ode": [float(np.mean(np.var(np.asarray(xs[i], np.float64), axis=0))) for i in at],
        "kl_mean_over_t": float(np.mean(kls)),
        "kl_floor": gaussian_kl_to_isotropic(exact, *marginal(1.0, dim, sigma)),
        "nfe": int(result.nfe),
    }


def fit_floor(dim, *, sigma, eval_samples, seed):
    """KL of the Gaussian fitted to ``eval_samples`` exact samples of the bridge at t = 1.

    The fit's KL is invariant under affine maps of the samples, so this floor holds at every t."""
    key = jax.random.fold_in(jax.random.PRNGKey(SEED_OFFSETS["eval"] + seed), 1)
    exact = TARGET_MEAN + np.asarray(jax.random.normal(key, (eval_samples, dim)), np.float64)
    return gaussian_kl_to_isotropic(exact, *marginal(1.0, dim, sigma))


def sde_marginals(apply_fn, params, x0, *, sigma, sde_steps, key, times=SF2M_TIMES, chunk=10_000):
    """Points of the [SF]²M SDE (Euler-Maruyama, ``sde_steps`` equal steps) at ``times``: [len(times), n, d].

    The SDE saves every grid point; ``chunk`` samples at a time bound that trajectory's memory."""
    index = [round(t * sde_steps) for t in times]
    if any(abs(i - t * sde_steps) > 1e-9 for i, t in zip(index, times, strict=True)):
        raise ValueError(f"sde_steps must put a grid point on each of {times}; got {sde_steps}")
    drift = sf2m_drift(apply_fn, params, sigma)
    parts, nfe = [], 0
    for k, begin in enumerate(range(0, x0.shape[0], chunk)):
        result = sample_sde(
            drift,
            sigma,
            x0[begin : begin + chunk],
            key=jax.random.fold_in(key, k),
            solver="euler_maruyama",
            steps=sde_steps,
            save_trajectory=True,
        )
        parts.append(np.asarray(result.trajectory.xs[np.array(index)], np.float64))
        nfe = int(result.nfe)
    return np.concatenate(parts, axis=1), nfe


def evaluate_sf2m(apply_fn, params, dim, *, sigma, eval_samples, sde_steps, seed):
    """KL(fit || closed form) at t = 0.25, 0.5, 0.75, 1 of the SDE and of the ODE (flow head), and the
    fitted variance (the mean of the per-coordinate variances) there."""
    k0, k_sde = jax.random.split(jax.random.PRNGKey(SEED_OFFSETS["eval"] + seed))
    x0 = SOURCE_MEAN + jax.random.normal(k0, (eval_samples, dim))
    sde_points, sde_nfe = sde_marginals(apply_fn, params, x0, sigma=sigma, sde_steps=sde_steps, key=k_sde)
    ode = sample(
        sf2m_velocity(apply_fn, params),
        x0,
        solver="dopri5",
        save_trajectory=True,
        trajectory_points=len(SF2M_TIMES) + 1,
    )
    ode_points = np.asarray(ode.trajectory.xs[1:], np.float64)  # t = 0.25, 0.5, 0.75, 1
    kl = lambda points: [  # noqa: E731
        gaussian_kl_to_isotropic(x, *marginal(t, dim, sigma)) for t, x in zip(SF2M_TIMES, points, strict=True)
    ]
    variance = lambda points: [float(np.mean(np.var(x, axis=0))) for x in points]  # noqa: E731
    return {
        "kl_sde": kl(sde_points),
        "kl_ode": kl(ode_points),
        "var_sde": variance(sde_points),
        "var_ode": variance(ode_points),
        "kl_t1": kl(sde_points)[-1],
        "kl_floor": fit_floor(dim, sigma=sigma, eval_samples=eval_samples, seed=seed),
        "nfe_sde": sde_nfe,
        "nfe_ode": int(ode.nfe),
    }


SBCFM_HEADER = (
    "| d | KL(p1, p1*) ours | published SB-CFM | floor (exact samples) | mean KL over t | NFE dopri5 | s |"
)
SF2M_HEADER = (
    "| d | sampler | KL t=0.25 | KL t=0.5 | KL t=0.75 | KL t=1 | published SB-CFM KL(p1, p1*) "
    "| floor (exact samples) | NFE | s |"
)


def variance_table(results):
    """Markdown lines: the fitted variances of the stored rows against the bridge's, the minibatch
    plan's (c_B) and OT's; empty when no row holds variances."""
    rows = sorted(
        (
            (method, row)
            for method in METHODS
            if method in results
            for row in results[method]["rows"]
            if "var_ode" in row
        ),
        key=lambda item: item[1]["dim"],
    )
    if not rows:
        return []
    sigma = next(results[m].get("sigma", 1.0) for m, _ in rows)
    lines = [
        "",
        "Fitted variance (mean over coordinates) against the bridge's s_t, the minibatch plans' (s_t with "
        "c_B, the cross-covariance of the training pairs) and OT's 1:\n",
        "| d | sampler | var t=0.25 | var t=0.5 | var t=0.75 | var t=1 |",
        "|---|---|---|---|---|---|",
        "| any | closed form (bridge) | "
        + " | ".join(f"{marginal(t, 1, sigma)[1]:.4f}" for t in SF2M_TIMES)
        + " |",
        "| any | OT interpolation (sigma -> 0) | " + " | ".join("1.0000" for _ in SF2M_TIMES) + " |",
    ]
    shown = set()
    for method, row in rows:
        if "c_batch" in row and row["dim"] not in shown:
            shown.add(row["dim"])
            lines.append(
                f"| {row['dim']} | minibatch plans, c_B = {row['c_batch']:.3f} | "
                + " | ".join(f"{marginal(t, 1, sigma, row['c_batch'])[1]:.4f}" for t in SF2M_TIMES)
                + " |"
            )
        samplers = [("SB-CFM ODE", row["var_ode"])]
        if method == "sf2m":
            samplers = [("[SF]²M SDE", row["var_sde"]), ("[SF]²M ODE", row["var_ode"])]
        for sampler, var in samplers:
            lines.append(f"| {row['dim']} | {sampler} | " + " | ".join(f"{v:.4f}" for v in var) + " |")
    return lines


def render(results):
    """The markdown tables of the stored results ({method: {"title", "rows"}})."""
    lines = []
    if "sbcfm" in results:
        lines += [f"# {results['sbcfm']['title']}\n", SBCFM_HEADER, "|---|---|---|---|---|---|---|"]
        for row in results["sbcfm"]["rows"]:
            lines.append(
                f"| {row['dim']} | {row['kl_t1']:.4f} | {PUBLISHED_KL.get(row['dim'], '—')} "
                f"| {row['kl_floor']:.4f} "
                f"| {row['kl_mean_over_t']:.4f} | {row['nfe']} | {row['seconds']} |"
            )
    if "sf2m" in results:
        lines += [
            "",
            f"# {results['sf2m']['title']}\n",
            SF2M_HEADER,
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in results["sf2m"]["rows"]:
            for sampler, kls, nfe in (
                (f"SDE Euler-Maruyama, {row['sde_steps']} steps", row["kl_sde"], row["nfe_sde"]),
                ("ODE (flow head), dopri5", row["kl_ode"], row["nfe_ode"]),
            ):
                lines.append(
                    f"| {row['dim']} | {sampler} | "
                    + " | ".join(f"{kl:.4f}" for kl in kls)
                    + f" | {PUBLISHED_KL.get(row['dim'], '—')} | {row['kl_floor']:.4f} | {nfe} "
                    f"| {row['seconds']} |"
                )
    lines += variance_table(results)
    if results.get("notes"):
        lines += ["", results["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.gaussian_sb", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--methods", default="sbcfm,sf2m", help=f"comma-separated, from {METHODS}")
    parser.add_argument("--dims", default="5,20,50")
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=LEARNING_RATE)
    parser.add_argument("--eval-samples", type=int, default=100_000)
    parser.add_argument("--sde-steps", type=int, default=100, help="[SF]²M SDE steps (a multiple of 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    if not methods or any(m not in METHODS for m in methods):
        parser.error(f"--methods must be a comma-separated list from {METHODS}; got {args.methods!r}")
    if args.sde_steps < 4 or args.sde_steps % 4:
        parser.error(
            f"--sde-steps must be a positive multiple of 4 (a grid point at each t); got {args.sde_steps}"
        )
    dims = [int(d) for d in args.dims.split(",")]
    store = os.path.join(args.out, "gaussian_sb.json")
    results = {}
    if os.path.exists(store):
        with open(store) as f:
            results = json.load(f)
    all_rows = []
    for method in methods:
        rows = []
        for dim in dims:
            start = time.perf_counter()
            apply_fn, params = train_bridge(
                dim,
                sigma=args.sigma,
                steps=args.steps,
                batch_size=args.batch_size,
                width=args.width,
                learning_rate=args.learning_rate,
                seed=args.seed,
                method=method,
            )
            options = dict(sigma=args.sigma, eval_samples=args.eval_samples, seed=args.seed)
            if method == "sbcfm":
                metrics = evaluate(apply_fn, params, dim, **options)
            else:
                metrics = evaluate_sf2m(apply_fn, params, dim, sde_steps=args.sde_steps, **options)
                metrics["sde_steps"] = args.sde_steps
            seconds = round(time.perf_counter() - start, 1)
            metrics["c_batch"] = minibatch_cross_covariance(
                dim, sigma=args.sigma, batch_size=args.batch_size, seed=args.seed
            )
            row = {"method": method, "dim": dim, **metrics, "seconds": seconds}
            rows.append(row)
            print(json.dumps(row), flush=True)
        name = "SB-CFM" if method == "sbcfm" else "[SF]²M (flow + score networks)"
        results[method] = {
            "title": f"{name}, Gaussian Schrödinger bridge (sigma = {args.sigma}): {args.steps} steps, "
            f"batch {args.batch_size}, MLP 3x{args.width}, EMA params, {args.eval_samples} samples",
            "command": "python -m experiments.gaussian_sb "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "sigma": args.sigma,
            "rows": rows,
        }
        all_rows += rows
    os.makedirs(args.out, exist_ok=True)
    with open(store, "w") as f:
        # "notes" (the reading of the tables, written by hand) is kept across runs
        json.dump({k: results[k] for k in (*METHODS, "notes") if k in results}, f, indent=1)
    text = render(results)
    with open(os.path.join(args.out, "gaussian_sb.md"), "w") as f:
        f.write(text)
    print(text)
    return all_rows


if __name__ == "__main__":
    main()

"""Fault trials: SIGKILL ``fmjax train`` at random moments, resume it with the same command, and compare the
final state bit for bit with an uninterrupted run.

Each trial starts a fresh run, kills it after a uniformly random delay (anywhere in start-up, training,
checkpointing or evaluation), then runs the same command to completion. A trial passes when the
resumed run's parameters, EMA, optimiser state and key equal the reference run's bitwise and no
checkpoint is left unreadable. Writes ``kill_trials.md`` and ``kill_trials.png`` (kill time against
the step reached at the kill, coloured by outcome).

    python -m experiments.kill_trials --trials 20          # the slow test's setting
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from fmjax.checkpoint import Checkpointer
from fmjax.runs import load_run

FMJAX = os.path.join(os.path.dirname(sys.executable), "fmjax")


def command(out: str, steps: int) -> list[str]:
    return [
        FMJAX, "train", "--out", out, "--steps", str(steps), "--batch-size", "64", "--width", "16",
        "--log-every", "100", "--checkpoint-every", "500", "--eval-samples", "200",
        "--no-progress", "--no-plots",
    ]  # fmt: skip


def same_state(a: str, b: str) -> bool:
    """Whether the final states of two run directories are bitwise equal."""
    state_a, state_b = load_run(a).state, load_run(b).state
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        if not np.array_equal(np.asarray(x), np.asarray(y)):
            return False
    return True


def unreadable_checkpoints(run_dir: str) -> list[int]:
    """Steps whose checkpoint does not restore into the run's state structure."""
    bad = []
    like = load_run(run_dir).state
    with Checkpointer(os.path.join(run_dir, "checkpoints")) as ckpt:
        for step in ckpt.all_steps():
            try:
                ckpt.restore(like, step)
            except Exception:
                bad.append(step)
    return bad


def _steps_on_disk(run_dir: str) -> int:
    try:
        return max(
            (int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.isdigit()), default=0
        )
    except FileNotFoundError:
        return 0


def trials(n: int, *, steps: int = 5000, seed: int = 0, work: str | None = None) -> tuple[list[dict], float]:
    """Run ``n`` kill-and-resume trials; returns (one record per trial, seconds of the reference run)."""
    work = work or tempfile.mkdtemp()
    reference = os.path.join(work, "reference")
    start = time.perf_counter()
    subprocess.run(command(reference, steps), check=True, capture_output=True)
    duration = time.perf_counter() - start
    rng = random.Random(seed)
    records = []
    for trial in range(n):
        out = os.path.join(work, f"trial{trial}")
        delay = rng.uniform(0.2, duration)
        process = subprocess.Popen(command(out, steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        finished_first = process.poll() is not None
        process.send_signal(signal.SIGKILL)
        process.wait()
        at_kill = _steps_on_disk(out)
        resumed = subprocess.run(command(out, steps), capture_output=True, text=True)
        ok = resumed.returncode == 0 and same_state(reference, out) and not unreadable_checkpoints(out)
        records.append(
            {
                "trial": trial,
                "kill_after_s": round(delay, 2),
                "checkpoint_at_kill": at_kill,
                "finished_before_kill": finished_first,
                "bitwise_equal": ok,
                "resume_returncode": resumed.returncode,
            }
        )
    return records, duration


def report(records: list[dict], duration: float, out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passed = sum(r["bitwise_equal"] for r in records)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for ok, colour, label in ((True, "tab:green", "bitwise equal"), (False, "tab:red", "differs")):
        pts = [(r["kill_after_s"], r["checkpoint_at_kill"]) for r in records if r["bitwise_equal"] == ok]
        if pts:
            ax.scatter(*zip(*pts, strict=True), color=colour, label=label)
    ax.axvline(duration, color="gray", ls="--", lw=0.8, label="uninterrupted run ends")
    ax.set_xlabel("SIGKILL after (s)")
    ax.set_ylabel("newest checkpoint at the kill")
    ax.set_title(f"{passed}/{len(records)} kill-and-resume trials bitwise equal")
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(os.path.join(out_dir, "kill_trials.png"), dpi=120)
    plt.close(fig)
    lines = [
        f"# Kill trials: {passed}/{len(records)} resumed runs bitwise equal to the uninterrupted run\n",
        f"Uninterrupted run: {duration:.1f} s. Figure: kill_trials.png.\n",
        "| trial | SIGKILL after s | newest checkpoint at kill | bitwise equal, no unreadable checkpoint |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['trial']} | {r['kill_after_s']} | {r['checkpoint_at_kill']} | {r['bitwise_equal']} |"
        for r in records
    ]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "kill_trials.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.kill_trials", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    records, duration = trials(args.trials, steps=args.steps, seed=args.seed)
    print(report(records, duration, args.out))
    return records


if __name__ == "__main__":
    main()

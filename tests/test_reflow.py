"""Reflow: exact pairs of known flows, sharded == unsharded, stored pairs as a resumable training source, and
a 1-reflow model straighter and better at one Euler step than its teacher."""

import json
import os
import textwrap
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from _host_devices import run_json
from jax.sharding import Mesh

from fmjax._straightness import crossing_fraction, straightness
from fmjax.data.pairs import PairSource, load_pairs, save_pairs
from fmjax.data.toy import sample as toy_sample
from fmjax.metrics import wasserstein2
from fmjax.reflow import reflow_pairs
from fmjax.runs import RunConfig, load_run, train
from fmjax.sampling import as_velocity, sample

A = np.array([[-0.5, 1.0], [-1.0, -0.2]])  # float64: the reference is computed in float64


def _x0(n=12, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(0), (n, 2), dtype)


# --- reflow_pairs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("solver", "steps"), [("euler", 1), ("euler", 8), ("dopri5", None)])
def test_constant_field_pairs_are_translations(solver, steps, x64):
    shift = jnp.array([1.5, -0.25])
    pairs = reflow_pairs(lambda t, x: jnp.broadcast_to(shift, x.shape), _x0(), solver=solver, steps=steps)
    np.testing.assert_array_equal(pairs.x0, _x0())
    np.testing.assert_allclose(pairs.x1, _x0() + shift, rtol=0, atol=1e-14)
    assert pairs.x1.dtype == np.float64


def test_linear_field_pairs_are_the_matrix_exponential(x64):
    x0 = _x0()
    field = lambda t, x: x @ jnp.asarray(A).T
    pairs = reflow_pairs(field, x0, rtol=1e-10, atol=1e-10, batch_size=5, max_steps=100_000)
    np.testing.assert_allclose(pairs.x1, np.asarray(x0) @ scipy.linalg.expm(A).T, rtol=1e-8, atol=1e-8)
    assert pairs.nfe.shape == (3,) and (pairs.nfe > 6).all()  # chunks of 5, 5 and 2 points


def test_chunks_compute_what_one_solve_computes():
    weight = jnp.array([[0.8, -0.6], [0.3, 1.1]])
    velocity, x0 = (lambda t, x: jnp.tanh(x @ weight) * (1 + t) - x), _x0(30, jnp.float32)
    whole = sample(velocity, x0, solver="heun", steps=6).x1
    pairs = reflow_pairs(velocity, x0, solver="heun", steps=6, batch_size=8)  # 8, 8, 8 and 6 (padded)
    np.testing.assert_allclose(pairs.x1, whole, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(pairs.nfe, [12, 12, 12, 12])


def test_reflow_pairs_bad_arguments_are_named():
    x0 = _x0(4, jnp.float32)
    field = lambda t, x: -x
    with pytest.raises(TypeError, match="velocity must be a callable"):
        reflow_pairs(None, x0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        reflow_pairs(field, x0, batch_size=0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        reflow_pairs(field, x0, batch_size=2.0)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        reflow_pairs(field, x0, mesh="data")
    with pytest.raises(ValueError, match="mesh must have an axis named 'data'"):
        reflow_pairs(field, x0, mesh=Mesh(np.array(jax.devices()[:1]), ("batch",)))
    with pytest.raises(ValueError, match="x0 must be finite"):
        reflow_pairs(field, x0.at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="at least one"):
        reflow_pairs(field, x0[:0])
    with pytest.raises(ValueError, match="solver must be one of"):
        reflow_pairs(field, x0, solver="rk4")


SHARDED = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from fmjax.reflow import reflow_pairs
    from fmjax.sampling import sample

    weight = jnp.array([[0.8, -0.6], [0.3, 1.1]])
    velocity = lambda t, x: jnp.tanh(x @ weight) * (1 + t) - x
    x0 = jax.random.normal(jax.random.key(0), (50, 2))
    one = Mesh(np.array(jax.devices()[:1]), ("data",))
    out = {"devices": jax.device_count()}
    # default mesh: every local device; 25-point chunks padded to 28 for 4 devices
    fixed = [reflow_pairs(velocity, x0, solver="heun", steps=6, batch_size=25, mesh=m) for m in (None, one)]
    out["fixed_diff"] = float(np.max(np.abs(fixed[0].x1 - fixed[1].x1)))
    adaptive = [reflow_pairs(velocity, x0[:48], batch_size=24, mesh=m) for m in (None, one)]
    out["adaptive_diff"] = float(np.max(np.abs(adaptive[0].x1 - adaptive[1].x1)))
    out["adaptive_nfe"] = [adaptive[0].nfe.tolist(), adaptive[1].nfe.tolist()]
    spec = PartitionSpec("data")
    sharded = jax.device_put(x0[:24], NamedSharding(Mesh(np.array(jax.devices()), ("data",)), spec))
    out["solve_sharded"] = sample(velocity, sharded).x1.sharding.spec == spec
    # a model whose parameters are committed to one device (as a restored checkpoint's are)
    from fmjax.models import MLP, functional
    from fmjax.sampling import as_velocity
    apply_fn, params = functional(MLP(dim=2, width=8, depth=1, seed=0))
    model_v = as_velocity(apply_fn, jax.device_put(params, jax.devices()[0]))
    committed = [reflow_pairs(model_v, x0, steps=4, batch_size=25, mesh=m) for m in (None, one)]
    out["committed_diff"] = float(np.max(np.abs(committed[0].x1 - committed[1].x1)))
    from fmjax.likelihood import log_likelihood
    nll = [log_likelihood(model_v, x, steps=4, solver="euler").log_p for x in (sharded, x0[:24])]
    out["committed_nll_diff"] = float(np.max(np.abs(np.asarray(nll[0]) - np.asarray(nll[1]))))
    print(json.dumps(out))
    """
)


def test_sharded_pairs_equal_unsharded():
    out = run_json("-c", SHARDED, devices=4, timeout=300)
    assert out["devices"] == 4
    # same rows and steps: only the order of reductions in the model (and the error norm) differs
    assert out["fixed_diff"] < 1e-6
    assert out["adaptive_diff"] < 1e-6
    assert out["adaptive_nfe"][0] == out["adaptive_nfe"][1]
    assert out["solve_sharded"]  # the solve runs on the shards: x1 comes back sharded, not gathered
    assert out["committed_diff"] < 1e-6  # parameters on one device are replicated onto the mesh
    assert out["committed_nll_diff"] < 1e-5  # likewise for the likelihood's solve


# --- stored pairs ---------------------------------------------------------------------------------


def _pairs_file(tmp_path, n=20, dims=(2,)):
    x0 = np.random.default_rng(0).normal(size=(n, *dims))
    path = tmp_path / "pairs.npz"
    save_pairs(path, x0, 3 * x0 + 1, metadata={"solver": "dopri5", "nfe": [14]})
    return path, x0


def test_save_and_load_round_trip(tmp_path):
    path, x0 = _pairs_file(tmp_path, dims=(2, 3))
    loaded0, loaded1, metadata = load_pairs(path)
    np.testing.assert_array_equal(loaded0, x0)
    np.testing.assert_array_equal(loaded1, 3 * x0 + 1)
    assert loaded0.dtype == np.float64 and metadata == {"solver": "dopri5", "nfe": [14]}
    save_pairs(path, x0[:5], x0[:5])  # replaces the file whole; no temporary file left beside it
    assert len(load_pairs(path)[0]) == 5 and os.listdir(tmp_path) == ["pairs.npz"]


def test_pair_source_keeps_the_pairing_and_depends_on_seed_and_step_only(tmp_path):
    path, _ = _pairs_file(tmp_path)
    source = PairSource(path, batch_size=6, seed=3)  # 3 batches an epoch, 2 pairs left out
    assert source.host_spec() == {"x0": ((6, 2), np.float32), "x1": ((6, 2), np.float32)}
    batches = [source.host_batch(step) for step in range(6)]
    for batch in batches:
        assert batch["x0"].dtype == np.float32
        np.testing.assert_allclose(batch["x1"], 3 * batch["x0"] + 1, rtol=1e-6)  # row k with row k
    epoch = np.concatenate([source.indices(step) for step in range(3)])
    assert len(set(epoch.tolist())) == 18  # an epoch draws each pair at most once
    assert not np.array_equal(source.indices(0), source.indices(3))  # a fresh order every epoch
    again = PairSource(path, batch_size=6, seed=3)
    for step in (5, 0, 4):  # any order: a batch is a function of (seed, step)
        np.testing.assert_array_equal(again.host_batch(step)["x0"], batches[step]["x0"])
    assert not np.array_equal(PairSource(path, batch_size=6, seed=4).indices(0), source.indices(0))
    shares = [PairSource(path, batch_size=6, seed=3, process_index=p, process_count=2) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([s.indices(4) for s in shares]), source.indices(4))
    x0, x1 = source.pair(jax.random.key(0), batches[0])
    assert x0 is batches[0]["x0"] and x1 is batches[0]["x1"]


def test_pairs_file_errors_are_clear(tmp_path):
    path, x0 = _pairs_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="pairs file .*missing.npz' does not exist"):
        PairSource(tmp_path / "missing.npz", batch_size=4, seed=0)
    garbled = tmp_path / "garbled.npz"
    garbled.write_bytes(b"not a pairs file")
    with pytest.raises(ValueError, match="garbled.npz' is not a pairs file"):
        PairSource(garbled, batch_size=4, seed=0)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match="truncated.npz' is not a pairs file"):
        load_pairs(truncated)
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    with pytest.raises(ValueError, match=r"lacks the arrays \['x0', 'x1', 'metadata'\]"):
        load_pairs(other)
    mismatched = tmp_path / "mismatched.npz"
    np.savez(mismatched, x0=np.zeros((4, 2)), x1=np.zeros((4, 3)), metadata=np.array("{}"))
    with pytest.raises(ValueError, match="mismatched.npz' holds invalid pairs: x0 and x1 must have the same"):
        load_pairs(mismatched)
    listed = tmp_path / "listed.npz"
    np.savez(listed, x0=np.zeros((4, 2)), x1=np.zeros((4, 2)), metadata=np.array("[1]"))
    with pytest.raises(ValueError, match="its metadata is a JSON list, not an object"):
        load_pairs(listed)
    with pytest.raises(ValueError, match="x0 and x1 must have the same shape"):
        save_pairs(tmp_path / "new.npz", x0, x0[:3])
    with pytest.raises(TypeError, match="metadata must be JSON-serialisable"):
        save_pairs(tmp_path / "new.npz", x0, x0, metadata={"x": np.zeros(2)})
    assert not (tmp_path / "new.npz").exists()
    with pytest.raises(ValueError, match="batch_size 21 is larger than the 20 pairs"):
        PairSource(path, batch_size=21, seed=0)
    with pytest.raises(ValueError, match="batch_size 5 must be a multiple of the 2 processes"):
        PairSource(path, batch_size=5, seed=0, process_count=2)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        PairSource(path, batch_size="4", seed=0)
    assert zipfile.is_zipfile(path)  # the valid file was never touched


class Interrupted(Exception):
    pass


def test_training_on_pairs_resumes_bit_for_bit(tmp_path):
    path, _ = _pairs_file(tmp_path, n=100)
    config = RunConfig(steps=40, batch_size=32, width=16, depth=2, log_every=10, checkpoint_every=20)
    make = lambda: PairSource(path, batch_size=32, seed=config.seed)
    train(config, tmp_path / "whole", source=make())

    done = []

    def killed(n):  # dies after step 30, between the checkpoints of steps 20 and 40
        done.append(n)
        if sum(done) >= 30:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(config, tmp_path / "resumed", source=make(), progress=killed)
    messages = []
    train(config, tmp_path / "resumed", source=make(), log=messages.append)
    assert messages == ["resuming from checkpoint 20"]
    whole, resumed = load_run(tmp_path / "whole"), load_run(tmp_path / "resumed")
    for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(resumed.state), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    losses = [
        [r["loss"] for r in map(json.loads, open(d / "metrics.jsonl")) if "event" not in r]
        for d in (tmp_path / "whole", tmp_path / "resumed")
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 4


# --- reflow straightens a trained flow ------------------------------------------------------------


def _reflow_experiment(work, *, steps, pairs, eval_points, ema_decay, seed=0):
    """I-CFM teacher (8gaussians -> moons) -> reflow pairs (dopri5) -> student trained on them anew."""
    config = RunConfig(steps=steps, width=64, depth=3, ema_decay=ema_decay, log_every=100, seed=seed)
    teacher = train(config, work / "teacher")
    teacher_v = as_velocity(teacher.apply_fn, teacher.state.ema_params)
    # one draw (one compiled sampler): the pairs' source points, then held-out evaluation points
    points = toy_sample("8gaussians", jax.random.key(100 + seed), pairs + eval_points)
    x0, x_eval = points[:pairs], points[pairs:]
    reflowed = reflow_pairs(teacher_v, x0, batch_size=2048)
    save_pairs(work / "pairs.npz", reflowed.x0, reflowed.x1, metadata={"teacher": str(work / "teacher")})
    source = PairSource(work / "pairs.npz", batch_size=config.batch_size, seed=seed)
    student = train(config, work / "student", source=source)
    # same architecture: with the teacher's apply_fn the student's solves reuse the compiled ones
    student_v = as_velocity(teacher.apply_fn, student.state.ema_params)

    target = toy_sample("moons", jax.random.key(8), eval_points)
    result = {
        "teacher_dopri5_w2": wasserstein2(reflowed.x1[:eval_points], target),
        "crossing_independent": crossing_fraction(x0[:500], target[:500]),
        "crossing_reflow": crossing_fraction(reflowed.x0[:500], reflowed.x1[:500]),
    }
    for name, velocity in (("teacher", teacher_v), ("student", student_v)):
        result[f"{name}_straightness"] = float(straightness(velocity, x_eval, steps=100))
        result[f"{name}_w2_euler1"] = wasserstein2(
            sample(velocity, x_eval, solver="euler", steps=1).x1, target
        )
    return result, student_v


def _assert_reflow_straightens(r):
    # Seeds 0-3 of the fast setting (300 steps, 2048 pairs) gave teacher S 3.8-4.3 vs student 0.018-0.025,
    # 1-step W2 2.23-2.30 vs 0.66-0.74, the student's 1-step W2 at most 0.07 above the teacher's dopri5 W2
    # (0.60-0.67); the full setting S 8.4 vs 0.012, 1-step W2 2.22 vs 0.22 (teacher dopri5 0.17). The
    # margins below (10x, 2x, +0.15, about 3 times the sampling noise of W2 on 1000 points) leave room for
    # platform differences, and fail for a student of shuffled pairs (S 4.3, 1-step W2 2.32: checked).
    assert r["student_straightness"] < r["teacher_straightness"] / 10, r
    assert r["student_w2_euler1"] < r["teacher_w2_euler1"] / 2, r
    # reflow keeps the teacher's marginal: one student step lands where the teacher's full solve does
    assert r["student_w2_euler1"] < r["teacher_dopri5_w2"] + 0.15, r
    # the reflow pairs barely cross (0.009-0.016 seen) where independent pairs do (0.25)
    assert r["crossing_reflow"] < r["crossing_independent"] / 5, r


def test_one_reflow_is_straighter_than_its_teacher(tmp_path):
    # EMA decay 0.99: with the default 0.999, 300 steps leave the EMA mostly at the initial parameters
    result, student_v = _reflow_experiment(tmp_path, steps=300, pairs=2048, eval_points=1000, ema_decay=0.99)
    _assert_reflow_straightens(result)
    # the student is itself a flow: reflow applies again (2-rectified flow's pairs)
    again = reflow_pairs(student_v, _x0(8, jnp.float32), solver="euler", steps=4)
    np.testing.assert_allclose(again.x1, sample(student_v, _x0(8, jnp.float32), solver="euler", steps=4).x1)


@pytest.mark.slow
def test_one_reflow_is_straighter_than_its_teacher_full(tmp_path):
    # the 2D protocol of fmjax train (20k steps, EMA 0.999) for teacher and student
    result, _ = _reflow_experiment(tmp_path, steps=20_000, pairs=20_000, eval_points=5000, ema_decay=0.999)
    _assert_reflow_straightens(result)
    assert result["student_w2_euler1"] < 0.5, result


# --- fmjax reflow ------------------------------------------------------------------------------------

TEACHER = ["--steps", "200", "--batch-size", "64", "--width", "16", "--log-every", "100",
           "--checkpoint-every", "200", "--eval-samples", "300", "--no-progress", "--no-plots"]  # fmt: skip


@pytest.fixture(scope="module")
def cli_teacher(tmp_path_factory):
    """One teacher trained by the CLI (exact coupling, evaluated) for both CLI tests below: the second
    test's refused commands need only a valid unconditional run, and its accepted reflow then reuses the
    programs (pair solve, student steps) the first test compiled."""
    from fmjax.cli import main

    teacher = tmp_path_factory.mktemp("cli-reflow") / "teacher"
    assert main(["train", "--coupling", "exact", "--out", str(teacher), *TEACHER]) == 0
    return teacher


def test_cli_reflow_solves_pairs_trains_on_them_and_resumes(cli_teacher, tmp_path, capsys):
    from fmjax.cli import main
    from fmjax.runs import prepare_reflow

    teacher, student = cli_teacher, tmp_path / "student"
    argv = ["reflow", str(teacher), "--out", str(student), "--pairs", "256", "--steps", "100",
            "--no-progress", "--no-plots"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "solved 256 pairs" in captured.err and "W2 after few Euler steps (1: " in captured.out
    config = json.loads((student / "config.json").read_text())
    student_fields = (config["pairs"], config["coupling"], config["path"], config["sigma"])
    assert student_fields == ("pairs.npz", "independent", "linear", 0.0)
    assert config["steps"] == 100 and config["width"] == 16  # overridden / the teacher's
    x0, x1, metadata = load_pairs(student / "pairs.npz")
    assert x0.shape == x1.shape == (256, 2) and metadata["teacher"] == str(teacher)
    assert metadata["pairs"] == 256 and metadata["solver"] == "dopri5" and metadata["nfe"] > 0
    summary = json.loads((student / "summary.json").read_text())
    assert sorted(summary["w2_euler_steps"]) == ["1", "2", "4", "8"]
    # the student's pairs are the teacher's flow from source points: a fresh solve gives the same x1
    teacher_run = load_run(teacher)
    again = sample(as_velocity(teacher_run.apply_fn, teacher_run.state.ema_params), jnp.asarray(x0[:32]))
    # (the adaptive steps follow the error of the whole batch solved: 256 points there, 32 here)
    np.testing.assert_allclose(np.asarray(again.x1), x1[:32], atol=5e-3)

    assert main(argv) == 0  # the same command: the pairs are reused and the finished run is kept
    assert "using the 256 pairs already solved" in capsys.readouterr().err
    assert main(["sample", str(student), "--n", "50", "--solver", "euler", "--steps", "1"]) == 0

    # as many pairs as above: the pair solve is the program compiled for the command
    config, initial = prepare_reflow(teacher, tmp_path / "warm", pairs=256, init="teacher")
    leaves = zip(jax.tree.leaves(initial.params), jax.tree.leaves(teacher_run.state.ema_params), strict=True)
    for a, b in leaves:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # starts from the teacher's EMA
    assert int(initial.step) == 0 and config.pairs == "pairs.npz"


def test_cli_reflow_errors_are_one_line(cli_teacher, tmp_path, capsys):
    from fmjax.cli import main

    teacher, cond = cli_teacher, tmp_path / "cond"
    # a conditional run trained without evaluation (one chunk of steps): the errors are what is checked
    conditional = [*TEACHER, "--steps", "100", "--checkpoint-every", "100", "--no-eval"]
    assert main(["train", "--conditional", "--out", str(cond), *conditional]) == 0
    capsys.readouterr()
    out = str(tmp_path / "new")
    cases = [
        (["reflow", str(cond), "--out", out], "teacher is a conditional run"),
        (["reflow", str(teacher), "--out", out, "--init", "warm"], "--init must be one of"),
        (["reflow", str(teacher), "--out", out, "--pairs", "0"], "--pairs must be"),
        (["reflow", str(teacher), "--out", out, "--pairs", "32"], "--pairs must be at least the batch size"),
        (["reflow", str(teacher), "--out", out, "--solver", "rk9"], "--solver must be one of"),
        (["reflow", str(tmp_path / "missing"), "--out", out], "does not exist"),
        (["reflow", str(teacher)], "--out"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    assert not os.path.exists(out)  # nothing written by a refused command
    # the pairs and steps of the test above: its compiled pair solve and student steps are reused
    assert main(["reflow", str(teacher), "--out", out, "--pairs", "256", "--steps", "100", "--no-progress",
                 "--no-plots", "--no-eval"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["reflow", str(teacher), "--out", out, "--pairs", "128", "--steps", "100"]) == 2
    assert "holds pairs of another reflow (differs in --pairs)" in capsys.readouterr().err

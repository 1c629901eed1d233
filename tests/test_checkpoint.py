"""orbax checkpoints of the training state: exact round trips, asynchronous saves, failed writes, and
setting aside unreadable checkpoints (one process and two)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import multihost_utils
from orbax.checkpoint._src.path import atomicity

from fmjax.checkpoint import Checkpointer
from fmjax.models import MLP, functional
from fmjax.paths import Linear
from fmjax.training import TrainState, make_train_step


def _train_step_and_states(key):
    """A donating train step, a state after 3 steps of it, and a fresh state of the same structure."""
    apply_fn, params = functional(MLP(dim=2, width=8, depth=2, seed=0))
    optimizer = optax.adamw(1e-2)
    state = TrainState.create(params=params, optimizer=optimizer, key=key)
    step = make_train_step(apply_fn, optimizer, path=Linear())  # donates its input state
    for _ in range(3):
        state, _ = step(state, jnp.zeros((16, 2)), jnp.ones((16, 2)))
    return step, state, TrainState.create(params=params, optimizer=optimizer, key=key)


def _host_copy(tree):
    """Host copies of the leaves (typed keys as their raw data), taken before any buffer is donated."""
    raw = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)
    return [np.array(x) for x in jax.tree.leaves(raw)]


def _is_key(x):
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _assert_bitwise(tree, expected):
    got = _host_copy(tree)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


def _snapshot(directory):
    """Every file under ``directory`` with its bytes."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def _small(step):
    return {"w": jnp.arange(6.0, dtype=jnp.float32) + step, "n": jnp.full((2, 3), step, jnp.int32)}


@pytest.mark.parametrize("key", [jax.random.PRNGKey(0), jax.random.key(0)], ids=["raw", "typed"])
def test_state_round_trips_bitwise(tmp_path, key):
    _, state, fresh = _train_step_and_states(key)
    expected = _host_copy(state)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state)
        restored = ckpt.restore(fresh)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    _assert_bitwise(restored, expected)


def test_keeps_the_newest_and_restores_by_step(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, {"w": jnp.full(2, float(step))})
        assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
        assert sorted(os.listdir(tmp_path)) == ["2", "3"]
        assert ckpt.restore({"w": jnp.zeros(2)}, step=2)["w"].tolist() == [2.0, 2.0]
        with pytest.raises(ValueError, match=r"step must be one of the saved steps \[2, 3\]"):
            ckpt.restore({"w": jnp.zeros(2)}, step=1)


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
    with Checkpointer(tmp_path) as ckpt, pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.restore({"w": jnp.zeros(2)})


def test_a_saved_step_is_never_overwritten(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _small(1))
        before = _snapshot(tmp_path)
        with pytest.raises(ValueError, match=r"step must not be one of the saved steps \[1\].*got 1"):
            ckpt.save(1, _small(2))
        assert _snapshot(tmp_path) == before and ckpt.all_steps() == [1]


# --- asynchronous saves -------------------------------------------------------------------------------


@pytest.fixture
def commit_hooks(monkeypatch):
    """``hooks[step] = async fn(commit)`` runs in place of orbax's commit of ``step`` (the rename of its
    finished temporary folder into place), in orbax's background thread; ``await commit()`` commits."""
    real = atomicity.on_commit_callback
    hooks = {}

    async def on_commit(tmp_dir, **kwargs):
        hook = hooks.get(int(tmp_dir.get_final().name))
        if hook is None:
            return await real(tmp_dir, **kwargs)
        return await hook(lambda: real(tmp_dir, **kwargs))

    monkeypatch.setattr(atomicity, "on_commit_callback", on_commit)
    return hooks


@pytest.mark.parametrize("key", [jax.random.PRNGKey(0), jax.random.key(0)], ids=["raw", "typed"])
def test_async_save_returns_before_the_commit_and_holds_the_values_at_the_call(tmp_path, commit_hooks, key):
    """The commit is held back until training has gone on with the donating step: save(wait=False)
    returned before the write was on disk, and the checkpoint holds the values at the call, bitwise."""
    train_step, state, fresh = _train_step_and_states(key)
    at_save = _host_copy(state)
    released = threading.Event()

    async def held(commit):
        assert released.wait(120)
        await commit()

    commit_hooks[3] = held
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(3, state, wait=False)
        assert ckpt.all_steps() == [] and ckpt.latest_step() is None  # not committed yet
        assert sorted(os.listdir(tmp_path)) == ["3.orbax-checkpoint-tmp"]
        for _ in range(2):  # the step donates the state's buffers and writes new values
            state, _ = train_step(state, jnp.zeros((16, 2)), jnp.ones((16, 2)))
        trained = _host_copy(state)
        assert any(a.tobytes() != b.tobytes() for a, b in zip(trained, at_save, strict=True))
        released.set()
        ckpt.wait()
        assert ckpt.all_steps() == [3] and ckpt.latest_step() == 3
        assert sorted(os.listdir(tmp_path)) == ["3"]
        _assert_bitwise(ckpt.restore(fresh), at_save)
        ckpt.save(5, state, wait=False)  # the state trained on is what the next checkpoint holds
        _assert_bitwise(ckpt.restore(fresh, step=5), trained)  # restore waits for the pending save
        assert ckpt.all_steps() == [3, 5]


def test_async_save_of_deleted_buffers(tmp_path):
    """The caller may even delete the saved arrays as soon as save(wait=False) returns."""
    state = {"w": jnp.arange(300_000, dtype=jnp.float32) * 0.5, "n": jnp.arange(7, dtype=jnp.int32)}
    at_save = _host_copy(state)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, wait=False)
        for leaf in jax.tree.leaves(state):
            leaf.delete()
        ckpt.wait()
        _assert_bitwise(ckpt.restore({"w": jnp.zeros(300_000), "n": jnp.zeros(7, jnp.int32)}), at_save)


def _intact_message(tmp_path, step, reason, intact):
    return (
        rf"^could not write checkpoint {step} in {re.escape(str(tmp_path))} \(.*{reason}.*\); "
        rf"the checkpoints already written are intact: {re.escape(str(intact))}$"
    )


@pytest.mark.parametrize("surfaces_at", ["wait", "save", "close"])
def test_a_failed_background_write_surfaces_at_the_next_call(tmp_path, commit_hooks, surfaces_at):
    """With max_to_keep=1 the failed step 2 would retire step 1: it must not, nor rename it."""
    ckpt = Checkpointer(tmp_path, max_to_keep=1)
    ckpt.save(1, _small(1))
    before = _snapshot(tmp_path / "1")

    async def full_disk(commit):
        raise OSError(28, "No space left on device")

    commit_hooks[2] = full_disk
    assert ckpt.save(2, _small(2), wait=False)  # the failure happens in the background
    with pytest.raises(OSError, match=_intact_message(tmp_path, 2, "No space left on device", [1])) as info:
        {"wait": ckpt.wait, "save": lambda: ckpt.save(3, _small(3)), "close": ckpt.close}[surfaces_at]()
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["1"]  # the temporary folder of 2 is gone, 3 was not saved
    assert _snapshot(tmp_path / "1") == before
    if surfaces_at == "close":
        ckpt = Checkpointer(tmp_path, max_to_keep=1)
    ckpt.wait()  # reported once
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    _assert_bitwise(ckpt.restore(_small(0)), _host_copy(_small(1)))
    del commit_hooks[2]
    ckpt.save(2, _small(2), wait=False)  # room again: saving carries on, and retires 1 once 2 is committed
    ckpt.close()
    assert sorted(os.listdir(tmp_path)) == ["2"]


def test_a_write_that_fails_after_its_commit_keeps_the_checkpoint(tmp_path, commit_hooks):
    """A failure after the rename into place (a barrier timing out on a multi-process run): step 2 was
    written completely, so it is reported and kept, not set aside."""

    async def late(commit):
        await commit()
        raise TimeoutError("Timed out while waiting for async_commit_complete barrier.")

    commit_hooks[2] = late
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        ckpt.save(1, _small(1))
        with pytest.raises(OSError, match=_intact_message(tmp_path, 2, "async_commit_complete", [1, 2])):
            ckpt.save(2, _small(2))
        assert sorted(os.listdir(tmp_path)) == ["1", "2"]
        _assert_bitwise(ckpt.restore(_small(0), step=2), _host_copy(_small(2)))


FULL_DISK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import jax.numpy as jnp
    from fmjax.checkpoint import Checkpointer

    directory, out = sys.argv[1:]
    ckpt = Checkpointer(directory, max_to_keep=None)
    result = {"started": []}
    try:
        for step in range(1, 40):
            ckpt.save(step, {"w": jnp.full(20_000, step, jnp.float32)}, wait=False)
            result["started"].append(step)
    except OSError as error:
        result["error"] = str(error)
    result["listing"] = sorted(os.listdir(directory))
    result["steps"] = ckpt.all_steps()
    result["read_back"] = [
        ckpt.restore({"w": jnp.zeros(20_000)}, step)["w"].tolist() == [float(step)] * 20_000
        for step in result["steps"]
    ]
    ckpt.close()
    with open(out, "w") as f:
        json.dump(result, f)
    """
)


def test_async_saves_on_a_full_disk(tmp_path):
    """A real full disk (a 300 KiB tmpfs in a private mount namespace) under asynchronous saves: the
    failure of step N surfaces at save N + 1 as the one-line OSError, no partial folder is left, and
    every checkpoint before N reads back."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if (
        shutil.which("unshare") is None
        or subprocess.run(
            ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mount}"], capture_output=True
        ).returncode
    ):
        pytest.skip("needs `unshare -rm` and tmpfs mounts (user namespaces) on this machine")
    (tmp_path / "full_disk.py").write_text(FULL_DISK_SCRIPT)
    run = f"{sys.executable} {tmp_path}/full_disk.py {mount}/ckpt {tmp_path}/result.json"
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=300k tmpfs {mount} && {run}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    failed = re.match(
        r"could not write checkpoint (\d+) in \S+ \((.*)\); .* intact: \[([\d, ]+)\]$", result["error"]
    )
    assert failed and "No space left on device" in failed.group(2), result["error"]
    failed_step = int(failed.group(1))
    intact = list(range(1, failed_step))
    assert len(intact) >= 1 and [int(s) for s in failed.group(3).split(",")] == intact
    assert result["started"] == intact + [failed_step]  # save N + 1 reported N and did not start
    assert result["steps"] == intact and result["listing"] == [str(s) for s in intact]
    assert result["read_back"] == [True] * len(intact)


# --- unreadable checkpoints ---------------------------------------------------------------------------


def _write_steps(directory, steps):
    with Checkpointer(directory, max_to_keep=None) as ckpt:
        for step in steps:
            ckpt.save(step, _small(step))


def _truncate(step_dir, names):
    """Truncate the files under ``step_dir`` named in ``names`` (all but the step metadata if None)."""
    for root, _, files in os.walk(step_dir):
        for name in files:
            if (name != "_CHECKPOINT_METADATA") if names is None else (name in names):
                open(os.path.join(root, name), "w").close()


@pytest.fixture
def no_collectives(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a collective in a single-process run")

    for name in ("broadcast_one_to_all", "sync_global_devices", "process_allgather"):
        monkeypatch.setattr(multihost_utils, name, refuse)


def test_unreadable_checkpoints_are_set_aside_and_the_newest_readable_restored(tmp_path, no_collectives):
    _write_steps(tmp_path, [1, 2, 3, 4])
    _truncate(tmp_path / "4", None)  # every file: its tree metadata too
    _truncate(tmp_path / "3", {"manifest.ocdbt"})  # its data
    (tmp_path / "4.corrupt").mkdir()  # set aside by an earlier run
    readable = {step: _snapshot(tmp_path / step) for step in ("1", "2")}
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        state, step, skipped = ckpt.restore_latest_good(_small(0))
        assert step == 2 and [s for s, _ in skipped] == [4, 3]
        assert all(reason and "\n" not in reason for _, reason in skipped)
        _assert_bitwise(state, _host_copy(_small(2)))
        assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
        assert sorted(os.listdir(tmp_path)) == ["1", "2", "3.corrupt", "4.corrupt", "4.corrupt1"]
        assert {step: _snapshot(tmp_path / step) for step in ("1", "2")} == readable
        ckpt.save(3, _small(30))  # the step set aside can be written again
        _assert_bitwise(ckpt.restore(_small(0)), _host_copy(_small(30)))


def test_readable_checkpoints_are_left_alone(tmp_path, no_collectives):
    _write_steps(tmp_path, [1, 2])
    before = _snapshot(tmp_path)
    with Checkpointer(tmp_path) as ckpt:
        state, step, skipped = ckpt.restore_latest_good(_small(0))
    assert step == 2 and skipped == []
    _assert_bitwise(state, _host_copy(_small(2)))
    assert _snapshot(tmp_path) == before


def test_no_readable_checkpoint_returns_the_target(tmp_path, no_collectives):
    _write_steps(tmp_path, [1, 2])
    for step in ("1", "2"):
        _truncate(tmp_path / step, None)
    target = _small(0)
    with Checkpointer(tmp_path) as ckpt:
        state, step, skipped = ckpt.restore_latest_good(target)
        assert state is target and step is None and [s for s, _ in skipped] == [2, 1]
        assert ckpt.all_steps() == [] and ckpt.latest_step() is None
    assert sorted(os.listdir(tmp_path)) == ["1.corrupt", "2.corrupt"]


@pytest.mark.parametrize(
    "target, needle",
    [
        (
            {"w": jnp.zeros(7), "n": jnp.zeros((2, 3), jnp.int32)},
            r"w is \(7,\) in target, \(6,\) in the checkpoint",
        ),
        ({"w": jnp.zeros(6)}, r"n is missing in target, \(2, 3\) in the checkpoint"),
    ],
    ids=["shape", "structure"],
)
def test_a_target_that_does_not_fit_renames_nothing(tmp_path, no_collectives, target, needle):
    _write_steps(tmp_path, [1, 2])
    before = _snapshot(tmp_path)
    with (
        Checkpointer(tmp_path) as ckpt,
        pytest.raises(ValueError, match=f"checkpoint 2 .*{needle}.*nothing was set aside"),
    ):
        ckpt.restore_latest_good(target)
    assert _snapshot(tmp_path) == before


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_both(processes, log_dir, timeout=300):
    """Wait for both processes; once one fails (its peer would wait in a collective), stop the other."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
        if any(p.returncode not in (None, 0) for p in processes):
            break
        time.sleep(0.1)
    for p in processes:
        if p.poll() is None:
            p.kill()
            p.wait()
    for i, p in enumerate(processes):
        assert p.returncode == 0, (log_dir / f"log{i}").read_text()[-3000:]


def test_two_processes_restore_the_step_process_0_chose(tmp_path):
    """Two processes (jax.distributed, gloo) share one directory: process 0 alone sets aside the
    unreadable checkpoints (a rename done twice would fail or leave a ``.corrupt1``), both restore the
    same step bitwise, then save asynchronously together."""
    directory = tmp_path / "ckpt"
    _write_steps(directory, [1, 2, 3, 4])
    _truncate(directory / "4", None)
    _truncate(directory / "3", {"manifest.ocdbt"})
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    script = os.path.join(os.path.dirname(__file__), "checkpoint_multiprocess.py")
    port = str(_free_port())
    processes = [
        subprocess.Popen(
            [sys.executable, script, str(directory), port, str(i), str(tmp_path / f"out{i}.json")],
            stdout=open(tmp_path / f"log{i}", "w"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
            env=env,
        )
        for i in range(2)
    ]
    _wait_both(processes, tmp_path)
    results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    for result in results:
        assert result["step"] == 2 and [s for s, _ in result["skipped"]] == [4, 3]
        assert result["state"] == {name: x.tobytes().hex() for name, x in _small(2).items()}
        assert result["saved_again"] == {name: (x + 1).tobytes().hex() for name, x in _small(2).items()}
        assert result["steps_after_restore"] == [1, 2]
        assert result["steps_while_pending"] == [1, 2] and result["steps_after_wait"] == [1, 2, 12]
    assert results[0]["skipped"] == results[1]["skipped"]
    assert sorted(os.listdir(directory)) == ["1", "12", "2", "3.corrupt", "4.corrupt"]


def test_the_error_leaving_the_block_is_not_replaced_by_closing(tmp_path):
    # orbax's manager can re-raise a failed background write when it is closed; the OSError already
    # reported (or any error leaving the with block) is the one the caller sees
    def raw_close():
        raise ValueError("RESOURCE_EXHAUSTED: raw tensorstore error")

    with pytest.raises(OSError, match="could not write checkpoint 7"):
        with Checkpointer(tmp_path) as ckpt:
            ckpt._manager.close = raw_close
            ckpt._reported = True
            raise OSError("could not write checkpoint 7 in somewhere")
    ckpt = Checkpointer(tmp_path / "b")
    ckpt._manager.close = raw_close
    with pytest.raises(OSError, match="could not finish writing checkpoints .*RESOURCE_EXHAUSTED"):
        ckpt.close()  # not reported before: one OSError naming the cause

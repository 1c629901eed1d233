"""One process of the two-process ``Checkpointer`` test in tests/test_checkpoint.py.

    python tests/checkpoint_multiprocess.py DIRECTORY PORT PROCESS_ID OUT_JSON

Both processes call ``restore_latest_good`` on DIRECTORY (its checkpoints hold ``{"w": float32[6],
"n": int32[2, 3]}``) into a state replicated over the two processes' devices, then save that state plus one
as step ``step + 10`` with ``wait=False``, wait, and read it back. OUT_JSON gets what this process saw, the
arrays as the hex of their bytes.
"""

import json
import sys

import jax
import numpy as np


def main(directory: str, port: int, process_id: int, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from fmjax.checkpoint import Checkpointer

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def zeros(shape, dtype):
        return jax.make_array_from_callback(shape, replicated, lambda index: np.zeros(shape, dtype)[index])

    def local_bytes(state):
        return {name: np.asarray(x.addressable_data(0)).tobytes().hex() for name, x in state.items()}

    target = {"w": zeros((6,), np.float32), "n": zeros((2, 3), np.int32)}
    with Checkpointer(directory, max_to_keep=None) as ckpt:
        state, step, skipped = ckpt.restore_latest_good(target)
        result = {"step": step, "skipped": [list(s) for s in skipped], "state": local_bytes(state)}
        result["steps_after_restore"] = ckpt.all_steps()
        ckpt.save(step + 10, jax.tree.map(lambda x: x + 1, state), wait=False)
        result["steps_while_pending"] = ckpt.all_steps()
        ckpt.wait()
        result["steps_after_wait"] = ckpt.all_steps()
        result["saved_again"] = local_bytes(ckpt.restore(target, step + 10))
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

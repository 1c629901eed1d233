"""Running the torch peers in their own interpreter (see benchmarks/README.md for how it is made)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

import numpy as np

PEER_SCRIPT = os.path.join(os.path.dirname(__file__), "peer_torch.py")


def peer_python(arg: str | None) -> str | None:
    """The peer interpreter: ``--peer-python``, else $FMJAX_PEER_PYTHON, else none."""
    return arg or os.environ.get("FMJAX_PEER_PYTHON") or None


def run_peer(python: str, job: str, cfg: dict, arrays: dict[str, np.ndarray]) -> dict:
    """Run ``peer_torch.py job`` with ``cfg`` and ``arrays`` (passed as an .npz); return its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "arrays.npz")
        np.savez(path, **arrays)
        cfg = {"threads": os.cpu_count(), **cfg}
        done = subprocess.run(
            [python, PEER_SCRIPT, job, json.dumps(cfg), path], capture_output=True, text=True, timeout=3600
        )
    if done.returncode != 0:
        raise RuntimeError(f"peer {job} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mlp_arrays(params, depth: int) -> dict[str, np.ndarray]:
    """An fmjax MLP's weights as flat arrays for the peer (kernels [in, out])."""
    arrays = {}
    for k in range(depth):
        arrays[f"hidden{k}_kernel"] = np.asarray(params["hidden"][k]["kernel"])
        arrays[f"hidden{k}_bias"] = np.asarray(params["hidden"][k]["bias"])
    arrays["out_kernel"] = np.asarray(params["out"]["kernel"])
    arrays["out_bias"] = np.asarray(params["out"]["bias"])
    return arrays

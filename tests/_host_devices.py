"""Run a Python script in a fresh process on simulated CPU host devices and read its result.

The device count of a JAX process is fixed when JAX starts, so tests of several devices run their
checks in a subprocess. The script prints its result as JSON on its last line of stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def run_json(*args: str, devices: int | None = None, timeout: float = 600) -> Any:
    """Run ``python *args`` (e.g. ``"-c", SCRIPT`` or a script's path) on the CPU backend with
    ``devices`` simulated host devices (None: the script sets its own), assert it exits 0 (showing the
    end of its stderr otherwise) and return the JSON of its last line of stdout."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])

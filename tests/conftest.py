import atexit
import os
import shutil
import tempfile

# One persistent XLA compilation cache for the whole test session, set before jax is imported so that this
# process, the xdist workers and every process a test starts (the CLI, scripts, notebook kernels) share it:
# a program compiled once (the same step in a second run, the same sampler in another test) is read back
# instead of compiled again. It lives in a fresh directory removed at exit: no result depends on an earlier
# session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE_DIR = tempfile.mkdtemp(prefix="fmjax-tests-xla-cache-")
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# Datasets are prepared into a directory of this process (each pytest-xdist worker has its own), so parallel
# workers never prepare one dataset into one directory at once and the tests never write to ~/.cache. A
# directory the user set in FMJAX_DATA_DIR is kept.
if "FMJAX_DATA_DIR" not in os.environ or os.environ.get("FMJAX_TESTS_DATA_DIR_PID", str(os.getpid())) != str(
    os.getpid()
):
    _DATA_DIR = tempfile.mkdtemp(prefix="fmjax-tests-tfds-")
    atexit.register(shutil.rmtree, _DATA_DIR, ignore_errors=True)
    os.environ["FMJAX_DATA_DIR"] = _DATA_DIR
    os.environ["FMJAX_TESTS_DATA_DIR_PID"] = str(os.getpid())

import jax  # noqa: E402
import pytest  # noqa: E402

# jax may already be imported (by a plugin) before this file runs: set the same options on its config too.
for _option, _kind in [
    ("jax_compilation_cache_dir", str),
    ("jax_persistent_cache_min_compile_time_secs", float),
    ("jax_persistent_cache_min_entry_size_bytes", int),
]:
    jax.config.update(_option, _kind(os.environ[_option.upper()]))


@pytest.fixture
def x64():
    """Run a test with float64 enabled, restoring the previous setting afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


_XLA_FLAGS_AT_START = os.environ.get("XLA_FLAGS")


def pytest_collection_finish(session):
    """Importing a test file must not change this process's devices (scripts set them under __main__)."""
    if os.environ.get("XLA_FLAGS") != _XLA_FLAGS_AT_START:
        raise pytest.UsageError(
            f"a collected file changed XLA_FLAGS from {_XLA_FLAGS_AT_START!r} to"
            f" {os.environ.get('XLA_FLAGS')!r}; set device counts only when a script runs as __main__"
        )

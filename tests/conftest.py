import os

import jax
import pytest


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

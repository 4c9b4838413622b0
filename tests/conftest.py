"""Test set-up: 8 fake CPU devices and TF kept off any accelerator."""
import os

import pytest

# Must be set before jax is first imported anywhere in the test process. Appended, so XLA_FLAGS from the environment
# keep their effect but never remove the 8 devices (XLA takes the last of a repeated flag).
# Backend optimisation level 0 cuts XLA:CPU compile time ~3x; the tests' models are tiny, so run time barely moves.
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
                                    "--xla_backend_optimization_level=0"]).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture
def processes():
  """A test_train_common.Processes: the subprocesses a test starts are killed when it ends, even on failure."""
  from tests import test_train_common  # noqa: PLC0415  (imports jax: after the environment above is set)
  with test_train_common.Processes() as started:
    yield started

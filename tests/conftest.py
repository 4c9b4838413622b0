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


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
  """Keeps each phase's report on the test item (item.report_call, ...), for fixtures that act on a failure."""
  report = yield
  setattr(item, f"report_{report.when}", report)
  return report


@pytest.fixture
def processes(request):
  """A test_train_common.Processes: the subprocesses a test starts are killed when it ends, even on failure. If the
  test failed, the end of every process's console output is printed (pytest shows it with the failure)."""
  from tests import test_train_common  # noqa: PLC0415  (imports jax: after the environment above is set)
  with test_train_common.Processes() as started:
    yield started
    if getattr(request.node, "report_call", None) is not None and request.node.report_call.failed:
      print(started.console_tails())

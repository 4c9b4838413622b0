"""Test set-up: 8 fake CPU devices and TF kept off any accelerator."""
import os

# Must be set before jax is first imported anywhere in the test process.
# Backend optimisation level 0 cuts XLA:CPU compile time ~3x; the tests' models are tiny, so run time barely moves.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

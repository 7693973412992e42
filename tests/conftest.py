"""Test set-up: 8 forced CPU devices for the sharding tests.

XLA reads the flag when the backend starts, so it must be set before jax is imported
anywhere; pytest imports conftest.py before the test modules.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

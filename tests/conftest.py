"""Test set-up: 8 forced CPU devices for the sharding tests.

XLA reads the flag when the backend starts, so it must be set before jax is imported
anywhere; pytest imports conftest.py before the test modules.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# tests/ mirrors the package (tests/losses, tests/models/hf, ...); test modules share
# helpers across those folders (tiny configs, fixture readers, the reference
# Transformer) by module name, so every test folder is importable from any test.
import pathlib
import sys

for _folder in sorted(p for p in pathlib.Path(__file__).resolve().parent.rglob("*")
                      if p.is_dir() and p.name not in ("fixtures", "__pycache__")
                      and "fixtures" not in p.parts):
  if str(_folder) not in sys.path:
    sys.path.append(str(_folder))

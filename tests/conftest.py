"""Test set-up: 8 forced CPU devices for the sharding tests.

XLA reads the flag when the backend starts, so it must be set before jax is imported
anywhere; pytest imports conftest.py before the test modules.
"""

import os

# The tests' programs are tiny: compiling them, not running them, is most of the
# suite's time, so XLA compiles without its backend's optimisation passes (LLVM's on
# the CPU). Measured on 2 cores: test_lora's resume test and test_scan_remat's variants
# test 99 s -> 60 s. The flags reach the TPU-target compiles too, whose tests check no
# figure that depends on them. Every comparison in the suite is between programs
# compiled the same way, or against a reference with a tolerance; set XLA_FLAGS
# yourself (even to "") to test with XLA's defaults. The subprocess tests' runs compile
# the same way (PDL_JAX_TEST_XLA_FLAGS, read by test_faults.env()).
os.environ.setdefault(
    "PDL_JAX_TEST_XLA_FLAGS",
    os.environ.get("XLA_FLAGS",
                   "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"))
os.environ["XLA_FLAGS"] = (
    os.environ["PDL_JAX_TEST_XLA_FLAGS"] + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache for the session, its subprocesses included: many
# tests compile the same tiny programs (a train step, a decoder) from new jit objects,
# which the in-memory cache does not share. A fresh folder per session keeps the tests
# independent of earlier runs (measured: tests/train/test_train.py and
# tests/models/test_lora.py 369 s -> 295 s on 2 cores, cold cache).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile

  _cache = tempfile.mkdtemp(prefix="pdl_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  # A size limit turns on the cache's file lock around every read and write: the
  # multi-process tests' processes compile the same programs at the same moment.
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)

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

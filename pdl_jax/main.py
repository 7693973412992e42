"""Runs one experiment: flags only (and jax.distributed set-up for several processes).

    python -m pdl_jax.main --config=configs/dialogue.py [--workdir=DIR]
    python -m pdl_jax.main --config=configs/dialogue.py:smoke --config.loss.alpha=0.25
    # two processes on one machine (CPU, gloo collectives):
    python -m pdl_jax.main --config=... --coordinator_address=127.0.0.1:12345 \
        --num_processes=2 --process_id=0   # and --process_id=1 in a second shell
"""

import os
import time

# TensorFlow (TFDS's reader) logs its oneDNN notice at start-up: keep the console to the
# run's own lines (before TensorFlow is imported anywhere).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


from pdl_jax.cli import platforms  # noqa: E402  (imports no jax)

platforms.pin_cpu_without_tpu()  # before jax is imported anywhere

from absl import app, flags, logging
from ml_collections import config_flags

from pdl_jax.cli import errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<task>.py[:args]")
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "output folder; default workdirs/<config>-<date-time>")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0, for multi-process runs outside TPU VMs (with "
    "--num_processes and --process_id); on TPU VM pods jax.distributed finds it itself")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")
_PLAN = flags.DEFINE_string(
    "plan", None, "a Cloud TPU slice (v5e-16, v5p-64, ...): compile this config's train "
    "and decode steps for it and print memory, fit and speed (nothing runs; needs "
    "libtpu: requirements-tpu.txt); see pdl_jax/cli/plan.py")
flags.mark_flag_as_required("config")


def init_distributed() -> None:
  """jax.distributed.initialize for multi-process runs; nothing on one process.

  Explicit flags win; otherwise a multi-worker TPU VM (TPU_WORKER_HOSTNAMES lists
  several hosts) is detected and JAX finds the coordinator itself.
  """
  import jax

  if _COORDINATOR.value or _NUM_PROCESSES.value:
    if None in (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value):
      raise app.UsageError("--coordinator_address, --num_processes and --process_id go "
                           "together.")
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    jax.distributed.initialize()


def default_workdir(config_arg: str, now: float | None = None) -> str:
  """workdirs/<config file stem>-<YYYYmmdd-HHMMSS> for `--config=path.py[:args]`."""
  stem = os.path.basename(config_arg.split(":", 1)[0]).removesuffix(".py")
  return os.path.join("workdirs", f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}")


def jax_process_count() -> int:
  import jax

  return jax.process_count()


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  if _PLAN.value:
    from pdl_jax.cli import plan

    print(plan.report(_CONFIG.value, _PLAN.value)[0], flush=True)
    return
  init_distributed()  # before any other JAX call
  from pdl_jax import multihost
  from pdl_jax.train import run as run_lib

  if _WORKDIR.value is None and jax_process_count() > 1:
    # Each host's clock would name its own folder: the processes must agree on one.
    raise app.UsageError("--workdir is required when the run has several processes "
                         "(the default name comes from this host's clock).")
  workdir = _WORKDIR.value or default_workdir(
      config_flags.get_config_filename(flags.FLAGS["config"]))
  print(f"workdir: {workdir}", flush=True)
  run_lib.train_and_evaluate(_CONFIG.value, workdir)
  multihost.shutdown()


if __name__ == "__main__":
  errors.run(main)

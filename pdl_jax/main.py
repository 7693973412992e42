"""Runs one experiment: flags only.

    python -m pdl_jax.main --config=configs/dialogue.py [--workdir=DIR]
    python -m pdl_jax.main --config=configs/dialogue.py:smoke --config.loss.alpha=0.25
"""

import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<task>.py[:args]")
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "output folder; default workdirs/<config>-<date-time>")
flags.mark_flag_as_required("config")


def default_workdir(config_arg: str, now: float | None = None) -> str:
  """workdirs/<config file stem>-<YYYYmmdd-HHMMSS> for `--config=path.py[:args]`."""
  stem = os.path.basename(config_arg.split(":", 1)[0]).removesuffix(".py")
  return os.path.join("workdirs", f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  from pdl_jax import train  # after flag parsing: keeps --help fast

  workdir = _WORKDIR.value or default_workdir(
      config_flags.get_config_filename(flags.FLAGS["config"]))
  print(f"workdir: {workdir}", flush=True)
  train.train_and_evaluate(_CONFIG.value, workdir)


if __name__ == "__main__":
  app.run(main)

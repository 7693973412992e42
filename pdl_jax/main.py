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


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  from pdl_jax import train  # after flag parsing: keeps --help fast

  workdir = _WORKDIR.value
  if workdir is None:
    name = os.path.splitext(os.path.basename(_CONFIG.value.get("config_file", "") or
                                             flags.FLAGS["config"].config_filename))[0]
    workdir = os.path.join("workdirs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
  print(f"workdir: {workdir}", flush=True)
  train.train_and_evaluate(_CONFIG.value, workdir)


if __name__ == "__main__":
  app.run(main)

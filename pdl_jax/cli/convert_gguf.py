"""GGUF file (or an offline model name) -> Hugging Face folder.

  python -m pdl_jax.cli.convert_gguf --gguf=model.gguf --out=DIR
  python -m pdl_jax.cli.convert_gguf --gguf=smollm2-135m-instruct --out=CACHE_DIR
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import flags

from pdl_jax.models.hf import gguf as gguf_lib
from pdl_jax.models.hf import offline
from pdl_jax.cli import errors

_GGUF = flags.DEFINE_string("gguf", None, "a GGUF file, or a name of "
                            f"{sorted(offline.OFFLINE_MODELS)}", required=True)
_OUT = flags.DEFINE_string("out", None, "output folder (must not exist); for a name, the "
                           "cache directory (the folder is <out>/models/<name>/hf)",
                           required=True)


def main(argv: Sequence[str]) -> None:
  """Converts and prints what was written."""
  del argv
  if offline.is_offline_name(_GGUF.value):
    print(f"resolving offline model {_GGUF.value!r} in cache {_OUT.value} ...", flush=True)
    out = offline.resolve(_GGUF.value, _OUT.value, is_primary=True, wait=lambda _: None)
  else:
    print(f"converting {_GGUF.value} ...", flush=True)
    out = gguf_lib.convert(_GGUF.value, _OUT.value)
  for name in sorted(os.listdir(out)):
    print(f"  {os.path.join(out, name)}  {os.path.getsize(os.path.join(out, name)):,} bytes")


if __name__ == "__main__":
  errors.run(main)

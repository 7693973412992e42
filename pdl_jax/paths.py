"""The path layer: every file the project reads or writes (workdir, init_from, the
tokenizer, token stats and weights, metrics, samples, config.json, exports) goes
through `path()`, an etils.epath Path, so that `gs://bucket/...` works as well as a
local folder (orbax uses the same layer for checkpoints). Writes are atomic: a
temporary name in the same folder, then a rename, so a reader never sees half a
file.
"""

from __future__ import annotations

import os
import uuid

from etils import epath

PathLike = str | os.PathLike


def path(p: PathLike) -> epath.Path:
  """`p` as an epath Path: local paths become absolute, cloud paths stay as given."""
  text = os.fspath(p)
  if "://" in text:
    return epath.Path(text)
  return epath.Path(os.path.abspath(text))  # orbax wants absolute local paths


def atomic_write_bytes(p: PathLike, data: bytes) -> None:
  """Writes data to `p` via a temporary name in the same folder and a rename."""
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
  try:
    tmp.write_bytes(data)
    tmp.replace(target)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def atomic_write_text(p: PathLike, text: str) -> None:
  """atomic_write_bytes of UTF-8 text."""
  atomic_write_bytes(p, text.encode("utf-8"))

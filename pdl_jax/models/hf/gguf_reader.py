"""Reading a GGUF file: open it with errors that name the file, read its metadata."""

from __future__ import annotations

import os
from typing import Any

import gguf

_MAGIC = b"GGUF"
_REQUIRED = object()


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
  """A GGUFReader of a local file, with errors that name the file.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a GGUF file (wrong magic), or truncated / corrupt.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such GGUF file.")
  with open(path, "rb") as f:
    head = f.read(4)
  if head != _MAGIC:
    raise ValueError(f"{path} is not a GGUF file: it starts with {head!r}, a GGUF file "
                     f"with {_MAGIC!r}" + (" (the file is empty or truncated)"
                                           if len(head) < 4 else "") + ".")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # the reader fails in many ways on a short file (reshape, index)
    raise ValueError(f"{path}: cannot read the GGUF file (truncated or corrupt?): "
                     f"{type(e).__name__}: {e}") from e
  # The reader memory-maps the file and may build tensors on a short tail without
  # noticing; check that every tensor's bytes lie inside the file.
  size = os.path.getsize(path)
  for t in reader.tensors:
    if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
      raise ValueError(f"{path}: truncated GGUF file: tensor {t.name!r} needs bytes up to "
                       f"{t.data_offset + t.n_bytes}, the file has {size}.")
  return reader


def metadata(reader: gguf.GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
  """The value of metadata `key` (a Python scalar, str or list); `default` when absent.

  Raises:
    ValueError: the key is absent and no default was given (names the key and file).
  """
  field = reader.fields.get(key)
  if field is None:
    if default is _REQUIRED:
      raise ValueError(f"{reader.data.filename}: GGUF metadata key {key!r} is missing.")
    return default
  value = field.contents()
  if field.types and field.types[0] == gguf.GGUFValueType.FLOAT32:
    # float32 metadata (1e-5 reads back as 9.99999974e-06): keep the decimal it came from.
    value = float(f"{value:.7g}")
  return value

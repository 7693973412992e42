"""pdl_jax/models/hf/export.py's file writing (the exports' parity is tested in
test_pretrained.py)."""

from __future__ import annotations

import os

import numpy as np
from etils import epath
from safetensors.numpy import load_file

from pdl_jax.models.hf import export as hf_export


def test_safetensors_files_are_readable_by_others(tmp_path):
  """safetensors writes 0600: an export in a shared folder was unreadable to others."""
  path = epath.Path(tmp_path) / "model.safetensors"
  hf_export.save_safetensors({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, path)
  assert os.stat(path).st_mode & 0o777 == 0o644
  np.testing.assert_array_equal(load_file(os.fspath(path))["w"], np.arange(6).reshape(2, 3))

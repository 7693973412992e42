"""Every file a run reads or writes goes through the one path layer (pdl_jax.paths.path).

The stand-in for a cloud filesystem: a `memfs://` scheme that only the path layer
resolves (to a local folder; orbax's TensorStore needs real absolute paths, as it
has for gs://). Any code that handles a run path itself (`open`, `os.path`,
`os.makedirs` on the raw string, as the project did before with gs:// workdirs)
hits the guard below and fails the test. A whole smoke run, its resume, init_from
and the frequency CLI run on it.
"""

import builtins
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from pdl_jax.cli import count_tokens
from pdl_jax.data import token_stats
from pdl_jax.train import run as run_lib
from pdl_jax import paths

from test_train import final_params, tiny_config

SCHEME = "memfs://"


@pytest.fixture
def memfs(tmp_path, monkeypatch):
  """Routes memfs://X to tmp_path/store/X in the path layer; raw memfs strings
  reaching open/os are an error."""
  store = tmp_path / "store"
  store.mkdir()
  real_path = paths.path

  def layer_path(p):
    text = os.fspath(p)
    if text.startswith(SCHEME):
      return real_path(str(store / text[len(SCHEME):]))
    return real_path(p)

  monkeypatch.setattr(paths, "path", layer_path)

  def guard(fn):
    def wrapped(p, *args, **kwargs):
      if isinstance(p, (str, bytes, os.PathLike)) and str(os.fspath(p)).startswith("memfs:"):
        raise AssertionError(f"{fn.__name__}({p!r}) bypassed the path layer")
      return fn(p, *args, **kwargs)
    return wrapped

  for module, name in ((builtins, "open"), (os, "makedirs"), (os, "listdir"),
                       (os, "remove"), (os, "replace"), (os, "rename"), (os, "stat"),
                       (os.path, "exists"), (os.path, "isdir"), (os.path, "isfile"),
                       (os.path, "abspath"), (shutil, "rmtree")):
    monkeypatch.setattr(module, name, guard(getattr(module, name)))
  return store


@pytest.fixture(autouse=True)
def mock_data():
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def test_smoke_run_resume_and_init_from_on_a_non_local_filesystem(memfs, monkeypatch):
  monkeypatch.chdir(memfs.parent)  # a stray relative "memfs:/..." would land here
  work = SCHEME + "bucket/run"
  run_lib.train_and_evaluate(tiny_config(steps_per_run=3), work)
  assert final_params(memfs / "bucket" / "run")[0] == 3
  result = run_lib.train_and_evaluate(tiny_config(), work)  # resumes at 3
  local = memfs / "bucket" / "run"
  assert final_params(local)[0] == 6
  assert {"config.json", "checkpoints", "metrics.jsonl", "tokenizer.model", "samples",
          "tensorboard"} <= set(os.listdir(local))
  steps = [json.loads(line)["step"] for line in open(local / "metrics.jsonl")
           if "train/loss" in line]
  assert steps == [2, 4, 6] and result["eval/nll"] > 0
  assert {"token_stats.npz", "loss_weights.npz"} <= set(os.listdir(local / "checkpoints"))
  # init_from and the frequency CLI take cloud paths too.
  ft = SCHEME + "bucket/ft"
  c = tiny_config(num_steps=1, eval_every=100)
  c.init_from = work
  run_lib.train_and_evaluate(c, ft)
  assert final_params(memfs / "bucket" / "ft")[0] == 1
  stats, _ = count_tokens.run_pass(tiny_config(), SCHEME + "bucket/freq")
  np.testing.assert_array_equal(
      token_stats.TokenStats.load(str(memfs / "bucket" / "freq" / "checkpoints")).counts,
      stats.counts)
  assert not os.path.exists(memfs.parent / "memfs:")  # nothing went around the layer


def test_the_guard_catches_a_bypass(memfs):
  with pytest.raises(AssertionError, match="bypassed the path layer"):
    open(SCHEME + "bucket/x.txt", "w")
  with pytest.raises(AssertionError, match="bypassed the path layer"):
    os.makedirs(SCHEME + "bucket/dir")

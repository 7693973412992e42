"""Task registry: defaults, hub names, prompt formatting, clear errors."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

import pdl_jax.data.builders  # noqa: F401  registers the offline builders
from pdl_jax.data import tasks as tasks_lib


def test_offline_defaults_are_registered_builders():
  registered = set(tfds.list_builders(with_community_datasets=False))
  for task, name in tasks_lib.DEFAULT_DATASET.items():
    spec = tasks_lib.get_dataset(task)
    assert spec.offline and spec is tasks_lib.TASKS[task][name]
    assert spec.tfds_name.split("/")[0] in registered
  # Hub datasets are TFDS builders too (they need the internet only to prepare).
  for name in ("cnn_dailymail", "xsum", "gem"):
    assert name in registered


def test_format_plain_and_with_context():
  spec = tasks_lib.get_dataset("summarization")
  prompt, target = spec.format({"inputs": b"A long text.", "targets": b"short"})
  assert prompt == "Summarize in one line:\nA long text." and target == "short"
  sgd = tasks_lib.get_dataset("dialogue", "gem/schema_guided_dialog")
  prompt, target = sgd.format({"context": np.array([b"hi", b"hello, how can I help?"]),
                               "prompt": b"book a table", "target": b"For when?"})
  assert prompt == "hi\nhello, how can I help?\nbook a table" and target == "For when?"
  assert tasks_lib.get_dataset("style_transfer", "gem/wiki_auto_asset_turk").splits["test"] == "test_asset"


def test_unknown_names_list_the_choices():
  with pytest.raises(ValueError, match=r"task 'poetry'.*\['dialogue', 'style_transfer', 'summarization'\]"):
    tasks_lib.get_dataset("poetry")
  with pytest.raises(ValueError, match=r"'xsum' is not available for task 'dialogue'.*shakespeare_dialogue"):
    tasks_lib.get_dataset("dialogue", "xsum")

"""The tune split (config.dataset.tune_examples, config.eval.split="tune"): train
examples held out of the train split (whole groups, as the builders split), for choosing a setting such as the
learning rate off the validation prompts the results report. Read through a real
(tiny) TFDS dataset: tfds's mock_data ignores split slices."""

from __future__ import annotations

import os

import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import common
from pdl_jax import config_checks
from pdl_jax.data import sources
from pdl_jax.data import tasks as tasks_lib
from pdl_jax.train import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny TFDS dataset: 20 train examples in 7 groups (sizes 1 to 5), 5 validation;
  (spec without groups, spec with them, data_dir)."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  groups = [g for g, n in zip("abcdefg", (5, 1, 4, 2, 3, 2, 3)) for _ in range(n)]

  def split(n, tag):
    return tf.data.Dataset.from_tensor_slices({
        "inputs": [f"{tag} p{i}" for i in range(n)],
        "targets": [f"{tag} t{i}" for i in range(n)],
        "group": (groups if tag == "train" else ["v"] * n)})

  tfds.dataset_builders.TfDataBuilder(
      name="tiny_pairs", version="1.0.0", data_dir=data_dir,
      split_datasets={"train": split(20, "train"), "validation": split(5, "valid")},
      features=tfds.features.FeaturesDict({"inputs": tfds.features.Text(),
                                           "targets": tfds.features.Text(),
                                           "group": tfds.features.Text()}),
  ).download_and_prepare()
  spec = tasks_lib.DatasetSpec(tfds_name="tiny_pairs", inputs_key="inputs",
                               targets_key="targets", prompt="{inputs}", offline=True)
  grouped = tasks_lib.DatasetSpec(tfds_name="tiny_pairs", inputs_key="inputs",
                                  targets_key="targets", prompt="{inputs}", offline=True,
                                  group_keys=("group",))
  return spec, grouped, data_dir


def test_tune_holds_out_whole_groups(tiny):
  """As the builders split: no group straddles train and tune (a tune prompt never
  has a near-duplicate or a neighbouring turn among the training targets)."""
  _, grouped, data_dir = tiny
  load = lambda split, **kw: sources.load_texts(grouped, split, data_dir=data_dir, **kw)
  group_of = dict(zip(*[[f"train p{i}" for i in range(20)],
                        [g for g, n in zip("abcdefg", (5, 1, 4, 2, 3, 2, 3))
                         for _ in range(n)]]))
  everything = load("train")
  for holdout in (1, 4, 6):
    kept, tune = load("train", holdout=holdout), load("tune", holdout=holdout)
    assert sorted(kept[0] + tune[0]) == sorted(everything[0])
    assert len(tune[0]) >= holdout and kept[0]
    assert not {group_of[p] for p in tune[0]} & {group_of[p] for p in kept[0]}
    # The held-out groups are sources.held_out_groups's, in the split's order.
    want = sources.held_out_groups([group_of[p] for p in everything[0]], holdout)
    assert [p for p in everything[0] if group_of[p] in want] == tune[0]
    assert load("tune", holdout=holdout, limit=1) == (tune[0][:1], tune[1][:1])
  assert load("validation", holdout=4) == load("validation")
  with pytest.raises(ValueError, match="groups would all be held out"):
    load("tune", holdout=19)


def test_held_out_groups_stop_once_enough_are_held():
  groups = ["x"] * 10 + ["y"] * 3 + ["z"] * 2
  order = sorted("xyz", key=lambda g: __import__("hashlib").sha256(
      f"tune:{g}".encode()).hexdigest())
  first = sources.held_out_groups(groups, 1)
  assert first == {order[0]}
  sizes = {"x": 10, "y": 3, "z": 2}
  two = sources.held_out_groups(groups, sizes[order[0]] + 1)
  assert two == set(order[:2])


def test_without_groups_tune_is_the_train_splits_end(tiny):
  spec, _, data_dir = tiny
  load = lambda split, **kw: sources.load_texts(spec, split, data_dir=data_dir, **kw)
  everything = load("train")
  kept, tune = load("train", holdout=4), load("tune", holdout=4)
  assert len(kept[0]) == 16 and len(tune[0]) == 4
  assert kept[0] + tune[0] == everything[0] and kept[1] + tune[1] == everything[1]
  # A limit takes the first examples of each part; validation is untouched.
  assert load("tune", holdout=4, limit=3) == (tune[0][:3], tune[1][:3])
  assert load("train", holdout=4, limit=5) == (kept[0][:5], kept[1][:5])
  assert load("validation", holdout=4) == load("validation")
  with pytest.raises(ValueError, match="tune_examples=20: the tiny_pairs train split has "
                                       "20 examples; hold out fewer"):
    load("tune", holdout=20)
  with pytest.raises(ValueError, match="needs config.dataset.tune_examples >= 1"):
    load("tune")


def test_tune_settings_are_checked_and_fingerprinted():
  from configs import summarization
  c = summarization.get_config("smoke")
  assert c.dataset.tune_examples == 0 and c.eval.split == "validation"
  c.eval.split = "tune"
  with pytest.raises(ValueError, match="eval.split='tune' evaluates train examples held "
                                       "out by config.dataset.tune_examples, which is 0"):
    config_checks.validate_config(c)
  c.dataset.tune_examples = 512
  config_checks.validate_config(c)
  c.eval.split = "test"
  with pytest.raises(ValueError, match=r"eval.split='test'; expected one of "
                                       r"\('validation', 'tune'\)"):
    config_checks.validate_config(c)
  c.eval.split = "validation"
  c.dataset.tune_examples = -1
  with pytest.raises(ValueError, match="tune_examples=-1; expected an integer >= 0"):
    config_checks.validate_config(c)
  files = common.parse_arg(summarization.get_config("smoke"), "dataset=files")
  files.dataset.train = os.path.join(ROOT, "examples", "support_summaries.jsonl")
  files.dataset.tune_examples = 8
  with pytest.raises(ValueError, match="give the tuning examples as "
                                       "config.dataset.validation"):
    config_checks.validate_config(files)
  # Holding examples out changes the training data: in the fingerprint, only when set.
  class Tok:
    sha256, vocab_size = "t", 10
  plain = summarization.get_config("smoke")
  held = summarization.get_config("smoke")
  held.dataset.tune_examples = 512
  assert "tune_examples" not in provenance.fingerprint(plain, Tok(), {})
  assert provenance.fingerprint(held, Tok(), {})["tune_examples"] == 512
  # And in the settings the stored token stats were counted with (a reused workdir's
  # stats of the whole train split are refused).
  from pdl_jax.data import token_stats
  from pdl_jax.train import run as run_lib
  assert "tune_examples" not in token_stats.count_settings(run_lib.data_settings(plain))
  assert token_stats.count_settings(run_lib.data_settings(held))["tune_examples"] == 512


def test_sampled_decodings_take_the_first_prompts():
  from pdl_jax.eval import evaluator as evaluator_lib
  from configs import dialogue
  e = dialogue.get_config("smoke").eval
  assert evaluator_lib.num_prompts(e, "top_p", 1024) == 1024  # None: all
  e.sampled_examples = 256
  assert [evaluator_lib.num_prompts(e, m, 1024) for m in
          ("greedy", "greedy_bias0.25", "beam", "top_p", "top_p_bias0.5")] == [
              1024, 1024, 1024, 256, 256]
  assert evaluator_lib.num_prompts(e, "top_p", 100) == 100
  e.sampled_examples = 0
  with pytest.raises(ValueError, match="eval.sampled_examples=0; expected an integer >= 1"):
    evaluator_lib.check(e)


def test_offline_datasets_name_their_builders_group_features(tmp_path):
  """The tune split holds out the groups each builder splits by: its group_keys are
  features of the builder (read from its info: nothing is built)."""
  import pdl_jax.data.builders  # noqa: F401  registers the offline builders
  for task, specs in tasks_lib.TASKS.items():
    for name, spec in specs.items():
      if not spec.offline:
        continue
      features = tfds.builder(spec.tfds_name, data_dir=str(tmp_path)).info.features
      assert spec.group_keys and set(spec.group_keys) <= set(features), (task, name)

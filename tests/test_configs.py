"""Config files: get_config(arg) parsing, smoke, validation, a comment on every field."""

import importlib
import os
import re

import pytest

from configs import common
from pdl_jax import train

CONFIGS = ("summarization", "dialogue", "style_transfer", "pretrain")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_load_validate_and_parse_args(name):
  module = importlib.import_module(f"configs.{name}")
  c = module.get_config()
  train.validate_config(c)
  assert c.task == ("pretrain" if name == "pretrain" else name)
  smoke = module.get_config("smoke,loss=ce,alpha=0.25,seed=3")
  assert smoke.model.preset == "tiny" and smoke.num_steps < c.num_steps
  assert (smoke.loss.name, smoke.loss.alpha, smoke.seed) == ("ce", 0.25, 3)
  train.validate_config(smoke)


def test_dataset_and_bool_args():
  from configs import style_transfer
  c = style_transfer.get_config("dataset=bible_style/web_to_kjv,chunked=true")
  assert c.dataset.name == "bible_style/web_to_kjv" and c.loss.chunked is True
  with pytest.raises(ValueError, match=r"'lr=3' is unknown.*'alpha'"):
    style_transfer.get_config("lr=3")
  with pytest.raises(ValueError, match="true or false"):
    style_transfer.get_config("chunked=maybe")


def test_every_config_field_has_a_comment():
  for name in ("common",) + CONFIGS:
    with open(os.path.join(ROOT, "configs", f"{name}.py")) as f:
      for line in f:
        if line.startswith("def apply_smoke"):
          break  # overrides of fields documented above
        if re.match(r"\s+c\.[\w.]+ = ", line):
          assert "#" in line, f"configs/{name}.py: no comment on: {line.strip()}"


def test_sweeps_are_defined_next_to_task_configs():
  for name in ("summarization", "dialogue", "style_transfer"):
    c = importlib.import_module(f"configs.{name}").get_config()
    assert len(c.sweep.alphas) >= 4 and 0.0 in c.sweep.alphas
  assert set(common.ARG_KEYS) >= {"loss", "alpha", "dataset"}


def test_default_workdir_name():
  from pdl_jax import main
  name = main.default_workdir("configs/dialogue.py:smoke,alpha=0.5", now=0)
  assert name.startswith(os.path.join("workdirs", "dialogue-19"))

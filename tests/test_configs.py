"""Config files: get_config(arg) parsing, smoke, validation, a comment on every field."""

import importlib
import os
import re

import pytest

from configs import common
from pdl_jax import config_checks
from pdl_jax.train import run as run_lib

CONFIGS = ("summarization", "dialogue", "style_transfer", "pretrain")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_load_validate_and_parse_args(name):
  module = importlib.import_module(f"configs.{name}")
  c = module.get_config()
  config_checks.validate_config(c)
  assert c.task == ("pretrain" if name == "pretrain" else name)
  smoke = module.get_config("smoke,loss=ce,alpha=0.25,seed=3")
  own = module.get_config("pretrained=none")  # what smoke shrinks: the own model's run
  assert smoke.model.preset == "tiny" and smoke.num_steps < own.num_steps
  assert (smoke.loss.name, smoke.loss.alpha, smoke.seed) == ("ce", 0.25, 3)
  config_checks.validate_config(smoke)


def test_dataset_and_bool_args():
  from configs import style_transfer
  c = style_transfer.get_config("dataset=bible_style/web_to_kjv,chunked=true")
  assert c.dataset.name == "bible_style/web_to_kjv" and c.loss.chunked is True
  with pytest.raises(ValueError, match=r"'alpah=3' is unknown \(did you mean 'alpha'\?\)"):
    style_transfer.get_config("alpah=3")
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
    own = importlib.import_module(f"configs.{name}").get_config("pretrained=none")
    assert len(own.sweep.alphas) >= 3 and own.sweep.include_ce and tuple(own.sweep.seeds) == (0, 1)
    assert len(own.sweep.baselines) == len(common.BASELINES)
    # The real model's comparison: every task the full set, with the recent baselines
    # (DFT, GEM, MiLe) of the control issue.
    real = importlib.import_module(f"configs.{name}").get_config()
    assert real.sweep.include_ce and tuple(real.sweep.seeds) == (0, 1)
    assert tuple(real.sweep.eos_weight_alphas) == (0.5,)
    assert tuple(real.sweep.alphas) == (0.25, 0.5, 1.0)
    assert set(real.sweep.baselines) == set(common.BASELINES) | set(common.RECENT_BASELINES)
    assert tuple(real.sweep.ce_decodes) == common.CE_CONTROL_DECODES
  assert set(common.ARG_KEYS) >= {"loss", "alpha", "dataset"}


def test_default_workdir_name():
  from pdl_jax import main
  name = main.default_workdir("configs/dialogue.py:smoke,alpha=0.5", now=0)
  assert name.startswith(os.path.join("workdirs", "dialogue-19"))


# A value for every key a config argument may set, and what it must become.
ARG_VALUES = {
    "loss": ("ce", "ce"), "alpha": ("0.25", 0.25), "epsilon": ("1e-7", 1e-7),
    "dataset": ("bible_style/web_to_kjv", "bible_style/web_to_kjv"),
    "model": ("tiny", "tiny"), "steps": ("12", 12), "seed": ("3", 3),
    "batch_size": ("8", 8), "init_from": ("gs://bucket/pretrain", "gs://bucket/pretrain"),
    "chunked": ("true", True), "decode": ("top_p", "top_p"),
    "pretrained": ("gs://bucket/Qwen2.5-0.5B", "gs://bucket/Qwen2.5-0.5B"),
    "reduction": ("tokens", "tokens"), "eos_weight": ("1", 1.0), "lr": ("1e-4", 1e-4),
}


@pytest.mark.parametrize("key", sorted(common.ARG_KEYS))
def test_every_config_argument_key_parses(key):
  from configs import style_transfer
  text, want = ARG_VALUES[key]
  c = style_transfer.get_config(f"{key}={text}")
  node = c
  *path, last = common.ARG_KEYS[key].split(".")
  for part in path:
    node = node[part]
  assert node[last] == want and type(node[last]) is type(want)
  if key in ("epsilon", "init_from", "pretrained", "reduction", "eos_weight"):  # None-able
    node = style_transfer.get_config(f"{key}=none")
    for part in path:
      node = node[part]
    assert node[last] is None


def test_config_argument_values_of_the_wrong_type_name_the_item():
  from configs import style_transfer
  with pytest.raises(ValueError, match=r"'epsilon=tiny'.*expected float"):
    style_transfer.get_config("epsilon=tiny")
  with pytest.raises(ValueError, match=r"'steps=1.5'.*expected int"):
    style_transfer.get_config("steps=1.5")


def test_every_arg_key_has_a_test_value():
  assert set(ARG_VALUES) == set(common.ARG_KEYS)


@pytest.mark.parametrize("name", ("summarization", "dialogue", "style_transfer"))
def test_task_configs_finetune_the_real_model_by_default(name):
  module = importlib.import_module(f"configs.{name}")
  c = module.get_config()
  assert c.model.pretrained == common.DEFAULT_PRETRAINED == "smollm2-135m-instruct"
  assert c.optimizer.learning_rate < 1e-3 and run_lib.eval_at_start(c)
  assert c.data.prompt_format is None  # chat, since the model has a template
  # PDL's default alpha on the real base is the evidence's (docs/results.md): 0.25;
  # the own model keeps 0.5; an argument or flag still sets it.
  assert c.loss.alpha == 0.25 and module.get_config("alpha=0.5").loss.alpha == 0.5
  assert module.get_config("pretrained=none").loss.alpha == 0.5
  own = common.get_base_config(name)
  for arg in ("pretrained=none", "smoke", "init_from=workdirs/pretrain", "model=base"):
    o = module.get_config(arg)
    assert o.model.pretrained is None, arg
    assert o.optimizer.learning_rate == own.optimizer.learning_rate and not \
        run_lib.eval_at_start(o), arg
  assert module.get_config("pretrained=none").seq_len == 128
  both = module.get_config("init_from=workdirs/ft,pretrained=smollm2-135m-instruct")
  assert both.model.pretrained == "smollm2-135m-instruct" and both.init_from == "workdirs/ft"
  assert importlib.import_module("configs.pretrain").get_config().model.pretrained is None


def test_bfloat16_params_are_refused_for_training():
  """AdamW on bfloat16 weights loses every update below a weight's spacing: the model
  would not train, silently. The config check refuses it and names the fix."""
  import jax.numpy as jnp
  import optax
  w = {"w": jnp.ones((4,), jnp.bfloat16)}
  tx = optax.adamw(1e-5)
  updates, _ = tx.update({"w": jnp.ones((4,), jnp.bfloat16)}, tx.init(w), w)
  assert (optax.apply_updates(w, updates)["w"] == 1).all()  # the step is lost in bf16
  w32 = {"w": jnp.ones((4,), jnp.float32)}
  updates, _ = tx.update({"w": jnp.ones((4,), jnp.float32)}, tx.init(w32), w32)
  assert (optax.apply_updates(w32, updates)["w"] < 1).all()  # float32 master weights move
  from configs import dialogue
  c = dialogue.get_config("smoke")
  c.model.param_dtype = "bfloat16"
  with pytest.raises(ValueError, match=r"param_dtype='bfloat16' does not train.*"
                                       r"model.dtype='bfloat16'"):
    config_checks.validate_config(c)


@pytest.mark.parametrize("bucket", [-1, True])
def test_bad_eval_length_bucket_is_refused(bucket):
  from configs import dialogue
  c = dialogue.get_config("smoke")
  c.eval.length_bucket = bucket
  with pytest.raises(ValueError, match=rf"eval.length_bucket={bucket!r}; expected an "
                                       r"integer >= 0"):
    config_checks.validate_config(c)


def test_long_and_tune_arguments():
  """`long`: the comparison's 600-step budget; `tune`: evaluate on the held-out tune
  split, for the learning rate (`lr=`) of a budget."""
  from configs import summarization
  long = summarization.get_config("long")
  assert (long.num_steps, long.eval.num_examples, long.eval.sampled_examples) == (600, 1024, 256)
  assert not run_lib.eval_at_start(long) and long.eval.split == "validation"
  assert long.sweep.ce_decodes == common.CE_CONTROL_DECODES and long.sweep.alphas == (0.25,)
  tune = summarization.get_config("long,tune,lr=1e-4")
  assert (tune.num_steps, tune.optimizer.learning_rate) == (600, 1e-4)
  assert (tune.eval.split, tune.dataset.tune_examples, tune.eval.extra_decodes) == (
      "tune", 512, ())
  assert tuple(tune.sweep.seeds) == (0,) and tune.sweep.ce_decodes == ()
  config_checks.validate_config(long)
  config_checks.validate_config(tune)
  with pytest.raises(ValueError, match=r"names \['smoke', 'long'\]; give at most one"):
    summarization.get_config("smoke,long")
  with pytest.raises(ValueError, match="'long' is the real-model comparison's longer budget"):
    summarization.get_config("long,pretrained=none")
  # The words apply in one order whatever their place; key=value items after them.
  assert summarization.get_config("tune,long,lr=1e-4").to_dict() == tune.to_dict()
  assert summarization.get_config("steps=10,quick").num_steps == 10


@pytest.mark.parametrize("date", ["tomorrow", "2026-13-01", "01/01/2026", "20260101",
                                  "2026-W01-1"])
def test_bad_chat_date_is_refused(date):
  from configs import dialogue
  c = dialogue.get_config("smoke")
  c.data.chat_date = date
  with pytest.raises(ValueError, match=rf"data.chat_date={date!r}; expected a date as "
                                       r"YYYY-MM-DD"):
    config_checks.validate_config(c)


def test_the_gpu_requirements_are_the_cpu_set_plus_the_cuda_plugin_at_the_jax_pin():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "requirements.txt")) as f:
    cpu = dict(l.strip().split("==") for l in f if "==" in l and not l.startswith("#"))
  with open(os.path.join(root, "requirements-gpu.txt")) as f:
    gpu = [l.strip() for l in f if l.strip() and not l.startswith("#")]
  assert gpu == ["-r requirements.txt", f"jax[cuda12]=={cpu['jax']}"]
  assert cpu["jaxlib"] == cpu["jax"]


def test_long_budget_commands_in_the_docs_name_points_of_their_sweep():
  """docs/experiments.md's sweep commands for the longer budget pick points (--only) that
  their config's sweep has: the tune command named `dft`, which `long` did not run
  (sweep.py refused it), before `long` ran its best recent baseline, MiLe."""
  from configs import summarization
  from experiments import sweep
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "docs", "experiments.md")) as f:
    text = f.read()
  found = re.findall(r"--config=configs/summarization\.py:(\S+)\s*\\?\s*"
                     r"--root=\S+\s+--only=(\S+)", text)
  assert len(found) == 2, found
  for arg, only in found:
    every = [(folder, []) for folder, _ in sweep.points(summarization.get_config(
        arg.replace("$lr", "1e-4")))]
    assert sweep.select(every, only), (arg, only)
  assert [p for p, _ in sweep.points(summarization.get_config("long"))] == [
      "ce-seed0", "alpha0.25-seed0", "mile-seed0", "ce-seed1", "alpha0.25-seed1",
      "mile-seed1"]

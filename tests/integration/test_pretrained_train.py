"""A pretrained (tiny, random, Hugging Face layout) model finetuned with PDL through
the CLI, exported, and its export's logits compared with the trained params'; bad
pretrained inputs are clear errors before any training."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from pdl_jax import config_checks
from pdl_jax.train import run as run_lib
from pdl_jax.models import decoder
from pdl_jax.models.hf import families as hf_families
from pdl_jax.models.hf import weights as hf_weights

from test_faults import ROOT, command, data_dir, env, params_and_steps  # noqa: F401
from test_train import tiny_config

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf", "qwen2")


def test_finetune_export_and_reload_through_the_cli(data_dir, tmp_path):  # noqa: F811
  work, out = tmp_path / "run", tmp_path / "export"
  cmd = command(work, data_dir, "--config.num_steps=4", "--config.checkpoint_every=4",
                "--config.eval_every=4", "--config.log_every=2")
  cmd[3] = f"--config=configs/dialogue.py:smoke,pretrained={FIXTURE},alpha=0.5"
  done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  assert "initialised params from the pretrained" in done.stderr
  assert not (work / "tokenizer.model").exists()  # the model's own tokenizer, not trained
  # A pretrained model is evaluated before the first step: the base model's row.
  records = [json.loads(line) for line in open(work / "metrics.jsonl")]
  evals = [r["step"] for r in records if "eval/nll" in r]
  assert evals == [0, 4], evals
  assert "eval at step 0" in done.stderr
  exp = subprocess.run([sys.executable, "-m", "pdl_jax.cli.export_hf", f"--workdir={work}",
                        f"--out={out}"], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=300)
  assert exp.returncode == 0, exp.stderr[-3000:]
  assert {"config.json", "tokenizer.json"} <= set(os.listdir(out))
  assert json.load(open(out / "config.json"))["model_type"] == "qwen2"
  step, trained = params_and_steps(work)
  assert step == 4
  original = hf_weights.load_params(FIXTURE, hf_families.read_config(FIXTURE))
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(original)))
  assert moved > 0  # four steps of PDL changed the params
  tokens = np.random.default_rng(0).integers(0, 200, (2, 12)).astype(np.int32)
  model = decoder.Decoder(hf_families.read_config(FIXTURE))
  want = np.asarray(model.apply({"params": trained}, tokens)[0])
  got = hf_weights.logits(str(out), tokens)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.fixture
def mock_data():
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def pretrained_config(model_dir):
  c = tiny_config(**{"num_steps": 2, "eval_every": 100})
  c.model.pretrained = str(model_dir)
  return c


def test_bad_pretrained_inputs_fail_before_training(mock_data, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="empty' has no config.json"):
    run_lib.train_and_evaluate(pretrained_config(empty), str(tmp_path / "w0"))
  moe = tmp_path / "moe"
  shutil.copytree(FIXTURE, moe)
  cfg = json.load(open(moe / "config.json"))
  json.dump({**cfg, "model_type": "mixtral"}, open(moe / "config.json", "w"))
  with pytest.raises(ValueError, match="mixtral"):
    run_lib.train_and_evaluate(pretrained_config(moe), str(tmp_path / "w1"))
  # Found by the config check, before any dataset is built or tokenizer loaded.
  with pytest.raises(ValueError, match=r"config.model.pretrained=.*moe.*'mixtral' is not"):
    config_checks.validate_config(pretrained_config(moe))
  small = tmp_path / "small"
  shutil.copytree(FIXTURE, small)
  json.dump({**cfg, "vocab_size": 50}, open(small / "config.json", "w"))
  with pytest.raises(ValueError, match="more than the 50 embedding rows"):
    run_lib.train_and_evaluate(pretrained_config(small), str(tmp_path / "w2"))
  no_eos = tmp_path / "no_eos"  # no EOS anywhere: eos would be -1, the last row
  shutil.copytree(FIXTURE, no_eos)
  for name in ("tokenizer_config.json", "generation_config.json", "config.json"):
    d = json.load(open(no_eos / name))
    d.pop("eos_token", None)
    d.pop("eos_token_id", None)
    json.dump(d, open(no_eos / name, "w"))
  with pytest.raises(ValueError, match="no_eos.* has no EOS token"):
    run_lib.train_and_evaluate(pretrained_config(no_eos), str(tmp_path / "w3"))
  for w in ("w0", "w1", "w2", "w3"):
    assert not (tmp_path / w / "checkpoints").exists()  # refused before any training

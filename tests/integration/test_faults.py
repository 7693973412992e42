"""Failure behaviour, for real: SIGKILL at several points and resume, SIGTERM,
non-finite steps, bad configs, bad data, a mismatched workdir.

The subprocess tests run `python -m pdl_jax.main` on a small dialogue corpus built
here (synthetic plays in the real Gutenberg format) with the real TFDS builder.
"""

import json
import os
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from pdl_jax.train import checkpoint as ckpt_lib
from pdl_jax.data import batches as batches_lib
from pdl_jax.data import examples as examples_lib
from pdl_jax.train import run as run_lib
from pdl_jax.data.builders import shakespeare_dialogue
from pdl_jax.models import factory

from test_frequency import make_texts

# The tests/ folder (this file is 1 level below it): shared fixtures live there.
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROOT = os.path.dirname(TESTS)


def synthetic_play(seed: int, scenes: int = 4, turns: int = 40) -> str:
  """A play in the *_gut.txt format: front matter, acts, scenes, speaker turns."""
  lines = ["A PLAY", "", "by Nobody", "", "PERSONS REPRESENTED.", "", "ALPHA, a lord.", ""]
  speeches = iter(make_texts(scenes * turns, seed))
  speakers = ["ALPHA.", "BETA.", "GAMMA.", "DELTA."]
  for s in range(scenes):
    lines += ["", f"ACT {'I' * (s + 1)}.", "", f"SCENE I. Place {seed} {s}.", "",
              "[Enter ALPHA and BETA.]", ""]
    for t in range(turns):
      lines += [speakers[(t + s) % 4], next(speeches).capitalize() + ".", ""]
  return "\n".join(lines)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """shakespeare_dialogue built from three synthetic plays with the real builder."""
  src = tmp_path_factory.mktemp("plays")
  for i, name in enumerate(("tempest", "macbeth", "romeo_and_juliet")):
    (src / f"{name}_gut.txt").write_text(synthetic_play(i))
  out = tmp_path_factory.mktemp("tfds")
  mp = pytest.MonkeyPatch()
  mp.setattr(shakespeare_dialogue, "MIN_PLAYS", 3)
  mp.setattr(shakespeare_dialogue, "MIN_PER_SPLIT", 10)
  try:
    import pdl_jax.data.builders  # noqa: F401
    builder = tfds.builder("shakespeare_dialogue", data_dir=str(out))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(src)))
  finally:
    mp.undo()
  return str(out)


def command(workdir, data_dir, *extra):
  return [sys.executable, "-m", "pdl_jax.main", "--config=configs/dialogue.py:smoke",
          f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}",
          "--config.mesh.data=1", "--config.num_steps=40", "--config.log_every=5",
          "--config.checkpoint_every=10", "--config.eval_every=40",
          "--config.eval.num_examples=8", "--config.eval.batch_size=8",
          "--config.eval.max_new_tokens=4", "--config.tokenizer.vocab_size=200",
          "--config.dataset.max_train_examples=400", "--config.keep_checkpoints=10",
          *extra]


def env():
  e = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  # One CPU device in the subprocesses (the last count flag wins: a caller may append
  # another), compiled as the suite compiles (conftest.py).
  e["XLA_FLAGS"] = (os.environ.get("PDL_JAX_TEST_XLA_FLAGS", "")
                    + " --xla_force_host_platform_device_count=1")
  return e


def run_until(cmd, marker=None, sig=signal.SIGKILL, timeout=240):
  """Runs cmd; if `marker` appears in its output, sends `sig`. Returns (rc, output)."""
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  out = []
  try:
    for line in proc.stdout:
      out.append(line)
      if marker is not None and marker in line:
        proc.send_signal(sig)
        marker = None
    return proc.wait(timeout=timeout), "".join(out)
  finally:
    if proc.poll() is None:
      proc.kill()


def params_and_steps(workdir):
  """(latest step, its params as numpy), whatever topology saved them."""
  step = ckpt_lib.manager(str(workdir), 10).latest_step()
  path = os.path.join(str(workdir), "checkpoints", str(step), "state")
  ckptr = ocp.StandardCheckpointer()
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                        ckptr.metadata(path).item_metadata)
  state = ckptr.restore(path, target)
  return step, jax.tree.map(np.asarray, state["params"])


def train_lines(workdir):
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [{k: v for k, v in l.items() if k != "train/tokens_per_s"}
          for l in lines if "train/loss" in l]


def test_sigkill_at_several_points_resumes_exactly(data_dir, tmp_path):
  ref = tmp_path / "ref"
  rc, out = run_until(command(ref, data_dir))
  assert rc == 0, out[-3000:]
  killed = tmp_path / "killed"
  # During/after the frequency pass, in the middle of training, and right after a
  # log line that precedes a checkpoint write (the save is asynchronous).
  for marker in ("token stats: saved", "step 15/40", "step 30/40"):
    rc, out = run_until(command(killed, data_dir), marker)
    assert rc == -signal.SIGKILL, out[-3000:]
  rc, out = run_until(command(killed, data_dir))
  assert rc == 0, out[-3000:]
  ref_step, ref_params = params_and_steps(ref)
  step, params = params_and_steps(killed)
  assert step == ref_step == 40
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_array_equal(a, b)
  assert train_lines(killed) == train_lines(ref)
  # No half-written checkpoint or stats file is left behind as if complete.
  names = os.listdir(killed / "checkpoints")
  assert not [n for n in names if "tmp" in n], names


def test_sigterm_saves_the_current_step(data_dir, tmp_path):
  rc, out = run_until(command(tmp_path, data_dir, "--config.num_steps=400",
                              "--config.checkpoint_every=100"), "step 15/400",
                      sig=signal.SIGTERM)
  assert rc == 128 + signal.SIGTERM, out[-3000:]
  assert "SIGTERM: saved a checkpoint at step" in out
  step, _ = params_and_steps(tmp_path)
  assert 15 <= step < 100  # not a periodic checkpoint: the preemption one


@pytest.fixture
def mock_data():
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def tiny(**overrides):
  from test_train import tiny_config
  return tiny_config(**overrides)


def test_nonfinite_step_stops_naming_it_and_keeps_last_good(mock_data, tmp_path):
  # A learning rate of 1e30 blows the params up once warmup starts: a divergence.
  c = tiny(**{"optimizer.learning_rate": 1e30, "optimizer.warmup_steps": 2,
              "checkpoint_every": 1, "log_every": 100, "num_steps": 8})
  with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step \d+"):
    run_lib.train_and_evaluate(c, str(tmp_path))
  step, params = params_and_steps(tmp_path)
  assert step >= 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_nonfinite_steps_can_be_skipped_and_counted(mock_data, tmp_path):
  # An infinite learning rate makes every update non-finite: all are skipped.
  c = tiny(**{"optimizer.learning_rate": float("inf"), "log_every": 2, "num_steps": 6,
              "skip_nonfinite_steps": True, "eval_every": 100})
  run_lib.train_and_evaluate(c, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if "train/loss" in l]
  assert [l["train/nonfinite_steps"] for l in lines] == [2, 4, 6]
  _, params = params_and_steps(tmp_path)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_unknown_config_key_is_refused_by_the_cli(tmp_path):
  rc, out = run_until([sys.executable, "-m", "pdl_jax.main",
                       "--config=configs/dialogue.py:smoke", f"--workdir={tmp_path}",
                       "--config.loss.alpah=0.5"])
  assert rc != 0 and "alpah" in out
  assert not os.listdir(tmp_path)  # nothing written


def test_bad_data_is_handled_as_documented(tmp_path):
  from pdl_jax.tokenizers import sentencepiece as sp_tokenizer
  tok = sp_tokenizer.train(make_texts(800, 0), str(tmp_path / "t.model"), 80)
  # Characters the tokenizer cannot encode map to unk; empty targets are dropped
  # and counted; over-long inputs are truncated.
  ex = examples_lib.encode_examples(["\u2603\u2603 the man", "x", " ".join(["the"] * 500)],
                          ["\u0416\u0416 said", "", "no"], tok, seq_len=32, max_target_len=8)
  assert len(ex) == 2 and ex.dropped_empty == 1 and ex.truncated == 1
  assert tok.unk_id in ex.seqs[0].tolist()
  # Labels outside the vocabulary reaching the loss are masked, never NaN.
  model = factory.make_model(tiny().model, vocab_size=tok.vocab_size)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  import flax.linen as nn
  batch = batches_lib.make_batch(ex, np.array([0, 1]))
  batch["labels"] = batch["labels"].copy()
  batch["labels"][0, -1] = tok.vocab_size + 7
  batch["labels"][1, 0] = -5
  loss, (aux, _) = run_lib.make_loss_fn(tiny(), model)(
      nn.meta.unbox(params), batch, jnp.ones(tok.vocab_size), jnp.zeros(tok.vocab_size, jnp.int32))
  assert np.isfinite(float(loss)) and np.isfinite(float(aux.nll))


@pytest.mark.parametrize("overrides, match", [
    ({"loss.alpha": -1.0}, r"config.loss.alpha=-1.0; expected >= 0"),
    ({"loss.epsilon": 0.0}, r"config.loss.epsilon=0.0; expected > 0"),
    ({"model.preset": "huge"}, r"config.model.preset='huge'; expected one of"),
    ({"loss.name": "hinge"}, r"config.loss.name='hinge'"),
    ({"loss.name": "unlikelihood", "loss.chunked": True},
     r"chunked=True with config.loss.name='unlikelihood'"),
    ({"loss.eos_weight": 1.0, "loss.name": "ce"}, r"config.loss.eos_weight=1.0 with loss 'ce'"),
    ({"loss.reduction": "mean"}, r"config.loss.reduction='mean'"),
    ({"loss.name": "focal", "loss.gamma": -1.0}, r"config.loss \(focal\): gamma must be >= 0"),
    ({"model.param_dtype": "float16"}, r"config.model.param_dtype='float16'"),
    ({"eval.extra_decodes": ("nucleus",)}, r"'nucleus' \(eval.decode / eval.extra_decodes\)"),
    ({"dataset.name": "xsum"}, r"'xsum' is not available for task 'dialogue'"),
    ({"batch_size": 6, "mesh.data": 4, "mesh.model": 2}, r"batch_size=6 is not divisible"),
    ({"mesh.data": 16}, r"needs 16 devices; 8 are available"),
    ({"seq_len": 3}, r"config.seq_len=3; expected >= 4"),
    ({"tokenizer.path": "/nonexistent.model"}, r"/nonexistent.model' does not exist"),
    ({"eval.decode": "sample"}, r"decode method 'sample'"),
    ({"model.remat": "some"}, r"config.model.remat='some'; expected one of"),
    ({"loss.chunk_strategy": "rows"}, r"config.loss.chunk_strategy='rows'"),
    ({"optimizer.grad_accum_steps": 3}, r"grad_accum_steps=3; expected an integer"),
    ({"mesh.fsdp": 8}, r"batch_size=4 is not divisible by grad_accum_steps=1 x the mesh.s data x fsdp axes \(1 x 8\)"),
])
def test_bad_config_fails_before_work(mock_data, tmp_path, overrides, match):
  with pytest.raises(ValueError, match=match):
    run_lib.train_and_evaluate(tiny(**overrides), str(tmp_path))
  assert not os.path.exists(tmp_path / "tokenizer.model")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A 2-step run whose workdir the mismatch tests copy (one run for all of them)."""
  workdir = tmp_path_factory.mktemp("finished")
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    run_lib.train_and_evaluate(tiny(num_steps=2, eval_every=100), str(workdir))
  return workdir


@pytest.mark.parametrize("overrides, what", [
    ({"loss.alpha": 0.25}, "loss.alpha: stored 0.5, now 0.25"),
    ({"model.preset": "small"}, "model.d_model: stored 64, now 192"),
    ({"loss.name": "ce"}, "loss.name: stored 'pdl', now 'ce'"),
    ({"tokenizer.vocab_size": 80}, "tokenizer_requested"),
    # The settings the fingerprint used to leave out: each changes the math.
    ({"loss.epsilon": 1e-3}, "loss.epsilon: stored None, now 0.001"),
    ({"loss.frequency": "count"}, "loss.frequency: stored 'relative', now 'count'"),
    ({"loss.normalize": False}, "loss.normalize: stored True, now False"),
    ({"loss.max_weight": 3.0}, "loss.max_weight: stored None, now 3.0"),
    ({"optimizer.learning_rate": 1e-3}, "optimizer.learning_rate: stored 0.003, now 0.001"),
    ({"optimizer.b2": 0.9}, "optimizer.b2: stored 0.98, now 0.9"),
    ({"num_steps": 4}, "num_steps: stored 2, now 4"),  # shapes the cosine schedule
    ({"dataset.max_train_examples": 30}, "max_train_examples: stored 4000, now 30"),
])
def test_mismatched_workdir_is_refused(mock_data, finished_run, tmp_path, overrides, what):
  import shutil
  shutil.copytree(finished_run, tmp_path / "w")
  kwargs = {"num_steps": 2, "eval_every": 100, **overrides}
  with pytest.raises(ValueError, match=re.escape(what) + ".*resume=False"):
    run_lib.train_and_evaluate(tiny(**kwargs), str(tmp_path / "w"))


def test_changed_token_stats_are_refused_on_resume(mock_data, tmp_path):
  import dataclasses

  from pdl_jax.data import token_stats
  run_lib.train_and_evaluate(tiny(num_steps=2, eval_every=100), str(tmp_path))
  path = str(tmp_path / "checkpoints" / token_stats.STATS_FILENAME)
  stats = token_stats.TokenStats.load(path)
  counts = stats.counts.copy()
  counts[5] += 3
  dataclasses.replace(stats, counts=counts, num_tokens=int(counts.sum())).save(path)
  with pytest.raises(ValueError, match="token stats of checksum.*counts changed"):
    run_lib.train_and_evaluate(tiny(num_steps=2, eval_every=100), str(tmp_path))


def test_stored_weights_that_differ_from_the_config_are_refused_on_resume(mock_data, tmp_path):
  from pdl_jax.data import token_stats
  from pdl_jax.losses import weights as loss_weights
  run_lib.train_and_evaluate(tiny(num_steps=2, eval_every=100), str(tmp_path))
  path = str(tmp_path / "checkpoints" / loss_weights.WEIGHTS_FILENAME)
  weights, meta = loss_weights.load_weights(path)
  stats = token_stats.TokenStats.load(str(tmp_path / "checkpoints"))
  loss_weights.save_weights(path, weights * 1.5, meta["settings"], stats)  # same settings
  with pytest.raises(ValueError, match="loss_weights.npz.*values: max"):
    run_lib.train_and_evaluate(tiny(num_steps=2, eval_every=100), str(tmp_path))

"""End-to-end training on a tiny config with tfds mock data: outputs, resume,
alpha 0 == CE, chunked == unchunked, init_from, refusals (meshes: tests/train/test_fsdp.py)."""

import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import dialogue
from pdl_jax.train import checkpoint as ckpt_lib
from pdl_jax.train import optimizer as opt_lib
from pdl_jax import sharding
from pdl_jax.train import state as state_lib
from pdl_jax.train import run as run_lib
from pdl_jax.train import loop as loop_lib
from pdl_jax.losses import batch_loss
from pdl_jax.losses import pdl
from pdl_jax.models import factory

import pdl_jax.data.builders  # noqa: F401

# The tests/ folder (this file is 1 level below it): shared fixtures live there.
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  c = dialogue.get_config("smoke")
  c.mesh.data = 1  # one device unless a test says otherwise
  c.tokenizer.vocab_size = 64
  c.seq_len = 24
  c.max_target_len = 8
  c.batch_size = 4
  c.num_steps = 6
  c.log_every = 2
  c.eval_every = 6
  c.checkpoint_every = 3
  c.eval.num_examples = 4
  c.eval.batch_size = 4
  c.eval.max_new_tokens = 4
  c.eval.num_samples = 2
  c.eval.extra_decodes = ()  # one decoding per eval (the reference run checks top-p)
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return c


@pytest.fixture(autouse=True)
def mock_data():
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def run(workdir, **overrides):
  return run_lib.train_and_evaluate(tiny_config(**overrides), str(workdir))


def final_params(workdir):
  mngr = ckpt_lib.manager(str(workdir), 5)
  step = mngr.latest_step()
  import orbax.checkpoint as ocp
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  return step, jax.tree.map(np.asarray, state["params"])


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    workdir = tmp_path_factory.mktemp("ref")
    result = run(workdir, **{"eval.extra_decodes": ("top_p",)})
  return workdir, result


def test_logit_adjusted_decodes_of_a_ce_run(tmp_path):
  """A CE run's extra decodes greedy_bias<beta>: beta 0 generates what plain greedy
  does, a large beta other tokens, each with its metrics and every final generation;
  the evals before the final one (step 0, mid-run) skip them."""
  run(tmp_path, **{"loss.name": "ce", "eval_every": 3, "eval.at_start": True,
                   "eval.extra_decodes": ("top_p", "greedy_bias0", "greedy_bias3",
                                          "top_p_bias0.5"),
                   "eval.sampled_examples": 3})
  final = {m: [json.loads(l)["generation_ids"] for l in open(
      tmp_path / "samples" / f"final_{m}.jsonl")]
      for m in ("greedy", "greedy_bias0", "greedy_bias3", "top_p", "top_p_bias0.5")}
  # The sampled decodings cover the first eval.sampled_examples prompts, the others all.
  n = len(final["greedy"])
  assert n > 3 and {m: len(v) for m, v in final.items()} == {
      "greedy": n, "greedy_bias0": n, "greedy_bias3": n, "top_p": 3, "top_p_bias0.5": 3}
  assert final["greedy_bias0"] == final["greedy"]
  assert final["greedy_bias3"] != final["greedy"]
  evals = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  last = [l for l in evals if "eval/nll" in l][-1]
  for m in ("greedy_bias0", "greedy_bias3", "top_p_bias0.5"):
    assert np.isfinite(last[f"eval/{m}/rare_token_share"]), m
  # A decoding of fewer prompts logs its own prompts' reference buckets (the profile
  # distance compares with those); one of every prompt does not repeat them.
  assert "eval/top_p/ref_freq_bucket_0" in last and "eval/ref_freq_bucket_0" in last
  assert "eval/greedy_bias3/ref_freq_bucket_0" not in last
  assert last["eval/greedy_bias0/rougeL"] == last["eval/rougeL"]
  earlier = [l for l in evals if "eval/nll" in l][:-1]
  assert [l["step"] for l in earlier] == [0, 3]
  for l in earlier:  # plain decodes only
    assert "eval/top_p/rougeL" in l and not any("_bias" in k for k in l), l["step"]
  biased = [n for n in os.listdir(tmp_path / "samples") if "_bias" in n]
  assert biased and all(n.startswith("final_") or n.endswith("_step_0000006.jsonl")
                        for n in biased), biased


def test_run_writes_every_output(reference_run):
  workdir, result = reference_run
  names = set(os.listdir(workdir))
  assert {"config.json", "checkpoints", "metrics.jsonl", "tensorboard", "samples",
          "tokenizer.model"} <= names
  assert json.load(open(workdir / "config.json"))["loss"]["name"] == "pdl"
  ckpts = os.listdir(workdir / "checkpoints")
  # keep_checkpoints=1: the latest step only (step 3's was deleted once 6's was complete).
  assert {"6", "token_stats.npz", "loss_weights.npz"} <= set(ckpts) and "3" not in ckpts
  lines = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  train_keys = {"train/loss", "train/nll", "train/weight_ess", "train/grad_norm",
                "train/learning_rate", "train/tokens_per_s"}
  assert [l["step"] for l in lines if "train/loss" in l] == [2, 4, 6]
  assert all(train_keys <= set(l) for l in lines if "train/loss" in l)
  evals = [l for l in lines if "eval/nll" in l]
  assert len(evals) == 1 and evals[0]["step"] == 6
  for key in ("eval/nll", "eval/loss", "eval/rouge1", "eval/rouge2", "eval/rougeL",
              "eval/bleu", "eval/chrf", "eval/distinct_1", "eval/distinct_2",
              "eval/unigram_entropy", "eval/mean_surprisal", "eval/rare_token_share",
              "eval/length", "eval/ref_mean_surprisal", "eval/unigram_nll",
              "eval/freq_bucket_0", "eval/ref_freq_bucket_9", "eval/top_p/rouge1",
              "eval/top_p/rare_token_share", "eval/top_p/freq_bucket_0"):
    assert key in evals[0] and np.isfinite(evals[0][key]), key
  assert result["eval/nll"] == evals[0]["eval/nll"]
  assert sum(evals[0][f"eval/ref_freq_bucket_{k}"] for k in range(10)) == pytest.approx(1.0)
  assert os.listdir(workdir / "tensorboard")
  samples = [json.loads(l) for l in open(workdir / "samples" / "step_0000006.jsonl")]
  assert len(samples) == 2 and set(samples[0]) == {"input", "reference", "generation"}
  # The final eval keeps every generation of every decoding, with ids and rare counts.
  from pdl_jax.eval import metrics as metrics_lib
  counts = np.load(workdir / "checkpoints" / "token_stats.npz")["counts"]
  frequent = metrics_lib.frequent_head(counts)
  for method, prefix in (("greedy", "eval/"), ("top_p", "eval/top_p/")):
    lines = [json.loads(l) for l in open(workdir / "samples" / f"final_{method}.jsonl")]
    # Every evaluation prompt, in order (tfds' mock data gives the whole split).
    assert [l["index"] for l in lines] == list(range(len(lines))) and len(lines) >= 4
    assert all(l["rare_tokens"] == sum(not frequent[i] for i in l["generation_ids"])
               for l in lines)
    ids = [i for l in lines for i in l["generation_ids"]]
    if ids:  # the pooled share of the lines is the logged metric
      assert sum(l["rare_tokens"] for l in lines) / len(ids) == pytest.approx(
          evals[0][f"{prefix}rare_token_share"])
  assert not os.path.exists(workdir / "samples" / "base_greedy.jsonl")  # no step-0 eval


def test_interrupted_and_resumed_equals_uninterrupted(reference_run, tmp_path):
  ref_dir, _ = reference_run
  run(tmp_path, steps_per_run=3)  # stops after step 3, with a checkpoint
  assert final_params(tmp_path)[0] == 3
  run(tmp_path)  # same command again: resumes at 3, same batches
  step, params = final_params(tmp_path)
  assert step == 6
  assert_trees_close(params, final_params(ref_dir)[1], rtol=0, atol=0)
  steps = [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")
           if "train/loss" in l]
  assert steps == [2, 4, 6]  # no duplicated lines after the resume


def test_pdl_alpha_zero_equals_ce(tmp_path):
  run(tmp_path / "pdl", **{"loss.alpha": 0.0, "num_steps": 3, "eval_every": 100})
  run(tmp_path / "ce", **{"loss.name": "ce", "num_steps": 3, "eval_every": 100})
  assert_trees_close(final_params(tmp_path / "pdl")[1], final_params(tmp_path / "ce")[1],
                     rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("strategy", ["vocab", "tokens"])
def test_chunked_loss_training_equals_unchunked(tmp_path, strategy):
  run(tmp_path / "a", **{"loss.alpha": 1.0, "num_steps": 3, "eval_every": 100})
  run(tmp_path / "b", **{"loss.alpha": 1.0, "num_steps": 3, "eval_every": 100,
                         "loss.chunked": True, "loss.chunk_strategy": strategy,
                         "loss.chunk_size": 24, "loss.row_chunk_size": 24})
  assert_trees_close(final_params(tmp_path / "a")[1], final_params(tmp_path / "b")[1],
                     rtol=1e-4, atol=1e-5)


def test_init_from_and_mismatched_workdir(reference_run, tmp_path):
  ref_dir, _ = reference_run
  # init_from: params from the other run, its tokenizer, fresh optimizer at step 0.
  c = tiny_config(num_steps=1, eval_every=100, seed=1)  # another seed: another init
  c.init_from = str(ref_dir)
  run_lib.train_and_evaluate(c, str(tmp_path / "ft"))
  assert os.path.getsize(tmp_path / "ft" / "checkpoints" / "token_stats.npz") > 0
  assert not os.path.exists(tmp_path / "ft" / "tokenizer.model")  # reused init_from's
  # One AdamW step (lr <= 3e-3) away from the reference's params, not a seed-1 init.
  step, ft = final_params(tmp_path / "ft")
  assert step == 1
  for x, y in zip(jax.tree.leaves(ft), jax.tree.leaves(final_params(ref_dir)[1])):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-2)
  # A workdir written with another alpha is refused, with the way out named.
  with pytest.raises(ValueError, match=r"different config \(.*loss.alpha: stored 0.5, now "
                                        r"0.25.*\).*resume=False"):
    run(ref_dir, **{"loss.alpha": 0.25})
  # The way out: resume=False starts afresh, keeping the earlier run aside.
  other = tmp_path / "other"
  run(other, num_steps=2, eval_every=100)
  run(other, **{"num_steps": 2, "eval_every": 100, "loss.alpha": 0.25, "resume": False})
  previous = [n for n in os.listdir(other) if n.startswith("previous-")]
  assert len(previous) == 1 and "checkpoints" in os.listdir(other / previous[0])
  assert json.load(open(other / "config.json"))["loss"]["alpha"] == 0.25


def test_frequency_cli_pass_is_reused_by_training(tmp_path):
  from pdl_jax.cli import count_tokens
  from pdl_jax.data import token_stats
  from pdl_jax.losses import weights as loss_weights

  stats, report = count_tokens.run_pass(tiny_config(), str(tmp_path), top=3)
  assert "most frequent (down-weighted)" in report and "least frequent" in report
  path = tmp_path / "checkpoints" / token_stats.STATS_FILENAME
  weights_path = tmp_path / "checkpoints" / loss_weights.WEIGHTS_FILENAME
  weights, meta = loss_weights.load_weights(str(weights_path))  # the CLI writes them too
  assert meta["settings"]["alpha"] == 0.5
  np.testing.assert_array_equal(weights, pdl.power_law_weights(stats.counts, 0.5))
  mtimes = os.path.getmtime(path), os.path.getmtime(weights_path)
  run(tmp_path, num_steps=2, eval_every=100)
  # Training reused the stored stats and found the stored weights its own.
  assert (os.path.getmtime(path), os.path.getmtime(weights_path)) == mtimes
  again, _ = count_tokens.run_pass(tiny_config(), str(tmp_path))
  np.testing.assert_array_equal(again.counts, stats.counts)


def metric_steps(workdir, key):
  return [json.loads(l)["step"] for l in open(workdir / "metrics.jsonl") if key in l]


def test_killed_before_the_final_eval_the_rerun_writes_it(reference_run, tmp_path):
  import shutil
  shutil.copytree(reference_run[0], tmp_path / "w")
  w = tmp_path / "w"
  # The state of a run killed after its last checkpoint, before its final eval.
  lines = [l for l in open(w / "metrics.jsonl") if '"eval/nll"' not in l]
  (w / "metrics.jsonl").write_text("".join(lines))
  result = run(w)
  assert metric_steps(w, "eval/nll") == [6] and result["eval/nll"] > 0
  again = run(w)  # finished: nothing new, the same final eval returned
  assert metric_steps(w, "eval/nll") == [6] and again["eval/nll"] == result["eval/nll"]


def test_preempted_at_a_log_and_eval_step_keeps_its_records(tmp_path, monkeypatch):
  """SIGTERM during step 4 (a log and an eval step): its train record is written before
  the preemption save, and the resumed run (starting after step 4) writes its eval."""
  import signal

  from pdl_jax.data import batches as batches_lib
  overrides = {"num_steps": 6, "log_every": 2, "eval_every": 4, "checkpoint_every": 100}
  run(tmp_path / "ref", **overrides)
  call = batches_lib.TrainBatches.global_batch

  def preempting(self, step):
    if step == 3:  # the batch of step 4 (steps count from 1 after the update)
      os.kill(os.getpid(), signal.SIGTERM)
    return call(self, step)

  monkeypatch.setattr(batches_lib.TrainBatches, "global_batch", preempting)
  with pytest.raises(SystemExit) as stopped:
    run(tmp_path / "w", **overrides)
  assert stopped.value.code == 128 + signal.SIGTERM
  assert final_params(tmp_path / "w")[0] == 4
  monkeypatch.setattr(batches_lib.TrainBatches, "global_batch", call)
  run(tmp_path / "w", **overrides)

  def records(workdir):
    lines = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in lines]

  got, want = records(tmp_path / "w"), records(tmp_path / "ref")
  assert [(r["step"], sorted(r)) for r in got] == [(r["step"], sorted(r)) for r in want]
  for g, w in zip(got, want):
    np.testing.assert_allclose([g[k] for k in sorted(g)], [w[k] for k in sorted(w)],
                               rtol=1e-6, err_msg=f"step {g['step']}")


def _fail_the_save_of_step(monkeypatch, step: int, why: str) -> None:
  """Makes orbax's asynchronous save of `step` fail in its own finalize thread, after
  writing, as a full disk does."""
  import orbax.checkpoint as ocp
  wait = ocp.CheckpointManager._wait_for_checkpointers  # what the save's thread runs

  def wait_then_fail(self):
    wait(self)
    if self._finalize_thread.get_not_none().step() == step:
      raise ValueError(f"RESOURCE_EXHAUSTED: {why}")

  monkeypatch.setattr(ocp.CheckpointManager, "_wait_for_checkpointers", wait_then_fail)


def test_a_failed_checkpoint_save_stops_the_run_at_the_next_log_step(tmp_path, monkeypatch):
  """An asynchronous save that fails (here: the step-2 save's write, in orbax's own
  background thread, reporting a full disk) stops training at the next log step once
  the save has ended, naming the error, instead of training on to the next save and
  failing there (with checkpoint_every 30, thirty steps of work lost)."""
  import threading

  import orbax.checkpoint as ocp

  from pdl_jax.data import batches as batches_lib
  _fail_the_save_of_step(monkeypatch, 2, "Error writing opt_state: No space left on device")
  finalize = ocp.CheckpointManager._finalize  # its whole body: clears the in-progress flag
  ended = threading.Event()

  def finalize_then_signal(self, step, *args):
    try:
      return finalize(self, step, *args)
    finally:
      if step == 2:
        ended.set()

  call = batches_lib.TrainBatches.global_batch

  def after_the_failure(self, step):
    if step == 2:  # step 3's batch: let the failed save's thread end first
      assert ended.wait(60)
    return call(self, step)

  monkeypatch.setattr(ocp.CheckpointManager, "_finalize", finalize_then_signal)
  monkeypatch.setattr(batches_lib.TrainBatches, "global_batch", after_the_failure)
  with pytest.raises(RuntimeError, match=r"saving a checkpoint failed \(ValueError: "
                     r"RESOURCE_EXHAUSTED.*run the same command"):
    run(tmp_path, **{"num_steps": 8, "log_every": 1, "checkpoint_every": 2, "eval_every": 100})
  steps = [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")]
  assert max(steps) == 2, steps  # stopped at step 3's log, before the step-4 save


def test_a_failed_final_save_is_named_too(tmp_path, monkeypatch):
  """The last save's failure surfaces when the run waits for it at the end: the same
  error with what to do, not orbax's bare one."""
  _fail_the_save_of_step(monkeypatch, 4, "No space left on device")
  with pytest.raises(RuntimeError, match=r"saving a checkpoint failed \(ValueError: "
                     r"RESOURCE_EXHAUSTED.*last complete checkpoint"):
    run(tmp_path, **{"num_steps": 4, "log_every": 2, "checkpoint_every": 100, "eval_every": 100})


def test_killed_before_the_first_checkpoint_logs_each_step_once(reference_run, tmp_path):
  import shutil

  import tensorflow as tf
  shutil.copytree(reference_run[0], tmp_path / "w")
  w = tmp_path / "w"
  # The state of a run killed after logging steps 2 and 4 but before any checkpoint.
  for step in os.listdir(w / "checkpoints"):
    if step.isdigit():
      shutil.rmtree(w / "checkpoints" / step)
  lines = [l for l in open(w / "metrics.jsonl") if json.loads(l)["step"] <= 4]
  (w / "metrics.jsonl").write_text("".join(lines))
  run(w)
  assert metric_steps(w, "train/loss") == [2, 4, 6]
  tb_steps = []
  for f in (w / "tensorboard").iterdir():
    for event in tf.compat.v1.train.summary_iterator(str(f)):
      tb_steps += [event.step for v in event.summary.value if v.tag == "train/loss"]
  assert sorted(tb_steps) == [2, 4, 6]


def test_eval_loss_is_the_runs_own_objective(tmp_path):
  ce = run(tmp_path / "ce", **{"loss.name": "ce", "num_steps": 2, "eval_every": 2})
  assert ce["eval/loss"] == pytest.approx(ce["eval/nll"], rel=1e-6)
  pdl = run(tmp_path / "pdl", **{"loss.alpha": 1.0, "num_steps": 2, "eval_every": 2})
  assert pdl["eval/loss"] != pytest.approx(pdl["eval/nll"], rel=1e-3)


def test_init_from_restores_params_only_into_the_current_shardings(reference_run):
  from pdl_jax.train import checkpoint as ckpt_lib
  mesh = sharding.make_mesh({"data": 4, "model": 2})
  cfg = tiny_config()
  model = factory.make_model(cfg.model, vocab_size=final_params(reference_run[0])[1]["embed"][
      "embedding"].shape[0])
  state, shardings = state_lib.create_state(model, opt_lib.make_optimizer(cfg.optimizer, cfg.num_steps), mesh, 0, 16)
  params = ckpt_lib.load_params(str(reference_run[0]),
                            ckpt_lib.abstract_like(state.params, shardings.params))
  emb = params["embed"]["embedding"]
  assert emb.sharding == shardings.params["embed"]["embedding"]
  assert emb.sharding.spec == jax.sharding.PartitionSpec("model", None)
  assert_trees_close(jax.tree.map(np.asarray, params), final_params(reference_run[0])[1],
                     rtol=0, atol=0)
  small = factory.make_model(tiny_config(**{"model.preset": "small"}).model, vocab_size=emb.shape[0])
  one = sharding.make_mesh({"data": 1, "model": 1})  # 3 heads do not split over 2
  other, other_sh = state_lib.create_state(small, opt_lib.make_optimizer(cfg.optimizer, cfg.num_steps), one, 0, 16)
  with pytest.raises(ValueError, match="do not match this model"):
    ckpt_lib.load_params(str(reference_run[0]), ckpt_lib.abstract_like(other.params, other_sh.params))


def test_face_counts_are_train_state_and_resume_exactly(tmp_path):
  overrides = {"loss.name": "face", "num_steps": 4, "eval_every": 100, "checkpoint_every": 2}
  run(tmp_path / "ref", **overrides)
  run(tmp_path / "cut", steps_per_run=2, **overrides)
  run(tmp_path / "cut", **overrides)
  import orbax.checkpoint as ocp
  states = []
  for name in ("ref", "cut"):
    mngr = ckpt_lib.manager(str(tmp_path / name), 5)
    states.append(mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore())).state)
  counts = np.asarray(states[0]["loss_state"])
  # 4 steps x 4 rows of argmax predictions at the target positions were counted.
  assert counts.dtype == np.int32 and 0 < counts.sum() <= 4 * 4 * 9  # 8 tokens + EOS
  np.testing.assert_array_equal(np.asarray(states[1]["loss_state"]), counts)
  assert_trees_close(jax.tree.map(np.asarray, states[1]["params"]),
                     jax.tree.map(np.asarray, states[0]["params"]), rtol=0, atol=0)


def test_loss_window_training_equals_full_logits(tmp_path):
  # Long prompts, targets cut at max_target_len: the window (9 of 24 positions) holds
  # every loss position, and training is the same as with logits everywhere.
  run(tmp_path / "full", **{"loss.window": False, "num_steps": 3, "eval_every": 3})
  run(tmp_path / "win", **{"loss.window": True, "num_steps": 3, "eval_every": 3})
  assert_trees_close(final_params(tmp_path / "win")[1], final_params(tmp_path / "full")[1],
                     rtol=1e-5, atol=1e-6)
  nll = [json.loads(l)["eval/nll"] for name in ("full", "win")
         for l in open(tmp_path / name / "metrics.jsonl") if "eval/nll" in l]
  assert nll[0] == pytest.approx(nll[1], rel=1e-5)


def test_stored_counts_of_other_data_settings_are_refused(tmp_path):
  from pdl_jax.cli import count_tokens
  count_tokens.run_pass(tiny_config(), str(tmp_path))  # counted with max_target_len 8
  with pytest.raises(ValueError, match=r"other data settings \(max_target_len: stored 8, "
                                       r"now 3\)"):
    run(tmp_path, max_target_len=3)


def test_a_refused_resume_leaves_the_runs_config_json(reference_run, tmp_path):
  import shutil
  shutil.copytree(reference_run[0], tmp_path / "w")
  before = (tmp_path / "w" / "config.json").read_text()
  with pytest.raises(ValueError, match="loss.alpha"):
    run(tmp_path / "w", **{"loss.alpha": 0.25})
  assert (tmp_path / "w" / "config.json").read_text() == before


def test_chunked_loss_turns_on_for_large_vocabularies_and_dtype_follows_the_backend():
  from pdl_jax.models import factory
  c = tiny_config()
  assert c.loss.chunked is None and c.model.dtype is None
  assert not batch_loss.use_chunked_loss(c.loss, 4000) and batch_loss.use_chunked_loss(c.loss, 32_000)
  c.loss.name = "unlikelihood"  # needs the full logits: never chunked by default
  assert not batch_loss.use_chunked_loss(c.loss, 151_936)
  for name in ("focal", "label_smoothing", "face"):  # chunked by vocabulary chunks
    c.loss.name = name
    assert batch_loss.use_chunked_loss(c.loss, 151_936)
  c.loss.chunked = False
  c.loss.name = "pdl"
  assert not batch_loss.use_chunked_loss(c.loss, 151_936)
  # A soft-capped model (Gemma 2/3 configs) is never chunked by default, and refused
  # when asked to be: the chunked loss would skip the cap.
  c.loss.chunked = None
  assert not batch_loss.use_chunked_loss(c.loss, 262_144, softcap=30.0)
  c.loss.chunked = True
  with pytest.raises(ValueError, match="chunked=True.*soft-capped.*30.0"):
    batch_loss.use_chunked_loss(c.loss, 262_144, softcap=30.0)
  assert factory.compute_dtype(c.model) == "float32"  # CPU here; bfloat16 on accelerators
  c.model.dtype = "bfloat16"
  assert factory.compute_dtype(c.model) == "bfloat16"


def test_eval_log_line_is_the_headline_and_extra_decodings_rouge():
  line = loop_lib.eval_summary({"eval/nll": 4.25, "eval/distinct_1": 0.5, "eval/rougeL": 9.0,
                                "eval/top_p/rouge1": 7.0, "eval/top_p/rougeL": 6.0,
                                "eval/greedy_bias0.25/rougeL": 5.0})
  assert line == "nll 4.250  rougeL 9.000  top_p/rougeL 6.000  greedy_bias0.25/rougeL 5.000"


@pytest.mark.parametrize("pretrained,bucketed", [(False, False), (True, False), (False, True)])
def test_decoders_compile_once_per_run(tmp_path, monkeypatch, pretrained, bucketed):
  """Evals at steps 0, 2, 4 and 6 with greedy and top-p: each decoder is traced once
  (compile-once: the params keep their sharding across evals; a retrace would cost
  10-20 s per eval on a real model); with prompts bucketed by length, once per
  padded length."""
  from pdl_jax.eval import decode as decode_lib
  traced = []
  prefill = decode_lib._prefill

  def counting_prefill(model, params, tokens_BxP, *args):
    traced.append(tokens_BxP.shape)
    return prefill(model, params, tokens_BxP, *args)

  monkeypatch.setattr(decode_lib, "_prefill", counting_prefill)
  decode_lib.generate.clear_cache()  # earlier tests' traces of the same shapes
  overrides = {"eval.at_start": True, "eval.extra_decodes": ("top_p",)}
  # Bucketed: four batches of prompts in several padded lengths; else one length.
  overrides.update({"eval.batch_size": 8, "eval.length_bucket": 4} if bucketed
                   else {"eval.length_bucket": 0})
  if pretrained:  # step 0 evaluates the loaded params, later evals the trained ones
    overrides["model.pretrained"] = os.path.join(TESTS, "fixtures", "hf",
                                                 "llama")
  run(tmp_path, eval_every=2, **overrides)
  evals = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")
           if "eval/top_p/rouge1" in line]
  assert len(evals) == 4
  shapes = set(traced)
  assert (len(shapes) > 1) if bucketed else (len(shapes) == 1), traced
  assert len(traced) == 2 * len(shapes), traced  # greedy and top-p, once each

"""One train step's numbers pinned (nanodo style): the module layout may change, the
math may not. The values were recorded with the code before the redraw (commit
1e4289c, train.train_step of that time) on the same inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dialogue
from pdl_jax.train import optimizer as opt_lib
from pdl_jax.train import state as state_lib
from pdl_jax.train import step as step_lib
from pdl_jax.train import run as run_lib
from pdl_jax.losses import pdl
from pdl_jax.models import factory


def test_three_pdl_steps_match_the_pinned_numbers():
  c = dialogue.get_config("smoke")
  c.mesh.data = 1
  c.num_steps = 10
  c.optimizer.warmup_steps = 2
  vocab = 64
  model = factory.make_model(c.model, vocab)
  tx = opt_lib.make_optimizer(c.optimizer, c.num_steps)
  state, _ = state_lib.create_state(model, tx, run_lib.make_mesh(c), 0, 16)
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, vocab, (4, 16)).astype(np.int32),
           "labels": rng.integers(0, vocab, (4, 16)).astype(np.int32),
           "loss_mask": (rng.random((4, 16)) > 0.3).astype(np.float32)}
  weights = pdl.power_law_weights(rng.integers(0, 50, vocab).astype(np.int64), 0.5)
  step = jax.jit(functools.partial(step_lib.train_step, loss_fn=run_lib.make_loss_fn(c, model),
                                   tx=tx))
  seen = []
  for _ in range(3):
    state, m = step(state, batch, weights)
    seen.append({k: float(v) for k, v in m.items()})
  assert seen[0]["train/loss"] == pytest.approx(6.452458381652832, rel=1e-5)
  assert seen[0]["train/grad_norm"] == pytest.approx(2.8383774757385254, rel=1e-5)
  assert seen[0]["train/nll"] == pytest.approx(6.189157962799072, rel=1e-5)
  assert seen[0]["train/weight_ess"] == pytest.approx(0.6597610116004944, rel=1e-5)
  assert seen[2]["train/loss"] == pytest.approx(5.531017303466797, rel=1e-5)
  assert seen[2]["train/grad_norm"] == pytest.approx(2.716714382171631, rel=1e-5)
  assert seen[2]["train/nll"] == pytest.approx(5.524953365325928, rel=1e-5)
  # The learning rate of each applied update: 0 at step 1, then the warmup.
  assert [s["train/learning_rate"] for s in seen] == pytest.approx([0.0, 0.0015, 0.003])
  total = float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(state.params)))
  assert total == pytest.approx(12803.98828125, rel=1e-5)


def test_a_skipped_step_keeps_the_logged_learning_rate_the_one_used():
  c = dialogue.get_config("smoke")
  c.mesh.data = 1
  c.num_steps, c.optimizer.warmup_steps = 10, 4
  vocab = 32
  model = factory.make_model(c.model, vocab)
  tx = opt_lib.make_optimizer(c.optimizer, c.num_steps)
  state, _ = state_lib.create_state(model, tx, run_lib.make_mesh(c), 0, 8)
  rng = np.random.default_rng(1)
  batch = {"inputs": rng.integers(0, vocab, (2, 8)).astype(np.int32),
           "labels": rng.integers(0, vocab, (2, 8)).astype(np.int32),
           "loss_mask": np.ones((2, 8), np.float32)}
  good = np.ones(vocab, np.float32)
  bad = np.full(vocab, np.nan, np.float32)
  step = jax.jit(functools.partial(step_lib.train_step, loss_fn=run_lib.make_loss_fn(c, model),
                                   tx=tx, skip_nonfinite=True))
  rates = []
  for w in (good, good, bad, bad, good):
    state, m = step(state, batch, w)
    rates.append(float(m["train/learning_rate"]))
  sched = opt_lib.schedule(c.optimizer, c.num_steps)
  # Updates applied: 1, 2, (skipped), (skipped), 3: the third applied update uses the
  # schedule's third value, and the skipped steps report the last applied one.
  assert rates == pytest.approx([float(sched(0)), float(sched(1)), float(sched(1)),
                                 float(sched(1)), float(sched(2))])
  assert int(state.nonfinite_steps) == 2


def test_tokens_per_second_counts_real_tokens_only():
  from pdl_jax.data import batches as batches_lib
  from pdl_jax.data import examples as examples_lib
  seqs = np.zeros((4, 9), np.int32)
  lengths = np.array([9, 5, 3, 7], np.int32)
  ex = examples_lib.Examples(seqs, np.array([2, 2, 1, 3], np.int32), lengths, [""] * 4, [""] * 4,
                     0, 0)
  b = batches_lib.TrainBatches(ex, 2, seed=0, process_index=1, process_count=2)
  idx = b.global_indices(0)
  assert b.real_tokens(0) == int((lengths[idx] - 1).sum())  # the global batch, no padding
  assert b.real_tokens(0) < 2 * 8

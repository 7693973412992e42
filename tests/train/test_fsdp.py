"""FSDP over the 3-axis mesh, exact gradient accumulation and resharding on restore,
on the 8 forced CPU devices of tests/conftest.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pdl_jax.train import checkpoint as ckpt_lib
from pdl_jax.train import provenance
from pdl_jax.train import optimizer as opt_lib
from pdl_jax import sharding
from pdl_jax.train import state as state_lib
from pdl_jax.train import step as step_lib
from pdl_jax.train import run as run_lib
from pdl_jax.losses import batch_loss
from pdl_jax.losses import registry
from pdl_jax.models import factory
from test_train import assert_trees_close, tiny_config

V, B, L = 96, 32, 16


def make_batch(seed=0, uneven=False):
  """A batch whose rows carry target spans (the prefix-LM's shape). With uneven,
  micro-batch 0 (rows 0, 4, 8, ...) has long spans of the heaviest tokens and the
  others short spans of light ones: very different weight sums per micro-batch."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(0, V, (B, L)).astype(np.int32)
  labels = rng.integers(0, V, (B, L)).astype(np.int32)
  mask = np.zeros((B, L), np.float32)
  cap = 9  # the loss window's capacity (max_target_len 8 + EOS): spans fit it
  for row in range(B):
    start = int(rng.integers(1, 6))
    length = int(rng.integers(1, cap + 1))
    if uneven:
      heavy = row % 4 == 0
      length = cap if heavy else 1
      labels[row] = rng.integers(V - 8, V, L) if heavy else rng.integers(0, 8, L)
    mask[row, start:start + length] = 1.0
  return {"inputs": inputs, "labels": labels, "loss_mask": mask}


WEIGHTS = jnp.asarray(np.geomspace(0.05, 20.0, V), jnp.float32)  # 400x spread


def setup(mesh_shape, loss="pdl", **overrides):
  cfg = tiny_config(**{"model.preset": "tiny", "loss.name": loss, "loss.alpha": 1.0,
                       **overrides})
  model = factory.make_model(cfg.model, vocab_size=V)
  tx = opt_lib.make_optimizer(cfg.optimizer, cfg.num_steps)
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(mesh_shape, devices=devices)
  state, shardings = state_lib.create_state(model, tx, mesh, seed=0, seq_len=L)
  return cfg, model, tx, mesh, state, shardings


def step_once(mesh_shape, batch, loss="pdl", accum=1, **overrides):
  """One jitted train step; returns (host state, host metrics, host grads)."""
  cfg, model, tx, mesh, state, shardings = setup(mesh_shape, loss, **overrides)
  loss_fn = run_lib.make_loss_fn(cfg, model)
  reduction = registry.resolve_reduction(cfg.loss.name, cfg.loss.reduction)
  bs = sharding.named_sharding(mesh, "batch", "length")
  rep = sharding.replicated(mesh)
  sharded = {k: jax.device_put(v, bs) for k, v in batch.items()}

  def grads_of(params, b, w):
    if accum == 1:
      return jax.grad(lambda p: loss_fn(p, b, w, jnp.zeros(V, jnp.int32))[0])(params)
    return step_lib.accumulate_gradients(params, b, w, jnp.zeros(V, jnp.int32),
                                      loss_fn=loss_fn, reduction=reduction, steps=accum)[3]

  def grads_and_step(s, b, w):  # one compilation for both
    new_state, metrics = step_lib.train_step(s, b, w, loss_fn=loss_fn, tx=tx,
                                          grad_accum_steps=accum, reduction=reduction)
    return grads_of(s.params, b, w), new_state, metrics

  with jax.set_mesh(mesh):  # as in training: the model's activation constraints apply
    grads, new_state, metrics = jax.jit(
        grads_and_step, in_shardings=(shardings, bs, rep),
        out_shardings=(shardings.params, shardings, rep))(state, sharded, WEIGHTS)
  return new_state, jax.tree.map(np.asarray, metrics), grads


def host(tree):
  return jax.tree.map(np.asarray, tree)


def test_fsdp_shards_params_and_optimizer_state_over_the_embed_axis():
  _, _, _, mesh, state, shardings = setup((1, 4, 2))
  emb = shardings.params["embed"]["embedding"]
  assert emb.spec == P("model", "fsdp")  # [vocab, embed]
  up = shardings.params["block_0"]["mlp"]["up"]["kernel"]
  assert up.spec == P("fsdp", "model")  # [embed, mlp]
  # Adam's moments follow their parameter.
  mu = state.opt_state
  leaves = [x for x in jax.tree.leaves(mu) if getattr(x, "shape", ()) == (V, 64)]
  assert leaves and all(x.sharding.spec == P("model", "fsdp") for x in leaves)
  assert state.params["embed"]["embedding"].addressable_shards[0].data.shape == (V // 2, 16)


def test_fsdp4_x_model2_step_equals_single_device():
  batch = make_batch()
  one_state, one_metrics, one_grads = step_once((1, 1, 1), batch)
  # (data=2 x fsdp=2 x model=2 runs in the accumulation tests below.)
  for mesh_shape in ((1, 4, 2),):
    state, metrics, grads = step_once(mesh_shape, batch)
    assert grads["block_0"]["attn"]["query"]["kernel"].sharding.spec == P(
        "fsdp", "model", None)
    np.testing.assert_allclose(metrics["train/loss"], one_metrics["train/loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["train/grad_norm"], one_metrics["train/grad_norm"],
                               rtol=1e-5)
    assert_trees_close(host(grads), host(one_grads), rtol=1e-4, atol=1e-6)
    assert_trees_close(host(state.params), host(one_state.params), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss, uneven", [("pdl", True), ("ce", True), ("itf", False)])
def test_grad_accumulation_equals_one_batch(loss, uneven):
  batch = make_batch(seed=1, uneven=uneven)
  ref_state, ref_metrics, ref_grads = step_once((1, 1, 1), batch, loss=loss)
  state, metrics, grads = step_once((2, 2, 2), batch, loss=loss, accum=4)
  for key in ("train/loss", "train/nll", "train/tokens", "train/weight_ess",
              "train/grad_norm"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=2e-5, err_msg=key)
  assert_trees_close(host(grads), host(ref_grads), rtol=1e-4, atol=1e-6)
  assert_trees_close(host(state.params), host(ref_state.params), rtol=1e-4, atol=1e-6)


def test_averaging_micro_batch_losses_would_be_wrong():
  """The check above can fail: the naive mean of micro-batch PDL losses differs."""
  batch = make_batch(seed=1, uneven=True)
  cfg, model, _, _, state, _ = setup((1, 1, 1))
  loss_fn = run_lib.make_loss_fn(cfg, model)
  counts = jnp.zeros(V, jnp.int32)
  fn = jax.jit(lambda b: loss_fn(state.params, b, WEIGHTS, counts)[0])
  full = float(fn(batch))
  parts = [float(fn({k: v[i::4] for k, v in batch.items()})) for i in range(4)]
  assert abs(np.mean(parts) - full) > 0.05 * abs(full)


@pytest.mark.parametrize("strategy", ["tokens", "vocab"])
def test_grad_accumulation_with_the_chunked_loss_and_window(strategy):
  batch = make_batch(seed=2, uneven=True)
  # Several row blocks (40 rows; a micro-batch has 16 x 9 window positions, padded)
  # or vocabulary chunks (32 of 96 columns).
  over = {"loss.chunked": True, "loss.chunk_strategy": strategy, "loss.chunk_size": 32,
          "loss.row_chunk_size": 40}
  _, ref_metrics, ref_grads = step_once((1, 1, 1), batch, **over)
  _, metrics, grads = step_once((1, 8, 1), batch, accum=2, **over)
  np.testing.assert_allclose(metrics["train/loss"], ref_metrics["train/loss"], rtol=2e-5)
  assert_trees_close(host(grads), host(ref_grads), rtol=1e-4, atol=1e-6)


def test_grad_accum_steps_must_divide_the_batch_over_the_mesh():
  cfg = tiny_config(**{"optimizer.grad_accum_steps": 3})
  from pdl_jax import config_checks
  with pytest.raises(ValueError, match="grad_accum_steps=3; expected an integer"):
    config_checks.validate_config(cfg)  # batch 4
  cfg = tiny_config(**{"optimizer.grad_accum_steps": 2, "mesh.data": 1, "mesh.fsdp": 4})
  with pytest.raises(ValueError, match=r"batch_size=4 is not divisible by "
                     r"grad_accum_steps=2 x the mesh's data x fsdp axes \(1 x 4\)"):
    run_lib.make_mesh(cfg)


def test_checkpoint_written_on_8_devices_restores_onto_4(tmp_path):
  _, _, _, _, state8, sh8 = setup((1, 8, 1))
  mngr = ckpt_lib.manager(str(tmp_path), 2)
  ckpt_lib.save(mngr, 1, state8, {"step": 1, "fingerprint": {"a": 1},
                                  "token_stats_sha256": "x"})
  mngr.wait_until_finished()
  expected = host(state8)
  _, _, _, mesh4, state4, sh4 = setup((2, 2, 1))
  # Different values in the target, so the check sees the restore.
  state4 = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        state4)
  mngr = ckpt_lib.manager(str(tmp_path), 2)
  restored, step = ckpt_lib.restore_latest(mngr, ckpt_lib.abstract_like(state4, sh4),
                                           {"a": 1}, "x", "test")
  assert step == 1
  emb = restored.params["embed"]["embedding"]
  assert emb.sharding == sh4.params["embed"]["embedding"]
  assert len(emb.sharding.device_set) == 4 and emb.sharding.spec == P(None, "fsdp")
  assert emb.addressable_shards[0].data.shape == (V, 32)
  assert_trees_close(host(restored), expected, rtol=0, atol=0)


def test_runs_resume_with_another_accumulation_split():
  """Accumulation is exact, so it is no part of the run fingerprint (a resume on a
  smaller slice may need more micro-batches); old fingerprints lack the key."""
  class Tok:
    sha256, vocab_size = "t", 64
  a = tiny_config(**{"optimizer.grad_accum_steps": 1})
  b = tiny_config(**{"optimizer.grad_accum_steps": 4})
  fa, fb = provenance.fingerprint(a, Tok, {}), provenance.fingerprint(b, Tok, {})
  assert fa == fb and "grad_accum_steps" not in fa["optimizer"]
  provenance.check_fingerprint(fa, fb, "test")
  # FACE's counts advance per micro-batch: there the split is part of the run.
  face = [tiny_config(**{"loss.name": "face", "optimizer.grad_accum_steps": k})
          for k in (1, 4)]
  with pytest.raises(ValueError, match="optimizer.grad_accum_steps"):
    provenance.check_fingerprint(provenance.fingerprint(face[0], Tok, {}),
                               provenance.fingerprint(face[1], Tok, {}), "test")
  c = tiny_config(**{"optimizer.b2": 0.9})
  with pytest.raises(ValueError, match="optimizer.b2"):
    provenance.check_fingerprint(fa, provenance.fingerprint(c, Tok, {}), "test")


def test_fingerprint_holds_only_the_runs_own_loss_hyperparameters():
  """A CE run resumes whatever loss.alpha or loss.gamma say (they are other losses');
  a PDL run refuses another alpha, a focal run another gamma."""
  class Tok:
    sha256, vocab_size = "t", 64
  def fp(**kw):
    return provenance.fingerprint(tiny_config(**kw), Tok, {})
  ce = fp(**{"loss.name": "ce"})
  assert ce["loss"] == {"name": "ce"}
  provenance.check_fingerprint(ce, fp(**{"loss.name": "ce", "loss.alpha": 0.25,
                                       "loss.gamma": 5.0}), "test")
  with pytest.raises(ValueError, match=r"loss.alpha: stored 0.5, now 0.25"):
    provenance.check_fingerprint(fp(**{"loss.name": "pdl"}),
                               fp(**{"loss.name": "pdl", "loss.alpha": 0.25}), "test")
  focal = fp(**{"loss.name": "focal"})
  provenance.check_fingerprint(focal, fp(**{"loss.name": "focal", "loss.alpha": 0.1}), "t")
  with pytest.raises(ValueError, match=r"loss.gamma: stored 2.0, now 3.0"):
    provenance.check_fingerprint(focal, fp(**{"loss.name": "focal", "loss.gamma": 3.0}), "t")
  with pytest.raises(ValueError, match=r"loss.name: stored 'ce', now 'pdl'"):
    provenance.check_fingerprint(ce, fp(**{"loss.name": "pdl"}), "test")
  # A fingerprint stored before (the whole loss section) still resumes, and still
  # refuses a change of the run's own loss hyperparameters.
  old = dict(fp(**{"loss.name": "pdl"}), loss={"name": "pdl", "alpha": 0.5, "gamma": 2.0,
                                               "itf_lambda": 0.4, **fp()["loss"]})
  provenance.check_fingerprint(old, fp(**{"loss.name": "pdl"}), "test")
  with pytest.raises(ValueError, match=r"loss.alpha: stored 0.5, now 0.25"):
    provenance.check_fingerprint(old, fp(**{"loss.name": "pdl", "loss.alpha": 0.25}), "t")


def test_chunk_strategy_is_vocab_when_the_batch_is_split():
  """The tokens strategy all-reduces a [D, V] sum per row block on a split batch."""
  c = tiny_config()
  assert batch_loss.chunk_strategy(c.loss, 1) == "tokens"
  assert batch_loss.chunk_strategy(c.loss, 8) == "vocab"
  c.loss.chunk_strategy = "tokens"
  assert batch_loss.chunk_strategy(c.loss, 8) == "tokens"

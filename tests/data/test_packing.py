"""Packing (config.data.packing): several examples per row, the same per-example loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from pdl_jax.data import examples as examples_lib
from pdl_jax.data import batches as batches_lib
from pdl_jax.data import packing
from pdl_jax.losses import batch_loss
from pdl_jax.losses import window
from pdl_jax.models import decoder
from pdl_jax.models import config as model_config

V, PAD, EOS = 50, 0, 1


def _examples(n=13, total=25, seed=0) -> examples_lib.Examples:
  """Prefix-LM rows of random lengths: prompt then target + EOS, padded."""
  r = np.random.default_rng(seed)
  seqs = np.full((n, total), PAD, np.int32)
  starts, lengths = [], []
  for i in range(n):
    p, t = int(r.integers(2, 9)), int(r.integers(1, 6))
    seqs[i, :p + t] = r.integers(3, V, p + t)
    seqs[i, p + t] = EOS
    starts.append(p)
    lengths.append(p + t + 1)
  return examples_lib.Examples(seqs, np.array(starts, np.int32), np.array(lengths, np.int32),
                           [""] * n, [""] * n, 0, 0)


def test_pack_examples_first_fit_layout():
  ex = _examples()
  packed = packing.pack_examples(ex, loss_capacity=12, pad_id=PAD)
  assert len(packed) < len(ex)
  assert examples_lib.padding_share(packed) < examples_lib.padding_share(ex)
  seen = []
  for r in range(len(packed)):
    seg, pos = packed.segment_ids[r], packed.positions[r]
    assert packed.loss_mask[r].sum() <= 12  # every row's targets fit the window
    assert packed.lengths[r] == (seg > 0).sum()
    for s in range(1, seg.max() + 1):
      cols = np.flatnonzero(seg == s)
      assert np.array_equal(cols, np.arange(cols[0], cols[-1] + 1))  # contiguous
      np.testing.assert_array_equal(pos[cols], np.arange(len(cols)))  # positions restart
      seen.append((tuple(packed.seqs[r, cols]), tuple(packed.loss_mask[r, cols])))
  assert np.all(packed.seqs[packed.segment_ids == 0] == PAD)
  # Every example exactly once, with its own loss positions.
  want = [(tuple(ex.seqs[i, :ex.lengths[i]]),
           tuple(np.arange(ex.lengths[i]) >= ex.target_start[i])) for i in range(len(ex))]
  assert sorted(seen) == sorted(want)
  # First fit: example 0 and 1 share row 0 when both fit.
  assert packed.segment_ids[0].max() >= 2
  with pytest.raises(ValueError, match="loss capacity 2"):
    packing.pack_examples(ex, loss_capacity=2, pad_id=PAD)


def test_target_start_zero_predicts_no_label_across_examples():
  """An example whose target starts at position 0 (an empty prompt, no BOS): packed,
  its first token is no loss label (it would be predicted from the previous
  example's EOS); every loss label's input is in the label's own segment, and each
  example's (input, label) loss pairs are those of the example unpacked."""
  ex = _examples()
  ex.target_start[::2] = 0
  packed = packing.pack_examples(ex, loss_capacity=16, pad_id=PAD)
  assert len(packed) < len(ex) and packed.segment_ids.max() >= 2
  b = batches_lib.make_batch(packed, np.arange(len(packed)))
  on = b["loss_mask"] > 0
  np.testing.assert_array_equal(b["segment_ids"][on], packed.segment_ids[:, 1:][on])
  u = batches_lib.make_batch(ex, np.arange(len(ex)))
  pairs = lambda bb: sorted(zip(bb["inputs"][bb["loss_mask"] > 0].tolist(),
                                bb["labels"][bb["loss_mask"] > 0].tolist()))
  assert pairs(b) == pairs(u)
  assert packed.loss_mask.sum() == ex.loss_positions()[:, 1:].sum()
  # Position 0 is no loss position of an unpacked example either.
  assert not ex.loss_positions()[:, 0].any()


def _model():
  cfg = model_config.DecoderConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4,
                                  num_kv_heads=2, head_dim=8, mlp_dim=64)
  model = decoder.Decoder(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  return model, params


def test_packed_per_example_nll_equals_unpacked():
  model, params = _model()
  ex = _examples()
  packed = packing.pack_examples(ex, loss_capacity=16, pad_id=PAD)
  unpacked_b = batches_lib.make_batch(ex, np.arange(len(ex)))
  packed_b = batches_lib.make_batch(packed, np.arange(len(packed)))

  def token_nll(batch):
    logits, _ = model.apply({"params": params}, jnp.asarray(batch["inputs"]),
                            batch.get("positions"), segment_ids_BxL=batch.get("segment_ids"))
    logp = jax.nn.log_softmax(logits)
    nll = -np.take_along_axis(np.asarray(logp), batch["labels"][..., None], -1)[..., 0]
    return nll[batch["loss_mask"] > 0]  # row-major: examples in row order

  # The packed rows' loss tokens, example by example, in the order they were packed.
  order = []
  for r in range(len(packed)):
    for s in range(1, packed.segment_ids[r].max() + 1):
      cols = np.flatnonzero(packed.segment_ids[r] == s)
      order.append(next(i for i in range(len(ex)) if ex.lengths[i] == len(cols)
                        and np.array_equal(ex.seqs[i, :len(cols)], packed.seqs[r, cols])))
  per_example = np.split(token_nll(unpacked_b),
                         np.cumsum(ex.lengths - ex.target_start)[:-1])
  want = np.concatenate([per_example[i] for i in order])
  np.testing.assert_allclose(token_nll(packed_b), want, rtol=2e-5, atol=2e-6)


class _Config(dict):
  __getattr__ = dict.__getitem__


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("capacity", [None, 16])
def test_packed_batch_loss_and_gradient_equal_unpacked(chunked, capacity):
  """The PDL loss of all examples, packed or not (with the window: the packed one
  gathers every segment's target), and its gradient."""
  model, params = _model()
  ex = _examples()
  packed = packing.pack_examples(ex, loss_capacity=16, pad_id=PAD)
  weights_V = jnp.asarray(np.random.default_rng(1).uniform(0.2, 3.0, V), jnp.float32)
  kw = dict(model=model, loss_name="pdl", loss_params={}, chunked=chunked, chunk_size=16,
            eos_id=EOS, eos_weight=None, capacity=capacity)
  unpacked_capacity = None if capacity is None else window.capacity_for(6, 24)

  def loss(p, batch, cap):
    return batch_loss.compute_loss(p, {k: jnp.asarray(v) for k, v in batch.items()},
                                  weights_V, None, **{**kw, "capacity": cap})[0]

  a, ga = jax.value_and_grad(loss)(params, batches_lib.make_batch(ex, np.arange(len(ex))),
                                   unpacked_capacity)
  b, gb = jax.value_and_grad(loss)(params, batches_lib.make_batch(packed, np.arange(len(packed))),
                                   capacity)
  np.testing.assert_allclose(b, a, rtol=2e-5)
  for x, y in zip(jax.tree.leaves(gb), jax.tree.leaves(ga)):
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)


def test_gather_loss_positions_keeps_every_span():
  mask = jnp.asarray([[0, 1, 1, 0, 0, 1, 0, 1], [1, 0, 0, 0, 0, 0, 0, 0]], jnp.float32)
  labels = jnp.arange(16).reshape(2, 8)
  hidden = jnp.arange(16, dtype=jnp.float32).reshape(2, 8, 1)
  h, l, m = window.gather_loss_positions(hidden, labels, mask, 4)
  np.testing.assert_array_equal(l[0], [1, 2, 5, 7])
  np.testing.assert_array_equal(m[0], [1, 1, 1, 1])
  np.testing.assert_array_equal(m[1], [1, 0, 0, 0])
  assert l[1, 0] == 8 and h.shape == (2, 4, 1)
  assert packing.packed_capacity(31, 192) == 64 and packing.packed_capacity(128, 256) == 256


def test_a_packed_run_trains(tmp_path, capfd):
  import json
  import tensorflow_datasets as tfds
  from test_train import run
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    run(tmp_path, **{"data.packing": True})
  err = capfd.readouterr().err
  assert "packed 40 examples into" in err, err[-2000:]
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert all(np.isfinite(m["train/loss"]) for m in lines if "train/loss" in m)
  assert any("eval/nll" in m for m in lines)


def test_packing_refuses_unlikelihood():
  from configs import dialogue
  from pdl_jax import config_checks
  c = dialogue.get_config("smoke")
  c.data.packing = True
  c.loss.name = "unlikelihood"
  with pytest.raises(ValueError, match="packing=True with config.loss.name='unlikelihood'"):
    config_checks.validate_config(c)
  c.loss.name = "focal"  # per-token losses pack
  config_checks.validate_config(c)

"""Chunked PDL from hidden states against the unchunked pdl_loss(hidden @ unembed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdl_jax import chunked_loss as C
from pdl_jax import loss as L
from pdl_jax import sharding


def make_case(seed, n, d, v, alpha, mask_p=0.25):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(0, 1, (n, d)), jnp.float32)
  unembed = jnp.asarray(rng.normal(0, 1 / np.sqrt(d), (d, v)) * 3, jnp.float32)
  labels = jnp.asarray(rng.integers(0, v, n), jnp.int32)
  mask = jnp.asarray(rng.random(n) > mask_p, jnp.float32)
  counts = rng.zipf(1.4, v)
  counts[rng.random(v) < 0.1] = 0
  weights = jnp.asarray(L.power_law_weights(counts, alpha))
  return hidden, unembed, labels, weights, mask


def naive(hidden, unembed, labels, weights, mask):
  logits = jnp.matmul(hidden, unembed, preferred_element_type=jnp.float32)
  return L.pdl_loss(logits, labels, weights, mask=mask)


def chunked(chunk_size):
  def f(hidden, unembed, labels, weights, mask):
    return C.pdl_loss_from_hidden(hidden, unembed, labels, weights, mask_N=mask,
                                  chunk_size=chunk_size)
  return f


def value_and_grads(fn, args):
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(*args)


def assert_close(a, b, rtol, atol_frac=1e-6):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  np.testing.assert_allclose(a, b, rtol=rtol, atol=atol_frac * np.abs(b).max())


@pytest.mark.parametrize("n, d, v, chunk_size, alpha", [
    (32, 16, 100, 25, 0.0),    # chunk divides V
    (32, 16, 100, 30, 1.0),    # last chunk overlaps the previous one
    (17, 8, 257, 64, 0.5),     # odd sizes
    (40, 24, 64, 1000, 2.0),   # chunk larger than V
    (24, 12, 300, 7, 1.0),     # many small chunks
])
def test_value_and_grads_match_unchunked(n, d, v, chunk_size, alpha):
  args = make_case(n + v, n, d, v, alpha)
  want, (want_dh, want_dw) = value_and_grads(naive, args)
  got, (got_dh, got_dw) = value_and_grads(chunked(chunk_size), args)
  assert float(got) == pytest.approx(float(want), rel=1e-5)
  assert_close(got_dh, want_dh, 1e-5)
  assert_close(got_dw, want_dw, 1e-5)


def test_aux_and_ce_match_unchunked():
  hidden, unembed, labels, weights, mask = make_case(0, 48, 16, 90, 1.0)
  logits = hidden @ unembed
  _, want = L.pdl_loss_and_aux(logits, labels, weights, mask=mask)
  _, got = C.pdl_loss_from_hidden_and_aux(hidden, unembed, labels, weights,
                                          mask_N=mask, chunk_size=32)
  for field in L.LossAux._fields:
    assert float(getattr(got, field)) == pytest.approx(float(getattr(want, field)),
                                                       rel=1e-5)
  ce, _ = C.pdl_loss_from_hidden_and_aux(hidden, unembed, labels, None, mask_N=mask,
                                         chunk_size=32)
  assert float(ce) == pytest.approx(float(L.cross_entropy_loss(logits, labels, mask=mask)),
                                    rel=1e-5)


def test_all_masked_and_invalid_labels():
  hidden, unembed, labels, weights, _ = make_case(1, 8, 4, 20, 1.0)
  f = chunked(6)
  value, grads = value_and_grads(f, (hidden, unembed, labels, weights, jnp.zeros(8)))
  assert float(value) == 0.0
  for g in grads:
    np.testing.assert_array_equal(np.asarray(g), 0.0)
  bad = labels.at[0].set(-100).at[1].set(20)
  mask = jnp.ones(8)
  got = value_and_grads(f, (hidden, unembed, bad, weights, mask))
  want = value_and_grads(naive, (hidden, unembed, bad, weights, mask))
  assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-5)
  assert_close(got[1][0], want[1][0], 1e-5)
  assert_close(got[1][1], want[1][1], 1e-5)


def test_bfloat16_inputs_accumulate_in_float32():
  hidden, unembed, labels, weights, mask = make_case(2, 64, 32, 200, 1.0)
  hb, ub = hidden.astype(jnp.bfloat16), unembed.astype(jnp.bfloat16)
  got, (dh, dw) = value_and_grads(chunked(48), (hb, ub, labels, weights, mask))
  assert got.dtype == jnp.float32 and dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  # Reference: the same bfloat16-rounded inputs in float32.
  want, (want_dh, want_dw) = value_and_grads(
      naive, (hb.astype(jnp.float32), ub.astype(jnp.float32), labels, weights, mask))
  assert float(got) == pytest.approx(float(want), rel=1e-5)
  # Gradients are rounded to bfloat16 on output (8 bits of mantissa).
  assert_close(dh, want_dh, 1e-2, 1e-2)
  assert_close(dw, want_dw, 1e-2, 1e-2)


def test_sharded_hidden_over_batch_and_unembed_over_vocab():
  args = make_case(3, 64, 16, 120, 1.0)
  want, (want_dh, want_dw) = value_and_grads(chunked(40), args)
  mesh = sharding.make_mesh({"data": 4, "model": 2})
  hs = sharding.named_sharding(mesh, "batch", "embed")
  us = sharding.named_sharding(mesh, "embed", "vocab")
  ls = sharding.named_sharding(mesh, "batch")
  rep = sharding.replicated(mesh)
  fn = jax.jit(jax.value_and_grad(chunked(40), argnums=(0, 1)),
               in_shardings=(hs, us, ls, rep, ls), out_shardings=(rep, (hs, us)))
  sharded_args = [jax.device_put(a, s) for a, s in zip(args, (hs, us, ls, rep, ls))]
  got, (dh, dw) = fn(*sharded_args)
  assert dw.sharding.spec == jax.sharding.PartitionSpec(None, "model")
  assert float(got) == pytest.approx(float(want), rel=1e-5)
  assert_close(dh, want_dh, 1e-5)
  assert_close(dw, want_dw, 1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(hidden=jnp.zeros((4, 3))), r"hidden's last axis \(3\).*first axis \(8\)"),
    (dict(labels=jnp.zeros(5, jnp.int32)), r"labels shape \(5,\)"),
    (dict(labels=jnp.zeros(4)), "integer.*float32"),
    (dict(weights=jnp.ones(11)), r"unembed's last axis \(10\).*len\(weights\) \(11\)"),
    (dict(chunk_size=0), "chunk_size must be >= 1; got 0"),
])
def test_bad_input(kwargs, match):
  args = dict(hidden=jnp.zeros((4, 8)), unembed=jnp.zeros((8, 10)),
              labels=jnp.zeros(4, jnp.int32), weights=jnp.ones(10), chunk_size=4)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    C.pdl_loss_from_hidden(args["hidden"], args["unembed"], args["labels"],
                           args["weights"], chunk_size=args["chunk_size"])

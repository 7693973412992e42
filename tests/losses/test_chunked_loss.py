"""Chunked PDL from hidden states against the unchunked pdl_loss(hidden @ unembed).

Both strategies: "vocab" (vocabulary chunks, chunk_size) and "tokens" (row chunks,
row_chunk_size; gradients formed in the forward pass).
"""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from pdl_jax import losses
from pdl_jax import sharding
from pdl_jax.losses import chunked as chunked_loss
from pdl_jax.losses import pdl
from pdl_jax.losses import registry

STRATEGIES = ("vocab", "tokens")


def make_case(seed, n, d, v, alpha, mask_p=0.25):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(0, 1, (n, d)), jnp.float32)
  unembed = jnp.asarray(rng.normal(0, 1 / np.sqrt(d), (d, v)) * 3, jnp.float32)
  labels = jnp.asarray(rng.integers(0, v, n), jnp.int32)
  mask = jnp.asarray(rng.random(n) > mask_p, jnp.float32)
  counts = rng.zipf(1.4, v)
  counts[rng.random(v) < 0.1] = 0
  weights = jnp.asarray(pdl.power_law_weights(counts, alpha))
  return hidden, unembed, labels, weights, mask


def assert_same_loss_aux_and_grads(naive_fn, chunked_fn, hidden, unembed, rtol=1e-5):
  """fn(hidden, unembed) -> (loss, LossAux): the chunked one's loss, every aux field
  and the gradients wrt hidden and unembed equal the naive one's. Returns the naive
  (loss, aux, grads)."""
  (want, want_aux), want_g = jax.jit(jax.value_and_grad(
      naive_fn, argnums=(0, 1), has_aux=True))(hidden, unembed)
  (got, got_aux), got_g = jax.jit(jax.value_and_grad(
      chunked_fn, argnums=(0, 1), has_aux=True))(hidden, unembed)
  assert float(got) == pytest.approx(float(want), rel=rtol)
  for field in pdl.LossAux._fields:
    assert float(getattr(got_aux, field)) == pytest.approx(
        float(getattr(want_aux, field)), rel=rtol), field
  for g, w in zip(got_g, want_g):
    assert_close(g, w, rtol)
  return want, want_aux, want_g


def naive(hidden, unembed, labels, weights, mask):
  logits = jnp.matmul(hidden, unembed, preferred_element_type=jnp.float32)
  return pdl.pdl_loss(logits, labels, weights, mask=mask)


def chunked(chunk_size, strategy="vocab", row_chunk_size=None):
  """The chunked PDL; chunk_size is vocabulary columns ("vocab") or, when
  row_chunk_size is None, also the rows per chunk ("tokens")."""
  rows = chunk_size if row_chunk_size is None else row_chunk_size
  def f(hidden, unembed, labels, weights, mask):
    return chunked_loss.pdl_loss_from_hidden(hidden, unembed, labels, weights, mask_N=mask,
                                  chunk_size=chunk_size, strategy=strategy,
                                  row_chunk_size=rows)
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
  _, want = pdl.pdl_loss_and_aux(logits, labels, weights, mask=mask)
  _, got = chunked_loss.pdl_loss_from_hidden_and_aux(hidden, unembed, labels, weights,
                                          mask_N=mask, chunk_size=32, strategy="vocab")
  for field in pdl.LossAux._fields:
    assert float(getattr(got, field)) == pytest.approx(float(getattr(want, field)),
                                                       rel=1e-5)
  ce, _ = chunked_loss.pdl_loss_from_hidden_and_aux(hidden, unembed, labels, None, mask_N=mask,
                                         chunk_size=32, strategy="vocab")
  assert float(ce) == pytest.approx(float(pdl.cross_entropy_loss(logits, labels, mask=mask)),
                                    rel=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_all_masked_and_invalid_labels(strategy):
  hidden, unembed, labels, weights, _ = make_case(1, 8, 4, 20, 1.0)
  f = chunked(6, strategy)  # "tokens": 8 rows in chunks of 6, the last one padded
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


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bfloat16_inputs_accumulate_in_float32(strategy):
  hidden, unembed, labels, weights, mask = make_case(2, 64, 32, 200, 1.0)
  hb, ub = hidden.astype(jnp.bfloat16), unembed.astype(jnp.bfloat16)
  got, (dh, dw) = value_and_grads(chunked(48, strategy),
                                  (hb, ub, labels, weights, mask))
  assert got.dtype == jnp.float32 and dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  # Reference: the same bfloat16-rounded inputs in float32.
  want, (want_dh, want_dw) = value_and_grads(
      naive, (hb.astype(jnp.float32), ub.astype(jnp.float32), labels, weights, mask))
  assert float(got) == pytest.approx(float(want), rel=1e-5)
  # Gradients are rounded to bfloat16 on output (8 bits of mantissa).
  assert_close(dh, want_dh, 1e-2, 1e-2)
  assert_close(dw, want_dw, 1e-2, 1e-2)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sharded_hidden_over_batch_and_unembed_over_vocab(strategy):
  args = make_case(3, 64, 16, 120, 1.0)
  want, (want_dh, want_dw) = value_and_grads(naive, args)
  mesh = sharding.make_mesh({"data": 4, "model": 2})
  hs = sharding.named_sharding(mesh, "batch", "embed")
  us = sharding.named_sharding(mesh, "embed", "vocab")
  ls = sharding.named_sharding(mesh, "batch")
  rep = sharding.replicated(mesh)
  fn = jax.jit(jax.value_and_grad(chunked(40, strategy, 16), argnums=(0, 1)),
               in_shardings=(hs, us, ls, rep, ls), out_shardings=(rep, (hs, us)))
  sharded_args = [jax.device_put(a, s) for a, s in zip(args, (hs, us, ls, rep, ls))]
  if strategy == "tokens":
    # Each row chunk stays split over "data": no device gathers every row.
    assert "all-gather" not in fn.lower(*sharded_args).compile().as_text()
  got, (dh, dw) = fn(*sharded_args)
  # The gradient stays vocabulary-sharded (a size-1 "fsdp" axis in the spec is the
  # same placement as None).
  assert dw.sharding.is_equivalent_to(
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model")), 2)
  assert float(got) == pytest.approx(float(want), rel=1e-5)
  assert_close(dh, want_dh, 1e-5)
  assert_close(dw, want_dw, 1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(hidden=jnp.zeros((4, 3))), r"hidden's last axis \(3\).*first axis \(8\)"),
    (dict(labels=jnp.zeros(5, jnp.int32)), r"labels shape \(5,\)"),
    (dict(labels=jnp.zeros(4)), "integer.*float32"),
    (dict(weights=jnp.ones(11)), r"unembed's last axis \(10\).*len\(weights\) \(11\)"),
    (dict(chunk_size=0, strategy="vocab"), "chunk_size must be >= 1; got 0"),
    (dict(row_chunk_size=0), "row_chunk_size must be >= 1; got 0"),
    (dict(strategy="rows"), r"strategy must be one of \('tokens', 'vocab'\); got 'rows'"),
])
def test_bad_input(kwargs, match):
  args = dict(hidden=jnp.zeros((4, 8)), unembed=jnp.zeros((8, 10)),
              labels=jnp.zeros(4, jnp.int32), weights=jnp.ones(10), chunk_size=4,
              strategy="tokens", row_chunk_size=None)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    chunked_loss.pdl_loss_from_hidden(args["hidden"], args["unembed"], args["labels"],
                           args["weights"], chunk_size=args["chunk_size"],
                           strategy=args["strategy"], row_chunk_size=args["row_chunk_size"])


# ---------------------------------------------------------------------------
# The token-chunked strategy.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n, d, v, rows, alpha", [
    (32, 16, 100, 8, 0.0),     # rows divide N
    (37, 16, 100, 8, 1.0),     # last chunk padded
    (17, 8, 257, 64, 0.5),     # chunk larger than N
    (24, 12, 300, 1, 1.0),     # one row per chunk
    (50, 24, 64, 7, 2.0),      # odd sizes
])
def test_tokens_value_and_grads_match_unchunked(n, d, v, rows, alpha):
  args = make_case(n + v, n, d, v, alpha)
  want, (want_dh, want_dw) = value_and_grads(naive, args)
  got, (got_dh, got_dw) = value_and_grads(chunked(1000, "tokens", rows), args)
  assert float(got) == pytest.approx(float(want), rel=1e-5)
  assert_close(got_dh, want_dh, 1e-5)
  assert_close(got_dw, want_dw, 1e-5)


@pytest.mark.parametrize("name", sorted(
    n for n in registry.CHUNKABLE if registry.spec(n).token_loss_from_stats is None))
@pytest.mark.parametrize("reduction", pdl.REDUCTIONS)
def test_tokens_every_chunkable_loss_both_reductions(name, reduction):
  if name == "ce" and reduction == "weights":
    pytest.skip("ce takes no reduction (its token weights are all 1)")
  hidden, unembed, labels, weights, mask = make_case(4, 45, 12, 70, 1.0)
  labels = labels.at[3].set(-100).at[5].set(70)  # out of range: ignored
  params = {} if name == "ce" else {"reduction": reduction}
  ref = losses.get_loss(name, **params)
  fn = chunked_loss.get_loss_from_hidden(name, **params)

  def naive_fn(h, u):
    logits = jnp.matmul(h, u, preferred_element_type=jnp.float32)
    return ref(logits, labels, weights, mask=mask)

  def tokens_fn(h, u):
    return fn(h, u, labels, weights, mask_N=mask, strategy="tokens", row_chunk_size=16)

  want, want_aux, _ = assert_same_loss_aux_and_grads(naive_fn, tokens_fn, hidden, unembed)
  # Undifferentiated (evaluation): the same value and aux.
  plain, plain_aux = jax.jit(tokens_fn)(hidden, unembed)
  assert float(plain) == pytest.approx(float(want), rel=1e-5)
  assert float(plain_aux.nll) == pytest.approx(float(want_aux.nll), rel=1e-5)


def _dot_count(jaxpr) -> int:
  """dot_general equations in a jaxpr, inner jaxprs (scan bodies) included once."""
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      count += 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += _dot_count(sub)
  return count


def test_tokens_plain_call_is_one_matmul_and_grad_three():
  """Evaluation does no gradient work; differentiation needs 3 matmuls per chunk
  (logits, d hidden, d unembed), not the vocabulary path's 4."""
  args = make_case(5, 40, 8, 50, 1.0)
  f = chunked(1000, "tokens", 16)
  assert _dot_count(jax.make_jaxpr(f)(*args).jaxpr) == 1
  assert _dot_count(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(*args).jaxpr) == 3
  assert _dot_count(jax.make_jaxpr(
      jax.grad(chunked(16, "vocab"), argnums=(0, 1)))(*args).jaxpr) == 4
  want = naive(*args)
  assert float(jax.jit(f)(*args)) == pytest.approx(float(want), rel=1e-5)
  assert float(f(*args)) == pytest.approx(float(want), rel=1e-5)


def test_tokens_gradient_wrt_weights_matches_unchunked():
  args = make_case(6, 30, 8, 40, 1.0)
  want = jax.jit(jax.grad(naive, argnums=3))(*args)
  got = jax.jit(jax.grad(chunked(1000, "tokens", 8), argnums=3))(*args)
  assert_close(got, want, 1e-5)


def test_default_row_chunk_size_is_512_rows_with_blocks_under_512_mib():
  assert chunked_loss.default_row_chunk_size(32_000) == 512
  assert chunked_loss.default_row_chunk_size(128_000) == 512
  assert chunked_loss.default_row_chunk_size(262_144) == 512
  assert chunked_loss.default_row_chunk_size(300_000) == 440
  assert chunked_loss.default_row_chunk_size(10**9) == 8


# ---------------------------------------------------------------------------
# Focal, label smoothing (from the NLL and the uniform cross-entropy) and FACE's
# argmax, by vocabulary chunks.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, params", [
    ("focal", {"gamma": 2.0}), ("focal", {"gamma": 0.0}), ("focal", {"gamma": 0.5}),
    ("label_smoothing", {"smoothing": 0.1}), ("label_smoothing", {"smoothing": 0.0}),
    ("dft", {})])
@pytest.mark.parametrize("chunk_size", [16, 70, 1000])  # clamped last chunk, one, wider
def test_stats_losses_match_unchunked(name, params, chunk_size):
  hidden, unembed, labels, weights, mask = make_case(6, 45, 12, 70, 1.0)
  labels = labels.at[3].set(-100).at[5].set(70)  # out of range: ignored
  ref = losses.get_loss(name, **params)
  fn = chunked_loss.get_loss_from_hidden(name, **params)

  def naive_fn(h, u):
    return ref(jnp.matmul(h, u, preferred_element_type=jnp.float32), labels, None,
               mask=mask)

  def chunked_fn(h, u):
    return fn(h, u, labels, None, mask_N=mask, chunk_size=chunk_size)

  _, _, want_g = assert_same_loss_aux_and_grads(naive_fn, chunked_fn, hidden, unembed)
  assert float(jnp.abs(want_g[0]).max()) > 0


def test_token_stats_against_numpy():
  """The two statistics (and their VJP) against a float64 numpy reference."""
  hidden, unembed, labels, _, _ = make_case(7, 9, 6, 23, 1.0)
  logits = np.asarray(hidden, np.float64) @ np.asarray(unembed, np.float64)
  lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
  want_nll = lse - logits[np.arange(9), np.asarray(labels)]
  want_unif = lse - logits.mean(1)
  nll, unif = chunked_loss.chunked_token_stats(hidden, unembed, labels, 5)
  np.testing.assert_allclose(np.asarray(nll), want_nll, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(unif), want_unif, rtol=1e-5)
  g1, g2 = np.linspace(0.5, 1.5, 9), np.linspace(-1.0, 1.0, 9)
  _, vjp = jax.vjp(lambda h: chunked_loss.chunked_token_stats(h, unembed, labels, 5), hidden)
  (dh,) = vjp((jnp.asarray(g1, jnp.float32), jnp.asarray(g2, jnp.float32)))
  p = np.exp(logits - lse[:, None])
  onehot = np.eye(23)[np.asarray(labels)]
  dlogits = g1[:, None] * (p - onehot) + g2[:, None] * (p - 1 / 23)
  np.testing.assert_allclose(np.asarray(dh), dlogits @ np.asarray(unembed, np.float64).T,
                             rtol=1e-4, atol=1e-6)


def test_chunked_argmax_equals_argmax_with_ties():
  hidden, unembed, _, _, _ = make_case(8, 30, 6, 53, 1.0)
  # Ties across chunks: duplicate columns 3 -> 40 and 10 -> 11 (first index wins).
  unembed = unembed.at[:, 40].set(unembed[:, 3]).at[:, 11].set(unembed[:, 10])
  want = jnp.argmax(hidden @ unembed, axis=1)
  for chunk_size in (7, 16, 53, 100):
    np.testing.assert_array_equal(np.asarray(chunked_loss.chunked_argmax(hidden, unembed, chunk_size)),
                                  np.asarray(want))


def test_face_chunked_objective_equals_full_logits():
  """FACE through the objective: counts from the chunked argmax, its weighted loss by
  chunks: the same loss, counts and gradients as with the full logits."""
  from pdl_jax.losses import batch_loss
  from pdl_jax.models import decoder
  from pdl_jax.models import config as model_config
  import flax.linen as nn
  cfg = model_config.DecoderConfig(vocab_size=61, d_model=16, num_layers=1, num_heads=2,
                              num_kv_heads=2, head_dim=8, mlp_dim=32, tied_embeddings=False)
  model = decoder.Decoder(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 61, (3, 10)), jnp.int32)
  batch = {"inputs": tokens, "labels": jnp.roll(tokens, -1, 1),
           "loss_mask": jnp.asarray(rng.random((3, 10)) > 0.3, jnp.float32)}
  state = jnp.asarray(rng.integers(0, 5, 61), jnp.int32)
  outs = []
  for chunked in (False, True):
    fn = lambda p, chunked=chunked: batch_loss.compute_loss(
        p, batch, jnp.ones(61), state, model=model, loss_name="face",
        loss_params={"reduction": None}, chunked=chunked, chunk_size=16, eos_id=1,
        eos_weight=None)
    # Jitted: one compile each instead of an eager dispatch per op (the test's cost).
    (loss, (aux, new_state)), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
    outs.append((float(loss), np.asarray(new_state), grads))
  assert outs[1][0] == pytest.approx(outs[0][0], rel=1e-5)
  np.testing.assert_array_equal(outs[1][1], outs[0][1])
  assert outs[1][1].sum() > state.sum()  # this batch's predictions counted
  for a, b in zip(jax.tree.leaves(outs[1][2]), jax.tree.leaves(outs[0][2])):
    assert_close(a, b, 1e-4)


def _shapes(jaxpr) -> set:
  """Shapes of every value a jaxpr (and its inner jaxprs) makes."""
  out = set()
  for eqn in jaxpr.eqns:
    out |= {tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")}
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out |= _shapes(sub)
  return out


@pytest.mark.parametrize("name, params", [("focal", {"gamma": 2.0}),
                                          ("label_smoothing", {"smoothing": 0.1}),
                                          ("dft", {})])
def test_stats_losses_never_make_the_full_logits(name, params):
  n, v, chunk = 40, 300, 64
  hidden, unembed, labels, _, mask = make_case(9, n, 8, v, 1.0)
  fn = chunked_loss.get_loss_from_hidden(name, **params)
  f = lambda h, u: fn(h, u, labels, None, mask_N=mask, chunk_size=chunk)[0]
  shapes = _shapes(jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1)))(
      hidden, unembed).jaxpr)
  assert (n, chunk) in shapes  # the chunks are there
  assert (n, v) not in shapes  # the [N, V] logits (or their gradient) are not

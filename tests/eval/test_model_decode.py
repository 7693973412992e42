"""The own model (the decoder from a preset) and decoding: shapes, logical axes,
cache == no cache, beam, top-p."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from pdl_jax.eval import decode as decode_lib
from pdl_jax.models import decoder
from pdl_jax.models import config as model_config


def own_model(cfg):
  return decoder.Decoder(model_config.from_model_config(cfg))


@pytest.fixture(scope="module")
def tiny():
  cfg = model_config.preset_config("tiny", vocab_size=50)
  model = own_model(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  return model, nn.meta.unbox(params), params


def test_every_param_has_logical_axes(tiny):
  _, _, boxed = tiny
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  names = {n for x in leaves for n in x.names}
  # kv_heads: the key/value projections' heads (grouped-query attention).
  assert names == {"embed", "mlp", "heads", "kv", "vocab", "kv_heads"}
  from pdl_jax import sharding
  assert names <= {logical for logical, _ in sharding.LOGICAL_AXIS_RULES}


def test_causal_and_hidden(tiny):
  model, params, _ = tiny
  tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 50)
  logits, _ = model.apply({"params": params}, tokens)
  assert logits.shape == (2, 10, 50) and logits.dtype == jnp.float32
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 50)
  logits2, _ = model.apply({"params": params}, changed)
  np.testing.assert_allclose(logits[:, :7], logits2[:, :7], atol=1e-5)  # no peeking ahead
  assert not np.allclose(logits[:, 7:], logits2[:, 7:])
  hidden, _ = model.apply({"params": params}, tokens, return_hidden=True)
  unembed = decoder.unembed_DxV(model, params)
  np.testing.assert_allclose(hidden @ unembed, logits, rtol=1e-5, atol=1e-5)


def test_untied_and_bfloat16():
  cfg = model_config.preset_config("tiny", vocab_size=30, tied_embeddings=False, dtype="bfloat16")
  model = own_model(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  assert params["unembed"].shape == (64, 30) and params["unembed"].dtype == jnp.float32
  logits, _ = model.apply({"params": params}, jnp.ones((2, 4), jnp.int32))
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  with pytest.raises(ValueError, match="'huge'"):
    model_config.preset_config("huge", 10)


def test_left_padding_does_not_change_logits(tiny):
  model, params, _ = tiny
  prompt = [5, 9, 13, 2]
  tokens, mask = decode_lib.left_pad([prompt, [7] * 6], 6, 0)
  logits, _ = model.apply({"params": params}, jnp.asarray(tokens),
                          jnp.maximum(jnp.cumsum(jnp.asarray(mask), 1) - 1, 0), jnp.asarray(mask))
  alone, _ = model.apply({"params": params}, jnp.asarray([prompt]))
  np.testing.assert_allclose(logits[0, -1], alone[0, -1], rtol=1e-5, atol=1e-5)


def test_greedy_with_cache_equals_without(tiny):
  model, params, _ = tiny
  tokens, mask = decode_lib.left_pad([[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]], 5, 0)
  with_cache = decode_lib.generate(model, params, jnp.asarray(tokens), jnp.asarray(mask),
                          jax.random.key(0), max_new_tokens=8, method="greedy",
                          eos_id=1, pad_id=0)
  without = decode_lib.generate_without_cache(model, params, tokens, mask, max_new_tokens=8,
                                     eos_id=1, pad_id=0)
  np.testing.assert_array_equal(np.asarray(with_cache), without)


def test_beam_of_one_is_greedy_and_beam_scores_no_worse(tiny):
  model, params, _ = tiny
  tokens, mask = decode_lib.left_pad([[3, 4, 5], [8, 9, 2]], 3, 0)
  args = (model, params, jnp.asarray(tokens), jnp.asarray(mask))
  greedy = decode_lib.generate(*args, jax.random.key(0), max_new_tokens=6, eos_id=1, pad_id=0)
  beam1 = decode_lib.beam_search(*args, max_new_tokens=6, beam_size=1, eos_id=-1, pad_id=0,
                        length_penalty=0.0)
  # eos=-1: no beam ends early, so beam size 1 is exactly greedy.
  greedy_noeos = decode_lib.generate(*args, jax.random.key(0), max_new_tokens=6, eos_id=-1, pad_id=0)
  np.testing.assert_array_equal(np.asarray(beam1), np.asarray(greedy_noeos))
  beam4 = decode_lib.beam_search(*args, max_new_tokens=6, beam_size=4, eos_id=-1, pad_id=0,
                        length_penalty=0.0)

  def logprob(seq):
    full = np.concatenate([tokens, np.asarray(seq)], axis=1)
    m = np.concatenate([mask, np.ones_like(np.asarray(seq))], axis=1)
    pos = np.maximum(np.cumsum(m, 1) - 1, 0)
    logits, _ = model.apply({"params": params}, full, pos, m)
    lp = jax.nn.log_softmax(logits[:, 2:-1])
    return np.take_along_axis(np.asarray(lp), np.asarray(seq)[..., None], -1).sum((1, 2))

  assert np.all(logprob(beam4) >= logprob(greedy_noeos) - 1e-4)
  assert greedy.shape == (2, 6)


def test_top_p_sampling_is_seeded_and_respects_tiny_p(tiny):
  model, params, _ = tiny
  tokens, mask = decode_lib.left_pad([[3, 4, 5], [8, 9]], 3, 0)
  args = (model, params, jnp.asarray(tokens), jnp.asarray(mask))
  a = decode_lib.generate(*args, jax.random.key(1), max_new_tokens=6, method="top_p", top_p=0.9)
  b = decode_lib.generate(*args, jax.random.key(1), max_new_tokens=6, method="top_p", top_p=0.9)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # With p -> 0 only the argmax survives: top-p equals greedy.
  tiny_p = decode_lib.generate(*args, jax.random.key(2), max_new_tokens=6, method="top_p", top_p=1e-6)
  greedy = decode_lib.generate(*args, jax.random.key(2), max_new_tokens=6, method="greedy")
  np.testing.assert_array_equal(np.asarray(tiny_p), np.asarray(greedy))
  with pytest.raises(ValueError, match="'sample'"):
    decode_lib.decode(*args, jax.random.key(0), method="sample", max_new_tokens=2, eos_id=1, pad_id=0)


def _sorted_nucleus(logits_BxV, top_p):
  """The previous sampler's nucleus, by a full sort (numpy, float64): a boolean
  [B, V] mask of the smallest set whose mass reaches top_p."""
  x = np.asarray(logits_BxV, np.float64)
  order = np.argsort(-x, axis=-1, kind="stable")
  srt = np.take_along_axis(x, order, -1)
  probs = np.exp(srt - srt.max(-1, keepdims=True))
  cum = np.cumsum(probs / probs.sum(-1, keepdims=True), -1)
  cutoff = np.take_along_axis(srt, (cum < top_p).sum(-1, keepdims=True), -1)
  return x >= cutoff


def _previous_top_p_sample(rng, logits_BxV, top_p):
  """Today's sampler before the change (full sort, categorical over V): the reference."""
  sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
  cum_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
  cutoff_B = jnp.take_along_axis(sorted_BxV, jnp.sum(cum_BxV < top_p, -1)[:, None], -1)
  return jax.random.categorical(rng, jnp.where(logits_BxV >= cutoff_B, logits_BxV, -jnp.inf))


def test_nucleus_cutoff_equals_a_full_sort():
  r = np.random.default_rng(0)
  # Flat rows (nucleus of hundreds of tokens), peaked ones (a handful), one-hot, ties.
  logits = np.concatenate([r.normal(0, 1, (4, 3000)), r.normal(0, 8, (4, 3000))]).astype(
      np.float32)
  logits[0, :] = 0.0  # all tied: every token kept
  logits[5, 7] = 100.0  # the argmax alone holds the mass
  logits[:, [3, 500, 2999]] = -np.inf  # banned ids (evaluation bans pad, bos, ...)
  for p in (0.05, 0.5, 0.9, 0.99):
    cutoff = np.asarray(jax.jit(decode_lib.nucleus_cutoff)(jnp.asarray(logits), p))
    np.testing.assert_array_equal(logits >= cutoff, _sorted_nucleus(logits, p), err_msg=str(p))


@pytest.mark.parametrize("scale", [6.0, 0.3])  # peaked: top-k candidates; flat: bisection
def test_top_p_samples_follow_the_nucleus_distribution(scale):
  v, n, p = 100, 40000, 0.9
  logits = np.random.default_rng(1).normal(0, scale, (1, v)).astype(np.float32)
  logits[0, [5, 50]] = -np.inf  # banned ids, as evaluation passes them
  logits_1xV = jnp.asarray(logits)
  keep = _sorted_nucleus(logits_1xV, p)[0]
  probs = np.exp(logits[0].astype(np.float64))
  exact = np.where(keep, probs, 0.0) / probs[keep].sum()
  keys = jax.random.split(jax.random.key(3), n)
  new = jax.jit(jax.vmap(lambda k: decode_lib._top_p_sample(k, logits_1xV, p, 1.0)[0]))(keys)
  old = jax.jit(jax.vmap(lambda k: _previous_top_p_sample(k, logits_1xV, p)[0]))(keys)
  # Which path ran: the candidates hold the nucleus only when it is small.
  assert (keep.sum() <= decode_lib.TOP_P_CANDIDATES) == (scale > 1)
  count_new = np.bincount(np.asarray(new), minlength=v)
  count_old = np.bincount(np.asarray(old), minlength=v)
  assert not count_new[~keep].any() and not count_old[~keep].any()  # only the nucleus
  # Every token of the nucleus within 5 standard deviations of its expected count
  # (a token never drawn, or drawn twice as often, fails), for both samplers.
  expected = exact * n
  tolerance = 5 * np.sqrt(expected) + 5
  assert np.all(np.abs(count_new - expected) <= tolerance), np.abs(count_new - expected).max()
  assert np.all(np.abs(count_old - expected) <= tolerance)


def test_strip_after_eos():
  assert decode_lib.strip_after_eos(np.array([[5, 6, 1, 0, 0], [7, 0, 0, 0, 0]]), 1, 0) == [[5, 6], [7]]


def test_banned_ids_are_never_generated(tiny):
  model, params, _ = tiny
  tokens, mask = decode_lib.left_pad([[3, 4, 5], [8, 9]], 3, 0)
  args = (model, params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0))
  free = np.asarray(decode_lib.decode(*args, method="greedy", max_new_tokens=6, eos_id=-1, pad_id=0))
  banned = tuple(sorted(set(free.ravel().tolist())))
  for method in decode_lib.METHODS:
    out = np.asarray(decode_lib.decode(*args, method=method, max_new_tokens=6, eos_id=-1, pad_id=0,
                              banned_ids=banned))
    assert not set(out.ravel().tolist()) & set(banned)


def test_every_eos_id_ends_a_generation(tiny):
  """Llama 3 instruct stops on three ids, Qwen2.5 on two: any of them ends a row, in
  every method, and is cut from the hypothesis."""
  model, params, _ = tiny
  tokens, mask = decode_lib.left_pad([[3, 4, 5], [8, 9]], 3, 0)
  args = (model, params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0))
  # Sampling (a fixed key: the same draw at each step) gives varied tokens to pick two
  # EOS ids from: a token new in row 0 at step i and another new in row 1 at step j,
  # neither made by the other row before its own stop.
  free = np.asarray(decode_lib.decode(*args, method="top_p", max_new_tokens=8, eos_id=-1, pad_id=0,
                             top_p=1.0))
  def firsts(row):
    return [(i, int(t)) for i, t in enumerate(row) if i and t not in row[:i]]
  (i, a), (j, b) = next((x, y) for x in firsts(free[0]) for y in firsts(free[1])
                        if x[1] != y[1] and y[1] not in free[0, :x[0] + 1]
                        and x[1] not in free[1, :y[0] + 1])
  out = np.asarray(decode_lib.decode(*args, method="top_p", max_new_tokens=8, eos_id=(a, b),
                            pad_id=0, top_p=1.0))
  np.testing.assert_array_equal(out[0, :i + 1], free[0, :i + 1])
  np.testing.assert_array_equal(out[1, :j + 1], free[1, :j + 1])
  assert (out[0, i + 1:] == 0).all() and (out[1, j + 1:] == 0).all()  # then padding
  assert decode_lib.strip_after_eos(out, (a, b), 0) == [free[0, :i].tolist(), free[1, :j].tolist()]
  for method in ("greedy", "beam"):
    # Two ids each method's own free run makes (row 0 by step 2, row 1 by step 3).
    own = np.asarray(decode_lib.decode(*args, method=method, max_new_tokens=8, eos_id=-1, pad_id=0))
    x, y = int(own[0, 2]), int(own[1, 3])
    out = np.asarray(decode_lib.decode(*args, method=method, max_new_tokens=8, eos_id=(x, y),
                              pad_id=0))
    for r, row in enumerate(out.tolist()):
      cut = next((i for i, t in enumerate(row) if t in (x, y)), None)
      if method == "greedy":  # stops on either id, with the same tokens up to there
        assert cut is not None and row[:cut + 1] == own[r, :cut + 1].tolist(), row
      if cut is not None:  # (beam may prefer a beam that never stops)
        assert all(t == 0 for t in row[cut + 1:]), (method, row)  # then only padding
  assert decode_lib.strip_after_eos(np.array([[5, 9, 6, 1]]), (1, 9), 0) == [[5]]


def test_first_argmax_equals_argmax_with_ties_and_inf():
  r = np.random.default_rng(0)
  x = np.round(r.normal(0, 1, (50, 40)), 1).astype(np.float32)  # many ties
  x[3] = -np.inf
  x[4, [2, 9]] = np.inf
  np.testing.assert_array_equal(np.asarray(decode_lib.first_argmax(jnp.asarray(x))), x.argmax(-1))

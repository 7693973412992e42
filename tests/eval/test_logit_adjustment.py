"""Logit-adjusted decoding (PDL's free control): the bias against PDL's weights, each
chosen token against the argmax of the adjusted logits of a full forward pass, beta
0 against plain decoding, and the decoding names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from pdl_jax.eval import decode as decode_lib
from pdl_jax.losses import logit_adjustment
from pdl_jax.losses import pdl
from pdl_jax.models import config as model_config
from pdl_jax.models import decoder

VOCAB = 50


@pytest.fixture(scope="module")
def tiny():
  model = decoder.Decoder(model_config.from_model_config(
      model_config.preset_config("tiny", vocab_size=VOCAB)))
  params = nn.meta.unbox(model.init(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))["params"])
  return model, params


def counts(seed=0, size=VOCAB):
  rng = np.random.default_rng(seed)
  c = rng.zipf(1.3, size).astype(np.int64)
  c[rng.random(size) < 0.2] = 0
  return c


@pytest.mark.parametrize("frequency, epsilon", [("relative", None), ("count", None),
                                                ("count", 0.5), ("relative", 1e-3)])
@pytest.mark.parametrize("beta", [0.25, 1.0])
def test_bias_is_log_of_pdl_weights_up_to_a_constant(frequency, epsilon, beta):
  c = counts(1)
  bias = logit_adjustment.frequency_bias(c, beta, epsilon, frequency=frequency)
  log_w = np.log(pdl.power_law_weights(c, beta, epsilon, frequency=frequency).astype(np.float64))
  diff = bias.astype(np.float64) - log_w
  np.testing.assert_allclose(diff, diff[0], atol=1e-5)
  # And independently from the formula: -beta * log(freq + eps).
  freq = c / c.sum() if frequency == "relative" else c.astype(np.float64)
  eps = epsilon if epsilon is not None else (1 / c.sum() if frequency == "relative" else 1.0)
  np.testing.assert_allclose(bias, -beta * np.log(freq + eps), rtol=1e-6)


def test_bias_pads_the_model_vocabulary_and_checks():
  bias = logit_adjustment.frequency_bias(counts(), 0.5, vocab_size=VOCAB + 14)
  assert bias.shape == (VOCAB + 14,) and bias.dtype == np.float32
  np.testing.assert_array_equal(bias[VOCAB:], 0.0)
  np.testing.assert_array_equal(logit_adjustment.frequency_bias(counts(), 0.0), 0.0)
  with pytest.raises(ValueError, match="beta .* must be >= 0"):
    logit_adjustment.frequency_bias(counts(), -0.1)
  with pytest.raises(ValueError, match=r"vocab_size \(10\) must be >= the counts' length"):
    logit_adjustment.frequency_bias(counts(), 0.5, vocab_size=10)
  with pytest.raises(ValueError, match="frequency must be one of"):
    logit_adjustment.frequency_bias(counts(), 0.5, frequency="log")


def adjusted_greedy_reference(model, params, tokens, mask, bias, banned, steps):
  """Greedy by a full forward pass per token: argmax of logits + bias, banned ids
  excluded, in float64 numpy."""
  tokens, mask = np.asarray(tokens), np.asarray(mask)
  out = []
  apply = jax.jit(lambda t, pos, km: model.apply({"params": params}, t, pos, km)[0])
  for _ in range(steps):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    logits = np.asarray(apply(tokens, positions, mask))[:, -1].astype(np.float64) + bias
    logits[:, list(banned)] = -np.inf
    nxt = logits.argmax(-1).astype(np.int32)
    out.append(nxt)
    tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
    mask = np.concatenate([mask, np.ones((len(nxt), 1), mask.dtype)], axis=1)
  return np.stack(out, 1)


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_each_token_is_the_argmax_of_the_adjusted_logits(tiny, beta):
  model, params = tiny
  tokens, mask = decode_lib.left_pad([[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]], 5, 0)
  bias = logit_adjustment.frequency_bias(counts(2), beta)
  banned = (0,)  # no EOS: every row decodes all steps
  got = decode_lib.generate(model, params, jnp.asarray(tokens), jnp.asarray(mask),
                            jax.random.key(0), max_new_tokens=6, method="greedy",
                            eos_id=VOCAB + 1, pad_id=0, banned_ids=banned,
                            bias_V=jnp.asarray(bias))
  want = adjusted_greedy_reference(model, params, tokens, mask, bias, banned, 6)
  np.testing.assert_array_equal(np.asarray(got), want)
  plain = decode_lib.generate(model, params, jnp.asarray(tokens), jnp.asarray(mask),
                              jax.random.key(0), max_new_tokens=6, method="greedy",
                              eos_id=VOCAB + 1, pad_id=0, banned_ids=banned)
  assert not np.array_equal(np.asarray(plain), want)  # the bias changed the choices
  # Beam search of one beam over the adjusted log-probs is the adjusted greedy.
  beam = decode_lib.decode(model, params, jnp.asarray(tokens), jnp.asarray(mask), None,
                           method="beam", beam_size=1, max_new_tokens=6, eos_id=VOCAB + 1,
                           pad_id=0, banned_ids=banned, bias_V=jnp.asarray(bias))
  np.testing.assert_array_equal(np.asarray(beam), want)
  # Top-p with a tiny nucleus keeps only the adjusted argmax.
  top = decode_lib.decode(model, params, jnp.asarray(tokens), jnp.asarray(mask),
                          jax.random.key(5), method="top_p", top_p=1e-6, max_new_tokens=6,
                          eos_id=VOCAB + 1, pad_id=0, banned_ids=banned,
                          bias_V=jnp.asarray(bias))
  np.testing.assert_array_equal(np.asarray(top), want)


@pytest.mark.parametrize("method", ["greedy", "top_p", "beam"])
def test_beta_zero_is_plain_decoding(tiny, method):
  model, params = tiny
  tokens, mask = decode_lib.left_pad([[3, 4, 5], [8, 9, 20, 21]], 4, 0)
  kw = dict(method=method, max_new_tokens=5, eos_id=1, pad_id=0, banned_ids=(0,))
  args = (model, params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(1))
  zero = jnp.asarray(logit_adjustment.frequency_bias(counts(), 0.0))
  np.testing.assert_array_equal(np.asarray(decode_lib.decode(*args, **kw)),
                                np.asarray(decode_lib.decode(*args, bias_V=zero, **kw)))


@pytest.mark.parametrize("name, want", [
    ("greedy", ("greedy", None)), ("top_p_bias0.5", ("top_p", 0.5)),
    ("beam_bias1", ("beam", 1.0)), ("greedy_bias0.25", ("greedy", 0.25))])
def test_parse_method(name, want):
  assert decode_lib.parse_method(name) == want
  assert decode_lib.method_name(*want) == name


@pytest.mark.parametrize("name", ["nucleus", "greedy_bias", "greedy_bias-1", "greedybias0.5",
                                  "top_p_bias0.5x"])
def test_parse_method_refuses(name):
  with pytest.raises(ValueError, match=f"decode method '{name}' is unknown"):
    decode_lib.parse_method(name)


@pytest.mark.parametrize("name,canonical", [("greedy_bias0.50", "greedy_bias0.5"),
                                            ("top_p_bias1.0", "top_p_bias1")])
def test_a_decode_name_has_one_spelling(name, canonical):
  """Metrics and sample files are named by the decode name and the report rebuilds it
  from beta: another spelling of the same beta is refused, naming the canonical one."""
  from configs.common import load_config
  from pdl_jax.eval import evaluator as evaluator_lib

  e = load_config("configs/dialogue.py:smoke").eval
  e.extra_decodes = (name,)
  with pytest.raises(ValueError, match=f"write it as '{canonical}'"):
    evaluator_lib.check(e)
  e.extra_decodes = (canonical,)
  evaluator_lib.check(e)

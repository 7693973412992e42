"""Evaluation's decoding batches: prompts bucketed by length give the generations of
decoding them in order (greedy tokens, and top-p's draws, which are keyed per prompt)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from pdl_jax.eval import evaluator as evaluator_lib
from pdl_jax import sharding
from pdl_jax.models import decoder
from pdl_jax.models import config as model_config


def test_decode_batches_sort_and_round_up():
  lengths = [30, 5, 17, 64, 9, 33, 2]
  batches = evaluator_lib.decode_batches(lengths, 3, 16)
  assert [idx for idx, _ in batches] == [[6, 1, 4], [2, 0, 5], [3]]
  assert [n for _, n in batches] == [16, 48, 64]  # 9 -> 16, 33 -> 48, 64 (the longest)
  assert evaluator_lib.decode_batches(lengths, 3, 100) == [([6, 1, 4], 64), ([2, 0, 5], 64),
                                                      ([3], 64)]  # capped at the longest
  # 0: the given order, every batch padded to the longest prompt.
  assert evaluator_lib.decode_batches(lengths, 3, 0) == [([0, 1, 2], 64), ([3, 4, 5], 64),
                                                    ([6], 64)]
  # A longest prompt at a multiple of the bucket is not rounded up past it.
  assert evaluator_lib.decode_batches([32, 3, 40], 2, 16) == [([1, 0], 32), ([2], 40)]
  assert evaluator_lib.decode_batches([], 4, 16) == []
  # Ties keep their order (a stable sort): the batching is the same on every host.
  assert [idx for idx, _ in evaluator_lib.decode_batches([4, 4, 4, 1], 2, 8)] == [[3, 0], [1, 2]]


@pytest.fixture(scope="module")
def model_and_prompts():
  cfg = model_config.preset_config("tiny", vocab_size=64)
  model = decoder.Decoder(model_config.from_model_config(cfg))
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  r = np.random.default_rng(0)
  prompts = [r.integers(3, 64, n).tolist() for n in (3, 21, 7, 12, 2, 30, 9, 5, 17)]
  return model, params, prompts


def _generate(model_and_prompts, method, batch_size, bucket, seed=1):
  model, params, prompts = model_and_prompts
  mesh = sharding.make_mesh({"data": 1})
  return evaluator_lib.generate_all(
      model, params, prompts, mesh, jax.random.key(seed), method=method,
      batch_size=batch_size, length_bucket=bucket, max_new_tokens=6, eos_ids=(1,),
      pad_id=0, banned_ids=(0, 2), top_p=0.95)


@pytest.mark.parametrize("method", ["greedy", "top_p"])
def test_bucketed_generations_equal_in_order(model_and_prompts, method):
  """Sorted and bucketed batches (other rows, other padded lengths, another batch
  size) give each prompt the generation it gets in order: greedy's tokens, and top-p's
  draws (keyed by the prompt's index, not its batch). Fails if the per-prompt keys or
  the reordering back to the prompts' order is lost."""
  in_order = _generate(model_and_prompts, method, 4, 0)
  assert len(in_order) == 9 and all(isinstance(ids, list) for ids in in_order)
  assert sum(map(len, in_order)) > 9  # real generations, not all empty
  for batch_size, bucket in ((4, 8), (3, 16), (2, 4)):
    assert _generate(model_and_prompts, method, batch_size, bucket) == in_order


def test_beam_search_through_the_bucketed_batches(model_and_prompts):
  assert (_generate(model_and_prompts, "beam", 3, 8)
          == _generate(model_and_prompts, "beam", 4, 0))


def test_top_p_draws_depend_on_the_seed(model_and_prompts):
  a = _generate(model_and_prompts, "top_p", 4, 8, seed=1)
  b = _generate(model_and_prompts, "top_p", 4, 8, seed=2)
  assert a != b


def test_a_rows_top_p_token_does_not_depend_on_the_other_rows():
  """The candidates' fast path and the vocabulary fallback are chosen per row: a peaked
  row (nucleus among the top-64 candidates) sampled next to a flat row (nucleus of
  hundreds of tokens: the fallback) gets the token it gets alone, for its key. Fails
  when one flat row sends the whole batch to the fallback (different token order, so
  another token for the same uniform)."""
  from pdl_jax.eval import decode as decode_lib
  r = np.random.default_rng(0)
  peaked = r.normal(0.0, 4.0, 1000).astype(np.float32)
  flat = r.normal(0.0, 0.01, 1000).astype(np.float32)
  both = jnp.asarray(np.stack([peaked, flat]))

  @jax.jit
  def draw(key):
    keys = jax.random.split(key, 2)
    together = decode_lib._top_p_sample(keys, both, 0.9, 1.0)
    alone = decode_lib._top_p_sample(keys[:1], both[:1], 0.9, 1.0)
    flat_alone = decode_lib._top_p_sample(keys[1:], both[1:], 0.9, 1.0)
    return together, alone[0], flat_alone[0]

  for k in range(50):
    together, alone, flat_alone = draw(jax.random.key(k))
    assert int(together[0]) == int(alone) and int(together[1]) == int(flat_alone), k


def test_raw_uint32_keys_still_decode(model_and_prompts):
  from pdl_jax.eval import decode as decode_lib
  model, params, prompts = model_and_prompts
  tokens, mask = decode_lib.left_pad(prompts[:2], 8, 0)
  typed = decode_lib.generate(model, params, tokens, mask, jax.random.key(3), max_new_tokens=4,
                     method="top_p", row_ids_B=jnp.arange(2))
  raw = decode_lib.generate(model, params, tokens, mask, jax.random.PRNGKey(3), max_new_tokens=4,
                   method="top_p", row_ids_B=jnp.arange(2))
  np.testing.assert_array_equal(typed, raw)

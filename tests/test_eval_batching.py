"""Evaluation's decoding batches: prompts bucketed by length give the generations of
decoding them in order (greedy tokens, and top-p's draws, which are keyed per prompt)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from pdl_jax import evaluate
from pdl_jax import sharding
from pdl_jax.models import decoder as dec
from pdl_jax.models import transformer as M


def test_decode_batches_sort_and_round_up():
  lengths = [30, 5, 17, 64, 9, 33, 2]
  batches = evaluate.decode_batches(lengths, 3, 16)
  assert [idx for idx, _ in batches] == [[6, 1, 4], [2, 0, 5], [3]]
  assert [n for _, n in batches] == [16, 48, 64]  # 9 -> 16, 33 -> 48, 64 (the longest)
  assert evaluate.decode_batches(lengths, 3, 100) == [([6, 1, 4], 64), ([2, 0, 5], 64),
                                                      ([3], 64)]  # capped at the longest
  # 0: the given order, every batch padded to the longest prompt.
  assert evaluate.decode_batches(lengths, 3, 0) == [([0, 1, 2], 64), ([3, 4, 5], 64),
                                                    ([6], 64)]
  # Ties keep their order (a stable sort): the batching is the same on every host.
  assert [idx for idx, _ in evaluate.decode_batches([4, 4, 4, 1], 2, 8)] == [[3, 0], [1, 2]]


@pytest.fixture(scope="module")
def model_and_prompts():
  cfg = M.model_config("tiny", vocab_size=64)
  model = dec.Decoder(dec.from_model_config(cfg))
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  r = np.random.default_rng(0)
  prompts = [r.integers(3, 64, n).tolist() for n in (3, 21, 7, 12, 2, 30, 9, 5, 17)]
  return model, params, prompts


def _generate(model_and_prompts, method, batch_size, bucket, seed=1):
  model, params, prompts = model_and_prompts
  mesh = sharding.make_mesh({"data": 1})
  return evaluate.generate_all(
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


def test_top_p_draws_depend_on_the_seed(model_and_prompts):
  a = _generate(model_and_prompts, "top_p", 4, 8, seed=1)
  b = _generate(model_and_prompts, "top_p", 4, 8, seed=2)
  assert a != b

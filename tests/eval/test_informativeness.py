"""pdl_jax/eval/informativeness.py on hand-made texts whose values are worked out here."""

import math

import numpy as np
import pytest

from pdl_jax.eval import informativeness


def test_words_and_content_words():
  assert informativeness.words("Don't stop: the PVR, PVR's end!") == ["don't", "stop", "the", "pvr",
                                                        "pvr's", "end"]
  assert informativeness.words("O’er the hills") == ["o'er", "the", "hills"]
  words = ["the", "king", "is", "dead", "42", "king"]
  assert informativeness.content_words(words) == {"king", "dead"}
  assert len(informativeness.STOP_WORDS) == 179


def test_nidf_by_hand():
  stats = informativeness.WordStats.from_texts(["a cat", "a dog", "a cat sat", "the end"])
  assert stats.num_docs == 4 and stats.df == {"a": 3, "cat": 2, "dog": 1, "sat": 1, "the": 1,
                                              "end": 1}
  lo, hi = math.log(4 / 3), math.log(4)
  assert stats.nidf("a") == pytest.approx(0.0)
  assert stats.nidf("dog") == pytest.approx(1.0)
  assert stats.nidf("cat") == pytest.approx((math.log(2) - lo) / (hi - lo))
  assert stats.nidf("unseen") == 1.0
  per = informativeness.per_example(["a cat", ""], ["x", "y"], ["p", "q"], stats)
  num, den = per["nidf"]
  assert num[0] == pytest.approx((0 + (math.log(2) - lo) / (hi - lo)) / 2) and den[0] == 1
  assert num[1] == 0 and den[1] == 0  # an empty output is left out
  again = informativeness.WordStats.from_json(stats.to_json())
  assert again.df == stats.df and again.nidf("cat") == stats.nidf("cat")


def test_content_recall_precision_loop_rep_copy():
  stats = informativeness.WordStats.from_texts(["x"])
  outputs = ["The king is dead, the king lives", "go go go home", "a b c a b c a b c",
             "I am a man of the sea and I am", ""]
  refs = ["The old king is dead", "home now", "z", "a man", "nothing here"]
  prompts = ["", "", "", "Say that I am a man of honour", ""]
  per = informativeness.per_example(outputs, refs, prompts, stats)
  # recall: shared distinct content words / the reference's; precision: / the output's.
  np.testing.assert_array_equal(per["content_recall"][0], [2, 1, 0, 1, 0])
  np.testing.assert_array_equal(per["content_recall"][1], [3, 1, 1, 1, 1])
  np.testing.assert_array_equal(per["content_precision"][1], [3, 2, 2, 2, 0])  # b, c
  # loop: a 1-gram three times ("go go go"), a 3-gram three times ("a b c" x3).
  np.testing.assert_array_equal(per["loop"][0], [0, 1, 1, 0, 0])
  # rep_3: 1 - distinct 3-grams / 3-grams, over outputs with a 3-gram.
  assert per["rep_3"][0][2] == pytest.approx(1 - 3 / 7) and per["rep_3"][1][4] == 0
  assert per["rep_3"][0][0] == pytest.approx(0.0)
  # prompt copy: "i am a man" is a 4-gram of the prompt.
  np.testing.assert_array_equal(per["prompt_copy"][0], [0, 0, 0, 1, 0])
  assert informativeness.ratio(*per["loop"]) == pytest.approx(2 / 5)
  with pytest.raises(ValueError, match="one entry per example"):
    informativeness.per_example(["a"], [], ["p"], stats)


def test_ead_against_its_formula():
  outs = ["a b a", "b c"]
  v = 10
  expected = v * (1 - ((v - 1) / v) ** 5)  # five 1-grams
  assert informativeness.ead(outs, 1, v) == pytest.approx(3 / expected)
  assert informativeness.ead(outs, 2, v) == pytest.approx(3 / (v * (1 - ((v - 1) / v) ** 3)))
  assert informativeness.ead([""], 1, v) == 0.0

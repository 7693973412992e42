"""Generation metrics against hand-computed values and the libraries."""

import math

import numpy as np
import pytest

from pdl_jax.eval import metrics as metrics_lib


def test_distinct_and_entropy_by_hand():
  texts = ["the cat sat", "the cat ran"]
  assert metrics_lib.distinct_n(texts, 1) == pytest.approx(4 / 6)
  assert metrics_lib.distinct_n(texts, 2) == pytest.approx(3 / 4)
  # Words: the x2, cat x2, sat, ran -> p = (1/3, 1/3, 1/6, 1/6).
  want = -(2 * (1 / 3) * math.log2(1 / 3) + 2 * (1 / 6) * math.log2(1 / 6))
  assert metrics_lib.unigram_entropy(texts) == pytest.approx(want)
  assert metrics_lib.distinct_n([], 1) == 0.0 and metrics_lib.unigram_entropy([""]) == 0.0


def test_surprisal_rare_share_and_buckets():
  counts = np.array([50, 30, 10, 9, 1, 0])
  head = metrics_lib.frequent_head(counts)
  assert head.tolist() == [True, False, False, False, False, False]  # 50 of 100 = half
  prof = metrics_lib.profile(["a b", "c"], [[0, 0], [4, 5]], counts)
  surprisal = -np.log2((counts + 1) / (100 + 6))
  assert prof["mean_surprisal"] == pytest.approx(np.mean(surprisal[[0, 0, 4, 5]]))
  assert prof["rare_token_share"] == pytest.approx(0.5)
  assert prof["length"] == pytest.approx(1.5)
  hist = metrics_lib.frequency_buckets([[0, 0], [4, 5]], counts, num_buckets=2)
  np.testing.assert_allclose(hist, [0.5, 0.5])


def test_overlap_metrics_match_the_libraries():
  from rouge_score import rouge_scorer
  import sacrebleu

  hyps, refs = ["the cat sat on the mat", "hello there"], ["the cat is on the mat", "hello"]
  out = metrics_lib.overlap_metrics(hyps, refs)
  scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
  want = 100 * np.mean([scorer.score(r, h)["rouge1"].fmeasure for h, r in zip(hyps, refs)])
  assert out["rouge1"] == pytest.approx(want)
  assert out["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
  assert out["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
  perfect = metrics_lib.overlap_metrics(refs, refs)
  assert perfect["rouge1"] == pytest.approx(100.0) and perfect["bleu"] == pytest.approx(100.0)
  with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
    metrics_lib.overlap_metrics(hyps, refs[:1])


def test_cached_stemming_tokenizer_equals_rouge_scores_own():
  """ROUGE with the cached tokenizer equals rouge-score's `use_stemmer=True`, token for
  token and score for score, on texts with punctuation, digits, casing, short words and
  repeats (the cache is hit by the second pass)."""
  from rouge_score import rouge_scorer
  from rouge_score import tokenizers

  texts = ["The cats were running, quickly; RUNNING! 2024's figures.",
           "hello", "", "   ", "générations informatives -- über 3.14 ran runs",
           "Thou art more lovely and more temperate: rough winds do shake"]
  ours, theirs = metrics_lib._stemming_tokenizer(), tokenizers.DefaultTokenizer(True)
  for _ in range(2):
    for t in texts:
      assert ours.tokenize(t) == theirs.tokenize(t), t
  # Pairs that share words only once stemmed ("running"/"runs" -> "run"), so that a
  # tokenizer that did not stem would score them lower.
  hyps = [texts[0], texts[4], texts[5], texts[1]]
  refs = [texts[4], "the cat running quickly", "Thou art lovelier; the wind shakes", "hello"]
  got = metrics_lib.per_example(hyps, refs)["rougeL"]
  want = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  np.testing.assert_array_equal(
      got, [100.0 * want.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)])
  unstemmed = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
  plain = [100.0 * unstemmed.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)]
  assert (got[:3] > np.array(plain[:3])).all() and got[3] == 100.0, (got, plain)


def test_generation_metrics_has_reference_profile():
  counts = np.array([5, 4, 3, 2, 1])
  out = metrics_lib.generation_metrics(["a b"], ["a c"], [[0, 1]], [[0, 2]], counts)
  for key in ("rouge1", "rouge2", "rougeL", "bleu", "chrf", "distinct_1", "distinct_2",
              "unigram_entropy", "mean_surprisal", "rare_token_share", "length",
              "ref_mean_surprisal", "ref_rare_token_share", "ref_length"):
    assert key in out
  assert out["ref_mean_surprisal"] > out["mean_surprisal"]


def test_most_frequent_token_is_in_decile_zero_even_above_a_tenth_of_the_mass():
  counts = np.array([60, 20, 10, 10, 0])
  # Token 0 holds 60% of the mass; ranking by the mass before a token puts it first.
  np.testing.assert_allclose(metrics_lib.frequency_buckets([[0]], counts), [1.0] + [0.0] * 9)
  hist = metrics_lib.frequency_buckets([[1], [2], [3], [4]], counts)
  assert hist[6] == hist[8] == 0.25 and hist[9] == 0.5  # mass before: 0.6, 0.8, 0.9; unseen


def test_unigram_smoothing_is_over_the_tokenizers_ids_only():
  """A pretrained embedding's padding rows (Qwen2: 151,936 rows, 151,665 tokens) are no
  tokens: add-one smoothing over them would lower every token's probability and make
  eval/unigram_nll depend on the padding."""
  from pdl_jax.eval import metrics as metrics_lib
  counts = np.array([3, 1, 0, 0, 0], np.int64)  # ids 3, 4: padding rows
  got = metrics_lib.add_one_log_probs(counts, num_tokens=3)
  np.testing.assert_allclose(got[:3], np.log(np.array([4, 2, 1]) / 7.0))
  assert np.isneginf(got[3:]).all()
  np.testing.assert_allclose(metrics_lib.add_one_log_probs(counts[:3]), got[:3])  # no padding
  np.testing.assert_allclose(metrics_lib.add_one_log_probs(counts),
                             np.log(np.array([4, 2, 1, 1, 1]) / 9.0))  # default: all rows


def test_per_example_means_are_the_logged_metrics():
  from pdl_jax.eval import metrics as metrics_lib
  import sacrebleu
  hyps = ["the cat sat", "a dog", "", "birds sing at dawn today"]
  refs = ["the cat sat on the mat", "a dog ran", "nothing here", "birds sing at dawn"]
  per = metrics_lib.per_example(hyps, refs)
  overall = metrics_lib.overlap_metrics(hyps, refs)
  assert per["rougeL"].mean() == pytest.approx(overall["rougeL"])
  assert per["length"].tolist() == [3.0, 2.0, 0.0, 5.0]
  assert per["chrf"][3] == pytest.approx(sacrebleu.sentence_chrf(hyps[3], [refs[3]]).score)

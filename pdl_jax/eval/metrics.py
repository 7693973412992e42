"""Generation metrics: overlap with references, diversity and informativeness.

- overlap: ROUGE-1/2/L F1 (rouge-score, stemmed), BLEU and chrF (sacrebleu).
- diversity: distinct-1/2 (unique / total word n-grams over all outputs), unigram
  entropy of the output words (bits), mean length in words.
- informativeness, in the tokenizer's ids against the train target counts (the
  same counts PDL's weights come from): mean surprisal = mean -log2 of the smoothed
  relative train frequency of generated tokens; rare-token share = share of
  generated tokens outside the frequent head that holds half the train token mass.

Every profile metric is computed for the references too, so a run shows how far
its outputs are from the human distribution, not just how they change with alpha.
"""

from __future__ import annotations

import collections
import functools
from typing import Sequence

import numpy as np


def overlap_metrics(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
  """ROUGE-1/2/L (F1 x 100), BLEU and chrF of hypotheses against references."""
  from rouge_score import rouge_scorer
  import sacrebleu

  if len(hyps) != len(refs):
    raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references.")
  if not hyps:
    raise ValueError("no hypotheses to score.")
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"],
                                    tokenizer=_stemming_tokenizer())
  sums = collections.Counter()
  for h, r in zip(hyps, refs):
    for name, score in scorer.score(r, h).items():
      sums[name] += score.fmeasure
  out = {name: 100.0 * sums[name] / len(hyps) for name in ("rouge1", "rouge2", "rougeL")}
  out["bleu"] = sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score
  out["chrf"] = sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score
  return out


def per_example(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, np.ndarray]:
  """Per-example metrics float64 [N] (for paired bootstrap intervals): ROUGE-L F1 x 100
  (its mean is eval/rougeL), sentence chrF (the mean of sentence scores, not corpus
  chrF: corpus chrF pools n-gram counts and has no per-example form) and length in
  words (its mean is eval/length)."""
  from rouge_score import rouge_scorer
  import sacrebleu

  if len(hyps) != len(refs):
    raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references.")
  scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_stemming_tokenizer())
  return {
      "rougeL": np.array([100.0 * scorer.score(r, h)["rougeL"].fmeasure
                          for h, r in zip(hyps, refs)]),
      "chrf": np.array([sacrebleu.sentence_chrf(h, [r]).score for h, r in zip(hyps, refs)]),
      "length": np.array([float(len(_words(h))) for h in hyps]),
  }


@functools.lru_cache(maxsize=None)
def _stemming_tokenizer():
  """rouge-score's own tokenizer with its Porter stemmer (what `use_stemmer=True`
  builds), each text's tokens and each word's stem cached: a report scores the same
  references against every run and decoding, and stemming is most of ROUGE's time."""
  from nltk.stem import porter  # what rouge-score stems with
  from rouge_score import tokenize
  from rouge_score import tokenizers

  class StemmingTokenizer(tokenizers.Tokenizer):

    def __init__(self):
      self.stem = functools.lru_cache(maxsize=1 << 17)(porter.PorterStemmer().stem)
      self._tokens = functools.lru_cache(maxsize=1 << 14)(
          lambda text: tuple(tokenize.tokenize(text, self)))

    def tokenize(self, text):
      return list(self._tokens(text))

  return StemmingTokenizer()


def _words(text: str) -> list[str]:
  return text.lower().split()


def distinct_n(texts: Sequence[str], n: int) -> float:
  """Unique word n-grams / all word n-grams over the texts (0 if none)."""
  grams = [tuple(w[i:i + n]) for w in map(_words, texts) for i in range(len(w) - n + 1)]
  return len(set(grams)) / len(grams) if grams else 0.0


def unigram_entropy(texts: Sequence[str]) -> float:
  """Entropy in bits of the word unigram distribution of the texts."""
  counts = np.array(list(collections.Counter(w for t in texts for w in _words(t)).values()),
                    np.float64)
  if counts.size == 0:
    return 0.0
  p = counts / counts.sum()
  return float(-(p * np.log2(p)).sum())


def mass_before(counts_V: np.ndarray) -> np.ndarray:
  """float64 [V]: for each id, the share of all tokens held by the ids ranked before
  it by count (most frequent first; ties by id). The most frequent id has 0."""
  order = np.argsort(-counts_V, kind="stable")
  sorted_counts = counts_V[order].astype(np.float64)
  before = np.empty(len(counts_V), np.float64)
  before[order] = (np.cumsum(sorted_counts) - sorted_counts) / max(sorted_counts.sum(), 1)
  return before


def frequent_head(counts_V: np.ndarray, mass: float = 0.5) -> np.ndarray:
  """Boolean [V]: the most frequent ids that together hold `mass` of the tokens (the
  one that crosses `mass` included)."""
  return (mass_before(counts_V) < mass) & (counts_V > 0)


def add_one_log_probs(counts_V: np.ndarray, num_tokens: int | None = None) -> np.ndarray:
  """Natural log of the add-one smoothed relative frequency of each id: the train
  unigram model (its NLL is the bar a model must clear) and surprisal.

  The smoothing is over the tokenizer's `num_tokens` ids (default: all of counts_V),
  not over a pretrained embedding's padding rows, which no text has: so
  eval/unigram_nll means the same for every model. Padding rows get -inf."""
  counts = counts_V.astype(np.float64)
  n = len(counts) if num_tokens is None else min(int(num_tokens), len(counts))
  out = np.full(len(counts), -np.inf)
  out[:n] = np.log((counts[:n] + 1.0) / (counts[:n].sum() + n))
  return out


def surprisal_bits(counts_V: np.ndarray) -> np.ndarray:
  """-log2 of the add-one smoothed relative frequency of each id."""
  return -add_one_log_probs(counts_V) / np.log(2.0)


def profile(texts: Sequence[str], token_ids: Sequence[Sequence[int]],
            counts_V: np.ndarray) -> dict[str, float]:
  """Diversity and informativeness of a set of texts (outputs or references)."""
  flat = np.fromiter((t for seq in token_ids for t in seq), np.int64)
  flat = flat[(flat >= 0) & (flat < len(counts_V))]
  if flat.size:
    mean_surprisal = float(surprisal_bits(counts_V)[flat].mean())
    rare_share = float((~frequent_head(counts_V)[flat]).mean())
  else:
    mean_surprisal = rare_share = 0.0
  return {
      "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
      "unigram_entropy": unigram_entropy(texts), "mean_surprisal": mean_surprisal,
      "rare_token_share": rare_share,
      "length": float(np.mean([len(_words(t)) for t in texts])) if texts else 0.0,
  }


def frequency_buckets(token_ids: Sequence[Sequence[int]], counts_V: np.ndarray,
                      num_buckets: int = 10) -> np.ndarray:
  """Share of tokens per train-frequency bucket [num_buckets].

  Ids are ranked by train count; an id goes to bucket floor(num_buckets * m), where m
  is the mass of the ids ranked before it, so bucket 0 always holds the most frequent
  id, even one with more than 1/num_buckets of the mass. Unseen ids go to the last
  bucket.
  """
  bucket_of = np.minimum((mass_before(counts_V) * num_buckets).astype(np.int64),
                         num_buckets - 1)
  bucket_of[counts_V == 0] = num_buckets - 1
  flat = np.fromiter((t for seq in token_ids for t in seq), np.int64)
  flat = flat[(flat >= 0) & (flat < len(counts_V))]
  hist = np.bincount(bucket_of[flat], minlength=num_buckets).astype(np.float64)
  return hist / max(hist.sum(), 1.0)


def generation_metrics(hyps: Sequence[str], refs: Sequence[str],
                       hyp_ids: Sequence[Sequence[int]], ref_ids: Sequence[Sequence[int]],
                       counts_V: np.ndarray) -> dict[str, float]:
  """All eval generation metrics; reference profile keys carry a `ref_` prefix."""
  out = overlap_metrics(hyps, refs)
  out.update(profile(hyps, hyp_ids, counts_V))
  out.update({f"ref_{k}": v for k, v in profile(refs, ref_ids, counts_V).items()})
  return out


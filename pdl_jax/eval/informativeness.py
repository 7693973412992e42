"""Informativeness and degeneration measures that do not use the loss's own counts.

`rare_token_share` and `mean_surprisal` (eval/metrics.py) count tokens with the same
train counts that make PDL's weights: they check that a loss moved the frequency
profile, not that outputs say more. These measures are computed on words, from the
texts alone (and, for NIDF, document frequencies of the task's train targets), so
any run's kept generations (samples/final_<method>.jsonl) can be scored again.

Words: the lower-cased text split into runs of Unicode word characters, keeping
inner apostrophes ("don't", "o'er"); punctuation is dropped. Content words: words
with a letter that are not in STOP_WORDS (NLTK's English list, 179 words, fixed
here so the measure does not move with a library version).

Per example (each with a numerator and a denominator, so a paired bootstrap can
resample examples; the statistic is sum(num) / sum(den)):
- nidf: mean normalised IDF of the output's words (See et al., 2019, "What makes a
  good conversation?"): idf(w) = log(D / df(w)) over the D train targets, scaled
  to [0, 1] by the smallest and largest idf of the train vocabulary; a word no train
  target has gets 1. Empty outputs are left out (den 0).
- content_recall / content_precision: distinct content words shared with the
  reference, over the reference's / the output's distinct content words, pooled
  over examples (micro).
- loop: 1 when the output holds some n-gram of 1 to 8 words three times back to
  back ("PVR PVR PVR", "God save thee! God save thee! God save thee!").
- rep_3: the share of the output's word 3-grams that repeat an earlier 3-gram of the
  same output (seq-rep-3, Welleck et al., 2019), over outputs with a 3-gram.
- prompt_copy: 1 when the output holds a word 4-gram of its prompt.
Over the whole set (no per-example interval): ead_1 / ead_2, Expectation-Adjusted
Distinct (Liu et al., 2022): distinct n-grams over their expectation under uniform
draws from the train vocabulary, V (1 - ((V - 1) / V) ** C) for C n-grams.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Iterable, Mapping, Sequence

import numpy as np

# NLTK's English stop words (nltk.corpus.stopwords.words("english"), 179 words).
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours
yourself yourselves he him his himself she she's her hers herself it it's its itself
they them their theirs themselves what which who whom this that that'll these those
am is are was were be been being have has had having do does did doing a an the and
but if or because as until while of at by for with about against between into
through during before after above below to from up down in out on off over under
again further then once here there when where why how all any both each few more
most other some such no nor not only own same so than too very s t can will just
don don't should should've now d ll m o re ve y ain aren aren't couldn couldn't
didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma
mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn
wasn't weren weren't won won't wouldn wouldn't
""".split())

_WORD = re.compile(r"\w+(?:['’]\w+)*")
LOOP_MAX_N = 8  # loops of up to this many words
LOOP_COPIES = 3  # back-to-back copies that make a loop
COPY_N = 4  # prompt-copy n-gram length
PER_EXAMPLE = ("nidf", "content_recall", "content_precision", "loop", "rep_3",
               "prompt_copy")


def words(text: str) -> list[str]:
  """The text's words, lower-cased (see the module docstring)."""
  return [w.replace("’", "'") for w in _WORD.findall(text.lower())]


def content_words(ws: Iterable[str]) -> set[str]:
  """The distinct content words: with a letter, not a stop word."""
  return {w for w in ws if w not in STOP_WORDS and any(c.isalpha() for c in w)}


def ngrams(ws: Sequence[str], n: int) -> list[tuple[str, ...]]:
  """The word n-grams of ws, in order."""
  return [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]


class WordStats:
  """Document frequencies of words over a corpus of texts (the train targets)."""

  def __init__(self, df: Mapping[str, int], num_docs: int):
    if num_docs < 1:
      raise ValueError(f"num_docs must be >= 1; got {num_docs}.")
    self.df, self.num_docs = dict(df), int(num_docs)
    idf = [math.log(self.num_docs / c) for c in self.df.values() if c > 0]
    self.min_idf = min(idf, default=0.0)
    self.max_idf = max(idf, default=math.log(self.num_docs))

  @classmethod
  def from_texts(cls, texts: Iterable[str]) -> "WordStats":
    """Each word's number of texts holding it, and the number of texts."""
    df: collections.Counter = collections.Counter()
    n = 0
    for text in texts:
      df.update(set(words(text)))
      n += 1
    return cls(df, n)

  def nidf(self, word: str) -> float:
    """(idf(w) - min idf) / (max idf - min idf), 1 for a word no text has."""
    count = self.df.get(word, 0)
    if count <= 0 or self.max_idf <= self.min_idf:
      return 1.0
    return (math.log(self.num_docs / count) - self.min_idf) / (self.max_idf - self.min_idf)

  def to_json(self) -> dict:
    """The document frequencies and count, for word_stats.json."""
    return {"num_docs": self.num_docs, "df": dict(sorted(self.df.items()))}

  @classmethod
  def from_json(cls, data: Mapping) -> "WordStats":
    """The WordStats of to_json's dict."""
    return cls(data["df"], data["num_docs"])


def has_loop(ws: Sequence[str], max_n: int = LOOP_MAX_N, copies: int = LOOP_COPIES) -> bool:
  """Whether some n-gram (n <= max_n) occurs `copies` times back to back."""
  for n in range(1, max_n + 1):
    for i in range(len(ws) - copies * n + 1):
      first = ws[i:i + n]
      if all(ws[i + k * n:i + (k + 1) * n] == first for k in range(1, copies)):
        return True
  return False


def copies_prompt(ws: Sequence[str], prompt_ws: Sequence[str], n: int = COPY_N) -> bool:
  """Whether the output holds a word n-gram of the prompt."""
  return bool(set(ngrams(ws, n)) & set(ngrams(prompt_ws, n)))


def per_example(outputs: Sequence[str], references: Sequence[str], prompts: Sequence[str],
                stats: WordStats | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{measure: (numerator [N], denominator [N])} of PER_EXAMPLE (module docstring);
  without stats NIDF's denominators stay 0 (its ratio is nan)."""
  if not len(outputs) == len(references) == len(prompts):
    raise ValueError(f"outputs, references and prompts must have one entry per example; "
                     f"got {len(outputs)}, {len(references)}, {len(prompts)}.")
  out = {k: (np.zeros(len(outputs)), np.zeros(len(outputs))) for k in PER_EXAMPLE}
  for i, (hyp, ref, prompt) in enumerate(zip(outputs, references, prompts)):
    ws, ref_content = words(hyp), content_words(words(ref))
    hyp_content = content_words(ws)
    if ws and stats is not None:
      out["nidf"][0][i] = sum(stats.nidf(w) for w in ws) / len(ws)
      out["nidf"][1][i] = 1
    shared = len(hyp_content & ref_content)
    out["content_recall"][0][i], out["content_recall"][1][i] = shared, len(ref_content)
    out["content_precision"][0][i], out["content_precision"][1][i] = shared, len(hyp_content)
    out["loop"][0][i], out["loop"][1][i] = float(has_loop(ws)), 1
    tri = ngrams(ws, 3)
    if tri:
      out["rep_3"][0][i], out["rep_3"][1][i] = 1 - len(set(tri)) / len(tri), 1
    out["prompt_copy"][0][i] = float(copies_prompt(ws, words(prompt)))
    out["prompt_copy"][1][i] = 1
  return out


def ead(outputs: Sequence[str], n: int, vocab_size: int) -> float:
  """Expectation-Adjusted Distinct-n over all outputs: distinct word n-grams over
  V (1 - ((V - 1) / V) ** C), C the n-grams' count, V = vocab_size (the train
  targets' distinct words); 0 with no n-gram."""
  grams = [g for o in outputs for g in ngrams(words(o), n)]
  if not grams or vocab_size < 1:
    return 0.0
  v, c = float(vocab_size), len(grams)
  expected = v * -math.expm1(c * math.log1p(-1.0 / v)) if v > 1 else 1.0
  return len(set(grams)) / expected


def ratio(num: np.ndarray, den: np.ndarray) -> float:
  """sum(num) / sum(den) (nan when den sums to 0)."""
  d = float(np.sum(den))
  return float(np.sum(num)) / d if d > 0 else math.nan

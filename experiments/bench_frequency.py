"""Benchmark: the frequency pass against the authors' approach and the tokenizer bound.

On the real text of the three offline corpora (inputs and targets of their train
splits; at least 20 MB), in one process and with one SentencePiece model:

  (A) the authors' reference approach: encode one example at a time,
      collections.Counter.update, then a Python loop over the vocabulary to fill
      the weight table;
  (B) what a run does: the input pipeline's batched encoding (on all cores), then
      the counting of frequency.count_examples (one np.bincount over the ids) and
      power_law_weights;
  (C) batched tokenization alone (Tokenizer.encode_batch over the same texts and
      batch size, on all cores with SentencePiece's own threads, nothing else):
      the bound for (B).

    python experiments/bench_frequency.py [--data_dir DIR] [--vocab_size 8000]

Prints tokens/s of each and the ratios B/C (target >= 0.85) and B/A (target >= 2).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import tempfile
import time


import numpy as np  # noqa: E402

from pdl_jax.losses import pdl as loss_lib  # noqa: E402
from pdl_jax import tasks  # noqa: E402
from pdl_jax.tokenizers import sentencepiece as tok_lib  # noqa: E402


def corpus_texts(data_dir: str | None) -> list[str]:
  """Inputs and targets of the train splits of the three offline corpora."""
  import tensorflow_datasets as tfds

  import pdl_jax.datasets  # noqa: F401

  texts = []
  for task in sorted(tasks.DEFAULT_DATASET):
    spec = tasks.get_dataset(task)
    ds = tfds.load(spec.tfds_name, split="train", data_dir=data_dir)
    for ex in tfds.as_numpy(ds):
      texts.append(ex[spec.inputs_key].decode())
      texts.append(ex[spec.targets_key].decode())
  return texts


def reference_pass(tokenizer: tok_lib.SentencePieceTokenizer, texts: list[str], alpha: float) -> np.ndarray:
  """(A) As the authors' code: per-example encode, Counter, loop over the vocab."""
  counter = collections.Counter()
  for text in texts:
    counter.update(tokenizer.encode_batch([text])[0])
  total = sum(counter.values())
  weights = np.zeros(tokenizer.vocab_size, np.float32)
  for token_id in range(tokenizer.vocab_size):
    weights[token_id] = 1.0 / (counter.get(token_id, 0) / total + 1.0 / total) ** alpha
  return weights


def project_pass(tokenizer, texts: list[str], batch_size: int, alpha: float):
  """(B) Batched encoding as the input pipeline does, one np.bincount over the ids as
  count_examples does, then power_law_weights. Returns (counts, weights)."""
  threads = os.cpu_count() or 1
  ids = []
  for i in range(0, len(texts), batch_size):
    ids.extend(tokenizer.encode_batch(texts[i:i + batch_size], num_threads=threads))
  flat = np.fromiter((t for seq in ids for t in seq), np.int64)
  counts = np.bincount(flat, minlength=tokenizer.vocab_size).astype(np.int64)
  return counts, loss_lib.power_law_weights(counts, alpha, normalize=False)


def tokenize_only(tokenizer, texts: list[str], batch_size: int) -> int:
  """(C) Batched encoding alone, on all cores (SentencePiece's own threads);
  returns the number of tokens."""
  n = 0
  threads = os.cpu_count() or 1
  for i in range(0, len(texts), batch_size):
    n += sum(map(len, tokenizer.encode_batch(texts[i:i + batch_size], num_threads=threads)))
  return n


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data_dir", default=None, help="TFDS data dir of the built corpora")
  p.add_argument("--vocab_size", type=int, default=8000)
  p.add_argument("--batch_size", type=int, default=1024)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--alpha", type=float, default=1.0)
  args = p.parse_args()

  texts = corpus_texts(args.data_dir)
  mb = sum(len(t.encode()) for t in texts) / 2**20
  if mb < 20:
    raise SystemExit(f"corpus is {mb:.1f} MiB; the benchmark needs at least 20 MiB.")
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = tok_lib.train(texts[::4], os.path.join(tmp, "bench.model"),
                              args.vocab_size, max_sentences=200_000)
  print(f"{len(texts)} texts, {mb:.1f} MiB of real text; SentencePiece unigram "
        f"{tokenizer.vocab_size} pieces; {os.cpu_count()} cpus; median of "
        f"{args.repeats} interleaved runs")

  times = {"A": [], "B": [], "C": []}
  tokens = {}
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    w_a = reference_pass(tokenizer, texts, args.alpha)
    times["A"].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    counts, w_b = project_pass(tokenizer, texts, args.batch_size, args.alpha)
    times["B"].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    tokens["C"] = tokenize_only(tokenizer, texts, args.batch_size)
    times["C"].append(time.perf_counter() - t0)
  tokens["A"] = tokens["B"] = int(counts.sum())
  # Same counts, same (unnormalised) weights: the fast pass computes the same thing.
  np.testing.assert_allclose(w_a, w_b, rtol=1e-5)
  assert tokens["C"] == tokens["B"]
  rate = {k: tokens[k] / statistics.median(v) for k, v in times.items()}
  names = {"A": "authors' approach (per-example encode, Counter, vocab loop)",
           "B": "this project's pass (batched encode, bincount, weights)",
           "C": "batched tokenization alone (bound)"}
  for k in "ABC":
    print(f"({k}) {names[k]:<62} {statistics.median(times[k]):7.2f} s  "
          f"{rate[k] / 1e6:6.2f} M tokens/s")
  print(f"B/C = {rate['B'] / rate['C']:.3f} (target >= 0.85)   "
        f"B/A = {rate['B'] / rate['A']:.2f} (target >= 2)")


if __name__ == "__main__":
  main()

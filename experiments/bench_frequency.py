"""Benchmark: the frequency pass against the authors' approach and the tokenizer bound.

On the real text of the three offline corpora (prompts and targets of their train
splits; at least 20 MB), in one process, with one tokenizer (a SentencePiece model
trained here, or with --pretrained a named model's tokenizer in its chat format,
what the default experiments use):

  (A) the authors' reference approach: encode one example (prompt, target) at a time,
      collections.Counter.update, then a Python loop over the vocabulary to fill
      the weight table;
  (B) what a run does: `pdl_jax.data.examples.encode_examples` (batched encoding of the
      prompts and targets, then the prefix-LM layout of every example) and
      `pdl_jax.data.token_stats.count_examples` (one np.bincount over the loss tokens),
      then power_law_weights;
  (C) tokenizing the prompts and targets alone, with the same calls (and threads)
      as encode_examples, nothing else: the bound for (B).

Rows are --seq_len long (256, as the default dialogue run's) and the examples that
do not fit one are left out, so that no target is cut and (A) and (B) count the same
tokens (each target and its EOS) and must give the same weights.

    python experiments/bench_frequency.py [--data_dir DIR] [--vocab_size 8000]
    python experiments/bench_frequency.py --pretrained smollm2-135m-instruct

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

from pdl_jax.data import examples as examples_lib
from pdl_jax.data import pipeline
from pdl_jax.data import token_stats
from pdl_jax.data import tasks as tasks_lib
from pdl_jax.losses import pdl
from pdl_jax.tokenizers import sentencepiece as sp_tokenizer


def corpus_texts(data_dir: str | None) -> tuple[list[str], list[str]]:
  """(prompts, targets) of the train splits of the three offline corpora."""
  import tensorflow_datasets as tfds

  import pdl_jax.data.builders  # noqa: F401

  prompts, targets = [], []
  for task in sorted(tasks_lib.DEFAULT_DATASET):
    spec = tasks_lib.get_dataset(task)
    ds = tfds.load(spec.tfds_name, split="train", data_dir=data_dir)
    for ex in tfds.as_numpy(ds):
      prompts.append(ex[spec.inputs_key].decode())
      targets.append(ex[spec.targets_key].decode())
  return prompts, targets


def reference_pass(tokenizer, prompts: list[str], targets: list[str], alpha: float
                   ) -> np.ndarray:
  """(A) As the authors' code: per-example encode (prompt and target), Counter over
  the target's tokens and EOS, loop over the vocab."""
  counter = collections.Counter()
  for prompt, text in zip(prompts, targets):
    if text.strip():
      _, target_ids = tokenizer.encode_batch([prompt, text])
      counter.update(target_ids + [tokenizer.eos_id])
  total = sum(counter.values())
  weights = np.zeros(tokenizer.vocab_size, np.float32)
  for token_id in range(tokenizer.vocab_size):
    weights[token_id] = 1.0 / (counter.get(token_id, 0) / total + 1.0 / total) ** alpha
  return weights


def project_pass(tokenizer, prompts: list[str], targets: list[str], seq_len: int,
                 alpha: float):
  """(B) The run's pass: encode_examples, count_examples, power_law_weights.
  Returns (counts, weights, examples)."""
  examples = examples_lib.encode_examples(prompts, targets, tokenizer, seq_len=seq_len,
                                  max_target_len=seq_len)
  counts = token_stats.count_examples(examples, tokenizer).counts
  return counts, pdl.power_law_weights(counts, alpha, normalize=False), examples


def tokenize_only(tokenizer, prompts: list[str], targets: list[str]) -> int:
  """(C) The encode calls of encode_examples alone, also with Python's cyclic GC
  paused as there (data.without_gc); returns the number of tokens."""
  with examples_lib.without_gc():
    return _tokenize_only(tokenizer, prompts, targets)


def _tokenize_only(tokenizer, prompts, targets) -> int:
  if hasattr(tokenizer, "encode_parts"):
    return sum(sum(map(len, part)) for part in tokenizer.encode_parts(prompts, targets))
  threads = os.cpu_count() or 1
  return (sum(map(len, tokenizer.encode_batch(prompts, num_threads=threads)))
          + sum(map(len, tokenizer.encode_batch(targets, num_threads=threads))))


def make_tokenizer(args, prompts, targets, tmp: str):
  if args.pretrained:
    from pdl_jax import tokenizers as tok_lib
    from pdl_jax.models.hf import locate
    return pipeline.with_prompt_format(tok_lib.load(locate.local_dir(args.pretrained)), "chat")
  texts = [t for pair in zip(prompts, targets) for t in pair]
  return sp_tokenizer.train(texts[::4], os.path.join(tmp, "bench.model"), args.vocab_size,
                      max_sentences=200_000)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data_dir", default=None, help="TFDS data dir of the built corpora")
  p.add_argument("--pretrained", default=None,
                 help="a named model or HF folder: its tokenizer, chat format")
  p.add_argument("--vocab_size", type=int, default=8000, help="of the SentencePiece model")
  p.add_argument("--seq_len", type=int, default=256,
                 help="row length, as a run's; longer examples are left out")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--alpha", type=float, default=1.0)
  args = p.parse_args()

  prompts, targets = corpus_texts(args.data_dir)
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = make_tokenizer(args, prompts, targets, tmp)
  # Examples longer than a row are left out (an untimed tokenization), so that no
  # target is cut and (A) counts what (B) counts.
  fixed = len(tokenizer.prompt_prefix_ids) + len(tokenizer.separator_ids) + 1
  p_len = map(len, tokenizer.encode_batch(prompts, num_threads=os.cpu_count() or 1))
  t_len = map(len, tokenizer.encode_batch(targets, num_threads=os.cpu_count() or 1))
  keep = [i for i, (a, b) in enumerate(zip(p_len, t_len)) if a + b + fixed <= args.seq_len]
  left_out = len(prompts) - len(keep)
  prompts, targets = [prompts[i] for i in keep], [targets[i] for i in keep]
  mb = sum(len(t.encode()) for t in prompts + targets) / 2**20
  if mb < 20:
    raise SystemExit(f"corpus is {mb:.1f} MiB; the benchmark needs at least 20 MiB.")
  print(f"{len(prompts)} examples ({left_out} longer than --seq_len {args.seq_len} left "
        f"out), {mb:.1f} MiB of real text; tokenizer "
        f"{type(tokenizer).__name__} ({tokenizer.vocab_size} tokens); {os.cpu_count()} "
        f"cpus; median of {args.repeats} interleaved runs")

  times = {"A": [], "B": [], "C": []}
  tokens = {}
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    w_a = reference_pass(tokenizer, prompts, targets, args.alpha)
    times["A"].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    counts, w_b, examples = project_pass(tokenizer, prompts, targets, args.seq_len,
                                         args.alpha)
    times["B"].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    tokens["C"] = tokenize_only(tokenizer, prompts, targets)
    times["C"].append(time.perf_counter() - t0)
  if examples.truncated:
    raise SystemExit(f"{examples.truncated} examples were cut at --seq_len "
                     f"{args.seq_len}; raise it so (A) and (B) count the same tokens.")
  # Same counts, same (unnormalised) weights: the fast pass computes the same thing.
  np.testing.assert_allclose(w_a, w_b[:tokenizer.vocab_size], rtol=1e-5)
  # Every token (A) counts and (B) lays out: per second of each pass.
  tokens["A"] = tokens["B"] = tokens["C"]
  rate = {k: tokens[k] / statistics.median(v) for k, v in times.items()}
  names = {"A": "authors' approach (per-example encode, Counter, vocab loop)",
           "B": "this project's pass (encode_examples, bincount, weights)",
           "C": "tokenizing prompts and targets alone (bound)"}
  for k in "ABC":
    print(f"({k}) {names[k]:<62} {statistics.median(times[k]):7.2f} s  "
          f"{rate[k] / 1e6:6.2f} M tokens/s")
  print(f"B/C = {rate['B'] / rate['C']:.3f} (target >= 0.85)   "
        f"B/A = {rate['B'] / rate['A']:.2f} (target >= 2)")


if __name__ == "__main__":
  main()

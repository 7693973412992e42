"""Input pipeline: a task's (prompt, target) text -> prefix-LM token batches.

One example becomes  [prompt tokens] [sep] [target tokens] [eos],  shifted into
model inputs and labels; the loss mask is 1 on the labels that are target tokens or
EOS, never on the prompt. The offline corpora fit in memory, so each process loads
and tokenizes its own shard of a split once (batched SentencePiece) into numpy
arrays, and a batch is a pure function of (seed, step): the data position is the
step, so a resumed run sees exactly the batches an uninterrupted one would, and
each process feeds its devices with its rows of the global batch.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Iterator

import numpy as np

from pdl_jax import tasks as tasks_lib
from pdl_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Examples:
  """Tokenized examples of one split (this process's shard), padded to seq_len + 1.

  seqs: int32 [N, seq_len + 1]: prompt, sep, target, eos, then padding.
  target_start: int32 [N], index in seqs of the first target token.
  lengths: int32 [N], real tokens in seqs.
  prompts / targets: the texts, for evaluation and samples.
  """

  seqs: np.ndarray
  target_start: np.ndarray
  lengths: np.ndarray
  prompts: list[str]
  targets: list[str]
  dropped_empty: int
  truncated: int

  def __len__(self) -> int:
    return len(self.lengths)


def encode_examples(prompts: list[str], targets: list[str], tokenizer: Tokenizer, *,
                    seq_len: int, max_target_len: int) -> Examples:
  """Tokenizes and lays out prefix-LM sequences.

  Truncation keeps the end of the prompt (nearest the target) and the start of the
  target; examples with an empty target are dropped and counted.

  Raises:
    ValueError: seq_len too short for one prompt token, the separator, one target
      token and EOS, or max_target_len < 1.
  """
  if seq_len < 4:
    raise ValueError(f"seq_len must be >= 4 to fit a prompt token, the separator, a "
                     f"target token and EOS; got {seq_len}.")
  if max_target_len < 1:
    raise ValueError(f"max_target_len must be >= 1; got {max_target_len}.")
  keep = [i for i, t in enumerate(targets) if t.strip()]
  dropped = len(targets) - len(keep)
  prompts = [prompts[i] for i in keep]
  targets = [targets[i] for i in keep]
  p_ids = tokenizer.encode_batch(prompts)
  t_ids = tokenizer.encode_batch(targets)
  total = seq_len + 1
  seqs = np.full((len(keep), total), tokenizer.pad_id, np.int32)
  target_start = np.zeros(len(keep), np.int32)
  lengths = np.zeros(len(keep), np.int32)
  truncated = 0
  sep, eos = tokenizer.sep_id, tokenizer.eos_id
  for i, (p, t) in enumerate(zip(p_ids, t_ids)):
    # Target first (it is what is learned), then as much prompt as fits.
    t = t[: min(max_target_len, total - 3)] + [eos]
    room = total - 1 - len(t)
    cut_p = p[-room:] if len(p) > room else p
    truncated += int(len(cut_p) < len(p) or len(t) - 1 < len(t_ids[i]))
    seq = cut_p + [sep] + t
    seqs[i, : len(seq)] = seq
    target_start[i] = len(cut_p) + 1
    lengths[i] = len(seq)
  return Examples(seqs, target_start, lengths, prompts, targets, dropped, truncated)


def make_batch(examples: Examples, idx: np.ndarray) -> dict[str, np.ndarray]:
  """Model inputs, labels and loss mask [b, seq_len] for the given example rows."""
  seqs = examples.seqs[idx]
  pos = np.arange(seqs.shape[1] - 1)[None, :]
  # Label j is seqs[j + 1]; it is a target (or EOS) token when j + 1 >= target_start.
  mask = ((pos + 1 >= examples.target_start[idx, None])
          & (pos + 1 < examples.lengths[idx, None]))
  return {"inputs": seqs[:, :-1], "labels": seqs[:, 1:],
          "loss_mask": mask.astype(np.float32)}


class TrainBatches:
  """Batch at step s = a pure function of (seed, s): shuffled epochs, no repeats in
  an epoch, last partial batch of an epoch dropped.

  The permutation is over the whole split and a global batch of `batch_size`
  rows is drawn per step; process i of n returns rows [i * b / n, (i + 1) * b / n)
  of it, so n processes together train on exactly the batches one process would.
  """

  def __init__(self, examples: Examples, batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    if len(examples) < batch_size:
      raise ValueError(
          f"the training split has {len(examples)} examples, fewer than the batch size "
          f"{batch_size}.")
    if batch_size % process_count:
      raise ValueError(f"batch size {batch_size} is not divisible by the {process_count} "
                       "processes.")
    self.examples = examples
    self.batch_size = batch_size
    self.seed = seed
    self.local = slice(process_index * batch_size // process_count,
                       (process_index + 1) * batch_size // process_count)
    self.steps_per_epoch = len(examples) // batch_size
    self._perm_epoch, self._perm = -1, None

  def indices(self, step: int) -> np.ndarray:
    """Example rows of this process's part of the global batch at `step`."""
    epoch, i = divmod(step, self.steps_per_epoch)
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
      self._perm_epoch = epoch
    return self._perm[i * self.batch_size:(i + 1) * self.batch_size][self.local]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    return make_batch(self.examples, self.indices(step))


def eval_batches(examples: Examples, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """The examples in order; the last batch is padded with fully masked rows."""
  n = len(examples)
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    batch = make_batch(examples, np.concatenate(
        [idx, np.zeros(batch_size - len(idx), idx.dtype)]))
    batch["loss_mask"][len(idx):] = 0.0
    batch["example_mask"] = (np.arange(batch_size) < len(idx)).astype(np.float32)
    yield batch


def load_texts(spec: tasks_lib.DatasetSpec, split: str, *, data_dir: str | None,
               limit: int | None = None, log=None) -> tuple[list[str], list[str]]:
  """(prompts, targets) of a TFDS split (its first `limit` examples if given).

  Builds the dataset first if needed (the offline builders fetch their sources).
  """
  import tensorflow_datasets as tfds

  import pdl_jax.datasets  # noqa: F401  registers the offline builders

  log = log or (lambda line: print(line, file=sys.stderr, flush=True))
  start = time.perf_counter()
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  builder.download_and_prepare()  # a no-op once built
  tfds_split = spec.splits[split]
  if limit is not None:
    try:  # a slice past the end is an error in TFDS: a limit above the size means all
      size = builder.info.splits[tfds_split].num_examples
    except (KeyError, TypeError):
      size = None
    if not size or limit < size:
      tfds_split = f"{tfds_split}[:{limit}]"
  ds = builder.as_dataset(split=tfds_split, shuffle_files=False)
  prompts, targets = [], []
  for ex in tfds.as_numpy(ds):
    p, t = spec.format(ex)
    prompts.append(p)
    targets.append(t)
  log(f"data: {spec.tfds_name} {tfds_split}: {len(prompts)} examples "
      f"({time.perf_counter() - start:.1f} s)")
  return prompts, targets

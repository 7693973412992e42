"""Batches: a batch is a pure function of (seed, step). The data position is the
step, so a resumed run sees exactly the batches an uninterrupted one would, and
every process can build the whole global batch (train.loop.place_batch gives each
device its rows by index)."""

from __future__ import annotations

from typing import Iterator
import numpy as np
from pdl_jax.data import examples as examples_lib


def make_batch(examples: examples_lib.Examples, idx: np.ndarray) -> dict[str, np.ndarray]:
  """Model inputs, labels and loss mask [b, seq_len] for the given example rows
  (packed rows: also their segment ids and positions)."""
  if examples.segment_ids is not None:
    return {"inputs": examples.seqs[idx, :-1], "labels": examples.seqs[idx, 1:],
            "loss_mask": examples.loss_mask[idx, 1:].astype(np.float32),
            "segment_ids": examples.segment_ids[idx, :-1],
            "positions": examples.positions[idx, :-1]}
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
  rows is drawn per step (`global_batch`, what training places on the devices);
  `indices` / calling it give process i of n its rows [i * b / n, (i + 1) * b / n),
  so n processes' shares together are exactly the batch one process would see.
  """

  def __init__(self, examples: examples_lib.Examples, batch_size: int, seed: int,
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

  def global_indices(self, step: int) -> np.ndarray:
    """Example rows of the whole global batch at `step` (the same on every process)."""
    epoch, i = divmod(step, self.steps_per_epoch)
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
      self._perm_epoch = epoch
    return self._perm[i * self.batch_size:(i + 1) * self.batch_size]

  def indices(self, step: int) -> np.ndarray:
    """Example rows of this process's part of the global batch at `step`."""
    return self.global_indices(step)[self.local]

  def real_tokens(self, step: int) -> int:
    """Non-padding input tokens of the global batch at `step` (for tokens/s)."""
    return int((self.examples.lengths[self.global_indices(step)] - 1).sum())

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch at `step`."""
    return make_batch(self.examples, self.indices(step))

  def global_batch(self, step: int) -> dict[str, np.ndarray]:
    """The whole global batch at `step` (every process can build it: each holds the
    whole split). Placing it with jax.make_array_from_callback gives every device its
    rows of the batch sharding, whatever the mesh: a batch shard replicated on devices
    of several processes (the model axis spanning hosts) gets the same rows on each."""
    return make_batch(self.examples, self.global_indices(step))


def eval_batches(examples: examples_lib.Examples, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """The examples in order; the last batch is padded with fully masked rows."""
  n = len(examples)
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    batch = make_batch(examples, np.concatenate(
        [idx, np.zeros(batch_size - len(idx), idx.dtype)]))
    batch["loss_mask"][len(idx):] = 0.0
    batch["example_mask"] = (np.arange(batch_size) < len(idx)).astype(np.float32)
    yield batch

"""Packing: several encoded examples per row (first fit), attention within each
segment and positions restarting, so rows carry less padding and every example's
loss is what it was unpacked. Evaluation never packs."""

from __future__ import annotations

import dataclasses
import numpy as np
from pdl_jax.data import examples as examples_lib


def packed_capacity(max_target_len: int, seq_len: int) -> int:
  """Window of packed rows (pack_examples), which hold several target
  spans: two examples' longest targets with EOS, rounded up to 8, at most seq_len.
  The packer keeps every row's loss tokens within it."""
  return min(seq_len, -(-2 * (max_target_len + 1) // 8) * 8)


def pack_examples(examples: examples_lib.Examples, *, loss_capacity: int, pad_id: int) -> examples_lib.Examples:
  """Several examples per row, first fit: each example (in split order) goes into
  the first row with room for its tokens and whose loss tokens stay within
  `loss_capacity` (so the loss window keeps every target: packed_capacity),
  else a new row.

  Rows get segment ids (1, 2, ... per example, 0 on padding), positions restarting
  at each example and the loss positions of every example: with them the model
  (`Decoder(..., segment_ids_BxL=)`, attention within a segment) and the loss see
  each example as they would alone in a row (tests/data/test_packing.py). Prompts and
  targets stay the examples' (evaluation never packs).

  Raises:
    ValueError: an example with more loss tokens than `loss_capacity`.
  """
  total = examples.seqs.shape[1]
  # A segment's first token is never a loss position, even when target_start is 0
  # (an empty prompt without BOS): nothing in its segment predicts it, and in a
  # packed row the label before it is the previous example's EOS (as unpacked,
  # where make_batch's labels start at position 1).
  first_loss = np.maximum(examples.target_start, 1)
  n_loss = np.maximum(examples.lengths - first_loss, 0)
  if len(examples) and n_loss.max() > loss_capacity:
    raise ValueError(f"an example has {int(n_loss.max())} loss tokens, more than the packed "
                     f"loss capacity {loss_capacity}.")
  free_len = np.zeros(len(examples), np.int64)  # per row opened so far
  free_loss = np.zeros(len(examples), np.int64)
  row_of = np.zeros(len(examples), np.int64)
  rows = 0
  for i, (n, c) in enumerate(zip(examples.lengths.tolist(), n_loss.tolist())):
    fits = np.flatnonzero((free_len[:rows] >= n) & (free_loss[:rows] >= c))
    r = int(fits[0]) if fits.size else rows
    if r == rows:
      free_len[r], free_loss[r] = total, loss_capacity
      rows += 1
    free_len[r] -= n
    free_loss[r] -= c
    row_of[i] = r
  seqs = np.full((rows, total), pad_id, np.int32)
  segment_ids = np.zeros((rows, total), np.int32)
  positions = np.zeros((rows, total), np.int32)
  loss_mask = np.zeros((rows, total), bool)
  fill = np.zeros(rows, np.int64)
  count = np.zeros(rows, np.int32)
  for i, r in enumerate(row_of.tolist()):
    n, start = int(examples.lengths[i]), int(fill[r])
    count[r] += 1
    seqs[r, start:start + n] = examples.seqs[i, :n]
    segment_ids[r, start:start + n] = count[r]
    positions[r, start:start + n] = np.arange(n)
    loss_mask[r, start + first_loss[i]:start + n] = True
    fill[r] += n
  return dataclasses.replace(
      examples, seqs=seqs, target_start=np.zeros(rows, np.int32),
      lengths=fill.astype(np.int32), segment_ids=segment_ids, positions=positions,
      loss_mask=loss_mask)

"""Encoded prefix-LM examples: a task's (prompt, target) texts through the run's
tokenizer into model inputs, labels and a loss mask.

One example becomes  [prefix] [prompt tokens] [separator] [target tokens] [eos],
shifted into model inputs and labels (the own model's separator is its `<sep>`
piece and it has no prefix; a pretrained model's separator is plain text, a newline,
and its prefix is its BOS where it has one: Llama 3 and Gemma expect it); the loss
mask is 1 on the labels that are target tokens or EOS, never on the prompt. A target
cut to `max_target_len` gets no EOS: it did not end there, and an EOS would teach the
model to stop early. The offline corpora fit in memory, so each process tokenizes a
split once (batched) into numpy arrays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import os
from typing import Iterator, Sequence
import numpy as np
from pdl_jax.tokenizers import Tokenizer


PROMPT_FORMATS = ("plain", "chat")


@dataclasses.dataclass(frozen=True)
class Examples:
  """Tokenized examples of one split, padded to seq_len + 1.

  seqs: int32 [N, seq_len + 1]: prompt, sep, target, eos (unless the target was
    truncated), then padding.
  target_start: int32 [N], index in seqs of the first target token.
  lengths: int32 [N], real tokens in seqs.
  prompts / targets: the texts, for evaluation and samples.
  dropped_empty: examples dropped for an empty target.
  truncated: examples whose prompt or target was cut.
  targets_truncated: examples whose target was cut (they have no EOS).
  """

  seqs: np.ndarray
  target_start: np.ndarray
  lengths: np.ndarray
  prompts: list[str]
  targets: list[str]
  dropped_empty: int
  truncated: int
  targets_truncated: int = 0
  # Packed rows only (pack_examples): segment ids [N, seq_len + 1] (1, 2, ... per
  # example in the row, 0 padding), positions within each segment, and the loss
  # positions of every segment (bool). lengths is then the real tokens of the row.
  segment_ids: np.ndarray | None = None
  positions: np.ndarray | None = None
  loss_mask: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.lengths)

  def loss_positions(self) -> np.ndarray:
    """Bool [N, seq_len + 1]: the positions of seqs whose token the loss is on (each
    is the label of the position before it)."""
    if self.loss_mask is not None:
      return self.loss_mask
    pos = np.arange(self.seqs.shape[1])[None, :]
    # Position 0 is no label (nothing before it predicts it), whatever target_start.
    first = np.maximum(self.target_start, 1)
    return (pos >= first[:, None]) & (pos < self.lengths[:, None])


def _lengths(seqs: Sequence[Sequence[int]]) -> np.ndarray:
  return np.fromiter(map(len, seqs), np.int64, count=len(seqs))


def _layout(p_ids, sep_ids, t_ids, *, prefix: list[int], eos: int, pad: int, total: int,
            max_target_len: int, head: int = 0):
  """The example layout of encode_examples, vectorised over examples (numpy): a
  per-example Python loop cost more than the tokenizer on the frequency pass.

  Rows are filled in row-major order, so the kept tokens of all examples, one stream
  (each example's prompt end, separator and target start, concatenated by C-level
  iteration into one np.fromiter), go into the row positions between the prefix and
  each row's end with one boolean-mask assignment; EOS and the prefix are written
  after. Only kept tokens are ever copied (long prompts keep their end, and their
  first `head` tokens: a chat template's head tokens past the constant prefix,
  ChatTokenizer.prompt_head_len).
  """
  lp, ls, lt = _lengths(p_ids), _lengths(sep_ids), _lengths(t_ids)
  n = len(lp)
  fixed = len(prefix) + ls
  # A prompt token, the prefix, the separator and EOS always fit.
  room_for_target = np.maximum(1, np.minimum(max_target_len, total - fixed - 2))
  # Target first (it is what is learned), then as much prompt as fits; a cut target
  # gets no EOS.
  target_cut = lt > room_for_target
  kept_t = np.where(target_cut, room_for_target, lt)
  room = total - fixed - kept_t - (~target_cut)
  kept_p = np.minimum(lp, room)
  prompts = list(p_ids)  # the prompt's end where it does not fit
  cut_p = np.flatnonzero(kept_p < lp)
  for i, k in zip(cut_p.tolist(), kept_p[cut_p].tolist()):
    h = min(head, k - 1)
    prompts[i] = prompts[i][:h] + prompts[i][len(prompts[i]) - (k - h):]
  targets = list(t_ids)  # the target's start where it does not fit
  for i in np.flatnonzero(target_cut).tolist():
    targets[i] = targets[i][:int(kept_t[i])]
  ends = len(prefix) + kept_p + ls + kept_t  # each row's last token + 1, before EOS
  stream = np.fromiter(
      itertools.chain.from_iterable(itertools.chain.from_iterable(
          zip(prompts, sep_ids, targets))), np.int32, count=int((ends - len(prefix)).sum()))
  seqs = np.full((n, total), pad, np.int32)
  cols = np.arange(total, dtype=np.int32)[None, :]
  seqs[(cols >= len(prefix)) & (cols < ends[:, None])] = stream
  seqs[:, :len(prefix)] = np.asarray(prefix, np.int32)
  seqs[np.flatnonzero(~target_cut), ends[~target_cut]] = eos
  lengths = ends + (~target_cut)
  truncated = int(np.sum((kept_p < lp) | target_cut))
  return (seqs, (len(prefix) + kept_p + ls).astype(np.int32), lengths.astype(np.int32),
          truncated, int(target_cut.sum()))


def encode_examples(prompts: list[str], targets: list[str], tokenizer: Tokenizer, *,
                    seq_len: int, max_target_len: int) -> Examples:
  """Tokenizes and lays out prefix-LM sequences.

  Truncation keeps the end of the prompt (nearest the target) and the start of the
  target; a truncated target gets no EOS; examples with an empty target are dropped
  and counted.

  Raises:
    ValueError: seq_len too short for one prompt token, the separator, one target
      token and EOS, or max_target_len < 1.
  """
  if seq_len < 4:
    raise ValueError(f"seq_len must be >= 4 to fit a prompt token, the separator, a "
                     f"target token and EOS; got {seq_len}.")
  if max_target_len < 1:
    raise ValueError(f"max_target_len must be >= 1; got {max_target_len}.")
  with without_gc():
    return _encode_examples(prompts, targets, tokenizer, seq_len=seq_len,
                            max_target_len=max_target_len)


@contextlib.contextmanager
def without_gc() -> Iterator[None]:
  """Python's cyclic garbage collector paused. Why: a split's token ids are millions
  of small lists (no cycles among them) and the collector, triggered by their
  allocation, traverses every one still alive again and again: half the frequency
  pass's time on the real corpora (experiments/bench_frequency.py)."""
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.enable()


def _encode_examples(prompts, targets, tokenizer, *, seq_len, max_target_len) -> Examples:
  keep = [i for i, t in enumerate(targets) if t.strip()]
  dropped = len(targets) - len(keep)
  prompts = [prompts[i] for i in keep]
  targets = [targets[i] for i in keep]
  prefix, sep, eos = (list(tokenizer.prompt_prefix_ids), list(tokenizer.separator_ids),
                      tokenizer.eos_id)
  if hasattr(tokenizer, "encode_parts"):
    # A text separator (a pretrained model's newline): the parts as the joined text
    # `prompt \n target` is tokenized (Metaspace tokenizers prefix a text encoded
    # alone with '▁': the model would see " \n The" for "\nThe").
    p_ids, sep_ids, t_ids = tokenizer.encode_parts(prompts, targets)
  else:
    threads = os.cpu_count() or 1  # SentencePiece's own threads (HF: its pool)
    p_ids = tokenizer.encode_batch(prompts, num_threads=threads)
    t_ids = tokenizer.encode_batch(targets, num_threads=threads)
    sep_ids = [sep] * len(prompts)
  total = seq_len + 1
  if total - len(prefix) - len(sep) < 3:
    raise ValueError(f"seq_len={seq_len} leaves no room next to the tokenizer's prefix "
                     f"{prefix} and separator {sep}.")
  seqs, target_start, lengths, truncated, targets_truncated = _layout(
      p_ids, sep_ids, t_ids, prefix=prefix, eos=eos, pad=tokenizer.pad_id, total=total,
      max_target_len=max_target_len, head=int(getattr(tokenizer, "prompt_head_len", 0)))
  return Examples(seqs, target_start, lengths, prompts, targets, dropped, truncated,
                  targets_truncated)


def padding_share(examples: Examples) -> float:
  """Share of the rows' positions that hold padding."""
  return 1.0 - float(examples.lengths.sum()) / max(examples.seqs.size, 1)

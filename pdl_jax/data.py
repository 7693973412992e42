"""Data: a task's (prompt, target) texts -> the run's tokenizer -> encoded prefix-LM
examples -> batches.

One example becomes  [prefix] [prompt tokens] [separator] [target tokens] [eos],
shifted into model inputs and labels (the own model's separator is its `<sep>`
piece and it has no prefix; a pretrained model's separator is plain text, a newline,
and its prefix is its BOS where it has one: Llama 3 and Gemma expect it); the loss mask is 1 on the labels that are target tokens or
EOS, never on the prompt. A target cut to `max_target_len` gets no EOS: it did not
end there, and an EOS would teach the model to stop early. The offline corpora fit
in memory, so each process loads and tokenizes a split once (batched) into numpy
arrays, and a batch is a pure function of (seed, step): the data position is the
step, so a resumed run sees exactly the batches an uninterrupted one would, and
every process can build the whole global batch (train.place_batch gives each device
its rows by index).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import os
import time
from typing import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np

from pdl_jax import tasks as tasks_lib
from pdl_jax import tokenizers as tok_lib
from pdl_jax import user_data
from pdl_jax import utils
from pdl_jax.losses import window as window_lib
from pdl_jax.models.hf import families as hf_families
from pdl_jax.tokenizers import Tokenizer
from pdl_jax.tokenizers import chat
from pdl_jax.tokenizers import sentencepiece as sp_lib

TOKENIZER_FILENAME = "tokenizer.model"
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
    return (pos >= self.target_start[:, None]) & (pos < self.lengths[:, None])


def _lengths(seqs: Sequence[Sequence[int]]) -> np.ndarray:
  return np.fromiter(map(len, seqs), np.int64, count=len(seqs))


def _layout(p_ids, sep_ids, t_ids, *, prefix: list[int], eos: int, pad: int, total: int,
            max_target_len: int):
  """The example layout of encode_examples, vectorised over examples (numpy): a
  per-example Python loop cost more than the tokenizer on the frequency pass.

  Rows are filled in row-major order, so the kept tokens of all examples, one stream
  (each example's prompt end, separator and target start, concatenated by C-level
  iteration into one np.fromiter), go into the row positions between the prefix and
  each row's end with one boolean-mask assignment; EOS and the prefix are written
  after. Only kept tokens are ever copied (long prompts keep their end).
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
    prompts[i] = prompts[i][len(prompts[i]) - k:]
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
      max_target_len=max_target_len)
  return Examples(seqs, target_start, lengths, prompts, targets, dropped, truncated,
                  targets_truncated)


def pack_examples(examples: Examples, *, loss_capacity: int, pad_id: int) -> Examples:
  """Several examples per row, first fit: each example (in split order) goes into
  the first row with room for its tokens and whose loss tokens stay within
  `loss_capacity` (so the loss window keeps every target: window.packed_capacity),
  else a new row.

  Rows get segment ids (1, 2, ... per example, 0 on padding), positions restarting
  at each example and the loss positions of every example: with them the model
  (`Decoder(..., segment_ids_BxL=)`, attention within a segment) and the loss see
  each example as they would alone in a row (tests/test_packing.py). Prompts and
  targets stay the examples' (evaluation never packs).

  Raises:
    ValueError: an example with more loss tokens than `loss_capacity`.
  """
  total = examples.seqs.shape[1]
  n_loss = examples.lengths - examples.target_start
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
    loss_mask[r, start + examples.target_start[i]:start + n] = True
    fill[r] += n
  return dataclasses.replace(
      examples, seqs=seqs, target_start=np.zeros(rows, np.int32),
      lengths=fill.astype(np.int32), segment_ids=segment_ids, positions=positions,
      loss_mask=loss_mask)


def padding_share(examples: Examples) -> float:
  """Share of the rows' positions that hold padding."""
  return 1.0 - float(examples.lengths.sum()) / max(examples.seqs.size, 1)


def make_batch(examples: Examples, idx: np.ndarray) -> dict[str, np.ndarray]:
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


# ---------------------------------------------------------------------------
# Texts of a split.
# ---------------------------------------------------------------------------


def load_texts(spec: tasks_lib.DatasetSpec, split: str, *, data_dir: str | None,
               limit: int | None = None, log=utils.log) -> tuple[list[str], list[str]]:
  """(prompts, targets) of a TFDS split (its first `limit` examples if given).

  Builds the dataset first if needed (the offline builders fetch their sources):
  process 0 builds, the others wait for it, so that several processes never write
  one data_dir at once.
  """
  import tensorflow_datasets as tfds

  import pdl_jax.datasets  # noqa: F401  registers the offline builders

  start = time.perf_counter()
  if jax.process_index() == 0:
    tfds.builder(spec.tfds_name, data_dir=data_dir).download_and_prepare()  # no-op once built
  utils.sync(f"prepare {spec.tfds_name}")
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir)  # sees process 0's build
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


def load_split_texts(config, split: str, limit: int | None = None
                     ) -> tuple[list[str], list[str]]:
  """(prompts, targets) of a split of the config's task: of its TFDS dataset, or of
  the user's files (dataset.name "files": pdl_jax.user_data); for pretraining, whole
  documents of every default corpus as targets."""
  # Every process reads the whole (small, offline) split and takes its rows of each
  # global batch (TrainBatches).
  if config.dataset.name == tasks_lib.FILES:
    return user_data.load_split(config.dataset, split, limit)
  kwargs = dict(data_dir=config.dataset.data_dir, limit=limit)
  if config.task != tasks_lib.PRETRAIN:
    return load_texts(tasks_lib.get_dataset(config.task, config.dataset.name), split,
                      **kwargs)
  prompts, targets = [], []
  for task in sorted(tasks_lib.DEFAULT_DATASET):
    raw = dataclasses.replace(tasks_lib.get_dataset(task), prompt="{inputs}")
    p, t = load_texts(raw, split, **kwargs)
    prompts.extend([""] * len(p))
    targets.extend(f"{a}\n{b}" for a, b in zip(p, t))
  return prompts, targets


# ---------------------------------------------------------------------------
# The run's tokenizer and encoded splits.
# ---------------------------------------------------------------------------


def get_tokenizer(config, workdir: str,
                  train_texts: Callable[[], tuple[list[str], list[str]]]) -> Tokenizer:
  """A pretrained model's tokenizer (in the config's prompt format), the configured
  one, init_from's, or one trained once in the workdir."""
  if config.model.pretrained is not None:
    tokenizer = tok_lib.load(config.model.pretrained)  # never retrained or resized
    if tokenizer.eos_id < 0:  # -1 would index the embedding's last row
      raise ValueError(
          f"the tokenizer {tokenizer.path} of {config.model.pretrained!r} has no EOS token "
          "(no eos_token in tokenizer_config.json, no eos_token_id in "
          "generation_config.json or config.json): targets could not end and generation "
          "could not stop; add one to tokenizer_config.json.")
    return with_prompt_format(tokenizer, config.data.prompt_format)
  path = config.tokenizer.path
  if path is None and config.init_from is not None:
    path = str(utils.path(config.init_from) / TOKENIZER_FILENAME)
  if path is not None:
    return tok_lib.load(path)
  path = str(utils.path(workdir) / TOKENIZER_FILENAME)
  if jax.process_index() == 0:  # one process trains; the others wait, then load it
    if not utils.path(path).exists():
      utils.log(f"tokenizer: training a {config.tokenizer.vocab_size}-piece unigram model")
    texts = (t for pair in zip(*train_texts()) for t in pair if t)
    sp_lib.load_or_train(path, texts, config.tokenizer.vocab_size, seed=config.seed,
                         max_sentences=config.tokenizer.train_sentences)
  utils.sync("tokenizer")
  return tok_lib.load(path)


def with_prompt_format(tokenizer: Tokenizer, prompt_format: str | None) -> Tokenizer:
  """The tokenizer that lays out examples in `prompt_format`: "plain" (prompt,
  newline, target, EOS), "chat" (the model's chat template: tokenizers.chat), or None
  for "chat" when the tokenizer has a chat template and "plain" otherwise.

  Raises:
    ValueError: an unknown format, or "chat" for a tokenizer without a template.
  """
  if prompt_format not in PROMPT_FORMATS + (None,):
    raise ValueError(f"config.data.prompt_format={prompt_format!r}; expected one of "
                     f"{PROMPT_FORMATS} or None.")
  template = getattr(tokenizer, "chat_template", None)
  if prompt_format == "chat" and template is None:
    raise ValueError(f"config.data.prompt_format='chat' but the tokenizer {tokenizer.path} "
                     "has no chat template; use 'plain'.")
  if prompt_format == "plain" or template is None:
    return tokenizer
  return chat.ChatTokenizer(tokenizer, template, tokenizer.special_tokens)


def encode_split(config, tokenizer: Tokenizer, texts: tuple[list[str], list[str]]
                 ) -> Examples:
  """encode_examples with the config's lengths."""
  return encode_examples(*texts, tokenizer, seq_len=config.seq_len,
                         max_target_len=config.max_target_len)


def vocab_size(config, tokenizer: Tokenizer) -> int:
  """The run's vocabulary: a pretrained model's embedding rows (often more than its
  tokenizer has tokens), else the tokenizer's size.

  Raises:
    ValueError: a tokenizer with more tokens than the embedding has rows.
  """
  if config.model.pretrained is None:
    return tokenizer.vocab_size
  rows = hf_families.read_config(config.model.pretrained).vocab_size
  if tokenizer.vocab_size > rows:
    raise ValueError(f"the tokenizer {tokenizer.path!r} has {tokenizer.vocab_size} tokens, "
                     f"more than the {rows} embedding rows of {config.model.pretrained!r}.")
  return rows


def prepare_train(config, workdir: str) -> tuple[Tokenizer, Examples, int]:
  """The run's tokenizer (trained once in the workdir, or the pretrained model's),
  its encoded train split, and the run's vocabulary size."""
  # Every process loads the texts (and passes the dataset barrier) before process 0
  # may train the tokenizer on them.
  texts = load_split_texts(config, "train", config.dataset.max_train_examples)
  tokenizer = get_tokenizer(config, workdir, lambda: texts)
  vocab = vocab_size(config, tokenizer)  # before any long work: a clear error
  train_ex = encode_split(config, tokenizer, texts)
  utils.log(f"data: {len(train_ex)} train examples ({train_ex.dropped_empty} with empty "
            f"targets dropped, {train_ex.truncated} truncated, "
            f"{train_ex.targets_truncated} of them in the target: no EOS)")
  return tokenizer, train_ex, vocab


def pack_split(config, tokenizer: Tokenizer, examples: Examples) -> Examples:
  """The train split packed (config.data.packing), with what it saved logged."""
  t0 = time.perf_counter()
  packed = pack_examples(examples, pad_id=tokenizer.pad_id, loss_capacity=(
      window_lib.packed_capacity(config.max_target_len, config.seq_len)))
  utils.log(f"data: packed {len(examples)} examples into {len(packed)} rows "
            f"({len(examples) / len(packed):.2f} a row) in {time.perf_counter() - t0:.1f} s; "
            f"padding {padding_share(examples):.0%} -> {padding_share(packed):.0%} of the "
            "positions")
  return packed

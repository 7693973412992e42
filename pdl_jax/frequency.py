"""The frequency pass: token counts over a TFDS split, stored with the run.

One pass over the text examples of a split: batched SentencePiece encoding in a
two worker threads, each with SentencePiece's own threads on all cores (it releases
the GIL), while the main thread reads; counts accumulated with np.bincount into
int64 [V]. Each JAX process counts its own shard
of the split and the counts are summed across processes.

The result, TokenStats, is saved as one .npz file written atomically (temporary
name, then rename) with a checksum, and is checked against the tokenizer on load.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import itertools
import json
import os
import sys
import time
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from pdl_jax import loss as loss_lib
from pdl_jax.tokenizer import Tokenizer, atomic_write_bytes

STATS_FILENAME = "token_stats.npz"
_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TokenStats:
  """Token counts of a corpus split, and what they were counted with.

  counts: int64 [vocab_size], how often each id occurs in the counted fields
    (EOS included once per field value when add_eos, since the loss sees it).
  """

  counts: np.ndarray
  num_tokens: int
  num_examples: int
  vocab_size: int
  tokenizer_sha256: str
  dataset: str
  split: str
  fields: tuple[str, ...]
  add_eos: bool = True

  def __post_init__(self):
    counts = np.asarray(self.counts)
    if counts.shape != (self.vocab_size,) or counts.dtype != np.int64:
      raise ValueError(
          f"counts must be int64 [{self.vocab_size}]; got {counts.dtype} {counts.shape}.")
    if int(counts.sum()) != self.num_tokens:
      raise ValueError(
          f"counts sum to {int(counts.sum())} but num_tokens is {self.num_tokens}.")

  def weights(self, alpha: float, epsilon: float | None = None, **kwargs) -> np.ndarray:
    """PDL weights [V] from these counts; see loss.power_law_weights."""
    return loss_lib.power_law_weights(self.counts, alpha, epsilon, **kwargs)

  def merge(self, other: "TokenStats") -> "TokenStats":
    """Sum of two shards' stats (same tokenizer, dataset, split and fields)."""
    for name in ("vocab_size", "tokenizer_sha256", "dataset", "split", "fields",
                 "add_eos"):
      if getattr(self, name) != getattr(other, name):
        raise ValueError(f"cannot merge stats with different {name}: "
                         f"{getattr(self, name)!r} vs {getattr(other, name)!r}.")
    return dataclasses.replace(
        self, counts=self.counts + other.counts,
        num_tokens=self.num_tokens + other.num_tokens,
        num_examples=self.num_examples + other.num_examples)

  def check_tokenizer(self, tokenizer: Tokenizer, where: str = "token stats") -> None:
    """Raises ValueError unless these stats were counted with `tokenizer`."""
    if self.vocab_size != tokenizer.vocab_size:
      raise ValueError(
          f"{where} were counted with vocab size {self.vocab_size}, but the "
          f"tokenizer {tokenizer.path!r} has {tokenizer.vocab_size}; recount with "
          "this tokenizer or use the tokenizer the stats were made with.")
    if self.tokenizer_sha256 != tokenizer.sha256:
      raise ValueError(
          f"{where} were counted with tokenizer sha256 {self.tokenizer_sha256[:16]}..., "
          f"but {tokenizer.path!r} has sha256 {tokenizer.sha256[:16]}...; recount with "
          "this tokenizer or use the tokenizer the stats were made with.")

  def metadata(self) -> dict[str, Any]:
    """Everything but the counts, as JSON-able values, plus a counts checksum."""
    return {
        "format_version": _FORMAT_VERSION,
        "num_tokens": int(self.num_tokens), "num_examples": int(self.num_examples),
        "vocab_size": int(self.vocab_size), "tokenizer_sha256": self.tokenizer_sha256,
        "dataset": self.dataset, "split": self.split, "fields": list(self.fields),
        "add_eos": bool(self.add_eos),
        "counts_sha256": hashlib.sha256(
            np.ascontiguousarray(self.counts).tobytes()).hexdigest(),
    }

  @classmethod
  def from_parts(cls, counts: np.ndarray, meta: Mapping[str, Any],
                 where: str) -> "TokenStats":
    """Rebuilds stats from counts and `metadata()`, verifying the checksum."""
    try:
      counts = np.asarray(counts, dtype=np.int64)
      digest = hashlib.sha256(np.ascontiguousarray(counts).tobytes()).hexdigest()
      if digest != meta["counts_sha256"]:
        raise ValueError("counts checksum does not match")
      return cls(counts=counts, num_tokens=int(meta["num_tokens"]),
                 num_examples=int(meta["num_examples"]),
                 vocab_size=int(meta["vocab_size"]),
                 tokenizer_sha256=str(meta["tokenizer_sha256"]),
                 dataset=str(meta["dataset"]), split=str(meta["split"]),
                 fields=tuple(meta["fields"]), add_eos=bool(meta["add_eos"]))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"token stats at {where} are corrupt: {e}") from e

  def save(self, path: str) -> str:
    """Writes one .npz (counts + JSON metadata) atomically; returns the path.

    `path` may be a folder (the file is then folder/token_stats.npz).
    """
    if os.path.isdir(path):
      path = os.path.join(path, STATS_FILENAME)
    buf = io.BytesIO()
    np.savez(buf, counts=self.counts,
             meta=np.frombuffer(json.dumps(self.metadata()).encode(), np.uint8))
    atomic_write_bytes(path, buf.getvalue())
    return path

  @classmethod
  def load(cls, path: str) -> "TokenStats":
    """Reads stats written by `save`; clear errors naming the path.

    Raises:
      FileNotFoundError: nothing at path.
      ValueError: truncated, unreadable or inconsistent file.
    """
    if os.path.isdir(path):
      path = os.path.join(path, STATS_FILENAME)
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"token stats file {path!r} does not exist; run the frequency pass "
          "(python -m pdl_jax.frequency --config=... --workdir=...).")
    try:
      with np.load(path, allow_pickle=False) as z:
        counts = z["counts"]
        meta = json.loads(z["meta"].tobytes().decode())
    except Exception as e:  # zipfile, OSError, JSON, KeyError: all mean corrupt.
      raise ValueError(f"token stats file {path!r} is corrupt or truncated: "
                       f"{type(e).__name__}: {e}") from e
    return cls.from_parts(counts, meta, repr(path))


def _text_batches(dataset, fields: Sequence[str], batch_size: int
                  ) -> Iterator[tuple[int, list[str]]]:
  """(number of examples, texts of all fields) per batch of a tf.data dataset."""
  import tensorflow_datasets as tfds  # heavy: only when a pass runs

  for batch in tfds.as_numpy(dataset.batch(batch_size).prefetch(2)):
    missing = [f for f in fields if f not in batch]
    if missing:
      raise ValueError(f"fields {missing} are not in the dataset; it has "
                       f"{sorted(batch)}.")
    n = len(batch[fields[0]])
    texts = [t.decode("utf-8") for f in fields for t in batch[f]]
    yield n, texts


def _count_batch(tokenizer: Tokenizer, texts: list[str], threads: int) -> np.ndarray:
  """Token counts [V] of a batch of texts: batched encode, one flat array, bincount."""
  ids = tokenizer.encode_batch(texts, num_threads=threads)
  flat = np.fromiter(itertools.chain.from_iterable(ids), np.int64,
                     sum(map(len, ids)))
  counts = np.bincount(flat, minlength=tokenizer.vocab_size)
  if len(counts) > tokenizer.vocab_size:
    raise ValueError(f"the tokenizer produced id {len(counts) - 1}, beyond its "
                     f"vocabulary of {tokenizer.vocab_size}.")
  return counts


def count_tokens(dataset, tokenizer: Tokenizer, *, fields: Sequence[str] = ("targets",),
                 batch_size: int = 1024, add_eos: bool = True, dataset_name: str = "",
                 split: str = "", num_threads: int | None = None,
                 progress_every_s: float = 10.0, log=None) -> TokenStats:
  """One pass over a tf.data dataset of text examples -> TokenStats.

  Args:
    dataset: tf.data.Dataset of dicts with string features named by `fields`.
    tokenizer: the run's tokenizer.
    fields: features whose text is counted (the loss's targets by default).
    batch_size: examples encoded per call.
    add_eos: count one EOS per field value (the loss is applied to EOS too).
    dataset_name, split: recorded in the stats.
    num_threads: SentencePiece encoding threads per batch (default: all cores).
      Two batches are in flight: one is encoded (SentencePiece releases the GIL)
      while the other's ids are counted and this thread reads the next.
    progress_every_s: seconds between progress lines (examples, tokens, tokens/s).
    log: callable taking a line; default prints to stderr.

  Raises:
    ValueError: the dataset has no examples or lacks a field.
  """
  fields = tuple(fields)
  log = log or (lambda line: print(line, file=sys.stderr, flush=True))
  threads = num_threads or os.cpu_count() or 1
  workers = 2  # double buffering; more workers only contend for the GIL
  counts = np.zeros(tokenizer.vocab_size, np.int64)
  num_examples = num_texts = 0
  start = last = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending: collections.deque = collections.deque()
    for n, texts in _text_batches(dataset, fields, batch_size):
      pending.append(pool.submit(_count_batch, tokenizer, texts, threads))
      num_examples += n
      num_texts += len(texts)
      while len(pending) > workers:  # bounded: at most `workers` batches in flight
        counts += pending.popleft().result()
      now = time.perf_counter()
      if now - last >= progress_every_s:
        last = now
        toks = int(counts.sum())
        log(f"frequency pass: {num_examples} examples, {toks} tokens, "
            f"{toks / (now - start) / 1e6:.2f} M tokens/s")
    while pending:
      counts += pending.popleft().result()
  if add_eos:
    counts[tokenizer.eos_id] += num_texts
  if num_examples == 0:
    raise ValueError(
        f"the dataset {dataset_name or '(unnamed)'} split {split or '(unnamed)'} has no "
        "examples; cannot count token frequencies over nothing.")
  elapsed = time.perf_counter() - start
  log(f"frequency pass done: {num_examples} examples, {int(counts.sum())} tokens in "
      f"{elapsed:.1f} s ({counts.sum() / max(elapsed, 1e-9) / 1e6:.2f} M tokens/s)")
  return TokenStats(counts=counts, num_tokens=int(counts.sum()),
                    num_examples=num_examples, vocab_size=tokenizer.vocab_size,
                    tokenizer_sha256=tokenizer.sha256, dataset=dataset_name,
                    split=split, fields=fields, add_eos=add_eos)


def sum_across_processes(stats: TokenStats) -> TokenStats:
  """Sums per-process counts over all JAX processes; a no-op on one process."""
  import jax
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    return stats
  totals = np.concatenate([stats.counts, [stats.num_examples]]).astype(np.int64)
  gathered = np.asarray(multihost_utils.process_allgather(totals))  # [P, V + 1]
  summed = gathered.reshape(jax.process_count(), -1).sum(axis=0)
  counts = summed[:-1].astype(np.int64)
  return dataclasses.replace(stats, counts=counts, num_tokens=int(counts.sum()),
                             num_examples=int(summed[-1]))


def count_split(builder_name: str, split: str, tokenizer: Tokenizer, *,
                data_dir: str | None = None, fields: Sequence[str] = ("targets",),
                **kwargs) -> TokenStats:
  """Counts a TFDS split, each JAX process its own shard, summed across processes."""
  import jax
  import tensorflow_datasets as tfds

  shard = tfds.split_for_jax_process(split) if jax.process_count() > 1 else split
  ds = tfds.load(builder_name, split=shard, data_dir=data_dir, shuffle_files=False)
  local = count_tokens(ds, tokenizer, fields=fields, dataset_name=builder_name,
                       split=split, **kwargs)
  return sum_across_processes(local)


def most_and_least_frequent(stats: TokenStats, tokenizer: Tokenizer, top: int,
                            weights: np.ndarray) -> str:
  """A table of the `top` most and least frequent seen tokens with their weights."""
  seen = np.flatnonzero(stats.counts > 0)
  order = seen[np.argsort(-stats.counts[seen], kind="stable")]
  lines = []
  for title, ids in (("most frequent (down-weighted)", order[:top]),
                     ("least frequent (up-weighted)", order[::-1][:top])):
    lines.append(f"{title}:")
    lines.append(f"  {'id':>6}  {'piece':<20} {'count':>10} {'weight':>10}")
    for i, piece in zip(ids, tokenizer.id_to_piece(ids)):
      lines.append(f"  {i:>6}  {piece:<20} {stats.counts[i]:>10} {weights[i]:>10.4g}")
  unseen = int((stats.counts == 0).sum())
  lines.append(f"{unseen} of {stats.vocab_size} ids never occur "
               f"(weight {weights[stats.counts == 0].max() if unseen else float('nan'):.4g}).")
  return "\n".join(lines)


def load_or_count(path: str, tokenizer: Tokenizer, count_fn, *,
                  dataset: str | None = None, split: str | None = None,
                  fields: Sequence[str] | None = None, log=None,
                  write: bool = True) -> TokenStats:
  """Stats stored at `path`, checked against the run, or a new pass saved there.

  A resumed run reuses the stats stored with its checkpoints instead of recounting;
  stats that belong to another tokenizer, dataset, split or fields are refused.

  Args:
    path: the stats file (e.g. WORKDIR/checkpoints/token_stats.npz).
    tokenizer: the run's tokenizer (sha256 and vocab size must match).
    count_fn: () -> TokenStats, the pass to run when nothing is stored.
    dataset, split, fields: what the run counts; checked when given.
    write: save new stats (False on all but one of several processes, which all
      run count_fn since it sums across them).
  """
  log = log or (lambda line: print(line, file=sys.stderr, flush=True))
  if os.path.exists(path):
    stats = TokenStats.load(path)
    stats.check_tokenizer(tokenizer, where=f"token stats {path!r}")
    for name, want in (("dataset", dataset), ("split", split),
                       ("fields", None if fields is None else tuple(fields))):
      if want is not None and getattr(stats, name) != want:
        raise ValueError(
            f"token stats {path!r} were counted over {name} "
            f"{getattr(stats, name)!r}, but this run uses {want!r}; use a new "
            "workdir or delete the stats to recount.")
    log(f"token stats: reusing {path} ({stats.num_tokens} tokens, "
        f"{stats.num_examples} examples)")
    return stats
  stats = count_fn()
  stats.check_tokenizer(tokenizer, where="freshly counted token stats")
  if write:
    stats.save(path)
    log(f"token stats: saved {path}")
  return stats


# ---------------------------------------------------------------------------
# python -m pdl_jax.frequency --config=configs/<task>.py --workdir=DIR [--top=N]
# ---------------------------------------------------------------------------


def run_pass(cfg, workdir: str, top: int = 0) -> tuple[TokenStats, str]:
  """The frequency pass of a run config only: tokenizer (trained once in the
  workdir), counts of the train targets stored where training with the same
  workdir reuses them. Returns the stats and a report (with the `top` most and
  least frequent tokens and their weights at the config's alpha)."""
  from pdl_jax import train

  train.validate_config(cfg)
  os.makedirs(workdir, exist_ok=True)
  tokenizer, _, stats = train.prepare_data(cfg, workdir)
  path = os.path.join(os.path.abspath(workdir), "checkpoints", STATS_FILENAME)
  report = (f"{stats.dataset} {stats.split} {list(stats.fields)}: {stats.num_examples} "
            f"examples, {stats.num_tokens} tokens, vocab {stats.vocab_size}; stats at {path}")
  if top:
    report += f"\nweights at alpha={cfg.loss.alpha}:\n" + most_and_least_frequent(
        stats, tokenizer, top, train.loss_weights(cfg, stats))
  return stats, report


def main(argv) -> None:
  """CLI: --config, --workdir, --top (see run_pass)."""
  del argv
  from absl import flags

  print(run_pass(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.top)[1])


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "configs/<task>.py[:args]")
  flags.DEFINE_string("workdir", None, "the run's workdir (stats go to its checkpoints/)")
  flags.DEFINE_integer("top", 0, "print the N most and least frequent tokens")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)

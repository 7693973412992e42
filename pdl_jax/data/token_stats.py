"""Token counts of exactly the tokens the loss sees, stored beside the checkpoints.

The counts come from the run's encoded train examples and their loss mask (one
tokenisation, one numpy bincount into int64 [V]), so they are of the target tokens
after truncation, with EOS where the loss has one. Each JAX process counts its
share of the rows and the counts are summed across processes without leaving
int64. WORKDIR/checkpoints/token_stats.npz holds them (TokenStats: counts and what
they were counted with, plus a checksum), written atomically through the path
layer; a resumed run reuses them. The loss weights made from them are
pdl_jax.losses.weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from typing import Any, Mapping, Sequence
import numpy as np
from pdl_jax.data import examples as examples_lib
from pdl_jax.data import tasks as tasks_lib
from pdl_jax.data import files as data_files
from pdl_jax import multihost
from pdl_jax import paths
from pdl_jax.tokenizers import Tokenizer


STATS_FILENAME = "token_stats.npz"


_FORMAT_VERSION = 2  # 2: counts of the loss's tokens (1 counted whole target texts)


def sha256_of(array: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def save_npz(path: str, array_name: str, array: np.ndarray, meta: Mapping[str, Any]
              ) -> None:
  buf = io.BytesIO()
  np.savez(buf, **{array_name: array},
           meta=np.frombuffer(json.dumps(dict(meta)).encode(), np.uint8))
  paths.atomic_write_bytes(path, buf.getvalue())


def load_npz(path: str, array_name: str, what: str) -> tuple[np.ndarray, dict]:
  p = paths.path(path)
  if not p.exists():
    raise FileNotFoundError(
        f"{what} file {path!r} does not exist; run the frequency pass "
        "(python -m pdl_jax.cli.count_tokens --config=... --workdir=...).")
  try:
    with np.load(io.BytesIO(p.read_bytes()), allow_pickle=False) as z:
      return z[array_name], json.loads(z["meta"].tobytes().decode())
  except Exception as e:  # zipfile, OSError, JSON, KeyError: all mean corrupt.
    raise ValueError(f"{what} file {path!r} is corrupt or truncated: "
                     f"{type(e).__name__}: {e}") from e


def in_folder(path: str, filename: str) -> str:
  """`path`, or path/filename when path is a folder."""
  p = paths.path(path)
  return str(p / filename) if p.is_dir() else str(path)


@dataclasses.dataclass(frozen=True)
class TokenStats:
  """Token counts of a corpus split, and what they were counted with.

  counts: int64 [vocab_size], how often each id occurs among the tokens the loss
    is applied to (target tokens, and EOS where the target was not truncated).
  """

  counts: np.ndarray
  num_tokens: int
  num_examples: int
  vocab_size: int
  tokenizer_sha256: str
  dataset: str
  split: str
  fields: tuple[str, ...]
  # The run settings that decide which tokens the loss sees (task, dataset, example
  # cap, lengths): stored stats are reused only by a run with the same ones.
  counted_with: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    counts = np.asarray(self.counts)
    if counts.shape != (self.vocab_size,) or counts.dtype != np.int64:
      raise ValueError(
          f"counts must be int64 [{self.vocab_size}]; got {counts.dtype} {counts.shape}.")
    if int(counts.sum()) != self.num_tokens:
      raise ValueError(
          f"counts sum to {int(counts.sum())} but num_tokens is {self.num_tokens}.")

  def merge(self, other: "TokenStats") -> "TokenStats":
    """Sum of two shards' stats (same tokenizer, dataset, split and fields)."""
    for name in ("vocab_size", "tokenizer_sha256", "dataset", "split", "fields"):
      if getattr(self, name) != getattr(other, name):
        raise ValueError(f"cannot merge stats with different {name}: "
                         f"{getattr(self, name)!r} vs {getattr(other, name)!r}.")
    return dataclasses.replace(
        self, counts=self.counts + other.counts,
        num_tokens=self.num_tokens + other.num_tokens,
        num_examples=self.num_examples + other.num_examples)

  def check_tokenizer(self, tokenizer: Tokenizer, where: str = "token stats",
                      vocab_size: int | None = None) -> None:
    """Raises ValueError unless these stats were counted with `tokenizer` over a
    vocabulary of `vocab_size` ids (default the tokenizer's; a pretrained model's
    embedding may have more rows than its tokenizer has tokens)."""
    want = tokenizer.vocab_size if vocab_size is None else vocab_size
    if self.vocab_size != want:
      raise ValueError(
          f"{where} were counted with vocab size {self.vocab_size}, but the "
          f"tokenizer {tokenizer.path!r} has {want}; recount with "
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
        "counts_sha256": sha256_of(self.counts), "counted_with": dict(self.counted_with),
    }

  @classmethod
  def from_parts(cls, counts: np.ndarray, meta: Mapping[str, Any],
                 where: str) -> "TokenStats":
    """Rebuilds stats from counts and `metadata()`, verifying the checksum."""
    try:
      counts = np.asarray(counts, dtype=np.int64)
      if meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"format version {meta.get('format_version')} (expected "
                         f"{_FORMAT_VERSION}: counts of the loss's tokens); recount")
      if sha256_of(counts) != meta["counts_sha256"]:
        raise ValueError("counts checksum does not match")
      return cls(counts=counts, num_tokens=int(meta["num_tokens"]),
                 num_examples=int(meta["num_examples"]),
                 vocab_size=int(meta["vocab_size"]),
                 tokenizer_sha256=str(meta["tokenizer_sha256"]),
                 dataset=str(meta["dataset"]), split=str(meta["split"]),
                 fields=tuple(meta["fields"]),
                 counted_with=dict(meta.get("counted_with", {})))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"token stats at {where} are corrupt: {e}") from e

  def save(self, path: str) -> str:
    """Writes one .npz (counts + JSON metadata) atomically; returns the path.

    `path` may be a folder (the file is then folder/token_stats.npz).
    """
    path = in_folder(path, STATS_FILENAME)
    save_npz(path, "counts", self.counts, self.metadata())
    return path

  @classmethod
  def load(cls, path: str) -> "TokenStats":
    """Reads stats written by `save`; clear errors naming the path.

    Raises:
      FileNotFoundError: nothing at path.
      ValueError: truncated, unreadable or inconsistent file.
    """
    path = in_folder(path, STATS_FILENAME)
    counts, meta = load_npz(path, "counts", "token stats")
    return cls.from_parts(counts, meta, repr(path))


def count_examples(examples: examples_lib.Examples, tokenizer: Tokenizer, *,
                   dataset_name: str = "", split: str = "",
                   process_index: int = 0, process_count: int = 1,
                   vocab_size: int | None = None) -> TokenStats:
  """Counts of exactly the tokens the loss sees: the target tokens (and EOS where the
  target was not truncated) of the encoded examples, one numpy bincount.

  With several processes each counts rows process_index::process_count; sum the
  shards with sum_across_processes. vocab_size: the model's vocabulary (default the
  tokenizer's; a pretrained embedding may have padding rows).

  Raises:
    ValueError: no examples, or a token id beyond the tokenizer's vocabulary.
  """
  seqs = examples.seqs[process_index::process_count]
  positions = examples.loss_positions()[process_index::process_count]
  if len(examples) == 0:
    raise ValueError(
        f"the dataset {dataset_name or '(unnamed)'} split {split or '(unnamed)'} has no "
        "examples; cannot count token frequencies over nothing.")
  vocab = tokenizer.vocab_size if vocab_size is None else vocab_size
  ids = seqs[positions].astype(np.int64)
  counts = np.bincount(ids, minlength=vocab)
  if len(counts) > vocab:
    raise ValueError(f"the tokenizer produced id {len(counts) - 1}, beyond the "
                     f"vocabulary of {vocab}.")
  return TokenStats(counts=counts.astype(np.int64), num_tokens=int(counts.sum()),
                    num_examples=len(seqs), vocab_size=vocab,
                    tokenizer_sha256=tokenizer.sha256, dataset=dataset_name,
                    split=split, fields=("targets",))


def sum_across_processes(stats: TokenStats) -> TokenStats:
  """Sums per-process counts over all JAX processes, exactly in int64; a no-op on
  one process."""
  import jax

  if jax.process_count() == 1:
    return stats
  totals = np.concatenate([stats.counts, [stats.num_examples]]).astype(np.int64)
  summed = multihost.allgather_int64(totals).sum(axis=0)
  counts = summed[:-1]
  return dataclasses.replace(stats, counts=counts, num_tokens=int(counts.sum()),
                             num_examples=int(summed[-1]))


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
                  fields: Sequence[str] | None = None, log=multihost.log,
                  write: bool = True, vocab_size: int | None = None,
                  counted_with: Mapping[str, Any] | None = None) -> TokenStats:
  """Stats stored at `path`, checked against the run, or a new pass saved there.

  A resumed run reuses the stats stored with its checkpoints instead of recounting;
  stats that belong to another tokenizer, dataset, split or fields are refused.

  Args:
    path: the stats file (e.g. WORKDIR/checkpoints/token_stats.npz).
    tokenizer: the run's tokenizer (sha256 and vocab size must match).
    count_fn: () -> TokenStats, the pass to run when nothing is stored.
    dataset, split, fields, counted_with: what the run counts and the settings it
      counts with; checked when given.
    write: save new stats (False on all but one of several processes, which all
      run count_fn since it sums across them).
  """
  if paths.path(path).exists():
    stats = TokenStats.load(path)
    stats.check_tokenizer(tokenizer, where=f"token stats {path!r}", vocab_size=vocab_size)
    for name, want in (("dataset", dataset), ("split", split),
                       ("fields", None if fields is None else tuple(fields))):
      if want is not None and getattr(stats, name) != want:
        raise ValueError(
            f"token stats {path!r} were counted over {name} "
            f"{getattr(stats, name)!r}, but this run uses {want!r}; use a new "
            "workdir or delete the stats to recount.")
    if counted_with is not None and dict(stats.counted_with) != dict(counted_with):
      diffs = [f"{k}: stored {stats.counted_with.get(k)!r}, now {counted_with.get(k)!r}"
               for k in sorted(set(stats.counted_with) | set(counted_with))
               if stats.counted_with.get(k) != counted_with.get(k)]
      raise ValueError(
          f"token stats {path!r} were counted for other data settings "
          f"({'; '.join(diffs)}); use a new --workdir or --config.resume=False (or "
          "delete the stats to recount).")
    log(f"token stats: reusing {path} ({stats.num_tokens} tokens, "
        f"{stats.num_examples} examples)")
    return stats
  stats = count_fn()
  stats.check_tokenizer(tokenizer, where="freshly counted token stats",
                        vocab_size=vocab_size)
  if write:
    stats.save(path)
    log(f"token stats: saved {path}")
  return stats


def prepare_stats(data, workdir: str, tokenizer: Tokenizer,
                  train_ex: examples_lib.Examples, vocab_size: int | None = None) -> TokenStats:
  """Token stats of the run's train targets: counted once, stored in
  WORKDIR/checkpoints and reused by every later run or resume in the workdir.
  data: the run's data settings (pdl_jax.data.pipeline.DataSettings)."""
  import jax

  name = str(data.dataset.name or data.task)
  settings = count_settings(data)

  def count() -> TokenStats:
    local = count_examples(train_ex, tokenizer, dataset_name=name, split="train",
                           process_index=jax.process_index(),
                           process_count=jax.process_count(), vocab_size=vocab_size)
    return dataclasses.replace(sum_across_processes(local), counted_with=settings)

  path = str(paths.path(workdir) / "checkpoints" / STATS_FILENAME)
  return load_or_count(path, tokenizer, count, write=jax.process_index() == 0,
                       vocab_size=vocab_size, counted_with=settings)


def count_settings(data) -> dict[str, Any]:
  """The data settings (pipeline.DataSettings) that decide which tokens the loss
  sees; with the user's own files (dataset.name "files"), their content and fields
  too, so stats counted from an earlier version of a file are refused."""
  settings = {"task": data.task, "dataset": data.dataset.name,
              "max_train_examples": data.dataset.max_train_examples,
              "seq_len": data.seq_len, "max_target_len": data.max_target_len,
              "pretrained": data.pretrained}
  if data.dataset.name == tasks_lib.FILES:
    settings.update(data_files.fingerprint(data.dataset))
  if data.dataset.get("tune_examples"):  # examples held out of training (only when set)
    settings["tune_examples"] = data.dataset.tune_examples
  return settings

"""Your own data as a task: JSONL, CSV, TSV and chat-message files -> (prompt, target)
texts for pdl_jax.data.

config.dataset.name = "files" reads config.dataset.train (and .validation): a path or
a glob of shards (`data/train-*.jsonl`), local or gs://, through the path layer. Each
record gives one example:

  - prompt_field / target_field (default "prompt" / "target"): the two texts;
  - context_field (optional): a list of strings, earlier dialogue turns, joined with
    the prompt by newlines as the dialogue task joins its turns (tasks.files_spec);
  - messages_field (instead of the above): a chat record, a list of
    {"role": ..., "content": ...}. The last assistant message is the target; the
    messages before it are the prompt: a single user message is its content as it
    is, and anything else (a system message, several turns) becomes "role: content"
    lines joined by newlines. With a chat model's template (data.prompt_format
    "chat") that prompt is then the one user turn of the template; messages after
    the last assistant one are ignored.

Formats: jsonl (one JSON object per line; blank lines skipped), csv (a header row
naming the fields; the stdlib csv quoting rules) and tsv (a header row; cells are
their text as written, quotes included: no quoting, so no tabs or newlines in a
value); a context or messages cell holds its list as JSON text. dataset.format
None infers each file's format from its suffix (SUFFIXES). Files are UTF-8 (a byte-order mark is allowed).

Without a validation file, a fixed fraction of the train records is held out
(dataset.validation_fraction, drawn with SPLIT_SEED: the same records for every
run seed, so the runs of a sweep are evaluated on one set). Every process reads
every file, in sorted path order, so all processes hold the same examples (as they
do for the TFDS splits) and take their rows of each global batch.

Bad input is a DataFileError (a ValueError) before any training, naming the file,
its line and what was expected. Empty targets are kept here and dropped (and
counted) by data.encode_examples, as for every dataset.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import re
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from etils import epath

from pdl_jax.data import tasks as tasks_lib
from pdl_jax import multihost
from pdl_jax import paths

FORMATS = ("jsonl", "csv", "tsv")
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}
SPLITS = ("train", "validation")
# The held-out split's seed: fixed rather than config.seed, so that the runs of a
# seed sweep are evaluated on the same held-out records.
SPLIT_SEED = 0
_GLOB_CHARS = re.compile(r"[*?[]")


class DataFileError(ValueError):
  """A data file that cannot be read as the config says (names file and line)."""


@dataclasses.dataclass(frozen=True)
class Fields:
  """The field names that make a record's (prompt, target)."""

  prompt: str = "prompt"
  target: str = "target"
  context: str | None = None
  messages: str | None = None

  @classmethod
  def of(cls, dataset_cfg: Any) -> Fields:
    """The fields of a config's dataset section (config.dataset)."""
    return cls(dataset_cfg.get("prompt_field") or "prompt",
               dataset_cfg.get("target_field") or "target",
               dataset_cfg.get("context_field"), dataset_cfg.get("messages_field"))

  def required(self) -> list[str]:
    """The fields every record must have."""
    if self.messages is not None:
      return [self.messages]
    return [self.prompt, self.target] + ([self.context] if self.context else [])


# ---------------------------------------------------------------------------
# Files: globs, formats, checksums.
# ---------------------------------------------------------------------------


def resolve(pattern: str, key: str = "dataset.train") -> list[epath.Path]:
  """The files of a path or glob (local or gs://), sorted by path: the order every
  process reads them in.

  Raises:
    DataFileError: no file matches (or the path does not exist).
  """
  text = str(pattern)
  if not _GLOB_CHARS.search(text):
    p = paths.path(text)
    if not p.is_file():
      raise DataFileError(f"config.{key}={text!r}: no such file; expected a file path or a "
                          "glob of files (local or gs://).")
    return [p]
  # The folders before the first component with a glob character are the root; the
  # rest is the pattern epath globs (it globs gs:// too).
  parts = text.split("/")
  first = next(i for i, part in enumerate(parts) if _GLOB_CHARS.search(part))
  root = "/".join(parts[:first]) or ("/" if text.startswith("/") else ".")
  base = paths.path(root)
  matches = sorted((p for p in base.glob("/".join(parts[first:])) if p.is_file()),
                   key=str) if base.is_dir() else []
  if not matches:
    raise DataFileError(f"config.{key}={text!r}: no file matches the glob (searched "
                        f"{base}); expected at least one file.")
  return matches


def file_format(path: epath.Path, fmt: str | None) -> str:
  """`fmt`, or the format of the file's suffix when None.

  Raises:
    DataFileError: an unknown format or suffix.
  """
  if fmt is not None:
    if fmt not in FORMATS:
      raise DataFileError(f"config.dataset.format={fmt!r}; expected one of {FORMATS} or "
                          "None (inferred from the suffix).")
    return fmt
  suffix = path.suffix.lower()
  if suffix not in SUFFIXES:
    raise DataFileError(f"{path}: cannot infer the format from the suffix {suffix!r}; "
                        f"expected one of {sorted(SUFFIXES)} or config.dataset.format set "
                        f"to one of {FORMATS}.")
  return SUFFIXES[suffix]


def files_sha256(pattern: str, key: str = "dataset.train") -> str:
  """sha256 of the bytes of the files of `pattern`, in sorted path order (the data's
  content, wherever it lives: a moved file keeps its checksum)."""
  digest = hashlib.sha256()
  for p in resolve(pattern, key):
    with p.open("rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
  return digest.hexdigest()


def fingerprint(dataset_cfg: Any) -> dict[str, Any]:
  """What a run on the user's files adds to its run fingerprint: the train files'
  content checksum and the settings that make examples of them. The validation
  files are evaluation, which the fingerprint leaves out (as eval.num_examples)."""
  held_out = dataset_cfg.validation_fraction if dataset_cfg.validation is None else None
  return {"dataset_files_sha256": files_sha256(dataset_cfg.train),
          "dataset_files": {"format": dataset_cfg.format,
                            **{f"{k}_field": v for k, v in dataclasses.asdict(
                                Fields.of(dataset_cfg)).items()},
                            "validation_fraction": held_out}}


def _decode(path: epath.Path, data: bytes) -> str:
  try:
    return data.decode("utf-8-sig")  # a BOM (spreadsheet exports) is not text
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise DataFileError(f"{path}: line {line}: not UTF-8 (byte {data[e.start]:#04x} at "
                        f"offset {e.start}); expected UTF-8 text: save the file as "
                        "UTF-8.") from None


def read_records(path: epath.Path, fmt: str) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, record) of each record of one file.

  Raises:
    DataFileError: non-UTF-8 bytes, malformed JSON or CSV, a JSON line that is not an
      object, a CSV row whose length differs from the header's, or no records.
  """
  text = _decode(path, path.read_bytes())
  count = 0
  if fmt == "jsonl":
    # Split on "\n" only: str.splitlines would also split at U+2028, which JSON
    # strings may hold.
    for number, line in enumerate(text.split("\n"), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        hint = (" (a JSON array file? expected JSON Lines)"
                if count == 0 and line.strip() in ("[", "[{") else "")
        raise DataFileError(f"{path}: line {number}: malformed JSON ({e.msg}: column "
                            f"{e.colno}){hint}; expected one JSON object per line.") from None
      if not isinstance(record, dict):
        raise DataFileError(f"{path}: line {number}: a JSON {_kind(record)}; expected a "
                            "JSON object (one per line).")
      count += 1
      yield number, record
  else:
    # TSV cells are their text as written (text/tab-separated-values has no quoting):
    # read with CSV's quoting rules, a cell that is entirely quoted ('"Hi," she said'
    # whole, or '"yes"') would lose its quotes.
    quoting = csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE
    delimiter = "," if fmt == "csv" else "\t"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True,
                        quoting=quoting)
    header, start = None, 1
    try:
      for row in reader:
        number, start = start, reader.line_num + 1  # a quoted cell may span lines
        if not row or (len(row) == 1 and not row[0].strip()):
          continue
        if header is None:
          header = row
          continue
        if len(row) != len(header):
          hint = _TSV_HINT if fmt == "tsv" else ""
          raise DataFileError(f"{path}: line {number}: {len(row)} values; expected "
                              f"{len(header)}, one per header column {header}{hint}.")
        if fmt == "tsv":
          _refuse_csv_quoted(row, header, path, number)
        count += 1
        yield number, dict(zip(header, row))
    except csv.Error as e:
      raise DataFileError(f"{path}: line {start}: malformed {fmt.upper()} ({e}); expected "
                          f"{fmt.upper()} with a header row.") from None
  if count == 0:
    want = "one JSON object per line" if fmt == "jsonl" else "a header row and data rows"
    raise DataFileError(f"{path}: empty: no records; expected {want}.")


_TSV_HINT = (" (TSV cells are read as written, without quoting: a value with a tab or a "
             "newline needs a CSV or JSONL file)")


def _refuse_csv_quoted(row: Sequence[str], header: Sequence[str], path: epath.Path,
                       number: int) -> None:
  # A TSV written with CSV quoting (csv.writer or pandas with a tab delimiter) quotes a
  # cell holding quotes and doubles them: read as written it would keep both, so it
  # is refused rather than read silently changed.
  for name, cell in zip(header, row):
    if len(cell) >= 2 and cell[0] == cell[-1] == '"' and '""' in cell[1:-1]:
      raise DataFileError(f"{path}: line {number}: the {name!r} cell {cell[:60]!r} looks "
                          "CSV-quoted (quotes doubled inside); TSV cells are read as "
                          "written, without quoting: save the file as CSV (.csv) or write "
                          "the text unquoted.")


def _kind(value: Any) -> str:
  return {dict: "object", list: "array", str: "string", bool: "boolean",
          type(None): "null"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------
# Records -> (prompt, target).
# ---------------------------------------------------------------------------


def _field(record: Mapping[str, Any], name: str, where: str, key: str) -> Any:
  if name not in record:
    raise DataFileError(f"{where}: no field {name!r} (config.dataset.{key}); the record has "
                        f"the fields {sorted(record)}.")
  return record[name]


def _string(value: Any, what: str, where: str) -> str:
  if not isinstance(value, str):
    raise DataFileError(f"{where}: {what} is a {_kind(value)} ({json.dumps(value)[:60]}); "
                        "expected a string.")
  return value


def _list(value: Any, name: str, fmt: str, where: str) -> list:
  # A CSV or TSV cell holds a list as JSON text.
  if fmt != "jsonl":
    try:
      value = json.loads(value)
    except json.JSONDecodeError:
      raise DataFileError(f"{where}: field {name!r} is not JSON ({value[:60]!r}); in "
                          f"{fmt.upper()} files a list field holds JSON text, e.g. "
                          '["first turn", "second turn"].') from None
  if not isinstance(value, list):
    raise DataFileError(f"{where}: field {name!r} is a {_kind(value)}; expected a list.")
  return value


def messages_to_pair(messages: Sequence[Any], name: str, where: str) -> tuple[str, str]:
  """(prompt, target) of a chat record: the last assistant message is the target; a
  single user message before it is the prompt as it is, other messages before it
  become "role: content" lines joined by newlines.

  Raises:
    DataFileError: a message that is not {"role": str, "content": str}, or no
      assistant message.
  """
  turns = []
  for i, m in enumerate(messages, 1):
    if not isinstance(m, dict) or not {"role", "content"} <= set(m):
      raise DataFileError(f"{where}: message {i} of field {name!r} is "
                          f"{json.dumps(m)[:80]}; expected an object with \"role\" and "
                          "\"content\".")
    turns.append((_string(m["role"], f"the role of message {i}", where),
                  _string(m["content"], f"the content of message {i}", where)))
  last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=None)
  if last is None:
    raise DataFileError(f"{where}: no assistant message in field {name!r} (roles "
                        f"{[role for role, _ in turns]}); expected one: the last is the "
                        "target.")
  before = turns[:last]
  if len(before) == 1 and before[0][0] == "user":
    prompt = before[0][1]
  else:
    prompt = "\n".join(f"{role}: {content}" for role, content in before)
  return prompt, turns[last][1]


def record_to_pair(record: Mapping[str, Any], fields: Fields, fmt: str,
                   where: str) -> tuple[str, str]:
  """(prompt, target) of one record, its values checked first.

  Raises:
    DataFileError: a missing field (the message lists the record's fields), a value
      that is not a string (or a list of strings for the context), a bad chat record.
  """
  if fields.messages is not None:
    value = _field(record, fields.messages, where, "messages_field")
    return messages_to_pair(_list(value, fields.messages, fmt, where), fields.messages,
                            where)
  values = {fields.prompt: _string(_field(record, fields.prompt, where, "prompt_field"),
                                   f"field {fields.prompt!r}", where),
            fields.target: _string(_field(record, fields.target, where, "target_field"),
                                   f"field {fields.target!r}", where)}
  if fields.context is not None:
    turns = _list(_field(record, fields.context, where, "context_field"), fields.context,
                  fmt, where)
    values[fields.context] = [_string(t, f"item {i} of field {fields.context!r}", where)
                              for i, t in enumerate(turns, 1)]
  # The same joining of turns as the dialogue task (tasks.DatasetSpec.format).
  return tasks_lib.files_spec(fields.prompt, fields.target, fields.context).format(values)


def read_pairs(pattern: str, fields: Fields, fmt: str | None,
               key: str = "dataset.train") -> tuple[list[tuple[str, str]], int]:
  """(prompt, target) pairs of every record of the files of `pattern` in sorted path
  order, and the number of files.

  Raises:
    DataFileError: see resolve, read_records and record_to_pair.
  """
  files = resolve(pattern, key)
  pairs = []
  for p in files:
    file_fmt = file_format(p, fmt)
    for number, record in read_records(p, file_fmt):
      pairs.append(record_to_pair(record, fields, file_fmt, f"{p}: line {number}"))
  return pairs, len(files)


# ---------------------------------------------------------------------------
# Splits.
# ---------------------------------------------------------------------------


def held_out_mask(n: int, fraction: float, seed: int = SPLIT_SEED) -> np.ndarray:
  """Bool [n]: the records held out for validation, round(fraction * n) of them (at
  least one), drawn with `seed`: the same for the same n.

  Raises:
    DataFileError: too few records to hold some out and keep some for training.
  """
  n_val = max(1, int(round(fraction * n)))
  if n_val >= n:
    raise DataFileError(f"config.dataset.train has {n} record(s): too few to hold out "
                        f"validation_fraction={fraction} and keep some for training; "
                        "expected more records, or config.dataset.validation.")
  mask = np.zeros(n, bool)
  mask[np.random.default_rng(seed).permutation(n)[:n_val]] = True
  return mask


def load_split(dataset_cfg: Any, split: str, limit: int | None = None,
               log: Callable[[str], None] = multihost.log) -> tuple[list[str], list[str]]:
  """(prompts, targets) of a split of the user's files (config.dataset), in file
  order; its first `limit` examples if given (after the held-out split, which is
  drawn over all of train).

  The log line of the validation split counts its examples also in train (the same
  prompt and target): not an error, but their scores are not held-out scores.

  Raises:
    DataFileError: an unknown split, bad files or records, an empty split.
  """
  if split not in SPLITS:
    raise DataFileError(f"dataset 'files' has the splits {SPLITS}; got {split!r}.")
  start = time.perf_counter()
  fields, fmt = Fields.of(dataset_cfg), dataset_cfg.format
  train, n_files = read_pairs(dataset_cfg.train, fields, fmt, "dataset.train")
  source = f"{dataset_cfg.train} ({n_files} file{'s' * (n_files != 1)})"
  if dataset_cfg.validation is None:
    mask = held_out_mask(len(train), dataset_cfg.validation_fraction)
    validation = [pair for pair, held in zip(train, mask) if held]
    train = [pair for pair, held in zip(train, mask) if not held]
    source += (f", {len(validation)} of its {len(mask)} records held out for validation "
               f"(validation_fraction={dataset_cfg.validation_fraction}, seed {SPLIT_SEED})")
  elif split == "validation":
    validation, n_files = read_pairs(dataset_cfg.validation, fields, fmt,
                                     "dataset.validation")
    source = f"{dataset_cfg.validation} ({n_files} file{'s' * (n_files != 1)})"
  pairs = train if split == "train" else validation
  if not pairs:  # read_records refuses empty files; this guards what splitting leaves
    raise DataFileError(f"the {split} split of {source} is empty; expected examples.")
  if limit is not None:
    pairs = pairs[:limit]
  if split == "validation":  # of the examples evaluated
    seen = set(train)
    overlap = sum(pair in seen for pair in pairs)
    source += f"; {overlap} of these also in train (identical prompt and target)"
  log(f"data: files {split}: {len(pairs)} examples from {source} "
      f"({time.perf_counter() - start:.1f} s)")
  return [p for p, _ in pairs], [t for _, t in pairs]


# The dataset fields only the user's own files read (dataset.name "files").
_FILES_KEYS = ("train", "validation", "format", "context_field", "messages_field")


def check(d, task: str) -> None:
  """The dataset settings (config.dataset) of the user's own files (dataset.name
  "files") for `task`: their values,
  and that the files exist and have a known format (nothing is read yet: a bad
  record is reported when the split is read, still before training).

  Raises:
    ValueError: a bad key, naming it, its value and what is allowed; files fields set
      without dataset.name "files"; no file for a path or glob (DataFileError).
  """
  if d.name != tasks_lib.FILES:
    for key in _FILES_KEYS:
      if d.get(key) is not None:
        raise ValueError(f"config.dataset.{key}={d[key]!r} is only read with "
                         f"config.dataset.name='files' (now {d.name!r}); set "
                         "config.dataset.name='files' (or the config argument dataset=files).")
    return
  if task == tasks_lib.PRETRAIN:
    raise ValueError("config.dataset.name='files' with config.task='pretrain'; the user's files "
                     "are finetuning tasks (summarization, dialogue, style_transfer).")
  if not d.get("train"):
    raise ValueError("config.dataset.name='files' needs config.dataset.train: a file or glob "
                     "(local or gs://), e.g. examples/support_summaries.jsonl.")
  if d.format not in FORMATS + (None,):
    raise ValueError(f"config.dataset.format={d.format!r}; expected one of "
                     f"{FORMATS} or None (from each file's suffix).")
  for key in ("prompt_field", "target_field", "context_field", "messages_field"):
    if d[key] is not None and not (isinstance(d[key], str) and d[key]):
      raise ValueError(f"config.dataset.{key}={d[key]!r}; expected a field name.")
  if d.messages_field is not None and d.context_field is not None:
    raise ValueError(f"config.dataset.context_field={d.context_field!r} with messages_field="
                     f"{d.messages_field!r}; a chat record's messages are its context: set "
                     "one of them.")
  if d.validation is None and not 0 < d.validation_fraction < 1:
    raise ValueError(f"config.dataset.validation_fraction={d.validation_fraction}; expected "
                     "a fraction in (0, 1) of train to hold out (or config.dataset.validation).")
  for key in ("train", "validation"):
    if d[key] is not None:
      for p in resolve(d[key], f"dataset.{key}"):
        file_format(p, d.format)

"""Pieces the corpus builders share: deterministic splits, commands, clear errors."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from typing import Mapping, Sequence

SPLITS = ("train", "validation", "test")


class SourceUnavailableError(RuntimeError):
  """The raw source of a corpus could not be obtained; the message says how to."""


def split_of(group_key: str, fractions: Sequence[int] = (90, 5, 5), salt: str = "") -> str:
  """Deterministic split of a group (cluster, play, chapter) from a stable hash.

  All examples of one group land in one split, so near-duplicates and neighbours
  never straddle splits. The hash is sha256, not Python's salted hash().
  """
  if sum(fractions) != 100:
    raise ValueError(f"split fractions must sum to 100; got {tuple(fractions)}.")
  bucket = int(hashlib.sha256((salt + group_key).encode()).hexdigest(), 16) % 100
  edge = 0
  for name, fraction in zip(SPLITS, fractions):
    edge += fraction
    if bucket < edge:
      return name
  return SPLITS[-1]


def check_splits(counts: Mapping[str, int], dataset: str, minimum: int = 1) -> None:
  """Raises unless every split has at least `minimum` examples (no silent empties)."""
  short = {s: counts.get(s, 0) for s in SPLITS if counts.get(s, 0) < minimum}
  if short:
    raise ValueError(
        f"{dataset}: splits {short} have fewer than {minimum} examples; the source "
        "is incomplete or was parsed wrongly. Counts: "
        f"{ {s: counts.get(s, 0) for s in SPLITS} }.")


def keep_inputs_in_one_split(pairs: Mapping[str, list[dict]]) -> dict[str, list[dict]]:
  """Moves validation/test examples whose `inputs` text also occurs in an earlier
  split (train, then validation) into that split.

  Group-wise splitting (by cluster, play, chapter) cannot see verbatim repeats
  across groups ("And the LORD spake unto Moses, saying," opens verses in many
  chapters); this keeps an identical input from being trained on and tested on.
  """
  home: dict[str, str] = {}
  out: dict[str, list[dict]] = {s: [] for s in pairs}
  for split in SPLITS:
    for ex in pairs.get(split, []):
      target_split = home.setdefault(ex["inputs"], split)
      out[target_split].append(ex)
  return out


def split_generators(builder, pairs: Mapping[str, list], minimum: int) -> dict:
  """TFDS split generators of per-split example lists (each input text in one
  split only), after check_splits."""
  pairs = keep_inputs_in_one_split(pairs)
  check_splits({s: len(v) for s, v in pairs.items()}, builder.name, minimum=minimum)
  return {split: builder._generate_examples(examples)  # pylint: disable=protected-access
          for split, examples in pairs.items()}


def run(cmd: Sequence[str], what: str, how: str, timeout: float = 600) -> str:
  """Runs a command; on failure raises SourceUnavailableError with the fix.

  Args:
    cmd: argv.
    what: what the command obtains, for the message.
    how: the exact command(s) a user can run by hand instead.
  """
  if shutil.which(cmd[0]) is None:
    raise SourceUnavailableError(
        f"cannot obtain {what}: '{cmd[0]}' is not installed here. Run:\n  {how}")
  try:
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                          check=False)
  except subprocess.TimeoutExpired as e:
    raise SourceUnavailableError(
        f"cannot obtain {what}: {' '.join(cmd)} timed out. Run:\n  {how}") from e
  if done.returncode != 0:
    tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
    raise SourceUnavailableError(
        f"cannot obtain {what}: {' '.join(cmd)} failed ({done.returncode}): "
        f"{' | '.join(tail)}\nRun by hand:\n  {how}")
  return done.stdout


def manual_dir_or_none(dl_manager) -> str | None:
  """The builder's manual_dir if the user gave one that exists, else None."""
  try:
    path = dl_manager.manual_dir
  except Exception:  # TFDS raises when no manual dir exists.
    return None
  path = os.fspath(path) if path else None
  return path if path and os.path.isdir(path) else None


def is_root() -> bool:
  return hasattr(os, "geteuid") and os.geteuid() == 0

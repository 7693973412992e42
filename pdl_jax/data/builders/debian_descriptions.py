"""debian_descriptions: Debian package long description -> one-line synopsis.

Source: the Debian archive's Translation-en index (the only index with the long
descriptions), fetched by apt-get into a private lists folder so the system's apt
state is untouched. Near-duplicate template families (librust-*-dev, libghc-*, ...)
are clustered by word 3-gram Jaccard similarity (MinHash + LSH, verified exactly)
and each cluster goes to one split, so no family straddles train and test.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import zlib
from typing import Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from pdl_jax.data.builders import common

_APT_HOW = (
    "mkdir -p DIR/lists/partial DIR/cache/archives/partial && apt-get "
    "-o Dir::State::Lists=DIR/lists -o Dir::Cache=DIR/cache -o Acquire::Languages=en "
    "-o Acquire::GzipIndexes=false update   # then pass DIR/lists as --manual_dir")

MIN_BODY_WORDS = 15
JACCARD = 0.7
MIN_PER_SPLIT = 100


@dataclasses.dataclass(frozen=True)
class Description:
  package: str
  synopsis: str
  body: str


def parse_translation(text: str) -> Iterator[Description]:
  """Stanzas of a Translation-en file -> (package, synopsis, long description).

  The body is the lines after `Description-en:` that start with one space. A line
  " ." is a paragraph break (-> newline); lines with two leading spaces are verbatim
  (lists, code) and keep their own line; other lines are joined with spaces.
  """
  for stanza in re.split(r"\n\s*\n", text):
    package = synopsis = None
    lines: list[str] = []
    in_description = False
    for line in stanza.split("\n"):
      if line.startswith("Package:"):
        package = line.split(":", 1)[1].strip()
        in_description = False
      elif line.startswith("Description-en:"):
        synopsis = line.split(":", 1)[1].strip()
        in_description = True
      elif in_description and line.startswith(" "):
        lines.append(line)
      else:
        in_description = False
    if package and synopsis and lines:
      yield Description(package, synopsis, _body_text(lines))


def _body_text(lines: Sequence[str]) -> str:
  paragraphs: list[list[str]] = [[]]
  for line in lines:
    if line.strip() == ".":
      paragraphs.append([])
    elif line.startswith("  "):  # verbatim: its own line
      paragraphs[-1].append("\n" + line.strip() + "\n")
    else:
      paragraphs[-1].append(line.strip())
  out = []
  for para in paragraphs:
    text = " ".join(para)
    text = re.sub(r"[ \t]*\n[ \t]*", "\n", text)
    text = re.sub(r"\n+", "\n", text).strip()
    text = re.sub(r"[ \t]+", " ", text)
    if text:
      out.append(text)
  return "\n".join(out)


def filter_descriptions(descs: Iterable[Description],
                        min_words: int = MIN_BODY_WORDS) -> list[Description]:
  """Drops short bodies and exact duplicates (same synopsis and body); sorted."""
  seen: set[tuple[str, str]] = set()
  out = []
  for d in sorted(descs, key=lambda d: (d.package, d.synopsis, d.body)):
    key = (d.synopsis, d.body)
    if len(d.body.split()) < min_words or key in seen:
      continue
    seen.add(key)
    out.append(d)
  return out


def _shingles(text: str) -> np.ndarray:
  words = re.findall(r"\w+", text.lower())
  grams = {" ".join(words[i:i + 3]) for i in range(max(1, len(words) - 2))}
  return np.fromiter((zlib.crc32(g.encode()) for g in grams), np.uint64, len(grams))


def cluster_near_duplicates(texts: Sequence[str], threshold: float = JACCARD,
                            bands: int = 16, rows: int = 4, seed: int = 0
                            ) -> np.ndarray:
  """Cluster id per text: word 3-gram Jaccard >= threshold, transitively.

  MinHash signatures (bands * rows hashes) proposes candidates that share a band;
  each candidate is verified exactly against its bucket's first member (a star, so
  a bucket costs linear, not quadratic, work), and verified pairs are unioned.
  """
  n = len(texts)
  sets = [_shingles(t) for t in texts]
  lengths = np.array([len(s) for s in sets])
  flat = np.concatenate(sets) if n else np.zeros(0, np.uint64)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  prime = np.uint64(4294967311)  # > 2**32, so (a * x + b) stays below 2**64
  rng = np.random.default_rng(seed)
  num_hashes = bands * rows
  a = rng.integers(1, 2**31, num_hashes, dtype=np.uint64)
  b = rng.integers(0, 2**31, num_hashes, dtype=np.uint64)
  sig = np.empty((n, num_hashes), np.uint64)
  for k in range(num_hashes):
    hashed = (a[k] * flat + b[k]) % prime
    sig[:, k] = np.minimum.reduceat(hashed, starts)

  parent = np.arange(n)

  def find(i: int) -> int:
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  py_sets = [set(s.tolist()) for s in sets]
  for band in range(bands):
    keys = sig[:, band * rows:(band + 1) * rows]
    buckets: dict[bytes, int] = {}
    for i in range(n):
      key = keys[i].tobytes()
      first = buckets.setdefault(key, i)
      if first != i:
        s, t = py_sets[first], py_sets[i]
        if len(s & t) >= threshold * len(s | t):
          ri, rf = find(i), find(first)
          if ri != rf:
            parent[max(ri, rf)] = min(ri, rf)
  return np.array([find(i) for i in range(n)])


def make_pairs(descs: Sequence[Description], max_per_cluster: int | None
               ) -> dict[str, list[dict]]:
  """Examples per split; each near-duplicate cluster lives in one split."""
  clusters = cluster_near_duplicates([d.synopsis + "\n" + d.body for d in descs])
  members: dict[int, list[int]] = {}
  for i, c in enumerate(clusters):
    members.setdefault(int(c), []).append(i)
  out: dict[str, list[dict]] = {s: [] for s in common.SPLITS}
  for ids in members.values():
    ids = sorted(ids, key=lambda i: descs[i].package)
    keep = ids if max_per_cluster is None else ids[:max_per_cluster]
    split = common.split_of(descs[ids[0]].package)
    for i in keep:
      d = descs[i]
      out[split].append({"inputs": d.body, "targets": d.synopsis, "package": d.package,
                         "cluster": descs[ids[0]].package,
                         "cluster_size": len(ids)})
  for split in out:
    out[split].sort(key=lambda ex: ex["package"])
  return out


def fetch_translation_files(folder: str) -> list[str]:
  """apt-get update into a private folder; returns the Translation-en paths."""
  lists = os.path.join(folder, "lists")
  cache = os.path.join(folder, "cache")
  os.makedirs(os.path.join(lists, "partial"), exist_ok=True)
  os.makedirs(os.path.join(cache, "archives", "partial"), exist_ok=True)
  common.run(["apt-get", "-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={cache}",
              "-o", "Acquire::Languages=en", "-o", "Acquire::GzipIndexes=false",
              "update"], "the Debian Translation-en index", _APT_HOW)
  return find_translation_files(lists)


def find_translation_files(folder: str) -> list[str]:
  """Uncompressed *Translation-en files under folder, largest first."""
  paths = [p for p in glob.glob(os.path.join(folder, "**", "*Translation-en"),
                                recursive=True) if os.path.isfile(p)]
  return sorted(paths, key=lambda p: (-os.path.getsize(p), p))


def read_descriptions(paths: Sequence[str]) -> list[Description]:
  """Descriptions of all files; a package's first (largest file's) entry wins."""
  by_package: dict[str, Description] = {}
  for path in paths:
    with open(path, encoding="utf-8", errors="replace") as f:
      for d in parse_translation(f.read()):
        by_package.setdefault(d.package, d)
  return list(by_package.values())


class DebianDescriptions(tfds.core.GeneratorBasedBuilder):
  """Debian package descriptions: long description -> one-line synopsis."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Split by near-duplicate cluster; at most 3 per cluster."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Optional. A folder holding uncompressed *Translation-en files from a Debian "
      f"archive, e.g. made with:\n  {_APT_HOW}")
  MAX_PER_CLUSTER = 3  # template families (librust-*-dev: thousands) stay small

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Summarization: the long description of a Debian package (inputs) and "
            "its one-line synopsis (targets), from the archive's Translation-en index "
            "(Debian bookworm main when built here). Bodies under 15 words and exact "
            "duplicates are dropped; near-duplicates (word 3-gram Jaccard >= 0.7) are "
            "clustered, each cluster is in one split, and at most 3 members of a "
            "cluster are kept."),
        features=tfds.features.FeaturesDict({
            "inputs": tfds.features.Text(), "targets": tfds.features.Text(),
            "package": tfds.features.Text(), "cluster": tfds.features.Text(),
            "cluster_size": np.int32,
        }),
        supervised_keys=("inputs", "targets"),
        homepage="https://www.debian.org/distrib/packages",
        license=("Each text comes from its package's debian/control in Debian main: "
                 "freely redistributable, mixed licences (DFSG-free)."),
    )

  def _split_generators(self, dl_manager):
    manual = common.manual_dir_or_none(dl_manager)
    paths = find_translation_files(manual) if manual else []
    if not paths:
      paths = fetch_translation_files(os.path.join(os.fspath(dl_manager.download_dir),
                                                   "debian_apt"))
    if not paths:
      raise common.SourceUnavailableError(
          f"no Translation-en file found after apt-get update. Run:\n  {_APT_HOW}")
    descs = filter_descriptions(read_descriptions(paths))
    pairs = make_pairs(descs, self.MAX_PER_CLUSTER)
    return common.split_generators(self, pairs, MIN_PER_SPLIT)

  def _generate_examples(self, examples):
    for ex in examples:
      yield ex["package"], ex

"""bible_style: King James Version verse <-> World English Bible verse.

Source: the Debian SWORD modules engKJV2006eb (package sword-text-kjv) and
engWEB2015eb (sword-text-web), exported with `mod2imp` (libsword-utils): a
`$$$Book C:V` key line, then the verse as one OSIS line. The markup is cleaned
without gluing words: notes, titles and the like are deleted with their content
and replaced by a space; word-level wrappers (w, transChange, divineName, ...) are
unwrapped. Splits are by chapter, so neighbouring verses never straddle splits.
"""

from __future__ import annotations

import dataclasses
import glob
import html
import os
import re
import subprocess
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from pdl_jax.data.builders import common

KJV_MODULE, WEB_MODULE = "engKJV2006eb", "engWEB2015eb"
PACKAGES = ("sword-text-kjv", "sword-text-web", "libsword-utils")
_APT_HOW = (f"apt-get install -y {' '.join(PACKAGES)}   # as root; or export the modules "
            f"with `mod2imp {KJV_MODULE} > DIR/{KJV_MODULE}.imp` and `mod2imp "
            f"{WEB_MODULE} > DIR/{WEB_MODULE}.imp` and pass DIR as --manual_dir")

# Elements deleted with their content (replaced by a space).
_DROP = ("note", "title", "speaker", "catchWord", "rdg")
# Elements unwrapped: tags removed, content kept, no space added (words inside
# them already carry their spacing; adding one would split "earth</w>.").
_UNWRAP = ("w", "transChange", "divineName", "q", "seg", "foreign", "name", "reference",
           "hi")
_DROP_RE = [re.compile(rf"<{t}\b[^>]*/>|<{t}\b[^>]*>.*?</{t}>", re.S) for t in _DROP]
_UNWRAP_RE = re.compile(rf"</?(?:{'|'.join(_UNWRAP)})\b[^>]*>")
_ANY_TAG_RE = re.compile(r"<[^>]*>")
# Sanity bounds of a complete build (about 31k verses in each version).
MIN_VERSES = 30000
MIN_PER_SPLIT = 100
_KEY_RE = re.compile(r"^\$\$\$(.+?) (\d+):(\d+)\s*$")


@dataclasses.dataclass(frozen=True)
class Verse:
  book: str
  chapter: int
  verse: int
  text: str

  @property
  def ref(self) -> str:
    return f"{self.book} {self.chapter}:{self.verse}"


def clean_osis(osis: str) -> str:
  """Plain text of one OSIS verse line; see the module docstring for the rules."""
  text = osis
  for pattern in _DROP_RE:
    text = pattern.sub(" ", text)
  text = _UNWRAP_RE.sub("", text)
  text = _ANY_TAG_RE.sub(" ", text)  # milestones, l, lg, lb, div, ...: a space
  text = html.unescape(text).replace("\u00b6", " ")  # pilcrow
  text = " ".join(text.split())
  text = re.sub(r"\s+([.,;:!?\)\]\u2019\u201d])", r"\1", text)
  text = re.sub(r"([\(\[\u2018\u201c])\s+", r"\1", text)
  return text.strip()


def parse_imp(text: str) -> Iterator[Verse]:
  """Verses of a mod2imp export; headings and `:0` (introduction) keys skipped."""
  key = None
  lines: list[str] = []

  def flush():
    if key is not None:
      cleaned = clean_osis(" ".join(lines))
      if cleaned:
        return Verse(key[0], key[1], key[2], cleaned)
    return None

  for line in text.split("\n"):
    if line.startswith("$$$"):
      verse = flush()
      if verse:
        yield verse
      m = _KEY_RE.match(line)
      key = (m.group(1), int(m.group(2)), int(m.group(3))) if m and m.group(3) != "0" else None
      lines = []
    else:
      lines.append(line)
  verse = flush()
  if verse:
    yield verse


def pair_verses(kjv: dict[str, Verse], web: dict[str, Verse], reverse: bool
                ) -> dict[str, list[dict]]:
  """Examples per split for the verses both versions have; split by chapter."""
  out: dict[str, list[dict]] = {s: [] for s in common.SPLITS}
  books = []
  for v in kjv.values():
    if v.book not in books:
      books.append(v.book)
  order = {b: i for i, b in enumerate(books)}
  for ref in sorted(set(kjv) & set(web),
                    key=lambda r: (order[kjv[r].book], kjv[r].chapter, kjv[r].verse)):
    k, w = kjv[ref], web[ref]
    src, tgt = (w.text, k.text) if reverse else (k.text, w.text)
    out[common.split_of(f"{k.book} {k.chapter}")].append({
        "inputs": src, "targets": tgt, "reference": ref, "book": k.book,
        "chapter": k.chapter, "verse": k.verse})
  return out


def export_module(module: str, out_dir: str) -> str:
  """`mod2imp module > out_dir/module.imp`, written atomically; returns the path."""
  path = os.path.join(out_dir, f"{module}.imp")
  if os.path.exists(path):
    return path
  os.makedirs(out_dir, exist_ok=True)
  if common.is_root() and not _module_installed(module):
    common.run(["apt-get", "install", "-y", "-q", *PACKAGES],
               f"the SWORD modules {PACKAGES}", _APT_HOW, timeout=1200)
  text = common.run(["mod2imp", module], f"the SWORD module {module}", _APT_HOW)
  if not text.strip():
    raise common.SourceUnavailableError(
        f"mod2imp {module} printed nothing: the module is not installed. Run:\n  {_APT_HOW}")
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)
  return path


def _module_installed(module: str) -> bool:
  try:
    out = subprocess.run(["mod2imp", module], capture_output=True, text=True,
                         timeout=120, check=False).stdout
  except (OSError, subprocess.TimeoutExpired):
    return False
  return bool(out.strip())


def obtain_verses(manual_dir: str | None, download_dir: str
                  ) -> tuple[dict[str, Verse], dict[str, Verse]]:
  """KJV and WEB verses by reference, from manual_dir .imp files or mod2imp."""
  paths = {}
  for module in (KJV_MODULE, WEB_MODULE):
    found = glob.glob(os.path.join(manual_dir, "**", f"{module}.imp"),
                      recursive=True) if manual_dir else []
    paths[module] = found[0] if found else export_module(module, download_dir)
  result = []
  for module in (KJV_MODULE, WEB_MODULE):
    with open(paths[module], encoding="utf-8") as f:
      result.append({v.ref: v for v in parse_imp(f.read())})
  return result[0], result[1]


class BibleStyleConfig(tfds.core.BuilderConfig):
  """Direction of the transfer."""

  def __init__(self, *, reverse: bool, **kwargs):
    super().__init__(**kwargs)
    self.reverse = reverse


class BibleStyle(tfds.core.GeneratorBasedBuilder):
  """KJV (archaic) -> WEB (modern) verse, or the reverse."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release; split by chapter."}
  BUILDER_CONFIGS = [
      BibleStyleConfig(name="kjv_to_web", reverse=False,
                       description="archaic (KJV) -> modern (WEB) English"),
      BibleStyleConfig(name="web_to_kjv", reverse=True,
                       description="modern (WEB) -> archaic (KJV) English"),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Optional. A folder with {KJV_MODULE}.imp and {WEB_MODULE}.imp exported by "
      f"mod2imp:\n  {_APT_HOW}")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Style transfer between the King James Version (1769 text, SWORD module "
            f"{KJV_MODULE}) and the World English Bible ({WEB_MODULE}), paired by "
            "verse across the 66 shared books, from Debian's sword-text-kjv and "
            "sword-text-web. Markup cleaned (notes and titles removed). Split by "
            "chapter. The text derived here is a modified form of the WEB and is not "
            "itself the World English Bible (a trademark)."),
        features=tfds.features.FeaturesDict({
            "inputs": tfds.features.Text(), "targets": tfds.features.Text(),
            "reference": tfds.features.Text(), "book": tfds.features.Text(),
            "chapter": np.int32,
            "verse": np.int32,
        }),
        supervised_keys=("inputs", "targets"),
        homepage="https://crosswire.org/sword/modules/",
        license="Public domain (both texts).",
    )

  def _split_generators(self, dl_manager):
    kjv, web = obtain_verses(common.manual_dir_or_none(dl_manager),
                             os.path.join(os.fspath(dl_manager.download_dir), "sword"))
    if len(kjv) < MIN_VERSES or len(web) < MIN_VERSES:
      raise common.SourceUnavailableError(
          f"read {len(kjv)} KJV and {len(web)} WEB verses, expected about 31k each; "
          f"the export is incomplete. Run:\n  {_APT_HOW}")
    pairs = pair_verses(kjv, web, self.builder_config.reverse)
    return common.split_generators(self, pairs, MIN_PER_SPLIT)

  def _generate_examples(self, examples):
    for ex in examples:
      yield ex["reference"], ex

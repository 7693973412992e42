"""experiments/reproduce.py: reruns compared with committed runs, generation by
generation, and adopted only when equal."""

from __future__ import annotations

import json
import subprocess
import sys
import os

from experiments import measures
from experiments import reproduce

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_run(folder, version: str, generations: dict[str, list[str]], num_steps: int = 4):
  (folder / "samples").mkdir(parents=True)
  (folder / "config.json").write_text(json.dumps({"num_steps": num_steps, "seed": 0,
                                                  "loss": {"name": "ce"}}))
  (folder / "metrics.jsonl").write_text(json.dumps({"step": num_steps, "eval/nll": 1.0}) + "\n")
  (folder / "provenance.json").write_text(json.dumps({"code_version": version}))
  for name, gens in generations.items():
    (folder / "samples" / name).write_text("".join(
        json.dumps({"index": i, "generation": g, "generation_ids": [len(g)]}) + "\n"
        for i, g in enumerate(gens)))


def test_equal_reruns_are_recorded_and_adopted_and_different_ones_are_not(tmp_path):
  results, reruns = tmp_path / "results", tmp_path / "reruns"
  same = {"final_greedy.jsonl": ["a b", "c"], "base_greedy.jsonl": ["x", "y"]}
  write_run(results / "runs" / "ce-seed0", "old", same)
  write_run(results / "runs" / "ce-seed1", "old", same)
  write_run(reruns / "ce-seed0", "new", {**same, "final_greedy_bias0.25.jsonl": ["q", "r"]})
  write_run(reruns / "ce-seed1", "new", {**same, "final_greedy.jsonl": ["a b", "d"]})
  write_run(reruns / "dft-seed0", "new", {"final_greedy.jsonl": ["z", "w"]})
  write_run(reruns / "gem-seed0", "new", {"final_greedy.jsonl": ["z"]}, num_steps=8)
  (reruns / "gem-seed0" / "metrics.jsonl").write_text("")  # unfinished: ignored
  done = subprocess.run([sys.executable, "experiments/reproduce.py", f"--reruns={reruns}",
                         f"--results={results}", "--adopt"], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 1 and "not reproduced (left out): ['ce-seed1']" in done.stderr
  assert done.stdout.splitlines() == [
      "ce-seed0: reproduced (2 deterministic generation files)",
      "ce-seed1: DIFFERS (2 deterministic generation files)",
      "dft-seed0: new"]
  record = measures.read_reproduction(str(results))
  by_run = {e["run"]: e for e in record["reruns"]}
  assert by_run["ce-seed0"]["equal"] and not by_run["ce-seed1"]["equal"]
  assert by_run["ce-seed1"]["files"]["final_greedy.jsonl"]["committed"] != (
      by_run["ce-seed1"]["files"]["final_greedy.jsonl"]["rerun"])
  # One rerun of version "new" differs: "new" does not count as reproduced.
  assert measures.reproduced_versions(str(results)) == set()
  record["reruns"] = [by_run["ce-seed0"]]
  (results / measures.REPRODUCTION).write_text(json.dumps(record))
  assert measures.reproduced_versions(str(results)) == {"new"}
  # Adopted: the reproduced rerun (with its extra decode) and the new run; not the other.
  assert (results / "runs" / "ce-seed0" / "samples" / "final_greedy_bias0.25.jsonl").exists()
  assert json.loads((results / "runs" / "ce-seed1" / "provenance.json").read_text()) == {
      "code_version": "old"}
  assert (results / "runs" / "dft-seed0" / "config.json").exists()
  assert not (results / "runs" / "gem-seed0").exists()


def test_adopting_again_from_the_same_root_keeps_the_record(tmp_path):
  """A sweep root holds the runs adopted before and the ones finished since: adopting
  again must not compare an adopted run with its own copy (a record of the run against
  itself, its committed version lost) but skip it and adopt the new ones."""
  results, reruns = tmp_path / "results", tmp_path / "reruns"
  same = {"final_greedy.jsonl": ["a b", "c"]}
  write_run(results / "runs" / "ce-seed0", "old", same)
  write_run(reruns / "ce-seed0", "new", same)
  (reruns / "ce-seed0" / "metrics.jsonl").write_text(
      json.dumps({"step": 4, "eval/nll": 1.0, "train/tokens_per_s": 81.5}) + "\n")
  write_run(reruns / "dft-seed0", "new", {"final_greedy.jsonl": ["z", "w"]})
  command = [sys.executable, "experiments/reproduce.py", f"--reruns={reruns}",
             f"--results={results}", "--adopt"]
  first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert first.returncode == 0, first.stderr
  assert first.stdout.splitlines() == [
      "ce-seed0: reproduced (1 deterministic generation files)", "dft-seed0: new"]
  write_run(reruns / "gem-seed0", "new", {"final_greedy.jsonl": ["y"]})  # finished since
  again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert again.returncode == 0, again.stderr
  assert again.stdout.splitlines() == [
      "ce-seed0: already adopted", "dft-seed0: already adopted", "gem-seed0: new"]
  (entry,) = measures.read_reproduction(str(results))["reruns"]
  assert (entry["run"], entry["committed_code_version"], entry["rerun_code_version"]) == (
      "ce-seed0", "old", "new")
  assert (results / "runs" / "gem-seed0" / "config.json").exists()
  # Real reruns at the adopted runs' code version (their own logs) are still compared;
  # ce-seed0's record against "old" stays (a same-version comparison would replace it).
  for name in ("ce-seed0", "dft-seed0"):
    (reruns / name / "metrics.jsonl").write_text(
        json.dumps({"step": 4, "eval/nll": 1.0, "train/tokens_per_s": 79.0}) + "\n")
  third = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert third.returncode == 0, third.stderr
  assert third.stdout.splitlines() == [
      "ce-seed0: reproduced (1 deterministic generation files); kept: its record against old",
      "dft-seed0: reproduced (1 deterministic generation files)",
      "gem-seed0: already adopted"]
  by_run = {e["run"]: e for e in measures.read_reproduction(str(results))["reruns"]}
  assert (by_run["ce-seed0"]["committed_code_version"], by_run["dft-seed0"][
      "committed_code_version"]) == ("old", "new")


def test_a_missing_file_in_the_rerun_is_not_equal(tmp_path):
  write_run(tmp_path / "a", "old", {"final_greedy.jsonl": ["a"], "final_beam.jsonl": ["b"],
                                     "final_top_p.jsonl": ["c"]})
  write_run(tmp_path / "b", "new", {"final_greedy.jsonl": ["a"]})
  entry = reproduce.compare_run(tmp_path / "a", tmp_path / "b")
  assert entry["files"]["final_beam.jsonl"]["rerun"] is None and not entry["equal"]
  assert entry["files"]["final_top_p.jsonl"]["rerun"] is None
  assert entry["sampled_equal"] is False


def test_sampled_decodings_are_recorded_but_do_not_decide(tmp_path):
  """Greedy equal and top-p new draws (a sampler stream changed on purpose): the rerun
  reproduces its run and is adopted with its new draws; a greedy difference still
  fails it, whatever top-p does."""
  results, reruns = tmp_path / "results", tmp_path / "reruns"
  write_run(results / "runs" / "ce-seed0", "old",
            {"final_greedy.jsonl": ["a"], "final_top_p.jsonl": ["b"],
             "base_top_p_bias0.5.jsonl": ["c"]})
  write_run(reruns / "ce-seed0", "new",
            {"final_greedy.jsonl": ["a"], "final_top_p.jsonl": ["B"],
             "base_top_p_bias0.5.jsonl": ["c"], "final_greedy_bias0.25.jsonl": ["q"]})
  done = subprocess.run([sys.executable, "experiments/reproduce.py", f"--reruns={reruns}",
                         f"--results={results}", "--adopt"], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines() == [
      "ce-seed0: reproduced (1 deterministic generation files; sampled: 1 of 2 equal, "
      "new draws)"]
  entry = measures.read_reproduction(str(results))["reruns"][0]
  assert entry["equal"] and entry["sampled_equal"] is False
  assert {k for k, v in entry["files"].items() if v["sampled"]} == {
      "final_top_p.jsonl", "base_top_p_bias0.5.jsonl"}
  assert measures.reproduced_versions(str(results)) == {"new"}
  adopted = results / "runs" / "ce-seed0" / "samples"
  assert json.loads((adopted / "final_top_p.jsonl").read_text())["generation"] == "B"
  assert (adopted / "final_greedy_bias0.25.jsonl").exists()


def test_only_sampled_files_cannot_reproduce(tmp_path):
  write_run(tmp_path / "a", "old", {"final_top_p.jsonl": ["b"]})
  write_run(tmp_path / "b", "new", {"final_top_p.jsonl": ["b"]})
  entry = reproduce.compare_run(tmp_path / "a", tmp_path / "b")
  assert not entry["equal"] and entry["sampled_equal"] is True


def test_committed_reruns_are_recorded_as_their_generations_say():
  """Every rerun reproduction.json records is what the kept generations say, digest for
  digest: a rerun still kept in results/real/<task>/reruns/<run> (until every seed of
  its point is in) compares with the committed run as recorded; an adopted one (now
  results/real/<task>/runs/<run>, of the rerun's code version) holds exactly the
  recorded rerun generations, and its deterministic ones equal the recorded committed
  ones (greedy bit for bit: the same model)."""
  found = 0
  for task in ("summarization", "dialogue", "style_transfer"):
    results = os.path.join(ROOT, "results", "real", task)
    reruns = os.path.join(results, "reruns")
    entries = measures.read_reproduction(results).get("reruns", [])
    if os.path.isdir(reruns):  # every kept rerun is recorded
      assert set(os.listdir(reruns)) <= {e["run"] for e in entries}, task
    for entry in entries:
      run, kept = entry["run"], os.path.join(reruns, entry["run"])
      committed = os.path.join(results, "runs", run)
      if os.path.isdir(kept):
        assert reproduce.compare_run(committed, kept) == entry, (task, run)
      else:  # adopted: the committed run is the rerun now
        with open(os.path.join(committed, "provenance.json")) as f:
          assert json.load(f)["code_version"] == entry["rerun_code_version"], (task, run)
        for name, digests in entry["files"].items():
          lines = measures.read_jsonl(os.path.join(committed, "samples", name))
          assert measures.generations_sha256(lines) == digests["rerun"], (task, run, name)
          if not digests["sampled"]:
            assert digests["rerun"] == digests["committed"], (task, run, name)
      assert entry["equal"], (task, run)
      found += 1
  assert found >= 2  # summarization's CE seeds 0 and 1, at least

"""Reruns against committed results: do a rerun's generations equal the committed run's,
bit for bit? And adopting finished runs into results/.

    python experiments/reproduce.py --reruns=workdirs/real/summarization \
        --results=results/real/summarization [--adopt]

For every finished run folder under RERUNS whose name is also under RESULTS/runs, the
sha256 of each kept generation file they share (samples/base_*.jsonl and
final_*.jsonl: indices, texts and token ids, experiments/measures.py) is compared and
recorded in RESULTS/reproduction.json (one entry per run, replaced on a new check),
which report.py's provenance check reads: a later code version whose reruns reproduced
every committed deterministic generation counts as the committed one.

What "reproduced" means: the deterministic decodings (greedy, beam, and their
logit-adjusted forms) are equal bit for bit, which pins the trained weights and the
decoder. Sampled decodings (top-p) are compared and recorded too (`sampled_equal`),
but do not decide: they also depend on the sampler's random stream, which the project
changed once on purpose (87c351a keys a prompt's draws by the prompt, not by its
batch), so a rerun of a run from before it draws new, equally valid samples.

With --adopt, a rerun that reproduced its run replaces it (its extra decodings, e.g.
the control's biased ones, and its sampled decodings, new draws where they differ,
come with it), and a finished run RESULTS does not have yet is copied in; a rerun that
differs is reported and left out. A run RESULTS holds as an earlier adoption of this
very folder (same code version, byte-equal metrics.jsonl) is skipped ("already
adopted"), so adopting again from a sweep root as its points finish keeps the record of
the real reproduction. Regenerate the tables afterwards with report.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from experiments import measures
from experiments import report
from experiments import sweep
from pdl_jax import paths


def is_sampled(file_name: str) -> bool:
  """Whether a kept generation file (base_<method>.jsonl, final_<method>.jsonl) holds
  a sampled decoding, whose draws depend on the sampler's random stream."""
  method = file_name.removesuffix(".jsonl").split("_", 1)[1]
  return measures.split_bias(method)[0] == "top_p"


def code_version(run: paths.PathLike) -> str:
  """The code version a run folder's provenance.json records."""
  return json.loads((paths.path(run) / "provenance.json").read_text())["code_version"]


def compare_run(committed: paths.PathLike, rerun: paths.PathLike) -> dict[str, Any]:
  """The reproduction entry of one rerun: each shared generation file's two digests
  (and whether it is sampled), both code versions, `equal` (every deterministic file
  equal: the reproduction) and `sampled_equal` (every sampled file equal; None
  without one)."""
  committed, rerun = paths.path(committed), paths.path(rerun)
  files = {}
  for f in sorted((committed / "samples").glob("*.jsonl")):
    if not f.name.startswith(("base_", "final_")):
      continue
    other = rerun / "samples" / f.name
    files[f.name] = {"committed": measures.generations_sha256(measures.read_jsonl(f)),
                     "rerun": (measures.generations_sha256(measures.read_jsonl(other))
                               if other.exists() else None),
                     "sampled": is_sampled(f.name)}
  same = lambda sampled: [v["committed"] == v["rerun"] for v in files.values()
                          if v["sampled"] == sampled]
  return {"run": committed.name, "committed_code_version": code_version(committed),
          "rerun_code_version": code_version(rerun), "files": files,
          "equal": bool(same(False)) and all(same(False)),
          "sampled_equal": all(same(True)) if same(True) else None}


def describe(entry: dict[str, Any]) -> str:
  """One line on a reproduction entry: deterministic files equal, sampled ones."""
  files = entry["files"].values()
  det = sum(not v["sampled"] for v in files)
  sampled = [v for v in files if v["sampled"]]
  differ = sum(v["committed"] != v["rerun"] for v in sampled)
  text = (f"{'reproduced' if entry['equal'] else 'DIFFERS'} ({det} deterministic "
          f"generation files")
  if sampled:
    text += (f"; sampled: {len(sampled) - differ} of {len(sampled)} equal"
             + (", new draws" if differ else ""))
  return text + ")"


def is_adopted_copy(committed: paths.PathLike, run: paths.PathLike) -> bool:
  """Whether the committed run is an earlier adoption of this very run folder, not
  a run it could be compared with: same code version and a byte-equal metrics.jsonl.
  A rerun's train lines log a wall-clock figure (train/tokens_per_s, every log_every
  steps), so a run with at least one train line never logs the same bytes twice; a
  run shorter than log_every would be taken for its copy. Compared, a copy would
  replace the record of the real reproduction (committed version against rerun
  version) by one of the run against itself."""
  committed, run = paths.path(committed), paths.path(run)
  metrics = lambda d: (d / "metrics.jsonl").read_bytes()
  return code_version(committed) == code_version(run) and metrics(committed) == metrics(run)


def keeps_record(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
  """Whether a run's recorded reproduction across code versions stays in place of a
  new comparison at one version (a rerun of an adopted rerun): the record is what lets
  report.py accept the later version for the committed one."""
  across = lambda e: e["committed_code_version"] != e["rerun_code_version"]
  return old is not None and old["equal"] and across(old) and not across(new)


def finished_runs(root: str) -> list[paths.PathLike]:
  """Run folders under root whose final eval is logged."""
  out = []
  for run in report.find_runs(root):
    config = report.read_config(run)
    if sweep.is_finished(run, config["num_steps"]):
      out.append(paths.path(run))
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--reruns", required=True, help="sweep root of the reruns and new runs")
  p.add_argument("--results", required=True, help="results/real/<task>")
  p.add_argument("--adopt", action="store_true",
                 help="copy reproduced reruns and new finished runs into RESULTS/runs")
  args = p.parse_args()
  results = paths.path(args.results)
  record = measures.read_reproduction(args.results)
  entries = {e["run"]: e for e in record.get("reruns", [])}
  differs = []
  for run in finished_runs(args.reruns):
    committed = results / "runs" / run.name
    if committed.exists() and is_adopted_copy(committed, run):
      print(f"{run.name}: already adopted")  # its earlier entry stays as it is
      continue
    if committed.exists():
      entry = compare_run(committed, run)
      kept = keeps_record(entries.get(run.name), entry)
      if not kept:
        entries[run.name] = entry
      print(f"{run.name}: {describe(entry)}" + (
          f"; kept: its record against {entries[run.name]['committed_code_version'][:12]}"
          if kept else ""))
      if not entry["equal"]:
        differs.append(run.name)
        continue
    else:
      print(f"{run.name}: new")
    if args.adopt:
      report.copy_run(run, committed)
  if entries:
    paths.atomic_write_text(results / measures.REPRODUCTION, json.dumps(
        {"reruns": [entries[k] for k in sorted(entries)]}, indent=2) + "\n")
  if differs:
    sys.exit(f"not reproduced (left out): {differs}")


if __name__ == "__main__":
  main()

"""Tables and plots from a sweep's runs.

    python experiments/report.py ROOT [--out DIR] [--copy_runs]

ROOT holds one folder per run (each with config.json and metrics.jsonl, as
`python -m pdl_jax.main` writes them; nested folders are searched too). Runs are
grouped by point: `ce` (loss=ce) or `alpha=A` (loss=pdl); each run contributes its
final eval line, the one at its config's num_steps. A run without it (unfinished, or
killed before its final eval was written) is left out and listed; with --strict it
is an error. ROOT and --out may be local or gs:// (the project's path layer). Writes
to --out (default ROOT):

- summary.csv: one row per point: number of seeds, then mean and std (over seeds)
  of every eval metric;
- summary.md: the main metrics as a Markdown table (the main decoding, config.eval.decode:
  greedy by default), then the same generation metrics of each extra decoding
  (config.eval.extra_decodes, e.g. top-p) in a table of its own;
  profile_tv is derived here: the total-variation distance between the generations'
  and the references' shares of tokens per train-frequency decile (0 = the same
  frequency profile as the references);
- metrics_vs_alpha.png: the main metrics against alpha (mean, std as error bars;
  CE as a dashed line);
- frequency_profile.png: share of generated tokens per train-frequency decile for
  each point and for the references;
- frontier.png (with --measures, when the CE runs have logit-adjusted decodes and
  PDL points kept their generations): ROUGE-L and chrF against NIDF and content
  recall, PDL's alphas beside CE + bias's betas (experiments/frontier.py);
- samples.md (when the runs kept every generation of their final eval): the first
  evaluation prompts with the reference and the generations of the base, CE and
  PDL alpha 0.25 / 0.5 side by side;
- with --copy_runs, OUT/runs/<run>/: each run's config.json, provenance.json,
  metrics.jsonl, last samples file and every generation of its base and final evals,
  so the committed tables can be traced to (and regenerated from,
  `report.py OUT/runs --out OUT`) the runs' own logs without their checkpoints.

When the CE runs evaluated at step 0 (eval.at_start: on when finetuning a pretrained
model) the tables start with a `base (step 0)` row: the model before finetuning. When
the runs kept every generation of their final eval (samples/final_<method>.jsonl,
pretrained runs do), summary.md ends with, per decoding, each point's difference
from CE on per-example ROUGE-L, chrF, rare-token share and length: the mean over the
evaluation examples with both seeds pooled, and a 95% paired bootstrap interval
(the same examples resampled for both sides), next to the seed spread of the tables.
Where the CE runs carry logit-adjusted decodes (the control, docs/results.md), it ends
with each PDL alpha against CE decoded with the bias of the same strength (beta =
alpha, PDL's population optimum), with the same paired intervals.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from typing import Any

import numpy as np

from experiments import frontier
from experiments import measures
from pdl_jax.train import metric_writer
from pdl_jax.eval import informativeness
from pdl_jax.eval import metrics as metrics_lib
from pdl_jax import paths
from pdl_jax.paths import atomic_write_bytes

MAIN_METRICS = ("eval/nll", "eval/rouge1", "eval/rougeL", "eval/bleu", "eval/chrf",
                "eval/distinct_1", "eval/distinct_2", "eval/unigram_entropy",
                "eval/mean_surprisal", "eval/rare_token_share", "eval/length",
                "eval/profile_tv")
NUM_BUCKETS = 10
BASE = "base (step 0)"  # the pretrained model before finetuning: the CE runs' step-0 eval
# Per-example metrics with paired bootstrap intervals against CE (from the samples).
INTERVAL_METRICS = ("rougeL", "chrf", "rare_token_share", "length")


def profile_tv(row: dict[str, float], prefix: str = "eval/") -> float | None:
  """Total-variation distance between the generations' and the references' shares of
  tokens per train-frequency decile: 0 when the frequency profile matches the
  references', 1 when the two share no decile. None where the buckets were not logged or
  nothing was generated (all buckets 0). The references are those of the decoding's own
  prompts (`<prefix>ref_freq_bucket_k`, logged where a sampled decoding covers only the
  first eval.sampled_examples of them), else all of them."""
  gen = [row.get(f"{prefix}freq_bucket_{k}") for k in range(NUM_BUCKETS)]
  ref = [row.get(f"{prefix}ref_freq_bucket_{k}", row.get(f"eval/ref_freq_bucket_{k}"))
         for k in range(NUM_BUCKETS)]
  if None in gen or None in ref or sum(gen) == 0:  # no buckets, or no generated token
    return None
  return 0.5 * sum(abs(g - r) for g, r in zip(gen, ref))


def find_runs(root: str) -> list[str]:
  """Run folders under root: those with both config.json and metrics.jsonl."""
  return sorted(str(folder) for folder, _, files in paths.path(root).walk()
                if "metrics.jsonl" in files and "config.json" in files)


def read_config(run: str) -> dict[str, Any]:
  return json.loads((paths.path(run) / "config.json").read_text())


def extra_methods(row: dict[str, Any]) -> list[str]:
  """The extra decodings (config.eval.extra_decodes) whose metrics a row holds: eval/evaluator.py
  logs them as eval/<method>/<metric>, the main decoding's as eval/<metric>."""
  return sorted({k.split("/")[1] for k in row if k.startswith("eval/") and k.count("/") == 2
                 and measures.split_bias(k.split("/")[1])[1] is None})


def eval_row(run: str, step: int) -> dict[str, float] | None:
  """The run's eval line at `step` with the derived profile_tv of each decoding (how
  far its frequency profile is from the references'), or None."""
  row = metric_writer.eval_at(run, step)
  if row is None:
    return None
  for prefix in ("eval/", *(f"eval/{m}/" for m in extra_methods(row))):
    tv = profile_tv(row, prefix)
    if tv is not None:
      row[f"{prefix}profile_tv"] = tv
  return {"step": step, **row}


def final_eval(run: str) -> dict[str, float] | None:
  """The eval line at the run's num_steps, or None (unfinished, or killed between its
  last checkpoint and its final eval: a mid-run eval is never taken as final)."""
  num_steps = read_config(run).get("num_steps")
  return None if num_steps is None else eval_row(run, int(num_steps))


def point_of(config: dict[str, Any]) -> tuple[str, float]:
  """(label, alpha for plotting: nan for CE and the baselines, which are labelled by
  their loss name; PDL with a fixed EOS weight is `alpha=A,eos=E`)."""
  loss = config["loss"]
  if loss["name"] != "pdl":
    return loss["name"], math.nan
  alpha = float(loss["alpha"])
  if loss.get("eos_weight") is not None:
    return f"alpha={alpha:g},eos={float(loss['eos_weight']):g}", math.nan
  return f"alpha={alpha:g}", alpha


def main_method(points) -> str:
  """The main decoding (config.eval.decode) of the CE runs: the one whose metrics are
  logged as eval/<metric>."""
  ce = points.get("ce")
  return ("greedy" if ce is None else
          read_config(ce["runs"][0]).get("eval", {}).get("decode", "greedy"))


def _order(label: str, alpha: float) -> tuple:
  """The base model, CE, then PDL by alpha, then PDL with a fixed EOS weight, then the
  baselines."""
  if label == BASE:
    return (-1, 0.0, "")
  if label == "ce":
    return (0, 0.0, "")
  if measures.bias_of(label) is not None:  # CE + a decoding bias, by strength
    return (0.5, measures.bias_of(label), "")
  if not math.isnan(alpha):
    return (1, alpha, "")
  return (2 if label.startswith("alpha=") else 3, 0.0, label)


def check_provenance(runs: list[str], strict: bool = False,
                     reproduced: frozenset[str] = frozenset()) -> None:
  """Warns (strict: fails) when the runs' provenance.json disagree on the code version
  or the base model's weights: a comparison's points must share both. Code versions
  in `reproduced` (reruns that gave the committed generations bit for bit:
  reproduction.json) count as the same code."""
  seen: dict[str, dict[str, list[str]]] = {"code_version": {}, "base_weights_sha256": {}}
  for run in runs:
    path = paths.path(run) / "provenance.json"
    if path.exists():
      prov = json.loads(path.read_text())
      for key in seen:
        value = str(prov.get(key))
        if key == "code_version" and value in reproduced:
          value = "reproduced"
        seen[key].setdefault(value, []).append(run)
  if len(seen["code_version"]) > 1:  # reruns that reproduced: the same as any one
    seen["code_version"].pop("reproduced", None)
  for key, values in seen.items():
    if len(values) > 1:
      message = f"the runs differ in {key}: " + "; ".join(
          f"{v}: {len(r)} runs (e.g. {r[0]})" for v, r in values.items())
      if strict:
        raise SystemExit(message)
      print(f"warning: {message}", file=sys.stderr)


# What every point of one comparison must share: what was evaluated and the budget
# (the learning rate may differ: the longer budget chooses it per loss).
SHARED_SETTINGS = (("eval", "split", "validation"), ("eval", "num_examples", None),
                   ("eval", "sampled_examples", None), (None, "num_steps", None),
                   (None, "batch_size", None))


def check_settings(runs: list[str], strict: bool = False) -> None:
  """Warns (strict: fails) when the runs differ in a SHARED_SETTINGS field of their
  config.json (e.g. a tune-split run among validation runs)."""
  for section, key, default in SHARED_SETTINGS:
    seen: dict[str, list[str]] = {}
    for run in runs:
      config = read_config(run)
      value = (config.get(section) or {}).get(key, default) if section else config.get(key)
      seen.setdefault(repr(value), []).append(run)
    if len(seen) > 1:
      name = f"{section}.{key}" if section else key
      message = f"the runs differ in {name}: " + "; ".join(
          f"{v}: {len(r)} runs (e.g. {r[0]})" for v, r in seen.items())
      if strict:
        raise SystemExit(message)
      print(f"warning: {message}", file=sys.stderr)


def collect(root: str, strict: bool = False, out: str | None = None
            ) -> dict[str, dict[str, Any]]:
  """{label: {"alpha": a, "runs": [paths], "metrics": {name: [values over seeds]}}}.

  Runs without a final eval are listed on stderr and left out (an error with strict).
  The CE runs' logit-adjusted decodes become points `ce+bias<beta>`
  (experiments/measures.py). out: where reproduction.json is (default ROOT).
  """
  points: dict[str, dict[str, Any]] = {}
  unfinished = []
  for run in find_runs(root):
    row = final_eval(run)
    if row is None:
      unfinished.append(run)
      continue
    label, alpha = point_of(read_config(run))
    p = points.setdefault(label, {"alpha": alpha, "runs": [], "metrics": {}})
    p["runs"].append(run)
    for name, value in row.items():
      if name.startswith("eval/"):
        p["metrics"].setdefault(name, []).append(float(value))
  check_provenance([run for p in points.values() for run in p["runs"]], strict,
                   frozenset(measures.reproduced_versions(out or root)))
  check_settings([run for p in points.values() for run in p["runs"]], strict)
  # The base model's row: the step-0 evals (eval.at_start, on when finetuning a
  # pretrained model) of the CE runs, which every point starts from.
  base = [(run, eval_row(run, 0)) for run in points.get("ce", {}).get("runs", [])]
  base = [(run, row) for run, row in base if row is not None]
  if base:
    p = points.setdefault(BASE, {"alpha": math.nan, "runs": [], "metrics": {}, "step": 0})
    for run, row in base:
      p["runs"].append(run)
      for name, value in row.items():
        if name.startswith("eval/"):
          p["metrics"].setdefault(name, []).append(float(value))
  if unfinished:
    message = (f"{len(unfinished)} runs have no eval at their num_steps (unfinished, or "
               f"killed before the final eval; rerun them to finish): {unfinished}")
    if strict:
      raise SystemExit(message)
    print(f"warning: left out {message}", file=sys.stderr)
  if not points:
    raise SystemExit(f"no finished runs (config.json + metrics.jsonl with an eval at "
                     f"num_steps) under {root}")
  if "ce" in points:
    points.update(measures.bias_points(points, main_method(points)))
  return dict(sorted(points.items(), key=lambda kv: _order(kv[0], kv[1]["alpha"])))


def paired_bootstrap(num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray,
                     den_b: np.ndarray, *, resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
  """(a - b, lower, upper): the difference of two statistics sum(num) / sum(den) over
  the same N examples (a mean when den is 1 per example, a pooled share otherwise)
  and its percentile bootstrap interval: N examples drawn with replacement, the same
  draw for a and b (paired), `resamples` times."""
  n = len(num_a)
  if not n or not (len(den_a) == len(num_b) == len(den_b) == n):
    raise ValueError(f"paired_bootstrap needs N > 0 examples on both sides; got "
                     f"{len(num_a)}, {len(den_a)}, {len(num_b)}, {len(den_b)}.")
  idx_RxN = np.random.default_rng(seed).integers(0, n, (resamples, n))
  ratio = lambda num, den, i: num[i].sum(-1) / np.maximum(den[i].sum(-1), 1e-12)
  diffs_R = ratio(num_a, den_a, idx_RxN) - ratio(num_b, den_b, idx_RxN)
  full = np.arange(n)
  lo, hi = np.percentile(diffs_R, [50 * (1 - level), 50 * (1 + level)])
  return float(ratio(num_a, den_a, full) - ratio(num_b, den_b, full)), float(lo), float(hi)


def sample_name(label: str, method: str) -> str:
  """eval/evaluator.py's file of every generation: the base model's at step 0, else the
  final (a `ce+bias<beta>` point: the CE run's <method>_bias<beta> decoding)."""
  return measures.sample_file(label, method, BASE)


def read_samples(run: str, label: str, method: str) -> list[dict[str, Any]] | None:
  """Every generation of one of the run's evals (sample_name), in the evaluation
  set's order, or None without the file."""
  path = paths.path(run) / sample_name(label, method)
  if not path.exists():
    return None
  return sorted((json.loads(line) for line in path.read_text().splitlines() if line),
                key=lambda line: line["index"])


def example_stats(run: str, label: str, method: str, word_stats=None
                  ) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]] | None:
  """(the evaluation prompts, {metric: (numerator [N], denominator [N])}) of one run's
  generations, or None without the file. Mean metrics have denominator 1; the
  rare-token share is pooled over tokens, as eval/rare_token_share. With word stats
  (measures.word_stats), also the informativeness measures."""
  lines = read_samples(run, label, method)
  if lines is None:
    return None
  per = metrics_lib.per_example([l["generation"] for l in lines],
                                [l["reference"] for l in lines])
  ones = np.ones(len(lines))
  stats = {k: (v, ones) for k, v in per.items()}
  stats["rare_token_share"] = (np.array([l["rare_tokens"] for l in lines], np.float64),
                               np.array([len(l["generation_ids"]) for l in lines], np.float64))
  if word_stats is not None:
    stats.update(measures.line_stats(lines, word_stats))
  return [l["input"] for l in lines], stats


def pooled_stats(point: dict[str, Any], label: str, method: str, word_stats=None,
                 cache: dict | None = None):
  """Per-example numerators and denominators summed over the point's seeds (the
  examples are the same prompts in every run), or None where a run lacks samples.
  cache: a dict kept by the caller across calls of one report (the CE and PDL points'
  stats serve both the intervals against CE and those against the control)."""
  if cache is not None:
    key = (label, method)
    if key not in cache:
      cache[key] = pooled_stats(point, label, method, word_stats)
    return cache[key]
  out, inputs = None, None
  for run in point["runs"]:
    got = example_stats(run, label, method, word_stats)
    if got is None:
      return None
    if inputs is not None and got[0] != inputs:
      raise SystemExit(f"{run} evaluated other prompts than the point's first run: the "
                       "paired intervals need the same evaluation examples.")
    inputs, stats = got
    out = stats if out is None else {k: (out[k][0] + v[0], out[k][1] + v[1])
                                     for k, v in stats.items()}
  return inputs, out


def intervals(points, word_stats=None, cache: dict | None = None
              ) -> dict[str, list[tuple[str, dict[str, tuple[float, float, float]]]]]:
  """{method: [(point, {metric: (difference from CE, 95% lower, upper)})]} for every
  plain decoding whose samples the CE runs kept (samples/final_<method>.jsonl); with
  word stats, the informativeness measures too (cache: pooled_stats')."""
  if "ce" not in points:
    return {}
  methods = intervals_methods(points)
  metrics = INTERVAL_METRICS + (informativeness.PER_EXAMPLE if word_stats else ())
  out = {}
  for method in methods:
    ce = pooled_stats(points["ce"], "ce", method, word_stats, cache)
    if ce is None:
      continue
    rows = []
    for label, p in points.items():
      got = None if label == "ce" else pooled_stats(p, label, method, word_stats, cache)
      if got is None:
        if label != "ce" and measures.bias_of(label) is None:
          print(f"warning: point {label} has no {sample_name(label, method)} in every run "
                "(runs from before every generation was kept): no interval", file=sys.stderr)
        continue
      if got[0] != ce[0]:
        raise SystemExit(f"point {label} evaluated other prompts than CE.")
      rows.append((label, {m: paired_bootstrap(*got[1][m], *ce[1][m]) for m in metrics}))
    out[method] = rows
  return out


def interval_lines(table) -> list[str]:
  """Markdown: one table per decoding, each cell `difference [lower, upper]`; where the
  rows hold the informativeness measures, a second table of them per decoding."""
  lines = []
  for method, rows in table.items():
    measured = [m for m in informativeness.PER_EXAMPLE if rows and m in rows[0][1]]
    lines += ["", f"Difference from CE per example, {method} (mean over the evaluation "
              "examples, seeds pooled; 95% paired bootstrap interval over the examples, "
              "2000 resamples, so it covers which prompts were drawn, not which seeds; "
              "chrF: mean sentence chrF; rare_token_share pooled over tokens):", "",
              "| point | " + " | ".join(INTERVAL_METRICS) + " |",
              "|---|" + "---|" * len(INTERVAL_METRICS)]
    for label, cells in rows:
      lines.append(f"| {label} | " + " | ".join(
          f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in
          (cells[m] for m in INTERVAL_METRICS)) + " |")
    if measured:
      lines += ["", f"Difference from CE per example, {method}, on measures that do not use "
                "the loss's token counts (docs/results.md: definitions; nidf and loop, rep_3, "
                "prompt_copy are means over outputs, content recall and precision pooled "
                "over examples; same bootstrap):", "",
                "| point | " + " | ".join(measured) + " |", "|---|" + "---|" * len(measured)]
      for label, cells in rows:
        lines.append(f"| {label} | " + " | ".join(
            f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in
            (cells[m] for m in measured)) + " |")
  return lines


CONTROL_METRICS = ("rougeL", "chrf", "length")  # beside the measures apart from the counts


def control_intervals(points, word_stats=None, cache: dict | None = None
                      ) -> dict[str, list[tuple[str, str, dict[str, tuple[float, float, float]]]]]:
  """{plain decoding: [(PDL point, its control, {metric: (PDL - control, 95% lower,
  upper)})]}: each `alpha=A` point against `ce+biasA`, CE decoded with the bias of the
  same strength (the PDL population optimum), paired over the same prompts with the
  seeds pooled, as `intervals`; only pairs whose runs kept both sides' generations
  (cache: pooled_stats')."""
  if "ce" not in points:
    return {}
  metrics = CONTROL_METRICS + (informativeness.PER_EXAMPLE if word_stats else ())
  out = {}
  for method in intervals_methods(points):
    rows = []
    for label, p in points.items():
      alpha = p["alpha"]
      control = f"{measures.BIAS_PREFIX}{alpha:g}"
      if math.isnan(alpha) or control not in points:
        continue
      pdl = pooled_stats(p, label, method, word_stats, cache)
      ce = pooled_stats(points[control], control, method, word_stats, cache)
      if pdl is None or ce is None:
        print(f"warning: {label} against {control}: not every run kept its {method} "
              "generations: no control row", file=sys.stderr)
        continue
      if pdl[0] != ce[0]:
        raise SystemExit(f"point {label} evaluated other prompts than its control {control}.")
      rows.append((label, control,
                   {m: paired_bootstrap(*pdl[1][m], *ce[1][m]) for m in metrics}))
    if rows:
      out[method] = rows
  return out


def control_lines(table) -> list[str]:
  """Markdown: per decoding, one table of PDL minus its control, `difference [lower,
  upper]` per cell."""
  lines = []
  for method, rows in table.items():
    cols = list(rows[0][2])
    lines += ["", f"PDL against its control, {method}: PDL alpha minus CE decoded with "
              "the bias of the same strength (beta = alpha, the PDL population optimum: "
              "docs/results.md); the same prompts, seeds pooled, 95% paired bootstrap "
              "interval over the examples:", "",
              "| point | control | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for label, control, cells in rows:
      lines.append(f"| {label} | {control} | " + " | ".join(
          f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in (cells[m] for m in cols)) + " |")
  return lines


def measure_table(points, word_stats) -> dict[str, tuple[dict[str, dict[str, tuple[float, float]]],
                                                         dict[str, float]]]:
  """{plain decoding: ({point: {measure: (mean, std over seeds)}}, the references'
  measures)}: the informativeness measures of every point whose runs kept all their
  generations of that decoding ({} without word stats or CE runs)."""
  if word_stats is None or "ce" not in points:
    return {}
  out = {}
  for method in intervals_methods(points):
    rows, refs = {}, None
    for label, p in points.items():
      per_run = [read_samples(run, label, method) for run in p["runs"]]
      if any(r is None for r in per_run):
        continue
      refs = refs or measures.reference_row(per_run[0], word_stats)
      rows[label] = measures.point_row(per_run, word_stats)
    if rows:
      out[method] = (rows, refs)
  return out


def measure_lines(points, word_stats, measured=None) -> list[str]:
  """Markdown: per plain decoding, each point's informativeness measures (mean ± std
  over seeds, each run's value over its prompts) and the references' own. measured:
  measure_table's result when the caller has it."""
  measured = measure_table(points, word_stats) if measured is None else measured
  lines = []
  cols = informativeness.PER_EXAMPLE + ("ead_1", "ead_2")
  for method, (rows, refs) in measured.items():
    lines += ["", f"Measures that do not use the loss's token counts, {method}:", "",
              "| point | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for label, row in rows.items():
      seeds = len(points[label]["runs"])
      lines.append(f"| {label} | {seeds} | " + " | ".join(
          f"{row[c][0]:.3f} ± {row[c][1]:.3f}" if seeds > 1 else f"{row[c][0]:.3f}"
          for c in cols) + " |")
    lines.append("| references | - | " + " | ".join(
        "-" if c.startswith("content_") else f"{refs[c]:.3f}" for c in cols) + " |")
  return lines


def intervals_methods(points) -> list[str]:
  """The plain decodings whose every generation the CE runs kept."""
  return sorted(m for m in (n.name[len("final_"):-len(".jsonl")] for n in (
      paths.path(points["ce"]["runs"][0]) / "samples").glob("final_*.jsonl"))
                if measures.split_bias(m)[1] is None)


def mean_std(values: list[float]) -> tuple[float, float]:
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_tables(points, out: str, word_stats=None, measured=None) -> None:
  """summary.csv and summary.md (module docstring); with word stats
  (measures.word_stats), the informativeness measures' tables and intervals too
  (measured: their measure_table when the caller has it)."""
  names = sorted({n for p in points.values() for n in p["metrics"]})
  table = io.StringIO(newline="")
  w = csv.writer(table)
  w.writerow(["point", "seeds"] + [f"{n}_{s}" for n in names for s in ("mean", "std")])
  for label, p in points.items():
    row = [label, len(p["runs"])]
    for n in names:
      m, s = mean_std(p["metrics"][n]) if n in p["metrics"] else (math.nan, math.nan)
      row += [f"{m:.6g}", f"{s:.6g}"]
    w.writerow(row)
  # Every output goes to a temporary name and is renamed: no half-written table.
  atomic_write_bytes(paths.path(out) / "summary.csv", table.getvalue().encode())
  cols = [n for n in MAIN_METRICS if any(n in p["metrics"] for p in points.values())]
  lines = markdown_table(points, cols)
  ref = next(iter(points.values()))["metrics"]
  refs = [f"{c.split('/')[1]} {statistics.fmean(ref[c.replace('eval/', 'eval/ref_')]):.3f}"
          for c in cols if c.replace("eval/", "eval/ref_") in ref]
  if refs:
    lines += ["", "References: " + ", ".join(refs) + "."]
  for method in sorted({m for p in points.values() for m in extra_methods(p["metrics"])}):
    sampled = [f"eval/{method}/{c[len('eval/'):]}" for c in MAIN_METRICS]
    sampled = [c for c in sampled if any(c in p["metrics"] for p in points.values())]
    if sampled:  # the same generation metrics, of this decoding method
      lines += ["", f"Decoded with {method}:", ""] + markdown_table(points, sampled)
  lines += measure_lines(points, word_stats, measured)
  pooled: dict = {}  # each point's samples read and scored once for both tables
  lines += interval_lines(intervals(points, word_stats, pooled))
  lines += control_lines(control_intervals(points, word_stats, pooled))
  atomic_write_bytes(paths.path(out) / "summary.md", ("\n".join(lines) + "\n").encode())


SAMPLE_POINTS = (BASE, "ce", "alpha=0.25", "alpha=0.5")  # CE and PDL side by side
SAMPLE_COUNT = 6  # the first evaluation prompts: a rule, not a choice of examples
SAMPLE_INPUT_CHARS = 200  # long inputs are cut in the middle to this: a dialogue's
# cue (who speaks next) is at its end, a description's subject at its start
SAMPLE_OUTPUT_CHARS = 240  # and degenerate loops (alpha 1, 48-token replies) to this
MARKDOWN_SPECIAL = "\\`*_<>[]|"  # backslash first: the escapes add backslashes


def _cell(text: str, limit: int, middle: bool = False) -> str:
  """Text as one Markdown table cell, shown as written: newlines as ' / ', cut to
  `limit` characters at the end (or in the middle, keeping both ends), Markdown's
  special characters escaped (a '|' would end the cell, '<...>' would be read as
  HTML, '*' and '_' as emphasis)."""
  text = " / ".join(part.strip() for part in text.strip().splitlines() if part.strip())
  if len(text) > limit and middle and limit >= 8:  # room for both ends and " … "
    head = (limit - 3) * 2 // 5
    text = text[:head].rstrip() + " … " + text[len(text) - (limit - 3 - head):].lstrip()
  elif len(text) > limit:
    text = text[:limit - 1].rstrip() + "…"
  for ch in MARKDOWN_SPECIAL:
    text = text.replace(ch, "\\" + ch)
  return text or "(empty)"


def sample_lines(points: dict[str, dict[str, Any]], count: int = SAMPLE_COUNT) -> list[str]:
  """Markdown: the first `count` evaluation prompts with the reference and the
  generations of the base, CE and PDL alpha 0.25 / 0.5, in the main decoding (config
  eval.decode), all from the CE runs' lowest seed; a point without that seed's
  generations is left out (with a warning), and [] without CE's."""
  if "ce" not in points:
    return []
  seed_runs = {label: {read_config(r)["seed"]: r for r in points[label]["runs"]}
               for label in SAMPLE_POINTS if label in points}
  seed = min(seed_runs["ce"])
  method = read_config(seed_runs["ce"][seed]).get("eval", {}).get("decode", "greedy")
  gens = {}
  for label, runs in seed_runs.items():
    lines = read_samples(runs[seed], label, method) if seed in runs else None
    if lines is None:
      print(f"warning: samples.md leaves out {label}: no seed-{seed} "
            f"{sample_name(label, method)}", file=sys.stderr)
      continue
    gens[label] = {line["index"]: line for line in lines}
  if "ce" not in gens:
    return []
  indices = sorted(gens["ce"])[:count]
  out = [f"The first {len(indices)} evaluation prompts, {method} decoding, seed {seed} "
         f"(`<point>-seed{seed}/{sample_name('ce', method)}` in the runs' folder; the base: "
         f"the CE run's "
         f"`{sample_name(BASE, method)}`; inputs cut in the middle to "
         f"{SAMPLE_INPUT_CHARS} characters, "
         f"generations to {SAMPLE_OUTPUT_CHARS}):",
         "", "| # | input | reference | " + " | ".join(gens) + " |",
         "|---|---|---|" + "---|" * len(gens)]
  for i in indices:
    ce = gens["ce"][i]
    row = [str(i), _cell(ce["input"], SAMPLE_INPUT_CHARS, middle=True),
           _cell(ce["reference"], SAMPLE_OUTPUT_CHARS)]
    for label, by_index in gens.items():
      if i not in by_index or by_index[i]["input"] != ce["input"]:
        raise SystemExit(f"point {label} evaluated another prompt {i} than CE (or none): "
                         "the columns would not be side by side.")
      row.append(_cell(by_index[i]["generation"], SAMPLE_OUTPUT_CHARS))
    out.append("| " + " | ".join(row) + " |")
  return out


def write_samples(points: dict[str, dict[str, Any]], out: str) -> None:
  """samples.md: sample_lines(points); without them (runs from before every final
  generation was kept) an older samples.md in `out` is removed, not left stale."""
  lines = sample_lines(points)
  path = paths.path(out) / "samples.md"
  if lines:
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
  elif path.exists():
    path.unlink()


def markdown_table(points, cols: list[str]) -> list[str]:
  """Lines of a Markdown table: a row per point, mean ± std over seeds of each column
  (named by its last part: eval/top_p/rouge1 -> rouge1)."""
  lines = ["| point | seeds | " + " | ".join(c.split("/")[-1] for c in cols) + " |",
           "|---|---|" + "---|" * len(cols)]
  for label, p in points.items():
    cells = []
    for c in cols:
      if c not in p["metrics"]:
        cells.append("-")
        continue
      m, s = mean_std(p["metrics"][c])
      cells.append(f"{m:.3f} ± {s:.3f}" if len(p["runs"]) > 1 else f"{m:.3f}")
    lines.append(f"| {label} | {len(p['runs'])} | " + " | ".join(cells) + " |")
  return lines


def save_png(fig, path: str) -> None:
  """Saves a matplotlib figure as PNG via a temporary name."""
  data = io.BytesIO()
  fig.savefig(data, format="png", dpi=100)
  atomic_write_bytes(path, data.getvalue())


def write_plots(points, out: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  # tab20's ten dark colours, then the ten light ones: tab20 pairs a dark and a light
  # shade of one hue, which side by side read as one colour.
  palette = plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2]

  cols = [n for n in MAIN_METRICS if any(n in p["metrics"] for p in points.values())]
  pdl = {k: p for k, p in points.items() if not math.isnan(p["alpha"])}
  fig, axes = plt.subplots(math.ceil(len(cols) / 4), 4, figsize=(16, 3.2 * math.ceil(len(cols) / 4)))
  for ax, c in zip(axes.flat, cols):
    xs = [p["alpha"] for p in pdl.values() if c in p["metrics"]]
    stats = [mean_std(p["metrics"][c]) for p in pdl.values() if c in p["metrics"]]
    ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", label="PDL")
    if "ce" in points and c in points["ce"]["metrics"]:
      ax.axhline(mean_std(points["ce"]["metrics"][c])[0], ls="--", c="gray", label="CE")
    others = [k for k, p in points.items() if k != "ce" and math.isnan(p["alpha"])]
    for k, color in zip(others, palette[1:]):  # baselines, PDL with EOS weight (C0: PDL)
      if c in points[k]["metrics"]:
        ax.axhline(mean_std(points[k]["metrics"][c])[0], ls="-.", lw=1, c=color, label=k)
    ref = c.replace("eval/", "eval/ref_")
    if ref in next(iter(points.values()))["metrics"]:
      ax.axhline(statistics.fmean(next(iter(points.values()))["metrics"][ref]), ls=":",
                 c="green", label="references")
    ax.set_title(c.split("/")[1])
    ax.set_xlabel("alpha (PDL); lines: CE, baselines")
  for ax in list(axes.flat)[len(cols):]:
    ax.axis("off")
  # One legend for all panels, right of them: inside a panel it hides the curves.
  legend = {}  # label -> handle, over all panels (nll has no references line)
  for ax in axes.flat:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      legend.setdefault(label, handle)
  fig.legend(list(legend.values()), list(legend), loc="center right")
  fig.tight_layout(rect=(0, 0, 0.86, 1))
  save_png(fig, paths.path(out) / "metrics_vs_alpha.png")
  plt.close(fig)

  keys = [f"eval/freq_bucket_{k}" for k in range(NUM_BUCKETS)]
  if all(k in next(iter(points.values()))["metrics"] for k in keys):
    fig, ax = plt.subplots(figsize=(11, 4))
    # Twenty colours and four markers: a point per colour-and-marker pair.
    for i, (label, p) in enumerate(points.items()):
      ax.plot(range(NUM_BUCKETS), [statistics.fmean(p["metrics"][k]) for k in keys],
              marker="os^D"[i % 4], color=palette[i % len(palette)], lw=1, label=label)
    ref = next(iter(points.values()))["metrics"]
    ax.plot(range(NUM_BUCKETS),
            [statistics.fmean(ref[k.replace("eval/", "eval/ref_")]) for k in keys],
            "k--", label="references")
    ax.set_xlabel("train-frequency decile of the token mass (0 = most frequent)")
    ax.set_ylabel("share of tokens")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    save_png(fig, paths.path(out) / "frequency_profile.png")
    plt.close(fig)


def check_copy_target(root: str, out: str) -> None:
  """Refuses an OUT/runs inside ROOT: the next report on ROOT would count each run twice."""
  runs, root = str(paths.path(out) / "runs"), str(paths.path(root))
  if runs == root or runs.startswith(root.rstrip("/") + "/"):
    raise SystemExit(f"--copy_runs writes to {runs}, which is inside ROOT {root}: a later "
                     "report on ROOT would count every run twice; pass --out outside ROOT.")


def copy_run(src: paths.PathLike, dest: paths.PathLike) -> None:
  """Copies what the committed results keep of one run: config.json, metrics.jsonl,
  provenance.json, the last samples file of each decoding and every generation of the
  base and final evals (the paired intervals' input)."""
  src, dest = paths.path(src), paths.path(dest)
  # eval/evaluator.py names them [<method>_]step_<7-digit step>.jsonl: per decoding
  # method, the largest name is the last eval.
  last: dict[str, str] = {}
  for name in sorted(p.name for p in (src / "samples").glob("*step_*.jsonl")):
    last[name.split("step_")[0]] = name
  every = sorted(f"samples/{n.name}" for pattern in ("final_*.jsonl", "base_*.jsonl")
                 for n in (src / "samples").glob(pattern))
  files = (["config.json", "metrics.jsonl"] + [f"samples/{n}" for n in last.values()]
           + every + [n for n in ("provenance.json",) if (src / n).exists()])
  for name in files:
    atomic_write_bytes(dest / name, (src / name).read_bytes())


def copy_runs(points, root: str, out: str) -> list[str]:
  """copy_run of every run into OUT/runs/<its path under ROOT>; returns the folders."""
  copied = []
  for label, p in points.items():
    if label == BASE:  # the CE runs' own step-0 evals: copied with them
      continue
    for run in p["runs"]:
      src = paths.path(run)
      dest = paths.path(out) / "runs" / src.relative_to(paths.path(root))
      copy_run(src, dest)
      copied.append(str(dest))
  return copied


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("root")
  p.add_argument("--out", default=None, help="where the tables and plots go (default ROOT)")
  p.add_argument("--copy_runs", action="store_true",
                 help="also copy each run's config, metrics and last samples to OUT/runs/")
  p.add_argument("--measures", action="store_true",
                 help="also the informativeness measures (NIDF's document frequencies from "
                      "OUT/word_stats.json, or counted from the task's train split there)")
  p.add_argument("--strict", action="store_true",
                 help="fail when a run has no eval at its num_steps (instead of leaving it out)")
  args = p.parse_args()
  out = args.out or args.root
  if args.copy_runs:
    check_copy_target(args.root, out)  # Before any work.
  points = collect(args.root, strict=args.strict, out=out)
  word_stats = measures.word_stats(out, points) if args.measures else None
  measured = measure_table(points, word_stats)
  write_tables(points, out, word_stats, measured)
  write_samples(points, out)
  write_plots(points, out)
  if measured and frontier.write_frontier(points, measured, main_method(points),
                                          paths.path(out) / "frontier.png", save_png):
    print(f"wrote {paths.path(out) / 'frontier.png'}")
  if args.copy_runs:
    print(f"copied {len(copy_runs(points, args.root, out))} runs to {paths.path(out) / 'runs'}")
  print((paths.path(out) / "summary.md").read_text())


if __name__ == "__main__":
  main()

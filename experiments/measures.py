"""What experiments/report.py adds for the control issue: the informativeness measures
of pdl_jax/eval/informativeness.py on every kept generation, the CE runs'
logit-adjusted decodes as points of their own (`ce+bias0.25`: CE decoded with the
bias -0.25 log(freq + eps), PDL's free control), and the reproduction check of CE
reruns.

The NIDF document frequencies come from the task's train targets: ROOT's
word_stats.json when it is there (committed beside the results, so the tables
regenerate without the dataset), else counted from the CE runs' dataset settings
and written there.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np

from pdl_jax import paths
from pdl_jax.eval import decode as decode_lib
from pdl_jax.eval import informativeness

WORD_STATS = "word_stats.json"
REPRODUCTION = "reproduction.json"
BIAS_PREFIX = "ce+bias"


def split_bias(method: str) -> tuple[str, float | None]:
  """("greedy", 0.25) of "greedy_bias0.25"; (method, None) of a plain decoding (or
  any name the decoder does not read: the evaluator's own parse_method)."""
  try:
    return decode_lib.parse_method(method)
  except ValueError:
    return method, None


def bias_of(label: str) -> float | None:
  """The bias strength of a `ce+bias<beta>` point, None for any other."""
  return float(label[len(BIAS_PREFIX):]) if label.startswith(BIAS_PREFIX) else None


def bias_points(points: dict[str, dict[str, Any]], main_method: str
                ) -> dict[str, dict[str, Any]]:
  """The CE runs' logit-adjusted decodes as points `ce+bias<beta>`: their metrics
  renamed as a plain decoding's (eval/greedy_bias0.25/rougeL -> eval/rougeL when
  greedy is the main decoding; eval/top_p_bias0.5/x -> eval/top_p/x), the CE runs'
  losses and NLL kept (the same model)."""
  ce = points.get("ce")
  if ce is None:
    return {}
  out: dict[str, dict[str, Any]] = {}
  for name, values in ce["metrics"].items():
    parts = name.split("/")
    if len(parts) != 3:
      continue
    method, beta = split_bias(parts[1])
    if beta is None:
      continue
    label = f"{BIAS_PREFIX}{beta:g}"
    p = out.setdefault(label, {"alpha": math.nan, "beta": beta, "runs": list(ce["runs"]),
                               "metrics": {k: v for k, v in ce["metrics"].items()
                                           if k.count("/") == 1 and "/ref_" not in k
                                           and k in ("eval/nll", "eval/loss",
                                                     "eval/unigram_nll")}})
    key = f"eval/{parts[2]}" if method == main_method else f"eval/{method}/{parts[2]}"
    p["metrics"][key] = values
  return out


def sample_file(label: str, method: str, base_label: str) -> str:
  """The run's file of every generation of point `label` decoded with `method`."""
  beta = bias_of(label)
  if beta is not None:
    return f"samples/final_{method}_bias{beta:g}.jsonl"
  return f"samples/{'base' if label == base_label else 'final'}_{method}.jsonl"


def word_stats(root: str, points: dict[str, dict[str, Any]]) -> informativeness.WordStats | None:
  """ROOT/word_stats.json, or the train targets' word document frequencies counted
  from the CE runs' dataset settings (and saved there); None without CE runs."""
  path = paths.path(root) / WORD_STATS
  if path.exists():
    return informativeness.WordStats.from_json(json.loads(path.read_text()))
  if "ce" not in points:
    return None
  import ml_collections

  from pdl_jax.data import sources

  config = json.loads((paths.path(points["ce"]["runs"][0]) / "config.json").read_text())
  dataset = ml_collections.ConfigDict(config["dataset"])
  _, targets = sources.load_split_texts(config["task"], dataset, "train",
                                        dataset.get("max_train_examples"))
  stats = informativeness.WordStats.from_texts(targets)
  paths.atomic_write_text(path, json.dumps(stats.to_json(), separators=(",", ":"),
                                           ensure_ascii=False) + "\n")
  return stats


def line_stats(lines: list[dict[str, Any]], stats: informativeness.WordStats
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The per-example measures of one run's kept generations."""
  return informativeness.per_example([l["generation"] for l in lines],
                                     [l["reference"] for l in lines],
                                     [l["input"] for l in lines], stats)


def reference_row(lines: list[dict[str, Any]], stats: informativeness.WordStats
                  ) -> dict[str, float]:
  """The measures of the references themselves (scored as outputs against
  themselves: their recall and precision are 1 by definition)."""
  refs = [l["reference"] for l in lines]
  per = informativeness.per_example(refs, refs, [l["input"] for l in lines], stats)
  row = {k: informativeness.ratio(*v) for k, v in per.items()}
  vocab = len(stats.df)
  row.update({f"ead_{n}": informativeness.ead(refs, n, vocab) for n in (1, 2)})
  return row


def point_row(per_run: list[list[dict[str, Any]]], stats: informativeness.WordStats
              ) -> dict[str, tuple[float, float]]:
  """{measure: (mean, std over the runs)} of a point's runs' kept generations."""
  values: dict[str, list[float]] = {}
  for lines in per_run:
    per = line_stats(lines, stats)
    for k, v in per.items():
      values.setdefault(k, []).append(informativeness.ratio(*v))
    gens = [l["generation"] for l in lines]
    for n in (1, 2):
      values.setdefault(f"ead_{n}", []).append(informativeness.ead(gens, n, len(stats.df)))
  return {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
          for k, v in values.items()}


def read_jsonl(path: paths.PathLike) -> list[dict[str, Any]]:
  """The records of a JSON Lines file (a run's samples), blank lines skipped."""
  return [json.loads(l) for l in paths.path(path).read_text().splitlines() if l.strip()]


def generations_sha256(lines: list[dict[str, Any]]) -> str:
  """sha256 of a run's generations (ids and texts, in prompt order): what the
  reproduction check compares."""
  data = json.dumps([[l["index"], l["generation"], l["generation_ids"]] for l in lines],
                    separators=(",", ":"), ensure_ascii=False)
  return hashlib.sha256(data.encode()).hexdigest()


def read_reproduction(root: str) -> dict[str, Any]:
  """ROOT/reproduction.json ({} without it)."""
  path = paths.path(root) / REPRODUCTION
  return json.loads(path.read_text()) if path.exists() else {}


def reproduced_versions(root: str) -> set[str]:
  """Code versions whose reruns reproduced the committed generations bit for bit
  (every deterministic decoding of every rerun of that version compared equal:
  experiments/reproduce.py), per ROOT/reproduction.json: one rerun that differs
  disqualifies its version."""
  reruns = read_reproduction(root).get("reruns", [])
  differs = {r["rerun_code_version"] for r in reruns if not r.get("equal")}
  return {r["rerun_code_version"] for r in reruns} - differs

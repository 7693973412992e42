"""The quick real-model comparison: finetunes the real base with CE and with PDL on the
same data, then prints them side by side (the base model, CE, CE decoded with PDL's
frequency bias, PDL) with a few generations for the same prompts.

    python experiments/compare.py                       # summarization, 9 min on 2 cores
    python experiments/compare.py --config=configs/dialogue.py:quick --root=workdirs/quick-dialogue

The points are the `quick` config argument's sweep (configs/common.py: CE and PDL at
alpha 0.25, 24 steps, 64 prompts, greedy decoding; CE also decodes with the bias
-0.25 log(freq + eps)). They run one after the other through experiments/sweep.py's
commands (a finished point is skipped, an interrupted one resumes), then the table:
eval NLL, ROUGE-L, chrF, and the informativeness measures of
pdl_jax/eval/informativeness.py on the kept generations (NIDF from the task's train
targets). 64 prompts show what each loss does to the generations; the committed
comparison (docs/results.md) is the one with intervals.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TFDS's TensorFlow: no start-up notices
from experiments import measures
from experiments import sweep
from pdl_jax import paths
from pdl_jax.eval import informativeness
from pdl_jax.train import metric_writer

# (label, key, format): eval metrics from metrics.jsonl, then the measures of the kept
# generations (informativeness.PER_EXAMPLE).
METRIC_ROWS = (("eval NLL", "eval/nll", ".3f"), ("ROUGE-L", "eval/rougeL", ".2f"),
               ("chrF", "eval/chrf", ".2f"), ("length (words)", "eval/length", ".1f"))
MEASURE_ROWS = (("NIDF", "nidf", ".3f"), ("content recall", "content_recall", ".3f"),
                ("content precision", "content_precision", ".3f"),
                ("outputs that loop", "loop", ".3f"),
                ("copying the prompt", "prompt_copy", ".3f"))
NUM_EXAMPLES = 3  # generations shown


def columns(done: list[tuple[str, str]], num_steps: dict[str, int], method: str
            ) -> list[tuple[str, dict[str, float], list[dict[str, Any]]]]:
  """[(column label, eval metrics, kept generations)]: the base model (the CE run's
  step 0), then each run, then after CE its biased decodes."""
  out = []
  for workdir, name in done:
    final = metric_writer.eval_at(workdir, num_steps[workdir]) or {}
    samples = paths.path(workdir) / "samples"
    if name == "ce":
      base = metric_writer.eval_at(workdir, 0)
      if base is not None and (samples / f"base_{method}.jsonl").exists():
        out.append(("base model", base, measures.read_jsonl(samples / f"base_{method}.jsonl")))
    out.append((name, final, measures.read_jsonl(samples / f"final_{method}.jsonl")))
    for key in sorted({k.split("/")[1] for k in final if k.count("/") == 2}):
      plain, beta = measures.split_bias(key)
      if beta is not None and plain == method:
        renamed = {f"eval/{k.split('/')[2]}": v for k, v in final.items()
                   if k.startswith(f"eval/{key}/")}
        renamed["eval/nll"] = final.get("eval/nll")
        out.append((f"{name}+bias{beta:g}", renamed,
                    measures.read_jsonl(samples / f"final_{key}.jsonl")))
  return out


def table(cols, stats: informativeness.WordStats | None) -> list[str]:
  """Aligned text lines: a row per measure, a column per point."""
  rows = []
  for label, key, fmt in METRIC_ROWS:
    rows.append((label, [format(m[key], fmt) if m.get(key) is not None else "-"
                         for _, m, _ in cols]))
  per = [measures.line_stats(lines, stats) if stats is not None else
         informativeness.per_example([l["generation"] for l in lines],
                                     [l["reference"] for l in lines],
                                     [l["input"] for l in lines], None)
         for _, _, lines in cols]
  for label, key, fmt in MEASURE_ROWS:
    values = [informativeness.ratio(*p[key]) for p in per]
    rows.append((label, ["-" if v != v else format(v, fmt) for v in values]))
  width = max(len(label) for label, _ in rows)
  cell = max(12, *(len(c[0]) + 2 for c in cols))
  lines = [" " * width + "".join(f"{c[0]:>{cell}}" for c in cols)]
  lines += [f"{label:{width}}" + "".join(f"{v:>{cell}}" for v in values)
            for label, values in rows]
  return lines


def examples(cols, count: int = NUM_EXAMPLES) -> list[str]:
  """The first `count` prompts: input (shortened), reference, each column's output."""
  out = []
  first = cols[0][2]
  for k in range(min(count, len(first))):
    out.append(f"--- prompt {k}: " + textwrap.shorten(first[k]["input"], 160))
    out.append(f"  {'reference':>14}: {first[k]['reference']}")
    for label, _, lines in cols:
      out.append(f"  {label:>14}: {textwrap.shorten(lines[k]['generation'], 200) or '(empty)'}")
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/summarization.py:quick",
                 help="configs/<task>.py[:args] (default: summarization's quick comparison)")
  p.add_argument("--root", default=None,
                 help="folder of the runs (default workdirs/quick-<task>)")
  p.add_argument("--only", default=None, help="point names to run and show (default all)")
  args = p.parse_args()
  task = os.path.basename(args.config.split(":", 1)[0]).removesuffix(".py")
  # Absolute: the points run with the repository as their working directory.
  root = os.path.abspath(args.root or os.path.join("workdirs", f"quick-{task}"))
  try:
    todo = sweep.select(sweep.commands(args.config, root, None, []), args.only)
  except ValueError as e:
    p.error(str(e))
  sweep.run_points(todo, [])
  num_steps = {w: sweep.point_num_steps(
      next(a for a in argv if a.startswith("--config="))[len("--config="):], [])
      for w, argv in todo}
  done = [(w, sweep.point_name(w.rstrip("/").rpartition("/")[2])) for w, _ in todo]
  config = json.loads((paths.path(done[0][0]) / "config.json").read_text())
  method = config["eval"]["decode"]
  cols = columns(done, num_steps, method)
  points = {name: {"runs": [w]} for w, name in done}
  stats = measures.word_stats(root, points)
  print(f"\n{config['task']} on {config['model']['pretrained']}, {config['num_steps']} steps, "
        f"{len(cols[0][2])} prompts, {method} decoding ({root}):")
  print("\n".join(table(cols, stats)))
  print()
  print("\n".join(examples(cols)))
  print(f"\nevery metric: {root}/<point>/metrics.jsonl; all generations: <point>/samples/")


if __name__ == "__main__":
  main()

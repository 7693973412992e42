"""The closing summary of a finished run: its first evaluation (the base model's, at
step 0, where there is one) against its last on the measures that matter, where its
outputs are and how much disk they take, and the commands that come next."""

from __future__ import annotations

import math

from pdl_jax import paths
from pdl_jax.eval import progress
from pdl_jax.train import metric_writer

# (label, metrics key without "eval/", format) of the summary's rows, in order.
ROWS = (
    ("eval NLL (nats/token)", "nll", ".3f"),
    ("ROUGE-L", "rougeL", ".2f"),
    ("chrF", "chrf", ".2f"),
    ("content-word recall", "content_recall", ".3f"),
    ("content-word precision", "content_precision", ".3f"),
    ("outputs that loop", "loop", ".3f"),
    ("outputs copying the prompt", "prompt_copy", ".3f"),
    ("rare-token share", "rare_token_share", ".3f"),
    ("length (words)", "length", ".1f"),
)


def size_text(num_bytes: float) -> str:
  """'512 B', '3.4 MiB', '1.4 GiB'."""
  for unit in ("B", "KiB", "MiB", "GiB"):
    if num_bytes < 1024 or unit == "GiB":
      return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
    num_bytes /= 1024
  raise AssertionError("unreachable")


def folder_bytes(folder: paths.PathLike) -> dict[str, int]:
  """Bytes under each top-level entry of `folder` (files count under their own name)."""
  root = paths.path(folder)
  out: dict[str, int] = {}
  for entry in root.iterdir() if root.exists() else ():
    if entry.is_file():
      out[entry.name] = entry.stat().length
    else:
      out[entry.name] = sum((d / f).stat().length for d, _, files in entry.walk()
                            for f in files)
  return out


def _cell(row: dict[str, float], key: str, fmt: str) -> str:
  value = row.get(f"eval/{key}")
  return "-" if value is None or math.isnan(value) else format(value, fmt)


def table(evals: dict[int, dict[str, float]]) -> list[str]:
  """The rows of ROWS present in the last eval (and each extra decoding's ROUGE-L), as
  aligned text lines: the label, then a column per eval step ({step: eval/* values},
  in step order)."""
  last = evals[max(evals)]
  rows = [(label, key, fmt) for label, key, fmt in ROWS if f"eval/{key}" in last]
  extras = dict.fromkeys(k.split("/")[1] for k in last if k.count("/") == 2)
  rows += [(f"{m} ROUGE-L", f"{m}/rougeL", ".2f") for m in extras if f"eval/{m}/rougeL" in last]
  width = max([len(label) for label, _, _ in rows] + [10])
  steps = sorted(evals)
  head = f"  {'':{width}}" + "".join(f"  {f'step {s}':>10}" for s in steps)
  return [head] + [f"  {label:{width}}" + "".join(f"  {_cell(evals[s], key, fmt):>10}"
                                                 for s in steps)
                   for label, key, fmt in rows]


def closing_summary(workdir: str, last_step: int, seconds: float) -> str:
  """The text printed when a run reaches its last step (module docstring)."""
  last = metric_writer.eval_at(workdir, last_step) or {}
  first = metric_writer.eval_at(workdir, 0)
  where = paths.path(workdir)
  if "://" in str(workdir):  # a bucket: one listing request per folder, not worth it
    size = "size: see the bucket"
  else:
    try:
      sizes = folder_bytes(workdir)
    except OSError:  # a file removed while walking: the summary is not worth an error
      sizes = {}
    size = f"{size_text(sum(sizes.values()))}: " + ", ".join(
        f"{name} {size_text(n)}" for name, n in sorted(sizes.items(), key=lambda kv: -kv[1])[:3])
  lines = [f"run finished: step {last_step} ({progress.duration(seconds)} in this process)"]
  if last:
    lines += table({0: first, last_step: last} if first is not None else {last_step: last})
  lines += [
      f"workdir: {where} ({size})",
      "every metric: metrics.jsonl; generations: samples/ (final_<decoding>.jsonl)",
      "next:",
      f"  python -m pdl_jax.cli.export_hf --workdir={where} --out={where}/export"
      "   # a Hugging Face folder",
      f"  python experiments/report.py {where}   # tables, plots and samples of runs",
      f"  tensorboard --logdir={where}/{metric_writer.TENSORBOARD}",
  ]
  return "\n".join(lines)

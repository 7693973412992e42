"""The control's picture: quality against informativeness, PDL's alphas beside CE's
decoding-time frequency bias.

    frontier.png (written by experiments/report.py --measures)

PDL trained to convergence is CE with -alpha log(freq + eps) added to its logits
(docs/losses.md): so the question is whether the PDL points (one trained run per
alpha) lie beyond the curve that one CE run traces when decoded with the bias at
several strengths beta (`ce+bias<beta>` points). Each panel puts a quality measure
(ROUGE-L or chrF against the references) on y and an informativeness measure that does
not use the loss's own token counts on x (NIDF, or recall of the references' content
words: pdl_jax/eval/informativeness.py); one row per decoding whose every generation
the runs kept. Both curves start at CE (alpha = beta = 0); baselines and the base model
are single labelled points; the references' NIDF is a dotted line. Means over seeds;
y error bars are the seed spread (the paired intervals are summary.md's).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from experiments import measures

X_MEASURES = (("nidf", "NIDF (train-target document frequencies)"),
              ("content_recall", "recall of the references' content words"))
Y_METRICS = (("rougeL", "ROUGE-L"), ("chrf", "chrF"))


def metric_key(method: str, main_method: str, metric: str) -> str:
  """Where a point's metrics hold `metric` of decoding `method`: eval/<metric> for the
  main decoding, eval/<method>/<metric> for an extra one."""
  return f"eval/{metric}" if method == main_method else f"eval/{method}/{metric}"


def curves(points: dict[str, dict[str, Any]], rows: dict[str, dict[str, tuple[float, float]]],
           key: str, x_measure: str) -> dict[str, list[tuple[str, float, float, float]]]:
  """{"pdl": [...], "bias": [...], "other": [...]}: (label, x, y mean, y std) of every
  point with both values; PDL by alpha and CE + bias by beta, each starting at CE."""
  out: dict[str, list[tuple[str, float, float, float]]] = {"pdl": [], "bias": [], "other": []}
  for label, p in points.items():
    if label not in rows or key not in p["metrics"]:
      continue
    values = p["metrics"][key]
    y, sd = statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
    item = (label, rows[label][x_measure][0], y, sd)
    if label == "ce":
      out["pdl"].append(item)
      out["bias"].append(item)
    elif measures.bias_of(label) is not None:
      out["bias"].append(item)
    elif not math.isnan(p["alpha"]):
      out["pdl"].append(item)
    else:
      out["other"].append(item)
  strength = lambda item: (0.0 if item[0] == "ce" else measures.bias_of(item[0])
                           if measures.bias_of(item[0]) is not None else points[item[0]]["alpha"])
  out["pdl"].sort(key=strength)
  out["bias"].sort(key=strength)
  return out


def short_label(label: str) -> str:
  """"alpha=0.25" -> "α0.25", "ce+bias0.5" -> "β0.5"; others as they are."""
  if label.startswith("alpha=") and "," not in label:
    return "α" + label[len("alpha="):]
  beta = measures.bias_of(label)
  return label if beta is None else f"β{beta:g}"


def write_frontier(points: dict[str, dict[str, Any]],
                   measured: dict[str, tuple[dict[str, dict[str, tuple[float, float]]],
                                             dict[str, float]]],
                   main_method: str, out_png, save_png) -> bool:
  """Draws frontier.png from the points and their measures ({method: ({label: {measure:
  (mean, std)}}, the references' measures)}); False (nothing written) when no decoding
  has both CE + bias and PDL points."""
  methods = [m for m, (rows, _) in measured.items()
             if any(measures.bias_of(l) is not None for l in rows)
             and any(l.startswith("alpha=") for l in rows)]
  if not methods:
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [(m, y, x) for m in methods for y in Y_METRICS for x in X_MEASURES]
  fig, axes = plt.subplots(len(methods) * len(Y_METRICS), len(X_MEASURES),
                           figsize=(11, 3.6 * len(methods) * len(Y_METRICS)), squeeze=False)
  for ax, (method, (metric, y_name), (x_measure, x_name)) in zip(axes.flat, panels):
    rows, refs = measured[method]
    got = curves(points, rows, metric_key(method, main_method, metric), x_measure)
    for name, style in (("pdl", dict(color="C0", marker="o", label="PDL (trained, by alpha)")),
                        ("bias", dict(color="C1", marker="s", ls="--",
                                      label="CE + decoding bias (by beta)"))):
      items = got[name]
      if items:
        ax.errorbar([i[1] for i in items], [i[2] for i in items], yerr=[i[3] for i in items],
                    capsize=2, **style)
        for label, x, y, _ in items:
          if label != "ce":
            ax.annotate(short_label(label), (x, y), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=style["color"])
    for label, x, y, _ in got["other"]:
      base = label.startswith("base")
      ax.scatter([x], [y], marker="x" if base else "^", color="black" if base else "gray",
                 s=25, zorder=3)
      ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, -9), fontsize=6,
                  color="dimgray")
    ce = [i for i in got["pdl"] if i[0] == "ce"]
    if ce:
      ax.scatter([ce[0][1]], [ce[0][2]], marker="*", s=120, color="red", zorder=4, label="CE")
    if x_measure in refs and not x_measure.startswith("content_"):
      ax.axvline(refs[x_measure], ls=":", color="green", label="references")
    ax.set_xlabel(x_name)
    ax.set_ylabel(f"{y_name}, {method}")
  legend: dict[str, Any] = {}
  for ax in axes.flat:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      legend.setdefault(label, handle)
  fig.legend(list(legend.values()), list(legend), loc="upper center", ncol=4)
  fig.tight_layout(rect=(0, 0, 1, 0.97))
  save_png(fig, out_png)
  plt.close(fig)
  return True

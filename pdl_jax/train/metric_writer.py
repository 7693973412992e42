"""Metrics output of a run: WORKDIR/metrics.jsonl and TensorBoard (process 0 only).

metrics.jsonl is the record: one {"step": s, name: value, ...} line per write. It
is rewritten whole through the path layer (an atomic rename; cloud storage has no
append), which costs nothing at a few hundred lines. On start the writer drops
every line after the step the run resumes from (lines a killed run logged after
its last checkpoint would otherwise appear twice) and rebuilds the TensorBoard
events from the kept lines, so TensorBoard shows each step once too.
"""

from __future__ import annotations

import json

import jax

from pdl_jax import multihost
from pdl_jax import paths

FILENAME = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def read_lines(workdir: str) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl ([] when there is none)."""
  p = paths.path(workdir) / FILENAME
  if not p.exists():
    return []
  return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def eval_at(workdir: str, step: int) -> dict[str, float] | None:
  """The eval/* values logged at `step`, or None when no eval was written there (a run
  killed or preempted between that step's checkpoint and its eval)."""
  for r in read_lines(workdir):
    if r["step"] == step and "eval/nll" in r:
      return {k: v for k, v in r.items() if k.startswith("eval/")}
  return None


class MetricsWriter:
  """Writes scalars per step to metrics.jsonl and TensorBoard.

  Args:
    workdir: the run's folder.
    resumed_step: the step the run restarts from (0 for a fresh run): records
      after it are dropped.
  """

  def __init__(self, workdir: str, resumed_step: int):
    self.enabled = jax.process_index() == 0
    self.path = paths.path(workdir) / FILENAME
    self.lines: list[dict] = []
    self.tb = None
    if not self.enabled:
      return
    old = read_lines(workdir)
    self.lines = [r for r in old if r["step"] <= resumed_step]
    if len(self.lines) != len(old):
      paths.atomic_write_text(self.path, self._text())
      multihost.log(f"metrics: dropped {len(old) - len(self.lines)} records logged after "
                f"step {resumed_step} by the interrupted run")
    self.tb = _tensorboard(paths.path(workdir) / TENSORBOARD, self.lines)

  def _text(self) -> str:
    return "".join(json.dumps(r) + "\n" for r in self.lines)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """Appends one record (and its TensorBoard scalars)."""
    if not self.enabled:
      return
    self.lines.append({"step": int(step), **{k: float(v) for k, v in scalars.items()}})
    paths.atomic_write_text(self.path, self._text())
    if self.tb is not None:
      self.tb.write_scalars(int(step), scalars)
      self.tb.flush()



def _tensorboard(folder, records: list[dict]):
  """A fresh TensorBoard writer holding `records`, or None where TensorFlow cannot
  write to this kind of path (TensorBoard is a view; metrics.jsonl is the record)."""
  import tensorflow as tf
  from clu import metric_writers

  try:
    if tf.io.gfile.exists(str(folder)):
      tf.io.gfile.rmtree(str(folder))  # rebuilt below from the kept records
    tf.io.gfile.makedirs(str(folder))
  except (tf.errors.OpError, NotImplementedError) as e:
    multihost.log(f"TensorBoard events not written to {folder}: {type(e).__name__}")
    return None
  tb = metric_writers.SummaryWriter(str(folder))
  for r in records:
    tb.write_scalars(r["step"], {k: v for k, v in r.items() if k != "step"})
  tb.flush()
  return tb

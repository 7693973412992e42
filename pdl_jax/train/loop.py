"""The loop of one run: steps, log lines and their meter, checkpoints and the checks
on their saves, evaluations at their cadence, and SIGTERM (what TPU VM preemption
sends: save at the current step, then exit)."""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from typing import Any, Callable
import jax
import numpy as np
from pdl_jax.train import checkpoint as ckpt_lib
from pdl_jax.data import batches as batches_lib
from pdl_jax.eval import evaluator as evaluator_lib
from pdl_jax.train import metric_writer
from pdl_jax import sharding
from pdl_jax.train import state as state_lib
from pdl_jax import multihost
from pdl_jax import paths


def place_batch(batch: dict[str, np.ndarray], batch_sharding: jax.sharding.Sharding
                ) -> dict[str, jax.Array]:
  """The global batch as arrays in `batch_sharding`, each device given its rows by
  index. Not make_array_from_process_local_data of per-process rows: where a batch
  shard is replicated on devices of several processes (the model axis spans hosts, or
  data x fsdp is smaller than the process count) those processes' rows would differ
  and the replicas would train on different data, without an error."""
  return {k: jax.make_array_from_callback(v.shape, batch_sharding, lambda idx, v=v: v[idx])
          for k, v in batch.items()}


@dataclasses.dataclass(frozen=True)
class Cadence:
  """The loop's settings: how far it runs and what it does at which steps."""

  num_steps: int  # the run's last step
  steps_per_run: int | None  # stop (with a checkpoint) after this many steps; None: no
  log_every: int  # steps between train metric lines
  eval_every: int  # steps between evaluations (and one at the end)
  checkpoint_every: int  # steps between checkpoints (and one at the end)
  eval_at_start: bool  # evaluate at step 0 (a pretrained base's row)
  skip_nonfinite_steps: bool  # skip non-finite steps instead of stopping


# The eval line's metrics of the main decoding (the rest: metrics.jsonl, report.py).
HEADLINE = ("loss", "nll", "rougeL", "chrf", "content_recall", "loop", "length")


def eval_summary(result: dict[str, float]) -> str:
  """One short log line: HEADLINE's metrics without their "eval/" prefix, then each
  extra decoding's ROUGE-L ("top_p/rougeL"); every metric is in metrics.jsonl."""
  parts = [f"{k} {result[f'eval/{k}']:.3f}" for k in HEADLINE if f"eval/{k}" in result]
  extras = dict.fromkeys(k.split("/")[1] for k in result if k.count("/") == 2)
  parts += [f"{m}/rougeL {result[f'eval/{m}/rougeL']:.3f}" for m in extras
            if f"eval/{m}/rougeL" in result]
  return "  ".join(parts)


@dataclasses.dataclass
class Loop:
  """The loop of one run and what it needs: steps, logs, checkpoints, evals, SIGTERM."""

  cadence: Cadence
  workdir: str
  mesh: jax.sharding.Mesh
  state: state_lib.TrainState
  step_fn: Callable[..., Any]
  weights_V: jax.Array
  batches: batches_lib.TrainBatches
  evaluator: evaluator_lib.Evaluator
  writer: metric_writer.MetricsWriter
  mngr: Any
  meta: dict[str, Any]  # the checkpoint's JSON meta besides the step

  def save(self, at: int) -> None:
    # orbax waits for the previous save before starting one anyway: waiting here
    # first lets every process agree on whether it failed.
    self.check_saves(block=True)
    try:  # what fails at once (an unwritable folder) gets the same message
      ckpt_lib.save(self.mngr, at, self.state.checkpointed(), {"step": at, **self.meta})
    except Exception as e:  # pylint: disable=broad-except
      raise self.save_failed(e) from e

  def save_failed(self, error: Exception | None) -> RuntimeError:
    """The error a run stops with when a checkpoint save failed (None: on another process)."""
    where = paths.path(self.workdir) / "checkpoints"
    return RuntimeError(
        "saving a checkpoint failed ("
        + (f"{type(error).__name__}: {error}" if error else "on another process")
        + f"); stopped rather than train on without one. Free space in (or fix) {where},"
        " then run the same command: it resumes from the last complete checkpoint.")

  def check_saves(self, block: bool = False) -> None:
    """Stops when an asynchronous checkpoint save has failed (a full disk, a lost
    bucket): orbax would raise it only at the next save, checkpoint_every steps of
    training later, and a run that then fails keeps no checkpoint of that work.
    Without `block` a save still running is left to run. A collective with several
    processes: every process calls it at the same step and all stop together."""
    error = None
    try:
      # A failed save's error lives in orbax's finalize thread, which clears the
      # in-progress flag when it ends: waiting on an ended save returns at once or
      # raises its error.
      if block or not self.mngr.is_saving_in_progress():
        self.mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      error = e
    if multihost.any_process(error is not None):
      raise self.save_failed(error) from error

  def check_finite(self) -> None:
    """Stops before a non-finite update can reach a checkpoint (unless skipping)."""
    first = int(multihost.to_host(self.state.first_nonfinite))
    if first >= 0 and not self.cadence.skip_nonfinite_steps:
      raise FloatingPointError(
          f"non-finite loss or gradient at step {first}; stopped without saving it (the "
          f"last good checkpoint, step {self.mngr.latest_step()}, is kept). Lower the "
          "learning rate, clip with loss.max_weight, or set "
          "config.skip_nonfinite_steps=True to skip such steps.")

  def evaluate(self, at: int) -> dict[str, float]:
    t0 = time.perf_counter()
    with jax.set_mesh(self.mesh):  # the model's activation constraints resolve against it
      result = self.evaluator(self.state, at)
    self.writer.write(at, result)
    multihost.log(f"eval at step {at} ({time.perf_counter() - t0:.0f} s): "
              + eval_summary(result))
    return result

  def is_eval_step(self, at: int) -> bool:
    return at % self.cadence.eval_every == 0 or at == self.cadence.num_steps

  def catch_up_eval(self, step: int) -> dict[str, float]:
    """A run preempted (or killed) at an eval step after its checkpoint but before its
    eval gets that eval now. Process 0's metrics decide for all (evaluating is
    collective: a process reading another file must not take another branch)."""
    logged = metric_writer.eval_at(self.workdir, step)
    if multihost.any_process(jax.process_index() == 0 and logged is None):
      return self.evaluate(step)
    return logged or {}

  def run(self) -> dict[str, float]:
    """Steps to num_steps (or steps_per_run more); the last eval metrics."""
    cadence = self.cadence
    # SIGTERM (what TPU VM preemption sends): save at the current step, then exit.
    preempted = []
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
      previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
    step = int(multihost.to_host(self.state.step))
    result: dict[str, float] = {}
    stop_at = cadence.num_steps if cadence.steps_per_run is None else min(
        cadence.num_steps, step + cadence.steps_per_run)
    try:
      if (step > 0 and self.is_eval_step(step)) or (step == 0 and cadence.eval_at_start):
        result = self.catch_up_eval(step)  # step 0: the base model's row
      meter = Meter(step, cadence.num_steps)
      while step < stop_at:
        meter.tokens += self.batches.real_tokens(step)
        batch = place_batch(self.batches.global_batch(step), self.batch_sharding)
        with jax.set_mesh(self.mesh):  # activation constraints resolve against it
          self.state, m = self.step_fn(self.state, batch, self.weights_V)
        step += 1
        # Hosts get SIGTERM at different steps; saving is collective, so with several
        # processes they agree at each log step whether any was told to stop.
        stop = bool(preempted) if jax.process_count() == 1 else (
            step % cadence.log_every == 0 and multihost.any_process(bool(preempted)))
        # A log step's record is written before a preemption save: the resumed run
        # starts after this step and would never write it.
        if step % cadence.log_every == 0 or step == cadence.num_steps:
          self.check_saves()
          self.check_finite()
          self.writer.write(step, meter.log(step, jax.tree.map(multihost.to_host, m)))
        if stop:
          self.check_finite()
          self.save(step)
          self.check_saves(block=True)
          multihost.log(f"SIGTERM: saved a checkpoint at step {step}; run the same command to "
                    "resume")
          raise SystemExit(128 + signal.SIGTERM)
        if step % cadence.checkpoint_every == 0 or step in (cadence.num_steps, stop_at):
          self.check_finite()
          self.save(step)
        if self.is_eval_step(step):
          result = self.evaluate(step)
    finally:
      try:
        self.mngr.wait_until_finished()  # the last save
      except Exception as e:  # pylint: disable=broad-except
        raise self.save_failed(e) from e
      finally:
        if previous_handler is not None:
          signal.signal(signal.SIGTERM, previous_handler)
    if step < cadence.num_steps:
      multihost.log(f"stopped at step {step} after config.steps_per_run="
                f"{cadence.steps_per_run}; run the same command again to continue")
    return result

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    return sharding.named_sharding(self.mesh, "batch", "length")


class Meter:
  """Tokens per second over each log window, and the run's ETA."""

  def __init__(self, start_step: int, num_steps: int):
    self.start_step, self.num_steps, self.tokens = start_step, num_steps, 0
    self.run_start = self.window_start = time.perf_counter()

  def log(self, step: int, m: dict[str, Any]) -> dict[str, Any]:
    """m with train/tokens_per_s of the window ending now; logs the step's line."""
    now = time.perf_counter()
    m["train/tokens_per_s"] = self.tokens / max(now - self.window_start, 1e-9)
    self.window_start, self.tokens = now, 0
    eta = (now - self.run_start) / max(step - self.start_step, 1) * (self.num_steps - step)
    multihost.log(f"step {step}/{self.num_steps}  loss {m['train/loss']:.4f}  nll "
              f"{m['train/nll']:.4f}  ess {m['train/weight_ess']:.2f}  "
              f"{m['train/tokens_per_s']:.0f} tok/s  eta {eta / 60:.1f} min")
    return m

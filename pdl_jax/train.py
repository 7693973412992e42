"""Train and evaluate one run: sharded state, a pure jitted train step, the loop.

Sections follow the data: set-up and mesh, data and token stats, model and sharded
state, the update step, checkpoints and resume, the loop. The pieces live in their
own modules (data, frequency, models, optimizer, checkpoint, evaluate,
metric_writer); this file wires them together.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pdl_jax import checkpoint as ckpt_lib
from pdl_jax import config_checks
from pdl_jax import data as data_lib
from pdl_jax import evaluate as eval_lib
from pdl_jax import frequency
from pdl_jax import lora as lora_lib
from pdl_jax import metric_writer
from pdl_jax import optimizer as opt_lib
from pdl_jax import sharding
from pdl_jax import state as state_lib
from pdl_jax import utils
from pdl_jax.losses import objective
from pdl_jax.losses import pdl as loss_lib
from pdl_jax.losses import registry
from pdl_jax.losses import window as loss_window
from pdl_jax.models import factory as models
from pdl_jax.models import quant
from pdl_jax.models.hf import offline
from pdl_jax.models.hf import weights as hf_weights


# ---------------------------------------------------------------------------
# Mesh.
# ---------------------------------------------------------------------------


def make_mesh(config) -> jax.sharding.Mesh:
  """The config's mesh; checks that every micro-batch divides over data x fsdp."""
  try:
    mesh = sharding.make_mesh(dict(config.mesh))
  except ValueError as e:
    raise ValueError(f"config.mesh={dict(config.mesh)}: {e}") from None
  shards, k = sharding.batch_shards(mesh), config.optimizer.grad_accum_steps
  if config.batch_size % (shards * k):
    raise ValueError(
        f"config.batch_size={config.batch_size} is not divisible by grad_accum_steps={k} x "
        f"the mesh's data x fsdp axes ({mesh.shape['data']} x {mesh.shape['fsdp']}): each "
        "micro-batch is split evenly over them.")
  return mesh


# ---------------------------------------------------------------------------
# Update step: a pure function, jitted with shardings and donated state.
# ---------------------------------------------------------------------------


def accumulate_gradients(params, batch, weights_V, loss_state_V, *, loss_fn,
                         reduction: str, steps: int, rng: jax.Array | None = None
                         ) -> tuple[jax.Array, loss_lib.LossAux, jax.Array, Any]:
  """Loss, LossAux, FACE counts and gradients of the whole batch from `steps`
  micro-batches, one at a time (a scan: one micro-batch's activations live at once).

  Exact, not an average of micro-batch losses: a loss is numerator / denominator
  (PDL: sum of weight x NLL over the sum of weights; CE: over the token count), so
  each micro-batch contributes loss_i x den_i (its numerator) and its gradient, and
  both are divided once by the batch's summed denominator. The denominators do not
  depend on the parameters. Micro-batch i is rows i, i + steps, ... of the batch:
  every device's rows feed every micro-batch, so no data moves between devices.
  FACE's counts advance once per micro-batch (with k=1 once per batch). With `rng`
  (dropout), micro-batch i gets fold_in(rng, i).
  """
  def micro(x):
    return x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)

  def numerator(p, mb, loss_state, i):
    kw = {} if rng is None else {"rng": jax.random.fold_in(rng, i)}
    loss, (aux, loss_state) = loss_fn(p, mb, weights_V, loss_state, **kw)
    den = jax.lax.stop_gradient(loss_lib.loss_denominator(aux, reduction))
    return loss * den, (aux, den, loss_state)

  def body(carry, xs):
    mb, i = xs
    grads, num, den, tokens, nll_sum, w2_sum, loss_state = carry
    (n, (aux, d, loss_state)), g = jax.value_and_grad(numerator, has_aux=True)(
        params, mb, loss_state, i)
    # sum of squared weights from the micro-batch's ESS: ess = (sum w)^2 / sum w^2.
    w2 = jnp.where(aux.ess > 0, jnp.square(aux.weight_sum) / jnp.maximum(aux.ess, 1e-30),
                   0.0)
    grads = jax.tree.map(lambda acc, x: acc + x.astype(jnp.float32), grads, g)
    carry = (grads, num + n, den + d, tokens + aux.num_tokens,
             nll_sum + aux.nll * aux.num_tokens, w2_sum + w2, loss_state)
    return carry, aux.weight_sum

  zero = jnp.zeros((), jnp.float32)
  # float32 sums, whatever the parameter dtype.
  init = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), zero, zero, zero, zero, zero, loss_state_V)
  (grads, num, den, tokens, nll_sum, w2_sum, loss_state_V), weight_sums_K = jax.lax.scan(
      body, init, (jax.tree.map(micro, batch), jnp.arange(steps)))
  safe = jnp.maximum(den, 1e-30)
  grads = jax.tree.map(lambda g, p: (g / safe).astype(p.dtype), grads, params)
  weight_sum = jnp.sum(weight_sums_K)
  aux = loss_lib.LossAux(
      nll=nll_sum / jnp.maximum(tokens, 1.0), weight_sum=weight_sum, num_tokens=tokens,
      ess=jnp.where(w2_sum > 0, jnp.square(weight_sum) / jnp.maximum(w2_sum, 1e-30), 0.0))
  return jnp.where(den > 0, num / safe, 0.0), aux, loss_state_V, grads


def train_step(state: state_lib.TrainState, batch, weights_V, base=None, *, loss_fn, tx,
               skip_nonfinite: bool = False, grad_accum_steps: int = 1,
               reduction: str = "weights", dropout_seed: int | None = None):
  """One optimizer step; returns the new state and scalar metrics.

  LoRA: `base` is the frozen base (pdl_jax.lora.split), state.params the adapters;
  the loss sees their union, and gradients, optimizer state and updates are the
  adapters' alone. dropout_seed (LoRA dropout): the step's dropout key is
  fold_in(key(dropout_seed), step), so a resumed run draws the same masks.

  With grad_accum_steps = k > 1 the batch is processed as k micro-batches
  (`accumulate_gradients`: the same loss and gradients as one batch; `reduction`
  is the loss's, from loss.resolve_reduction). A step with a non-finite loss,
  gradient or update is recorded in the state; with skip_nonfinite its update is
  dropped (params and optimizer state unchanged).
  """
  if base is not None:
    full_loss_fn = loss_fn
    loss_fn = lambda p, *a, **k: full_loss_fn(lora_lib.combine(base, p), *a, **k)
  rng = (None if dropout_seed is None
         else jax.random.fold_in(jax.random.key(dropout_seed), state.step))
  if grad_accum_steps == 1:
    kw = {} if rng is None else {"rng": rng}
    (loss, (aux, loss_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, weights_V, state.loss_state, **kw)
  else:
    loss, aux, loss_state, grads = accumulate_gradients(
        state.params, batch, weights_V, state.loss_state, loss_fn=loss_fn,
        reduction=reduction, steps=grad_accum_steps, rng=rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  # The update too: a diverging learning rate makes finite gradients non-finite params.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
  if skip_nonfinite:
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    loss_state = keep(loss_state, state.loss_state)
  step = state.step + 1
  nonfinite_steps = state.nonfinite_steps + (~finite).astype(jnp.int32)
  first = jnp.where((state.first_nonfinite < 0) & ~finite, step, state.first_nonfinite)
  metrics = {
      "train/loss": loss, "train/nll": aux.nll,
      "train/weight_ess": aux.ess / jnp.maximum(aux.num_tokens, 1.0),
      "train/grad_norm": grad_norm,
      # The rate of the last applied update (unchanged by a skipped step).
      "train/learning_rate": opt_lib.learning_rate(opt_state),
      "train/tokens": aux.num_tokens, "train/nonfinite_steps": nonfinite_steps,
  }
  return state_lib.TrainState(step=step, params=params, opt_state=opt_state,
                    nonfinite_steps=nonfinite_steps, first_nonfinite=first,
                    loss_state=loss_state), metrics


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------


def place_batch(batch: dict[str, np.ndarray], batch_sharding: jax.sharding.Sharding
                ) -> dict[str, jax.Array]:
  """The global batch as arrays in `batch_sharding`, each device given its rows by
  index. Not make_array_from_process_local_data of per-process rows: where a batch
  shard is replicated on devices of several processes (the model axis spans hosts, or
  data x fsdp is smaller than the process count) those processes' rows would differ
  and the replicas would train on different data, without an error."""
  return {k: jax.make_array_from_callback(v.shape, batch_sharding, lambda idx, v=v: v[idx])
          for k, v in batch.items()}


def base_weights_sha256(config) -> str:
  """Checksum of the pretrained base's weight files (of the per-host copy loading
  made when the base is on gs://)."""
  return hf_weights.base_weights_sha256(offline.local_dir(config.model.pretrained))


def provenance(config, fingerprint: dict, base_sha256: str | None = None) -> dict:
  """What a run's results came from, beyond its config (WORKDIR/provenance.json,
  rewritten by each invocation): the code version, and for a pretrained base its
  name and the checksum of its weight files (the same base for every point of a
  comparison)."""
  out = {"code_version": utils.code_version(), "model": fingerprint["model"]}
  if config.model.pretrained is not None:
    out["base"] = config.model.pretrained
    out["base_weights_sha256"] = base_sha256 or base_weights_sha256(config)
  return out


def eval_at_start(config) -> bool:
  """config.eval.at_start, or for None: whether the run finetunes a pretrained model
  (its step-0 eval is the base model's row of every table)."""
  at_start = config.eval.get("at_start")
  return config.model.pretrained is not None if at_start is None else bool(at_start)


def eval_summary(result: dict[str, float]) -> str:
  """One log line of eval scalars, named without their "eval/" prefix (an extra
  decoding's keys keep their own: "top_p/rouge1")."""
  return "  ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in result.items())


@dataclasses.dataclass
class _Loop:
  """The loop of one run and what it needs: steps, logs, checkpoints, evals, SIGTERM."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  state: state_lib.TrainState
  step_fn: Callable[..., Any]
  weights_V: jax.Array
  batches: data_lib.TrainBatches
  evaluator: eval_lib.Evaluator
  writer: metric_writer.MetricsWriter
  mngr: Any
  meta: dict[str, Any]  # the checkpoint's JSON meta besides the step
  base: Any = None  # LoRA: the frozen base, the step's fourth argument

  def save(self, at: int) -> None:
    # orbax waits for the previous save before starting one anyway: waiting here
    # first lets every process agree on whether it failed.
    self.check_saves(block=True)
    try:  # what fails at once (an unwritable folder) gets the same message
      ckpt_lib.save(self.mngr, at, self.state, {"step": at, **self.meta})
    except Exception as e:  # pylint: disable=broad-except
      raise self.save_failed(e) from e

  def save_failed(self, error: Exception | None) -> RuntimeError:
    """The error a run stops with when a checkpoint save failed (None: on another process)."""
    where = utils.path(self.workdir) / "checkpoints"
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
    if utils.any_process(error is not None):
      raise self.save_failed(error) from error

  def check_finite(self) -> None:
    """Stops before a non-finite update can reach a checkpoint (unless skipping)."""
    first = int(utils.to_host(self.state.first_nonfinite))
    if first >= 0 and not self.config.skip_nonfinite_steps:
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
    utils.log(f"eval at step {at} ({time.perf_counter() - t0:.0f} s): "
              + eval_summary(result))
    return result

  def is_eval_step(self, at: int) -> bool:
    return at % self.config.eval_every == 0 or at == self.config.num_steps

  def catch_up_eval(self, step: int) -> dict[str, float]:
    """A run preempted (or killed) at an eval step after its checkpoint but before its
    eval gets that eval now. Process 0's metrics decide for all (evaluating is
    collective: a process reading another file must not take another branch)."""
    logged = metric_writer.eval_at(self.workdir, step)
    if utils.any_process(jax.process_index() == 0 and logged is None):
      return self.evaluate(step)
    return logged or {}

  def run(self) -> dict[str, float]:
    """Steps to num_steps (or steps_per_run more); the last eval metrics."""
    config = self.config
    # SIGTERM (what TPU VM preemption sends): save at the current step, then exit.
    preempted = []
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
      previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
    step = int(utils.to_host(self.state.step))
    result: dict[str, float] = {}
    stop_at = config.num_steps if config.steps_per_run is None else min(
        config.num_steps, step + config.steps_per_run)
    try:
      if (step > 0 and self.is_eval_step(step)) or (step == 0 and eval_at_start(config)):
        result = self.catch_up_eval(step)  # step 0: the base model's row
      meter = _Meter(step, config.num_steps)
      while step < stop_at:
        meter.tokens += self.batches.real_tokens(step)
        batch = place_batch(self.batches.global_batch(step), self.batch_sharding)
        with jax.set_mesh(self.mesh):  # activation constraints resolve against it
          base = () if self.base is None else (self.base,)
          self.state, m = self.step_fn(self.state, batch, self.weights_V, *base)
        step += 1
        # Hosts get SIGTERM at different steps; saving is collective, so with several
        # processes they agree at each log step whether any was told to stop.
        stop = bool(preempted) if jax.process_count() == 1 else (
            step % config.log_every == 0 and utils.any_process(bool(preempted)))
        # A log step's record is written before a preemption save: the resumed run
        # starts after this step and would never write it.
        if step % config.log_every == 0 or step == config.num_steps:
          self.check_saves()
          self.check_finite()
          self.writer.write(step, meter.log(step, jax.tree.map(utils.to_host, m)))
        if stop:
          self.check_finite()
          self.save(step)
          self.check_saves(block=True)
          utils.log(f"SIGTERM: saved a checkpoint at step {step}; run the same command to "
                    "resume")
          raise SystemExit(128 + signal.SIGTERM)
        if step % config.checkpoint_every == 0 or step in (config.num_steps, stop_at):
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
    if step < config.num_steps:
      utils.log(f"stopped at step {step} after config.steps_per_run="
                f"{config.steps_per_run}; run the same command again to continue")
    return result

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    return sharding.named_sharding(self.mesh, "batch", "length")


class _Meter:
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
    utils.log(f"step {step}/{self.num_steps}  loss {m['train/loss']:.4f}  nll "
              f"{m['train/nll']:.4f}  ess {m['train/weight_ess']:.2f}  "
              f"{m['train/tokens_per_s']:.0f} tok/s  eta {eta / 60:.1f} min")
    return m


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs (or resumes) one experiment in `workdir`; returns the last eval metrics of this
  invocation (the final eval once `num_steps` is reached, logged or run now)."""
  # --- Set-up: checks before any long work; a named base model fetched and converted.
  # Each agreed between processes: one that fails (a file only some hosts see) stops
  # them all, rather than leaving the others at the next collective.
  utils.together(config_checks.validate_config, config)
  if config.model.pretrained is not None:
    model_dir = utils.together(offline.local_dir, config.model.pretrained)  # collective
    utils.log(f"pretrained: {config.model.pretrained} in {model_dir}")
  mesh = make_mesh(config)
  utils.check_shared_dir(workdir)  # several processes: one workdir, or a hang later
  if not config.resume:
    ckpt_lib.archive_previous_run(workdir)  # process 0 moves, then a barrier
  utils.log(f"workdir {workdir}; {sharding.mesh_summary(mesh)}")

  # --- Tokenizer, data and token stats (stored once beside the checkpoints).
  tokenizer, train_ex, vocab_size = data_lib.prepare_train(config, workdir)
  stats = frequency.prepare_stats(config, workdir, tokenizer, train_ex, vocab_size)
  eval_ex = data_lib.encode_split(config, tokenizer, data_lib.load_split_texts(
      config, "validation", config.eval.num_examples))
  capacity = objective.window_capacity(config)
  if capacity is not None:  # every target span fits the loss window (clear error if not)
    for name, ex in (("train", train_ex), ("validation", eval_ex)):
      loss_window.check_capacity(ex.loss_positions()[:, 1:], capacity,
                                 name=f"{name} loss mask")
  if config.data.get("packing"):  # several examples per row (evaluation never packs)
    train_ex = data_lib.pack_split(config, tokenizer, train_ex)
  batches = data_lib.TrainBatches(train_ex, config.batch_size, config.seed,
                                  jax.process_index(), jax.process_count())

  # --- Model and sharded state, from the first source of state.py's resume order.
  model = models.make_model(config, stats.vocab_size)
  tx = opt_lib.make_optimizer(config)
  abstract, state_shardings = state_lib.abstract_state(model, tx, mesh, config.seq_len)
  lora = lora_lib.enabled(model.cfg)
  base_abstract, base_shardings = (state_lib.abstract_base(model, mesh, config.seq_len)
                                   if lora else (None, None))
  # Parameters the model has (a quantised base counted as the weights it stands for).
  num_params = (sum(x.size for x in jax.tree.leaves((abstract.params, base_abstract)))
                if model.cfg.base_quant == "none" else
                sum(x.size for x in jax.tree.leaves(hf_weights.abstract_params(
                    dataclasses.replace(model.cfg, base_quant="none")))))
  utils.log(f"model: {config.model.pretrained or config.model.preset} "
            f"({model.cfg.model_type}), {num_params / 1e6:.2f} M parameters, vocabulary "
            f"{model.cfg.vocab_size} (tokenizer {tokenizer.path}, {tokenizer.vocab_size})")
  base_sha256 = None
  if config.model.pretrained is not None and (lora or jax.process_index() == 0):
    base_sha256 = base_weights_sha256(config)  # the fingerprint's (LoRA), provenance's
  if lora:
    lc = config.model.lora
    utils.log(f"LoRA: rank {lc.rank}, alpha {lc.alpha}, targets {tuple(lc.targets)}, "
              f"{lora_lib.count(abstract.params) / 1e6:.3f} M trainable parameters "
              f"({100 * lora_lib.count(abstract.params) / num_params:.2f}%); frozen base "
              f"stored as {lc.base_quant if lc.base_quant != 'none' else model.cfg.param_dtype}"
              f" ({quant.stored_bytes(base_abstract) / 2**20:.0f} MiB)")
  # A LoRA run's checkpoints hold adapters only: the base they adapt is identified by
  # its weights' checksum (a resume or init_from on another base is refused).
  fingerprint = ckpt_lib.fingerprint(config, tokenizer, models.describe(model),
                                     base_sha256=base_sha256 if lora else None)
  meta = {"fingerprint": fingerprint,
          "token_stats_sha256": stats.metadata()["counts_sha256"]}
  if lora:  # the base by name too (outside the fingerprint: a moved base still resumes)
    meta["lora_base"] = config.model.pretrained
  mngr = ckpt_lib.manager(workdir, config.keep_checkpoints)
  state, resumed = state_lib.initial_state(config, model, tx, mesh, abstract,
                                           state_shardings, mngr, fingerprint,
                                           meta["token_stats_sha256"], workdir)
  # config.json once the workdir is known to be this config's (a refused resume
  # leaves the finished run's config.json as it was).
  if jax.process_index() == 0:
    utils.atomic_write_text(utils.path(workdir) / "config.json",
                            config.to_json_best_effort(indent=2))
    utils.atomic_write_text(utils.path(workdir) / "provenance.json", json.dumps(
        provenance(config, fingerprint, base_sha256), indent=2))
  base = None
  if lora:
    base = state_lib.load_base(config.model.pretrained, model, base_shardings)
    utils.log(f"LoRA base: {config.model.pretrained} (frozen)")
  # The weights after the fingerprint: a changed config is reported as a whole first.
  weights_V = utils.replicate(mesh, frequency.prepare_weights(
      config, workdir, stats, resuming=resumed, eos_id=tokenizer.eos_id))
  writer = metric_writer.MetricsWriter(workdir, resumed_step=int(utils.to_host(state.step)))
  utils.sync("metrics")  # process 0 may have dropped a killed run's later records

  # --- Update step and evaluator.
  shards = sharding.batch_shards(mesh)
  rep = sharding.replicated(mesh)
  in_shardings = (state_shardings, sharding.named_sharding(mesh, "batch", "length"), rep)
  step_fn = jax.jit(
      functools.partial(train_step, tx=tx, skip_nonfinite=config.skip_nonfinite_steps,
                        loss_fn=objective.loss_fn_of(config, model, eos_id=tokenizer.eos_id,
                                                     batch_shards=shards),
                        grad_accum_steps=config.optimizer.grad_accum_steps,
                        reduction=registry.resolve_reduction(config.loss.name,
                                                             config.loss.reduction),
                        dropout_seed=(config.seed if lora and model.cfg.lora_dropout > 0
                                      else None)),
      in_shardings=in_shardings + ((base_shardings,) if lora else ()),
      out_shardings=(state_shardings, rep), donate_argnums=(0,))
  evaluator = eval_lib.Evaluator(
      config, workdir, model, tokenizer, eval_ex, stats.counts, weights_V, mesh,
      state_shardings, objective.loss_fn_of(config, model, eos_id=tokenizer.eos_id,
                                            batch_shards=shards, update_loss_state=False),
      base=base, base_shardings=base_shardings)

  # --- The loop: steps, logs, checkpoints, evals.
  return _Loop(config, workdir, mesh, state, step_fn, weights_V, batches, evaluator,
               writer, mngr, meta, base).run()

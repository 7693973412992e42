"""Train and evaluate one run: sharded state, a pure jitted train step, the loop.

Sections follow the data: set-up and mesh, data and token stats, model and sharded
state, the update step, checkpoints and resume, the loop. The pieces live in their
own modules (data, frequency, models, optimizer, checkpoint, evaluate,
metric_writer); this file wires them together.
"""

from __future__ import annotations

import functools
import signal
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from pdl_jax import baselines
from pdl_jax import checkpoint as ckpt_lib
from pdl_jax import chunked_loss
from pdl_jax import config_checks
from pdl_jax import data as data_lib
from pdl_jax import evaluate as eval_lib
from pdl_jax import frequency
from pdl_jax import loss as loss_lib
from pdl_jax import loss_window
from pdl_jax import losses
from pdl_jax import metric_writer
from pdl_jax import optimizer as opt_lib
from pdl_jax.models.hf import weights as hf_weights
from pdl_jax import sharding
from pdl_jax import utils
from pdl_jax.models import decoder
from pdl_jax.models import factory as models


class TrainState(struct.PyTreeNode):
  """Everything a checkpoint restores. nonfinite_steps counts steps whose loss or
  gradient was not finite; first_nonfinite is the first such step (-1: none)."""

  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite_steps: jax.Array
  first_nonfinite: jax.Array
  # FACE's running counts of the model's argmax predictions at target positions
  # (int32 [V]; zeros and unused for the other losses): training state, so a resume
  # continues them exactly.
  face_counts: jax.Array


# ---------------------------------------------------------------------------
# Mesh and sharded state.
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


def _init_boxed(model, tx, seq_len: int, rng):
  """The initial state with Flax-partitioned (boxed) params: the one init function."""
  params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), nonfinite_steps=jnp.zeros((), jnp.int32),
                    first_nonfinite=jnp.full((), -1, jnp.int32),
                    face_counts=jnp.zeros((model.cfg.vocab_size,), jnp.int32))


def abstract_state(model, tx, mesh, seq_len: int) -> tuple[TrainState, Any]:
  """(abstract state, its shardings) without allocating anything: shapes and logical
  axes from jax.eval_shape of the init function, shardings from the axis rules. The
  abstract leaves are jax.ShapeDtypeStruct with their sharding (for AOT lowering
  and restores)."""
  boxed = jax.eval_shape(functools.partial(_init_boxed, model, tx, seq_len),
                         jax.random.key(0))
  shardings = sharding.tree_shardings(mesh, boxed)
  return ckpt_lib.abstract_like(nn.meta.unbox(boxed), shardings), shardings


def state_from_params(params, model, tx, shardings) -> TrainState:
  """A fresh train state (step 0, new optimizer state) around loaded params, built
  in the state's shardings: with init_from / pretrained nothing is initialised and
  thrown away, so peak memory holds one copy of the params."""
  def build(p):
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                      nonfinite_steps=jnp.zeros((), jnp.int32),
                      first_nonfinite=jnp.full((), -1, jnp.int32),
                      face_counts=jnp.zeros((model.cfg.vocab_size,), jnp.int32))
  return jax.jit(build, in_shardings=(shardings.params,), out_shardings=shardings,
                 donate_argnums=(0,))(params)


def create_state(model, tx, mesh, seed: int, seq_len: int):
  """State initialised directly into its shardings (no replicated copy on any
  device first). Returns (state, state_shardings)."""
  _, shardings = abstract_state(model, tx, mesh, seq_len)
  state = jax.jit(lambda r: nn.meta.unbox(_init_boxed(model, tx, seq_len, r)),
                  out_shardings=shardings)(jax.random.key(seed))
  return state, shardings


# ---------------------------------------------------------------------------
# Update step: a pure function, jitted with shardings and donated state.
# ---------------------------------------------------------------------------


def compute_loss(params, batch, weights_V, face_counts_V, *, model, loss_name: str,
                 loss_params: dict[str, Any], chunked: bool, chunk_size: int, eos_id: int,
                 eos_weight: float | None, capacity: int | None = None,
                 update_face_counts: bool = True,
                 chunk_strategy: str = chunked_loss.DEFAULT_STRATEGY,
                 row_chunk_size: int | None = None):
  """(loss, (LossAux, face_counts_V)) of a batch with the config's loss; training and
  evaluation both call this.

  With `capacity`, logits (or the chunked loss) are computed only on a window of that
  many positions per row, starting at the row's first loss position (the target span
  of the prefix-LM; pdl_jax.loss_window): the same loss and gradients, without the
  unembedding of the prompt positions. FACE's weights come from its running prediction
  counts (updated with this batch's argmax first, as its authors do, unless evaluating).
  """
  labels_BxL, mask_BxL = batch["labels"], batch["loss_mask"]
  variables = {"params": params}
  if chunked or capacity is not None:
    hidden_BxLxD, _ = model.apply(variables, batch["inputs"], return_hidden=True)
    if capacity is not None:
      hidden_BxLxD, labels_BxL, mask_BxL = loss_window.gather_window(
          hidden_BxLxD, labels_BxL, mask_BxL, capacity)
    if chunked:
      d = hidden_BxLxD.shape[-1]
      loss, aux = chunked_loss.get_loss_from_hidden(loss_name, **loss_params)(
          hidden_BxLxD.reshape(-1, d),
          decoder.unembed_DxV(model, params).astype(hidden_BxLxD.dtype),
          labels_BxL.reshape(-1), weights_V, mask_N=mask_BxL.reshape(-1),
          chunk_size=chunk_size, strategy=chunk_strategy, row_chunk_size=row_chunk_size)
      return loss, (aux, face_counts_V)
    logits_BxLxV = model.apply(variables, hidden_BxLxD, method=decoder.Decoder.unembed_logits)
  else:
    logits_BxLxV, _ = model.apply(variables, batch["inputs"])
  if loss_name == "face":
    if update_face_counts:
      face_counts_V = baselines.face_count_update(face_counts_V, logits_BxLxV, labels_BxL,
                                                  mask_BxL)
    weights_V = baselines.face_weights(face_counts_V)
    if eos_weight is not None:
      weights_V = loss_lib.fix_token_weight(weights_V, eos_id, eos_weight)
  loss, aux = losses.get_loss(loss_name, **loss_params)(logits_BxLxV, labels_BxL,
                                                          weights_V, mask=mask_BxL)
  return loss, (aux, face_counts_V)


def window_capacity(config) -> int | None:
  """Positions per row the loss window keeps (None: logits at every position). A
  target span is at most max_target_len tokens plus EOS."""
  if not config.loss.window:
    return None
  return loss_window.capacity_for(config.max_target_len, config.seq_len)


def use_chunked_loss(config, vocab_size: int) -> bool:
  """config.loss.chunked, or for None: chunked for vocabularies of 32,000 and more
  (pretrained models), where the [B, L, V] logits dominate memory, if the loss can."""
  if config.loss.chunked is not None:
    return bool(config.loss.chunked)
  return vocab_size >= 32_000 and loss_lib.supports_chunked(config.loss.name)


def chunk_strategy(config, batch_shards: int = 1) -> str:
  """config.loss.chunk_strategy, or for None: "tokens" when the batch is on one
  device, "vocab" when it is split over several (data x fsdp). Why: each row block of
  the tokens strategy adds a [D, V] d unembed term summed over rows that live on
  every device, so a split batch all-reduces the whole [D, V] once per block."""
  if config.loss.chunk_strategy is not None:
    return config.loss.chunk_strategy
  return "tokens" if batch_shards == 1 else "vocab"


def loss_fn_of(config, model, eos_id: int = 1, batch_shards: int = 1, **kwargs):
  """compute_loss with the config's loss settings (batch_shards: how many devices the
  batch is split over, for `chunk_strategy`):
  fn(params, batch, weights_V, face_counts_V) -> (loss, (aux, face_counts_V))."""
  return functools.partial(compute_loss, model=model, loss_name=config.loss.name,
                           loss_params=config_checks.loss_params(config),
                           chunked=use_chunked_loss(config, model.cfg.vocab_size),
                           chunk_size=config.loss.chunk_size,
                           chunk_strategy=chunk_strategy(config, batch_shards),
                           row_chunk_size=config.loss.row_chunk_size, eos_id=eos_id,
                           capacity=window_capacity(config),
                           eos_weight=config.loss.eos_weight, **kwargs)


def accumulate_gradients(params, batch, weights_V, face_counts_V, *, loss_fn,
                         reduction: str, steps: int
                         ) -> tuple[jax.Array, loss_lib.LossAux, jax.Array, Any]:
  """Loss, LossAux, FACE counts and gradients of the whole batch from `steps`
  micro-batches, one at a time (a scan: one micro-batch's activations live at once).

  Exact, not an average of micro-batch losses: a loss is numerator / denominator
  (PDL: sum of weight x NLL over the sum of weights; CE: over the token count), so
  each micro-batch contributes loss_i x den_i (its numerator) and its gradient, and
  both are divided once by the batch's summed denominator. The denominators do not
  depend on the parameters. Micro-batch i is rows i, i + steps, ... of the batch:
  every device's rows feed every micro-batch, so no data moves between devices.
  FACE's counts advance once per micro-batch (with k=1 once per batch).
  """
  def micro(x):
    return x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)

  def numerator(p, mb, face_counts):
    loss, (aux, face_counts) = loss_fn(p, mb, weights_V, face_counts)
    den = jax.lax.stop_gradient(loss_lib.loss_denominator(aux, reduction))
    return loss * den, (aux, den, face_counts)

  def body(carry, mb):
    grads, num, den, tokens, nll_sum, w2_sum, face_counts = carry
    (n, (aux, d, face_counts)), g = jax.value_and_grad(numerator, has_aux=True)(
        params, mb, face_counts)
    # sum of squared weights from the micro-batch's ESS: ess = (sum w)^2 / sum w^2.
    w2 = jnp.where(aux.ess > 0, jnp.square(aux.weight_sum) / jnp.maximum(aux.ess, 1e-30),
                   0.0)
    grads = jax.tree.map(lambda acc, x: acc + x.astype(jnp.float32), grads, g)
    carry = (grads, num + n, den + d, tokens + aux.num_tokens,
             nll_sum + aux.nll * aux.num_tokens, w2_sum + w2, face_counts)
    return carry, aux.weight_sum

  zero = jnp.zeros((), jnp.float32)
  # float32 sums, whatever the parameter dtype.
  init = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), zero, zero, zero, zero, zero, face_counts_V)
  (grads, num, den, tokens, nll_sum, w2_sum, face_counts_V), weight_sums_K = jax.lax.scan(
      body, init, jax.tree.map(micro, batch))
  safe = jnp.maximum(den, 1e-30)
  grads = jax.tree.map(lambda g, p: (g / safe).astype(p.dtype), grads, params)
  weight_sum = jnp.sum(weight_sums_K)
  aux = loss_lib.LossAux(
      nll=nll_sum / jnp.maximum(tokens, 1.0), weight_sum=weight_sum, num_tokens=tokens,
      ess=jnp.where(w2_sum > 0, jnp.square(weight_sum) / jnp.maximum(w2_sum, 1e-30), 0.0))
  return jnp.where(den > 0, num / safe, 0.0), aux, face_counts_V, grads


def train_step(state: TrainState, batch, weights_V, *, loss_fn, tx,
               skip_nonfinite: bool = False, grad_accum_steps: int = 1,
               reduction: str = "weights"):
  """One optimizer step; returns the new state and scalar metrics.

  With grad_accum_steps = k > 1 the batch is processed as k micro-batches
  (`accumulate_gradients`: the same loss and gradients as one batch; `reduction`
  is the loss's, from loss.resolve_reduction). A step with a non-finite loss,
  gradient or update is recorded in the state; with skip_nonfinite its update is
  dropped (params and optimizer state unchanged).
  """
  if grad_accum_steps == 1:
    (loss, (aux, face_counts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, weights_V, state.face_counts)
  else:
    loss, aux, face_counts, grads = accumulate_gradients(
        state.params, batch, weights_V, state.face_counts, loss_fn=loss_fn,
        reduction=reduction, steps=grad_accum_steps)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  # The update too: a diverging learning rate makes finite gradients non-finite params.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
  if skip_nonfinite:
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    face_counts = keep(face_counts, state.face_counts)
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
  return TrainState(step=step, params=params, opt_state=opt_state,
                    nonfinite_steps=nonfinite_steps, first_nonfinite=first,
                    face_counts=face_counts), metrics


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------


def eval_summary(result: dict[str, float]) -> str:
  """One log line of eval scalars, named without their "eval/" prefix (an extra
  decoding's keys keep their own: "top_p/rouge1")."""
  return "  ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in result.items())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs (or resumes) one experiment in `workdir`; returns the last eval metrics of this
  invocation (the final eval once `num_steps` is reached, logged or run now)."""
  # --- Set-up: checks before any long work.
  config_checks.validate_config(config)
  mesh = make_mesh(config)
  root = utils.path(workdir)
  if not config.resume:
    ckpt_lib.archive_previous_run(workdir)  # process 0 moves, then a barrier
  utils.log(f"workdir {workdir}; {sharding.mesh_summary(mesh)}")

  # --- Tokenizer, data and token stats (stored once beside the checkpoints).
  tokenizer, train_ex, vocab_size = data_lib.prepare_train(config, workdir)
  stats = frequency.prepare_stats(config, workdir, tokenizer, train_ex, vocab_size)
  eval_ex = data_lib.encode_split(config, tokenizer, data_lib.load_split_texts(
      config, "validation", config.eval.num_examples))
  capacity = window_capacity(config)
  if capacity is not None:  # every target span fits the loss window (clear error if not)
    for name, ex in (("train", train_ex), ("validation", eval_ex)):
      loss_window.check_capacity(ex.loss_positions()[:, 1:], capacity,
                                 name=f"{name} loss mask")
  batches = data_lib.TrainBatches(train_ex, config.batch_size, config.seed,
                                  jax.process_index(), jax.process_count())

  # --- Model and sharded state.
  model = models.make_model(config, stats.vocab_size)
  tx = opt_lib.make_optimizer(config)
  # The state is allocated once, by whichever of the four sources provides it.
  abstract, state_shardings = abstract_state(model, tx, mesh, config.seq_len)
  num_params = sum(x.size for x in jax.tree.leaves(abstract.params))
  utils.log(f"model: {config.model.pretrained or config.model.preset} "
            f"({model.cfg.model_type}), {num_params / 1e6:.2f} M parameters, vocabulary "
            f"{model.cfg.vocab_size} (tokenizer {tokenizer.path}, {tokenizer.vocab_size})")

  # --- Checkpoints, in the resume order of pdl_jax/checkpoint.py.
  fingerprint = ckpt_lib.fingerprint(config, tokenizer, models.describe(model))
  stats_sha256 = stats.metadata()["counts_sha256"]
  mngr = ckpt_lib.manager(workdir, config.keep_checkpoints)
  restored = ckpt_lib.restore_latest(mngr, abstract, fingerprint, stats_sha256,
                                     f"workdir {workdir}")
  # config.json once the workdir is known to be this config's (a refused resume
  # leaves the finished run's config.json as it was).
  if jax.process_index() == 0:
    utils.atomic_write_text(root / "config.json", config.to_json_best_effort(indent=2))
  if restored is not None:
    state, latest = restored
    utils.log(f"resumed from step {latest}")
  elif config.init_from is not None:
    state = state_from_params(ckpt_lib.load_params(config.init_from, abstract.params),
                              model, tx, state_shardings)
    utils.log(f"initialised params from {config.init_from}")
  elif config.model.pretrained is not None:
    state = state_from_params(hf_weights.load_params(
        config.model.pretrained, model.cfg, state_shardings.params), model, tx,
        state_shardings)
    utils.log(f"initialised params from the pretrained {config.model.pretrained}")
  else:
    state, _ = create_state(model, tx, mesh, config.seed, config.seq_len)
  # The weights after the fingerprint: a changed config is reported as a whole first.
  weights_V = utils.replicate(mesh, frequency.prepare_weights(
      config, workdir, stats, resuming=restored is not None, eos_id=tokenizer.eos_id))
  step = int(utils.to_host(state.step))
  writer = metric_writer.MetricsWriter(workdir, resumed_step=step)
  utils.sync("metrics")  # process 0 may have dropped a killed run's later records

  # --- Update step and evaluator.
  shards = sharding.batch_shards(mesh)
  loss_fn = loss_fn_of(config, model, eos_id=tokenizer.eos_id, batch_shards=shards)
  rep = sharding.replicated(mesh)
  batch_sharding = sharding.named_sharding(mesh, "batch", "length")
  step_fn = jax.jit(
      functools.partial(train_step, loss_fn=loss_fn, tx=tx,
                        skip_nonfinite=config.skip_nonfinite_steps,
                        grad_accum_steps=config.optimizer.grad_accum_steps,
                        reduction=loss_lib.resolve_reduction(config.loss.name,
                                                             config.loss.reduction)),
      in_shardings=(state_shardings, batch_sharding, rep),
      out_shardings=(state_shardings, rep), donate_argnums=(0,))
  evaluator = eval_lib.Evaluator(
      config, workdir, model, tokenizer, eval_ex, stats.counts, weights_V, mesh,
      state_shardings, loss_fn_of(config, model, eos_id=tokenizer.eos_id,
                                  batch_shards=shards, update_face_counts=False))

  def save(at: int) -> None:
    ckpt_lib.save(mngr, at, state, {"step": at, "fingerprint": fingerprint,
                                    "token_stats_sha256": stats_sha256})

  def check_finite() -> None:
    """Stops before a non-finite update can reach a checkpoint (unless skipping)."""
    first = int(utils.to_host(state.first_nonfinite))
    if first >= 0 and not config.skip_nonfinite_steps:
      raise FloatingPointError(
          f"non-finite loss or gradient at step {first}; stopped without saving it (the "
          f"last good checkpoint, step {mngr.latest_step()}, is kept). Lower the "
          "learning rate, clip with loss.max_weight, or set "
          "config.skip_nonfinite_steps=True to skip such steps.")

  def evaluate(at: int) -> dict[str, float]:
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):  # the model's activation constraints resolve against it
      result = evaluator(state, at)
    writer.write(at, result)
    utils.log(f"eval at step {at} ({time.perf_counter() - t0:.0f} s): "
              + eval_summary(result))
    return result

  # SIGTERM (what TPU VM preemption sends): save at the current step, then exit.
  preempted = []
  previous_handler = None
  if threading.current_thread() is threading.main_thread():
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))

  def is_eval_step(at: int) -> bool:
    return at % config.eval_every == 0 or at == config.num_steps

  result: dict[str, float] = {}
  window_start = run_start = time.perf_counter()
  window_tokens, start_step = 0, step
  stop_at = config.num_steps if config.steps_per_run is None else min(
      config.num_steps, step + config.steps_per_run)
  try:
    # A run preempted (or killed) at an eval step after its checkpoint but before its
    # eval gets that eval now. Process 0's metrics decide for all (evaluating is
    # collective: a process reading another file must not take another branch).
    if step > 0 and is_eval_step(step):
      logged = metric_writer.eval_at(workdir, step)
      if utils.any_process(jax.process_index() == 0 and logged is None):
        result = evaluate(step)
      else:
        result = logged or {}
      window_start = run_start = time.perf_counter()
    while step < stop_at:
      local = batches(step)  # the data position is the step
      window_tokens += batches.real_tokens(step)
      batch = {k: jax.make_array_from_process_local_data(batch_sharding, v)
               for k, v in local.items()}
      with jax.set_mesh(mesh):  # the model's activation constraints resolve against it
        state, m = step_fn(state, batch, weights_V)
      step += 1
      # Hosts get SIGTERM at different steps; saving is collective, so with several
      # processes they agree at each log step whether any was told to stop.
      stop = bool(preempted) if jax.process_count() == 1 else (
          step % config.log_every == 0 and utils.any_process(bool(preempted)))
      # A log step's record is written before a preemption save: the resumed run starts
      # after this step and would never write it.
      if step % config.log_every == 0 or step == config.num_steps:
        check_finite()
        m = jax.tree.map(utils.to_host, m)
        now = time.perf_counter()
        m["train/tokens_per_s"] = window_tokens / max(now - window_start, 1e-9)
        window_start, window_tokens = now, 0
        writer.write(step, m)
        eta = (now - run_start) / max(step - start_step, 1) * (config.num_steps - step)
        utils.log(f"step {step}/{config.num_steps}  loss {m['train/loss']:.4f}  nll "
                  f"{m['train/nll']:.4f}  ess {m['train/weight_ess']:.2f}  "
                  f"{m['train/tokens_per_s']:.0f} tok/s  eta {eta / 60:.1f} min")
      if stop:
        check_finite()
        save(step)
        mngr.wait_until_finished()
        utils.log(f"SIGTERM: saved a checkpoint at step {step}; run the same command to "
                  "resume")
        raise SystemExit(128 + signal.SIGTERM)
      if step % config.checkpoint_every == 0 or step in (config.num_steps, stop_at):
        check_finite()
        save(step)
      if is_eval_step(step):
        result = evaluate(step)
  finally:
    mngr.wait_until_finished()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
  if step < config.num_steps:
    utils.log(f"stopped at step {step} after config.steps_per_run={config.steps_per_run}; "
              "run the same command again to continue")
  return result

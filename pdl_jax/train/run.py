"""Train and evaluate one run: the wiring.

Sections follow the data (big_vision's banners): set-up and mesh, data and token
stats, model and sharded state, the update step and the evaluator, the loop. The
pieces live in their own rooms (data/, losses/, models/, eval/, and train/'s step,
loop, state, checkpoint, provenance, optimizer, metric_writer). This file is the one
that reads the config: it hands each part its own settings (the model
`config.model`, the optimizer `config.optimizer`, the loss `config.loss`, the data
pipeline a `DataSettings`, the evaluator an `EvalSettings`, the loop a `Cadence`);
nothing below it takes the whole config but the run fingerprint (provenance), which
records it. Its settings builders (`data_settings`, `make_loss_fn`, `loss_window`,
`eval_settings`, `cadence`, `make_mesh`) are also what the CLIs, the benchmarks and
the tests call to get a part's settings from a config.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

import jax
import ml_collections

from pdl_jax import config_checks
from pdl_jax import multihost
from pdl_jax import paths
from pdl_jax import sharding
from pdl_jax.data import batches as batches_lib
from pdl_jax.data import packing
from pdl_jax.data import pipeline
from pdl_jax.data import tasks as tasks_lib
from pdl_jax.data import token_stats
from pdl_jax.eval import evaluator as evaluator_lib
from pdl_jax.losses import batch_loss
from pdl_jax.losses import registry
from pdl_jax.losses import weights as loss_weights
from pdl_jax.losses import window
from pdl_jax.models import factory
from pdl_jax.models import lora
from pdl_jax.models import quant
from pdl_jax.models.hf import locate
from pdl_jax.models.hf import weights as hf_weights
from pdl_jax.train import checkpoint as ckpt_lib
from pdl_jax.train import loop as loop_lib
from pdl_jax.train import metric_writer
from pdl_jax.train import optimizer as opt_lib
from pdl_jax.train import provenance
from pdl_jax.train import state as state_lib
from pdl_jax.train import step as step_lib
from pdl_jax.train import summary


# ---------------------------------------------------------------------------
# Each part's settings, read from the config once.
# ---------------------------------------------------------------------------


def data_settings(config: ml_collections.ConfigDict) -> pipeline.DataSettings:
  """The data pipeline's settings (a named base resolved to its local folder)."""
  pretrained = config.model.pretrained
  return pipeline.DataSettings(
      task=config.task, dataset=config.dataset, tokenizer=config.tokenizer,
      layout=config.data, seq_len=config.seq_len, max_target_len=config.max_target_len,
      seed=config.seed, pretrained=pretrained, init_from=config.init_from,
      pretrained_dir=None if pretrained is None else locate.local_dir(pretrained))


def eval_at_start(config: ml_collections.ConfigDict) -> bool:
  """config.eval.at_start, or for None: whether the run finetunes a pretrained model
  (its step-0 eval is the base model's row of every table)."""
  at_start = config.eval.get("at_start")
  return config.model.pretrained is not None if at_start is None else bool(at_start)


def cadence(config: ml_collections.ConfigDict) -> loop_lib.Cadence:
  """The loop's settings."""
  return loop_lib.Cadence(
      num_steps=config.num_steps, steps_per_run=config.steps_per_run,
      log_every=config.log_every, eval_every=config.eval_every,
      checkpoint_every=config.checkpoint_every, eval_at_start=eval_at_start(config),
      skip_nonfinite_steps=config.skip_nonfinite_steps)


def eval_settings(config: ml_collections.ConfigDict) -> evaluator_lib.EvalSettings:
  """The evaluator's settings."""
  return evaluator_lib.EvalSettings(
      eval=config.eval, generate=config.task != tasks_lib.PRETRAIN,
      final_step=config.num_steps, seed=config.seed,
      reduction=registry.resolve_reduction(config.loss.name, config.loss.reduction),
      bias_frequency=config.loss.frequency, bias_epsilon=config.loss.epsilon)


def loss_window(config: ml_collections.ConfigDict) -> int | None:
  """Positions per row the loss window keeps (None: loss.window off, logits at every
  position). A target span is at most max_target_len tokens plus EOS; a packed row
  holds several."""
  if not config.loss.window:
    return None
  if config.data.get("packing"):  # several target spans per row
    return packing.packed_capacity(config.max_target_len, config.seq_len)
  return window.capacity_for(config.max_target_len, config.seq_len)


def make_loss_fn(config: ml_collections.ConfigDict, model, *, eos_id: int = 1,
                 batch_shards: int = 1, **kwargs):
  """The loss of a batch (batch_loss.loss_fn_of) with the config's loss settings
  and loss window."""
  return batch_loss.loss_fn_of(config.loss, model, capacity=loss_window(config),
                               eos_id=eos_id, batch_shards=batch_shards, **kwargs)


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """The config's mesh (on `devices`, default all; a TPU slice's for a plan); checks
  that every micro-batch divides over data x fsdp."""
  try:
    mesh = sharding.make_mesh(dict(config.mesh), devices=devices)
  except ValueError as e:
    raise ValueError(f"config.mesh={dict(config.mesh)}: {e}") from None
  shards, k = sharding.batch_shards(mesh), config.optimizer.grad_accum_steps
  if config.batch_size % (shards * k):
    raise ValueError(
        f"config.batch_size={config.batch_size} is not divisible by grad_accum_steps={k} x "
        f"the mesh's data x fsdp axes ({mesh.shape['data']} x {mesh.shape['fsdp']}): each "
        "micro-batch is split evenly over them.")
  return mesh


def make_step_fn(config: ml_collections.ConfigDict, model, tx, mesh: jax.sharding.Mesh,
                 shardings, *, eos_id: int):
  """The jitted train step of the config (state, batch, weights_V) -> (state,
  metrics): the state donated, the batch split over data x fsdp. Also what
  pdl_jax.train.tpu_targets compiles for a TPU slice."""
  shards, rep = sharding.batch_shards(mesh), sharding.replicated(mesh)
  return jax.jit(
      functools.partial(
          step_lib.train_step, tx=tx, skip_nonfinite=config.skip_nonfinite_steps,
          loss_fn=make_loss_fn(config, model, eos_id=eos_id, batch_shards=shards),
          grad_accum_steps=config.optimizer.grad_accum_steps,
          reduction=registry.resolve_reduction(config.loss.name, config.loss.reduction),
          dropout_seed=config.seed if model.cfg.lora_dropout > 0 else None),
      in_shardings=(shardings, sharding.named_sharding(mesh, "batch", "length"), rep),
      out_shardings=(shardings, rep), donate_argnums=(0,))


# ---------------------------------------------------------------------------
# The run, section by section.
# ---------------------------------------------------------------------------


def _set_up(config: ml_collections.ConfigDict, workdir: str) -> jax.sharding.Mesh:
  """Checks before any long work, a named base fetched and converted, the mesh, the
  workdir. Each agreed between processes: one that fails (a file only some hosts
  see) stops them all, rather than leaving the others at the next collective."""
  multihost.together(config_checks.validate_config, config)
  if config.model.pretrained is not None:
    model_dir = multihost.together(locate.local_dir, config.model.pretrained)
    multihost.log(f"pretrained: {config.model.pretrained} in {model_dir}")
  mesh = make_mesh(config)
  multihost.check_shared_dir(workdir)  # several processes: one workdir, or a hang later
  if not config.resume:
    ckpt_lib.archive_previous_run(workdir)  # process 0 moves, then a barrier
  multihost.log(f"workdir {workdir}; {sharding.mesh_summary(mesh)}")
  return mesh


def _data(config: ml_collections.ConfigDict, workdir: str):
  """(tokenizer, train batches, validation examples, token stats): the tokenizer,
  the encoded splits, and the counts stored once beside the checkpoints."""
  data = data_settings(config)
  tokenizer, train_ex, vocab_size = pipeline.prepare_train(data, workdir)
  stats = token_stats.prepare_stats(data, workdir, tokenizer, train_ex, vocab_size)
  eval_ex = pipeline.load_split(data, tokenizer, config.eval.get("split", "validation"),
                                config.eval.num_examples)
  capacity = loss_window(config)
  if capacity is not None:  # every target span fits the loss window (clear error if not)
    for name, ex in (("train", train_ex), (config.eval.get("split", "validation"), eval_ex)):
      window.check_capacity(ex.loss_positions()[:, 1:], capacity, name=f"{name} loss mask")
  if config.data.get("packing"):  # several examples per row (evaluation never packs)
    train_ex = pipeline.pack_split(data, tokenizer, train_ex)
  batches = batches_lib.TrainBatches(train_ex, config.batch_size, config.seed,
                                     jax.process_index(), jax.process_count())
  return tokenizer, batches, eval_ex, stats


def _log_model(config: ml_collections.ConfigDict, model, abstract: state_lib.TrainState,
               tokenizer) -> None:
  """The model's size (a quantised base counted as the weights it stands for), and
  with LoRA what trains and how the frozen base is stored."""
  cfg = model.cfg
  num_params = (sum(x.size for x in jax.tree.leaves((abstract.params, abstract.frozen)))
                if cfg.base_quant == "none" else
                sum(x.size for x in jax.tree.leaves(hf_weights.abstract_params(
                    dataclasses.replace(cfg, base_quant="none")))))
  multihost.log(f"model: {config.model.pretrained or config.model.preset} "
                f"({cfg.model_type}), {num_params / 1e6:.2f} M parameters, vocabulary "
                f"{cfg.vocab_size} (tokenizer {tokenizer.path}, {tokenizer.vocab_size})")
  if lora.enabled(cfg):
    lc, trained = config.model.lora, lora.count(abstract.params)
    multihost.log(
        f"LoRA: rank {lc.rank}, alpha {lc.alpha}, targets {tuple(lc.targets)}, "
        f"{trained / 1e6:.3f} M trainable parameters ({100 * trained / num_params:.2f}%); "
        f"frozen base stored as {lc.base_quant if lc.base_quant != 'none' else cfg.param_dtype}"
        f" ({quant.stored_bytes(abstract.frozen) / 2**20:.0f} MiB)")


def _state(config: ml_collections.ConfigDict, workdir: str, model, tx, mesh, tokenizer,
           stats: token_stats.TokenStats):
  """(state, its shardings, resumed, checkpoint manager, checkpoint meta), from the
  first source of state.py's resume order, after the fingerprint check; writes
  config.json and provenance.json once the workdir is known to be this config's."""
  abstract, shardings = state_lib.abstract_state(model, tx, mesh, config.seq_len)
  _log_model(config, model, abstract, tokenizer)
  is_lora = lora.enabled(model.cfg)
  base_sha256 = None
  if config.model.pretrained is not None and (is_lora or jax.process_index() == 0):
    base_sha256 = provenance.base_checksum(config.model.pretrained)
  # A LoRA run's checkpoints hold adapters only: the base they adapt is identified by
  # its weights' checksum (a resume or init_from on another base is refused).
  fingerprint = provenance.fingerprint(config, tokenizer, factory.describe(model),
                                       base_sha256=base_sha256 if is_lora else None)
  meta = {"fingerprint": fingerprint,
          "token_stats_sha256": stats.metadata()["counts_sha256"]}
  if is_lora:  # the base by name too (outside the fingerprint: a moved base still resumes)
    meta["lora_base"] = config.model.pretrained
  mngr = ckpt_lib.manager(workdir, config.keep_checkpoints)
  sources = state_lib.Sources(
      mngr=mngr, where=f"workdir {workdir}", fingerprint=fingerprint,
      stats_sha256=meta["token_stats_sha256"], init_from=config.init_from,
      pretrained=config.model.pretrained, seed=config.seed)
  state, resumed = state_lib.initial_state(sources, model, tx, mesh, abstract, shardings,
                                           config.seq_len)
  # config.json once the workdir is known to be this config's (a refused resume
  # leaves the finished run's config.json as it was).
  if jax.process_index() == 0:
    paths.atomic_write_text(paths.path(workdir) / "config.json",
                            config.to_json_best_effort(indent=2))
    paths.atomic_write_text(paths.path(workdir) / "provenance.json", json.dumps(
        provenance.record(config.model.pretrained, fingerprint, base_sha256), indent=2))
  return state, shardings, resumed, mngr, meta


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs (or resumes) one experiment in `workdir`; returns the last eval metrics of this
  invocation (the final eval once `num_steps` is reached, logged or run now)."""
  start = time.perf_counter()
  # --- Set-up: checks before any long work; a named base model fetched and converted.
  mesh = _set_up(config, workdir)

  # --- Tokenizer, data and token stats (stored once beside the checkpoints).
  tokenizer, batches, eval_ex, stats = _data(config, workdir)

  # --- Model and sharded state, from the first source of state.py's resume order.
  model = factory.make_model(config.model, stats.vocab_size)
  tx = opt_lib.make_optimizer(config.optimizer, config.num_steps)
  state, shardings, resumed, mngr, meta = _state(config, workdir, model, tx, mesh,
                                                 tokenizer, stats)
  # The weights after the fingerprint: a changed config is reported as a whole first.
  weights_V = multihost.replicate(mesh, loss_weights.prepare_weights(
      config.loss, workdir, stats, resuming=resumed, eos_id=tokenizer.eos_id))
  writer = metric_writer.MetricsWriter(workdir,
                                       resumed_step=int(multihost.to_host(state.step)))
  multihost.sync("metrics")  # process 0 may have dropped a killed run's later records

  # --- Update step and evaluator.
  shards = sharding.batch_shards(mesh)
  step_fn = make_step_fn(config, model, tx, mesh, shardings, eos_id=tokenizer.eos_id)
  evaluator = evaluator_lib.Evaluator(
      eval_settings(config), workdir, model, tokenizer, eval_ex, stats.counts, weights_V,
      mesh, shardings, make_loss_fn(config, model, eos_id=tokenizer.eos_id,
                                    batch_shards=shards, update_loss_state=False))

  # --- The loop: steps, logs, checkpoints, evals; a summary once the run is done.
  result = loop_lib.Loop(cadence(config), workdir, mesh, state, step_fn, weights_V, batches,
                         evaluator, writer, mngr, meta).run()
  if jax.process_index() == 0 and metric_writer.eval_at(workdir, config.num_steps):
    print(summary.closing_summary(workdir, config.num_steps, time.perf_counter() - start),
          flush=True)
  return result

"""Train and evaluate: sharded state, pure jitted train step, checkpoints, evals.

Sections follow the data: workdir, mesh, tokenizer, data, token stats, model and
sharded state, checkpoints, update step, evaluation, loop.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct

from pdl_jax import chunked_loss
from pdl_jax import decode as decode_lib
from pdl_jax import frequency
from pdl_jax import input_pipeline as ip
from pdl_jax import loss as loss_lib
from pdl_jax import metrics as metrics_lib
from pdl_jax import model as model_lib
from pdl_jax import sharding
from pdl_jax import tasks as tasks_lib
from pdl_jax import tokenizer as tok_lib

PRETRAIN = "pretrain"


def log(line: str) -> None:
  if jax.process_index() == 0:
    print(line, file=sys.stderr, flush=True)


class TrainState(struct.PyTreeNode):
  """Everything a checkpoint restores. nonfinite_steps counts steps whose loss or
  gradient was not finite; first_nonfinite is the first such step (-1: none)."""

  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite_steps: jax.Array
  first_nonfinite: jax.Array


# ---------------------------------------------------------------------------
# Config checks (before any work).
# ---------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad key and what is allowed."""
  allowed_tasks = sorted(tasks_lib.TASKS) + [PRETRAIN]
  if config.task not in allowed_tasks:
    raise ValueError(f"config.task={config.task!r}; expected one of {allowed_tasks}.")
  if config.task != PRETRAIN:
    tasks_lib.get_dataset(config.task, config.dataset.name)
  if config.loss.name not in ("ce", "pdl"):
    raise ValueError(f"config.loss.name={config.loss.name!r}; expected 'ce' or 'pdl'.")
  if not config.loss.alpha >= 0:
    raise ValueError(f"config.loss.alpha={config.loss.alpha}; expected >= 0.")
  if config.loss.epsilon is not None and not config.loss.epsilon > 0:
    raise ValueError(f"config.loss.epsilon={config.loss.epsilon}; expected > 0 or None.")
  if config.loss.frequency not in loss_lib.FREQUENCY_KINDS:
    raise ValueError(f"config.loss.frequency={config.loss.frequency!r}; expected one of "
                     f"{loss_lib.FREQUENCY_KINDS}.")
  if config.model.preset not in model_lib.PRESETS:
    raise ValueError(f"config.model.preset={config.model.preset!r}; expected one of "
                     f"{sorted(model_lib.PRESETS)}.")
  if config.model.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.model.dtype={config.model.dtype!r}; expected 'float32' or "
                     "'bfloat16'.")
  if config.eval.decode not in decode_lib.METHODS:
    raise ValueError(f"config.eval.decode={config.eval.decode!r}; expected one of "
                     f"{decode_lib.METHODS}.")
  if config.seq_len < 4:
    raise ValueError(f"config.seq_len={config.seq_len}; expected >= 4 (a prompt token, "
                     "the separator, a target token and EOS).")
  for key in ("batch_size", "num_steps", "log_every", "eval_every", "checkpoint_every",
              "max_target_len"):
    if config[key] < 1:
      raise ValueError(f"config.{key}={config[key]}; expected >= 1.")
  if config.tokenizer.path is not None and not os.path.isfile(config.tokenizer.path):
    raise ValueError(f"config.tokenizer.path={config.tokenizer.path!r} does not exist; "
                     "give an existing SentencePiece .model or None to train one.")
  if config.init_from is not None and not os.path.isdir(
      os.path.join(config.init_from, "checkpoints")):
    raise ValueError(f"config.init_from={config.init_from!r} has no checkpoints/ folder; "
                     "expected the workdir of a finished run.")


def make_mesh(config) -> jax.sharding.Mesh:
  """The config's mesh; checks the batch divides over the data axis."""
  try:
    mesh = sharding.make_mesh(dict(config.mesh))
  except ValueError as e:
    raise ValueError(f"config.mesh={dict(config.mesh)}: {e}") from None
  data = mesh.shape["data"]
  if config.batch_size % data:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the mesh's "
                     f"data axis ({data}).")
  return mesh


# ---------------------------------------------------------------------------
# Tokenizer and data.
# ---------------------------------------------------------------------------


def load_split_texts(config, split: str, limit=None):
  """(prompts, targets) of a split; for pretraining, whole documents as targets."""
  # Every process reads the whole (small, offline) split and takes its rows of each
  # global batch (input_pipeline.TrainBatches); the frequency pass counts a shard.
  kwargs = dict(data_dir=config.dataset.data_dir, limit=limit, log=log)
  if config.task != PRETRAIN:
    spec = tasks_lib.get_dataset(config.task, config.dataset.name)
    return ip.load_texts(spec, split, **kwargs)
  prompts, targets = [], []
  for task in sorted(tasks_lib.DEFAULT_DATASET):
    spec = tasks_lib.get_dataset(task)
    raw = dataclasses.replace(spec, prompt="{inputs}")
    p, t = ip.load_texts(raw, split, **kwargs)
    prompts.extend([""] * len(p))
    targets.extend(f"{a}\n{b}" for a, b in zip(p, t))
  return prompts, targets


def get_tokenizer(config, workdir: str, train_texts) -> tok_lib.Tokenizer:
  """The configured tokenizer, init_from's, or one trained once in the workdir."""
  path = config.tokenizer.path
  if path is None and config.init_from is not None:
    path = os.path.join(config.init_from, "tokenizer.model")
  if path is not None:
    return tok_lib.Tokenizer.load(path)
  path = os.path.join(workdir, "tokenizer.model")
  if jax.process_index() == 0:  # one process trains; the others wait, then load it
    if not os.path.exists(path):
      log(f"tokenizer: training a {config.tokenizer.vocab_size}-piece unigram model")
    texts = (t for pair in zip(*train_texts()) for t in pair if t)
    tok_lib.load_or_train(path, texts, config.tokenizer.vocab_size, seed=config.seed,
                          max_sentences=config.tokenizer.train_sentences)
  sync("tokenizer")
  return tok_lib.Tokenizer.load(path)


def sync(name: str) -> None:
  """Barrier across processes (a no-op on one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def to_host(x) -> np.ndarray:
  """A (replicated) array as numpy on this process, also when it spans processes."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(jax.device_get(x))


def replicate(mesh, tree):
  """Host values (the same on every process) as replicated global arrays."""
  rep = sharding.replicated(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(rep, np.asarray(x)),
                      tree)


# ---------------------------------------------------------------------------
# Model, optimizer and the sharded train state.
# ---------------------------------------------------------------------------


def make_model(config, vocab_size: int) -> model_lib.Transformer:
  cfg = model_lib.model_config(config.model.preset, vocab_size,
                               max_len=config.seq_len, dtype=config.model.dtype,
                               tied_embeddings=config.model.tied_embeddings)
  return model_lib.Transformer(cfg)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  o = config.optimizer
  warmup = min(o.warmup_steps, config.num_steps - 1)  # short runs still decay
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, o.learning_rate, warmup, max(config.num_steps, warmup + 1),
      end_value=o.learning_rate * o.end_fraction)
  tx = optax.chain(optax.clip_by_global_norm(o.grad_clip),
                   optax.adamw(schedule, b2=o.b2, weight_decay=o.weight_decay))
  return tx, schedule


def create_state(model, tx, mesh, seed: int, seq_len: int):
  """State initialised directly into its shardings (shapes from jax.eval_shape).

  Returns (state, state_shardings).
  """
  def new_state(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), nonfinite_steps=jnp.zeros((), jnp.int32),
                      first_nonfinite=jnp.full((), -1, jnp.int32))

  def init_boxed(rng):
    return new_state(model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"])

  abstract = jax.eval_shape(init_boxed, jax.random.key(seed))
  specs = nn.get_partition_spec(abstract)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, sharding.LOGICAL_AXIS_RULES)

  def init(rng):
    return new_state(nn.meta.unbox(model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]))

  state = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
  return state, shardings


# ---------------------------------------------------------------------------
# Update step: a pure function, jitted with shardings and donated state.
# ---------------------------------------------------------------------------


def compute_loss(params, batch, weights_V, *, model, loss_name: str, chunked: bool,
                 chunk_size: int):
  """(loss, LossAux) of a batch; `loss_name` picks CE or PDL."""
  labels_BxL, mask_BxL = batch["labels"], batch["loss_mask"]
  if chunked:
    hidden_BxLxD, _ = model.apply({"params": params}, batch["inputs"], return_hidden=True)
    unembed_DxV = model.apply({"params": params}, method=model_lib.Transformer.unembed_matrix)
    d = hidden_BxLxD.shape[-1]
    return chunked_loss.pdl_loss_from_hidden_and_aux(
        hidden_BxLxD.reshape(-1, d), unembed_DxV.astype(hidden_BxLxD.dtype),
        labels_BxL.reshape(-1), weights_V if loss_name == "pdl" else None,
        mask_N=mask_BxL.reshape(-1), chunk_size=chunk_size)
  logits_BxLxV, _ = model.apply({"params": params}, batch["inputs"])
  return loss_lib.get_loss(loss_name)(logits_BxLxV, labels_BxL, weights_V, mask=mask_BxL)


def train_step(state: TrainState, batch, weights_V, *, model, tx, schedule, loss_name,
               chunked, chunk_size, skip_nonfinite: bool = False):
  """One optimizer step; returns the new state and scalar metrics.

  A step with a non-finite loss, gradient or update is recorded in the state; with
  skip_nonfinite its update is dropped (params and optimizer state unchanged).
  """
  loss_fn = functools.partial(compute_loss, model=model, loss_name=loss_name,
                              chunked=chunked, chunk_size=chunk_size)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, batch, weights_V)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  # The update too: a diverging learning rate makes finite gradients non-finite params.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
  if skip_nonfinite:
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
  step = state.step + 1
  nonfinite_steps = state.nonfinite_steps + (~finite).astype(jnp.int32)
  first = jnp.where((state.first_nonfinite < 0) & ~finite, step, state.first_nonfinite)
  metrics = {
      "train/loss": loss, "train/nll": aux.nll,
      "train/weight_ess": aux.ess / jnp.maximum(aux.num_tokens, 1.0),
      "train/grad_norm": grad_norm, "train/learning_rate": schedule(state.step),
      "train/tokens": aux.num_tokens, "train/nonfinite_steps": nonfinite_steps,
  }
  return TrainState(step=step, params=params, opt_state=opt_state,
                    nonfinite_steps=nonfinite_steps, first_nonfinite=first), metrics


def eval_step(params, batch, weights_V, *, model):
  """Sums over a batch: target tokens, their NLL, and PDL numerator/denominator."""
  logits_BxLxV, _ = model.apply({"params": params}, batch["inputs"])
  mask_BxL, safe = loss_lib.effective_mask(batch["labels"], logits_BxLxV.shape[-1],
                                           batch["loss_mask"])
  nll_BxL = loss_lib.token_nll(logits_BxLxV, safe)
  w_BxL = mask_BxL * weights_V[safe]
  return {"tokens": mask_BxL.sum(), "nll_sum": (mask_BxL * nll_BxL).sum(),
          "w_sum": w_BxL.sum(), "wnll_sum": (w_BxL * nll_BxL).sum()}


# ---------------------------------------------------------------------------
# Checkpoints: state + JSON meta per step; token stats once in the folder.
# ---------------------------------------------------------------------------


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
      item_names=("state", "meta"))


def abstract_like(state, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def run_fingerprint(config, tokenizer, model) -> dict[str, Any]:
  """What a workdir's checkpoints must agree with to be resumed by this config."""
  return {"tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
          "tokenizer_requested": [config.tokenizer.path, config.tokenizer.vocab_size],
          "model": dataclasses.asdict(model.cfg), "task": config.task,
          "loss": config.loss.name, "alpha": float(config.loss.alpha),
          "dataset": config.dataset.name}


RUN_OUTPUTS = ("config.json", "checkpoints", "metrics.jsonl", "tokenizer.model", "samples",
               "tensorboard")


def archive_previous_run(workdir: str) -> None:
  """Moves an earlier run's outputs into WORKDIR/previous-<time>/ (config.resume=False
  starts afresh without deleting anything)."""
  present = [n for n in RUN_OUTPUTS if os.path.exists(os.path.join(workdir, n))]
  if not present or jax.process_index() != 0:
    return
  target = os.path.join(workdir, time.strftime("previous-%Y%m%d-%H%M%S"))
  os.makedirs(target)
  for name in present:
    os.replace(os.path.join(workdir, name), os.path.join(target, name))
  log(f"config.resume=False: moved the earlier run's {present} to {target}")


def check_fingerprint(stored: dict, current: dict, where: str) -> None:
  diffs = {k: (stored.get(k), v) for k, v in current.items() if stored.get(k) != v}
  if diffs:
    detail = "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in diffs.items())
    raise ValueError(f"{where} was written by a different config ({detail}); use a new "
                     "--workdir or --config.resume=False.")


# ---------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------


class Evaluator:
  """Eval loss and generation metrics on a fixed validation subset."""

  def __init__(self, config, workdir, model, tokenizer, examples: ip.Examples,
               counts_V, weights_V, mesh, param_shardings):
    self.config, self.workdir, self.model, self.tok = config, workdir, model, tokenizer
    self.examples, self.counts_V, self.weights_V = examples, counts_V, weights_V
    self.mesh = mesh
    rep = sharding.replicated(mesh)
    self.loss_fn = jax.jit(functools.partial(eval_step, model=model),
                           in_shardings=(param_shardings, rep, rep), out_shardings=rep)
    prompts = [examples.seqs[i, :examples.target_start[i]].tolist()
               for i in range(len(examples))]
    self.prompt_len = max(len(p) for p in prompts)
    self.prompts = prompts
    self.ref_ids = tokenizer.encode_batch(examples.targets)
    self.unigram_nll = _unigram_nll(examples, counts_V, config.eval.batch_size)
    self.banned = tuple(sorted({tokenizer.pad_id, tokenizer.bos_id, tokenizer.sep_id,
                                tokenizer.unk_id} - {tokenizer.eos_id, -1}))

  def __call__(self, params, step: int) -> dict[str, float]:
    c = self.config
    sums = None
    for batch in ip.eval_batches(self.examples, c.eval.batch_size):
      out = self.loss_fn(params, replicate(self.mesh, {
          k: v for k, v in batch.items() if k != "example_mask"}), self.weights_V)
      out = jax.tree.map(to_host, out)
      sums = out if sums is None else jax.tree.map(np.add, sums, out)
    result = {"eval/nll": float(sums["nll_sum"] / max(sums["tokens"], 1)),
              "eval/pdl_loss": float(sums["wnll_sum"] / max(sums["w_sum"], 1e-30)),
              "eval/unigram_nll": self.unigram_nll}
    if c.task == PRETRAIN:
      return result
    hyp_ids = []
    rng = jax.random.key(c.seed + 1)
    for start in range(0, len(self.prompts), c.eval.batch_size):
      chunk = self.prompts[start:start + c.eval.batch_size]
      padded = chunk + [chunk[-1]] * (c.eval.batch_size - len(chunk))
      tokens, mask = decode_lib.left_pad(padded, self.prompt_len, self.tok.pad_id)
      tokens, mask = replicate(self.mesh, (tokens, mask))
      out = decode_lib.decode(self.model, params, tokens, mask,
                              jax.random.fold_in(rng, start), method=c.eval.decode,
                              max_new_tokens=c.eval.max_new_tokens,
                              eos_id=self.tok.eos_id, pad_id=self.tok.pad_id,
                              beam_size=c.eval.beam_size, top_p=c.eval.top_p,
                              temperature=c.eval.temperature, banned_ids=self.banned)
      hyp_ids.extend(decode_lib.strip_after_eos(to_host(out), self.tok.eos_id,
                                                self.tok.pad_id)[:len(chunk)])
    hyps = self.tok.decode_batch(hyp_ids)
    gen = metrics_lib.generation_metrics(hyps, self.examples.targets, hyp_ids, self.ref_ids,
                                         self.counts_V)
    # Share of tokens per train-frequency decile (0 = most frequent), for the plots
    # of what each alpha generates against the references.
    for prefix, ids in (("freq_bucket", hyp_ids), ("ref_freq_bucket", self.ref_ids)):
      for k, share in enumerate(metrics_lib.frequency_buckets(ids, self.counts_V)):
        gen[f"{prefix}_{k}"] = share
    result.update({f"eval/{k}": float(v) for k, v in gen.items()})
    self._write_samples(step, hyps)
    return result

  def _write_samples(self, step: int, hyps: list[str]) -> None:
    if jax.process_index() != 0:
      return
    folder = os.path.join(self.workdir, "samples")
    os.makedirs(folder, exist_ok=True)
    lines = [json.dumps({"input": p, "reference": r, "generation": h})
             for p, r, h in zip(self.examples.prompts, self.examples.targets,
                                hyps[:self.config.eval.num_samples])]
    path = os.path.join(folder, f"step_{step:07d}.jsonl")
    tok_lib.atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def _unigram_nll(examples: ip.Examples, counts_V: np.ndarray, batch_size: int) -> float:
  """NLL (nats/token) of the eval targets under the add-one smoothed train unigram
  distribution: the bar a model must clear to have learned more than frequencies."""
  logp_V = np.log((counts_V + 1.0) / (counts_V.sum() + len(counts_V)))
  total, n = 0.0, 0.0
  for batch in ip.eval_batches(examples, batch_size):
    m = batch["loss_mask"] > 0
    total -= logp_V[batch["labels"][m]].sum()
    n += m.sum()
  return float(total / max(n, 1))


# ---------------------------------------------------------------------------
# Metrics output: metrics.jsonl + TensorBoard (process 0 only).
# ---------------------------------------------------------------------------


class MetricsWriter:
  """Appends {"step": s, name: value, ...} lines to metrics.jsonl and TensorBoard."""

  def __init__(self, workdir: str):
    from clu import metric_writers

    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")) \
        if self.enabled else None

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}})
              + "\n")
    self.tb.write_scalars(int(step), scalars)
    self.tb.flush()

  def truncate_after(self, step: int) -> None:
    """Drops lines past `step` (from a run killed after its last checkpoint)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      keep = [l for l in f if l.strip() and json.loads(l)["step"] <= step]
    tok_lib.atomic_write_bytes(self.path, "".join(keep).encode())


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs (or resumes) one experiment in `workdir`; returns the final eval metrics."""
  # --- Set-up: checks before any long work, config.json.
  validate_config(config)
  mesh = make_mesh(config)
  os.makedirs(workdir, exist_ok=True)
  if not config.resume:
    archive_previous_run(workdir)
  if jax.process_index() == 0:
    tok_lib.atomic_write_bytes(os.path.join(workdir, "config.json"),
                               config.to_json_best_effort(indent=2).encode())
  log(f"workdir {workdir}; {sharding.mesh_summary(mesh)}")

  # --- Tokenizer, data, token stats (stored once beside the checkpoints) and weights.
  tokenizer, train_ex, stats = prepare_data(config, workdir)
  eval_ex = ip.encode_examples(
      *load_split_texts(config, "validation", config.eval.num_examples), tokenizer,
      seq_len=config.seq_len, max_target_len=config.max_target_len)
  batches = ip.TrainBatches(train_ex, config.batch_size, config.seed,
                            jax.process_index(), jax.process_count())
  weights_V = replicate(mesh, loss_weights(config, stats))

  # --- Model and sharded state.
  model = make_model(config, tokenizer.vocab_size)
  tx, schedule = make_optimizer(config)
  state, state_shardings = create_state(model, tx, mesh, config.seed, config.seq_len)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  log(f"model: {config.model.preset}, {num_params / 1e6:.2f} M parameters")

  # --- Checkpoints. Resume order: this workdir's latest checkpoint (unless
  # config.resume=False) > config.init_from's latest params (params only; fresh
  # optimizer, step 0) > fresh initialisation.
  fingerprint = run_fingerprint(config, tokenizer, model)
  mngr = checkpoint_manager(workdir, config.keep_checkpoints)
  writer = MetricsWriter(workdir)
  latest = mngr.latest_step()
  if latest is not None:
    # The meta first: a checkpoint of another model shape cannot even be restored.
    meta = mngr.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    check_fingerprint(meta["fingerprint"], fingerprint,
                      f"workdir {workdir} (checkpoint {latest})")
    state = mngr.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_like(state, state_shardings)))).state
    writer.truncate_after(latest)
    log(f"resumed from step {latest}")
  elif config.init_from is not None:
    state = state.replace(params=load_params(config.init_from, state.params,
                                             state_shardings.params))
    log(f"initialised params from {config.init_from}")

  # --- Update step.
  rep = sharding.replicated(mesh)
  batch_sharding = sharding.named_sharding(mesh, "batch", "length")
  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                        loss_name=config.loss.name, chunked=config.loss.chunked,
                        chunk_size=config.loss.chunk_size,
                        skip_nonfinite=config.skip_nonfinite_steps),
      in_shardings=(state_shardings, batch_sharding, rep),
      out_shardings=(state_shardings, rep), donate_argnums=(0,))
  evaluator = Evaluator(config, workdir, model, tokenizer, eval_ex, stats.counts,
                        weights_V, mesh, state_shardings.params)

  def save(step: int) -> None:
    meta = {"step": step, "data_position": step, "fingerprint": fingerprint,
            "token_stats_sha256": stats.metadata()["counts_sha256"]}
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(meta)), force=True)

  def check_finite() -> None:
    """Stops before a non-finite update can reach a checkpoint (unless skipping)."""
    first = int(to_host(state.first_nonfinite))
    if first >= 0 and not config.skip_nonfinite_steps:
      raise FloatingPointError(
          f"non-finite loss or gradient at step {first}; stopped without saving it (the "
          f"last good checkpoint, step {mngr.latest_step()}, is kept). Lower the "
          "learning rate, clip with loss.max_weight, or set "
          "config.skip_nonfinite_steps=True to skip such steps.")

  # SIGTERM (what TPU VM preemption sends): save at the current step, then exit.
  preempted = []
  previous_handler = None
  if threading.current_thread() is threading.main_thread():
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))

  # --- Loop.
  step = int(to_host(state.step))
  result: dict[str, float] = {}
  window_start = run_start = time.perf_counter()
  start_step = step
  stop_at = config.num_steps if config.steps_per_run is None else min(
      config.num_steps, step + config.steps_per_run)
  try:
    while step < stop_at:
      local = batches(step)  # the data position is the step
      batch = {k: jax.make_array_from_process_local_data(batch_sharding, v)
               for k, v in local.items()}
      state, m = step_fn(state, batch, weights_V)
      step += 1
      if preempted:
        check_finite()
        save(step)
        mngr.wait_until_finished()
        log(f"SIGTERM: saved a checkpoint at step {step}; run the same command to resume")
        raise SystemExit(128 + signal.SIGTERM)
      if step % config.log_every == 0 or step == config.num_steps:
        check_finite()
        m = jax.tree.map(to_host, m)
        now = time.perf_counter()
        window_tokens = config.batch_size * config.seq_len * config.log_every
        m["train/tokens_per_s"] = window_tokens / max(now - window_start, 1e-9)
        window_start = now
        writer.write(step, m)
        eta = (now - run_start) / max(step - start_step, 1) * (config.num_steps - step)
        log(f"step {step}/{config.num_steps}  loss {m['train/loss']:.4f}  nll "
            f"{m['train/nll']:.4f}  ess {m['train/weight_ess']:.2f}  "
            f"{m['train/tokens_per_s']:.0f} tok/s  eta {eta / 60:.1f} min")
      if step % config.checkpoint_every == 0 or step in (config.num_steps, stop_at):
        check_finite()
        save(step)
      if step % config.eval_every == 0 or step == config.num_steps:
        t0 = time.perf_counter()
        result = evaluator(state.params, step)
        writer.write(step, result)
        log(f"eval at step {step} ({time.perf_counter() - t0:.0f} s): " + "  ".join(
            f"{k.split('/')[1]} {v:.3f}" for k, v in result.items()))
  finally:
    mngr.wait_until_finished()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
  if step < config.num_steps:
    log(f"stopped at step {step} after config.steps_per_run={config.steps_per_run}; "
        "run the same command again to continue")
  elif not result:  # resumed after the last step: evaluate the final params
    result = evaluator(state.params, step)
  return result


def prepare_data(config, workdir: str
                 ) -> tuple[tok_lib.Tokenizer, ip.Examples, frequency.TokenStats]:
  """The run's tokenizer (trained once in the workdir), its encoded train split, and
  the token stats of the train targets (counted once, stored in WORKDIR/checkpoints,
  reused by every later run or resume in the workdir)."""
  texts = functools.lru_cache(None)(
      lambda: load_split_texts(config, "train", config.dataset.max_train_examples))
  tokenizer = get_tokenizer(config, workdir, texts)
  train_ex = ip.encode_examples(*texts(), tokenizer, seq_len=config.seq_len,
                                max_target_len=config.max_target_len)
  log(f"data: {len(train_ex)} train examples ({train_ex.dropped_empty} with empty targets "
      f"dropped, {train_ex.truncated} truncated)")
  stats = frequency.load_or_count(
      os.path.join(os.path.abspath(workdir), "checkpoints", frequency.STATS_FILENAME),
      tokenizer, lambda: count_train_targets(config, tokenizer, train_ex), log=log,
      write=jax.process_index() == 0)
  return tokenizer, train_ex, stats


def loss_weights(config, stats: frequency.TokenStats) -> np.ndarray:
  """PDL weights [V] of the config's loss section from the token stats."""
  return stats.weights(config.loss.alpha, config.loss.epsilon,
                       frequency=config.loss.frequency, normalize=config.loss.normalize,
                       max_weight=config.loss.max_weight)


def count_train_targets(config, tokenizer, train_ex: ip.Examples) -> frequency.TokenStats:
  """Counts the train targets the loss sees (one pass, each process its shard)."""
  import tensorflow as tf

  # Each process counts its shard of the split; the counts are summed.
  targets = train_ex.targets[jax.process_index()::jax.process_count()]
  ds = tf.data.Dataset.from_tensor_slices({"targets": targets})
  stats = frequency.count_tokens(
      ds, tokenizer, fields=("targets",), dataset_name=str(config.dataset.name or config.task),
      split="train", log=log)
  return frequency.sum_across_processes(stats)


def load_params(init_from: str, like_params, param_shardings):
  """Latest params of another run's workdir (its optimizer state is ignored).

  Raises:
    ValueError: no checkpoint there, or params of another shape (other model size
      or vocabulary).
  """
  mngr = checkpoint_manager(init_from, 1)
  step = mngr.latest_step()
  if step is None:
    raise ValueError(f"config.init_from={init_from!r} has no checkpoint.")
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  params = restored.state["params"]
  want = jax.tree.map(lambda x: tuple(x.shape), like_params)
  got = jax.tree.map(lambda x: tuple(np.shape(x)), params)
  if want != got:
    raise ValueError(f"config.init_from={init_from!r}: its params do not match this "
                     "model (different preset or vocabulary).")
  return jax.device_put(jax.tree.map(np.asarray, params), param_shardings)

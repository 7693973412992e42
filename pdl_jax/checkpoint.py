"""Checkpoints of a run: the orbax manager, the run fingerprint, init_from, archiving.

The resume order (checkpoint > init_from > pretrained > fresh) is decided in one
place, `pdl_jax.state.initial_state`. A resume reads the checkpoint's JSON meta first:
its fingerprint must equal this config's (every setting that changes the math: model,
tokenizer, data, loss and its weights, optimizer and schedule, batch, steps, seed) and
its token-stats checksum the stored stats'; then the whole train state is restored
into the current shardings. Metrics logged after that step by the killed run are
dropped (metric_writer). With config.resume=False an earlier run's outputs are first
moved to WORKDIR/previous-<time>/ (process 0, then a barrier), so step 1 finds nothing.

Every path goes through the path layer (pdl_jax.utils), so a workdir may be gs://.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import jax
import orbax.checkpoint as ocp

from pdl_jax import tasks as tasks_lib
from pdl_jax import user_data
from pdl_jax import utils
from pdl_jax.losses import registry
from pdl_jax.models import decoder as decoder_lib

CHECKPOINTS = "checkpoints"
# Everything a run writes into its workdir (what config.resume=False archives).
RUN_OUTPUTS = ("config.json", "provenance.json", CHECKPOINTS, "metrics.jsonl", "tokenizer.model", "samples",
               "tensorboard")


def manager(workdir: str, keep: int = 2) -> ocp.CheckpointManager:
  """The orbax manager of WORKDIR/checkpoints (items: train state and JSON meta)."""
  return ocp.CheckpointManager(
      utils.path(workdir) / CHECKPOINTS,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
      item_names=("state", "meta"))


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` in `shardings` (restore targets, no allocation)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def fingerprint(config, tokenizer, model_cfg: dict[str, Any],
                base_sha256: str | None = None) -> dict[str, Any]:
  """What a workdir's checkpoints must agree with to be resumed by this config:
  every setting that changes what the run computes (not logging, evaluation or
  the chunking of the loss, which give the same math); with the user's own files
  (dataset.name "files"), the training files' content checksum; for a LoRA run
  (`base_sha256`), the checksum of the frozen base's weights, which its checkpoints
  do not hold."""
  # The loss: its name and the hyperparameters of that loss (its LossSpec's params and
  # weight params; reduction and EOS weight for a weighted loss), not the other losses'
  # fields, which do not change what it computes (a CE run resumes whatever loss.alpha
  # says). Chunking and the window give the same math: left out too.
  spec = registry.spec(config.loss.name)
  keys = {"name", *spec.params, *spec.weight_params}
  if spec.weighted:
    keys |= {"reduction", "eos_weight"}
  loss = {k: v for k, v in config.loss.to_dict().items() if k in keys}
  # Rematerialisation changes what the backward pass stores, not what it computes: a
  # run may be resumed with it switched. scan_layers changes the param tree, so it
  # stays, but only when on: runs from before the field existed resume unscanned.
  model_cfg = dict(model_cfg)
  model_cfg.pop("remat", None)
  if not model_cfg.get("scan_layers", False):
    model_cfg.pop("scan_layers", None)
  # Gradient accumulation is exact (the same loss and gradients per optimizer step):
  # a run may resume with another split, e.g. on a smaller slice. It is also absent
  # from the fingerprints of runs from before it existed. Not for a stateful loss
  # (FACE, whose prediction counts advance once per micro-batch: the split changes
  # its weights).
  optimizer = config.optimizer.to_dict()
  if not registry.spec(config.loss.name).stateful:
    optimizer.pop("grad_accum_steps", None)
  fp = {
      "tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
      "tokenizer_requested": [config.tokenizer.path, config.tokenizer.vocab_size],
      "model": model_cfg, "task": config.task, "dataset": config.dataset.name,
      "max_train_examples": config.dataset.max_train_examples,
      "seq_len": config.seq_len, "max_target_len": config.max_target_len,
      "loss": loss, "optimizer": optimizer,
      "batch_size": config.batch_size, "num_steps": config.num_steps,
      "seed": config.seed, "skip_nonfinite_steps": config.skip_nonfinite_steps,
  }
  # The user's own files: their content (a changed training file refuses a resume,
  # reported as "dataset_files_sha256: stored ..., now ...") and the fields read from
  # them. Only for them, so every other run's fingerprint is as before.
  if config.dataset.name == tasks_lib.FILES:
    fp.update(user_data.fingerprint(config.dataset))
  # Packing changes every batch (only when on: other runs' fingerprints are as before).
  if config.data.get("packing"):
    fp["packing"] = True
  if base_sha256 is not None:
    fp["lora_base_weights_sha256"] = base_sha256
  return json.loads(json.dumps(fp))  # as the meta stores it (tuples become lists)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_fingerprint(stored: dict, current: dict, where: str) -> None:
  """Raises ValueError listing every setting that differs (as dotted keys).

  A fingerprint stored before it held only the run's own loss hyperparameters has
  the whole loss section: of the same loss, only the keys the current one has are
  compared (a run written then resumes as before)."""
  if (isinstance(stored.get("loss"), dict) and isinstance(current.get("loss"), dict)
      and stored["loss"].get("name") == current["loss"].get("name")):
    stored = {**stored, "loss": {k: v for k, v in stored["loss"].items()
                                 if k in current["loss"]}}
  stored, current = _flatten(stored), _flatten(current)
  missing = object()
  keys = sorted(set(stored) | set(current))
  diffs = [f"{k}: stored {stored.get(k, missing)!r}, now {current.get(k, missing)!r}"
           .replace(repr(missing), "(absent)")
           for k in keys if stored.get(k, missing) != current.get(k, missing)]
  if diffs:
    raise ValueError(f"{where} was written by a different config ({'; '.join(diffs)}); "
                     "use a new --workdir or --config.resume=False.")


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict[str, Any]) -> None:
  """Saves the train state and its meta at `step` (asynchronously)."""
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)


def read_meta(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """(step, JSON meta) of WORKDIR's checkpoint `step` (default the latest).

  Raises:
    ValueError: the workdir has no checkpoint.
  """
  mngr = manager(workdir, 1)
  at = mngr.latest_step() if step is None else step
  if at is None:
    raise ValueError(f"{workdir!r} has no checkpoint.")
  return at, mngr.restore(at, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, current: dict[str, Any],
                   token_stats_sha256: str, where: str):
  """(state, step) of the latest checkpoint, or None when there is none.

  The meta is read and checked first: a checkpoint of another model shape could not
  even be restored, and one of other settings must not be.

  Raises:
    ValueError: the fingerprint or the token-stats checksum differs.
  """
  step = mngr.latest_step()
  if step is None:
    return None
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  where = f"{where} (checkpoint {step})"
  check_fingerprint(meta["fingerprint"], current, where)
  if meta.get("token_stats_sha256") != token_stats_sha256:
    raise ValueError(f"{where} was trained with token stats of checksum "
                     f"{str(meta.get('token_stats_sha256'))[:16]}..., but the stored stats "
                     f"have {token_stats_sha256[:16]}...; the counts changed. Use a new "
                     "--workdir or --config.resume=False.")
  state = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state))).state
  return state, step


def load_params(init_from: str, abstract_params, step: int | None = None):
  """Params (latest, or of `step`) of a run's workdir, restored straight into the
  shardings of `abstract_params` (ShapeDtypeStructs); its optimizer state is not read.

  A run of the other layer layout (model.scan_layers on / off) is converted: its
  params are restored in their stacked / per-layer layout and (un)stacked into this
  run's shardings.

  Raises:
    ValueError: no checkpoint there, or params of another structure or shape (other
      model size or vocabulary).
  """
  mngr = manager(init_from, 1)
  steps = mngr.all_steps()
  if not steps:
    raise ValueError(f"{init_from!r} has no checkpoint.")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise ValueError(f"{init_from!r} has no checkpoint of step {step}; it has {sorted(steps)}.")
  # The stored tree's shapes first (metadata only): another model is a clear error.
  stored = ocp.StandardCheckpointer().metadata(
      utils.path(init_from) / CHECKPOINTS / str(step) / "state").item_metadata
  want = jax.tree.map(lambda x: tuple(x.shape), abstract_params)
  try:
    got = jax.tree.map(lambda x: tuple(x.shape), dict(stored["params"]))
  except (AttributeError, KeyError, TypeError):
    got = None
  # A run of the other layer layout (model.scan_layers) is restored in its own layout
  # and converted: stacked <-> per-layer inside one jit whose out_shardings are this
  # run's, so no process holds more than its shards of the result.
  target_params, convert = abstract_params, None
  if isinstance(got, dict) and (decoder_lib.SCANNED in got) != (decoder_lib.SCANNED in want):
    target_params, convert = _other_layout(abstract_params, stored_scanned=(
        decoder_lib.SCANNED in got))
    if jax.tree.map(lambda x: tuple(x.shape), target_params) != got:
      raise ValueError(
          f"{init_from!r}: its params do not match this model (different preset or "
          f"vocabulary), besides being of the other layer layout (scan_layers="
          f"{decoder_lib.SCANNED in got} there, {decoder_lib.SCANNED in want} here): "
          f"stored {got}, this run {want}.")
  elif got != want:
    raise ValueError(f"{init_from!r}: its params do not match this "
                     f"model (different preset or vocabulary): stored {got}, this run "
                     f"{want}.")
  target = {"params": target_params}
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True)))
  params = restored.state["params"]
  if convert is not None:
    leaves = jax.tree.leaves(abstract_params)
    shardings = (jax.tree.map(lambda x: x.sharding, abstract_params)
                 if all(getattr(x, "sharding", None) is not None for x in leaves) else None)
    params = jax.jit(convert, out_shardings=shardings)(params)
  return params


def _layer_sharding(sharding, stacked: bool):
  """The sharding of one layer of a stacked param (stacked=False: drop the leading
  "layers" entry) or of the stack of a per-layer one (stacked=True: a replicated
  leading axis, as the "layers" rule has it). Non-named shardings are kept."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  spec = tuple(sharding.spec)
  spec = (None,) + spec if stacked else spec[1:]
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def _other_layout(abstract_params, stored_scanned: bool):
  """(restore target in the stored layout, function converting it to this run's).

  The target's ShapeDtypeStructs keep shardings derived from this run's (the
  stacked / per-layer forms of the same partitioning).
  """
  if stored_scanned:  # this run is unrolled: restore stacked, then unstack
    num_layers = sum(1 for k in abstract_params if k.startswith("block_"))
    shapes = decoder_lib.stack_layers(abstract_params, num_layers)
    per_layer = abstract_params["block_0"]
    target = dict(shapes)
    target[decoder_lib.SCANNED] = jax.tree.map(
        lambda s, x: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                          sharding=_layer_sharding(x.sharding, True)),
        shapes[decoder_lib.SCANNED], per_layer)
    return target, decoder_lib.unstack_layers
  num_layers = jax.tree.leaves(abstract_params[decoder_lib.SCANNED])[0].shape[0]
  target = decoder_lib.unstack_layers(abstract_params)
  for i in range(num_layers):
    target[f"block_{i}"] = jax.tree.map(
        lambda s, x: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                          sharding=_layer_sharding(x.sharding, False)),
        target[f"block_{i}"], abstract_params[decoder_lib.SCANNED])
  return target, lambda p: decoder_lib.stack_layers(p, num_layers)


def archive_previous_run(workdir: str) -> None:
  """Moves an earlier run's outputs into WORKDIR/previous-<time>/ (config.resume=False
  starts afresh without deleting anything). Process 0 moves; every process waits at
  a barrier before anyone reads the workdir."""
  if jax.process_index() == 0:
    root = utils.path(workdir)
    present = [n for n in RUN_OUTPUTS if (root / n).exists()]
    if present:
      # The second plus a short random suffix: two restarts in one second differ.
      target = root / f"{time.strftime('previous-%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
      target.mkdir(parents=True)
      for name in present:
        (root / name).rename(target / name)
      utils.log(f"config.resume=False: moved the earlier run's {present} to {target}")
  utils.sync("archive previous run")

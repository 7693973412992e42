"""Checkpoints of a run: the orbax manager, the run fingerprint, init_from, archiving.

The resume order (checkpoint > init_from > pretrained > fresh) is decided in one
place, `pdl_jax.train.state.initial_state`. A resume reads the checkpoint's JSON meta first:
its fingerprint must equal this config's (every setting that changes the math: model,
tokenizer, data, loss and its weights, optimizer and schedule, batch, steps, seed) and
its token-stats checksum the stored stats'; then the whole train state is restored
into the current shardings. Metrics logged after that step by the killed run are
dropped (metric_writer). With config.resume=False an earlier run's outputs are first
moved to WORKDIR/previous-<time>/ (process 0, then a barrier), so step 1 finds nothing.

Every path goes through the path layer (pdl_jax.paths), so a workdir may be gs://.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import jax
import orbax.checkpoint as ocp

from pdl_jax import multihost
from pdl_jax import paths
from pdl_jax.models import decoder
from pdl_jax.train import provenance

CHECKPOINTS = "checkpoints"
# Everything a run writes into its workdir (what config.resume=False archives).
RUN_OUTPUTS = ("config.json", "provenance.json", CHECKPOINTS, "metrics.jsonl", "tokenizer.model", "samples",
               "tensorboard")


def manager(workdir: str, keep: int = 2) -> ocp.CheckpointManager:
  """The orbax manager of WORKDIR/checkpoints (items: train state and JSON meta)."""
  return ocp.CheckpointManager(
      paths.path(workdir) / CHECKPOINTS,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
      item_names=("state", "meta"))


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` in `shardings` (restore targets, no allocation)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


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
  provenance.check_fingerprint(meta["fingerprint"], current, where)
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
      paths.path(init_from) / CHECKPOINTS / str(step) / "state").item_metadata
  want = jax.tree.map(lambda x: tuple(x.shape), abstract_params)
  try:
    got = jax.tree.map(lambda x: tuple(x.shape), dict(stored["params"]))
  except (AttributeError, KeyError, TypeError):
    got = None
  # A run of the other layer layout (model.scan_layers) is restored in its own layout
  # and converted: stacked <-> per-layer inside one jit whose out_shardings are this
  # run's, so no process holds more than its shards of the result.
  target_params, convert = abstract_params, None
  if isinstance(got, dict) and (decoder.SCANNED in got) != (decoder.SCANNED in want):
    target_params, convert = _other_layout(abstract_params, stored_scanned=(
        decoder.SCANNED in got))
    if jax.tree.map(lambda x: tuple(x.shape), target_params) != got:
      raise ValueError(
          f"{init_from!r}: its params do not match this model (different preset or "
          f"vocabulary), besides being of the other layer layout (scan_layers="
          f"{decoder.SCANNED in got} there, {decoder.SCANNED in want} here): "
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
    shapes = decoder.stack_layers(abstract_params, num_layers)
    per_layer = abstract_params["block_0"]
    target = dict(shapes)
    target[decoder.SCANNED] = jax.tree.map(
        lambda s, x: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                          sharding=_layer_sharding(x.sharding, True)),
        shapes[decoder.SCANNED], per_layer)
    return target, decoder.unstack_layers
  num_layers = jax.tree.leaves(abstract_params[decoder.SCANNED])[0].shape[0]
  target = decoder.unstack_layers(abstract_params)
  for i in range(num_layers):
    target[f"block_{i}"] = jax.tree.map(
        lambda s, x: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                          sharding=_layer_sharding(x.sharding, False)),
        target[f"block_{i}"], abstract_params[decoder.SCANNED])
  return target, lambda p: decoder.stack_layers(p, num_layers)


def archive_previous_run(workdir: str) -> None:
  """Moves an earlier run's outputs into WORKDIR/previous-<time>/ (config.resume=False
  starts afresh without deleting anything). Process 0 moves; every process waits at
  a barrier before anyone reads the workdir."""
  if jax.process_index() == 0:
    root = paths.path(workdir)
    present = [n for n in RUN_OUTPUTS if (root / n).exists()]
    if present:
      # The second plus a short random suffix: two restarts in one second differ.
      target = root / f"{time.strftime('previous-%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
      target.mkdir(parents=True)
      for name in present:
        (root / name).rename(target / name)
      multihost.log(f"config.resume=False: moved the earlier run's {present} to {target}")
  multihost.sync("archive previous run")

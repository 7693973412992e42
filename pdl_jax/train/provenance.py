"""What a run's results came from: the run fingerprint its checkpoints must agree
with to be resumed, the code version, and the checksum of a pretrained base's
weights (WORKDIR/provenance.json)."""

from __future__ import annotations

import json
from typing import Any
from pdl_jax.data import tasks as tasks_lib
from pdl_jax.data import files as data_files
from pdl_jax.losses import registry
from pdl_jax.models.hf import locate
from pdl_jax.models.hf import weights as hf_weights
import os


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
    fp.update(data_files.fingerprint(config.dataset))
  # Packing changes every batch (only when on: other runs' fingerprints are as before).
  if config.data.get("packing"):
    fp["packing"] = True
  # Train examples held out as the tune split change the training data (only when set).
  if config.dataset.get("tune_examples"):
    fp["tune_examples"] = config.dataset.tune_examples
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


def code_version() -> str:
  """The git commit of the pdl_jax source that runs ("<sha>-dirty" with uncommitted
  changes to tracked files), or "unknown" outside a git checkout: so a run's results
  can be traced to the code that made them."""
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    sha = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                         text=True, check=True, timeout=30).stdout.strip()
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return sha + ("-dirty" if dirty.strip() else "")


def base_checksum(pretrained: str) -> str:
  """Checksum of the pretrained base's weight files (config.model.pretrained; of the
  per-host copy loading made when the base is on gs://)."""
  return hf_weights.base_weights_sha256(locate.local_dir(pretrained))


def record(pretrained: str | None, fingerprint: dict, base_sha256: str | None = None) -> dict:
  """What a run's results came from, beyond its config (WORKDIR/provenance.json,
  rewritten by each invocation): the code version, and for a pretrained base its
  name and the checksum of its weight files (the same base for every point of a
  comparison)."""
  out = {"code_version": code_version(), "model": fingerprint["model"]}
  if pretrained is not None:
    out["base"] = pretrained
    out["base_weights_sha256"] = base_sha256 or base_checksum(pretrained)
  return out

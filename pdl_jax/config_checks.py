"""Checks of a run config before any work: each bad value is a ValueError that names
the key, the value and what is allowed."""

from __future__ import annotations

import ml_collections

from pdl_jax import decode as decode_lib
from pdl_jax import loss as loss_lib
from pdl_jax import tasks as tasks_lib
from pdl_jax import utils
from pdl_jax.models import transformer

LOSSES = ("ce", "pdl")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad key and what is allowed."""
  allowed_tasks = sorted(tasks_lib.TASKS) + [tasks_lib.PRETRAIN]
  if config.task not in allowed_tasks:
    raise ValueError(f"config.task={config.task!r}; expected one of {allowed_tasks}.")
  if config.task != tasks_lib.PRETRAIN:
    tasks_lib.get_dataset(config.task, config.dataset.name)
  if config.loss.name not in LOSSES:
    raise ValueError(f"config.loss.name={config.loss.name!r}; expected one of {LOSSES}.")
  if not config.loss.alpha >= 0:
    raise ValueError(f"config.loss.alpha={config.loss.alpha}; expected >= 0.")
  if config.loss.epsilon is not None and not config.loss.epsilon > 0:
    raise ValueError(f"config.loss.epsilon={config.loss.epsilon}; expected > 0 or None.")
  if config.loss.frequency not in loss_lib.FREQUENCY_KINDS:
    raise ValueError(f"config.loss.frequency={config.loss.frequency!r}; expected one of "
                     f"{loss_lib.FREQUENCY_KINDS}.")
  if config.model.preset not in transformer.PRESETS:
    raise ValueError(f"config.model.preset={config.model.preset!r}; expected one of "
                     f"{sorted(transformer.PRESETS)}.")
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
  if config.tokenizer.path is not None and not utils.path(config.tokenizer.path).is_file():
    raise ValueError(f"config.tokenizer.path={config.tokenizer.path!r} does not exist; "
                     "give an existing SentencePiece .model or None to train one.")
  if config.init_from is not None and not (
      utils.path(config.init_from) / "checkpoints").is_dir():
    raise ValueError(f"config.init_from={config.init_from!r} has no checkpoints/ folder; "
                     "expected the workdir of a finished run.")

"""Checks of a run config before any work: each bad value is a ValueError that names
the key, the value and what is allowed."""

from __future__ import annotations

import ml_collections

from pdl_jax.data import tasks as tasks_lib
from pdl_jax.data import files as data_files
from pdl_jax import paths
from pdl_jax.data import pipeline
from pdl_jax.eval import evaluator as evaluator_lib
from pdl_jax.losses import batch_loss
from pdl_jax.models import factory


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad key and what is allowed: each part's
  settings checked by the part's own check, then what spans parts."""
  allowed_tasks = sorted(tasks_lib.TASKS) + [tasks_lib.PRETRAIN]
  if config.task not in allowed_tasks:
    raise ValueError(f"config.task={config.task!r}; expected one of {allowed_tasks}.")
  if config.task != tasks_lib.PRETRAIN:
    tasks_lib.get_dataset(config.task, config.dataset.name)
  data_files.check(config.dataset, config.task)
  batch_loss.check(config.loss)
  if config.data.get("packing") and config.loss.name == "unlikelihood":
    # Its negative candidates are the row's earlier targets: in a packed row they would
    # include other examples' tokens (a different loss, not the same per example).
    raise ValueError("config.data.packing=True with config.loss.name='unlikelihood': its "
                     "negative candidates are the row's earlier target tokens, which packing "
                     "would mix across examples; set data.packing=False for it.")
  tune = config.dataset.get("tune_examples") or 0
  if not (isinstance(tune, int) and not isinstance(tune, bool) and tune >= 0):
    raise ValueError(f"config.dataset.tune_examples={tune!r}; expected an integer >= 0 "
                     "(train examples held out as the 'tune' split; 0: none).")
  if tune and config.dataset.name == tasks_lib.FILES:
    raise ValueError(f"config.dataset.tune_examples={tune} holds examples out of a task "
                     "dataset's train split; with your own files give the tuning examples "
                     "as config.dataset.validation instead.")
  if tune and config.task == tasks_lib.PRETRAIN:
    raise ValueError(f"config.dataset.tune_examples={tune} is for the finetuning tasks, not "
                     "config.task='pretrain'.")
  if config.eval.get("split", "validation") == "tune" and not tune:
    raise ValueError("config.eval.split='tune' evaluates train examples held out by "
                     "config.dataset.tune_examples, which is 0; set it (e.g. 512).")
  factory.check(config.model)
  pipeline.check_layout(config.data, config.model.pretrained)
  evaluator_lib.check(config.eval)
  if config.seq_len < 4:
    raise ValueError(f"config.seq_len={config.seq_len}; expected >= 4 (a prompt token, "
                     "the separator, a target token and EOS).")
  k = config.optimizer.grad_accum_steps
  if not (isinstance(k, int) and k >= 1 and config.batch_size % k == 0):
    raise ValueError(f"config.optimizer.grad_accum_steps={k!r}; expected an integer >= 1 "
                     f"that divides config.batch_size={config.batch_size} (the global batch "
                     "of one optimizer step).")
  for key in ("batch_size", "num_steps", "log_every", "eval_every", "checkpoint_every",
              "max_target_len"):
    if config[key] < 1:
      raise ValueError(f"config.{key}={config[key]}; expected >= 1.")
  if config.tokenizer.path is not None and not paths.path(config.tokenizer.path).is_file():
    raise ValueError(f"config.tokenizer.path={config.tokenizer.path!r} does not exist; "
                     "give an existing SentencePiece .model or None to train one.")
  if config.init_from is not None and not (
      paths.path(config.init_from) / "checkpoints").is_dir():
    raise ValueError(f"config.init_from={config.init_from!r} has no checkpoints/ folder; "
                     "expected the workdir of a finished run.")

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
  check_files_dataset(config.dataset, config.task)
  batch_loss.check(config.loss)
  if config.data.get("packing") and config.loss.name == "unlikelihood":
    # Its negative candidates are the row's earlier targets: in a packed row they would
    # include other examples' tokens (a different loss, not the same per example).
    raise ValueError("config.data.packing=True with config.loss.name='unlikelihood': its "
                     "negative candidates are the row's earlier target tokens, which packing "
                     "would mix across examples; set data.packing=False for it.")
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


# The dataset fields only the user's own files read (dataset.name "files").
_FILES_KEYS = ("train", "validation", "format", "context_field", "messages_field")


def check_files_dataset(d, task: str) -> None:
  """The dataset fields of the user's own files (dataset.name "files"): their values,
  and that the files exist and have a known format (nothing is read yet: a bad
  record is reported when the split is read, still before training).

  Raises:
    ValueError: a bad key, naming it, its value and what is allowed; files fields set
      without dataset.name "files"; no file for a path or glob (data_files.DataFileError).
  """
  if d.name != tasks_lib.FILES:
    for key in _FILES_KEYS:
      if d.get(key) is not None:
        raise ValueError(f"config.dataset.{key}={d[key]!r} is only read with "
                         f"config.dataset.name='files' (now {d.name!r}); set "
                         "config.dataset.name='files' (or the config argument dataset=files).")
    return
  if task == tasks_lib.PRETRAIN:
    raise ValueError("config.dataset.name='files' with config.task='pretrain'; the user's files "
                     "are finetuning tasks (summarization, dialogue, style_transfer).")
  if not d.get("train"):
    raise ValueError("config.dataset.name='files' needs config.dataset.train: a file or glob "
                     "(local or gs://), e.g. examples/support_summaries.jsonl.")
  if d.format not in data_files.FORMATS + (None,):
    raise ValueError(f"config.dataset.format={d.format!r}; expected one of "
                     f"{data_files.FORMATS} or None (from each file's suffix).")
  for key in ("prompt_field", "target_field", "context_field", "messages_field"):
    if d[key] is not None and not (isinstance(d[key], str) and d[key]):
      raise ValueError(f"config.dataset.{key}={d[key]!r}; expected a field name.")
  if d.messages_field is not None and d.context_field is not None:
    raise ValueError(f"config.dataset.context_field={d.context_field!r} with messages_field="
                     f"{d.messages_field!r}; a chat record's messages are its context: set "
                     "one of them.")
  if d.validation is None and not 0 < d.validation_fraction < 1:
    raise ValueError(f"config.dataset.validation_fraction={d.validation_fraction}; expected "
                     "a fraction in (0, 1) of train to hold out (or config.dataset.validation).")
  for key in ("train", "validation"):
    if d[key] is not None:
      for p in data_files.resolve(d[key], f"dataset.{key}"):
        data_files.file_format(p, d.format)

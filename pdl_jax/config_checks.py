"""Checks of a run config before any work: each bad value is a ValueError that names
the key, the value and what is allowed."""

from __future__ import annotations

import ml_collections

from pdl_jax.eval import decode as decode_lib
from pdl_jax import losses
from pdl_jax.data import tasks as tasks_lib
from pdl_jax.data import files as data_files
from pdl_jax import paths
from pdl_jax.losses import chunked as chunked_loss
from pdl_jax.losses import batch_loss
from pdl_jax.losses import pdl
from pdl_jax.losses import registry
from pdl_jax.models import config as model_config
from pdl_jax.models.hf import families as hf_families
from pdl_jax.models.hf import offline


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad key and what is allowed."""
  allowed_tasks = sorted(tasks_lib.TASKS) + [tasks_lib.PRETRAIN]
  if config.task not in allowed_tasks:
    raise ValueError(f"config.task={config.task!r}; expected one of {allowed_tasks}.")
  if config.task != tasks_lib.PRETRAIN:
    tasks_lib.get_dataset(config.task, config.dataset.name)
  check_files_dataset(config)
  c = config.loss
  if c.name not in registry.LOSS_NAMES:
    raise ValueError(f"config.loss.name={c.name!r}; expected one of {registry.LOSS_NAMES}.")
  if c.chunked and not registry.supports_chunked(c.name):
    raise ValueError(f"config.loss.chunked=True with config.loss.name={c.name!r}: this loss "
                     "needs the full logits; chunked losses are "
                     f"{sorted(registry.CHUNKABLE)}.")
  if config.data.get("packing") and c.name == "unlikelihood":
    # Its negative candidates are the row's earlier targets: in a packed row they would
    # include other examples' tokens (a different loss, not the same per example).
    raise ValueError("config.data.packing=True with config.loss.name='unlikelihood': its "
                     "negative candidates are the row's earlier target tokens, which packing "
                     "would mix across examples; set data.packing=False for it.")
  if c.chunk_strategy is not None and c.chunk_strategy not in chunked_loss.STRATEGIES:
    raise ValueError(f"config.loss.chunk_strategy={c.chunk_strategy!r}; expected one of "
                     f"{chunked_loss.STRATEGIES} or None.")
  if c.row_chunk_size is not None and c.row_chunk_size < 1:
    raise ValueError(f"config.loss.row_chunk_size={c.row_chunk_size}; expected >= 1 or "
                     "None.")
  if c.reduction is not None and c.reduction not in pdl.REDUCTIONS:
    raise ValueError(f"config.loss.reduction={c.reduction!r}; expected one of "
                     f"{pdl.REDUCTIONS} or None.")
  if c.eos_weight is not None and (c.name not in registry.WEIGHTED_LOSSES
                                   or not c.eos_weight >= 0):
    raise ValueError(f"config.loss.eos_weight={c.eos_weight} with loss {c.name!r}; expected "
                     f"None, or a number >= 0 with a weighted loss {registry.WEIGHTED_LOSSES}.")
  for key, ok, want in (("itf_lambda", c.itf_lambda >= 0, ">= 0"),
                        ("tlat_T", c.tlat_T > 0, "> 0"),
                        ("tlat_A", c.tlat_A is None or c.tlat_A >= 0, "None or >= 0")):
    if not ok:
      raise ValueError(f"config.loss.{key}={c[key]}; expected {want}.")
  try:  # gamma, smoothing, ul_alpha: the loss checks its own ranges
    losses.get_loss(c.name, **batch_loss.loss_params(c))
  except ValueError as e:
    raise ValueError(f"config.loss ({c.name}): {e}") from None
  if not c.alpha >= 0:
    raise ValueError(f"config.loss.alpha={c.alpha}; expected >= 0.")
  if c.epsilon is not None and not c.epsilon > 0:
    raise ValueError(f"config.loss.epsilon={c.epsilon}; expected > 0 or None.")
  if config.loss.frequency not in pdl.FREQUENCY_KINDS:
    raise ValueError(f"config.loss.frequency={config.loss.frequency!r}; expected one of "
                     f"{pdl.FREQUENCY_KINDS}.")
  if config.model.pretrained is not None and not offline.is_offline_name(
      config.model.pretrained):  # a named model is prepared at the start of the run
    if not (paths.path(config.model.pretrained) / "config.json").exists():
      raise ValueError(f"config.model.pretrained={config.model.pretrained!r} has no "
                       "config.json; expected a Hugging Face model directory (config.json, "
                       "*.safetensors, tokenizer files) or an offline model name of "
                       f"{sorted(offline.OFFLINE_MODELS)}.")
    try:  # an unsupported family or option: now, not after the dataset build
      hf_families.read_config(config.model.pretrained)
    except ValueError as e:
      raise ValueError(f"config.model.pretrained={config.model.pretrained!r}: {e}") from None
  prompt_format = config.data.prompt_format if "data" in config else None
  if prompt_format not in ("plain", "chat", None):
    raise ValueError(f"config.data.prompt_format={prompt_format!r}; expected 'plain', "
                     "'chat' or None (chat when the model has a chat template).")
  if prompt_format == "chat" and config.model.pretrained is None:
    raise ValueError("config.data.prompt_format='chat' needs a pretrained model with a chat "
                     "template (config.model.pretrained); the own model has none.")
  for key in ("dtype", "param_dtype"):
    if config.model[key] not in ("float32", "bfloat16") and not (
        key == "dtype" and config.model[key] is None):
      raise ValueError(f"config.model.{key}={config.model[key]!r}; expected 'float32' or "
                       "'bfloat16'.")
  lora_cfg = config.model.get("lora")
  lora_rank = lora_cfg.rank if lora_cfg is not None else 0
  if lora_cfg is not None:
    check_lora(config)
  if config.model.param_dtype == "bfloat16" and not lora_rank:
    # optax.adamw on bfloat16 params keeps bfloat16 moments and adds each update to a
    # bfloat16 weight: an update below the weight's spacing (a 1e-5 step on a weight
    # of 1.0, whose spacing is 2 ** -7) is rounded away and the model does not train.
    raise ValueError(
        "config.model.param_dtype='bfloat16' does not train: AdamW updates smaller than "
        "a weight's bfloat16 spacing (1e-5 on 1.0) are lost. Keep float32 params (the "
        "default: float32 master weights) and set config.model.dtype='bfloat16' for "
        "bfloat16 compute; export in bfloat16 with `pdl_jax.cli.export_hf --dtype=bfloat16`. "
        "(With LoRA, model.lora.rank > 0, a bfloat16 base is allowed: it is frozen.)")
  if config.model.remat not in model_config.REMATS:
    raise ValueError(f"config.model.remat={config.model.remat!r}; expected one of "
                     f"{model_config.REMATS}.")
  if config.model.preset not in model_config.PRESETS:
    raise ValueError(f"config.model.preset={config.model.preset!r}; expected one of "
                     f"{sorted(model_config.PRESETS)}.")
  for method in (config.eval.decode, *config.eval.extra_decodes):
    if method not in decode_lib.METHODS:
      raise ValueError(f"config.eval decode method {method!r} (eval.decode / "
                       f"eval.extra_decodes); expected one of {decode_lib.METHODS}.")
  bucket = config.eval.length_bucket
  if not (isinstance(bucket, int) and not isinstance(bucket, bool) and bucket >= 0):
    raise ValueError(f"config.eval.length_bucket={bucket!r}; expected an integer >= 0 "
                     "(0: decode prompts in order, all padded to the longest).")
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


def check_files_dataset(config: ml_collections.ConfigDict) -> None:
  """The dataset fields of the user's own files (dataset.name "files"): their values,
  and that the files exist and have a known format (nothing is read yet: a bad
  record is reported when the split is read, still before training).

  Raises:
    ValueError: a bad key, naming it, its value and what is allowed; files fields set
      without dataset.name "files"; no file for a path or glob (user_data.DataFileError).
  """
  d = config.dataset
  if d.name != tasks_lib.FILES:
    for key in _FILES_KEYS:
      if d.get(key) is not None:
        raise ValueError(f"config.dataset.{key}={d[key]!r} is only read with "
                         f"config.dataset.name='files' (now {d.name!r}); set "
                         "config.dataset.name='files' (or the config argument dataset=files).")
    return
  if config.task == tasks_lib.PRETRAIN:
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


def check_lora(config) -> None:
  """config.model.lora: values in range, and a pretrained base to adapt."""
  lo = config.model.lora
  if not (isinstance(lo.rank, int) and lo.rank >= 0):
    raise ValueError(f"config.model.lora.rank={lo.rank!r}; expected an integer >= 0 (0: off).")
  if lo.base_quant not in model_config.BASE_QUANTS:
    raise ValueError(f"config.model.lora.base_quant={lo.base_quant!r}; expected one of "
                     f"{model_config.BASE_QUANTS}.")
  if not lo.rank:
    if lo.base_quant != "none":
      raise ValueError(f"config.model.lora.base_quant={lo.base_quant!r} quantises the frozen "
                       "base of a LoRA run; set config.model.lora.rank > 0.")
    return
  targets = tuple(lo.targets)
  bad = sorted(set(targets) - set(model_config.LORA_TARGETS))
  if not targets or bad:
    raise ValueError(f"config.model.lora.targets={targets}; expected a non-empty subset of "
                     f"{sorted(model_config.LORA_TARGETS)} (unknown: {bad}).")
  if not lo.alpha > 0:
    raise ValueError(f"config.model.lora.alpha={lo.alpha}; expected > 0.")
  if not 0 <= lo.dropout < 1:
    raise ValueError(f"config.model.lora.dropout={lo.dropout}; expected in [0, 1).")
  if config.model.pretrained is None:
    raise ValueError("config.model.lora.rank > 0 adapts a pretrained base; set "
                     "config.model.pretrained (a full run of the own model can be exported "
                     "with `python -m pdl_jax.cli.export_hf` and used as one).")

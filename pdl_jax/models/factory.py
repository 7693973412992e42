"""The config's model: a pretrained Hugging Face decoder (config.model.pretrained) or
the project's own model from a preset, both as pdl_jax.models.decoder.Decoder."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from pdl_jax.models import decoder
from pdl_jax.models import config as model_config
from pdl_jax import paths
from pdl_jax.models.hf import families as hf_families
from pdl_jax.models.hf import locate
from pdl_jax.models.hf import offline


def decoder_config(m, vocab_size: int | None = None) -> model_config.DecoderConfig:
  """DecoderConfig of the model settings `m` (config.model): read from the pretrained
  directory's config.json, or the own model's preset for a vocabulary of
  `vocab_size`."""
  dtype = compute_dtype(m)
  how = run_fields(m)
  if m.pretrained is not None:
    cfg = hf_families.read_config(m.pretrained, dtype=dtype, param_dtype=m.param_dtype)
    return dataclasses.replace(cfg, **how)
  own = model_config.preset_config(m.preset, vocab_size, dtype=dtype,
                                 tied_embeddings=m.tied_embeddings)
  return dataclasses.replace(model_config.from_model_config(own), param_dtype=m.param_dtype,
                             **how)


def run_fields(m) -> dict[str, Any]:
  """The DecoderConfig fields the model settings `m` set for either model: how the
  layers run (scanned, rematerialised) and the LoRA adapters."""
  how = dict(scan_layers=bool(m.get("scan_layers", False)), remat=m.get("remat", "none"),
             attention=m.get("attention", "auto"))
  lo = m.get("lora")
  if lo is not None and lo.rank > 0:  # adapters on the chosen projections (pdl_jax.models.lora)
    how.update(lora_rank=int(lo.rank), lora_alpha=float(lo.alpha),
               lora_targets=tuple(lo.targets), lora_dropout=float(lo.dropout),
               base_quant=lo.base_quant)
  return how


def compute_dtype(m) -> str:
  """The model settings' dtype (config.model.dtype), or for None bfloat16 on
  accelerators and float32 on CPU."""
  if m.dtype is not None:
    return m.dtype
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def make_model(m, vocab_size: int | None = None) -> decoder.Decoder:
  """The decoder of the model settings `m` (config.model; vocab_size: the own
  model's vocabulary)."""
  return decoder.Decoder(decoder_config(m, vocab_size))


# DecoderConfig fields added after runs were first fingerprinted (Gemma 3).
LATER_FIELDS = ("local_layers", "local_rope_theta", "post_norms", "query_scale",
                "final_logit_softcap")


def describe(model: decoder.Decoder) -> dict[str, Any]:
  """The model's configuration as JSON-able values (for the run fingerprint, which
  leaves out `remat`: see pdl_jax.train.provenance.fingerprint)."""
  # attention: an implementation of the same math (as remat): runs resume across it.
  out = {k: v for k, v in dataclasses.asdict(model.cfg).items()
         if k not in ("source_config_json", "attention")}
  if not model.cfg.lora_rank:  # fingerprints of full runs stay as before LoRA existed
    for k in ("lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "base_quant"):
      out.pop(k)
  # Fields added later (Gemma 2/3) leave the fingerprint at their defaults: a run
  # written before they existed resumes.
  defaults = {f.name: f.default for f in dataclasses.fields(model.cfg)}
  for k in LATER_FIELDS:
    if out[k] == defaults[k]:
      out.pop(k)
  return out


def check(m) -> None:
  """The model settings (config.model): raises ValueError naming the first bad key
  and what is allowed."""
  # A named model, a GGUF file or a Hub id is prepared at the start of the run.
  if m.pretrained is not None and not locate.is_prepared_at_start(m.pretrained):
    if not (paths.path(m.pretrained) / "config.json").exists():
      raise ValueError(f"config.model.pretrained={m.pretrained!r} has no "
                       "config.json; expected a Hugging Face model directory (config.json, "
                       "*.safetensors, tokenizer files), a .gguf file, a Hugging Face Hub "
                       "id (org/name) or an offline model name of "
                       f"{sorted(offline.OFFLINE_MODELS)}.")
    try:  # an unsupported family or option: now, not after the dataset build
      hf_families.read_config(m.pretrained)
    except ValueError as e:
      raise ValueError(f"config.model.pretrained={m.pretrained!r}: {e}") from None
  for key in ("dtype", "param_dtype"):
    if m[key] not in ("float32", "bfloat16") and not (
        key == "dtype" and m[key] is None):
      raise ValueError(f"config.model.{key}={m[key]!r}; expected 'float32' or "
                       "'bfloat16'.")
  lora_cfg = m.get("lora")
  lora_rank = lora_cfg.rank if lora_cfg is not None else 0
  if lora_cfg is not None:
    check_lora(m)
  if m.param_dtype == "bfloat16" and not lora_rank:
    # optax.adamw on bfloat16 params keeps bfloat16 moments and adds each update to a
    # bfloat16 weight: an update below the weight's spacing (a 1e-5 step on a weight
    # of 1.0, whose spacing is 2 ** -7) is rounded away and the model does not train.
    raise ValueError(
        "config.model.param_dtype='bfloat16' does not train: AdamW updates smaller than "
        "a weight's bfloat16 spacing (1e-5 on 1.0) are lost. Keep float32 params (the "
        "default: float32 master weights) and set config.model.dtype='bfloat16' for "
        "bfloat16 compute; export in bfloat16 with `pdl_jax.cli.export_hf --dtype=bfloat16`. "
        "(With LoRA, model.lora.rank > 0, a bfloat16 base is allowed: it is frozen.)")
  if m.get("attention", "auto") not in model_config.ATTENTIONS:
    raise ValueError(f"config.model.attention={m.attention!r}; expected one of "
                     f"{model_config.ATTENTIONS}.")
  if m.remat not in model_config.REMATS:
    raise ValueError(f"config.model.remat={m.remat!r}; expected one of "
                     f"{model_config.REMATS}.")
  if m.preset not in model_config.PRESETS:
    raise ValueError(f"config.model.preset={m.preset!r}; expected one of "
                     f"{sorted(model_config.PRESETS)}.")


def check_lora(m) -> None:
  """The model settings' LoRA (config.model.lora): values in range, and a pretrained
  base to adapt."""
  lo = m.lora
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
  if m.pretrained is None:
    raise ValueError("config.model.lora.rank > 0 adapts a pretrained base; set "
                     "config.model.pretrained (a full run of the own model can be exported "
                     "with `python -m pdl_jax.cli.export_hf` and used as one).")

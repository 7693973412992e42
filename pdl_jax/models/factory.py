"""The config's model: a pretrained Hugging Face decoder (config.model.pretrained) or
the project's own model from a preset, both as pdl_jax.models.decoder.Decoder."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from pdl_jax.models import decoder
from pdl_jax.models import config as model_config
from pdl_jax.models.hf import families as hf_families


def decoder_config(m, vocab_size: int | None = None) -> model_config.DecoderConfig:
  """DecoderConfig of the model settings `m` (config.model): read from the pretrained
  directory's config.json, or the own model's preset for a vocabulary of
  `vocab_size`."""
  dtype = compute_dtype(m)
  # How the layers run (scanned, rematerialised) is the config's, for either model.
  how = dict(scan_layers=bool(m.get("scan_layers", False)), remat=m.get("remat", "none"))
  lo = m.get("lora")
  if lo is not None and lo.rank > 0:  # adapters on the chosen projections (pdl_jax.models.lora)
    how.update(lora_rank=int(lo.rank), lora_alpha=float(lo.alpha),
                  lora_targets=tuple(lo.targets), lora_dropout=float(lo.dropout),
                  base_quant=lo.base_quant)
  if m.pretrained is not None:
    cfg = hf_families.read_config(m.pretrained, dtype=dtype, param_dtype=m.param_dtype)
    return dataclasses.replace(cfg, **how)
  own = model_config.preset_config(m.preset, vocab_size, dtype=dtype,
                                 tied_embeddings=m.tied_embeddings)
  return dataclasses.replace(model_config.from_model_config(own), param_dtype=m.param_dtype,
                             **how)


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


def describe(model: decoder.Decoder) -> dict[str, Any]:
  """The model's configuration as JSON-able values (for the run fingerprint, which
  leaves out `remat`: see pdl_jax.train.provenance.fingerprint)."""
  out = {k: v for k, v in dataclasses.asdict(model.cfg).items()
         if k != "source_config_json"}
  if not model.cfg.lora_rank:  # fingerprints of full runs stay as before LoRA existed
    for k in ("lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "base_quant"):
      out.pop(k)
  return out

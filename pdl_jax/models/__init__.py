"""Model definitions: the project's own Transformer (transformer.py) and one Flax
decoder for the Hugging Face families (decoder.py), chosen by the config."""

from __future__ import annotations

import dataclasses
from typing import Any

from pdl_jax.models import transformer


def make_model(config, vocab_size: int) -> transformer.Transformer:
  """The config's model for a vocabulary of `vocab_size`."""
  cfg = transformer.model_config(config.model.preset, vocab_size, dtype=config.model.dtype,
                                 tied_embeddings=config.model.tied_embeddings)
  return transformer.Transformer(cfg)


def describe(model) -> dict[str, Any]:
  """The model's configuration as JSON-able values (for the run fingerprint)."""
  return dataclasses.asdict(model.cfg)

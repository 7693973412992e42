"""The project's own model: its configuration (ModelConfig) and size presets.

The model itself is pdl_jax.models.decoder.Decoder (decoder.from_model_config): RMSNorm,
rotary positions, gated (SwiGLU) MLP, causal multi-head attention, tied embeddings
with the unembedding scaled by d_model**-0.5. The original stand-alone implementation
is kept as the tests' reference (tests/reference_transformer.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Transformer sizes; see PRESETS."""

  vocab_size: int
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  head_dim: int = 64
  mlp_dim: int = 1024
  tied_embeddings: bool = True
  rope_base: float = 10000.0
  dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"; params stay float32


PRESETS: dict[str, dict[str, Any]] = {
    # ~0.5M non-embedding params: seconds per step on a laptop CPU, for tests.
    "tiny": dict(d_model=64, num_layers=2, num_heads=2, head_dim=32, mlp_dim=192),
    # ~1.3M non-embedding params: a finetuning run in minutes on 2 CPU cores.
    "small": dict(d_model=192, num_layers=3, num_heads=3, head_dim=64, mlp_dim=512),
    # ~85M non-embedding params (GPT-2 small shape): accelerators.
    "base": dict(d_model=768, num_layers=12, num_heads=12, head_dim=64, mlp_dim=2048),
}


def model_config(preset: str, vocab_size: int, **overrides) -> ModelConfig:
  """ModelConfig from a preset name plus overrides; clear error for bad names."""
  if preset not in PRESETS:
    raise ValueError(f"model preset {preset!r} is unknown; expected one of {sorted(PRESETS)}.")
  return ModelConfig(vocab_size=vocab_size, **{**PRESETS[preset], **overrides})

"""The decoder's configuration: `DecoderConfig` (the architecture in a few switches:
norm kind, MLP kind, activation, positions, biases, q/k norm, embedding scale, tied
unembedding and its scale, grouped-query attention, scanned layers, remat, LoRA),
and the project's own model as presets (`ModelConfig`, `PRESETS`, turned into a
DecoderConfig by `from_model_config`). pdl_jax.models.hf.families.read_config fills
a DecoderConfig from a Hugging Face config.json.
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


def preset_config(preset: str, vocab_size: int, **overrides) -> ModelConfig:
  """ModelConfig from a preset name plus overrides; clear error for bad names."""
  if preset not in PRESETS:
    raise ValueError(f"model preset {preset!r} is unknown; expected one of {sorted(PRESETS)}.")
  return ModelConfig(vocab_size=vocab_size, **{**PRESETS[preset], **overrides})


NORMS = ("rms", "rms_plus_one", "layer")


MLPS = ("gated", "plain")


ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu")


POSITIONS = ("rope", "learned")


ROPE_TYPES = ("default", "linear", "llama3")


# Rematerialisation of each block in the backward pass (DecoderConfig.remat): "none"
# keeps every activation; "full" saves only each block's input (jax.checkpoint's
# default, nothing saveable) and recomputes the block; "dots" saves the outputs of
# the projections' matmuls and recomputes the cheap elementwise work around them.
REMATS = ("none", "full", "dots")


# How attention is computed (DecoderConfig.attention; pdl_jax.models.attention).
ATTENTIONS = ("xla", "splash", "cudnn", "auto")


# Projections a low-rank adapter may sit on (DecoderConfig.lora_targets), by the
# LoRA literature's short names, and the Dense2D module each names.
LORA_TARGETS = {"q": "query", "k": "key", "v": "value", "o": "out", "gate": "gate",
                "up": "up", "down": "down"}


# How a LoRA run stores its frozen base projections (DecoderConfig.base_quant): as
# param_dtype; int8 per output column; nf4 (QLoRA's 4-bit NormalFloat) per block of
# NF4_BLOCK input rows (pdl_jax.models.quant).
BASE_QUANTS = ("none", "int8", "nf4")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture of a decoder-only LM; hashable (it is a static field of the module)."""

  vocab_size: int  # rows of the embedding (may exceed the tokenizer's size: padded rows)
  d_model: int
  num_layers: int
  num_heads: int  # query heads
  num_kv_heads: int  # key/value heads (== num_heads without grouped-query attention)
  head_dim: int
  mlp_dim: int
  max_len: int = 2048  # positions: table size for learned positions, informative for RoPE
  norm: str = "rms"  # "rms" x*w; "rms_plus_one" x*(1+w) (Gemma); "layer" LayerNorm+bias (GPT-2)
  norm_eps: float = 1e-6
  mlp: str = "gated"  # "gated": down(act(gate(x)) * up(x)); "plain": down(act(up(x)))
  activation: str = "silu"  # "silu", "gelu_tanh" (gelu_new / gelu_pytorch_tanh), "gelu", "relu"
  positions: str = "rope"  # "rope" (rotate-half form) or "learned" (GPT-2 wpe)
  rope_theta: float = 10000.0
  rope_type: str = "default"  # "default", "linear", "llama3"
  rope_factor: float = 1.0  # linear / llama3 scaling factor
  rope_low_freq_factor: float = 1.0  # llama3 only
  rope_high_freq_factor: float = 4.0  # llama3 only
  rope_original_max_len: int = 8192  # llama3 only: original_max_position_embeddings
  qkv_bias: bool = False
  out_bias: bool = False  # bias of the attention output projection
  mlp_bias: bool = False
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k, before RoPE
  embed_scale: bool = False  # Gemma: embeddings * sqrt(d_model), rounded to the compute dtype
  tied_embeddings: bool = True
  unembed_scale: float | None = None  # the own model's d_model**-0.5 on the tied unembedding
  # Sliding-window (local) attention: a query at buffer index i sees keys j with
  # i - window < j <= i (transformers' convention). local_layers empty: every layer
  # is windowed (Mistral); else one bool per layer, True for a local layer (Gemma 2/3).
  sliding_window: int | None = None
  local_layers: tuple[bool, ...] = ()
  local_rope_theta: float | None = None  # local layers' RoPE base (default type); None: rope_theta
  post_norms: bool = False  # Gemma 2/3: a norm on the attention's and the MLP's output too
  query_scale: float | None = None  # score scale; None: head_dim**-0.5 (Gemma: query_pre_attn_scalar**-0.5)
  final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap) (Gemma 2/3)
  dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"
  param_dtype: str = "float32"
  model_type: str = "pdl"  # Hugging Face model_type it came from; "pdl" for the own model
  # Run the blocks as one nn.scan over params stacked on a leading "layers" axis
  # (params["blocks"], not block_i): compile time and HLO size stay flat in depth. It
  # changes the param tree (stack_layers / unstack_layers convert), not the math.
  scan_layers: bool = False
  remat: str = "none"  # REMATS: what each block saves for the backward pass (same math)
  # pdl_jax.models.attention.IMPLEMENTATIONS: how attention is computed (the same math
  # up to float rounding): "auto" is splash on TPU, cudnn on GPU, the xla einsum on CPU.
  attention: str = "auto"
  # Low-rank adapters (LoRA; pdl_jax.models.lora): rank 0 is off. Each projection named in
  # lora_targets (keys of LORA_TARGETS) gets float32 lora_a [*in, r] and lora_b
  # [r, *out] beside its kernel: y = x W + (lora_alpha / r) * dropout(x) A B.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ()
  lora_dropout: float = 0.0  # on the adapter's input; active only with a "dropout" rng
  base_quant: str = "none"  # BASE_QUANTS: the frozen kernels of lora_targets, stored so
  # The config.json it was read from (export writes it back); no part of eq/hash.
  source_config_json: str | None = dataclasses.field(default=None, compare=False, repr=False)

  def __post_init__(self):
    checks = (("norm", NORMS), ("mlp", MLPS), ("activation", ACTIVATIONS),
              ("positions", POSITIONS), ("rope_type", ROPE_TYPES),
              ("dtype", ("float32", "bfloat16")), ("param_dtype", ("float32", "bfloat16")),
              ("remat", REMATS), ("base_quant", BASE_QUANTS), ("attention", ATTENTIONS))
    for name, allowed in checks:
      if getattr(self, name) not in allowed:
        raise ValueError(f"DecoderConfig.{name}={getattr(self, name)!r} is not supported; "
                         f"supported: {allowed}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}.")
    if self.positions == "rope" and self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim; got {self.head_dim}.")
    if self.local_layers and (len(self.local_layers) != self.num_layers
                              or self.sliding_window is None):
      raise ValueError(f"DecoderConfig.local_layers has {len(self.local_layers)} entries with "
                       f"sliding_window={self.sliding_window}; expected one per layer "
                       f"({self.num_layers}) and a window.")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"DecoderConfig.sliding_window={self.sliding_window}; expected >= 1.")
    bad = sorted(set(self.lora_targets) - set(LORA_TARGETS))
    if bad:
      raise ValueError(f"DecoderConfig.lora_targets has {bad}; supported: "
                       f"{sorted(LORA_TARGETS)}.")
    if self.lora_rank < 0 or (self.lora_rank and not self.lora_targets):
      raise ValueError(f"DecoderConfig.lora_rank={self.lora_rank} with lora_targets="
                       f"{self.lora_targets}: a rank >= 0, and targets when it is > 0.")
    if self.base_quant != "none" and not self.lora_rank:
      raise ValueError(f"DecoderConfig.base_quant={self.base_quant!r} quantises a LoRA "
                       "run's frozen base; set lora_rank > 0.")

  def layer_window(self, i: int) -> int | None:
    """The attention window of layer i: sliding_window on a local layer, else None (full causal)."""
    if self.sliding_window is None or (self.local_layers and not self.local_layers[i]):
      return None
    return self.sliding_window

  def lora_on(self, module: str) -> bool:
    """Whether the projection module `module` ("query", "up", ...) has an adapter."""
    return self.lora_rank > 0 and module in {LORA_TARGETS[t] for t in self.lora_targets}


def from_model_config(model_cfg: Any) -> DecoderConfig:
  """The project's own `ModelConfig` (above) as a DecoderConfig.

  RMSNorm eps 1e-6, SwiGLU, RoPE, no biases; a tied unembedding is scaled by
  d_model**-0.5 (the own model's convention; Hugging Face models have no scale).
  """
  tied = model_cfg.tied_embeddings
  return DecoderConfig(
      vocab_size=model_cfg.vocab_size, d_model=model_cfg.d_model,
      num_layers=model_cfg.num_layers, num_heads=model_cfg.num_heads,
      num_kv_heads=model_cfg.num_heads, head_dim=model_cfg.head_dim,
      mlp_dim=model_cfg.mlp_dim, norm="rms", norm_eps=1e-6,
      mlp="gated", activation="silu", positions="rope", rope_theta=model_cfg.rope_base,
      tied_embeddings=tied, unembed_scale=model_cfg.d_model ** -0.5 if tied else None,
      dtype=model_cfg.dtype, model_type="pdl")

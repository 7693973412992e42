"""One Flax linen decoder for the project's own model and Hugging Face decoder families.

`DecoderConfig` describes the architecture with a few switches (norm kind, MLP kind,
activation, positions, biases, q/k norm, embedding scale, tied unembedding and its
scale, grouped-query attention); `pdl_jax.models.hf.families.read_config` fills it from a
Hugging Face config.json (llama incl. llama3 / linear RoPE scaling, mistral, qwen2,
qwen3, gemma, gpt2), `from_model_config` from the project's own `ModelConfig`.

The call interface is the one of `tests/reference_transformer.Transformer` (the first own model), so `pdl_jax.decode`
drives either:

    __call__(tokens_BxL, positions_BxL=None, key_mask_BxS=None, cache=None,
             cache_index=None, return_hidden=False) -> (logits_BxLxV | hidden_BxLxD, cache)

The KV cache (`init_cache`: {"k", "v"}, [layers, B, KV, S, K] scanned, a tuple of one
[B, KV, S, K] buffer per layer unrolled; head-major) holds the KV heads only; each KV
head serves num_heads / num_kv_heads query heads. Parameter names match
`tests/reference_transformer.Transformer` (the first own model) (embed, block_i/attn/{query,key,value,out},
block_i/{attn_norm,mlp_norm}, block_i/mlp/{gate,up,down}, final_norm, unembed), so
the own model's params run unchanged in the decoder.

Layers (DecoderConfig.scan_layers, .remat): unrolled, the blocks are block_0 ...
block_{n-1}; scanned, one `nn.scan` runs them over params stacked on a leading
"layers" axis under `blocks` (blocks/attn/query/kernel is [layers, D, H, K]), so the
compiled program holds one block whatever the depth; the KV cache is scanned over its
layer axis. `stack_layers` / `unstack_layers` convert between the layouts. remat
wraps each block in `nn.remat` (under the scan too): "full" keeps only each block's
input for the backward pass, "dots" its projections' outputs. Neither changes the
math (tests/test_scan_remat.py).

Speed (XLA:CPU, where the small models train): every projection and the
unembedding is one 2-D [B*L, in] x [in, out] matmul (`Dense2D`, `unembed_logits`),
so no weight gradient contracts a 3-D activation over (B, L), which XLA:CPU lowers
with transposed copies of the incoming gradient; attention runs head-major
(batched over B and the KV heads), so the [B, H, L, S] scores are never
transposed either; RoPE cos/sin are computed once per forward and shared by the
layers; the mask is an additive [B or 1, L, S] float32 bias made once per forward;
the 1/sqrt(head_dim) scale rides on q (on its RoPE tables). A query row with no
key to attend to (left padding) gets garbage output, as before, but now also
passes gradient to its scores: a loss must mask padding positions, which it does.
`tests/test_decoder_speed.py` checks the math against `tests/reference_transformer.Transformer` and
the HLO for the transposes.

LoRA (DecoderConfig.lora_rank > 0; pdl_jax.lora): each targeted projection carries
float32 lora_a [*in, r] and lora_b [r, *out] beside its kernel and adds
(alpha / r) x A B through two thin matmuls; with base_quant int8 / nf4 its kernel is
stored quantised (pdl_jax.models.quant) and dequantised into the matmul. The adapters'
logical axes are their kernel's input or output axes, so they shard with it.

Logical axis names are the project's ("vocab", "embed", "heads", "kv", "mlp") plus
"kv_heads" for the key/value heads: under grouped-query attention there are often
fewer KV heads (1-8) than devices on the model axis, so they cannot share the rule
of the query heads.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pdl_jax.models import quant
from pdl_jax.sharding import constrain

Cache = dict[str, Any]  # {"k", "v"}: stacked arrays or per-layer tuples (init_cache)
# Param collection of the scanned blocks (DecoderConfig.scan_layers): every leaf has
# a leading [num_layers] axis; unrolled, the blocks are block_0 ... block_{n-1}.
SCANNED = "blocks"

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
  sliding_window: int | None = None  # Mistral: refused when a call attends further than this
  dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"
  param_dtype: str = "float32"
  model_type: str = "pdl"  # Hugging Face model_type it came from; "pdl" for the own model
  # Run the blocks as one nn.scan over params stacked on a leading "layers" axis
  # (params["blocks"], not block_i): compile time and HLO size stay flat in depth. It
  # changes the param tree (stack_layers / unstack_layers convert), not the math.
  scan_layers: bool = False
  remat: str = "none"  # REMATS: what each block saves for the backward pass (same math)
  # Low-rank adapters (LoRA; pdl_jax.lora): rank 0 is off. Each projection named in
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
              ("remat", REMATS), ("base_quant", BASE_QUANTS))
    for name, allowed in checks:
      if getattr(self, name) not in allowed:
        raise ValueError(f"DecoderConfig.{name}={getattr(self, name)!r} is not supported; "
                         f"supported: {allowed}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}.")
    if self.positions == "rope" and self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim; got {self.head_dim}.")
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

  def lora_on(self, module: str) -> bool:
    """Whether the projection module `module` ("query", "up", ...) has an adapter."""
    return self.lora_rank > 0 and module in {LORA_TARGETS[t] for t in self.lora_targets}


def from_model_config(model_cfg: Any) -> DecoderConfig:
  """The project's own `pdl_jax.models.transformer.ModelConfig` as a DecoderConfig.

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


def _init(names: tuple[str | None, ...], init=nn.initializers.xavier_uniform()):
  return nn.with_logical_partitioning(init, names)


def _activation(name: str, x: jax.Array) -> jax.Array:
  if name == "silu":
    return nn.silu(x)
  if name == "gelu_tanh":
    return nn.gelu(x, approximate=True)
  if name == "gelu":
    return nn.gelu(x, approximate=False)
  return nn.relu(x)


class Dense2D(nn.Module):
  """x @ kernel over x's last `num_in` axes, computed as one [N, in] @ [in, out] matmul.

  Same parameters as `nn.Dense` / `nn.DenseGeneral` ("kernel" [*in, *out], "bias"
  [*out]) and the same initialisation (the initializer sees the flattened 2-D
  [in, out] shape, as DenseGeneral's does), so param trees and checkpoints are
  unchanged. Why: contracting a [B, L, D] activation over (B, L) for the weight
  gradient makes XLA:CPU copy the incoming [B, L, F] gradient into a transposed
  layout first; with plain reshapes to [B*L, D] around the matmul, both the
  forward and the weight-gradient dot are 2-D matmuls that take transposed
  operands natively (one gemm, no copies).
  """

  out_shape: tuple[int, ...]
  num_in: int  # trailing axes of x contracted with the kernel
  kernel_axes: tuple[str | None, ...]  # logical names of the kernel's axes
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.xavier_uniform()
  # A low-rank adapter (rank 0: none): lora_a [*in, r] (PEFT's init, uniform with
  # bound 1/sqrt(in)) and lora_b [r, *out] (zeros: step 0 is the base), float32.
  lora_rank: int = 0
  lora_scale: float = 1.0  # lora_alpha / lora_rank
  lora_dropout: float = 0.0
  # The kernel stored quantised (frozen LoRA base): "int8" or "nf4" params replace
  # "kernel" (pdl_jax.models.quant), dequantised into the matmul.
  quant: str = "none"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[x.ndim - self.num_in:]
    lead = x.shape[:x.ndim - self.num_in]
    n_in, n_out = math.prod(in_shape), math.prod(self.out_shape)
    base_init = self.kernel_init

    def flat_init(rng, shape, dtype):
      return base_init(rng, (n_in, n_out), dtype).reshape(shape)

    x_NxI = x.astype(self.dtype).reshape(-1, n_in)
    if self.quant == "none":
      kernel = self.param("kernel", _init(self.kernel_axes, flat_init),
                          in_shape + tuple(self.out_shape), self.param_dtype)
      y_NxO = jnp.dot(x_NxI, kernel.astype(self.dtype).reshape(n_in, n_out))
    else:
      # Stored flattened [in, out] (the leading kernel axis names shard them: a split
      # of the head-major H*K axis in m blocks is a split of H when m divides H).
      axes = (self.kernel_axes[0], self.kernel_axes[self.num_in])
      qparams = {name: self.param(name, _init(axes[2 - len(shape):], init), shape, dtype)
                 for name, (shape, dtype, init) in quant.param_specs(
                     self.quant, n_in, n_out, flat_init).items()}
      # Rematerialised: the backward pass dequantises again rather than keeping each
      # dequantised kernel (a compute-dtype copy of the base) from the forward pass,
      # whatever model.remat says; only x and the stored params are kept.
      y_NxO = jax.checkpoint(lambda x_, q_: jnp.dot(
          x_, quant.dequantize(self.quant, q_, self.dtype)))(x_NxI, qparams)
    if self.lora_rank:
      r = self.lora_rank
      bound = 1.0 / math.sqrt(n_in)
      a = self.param("lora_a", _init(self.kernel_axes[:self.num_in] + (None,),
                                     lambda k, s, d: jax.random.uniform(
                                         k, s, d, -bound, bound)),
                     in_shape + (r,), jnp.float32)
      b = self.param("lora_b", _init((None,) + self.kernel_axes[self.num_in:],
                                     nn.initializers.zeros),
                     (r,) + tuple(self.out_shape), jnp.float32)
      x_in = x_NxI
      if self.lora_dropout > 0 and self.has_rng("dropout"):
        x_in = nn.Dropout(self.lora_dropout, deterministic=False)(x_in)
      # Two thin matmuls ([N, in] x [in, r], [N, r] x [r, out]): never the [in, out]
      # product, so the adapter costs 2 r (in + out) flops per row, not in x out.
      low_NxR = jnp.dot(x_in, a.astype(self.dtype).reshape(n_in, r))
      y_NxO = y_NxO + jnp.dot(low_NxR * jnp.asarray(self.lora_scale, self.dtype),
                              b.astype(self.dtype).reshape(r, n_out))
    if self.use_bias:
      bias = self.param("bias", _init(self.kernel_axes[self.num_in:], nn.initializers.zeros),
                        tuple(self.out_shape), self.param_dtype)
      y_NxO = y_NxO + bias.astype(self.dtype).reshape(n_out)
    return y_NxO.reshape(lead + tuple(self.out_shape))


num_in_axes = quant.num_in_axes  # input axes of a projection's kernel, by module name


def lora_fields(cfg: DecoderConfig, module: str) -> dict[str, Any]:
  """Dense2D's adapter and quantisation fields for the projection `module`."""
  if not cfg.lora_on(module):
    return {}
  return dict(lora_rank=cfg.lora_rank, lora_scale=cfg.lora_alpha / cfg.lora_rank,
              lora_dropout=cfg.lora_dropout, quant=cfg.base_quant)


class Norm(nn.Module):
  """RMSNorm (x*w or Gemma's x*(1+w)) or LayerNorm with bias; statistics in float32."""

  kind: str
  eps: float
  param_dtype: Any = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    # Gemma stores the scale offset by one: zeros are the identity.
    one_init = nn.initializers.zeros if self.kind == "rms_plus_one" else nn.initializers.ones
    scale = self.param("scale", _init((self.axis_name,), one_init), (dim,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    if self.kind == "layer":
      bias = self.param("bias", _init((self.axis_name,), nn.initializers.zeros), (dim,),
                        self.param_dtype)
      mean = jnp.mean(x32, axis=-1, keepdims=True)
      var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
      y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
      return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    w = scale.astype(jnp.float32)
    if self.kind == "rms_plus_one":
      w = 1.0 + w
    # Scale in float32 then cast (as the own model; Llama casts first: equal in float32).
    return (y * w).astype(x.dtype)


def inverse_frequencies(cfg: DecoderConfig) -> np.ndarray:
  """RoPE inverse frequencies [head_dim/2] (float32), with linear / llama3 scaling.

  Computed in numpy as Hugging Face does in torch: 1 / theta**(arange(0, K, 2) / K),
  so the angles match to the last bit or close to it.
  """
  k = cfg.head_dim
  exponent = np.arange(0, k, 2, dtype=np.int64).astype(np.float32) / np.float32(k)
  inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
  if cfg.rope_type == "linear":
    inv_freq = inv_freq / np.float32(cfg.rope_factor)
  elif cfg.rope_type == "llama3":
    # Llama 3.1: low frequencies (long wavelengths) divided by factor, high ones kept,
    # a smooth blend in between (transformers' _compute_llama3_parameters).
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_len
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv_freq


def rotary_tables(positions_BxL: jax.Array, inv_freq_K2: np.ndarray
                  ) -> tuple[jax.Array, jax.Array]:
  """cos and sin [B, L, 1, K/2] (float32) of the RoPE angles; computed once per forward
  and shared by every layer (XLA does not reliably hoist them out of the layers)."""
  angle_BxLxK2 = positions_BxL[..., None].astype(jnp.float32) * jnp.asarray(inv_freq_K2)
  return jnp.cos(angle_BxLxK2)[:, :, None, :], jnp.sin(angle_BxLxK2)[:, :, None, :]


def apply_rotary(x_BxLxHxK: jax.Array, cos_BxLx1xK2: jax.Array, sin_BxLx1xK2: jax.Array
                 ) -> jax.Array:
  """Rotate-half RoPE (first half / second half of the head), as Hugging Face Llama."""
  half = x_BxLxHxK.shape[-1] // 2
  x = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos_BxLx1xK2 - x2 * sin_BxLx1xK2,
                         x2 * cos_BxLx1xK2 + x1 * sin_BxLx1xK2], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


def rotary(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, inv_freq_K2: np.ndarray
           ) -> jax.Array:
  """Rotate-half RoPE at integer positions (tables and rotation in one call)."""
  return apply_rotary(x_BxLxHxK, *rotary_tables(positions_BxL, inv_freq_K2))


class Attention(nn.Module):
  """Causal attention with grouped KV heads, optional biases, q/k norm and KV cache.

  rope_tables: (cos, sin) [B, L, 1, K/2] from `rotary_tables` (None for learned
  positions); bias_BxLxS: additive mask bias, 0 where a query may attend and -1e30
  elsewhere (leading axis 1 when it is the same for every row).
  """

  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x_BxLxD, rope_tables, bias_BxLxS, kv=None, cache_index=None):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    h, g, k = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def proj(name, heads, heads_axis):
      return Dense2D((heads, k), 1, ("embed", heads_axis, "kv"), use_bias=cfg.qkv_bias,
                     dtype=dtype, param_dtype=pdtype, name=name,
                     **lora_fields(cfg, name))(x_BxLxD)

    q_BxLxHxK = constrain(proj("query", h, "heads"), "batch", "length", "heads", "kv")
    k_BxLxGxK = constrain(proj("key", g, "kv_heads"), "batch", "length", "kv_heads", "kv")
    v_BxLxGxK = constrain(proj("value", g, "kv_heads"), "batch", "length", "kv_heads", "kv")
    if cfg.qk_norm:
      q_BxLxHxK = Norm("rms", cfg.norm_eps, pdtype, "kv", name="q_norm")(q_BxLxHxK)
      k_BxLxGxK = Norm("rms", cfg.norm_eps, pdtype, "kv", name="k_norm")(k_BxLxGxK)
    # The 1/sqrt(K) score scale is folded into q ([B, L, H, K] multiplies, or none
    # at all with RoPE: it rides on q's cos/sin) instead of scaling [B, H, L, S].
    scale = k ** -0.5
    if rope_tables is not None:
      cos_BxLx1xK2, sin_BxLx1xK2 = rope_tables
      q_BxLxHxK = apply_rotary(q_BxLxHxK, cos_BxLx1xK2 * scale, sin_BxLx1xK2 * scale)
      k_BxLxGxK = apply_rotary(k_BxLxGxK, cos_BxLx1xK2, sin_BxLx1xK2)
    else:
      q_BxLxHxK = q_BxLxHxK * jnp.asarray(scale, q_BxLxHxK.dtype)
    # Keys and values head-major ([B, G, S, K]): the cache is stored so, and the
    # attention reads it as [B * G, S, K] without a copy of the whole cache per token.
    k_BxGxLxK, v_BxGxLxK = k_BxLxGxK.transpose(0, 2, 1, 3), v_BxLxGxK.transpose(0, 2, 1, 3)
    if kv is not None:  # write this chunk into the cache, attend over all of it
      k_cache, v_cache = kv
      k_BxGxSxK = jax.lax.dynamic_update_slice_in_dim(
          k_cache, k_BxGxLxK.astype(k_cache.dtype), cache_index, axis=2)
      v_BxGxSxK = jax.lax.dynamic_update_slice_in_dim(
          v_cache, v_BxGxLxK.astype(v_cache.dtype), cache_index, axis=2)
      kv = (k_BxGxSxK, v_BxGxSxK)
    else:
      k_BxGxSxK, v_BxGxSxK = k_BxGxLxK, v_BxGxLxK
    b, l, s = q_BxLxHxK.shape[0], q_BxLxHxK.shape[1], k_BxGxSxK.shape[2]
    r = h // g
    # Head-major layouts, so both attention matmuls (and their gradients) are plain
    # batched matmuls over N = B * G (one batch axis: a size-1 G axis of its own
    # would cost layout copies), with the R query heads that share a KV head
    # stacked with the L queries (M = R * L rows): XLA:CPU then copies only q, k, v
    # and the output ([B, L, H, K] each), never the [B, H, L, S] scores. Query head i
    # uses KV head i // R, the order of transformers' repeat_kv.
    q_BxGxMxK = q_BxLxHxK.reshape(b, l, g, r, k).transpose(0, 2, 3, 1, 4).reshape(
        b, g, r * l, k)
    # With a cache, the matmuls read the updated [B, G, S, K] buffers as they are
    # (batch axes B and G): reshaping them to [B * G, S, K] makes XLA:CPU duplicate
    # each cache update into the reshape's fusion, every duplicate starting from a
    # copy of the whole cache (tests/test_decoder_speed.py, in place).
    if kv is not None:
      attend = lambda spec, x, y, **kw: jnp.einsum(spec.replace("n", "bg"), x, y, **kw)
      k_xSxK, v_xSxK = k_BxGxSxK.astype(dtype), v_BxGxSxK.astype(dtype)
      q_xMxK = q_BxGxMxK
    else:
      attend = jnp.einsum
      k_xSxK = k_BxGxSxK.astype(dtype).reshape(b * g, s, k)
      v_xSxK = v_BxGxSxK.astype(dtype).reshape(b * g, s, k)
      q_xMxK = q_BxGxMxK.reshape(b * g, r * l, k)
    logits_xMxS = attend("nmk,nsk->nms", q_xMxK, k_xSxK, preferred_element_type=jnp.float32)
    # An add of the [B or 1, L, S] bias, not a `where` on a broadcast boolean mask:
    # no [B, H, L, S] predicate in the forward or backward pass. score - 1e30
    # rounds to exactly -1e30 in float32, as the `where` gave. Row m of M is query
    # m % L: the bias is tiled R times along M.
    bias_Bx1xMxS = (jnp.tile(bias_BxLxS, (1, r, 1)) if r > 1 else bias_BxLxS)[:, None]
    logits_BxGxMxS = logits_xMxS.reshape(b, g, r * l, s) + bias_Bx1xMxS
    probs_xMxS = jax.nn.softmax(logits_BxGxMxS, axis=-1).astype(dtype).reshape(
        logits_xMxS.shape)
    out_NxMxK = attend("nms,nsk->nmk", probs_xMxS, v_xSxK).reshape(b * g, r * l, k)
    out_BxLxHxK = out_NxMxK.reshape(b, g, r, l, k).transpose(0, 3, 1, 2, 4).reshape(
        b, l, h, k)
    out_BxLxD = Dense2D((cfg.d_model,), 2, ("heads", "kv", "embed"), use_bias=cfg.out_bias,
                        dtype=dtype, param_dtype=pdtype, name="out",
                        **lora_fields(cfg, "out"))(out_BxLxHxK)
    return out_BxLxD, kv


class MLP(nn.Module):
  """Gated (SwiGLU / GeGLU) or plain (GPT-2) MLP."""

  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

    def dense(features, name, axes):
      return Dense2D((features,), 1, axes, use_bias=cfg.mlp_bias, dtype=dtype,
                     param_dtype=pdtype, name=name, **lora_fields(cfg, name))

    up_BxLxF = dense(cfg.mlp_dim, "up", ("embed", "mlp"))(x_BxLxD)
    if cfg.mlp == "gated":
      gate_BxLxF = dense(cfg.mlp_dim, "gate", ("embed", "mlp"))(x_BxLxD)
      hidden_BxLxF = _activation(cfg.activation, gate_BxLxF) * up_BxLxF
    else:
      hidden_BxLxF = _activation(cfg.activation, up_BxLxF)
    hidden_BxLxF = constrain(hidden_BxLxF, "batch", "length", "mlp")
    return dense(cfg.d_model, "down", ("mlp", "embed"))(hidden_BxLxF)


class Block(nn.Module):
  """Pre-norm residual block: attention, then MLP."""

  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x_BxLxD, rope_tables, bias_BxLxS, kv=None, cache_index=None):
    cfg = self.cfg
    pdtype = jnp.dtype(cfg.param_dtype)
    # Activations stay split over the batch (data x fsdp) at every residual; the
    # weights are what moves (pdl_jax.sharding.constrain).
    x_BxLxD = constrain(x_BxLxD, "batch", "length", "embed")
    attn, kv = Attention(cfg, name="attn")(
        Norm(cfg.norm, cfg.norm_eps, pdtype, name="attn_norm")(x_BxLxD), rope_tables,
        bias_BxLxS, kv, cache_index)
    x_BxLxD = constrain(x_BxLxD + attn, "batch", "length", "embed")
    x_BxLxD = x_BxLxD + MLP(cfg, name="mlp")(
        Norm(cfg.norm, cfg.norm_eps, pdtype, name="mlp_norm")(x_BxLxD))
    return constrain(x_BxLxD, "batch", "length", "embed"), kv


def _remat_block(cfg: DecoderConfig) -> type[nn.Module]:
  """Block, or Block under nn.remat with cfg.remat's policy.

  "dots" uses dots_with_no_batch_dims_saveable: every projection (Dense2D's 2-D
  [B*L, in] x [in, out] matmul, no batch dimension) is saved, while the attention
  matmuls (batched over B * KV heads) are recomputed: their [B*G, R*L, S] scores and
  probabilities grow with L * S, the activations worth not keeping. checkpoint_dots
  would save those too. Under nn.scan, prevent_cse=False as the Flax docs advise
  (the scan already keeps XLA from merging the recomputation into the forward pass;
  the extra barriers would only cost speed).
  """
  if cfg.remat == "none":
    return Block
  policy = (None if cfg.remat == "full"  # jax.checkpoint's default: nothing saveable
            else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  return nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)


class Decoder(nn.Module):
  """Decoder-only LM with the call interface of `tests/reference_transformer.Transformer` (the first own model).

  key_mask_BxS marks real (non-padding) keys; attention is causal by buffer index.
  segment_ids_BxL (packed rows, no cache): attention stays within equal ids.
  With return_hidden=True the final-norm hidden states are returned and
  `unembed_matrix()` gives the [D, V] output projection (for the chunked loss).
  """

  cfg: DecoderConfig

  def setup(self):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=pdtype,
                          embedding_init=_init(("vocab", "embed"), nn.initializers.normal(1.0)),
                          name="embed")
    if cfg.positions == "learned":
      self.pos_embed = nn.Embed(cfg.max_len, cfg.d_model, dtype=dtype, param_dtype=pdtype,
                                embedding_init=_init((None, "embed"),
                                                     nn.initializers.normal(0.02)),
                                name="pos_embed")
    block_cls = _remat_block(cfg)
    if cfg.scan_layers:
      # One scanned block: params stacked on a leading axis named "layers" (never
      # sharded), the KV cache scanned over its layer axis (in/out axis 0), the RoPE
      # tables, the mask bias and cache_index broadcast to every layer.
      self.blocks = nn.scan(
          block_cls, variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},  # LoRA dropout: a mask per layer
          in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), out_axes=0,
          length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, name=SCANNED)
    else:
      self.blocks = [block_cls(cfg, name=f"block_{i}") for i in range(cfg.num_layers)]
    self.final_norm = Norm(cfg.norm, cfg.norm_eps, pdtype, name="final_norm")
    if not cfg.tied_embeddings:
      self.unembed = self.param(
          "unembed", _init(("embed", "vocab"), nn.initializers.normal(cfg.d_model ** -0.5)),
          (cfg.d_model, cfg.vocab_size), pdtype)

  def unembed_matrix(self) -> jax.Array:
    """[D, V] output projection: the (scaled, for the own model) embedding when tied."""
    if not self.cfg.tied_embeddings:
      return self.unembed
    w_DxV = self.embed.embedding.T
    if self.cfg.unembed_scale not in (None, 1, 1.0):
      w_DxV = w_DxV * self.cfg.unembed_scale
    return w_DxV

  def unembed_logits(self, hidden_xD: jax.Array) -> jax.Array:
    """Float32 logits [..., V] of final-norm hidden states [..., D] (any leading axes).

    One [N, D] x [D, V] matmul on the flattened rows; when tied, it contracts the
    [V, D] embedding's D axis directly (no transposed copy of the embedding, and its
    gradient comes out as [V, D]). Use it with `return_hidden=True` to compute logits
    only where the loss is (`pdl_jax.losses.window`).
    """
    cfg = self.cfg
    lead, d = hidden_xD.shape[:-1], hidden_xD.shape[-1]
    hidden_NxD = hidden_xD.reshape(-1, d)
    if cfg.tied_embeddings:
      w_VxD = self.embed.embedding
      if cfg.unembed_scale not in (None, 1, 1.0):
        w_VxD = w_VxD * cfg.unembed_scale
      logits_NxV = jax.lax.dot_general(
          hidden_NxD, w_VxD.astype(hidden_NxD.dtype), (((1,), (1,)), ((), ())),
          preferred_element_type=jnp.float32)
    else:
      logits_NxV = jnp.matmul(hidden_NxD, self.unembed.astype(hidden_NxD.dtype),
                              preferred_element_type=jnp.float32)
    return logits_NxV.reshape(lead + (cfg.vocab_size,))

  def __call__(self, tokens_BxL, positions_BxL=None, key_mask_BxS=None, cache=None,
               cache_index=None, return_hidden=False, segment_ids_BxL=None):
    cfg = self.cfg
    b, l = tokens_BxL.shape
    if segment_ids_BxL is not None and cache is not None:
      raise ValueError("segment_ids (packed rows) are for training without a KV cache.")
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(l), (b, l))
    if cache is None:
      s, query_index = l, jnp.arange(l)
    else:
      s, query_index = cache_length(cache), cache_index + jnp.arange(l)
    if cfg.sliding_window is not None and s > cfg.sliding_window:
      raise ValueError(
          f"{cfg.model_type}: sliding-window attention (window {cfg.sliding_window}) is not "
          f"supported and this call attends over {s} positions; use sequences of at most "
          f"{cfg.sliding_window} tokens (then it equals full causal attention).")
    if cfg.positions == "learned" and s > cfg.max_len:
      raise ValueError(f"{cfg.model_type}: {s} positions exceed the {cfg.max_len} learned "
                       "position embeddings.")
    allowed_1xLxS = (jnp.arange(s)[None, :] <= query_index[:, None])[None]
    if key_mask_BxS is not None:
      allowed_1xLxS = allowed_1xLxS & key_mask_BxS[:, None, :].astype(bool)
    if segment_ids_BxL is not None:
      # Packed rows (pdl_jax.data.pack_examples): a token attends within its own
      # segment only; with positions restarting per segment, each example sees what
      # it would alone in a row.
      allowed_1xLxS = allowed_1xLxS & (segment_ids_BxL[:, :, None]
                                       == segment_ids_BxL[:, None, :])
    # Additive float32 bias, made once per forward (shape [1, L, S] without a key
    # mask: broadcast in the add, never materialised per row).
    bias_BxLxS = jnp.where(allowed_1xLxS, 0.0, -1e30).astype(jnp.float32)
    rope_tables = (rotary_tables(positions_BxL, inverse_frequencies(cfg))
                   if cfg.positions == "rope" else None)
    x_BxLxD = self.embed(tokens_BxL)
    if cfg.embed_scale:
      # Gemma multiplies by sqrt(d) rounded to the compute dtype (bf16: 55.5 for d=3072).
      x_BxLxD = x_BxLxD * jnp.asarray(cfg.d_model ** 0.5, x_BxLxD.dtype)
    if cfg.positions == "learned":
      x_BxLxD = x_BxLxD + self.pos_embed(positions_BxL)
    x_BxLxD = constrain(x_BxLxD, "batch", "length", "embed")
    if cfg.scan_layers:
      kv_all = None if cache is None else (cache["k"], cache["v"])  # [layers, B, G, S, K]
      x_BxLxD, kv_all = self.blocks(x_BxLxD, rope_tables, bias_BxLxS, kv_all, cache_index)
      new_cache = None if cache is None else {"k": kv_all[0], "v": kv_all[1]}
    else:
      new_k, new_v = [], []
      for i, block in enumerate(self.blocks):
        kv = None if cache is None else (cache["k"][i], cache["v"][i])
        x_BxLxD, kv = block(x_BxLxD, rope_tables, bias_BxLxS, kv, cache_index)
        if kv is not None:
          new_k.append(kv[0])
          new_v.append(kv[1])
      new_cache = None
      if cache is not None and isinstance(cache["k"], (tuple, list)):
        # One buffer per layer (init_cache's unrolled layout): each layer's
        # dynamic_update_slice writes its new keys in place (in a decoding loop's
        # carry) and nothing else is copied.
        new_cache = {"k": tuple(new_k), "v": tuple(new_v)}
      elif cache is not None:  # a stacked cache: restacked (a copy of all of it)
        new_cache = {"k": jnp.stack(new_k), "v": jnp.stack(new_v)}
    hidden_BxLxD = constrain(self.final_norm(x_BxLxD), "batch", "length", "embed")
    if return_hidden:
      return hidden_BxLxD, new_cache
    return self.unembed_logits(hidden_BxLxD), new_cache


def init_cache(cfg: DecoderConfig, batch: int, length: int) -> Cache:
  """Zero KV cache of the KV heads only, head-major (the layout the attention reads
  without a copy): scanned, {"k", "v"} [layers, B, KV, S, K] (the scan's per-layer
  input); unrolled, {"k", "v"} tuples of one [B, KV, S, K] buffer per layer, so a
  decoding step updates each in place instead of restacking the whole cache."""
  dtype = jnp.dtype(cfg.dtype)
  if cfg.scan_layers:
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
  return {name: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
          for name in ("k", "v")}


def cache_length(cache: Cache) -> int:
  """S, the positions a cache of either layout holds."""
  return cache["k"][0].shape[-2]  # layer 0's buffer, or the stack's first layer


def unembed_DxV(model: Decoder, params) -> jax.Array:
  """The [D, V] output projection of `params` (for the chunked loss)."""
  return model.apply({"params": params}, method=Decoder.unembed_matrix)


_BLOCK = re.compile(r"block_(\d+)$")


def _stack_leaves(*xs):
  if isinstance(xs[0], jax.ShapeDtypeStruct):  # abstract: the shape only, no sharding
    return jax.ShapeDtypeStruct((len(xs),) + tuple(xs[0].shape), xs[0].dtype)
  if all(isinstance(x, np.ndarray) for x in xs):
    return np.stack(xs)
  return jnp.stack(xs)


def _layer_of(x, i: int):
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype)
  return x[i]


def _is_leaf(x) -> bool:
  return isinstance(x, jax.ShapeDtypeStruct)


def stack_layers(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
  """Per-layer params (block_0 ... block_{n-1}) -> the scanned layout: one "blocks"
  tree whose leaves are the layers' leaves stacked on a new leading axis. Other keys
  (embed, final_norm, ...) are kept as they are.

  Leaves may be numpy arrays (stacked with numpy), jax arrays (jnp.stack: a new
  array in whatever sharding XLA picks; jax.device_put it into param_shardings, or
  stack inside a jit with out_shardings) or jax.ShapeDtypeStruct (shape [n, ...], without
  a sharding: a stacked sharding needs the "layers" axis, use param_shardings).
  Unbox nn.LogicallyPartitioned params first (nn.meta.unbox).

  Raises:
    ValueError: the block_i keys are not exactly block_0 ... block_{num_layers-1}.
  """
  found = sorted(int(m.group(1)) for k in params if (m := _BLOCK.match(k)))
  if found != list(range(num_layers)) or SCANNED in params:
    raise ValueError(f"stack_layers needs per-layer params block_0 ... "
                     f"block_{num_layers - 1} (and no {SCANNED!r}); got keys {sorted(params)}.")
  out = {k: v for k, v in params.items() if not _BLOCK.match(k)}
  out[SCANNED] = jax.tree.map(_stack_leaves, *[params[f"block_{i}"] for i in range(num_layers)],
                              is_leaf=_is_leaf)
  return out


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """The inverse of stack_layers: params["blocks"] (leaves [n, ...]) -> block_0 ...
  block_{n-1}; other keys kept. Same leaf types as stack_layers (jax arrays are
  sliced with x[i], ShapeDtypeStructs lose their sharding).

  Raises:
    ValueError: no "blocks" key, or its leaves disagree on the number of layers.
  """
  if SCANNED not in params:
    raise ValueError(f"unstack_layers needs scanned params (a {SCANNED!r} key); got keys "
                     f"{sorted(params)}.")
  leaves = jax.tree.leaves(params[SCANNED], is_leaf=_is_leaf)
  counts = {x.shape[0] for x in leaves}
  if len(counts) != 1:
    raise ValueError(f"params[{SCANNED!r}] leaves disagree on the layer axis: {sorted(counts)}.")
  out = {k: v for k, v in params.items() if k != SCANNED}
  for i in range(counts.pop()):
    out[f"block_{i}"] = jax.tree.map(lambda x, i=i: _layer_of(x, i), params[SCANNED],
                                     is_leaf=_is_leaf)
  return out

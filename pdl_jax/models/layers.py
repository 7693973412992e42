"""The decoder's layers: 2-D projections (with LoRA and quantised kernels), norms,
rotary positions, attention, the MLP and the block.

Speed (XLA:CPU, where the small models train): every projection is one 2-D
[B*L, in] x [in, out] matmul (`Dense2D`), so no weight gradient contracts a 3-D
activation over (B, L), which XLA:CPU lowers with transposed copies of the incoming
gradient; attention runs head-major (batched over B and the KV heads), so the
[B, H, L, S] scores are never transposed either; RoPE cos/sin are computed once per
forward and shared by the layers; the mask is an additive [B or 1, L, S] float32
bias made once per forward (attention.Mask; the kernels of pdl_jax.models.attention
read its segment ids instead); the 1/sqrt(head_dim) scale rides on q (on its RoPE
tables). A query row with no key to attend to (left padding) gets garbage output
and passes gradient to its scores: a loss must mask padding positions, which it
does.

LoRA (DecoderConfig.lora_rank > 0; pdl_jax.models.lora): each targeted projection
carries float32 lora_a [*in, r] and lora_b [r, *out] beside its kernel and adds
(alpha / r) x A B through two thin matmuls; with base_quant int8 / nf4 its kernel is
stored quantised (pdl_jax.models.quant) and dequantised into the matmul. The
adapters' logical axes are their kernel's input or output axes, so they shard with
it. Logical axis names are the project's ("vocab", "embed", "heads", "kv", "mlp")
plus "kv_heads" for the key/value heads: under grouped-query attention there are
often fewer KV heads (1-8) than devices on the model axis.
"""

from __future__ import annotations

import math
from typing import Any
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from pdl_jax.models import attention
from pdl_jax.models import quant
from pdl_jax.sharding import constrain
from pdl_jax.models import config as model_config


def param_init(names: tuple[str | None, ...], init=nn.initializers.xavier_uniform()):
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
      kernel = self.param("kernel", param_init(self.kernel_axes, flat_init),
                          in_shape + tuple(self.out_shape), self.param_dtype)
      y_NxO = jnp.dot(x_NxI, kernel.astype(self.dtype).reshape(n_in, n_out))
    else:
      # Stored flattened [in, out] (the leading kernel axis names shard them: a split
      # of the head-major H*K axis in m blocks is a split of H when m divides H).
      axes = (self.kernel_axes[0], self.kernel_axes[self.num_in])
      qparams = {name: self.param(name, param_init(axes[2 - len(shape):], init), shape, dtype)
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
      a = self.param("lora_a", param_init(self.kernel_axes[:self.num_in] + (None,),
                                     lambda k, s, d: jax.random.uniform(
                                         k, s, d, -bound, bound)),
                     in_shape + (r,), jnp.float32)
      b = self.param("lora_b", param_init((None,) + self.kernel_axes[self.num_in:],
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
      bias = self.param("bias", param_init(self.kernel_axes[self.num_in:], nn.initializers.zeros),
                        tuple(self.out_shape), self.param_dtype)
      y_NxO = y_NxO + bias.astype(self.dtype).reshape(n_out)
    return y_NxO.reshape(lead + tuple(self.out_shape))


num_in_axes = quant.num_in_axes  # input axes of a projection's kernel, by module name


def lora_fields(cfg: model_config.DecoderConfig, module: str) -> dict[str, Any]:
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
    scale = self.param("scale", param_init((self.axis_name,), one_init), (dim,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    if self.kind == "layer":
      bias = self.param("bias", param_init((self.axis_name,), nn.initializers.zeros), (dim,),
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


def inverse_frequencies(cfg: model_config.DecoderConfig) -> np.ndarray:
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
  positions); mask: an attention.Mask, whose bias_BxLxS is the additive mask bias, 0
  where a query may attend and -1e30 elsewhere (leading axis 1 when it is the same
  for every row), with the segment ids and key mask it was made from (the kernels');
  local: whether this layer is windowed (cfg.sliding_window): a bool, a traced flag
  under a scan over layers of two kinds, or None when every layer is alike
  (cfg.layer_window(0) then says).
  """

  cfg: model_config.DecoderConfig

  @nn.compact
  def __call__(self, x_BxLxD, rope_tables, mask, kv=None, cache_index=None, local=None):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    h, g, k = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if local is None:  # every layer alike
      local = cfg.layer_window(0) is not None

    def proj(name, heads, heads_axis):
      return Dense2D((heads, k), 1, ("embed", heads_axis, "kv"), use_bias=cfg.qkv_bias,
                     dtype=dtype, param_dtype=pdtype, name=name,
                     **lora_fields(cfg, name))(x_BxLxD)

    q_BxLxHxK = constrain(proj("query", h, "heads"), "batch", "length", "heads", "kv")
    k_BxLxGxK = constrain(proj("key", g, "kv_heads"), "batch", "length", "kv_heads", "kv")
    v_BxLxGxK = constrain(proj("value", g, "kv_heads"), "batch", "length", "kv_heads", "kv")
    if cfg.qk_norm:  # the model's RMS kind: x * w (Qwen3) or x * (1 + w) (Gemma 3)
      q_BxLxHxK = Norm(cfg.norm, cfg.norm_eps, pdtype, "kv", name="q_norm")(q_BxLxHxK)
      k_BxLxGxK = Norm(cfg.norm, cfg.norm_eps, pdtype, "kv", name="k_norm")(k_BxLxGxK)
    # The score scale (1/sqrt(K), or Gemma's query_pre_attn_scalar**-0.5) is folded
    # into q ([B, L, H, K] multiplies, or none at all with RoPE: it rides on q's
    # cos/sin) instead of scaling [B, H, L, S].
    scale = k ** -0.5 if cfg.query_scale is None else cfg.query_scale
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
    # The scores, softmax and weighted values: pdl_jax.models.attention (cfg.attention
    # picks the einsum, the splash kernel or cuDNN; with a cache, the einsum).
    out_BxLxHxK = attention.attend(
        cfg.attention, q_BxLxHxK, k_BxGxSxK, v_BxGxSxK, mask.bias_BxLxS, dtype=dtype,
        cached=kv is not None, segment_ids_BxL=mask.segment_ids_BxL,
        key_mask_BxS=mask.key_mask_BxS, window=cfg.sliding_window, local=local)
    out_BxLxD = Dense2D((cfg.d_model,), 2, ("heads", "kv", "embed"), use_bias=cfg.out_bias,
                        dtype=dtype, param_dtype=pdtype, name="out",
                        **lora_fields(cfg, "out"))(out_BxLxHxK)
    return out_BxLxD, kv


class MLP(nn.Module):
  """Gated (SwiGLU / GeGLU) or plain (GPT-2) MLP."""

  cfg: model_config.DecoderConfig

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
  """Pre-norm residual block: attention, then MLP (Gemma 2/3: each output normed too).

  rope_tables and mask (attention.Mask) are this layer's; under a scan over layers
  of two kinds (local and global, Gemma 3) the tables and the mask's bias are
  (global, local) pairs and `local` is the layer's traced flag that picks one (an
  elementwise select of the [B or 1, L, S] bias and the tables per layer, cheap
  beside the attention). Unrolled, `local` is the layer's bool; None: every layer
  alike.
  """

  cfg: model_config.DecoderConfig

  @nn.compact
  def __call__(self, x_BxLxD, rope_tables, mask, kv=None, cache_index=None,
               local=None):
    cfg = self.cfg
    pdtype = jnp.dtype(cfg.param_dtype)
    if local is not None and not isinstance(local, bool):  # a scan's traced flag
      pick = lambda g, l: jnp.where(local, l, g)
      rope_tables = jax.tree.map(pick, *rope_tables)
      mask = mask._replace(bias_BxLxS=pick(*mask.bias_BxLxS))
    norm = lambda name: Norm(cfg.norm, cfg.norm_eps, pdtype, name=name)
    # Activations stay split over the batch (data x fsdp) at every residual; the
    # weights are what moves (pdl_jax.sharding.constrain).
    x_BxLxD = constrain(x_BxLxD, "batch", "length", "embed")
    attn, kv = Attention(cfg, name="attn")(norm("attn_norm")(x_BxLxD), rope_tables,
                                           mask, kv, cache_index, local)
    if cfg.post_norms:
      attn = norm("attn_post_norm")(attn)
    x_BxLxD = constrain(x_BxLxD + attn, "batch", "length", "embed")
    mlp = MLP(cfg, name="mlp")(norm("mlp_norm")(x_BxLxD))
    if cfg.post_norms:
      mlp = norm("mlp_post_norm")(mlp)
    x_BxLxD = x_BxLxD + mlp
    return constrain(x_BxLxD, "batch", "length", "embed"), kv

"""The project's first own-model implementation (3-D einsum projections, RoPE inside
every layer, a `where` on the causal mask), kept as an independent reference for the
tests: pdl_jax.models.decoder.Decoder with decoder.from_model_config must give the same
logits and gradients."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pdl_jax.models.config import PRESETS  # noqa: F401  (the tests import them from here)
from pdl_jax.models.config import ModelConfig
from pdl_jax.models.config import preset_config  # noqa: F401

Cache = dict[str, jax.Array]


def _dense_init(names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.xavier_uniform(), names)


class RMSNorm(nn.Module):
  """Root-mean-square norm with a learned scale; statistics in float32."""

  eps: float = 1e-6

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                               ("embed",)),
                         (x_BxLxD.shape[-1],), jnp.float32)
    x = x_BxLxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale_D).astype(x_BxLxD.dtype)


def rotary(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding (rotate-half form) at integer positions."""
  half = x_BxLxHxK.shape[-1] // 2
  freq_K = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxLxK = positions_BxL[..., None].astype(jnp.float32) * freq_K
  sin, cos = jnp.sin(angle_BxLxK)[:, :, None, :], jnp.cos(angle_BxLxK)[:, :, None, :]
  x = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


class Attention(nn.Module):
  """Causal multi-head attention with rotary positions and an optional KV cache."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask_BxLxS, kv=None, cache_index=None):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    h, k = cfg.num_heads, cfg.head_dim

    def proj(name):
      return nn.DenseGeneral((h, k), dtype=dtype, use_bias=False, name=name,
                             kernel_init=_dense_init(("embed", "heads", "kv")))

    q_BxLxHxK = rotary(proj("query")(x_BxLxD), positions_BxL, cfg.rope_base)
    k_BxLxHxK = rotary(proj("key")(x_BxLxD), positions_BxL, cfg.rope_base)
    v_BxLxHxK = proj("value")(x_BxLxD)
    if kv is not None:  # write this chunk into the cache, attend over all of it
      k_cache, v_cache = kv
      k_BxSxHxK = jax.lax.dynamic_update_slice_in_dim(
          k_cache, k_BxLxHxK.astype(k_cache.dtype), cache_index, axis=1)
      v_BxSxHxK = jax.lax.dynamic_update_slice_in_dim(
          v_cache, v_BxLxHxK.astype(v_cache.dtype), cache_index, axis=1)
      kv = (k_BxSxHxK, v_BxSxHxK)
    else:
      k_BxSxHxK, v_BxSxHxK = k_BxLxHxK, v_BxLxHxK
    logits_BxHxLxS = jnp.einsum("blhk,bshk->bhls", q_BxLxHxK, k_BxSxHxK.astype(dtype),
                                preferred_element_type=jnp.float32) * k ** -0.5
    logits_BxHxLxS = jnp.where(mask_BxLxS[:, None], logits_BxHxLxS, -1e30)
    probs = jax.nn.softmax(logits_BxHxLxS, axis=-1).astype(dtype)
    out_BxLxHxK = jnp.einsum("bhls,bshk->blhk", probs, v_BxSxHxK.astype(dtype))
    out_BxLxD = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), dtype=dtype, use_bias=False,
                                kernel_init=_dense_init(("heads", "kv", "embed")),
                                name="out")(out_BxLxHxK)
    return out_BxLxD, kv


class MLP(nn.Module):
  """Gated MLP: down(silu(gate(x)) * up(x))."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    gate = nn.Dense(cfg.mlp_dim, use_bias=False, dtype=dtype, name="gate",
                    kernel_init=_dense_init(("embed", "mlp")))(x_BxLxD)
    up = nn.Dense(cfg.mlp_dim, use_bias=False, dtype=dtype, name="up",
                  kernel_init=_dense_init(("embed", "mlp")))(x_BxLxD)
    return nn.Dense(cfg.d_model, use_bias=False, dtype=dtype, name="down",
                    kernel_init=_dense_init(("mlp", "embed")))(nn.silu(gate) * up)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask_BxLxS, kv=None, cache_index=None):
    attn, kv = Attention(self.cfg, name="attn")(
        RMSNorm(name="attn_norm")(x_BxLxD), positions_BxL, mask_BxLxS, kv, cache_index)
    x_BxLxD = x_BxLxD + attn
    x_BxLxD = x_BxLxD + MLP(self.cfg, name="mlp")(RMSNorm(name="mlp_norm")(x_BxLxD))
    return x_BxLxD, kv


class Transformer(nn.Module):
  """Decoder-only LM.

  __call__(tokens_BxL, positions_BxL=None, key_mask_BxS=None, cache=None,
  cache_index=None, return_hidden=False) -> (logits_BxLxV or hidden_BxLxD, cache).

  key_mask_BxS marks real (non-padding) keys; attention is causal by buffer index.
  With return_hidden=True the final-norm hidden states are returned and
  `unembed_DxV(model, params)` gives the output projection, for the chunked loss.
  """

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype),
                          embedding_init=nn.with_logical_partitioning(
                              nn.initializers.normal(1.0), ("vocab", "embed")),
                          name="embed")
    self.blocks = [Block(cfg, name=f"block_{i}") for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(name="final_norm")
    if not cfg.tied_embeddings:
      self.unembed = self.param(
          "unembed", nn.with_logical_partitioning(nn.initializers.normal(cfg.d_model ** -0.5),
                                                  ("embed", "vocab")),
          (cfg.d_model, cfg.vocab_size), jnp.float32)

  def unembed_matrix(self) -> jax.Array:
    """[D, V] output projection (the scaled embedding when tied)."""
    if self.cfg.tied_embeddings:
      return self.embed.embedding.T * self.cfg.d_model ** -0.5
    return self.unembed

  def __call__(self, tokens_BxL, positions_BxL=None, key_mask_BxS=None, cache=None,
               cache_index=None, return_hidden=False):
    b, l = tokens_BxL.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(l), (b, l))
    if cache is None:
      s, query_index = l, jnp.arange(l)
    else:
      s, query_index = cache["k"].shape[2], cache_index + jnp.arange(l)
    causal_LxS = jnp.arange(s)[None, :] <= query_index[:, None]
    mask_BxLxS = jnp.broadcast_to(causal_LxS, (b, l, s))
    if key_mask_BxS is not None:
      mask_BxLxS = mask_BxLxS & key_mask_BxS[:, None, :].astype(bool)
    x_BxLxD = self.embed(tokens_BxL)
    new_k, new_v = [], []
    for i, block in enumerate(self.blocks):
      kv = None if cache is None else (cache["k"][i], cache["v"][i])
      x_BxLxD, kv = block(x_BxLxD, positions_BxL, mask_BxLxS, kv, cache_index)
      if kv is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
    hidden_BxLxD = self.final_norm(x_BxLxD)
    new_cache = None if cache is None else {"k": jnp.stack(new_k), "v": jnp.stack(new_v)}
    if return_hidden:
      return hidden_BxLxD, new_cache
    logits_BxLxV = jnp.matmul(hidden_BxLxD, self.unembed_matrix().astype(hidden_BxLxD.dtype),
                              preferred_element_type=jnp.float32)
    return logits_BxLxV, new_cache


def init_cache(cfg: ModelConfig, batch: int, length: int) -> Cache:
  """Zero KV cache [layers, B, S, H, K] for decoding `length` positions."""
  shape = (cfg.num_layers, batch, length, cfg.num_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, jnp.dtype(cfg.dtype)), "v": jnp.zeros(shape, jnp.dtype(cfg.dtype))}


def unembed_DxV(model: Transformer, params) -> jax.Array:
  """The [D, V] output projection of `params` (for the chunked loss)."""
  return model.apply({"params": params}, method=Transformer.unembed_matrix)

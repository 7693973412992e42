"""One Flax linen decoder for the project's own model and Hugging Face decoder
families (its configuration: pdl_jax.models.config; its layers:
pdl_jax.models.layers).

    __call__(tokens_BxL, positions_BxL=None, key_mask_BxS=None, cache=None,
             cache_index=None, return_hidden=False) -> (logits_BxLxV | hidden_BxLxD, cache)

The KV cache (`init_cache`: {"k", "v"}, [layers, B, KV, S, K] scanned, a tuple of one
[B, KV, S, K] buffer per layer unrolled; head-major) holds the KV heads only; each KV
head serves num_heads / num_kv_heads query heads. Parameter names: embed,
block_i/attn/{query,key,value,out}, block_i/{attn_norm,mlp_norm},
block_i/{attn_post_norm,mlp_post_norm} (post_norms), block_i/mlp/{gate,up,down},
final_norm, unembed.

Sliding-window attention (DecoderConfig.sliding_window, .local_layers): every layer
(Mistral) or the local ones (Gemma 2/3, with their own RoPE base) see only the last
`window` keys; the mask (`attention_allowed`) is banded, causal and packing-aware
in training. Decoding keeps the full cache on every layer and masks the band: the
simplest exact choice; a local layer then stores and reads S positions where it needs
`window` (Gemma 3 270M: 15 of 18 layers local, window 512; at S <= 512 nothing is
lost, at S = 2048 the local layers read 4x the keys a ring buffer would).

Layers (DecoderConfig.scan_layers, .remat): unrolled, the blocks are block_0 ...
block_{n-1}; scanned, one `nn.scan` runs them over params stacked on a leading
"layers" axis under `blocks` (blocks/attn/query/kernel is [layers, D, H, K]), so the
compiled program holds one block whatever the depth; the KV cache is scanned over its
layer axis. `stack_layers` / `unstack_layers` convert between the layouts. remat
wraps each block in `nn.remat` (under the scan too): "full" keeps only each block's
input for the backward pass, "dots" its projections' outputs. Neither changes the
math. The unembedding is one 2-D matmul (`unembed_logits`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from pdl_jax.sharding import constrain
from pdl_jax.models import attention
from pdl_jax.models import config as model_config
from pdl_jax.models import layers


Cache = dict[str, Any]  # {"k", "v"}: stacked arrays or per-layer tuples (init_cache)


# Param collection of the scanned blocks (DecoderConfig.scan_layers): every leaf has
# a leading [num_layers] axis; unrolled, the blocks are block_0 ... block_{n-1}.
SCANNED = "blocks"


def _remat_block(cfg: model_config.DecoderConfig) -> type[nn.Module]:
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
    return layers.Block
  policy = (None if cfg.remat == "full"  # jax.checkpoint's default: nothing saveable
            else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  # Unrolled, a block's `local` (is it windowed?) is a Python bool: static, so the
  # attention kernels see their window (argnum 6, counting the module as 0).
  return nn.remat(layers.Block, policy=policy, prevent_cse=not cfg.scan_layers,
                  static_argnums=() if cfg.scan_layers else (6,))


class Decoder(nn.Module):
  """Decoder-only LM with the call interface of `tests/models/reference_transformer.Transformer` (the first own model).

  key_mask_BxS marks real (non-padding) keys; attention is causal by buffer index.
  segment_ids_BxL (packed rows, no cache): attention stays within equal ids.
  With return_hidden=True the final-norm hidden states are returned and
  `unembed_matrix()` gives the [D, V] output projection (for the chunked loss).
  """

  cfg: model_config.DecoderConfig

  def setup(self):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=pdtype,
                          embedding_init=layers.param_init(("vocab", "embed"), nn.initializers.normal(1.0)),
                          name="embed")
    if cfg.positions == "learned":
      self.pos_embed = nn.Embed(cfg.max_len, cfg.d_model, dtype=dtype, param_dtype=pdtype,
                                embedding_init=layers.param_init((None, "embed"),
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
          in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, 0), out_axes=0,
          length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, name=SCANNED)
    else:
      self.blocks = [block_cls(cfg, name=f"block_{i}") for i in range(cfg.num_layers)]
    self.final_norm = layers.Norm(cfg.norm, cfg.norm_eps, pdtype, name="final_norm")
    if not cfg.tied_embeddings:
      self.unembed = self.param(
          "unembed", layers.param_init(("embed", "vocab"), nn.initializers.normal(cfg.d_model ** -0.5)),
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
    if cfg.final_logit_softcap is not None:  # Gemma 2/3: cap * tanh(logits / cap)
      cap = cfg.final_logit_softcap
      logits_NxV = cap * jnp.tanh(logits_NxV / cap)
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
    if cfg.positions == "learned" and s > cfg.max_len:
      raise ValueError(f"{cfg.model_type}: {s} positions exceed the {cfg.max_len} learned "
                       "position embeddings.")
    # One (RoPE tables, mask bias) per kind of layer present: global (full causal)
    # and local (the sliding window, its own RoPE base); made once per forward.
    kinds = {kind: (self._rope_tables(positions_BxL, kind),
                    attention_bias(query_index, s, key_mask_BxS, segment_ids_BxL,
                                   cfg.sliding_window if kind == "local" else None))
             for kind in layer_kinds(cfg)}
    # The bias with what it was made from, for the attention kernels (attention.Mask).
    mask_of = lambda bias: attention.Mask(bias, segment_ids_BxL, key_mask_BxS)
    x_BxLxD = self.embed(tokens_BxL)
    if cfg.embed_scale:
      # Gemma multiplies by sqrt(d) rounded to the compute dtype (bf16: 55.5 for d=3072).
      x_BxLxD = x_BxLxD * jnp.asarray(cfg.d_model ** 0.5, x_BxLxD.dtype)
    if cfg.positions == "learned":
      x_BxLxD = x_BxLxD + self.pos_embed(positions_BxL)
    x_BxLxD = constrain(x_BxLxD, "batch", "length", "embed")
    if cfg.scan_layers:
      kv_all = None if cache is None else (cache["k"], cache["v"])  # [layers, B, G, S, K]
      if len(kinds) == 1:  # every layer alike: broadcast its tables and bias
        (rope_tables, bias_BxLxS), = kinds.values()
        local_flags = None
      else:  # (global, local) pairs; each layer's flag picks one (layers.Block)
        rope_tables = (kinds["global"][0], kinds["local"][0])
        bias_BxLxS = (kinds["global"][1], kinds["local"][1])
        local_flags = jnp.asarray(cfg.local_layers)
      x_BxLxD, kv_all = self.blocks(x_BxLxD, rope_tables, mask_of(bias_BxLxS), kv_all,
                                    cache_index, local_flags)
      new_cache = None if cache is None else {"k": kv_all[0], "v": kv_all[1]}
    else:
      new_k, new_v = [], []
      for i, block in enumerate(self.blocks):
        kv = None if cache is None else (cache["k"][i], cache["v"][i])
        local = cfg.layer_window(i) is not None
        rope_tables, bias_BxLxS = kinds["local" if local else "global"]
        x_BxLxD, kv = block(x_BxLxD, rope_tables, mask_of(bias_BxLxS), kv, cache_index, local)
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

  def _rope_tables(self, positions_BxL, kind: str):
    """RoPE (cos, sin) of one kind of layer; None with learned positions. Local layers
    with their own base (Gemma 3's rope_local_base_freq) use it with default RoPE."""
    cfg = self.cfg
    if cfg.positions != "rope":
      return None
    if kind == "local" and cfg.local_rope_theta is not None:
      cfg = dataclasses.replace(cfg, rope_theta=cfg.local_rope_theta, rope_type="default")
    return layers.rotary_tables(positions_BxL, layers.inverse_frequencies(cfg))


def layer_kinds(cfg: model_config.DecoderConfig) -> list[str]:
  """The kinds of layer cfg has, of "global" (full causal) and "local" (windowed)."""
  windows = {cfg.layer_window(i) is None for i in range(cfg.num_layers)}
  return [kind for kind, is_global in (("global", True), ("local", False))
          if is_global in windows]


def attention_allowed(query_index_L: jax.Array, s: int, key_mask_BxS=None,
                      segment_ids_BxL=None, window: int | None = None) -> jax.Array:
  """Which keys each query may attend to: bool [B or 1, L, S].

  Causal by buffer index (query at buffer index query_index_L[i] sees keys j <=
  it); with a window, also j > i - window (transformers' sliding window: the query
  and window - 1 keys before it). Buffer distance is token distance: a packed
  segment's tokens are contiguous (segment ids keep attention inside it), and a
  decoding row's real tokens are contiguous after its left padding (key_mask_BxS
  marks them). So a packed row sees, per example, what it would alone in a row.
  """
  key_S = jnp.arange(s)
  allowed_1xLxS = (key_S[None, :] <= query_index_L[:, None])[None]
  if window is not None:
    allowed_1xLxS = allowed_1xLxS & (key_S[None, :] > query_index_L[:, None] - window)[None]
  if key_mask_BxS is not None:
    allowed_1xLxS = allowed_1xLxS & key_mask_BxS[:, None, :].astype(bool)
  if segment_ids_BxL is not None:
    allowed_1xLxS = allowed_1xLxS & (segment_ids_BxL[:, :, None]
                                     == segment_ids_BxL[:, None, :])
  return allowed_1xLxS


def attention_bias(query_index_L: jax.Array, s: int, key_mask_BxS=None,
                   segment_ids_BxL=None, window: int | None = None) -> jax.Array:
  """`attention_allowed` as the additive float32 bias the attention adds to its
  scores: 0 where allowed, -1e30 elsewhere ([1, L, S] without a key mask or
  segments: broadcast in the add, never materialised per row)."""
  allowed = attention_allowed(query_index_L, s, key_mask_BxS, segment_ids_BxL, window)
  return jnp.where(allowed, 0.0, -1e30).astype(jnp.float32)


def init_cache(cfg: model_config.DecoderConfig, batch: int, length: int) -> Cache:
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
  """The [D, V] output projection of `params` (for the chunked loss).

  Raises:
    ValueError: the model soft-caps its logits (Gemma 2/3 where configured), which a
      plain product with this matrix would leave out.
  """
  if model.cfg.final_logit_softcap is not None:
    raise ValueError(f"{model.cfg.model_type}: final_logit_softcapping="
                     f"{model.cfg.final_logit_softcap} is applied by Decoder.unembed_logits; "
                     "the chunked losses multiply by the output projection directly and "
                     "would leave it out: set loss.chunked=False.")
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

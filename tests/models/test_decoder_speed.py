"""Decoder speed internals: same numbers as the reference math, no big transposes in the HLO.

The reference is `reference_transformer.Transformer` (tests/) (3-D einsum projections,
RoPE per layer, `where` mask, scaled scores): the own model's math, which the
decoder runs via `from_model_config` on the same parameter tree.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdl_jax.losses import window
from pdl_jax.models import decoder
from pdl_jax.models import config as model_config
import reference_transformer as model_lib

# Distinct sizes, so shapes in the HLO text say which tensor they are.
B, L, D, H, K, F, V = 3, 24, 32, 2, 16, 80, 120


def _own(tied=True):
  own_cfg = model_lib.ModelConfig(vocab_size=V, d_model=D, num_layers=2, num_heads=H,
                                  head_dim=K, mlp_dim=F, tied_embeddings=tied)
  return model_lib.Transformer(own_cfg), decoder.Decoder(
      model_config.from_model_config(own_cfg))


def _tokens(seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, L)), jnp.int32)


def _loss(model, params, tokens, key_mask=None):
  logits_BxLxV, _ = model.apply({"params": params}, tokens, key_mask_BxS=key_mask)
  # A loss that touches every logit, so every gradient path is exercised.
  lse = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  picked = jnp.take_along_axis(logits_BxLxV, tokens[..., None], axis=-1)[..., 0]
  per_token = lse - picked + 1e-3 * jnp.mean(logits_BxLxV ** 2, axis=-1)
  # Padding query positions attend to nothing; their outputs are garbage in either
  # implementation (a `where` and an additive bias differ there), so a loss skips them.
  real = 1.0 if key_mask is None else key_mask.astype(jnp.float32)
  return jnp.mean(per_token * real)


@pytest.mark.parametrize("tied", [True, False])
def test_init_and_axis_names_equal_the_reference(tied):
  own, dec = _own(tied)
  tokens = _tokens()
  v_own = own.init(jax.random.key(3), tokens)["params"]
  v_dec = dec.init(jax.random.key(3), tokens)["params"]

  def names(tree):
    return jax.tree.map(lambda x: x.names, tree,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))

  # The decoder names the key/value heads "kv_heads" (grouped-query attention);
  # otherwise the names are the reference's.
  own_names = names(v_own)
  for i in range(2):
    for proj in ("key", "value"):
      own_names[f"block_{i}"]["attn"][proj]["kernel"] = ("embed", "kv_heads", "kv")
  assert names(v_dec) == own_names
  p_own, p_dec = nn.meta.unbox(v_own), nn.meta.unbox(v_dec)
  assert jax.tree.structure(p_own) == jax.tree.structure(p_dec)
  for a, b in zip(jax.tree.leaves(p_own), jax.tree.leaves(p_dec)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same initial values


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_logits_and_gradients_equal_the_reference(tied, padded):
  own, dec = _own(tied)
  tokens = _tokens(1)
  params = nn.meta.unbox(own.init(jax.random.key(0), tokens)["params"])
  key_mask = None
  if padded:  # left padding of different lengths: the additive bias path with rows
    key_mask = jnp.asarray(np.arange(L)[None, :] >= np.array([0, 3, 7])[:, None])
  l_own, g_own = jax.jit(jax.value_and_grad(
      lambda p: _loss(own, p, tokens, key_mask)))(params)
  l_dec, g_dec = jax.jit(jax.value_and_grad(
      lambda p: _loss(dec, p, tokens, key_mask)))(params)
  out_own, _ = own.apply({"params": params}, tokens, key_mask_BxS=key_mask)
  out_dec, _ = jax.jit(dec.apply)({"params": params}, tokens, key_mask_BxS=key_mask)
  real = np.ones((B, L), bool) if key_mask is None else np.asarray(key_mask)
  np.testing.assert_allclose(np.asarray(out_dec)[real], np.asarray(out_own)[real],
                             rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(float(l_dec), float(l_own), rtol=1e-5)
  for path, a in jax.tree_util.tree_leaves_with_path(g_own):
    b = g_dec
    for k in path:
      b = b[k.key]
    scale = float(np.max(np.abs(np.asarray(a)))) + 1e-12
    assert float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / scale < 1e-4, path


@pytest.mark.parametrize("tied", [True, False])
def test_unembed_logits_on_a_window_equals_the_full_logits(tied):
  _, dec = _own(tied)
  tokens = _tokens(2)
  params = nn.meta.unbox(dec.init(jax.random.key(0), tokens)["params"])
  logits_BxLxV, _ = dec.apply({"params": params}, tokens)
  hidden_BxLxD, _ = dec.apply({"params": params}, tokens, return_hidden=True)
  mask = np.zeros((B, L), np.float32)
  mask[0, 5:9], mask[1, 20:24], mask[2, 0:2] = 1, 1, 1
  h_c, y_c, m_c = window.gather_window(hidden_BxLxD, tokens, jnp.asarray(mask), 6)
  win = dec.apply({"params": params}, h_c, method=decoder.Decoder.unembed_logits)
  full_w, _, _ = window.gather_window(logits_BxLxV, tokens, jnp.asarray(mask), 6)
  np.testing.assert_allclose(np.asarray(win), np.asarray(full_w), rtol=1e-6, atol=1e-5)
  w_DxV = decoder.unembed_DxV(dec, params)
  np.testing.assert_allclose(np.asarray(logits_BxLxV),
                             np.asarray(hidden_BxLxD @ w_DxV), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------
# HLO: no physical transpose of a [B, L, F]-, [B, L, V]- or [B, H, L, S]-shaped
# tensor (the weight gradients' incoming gradients and the attention scores).
# ---------------------------------------------------------------------------

_MOVE = re.compile(r"= \w+\[([\d,]*)\]\{[^}]*\} (transpose|copy)\(")


def _moves(hlo_text):
  """Shapes of every transpose / copy in optimised HLO text (fusion bodies included)."""
  return [tuple(int(d) for d in m.group(1).split(",") if d)
          for m in _MOVE.finditer(hlo_text)]


def _big(shape):
  """A moved tensor spanning the token axes and a feature, vocabulary or key axis."""
  dims = list(shape)
  has_tokens = (B in dims and L in dims) or B * L in dims
  scores = dims.count(L) >= 2 or (H * L in dims and L in dims)  # [B, H, L, S] / [B, G, R*L, S]
  return has_tokens and (F in dims or V in dims or scores)


def test_detector_sees_the_3d_contraction_transposes():
  # Sanity of the check below: the 3-D contraction the decoder no longer uses does
  # make XLA:CPU transpose the [B, L, F] gradient.
  def f(x_BxLxD, w_DxF):
    return jnp.sum(jnp.sin(jnp.einsum("bld,df->blf", x_BxLxD, w_DxF)))

  text = jax.jit(jax.grad(f, argnums=1)).lower(
      jnp.ones((B, L, D)), jnp.ones((D, F))).compile().as_text()
  assert any(_big(s) for s in _moves(text)), _moves(text)


@pytest.mark.parametrize("tied,kv_heads", [(True, H), (False, 1)])
def test_train_step_hlo_has_no_big_transposes(tied, kv_heads):
  dec = decoder.Decoder(model_config.DecoderConfig(
      vocab_size=V, d_model=D, num_layers=2, num_heads=H, num_kv_heads=kv_heads,
      head_dim=K, mlp_dim=F, tied_embeddings=tied))
  tokens = _tokens()
  params = nn.meta.unbox(dec.init(jax.random.key(0), tokens)["params"])
  text = jax.jit(jax.grad(lambda p: _loss(dec, p, tokens))).lower(
      params).compile().as_text()
  big = [s for s in _moves(text) if _big(s)]
  assert not big, f"transposed copies of big activations / gradients: {big}"


def test_sharded_gradients_equal_unsharded():
  # The 2-D reshapes merge the batch axis (sharded over "data") with the length
  # axis and the heads axis (sharded over "model") with head_dim: GSPMD must keep
  # both; the gradients on a 2 x 2 mesh equal the single-device ones.
  from pdl_jax import sharding
  dec = decoder.Decoder(model_config.DecoderConfig(
      vocab_size=V, d_model=D, num_layers=2, num_heads=H, num_kv_heads=1, head_dim=K,
      mlp_dim=F, tied_embeddings=True))
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, V, (4, L)), jnp.int32)
  boxed = dec.init(jax.random.key(0), tokens)["params"]
  params = nn.meta.unbox(boxed)
  mesh = sharding.make_mesh({"data": 2, "model": 2}, jax.devices()[:4])
  shardings = sharding.tree_shardings(mesh, boxed)
  sharded = jax.device_put(params, shardings)
  tok_sharded = jax.device_put(tokens, sharding.named_sharding(mesh, "batch", "length"))
  grad = jax.jit(jax.grad(lambda p, t: _loss(dec, p, t)))
  g_sharded = grad(sharded, tok_sharded)
  g_single = grad(params, tokens)
  for a, b in zip(jax.tree.leaves(g_sharded), jax.tree.leaves(g_single)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_decoding_updates_the_kv_cache_in_place(scan):
  """The compiled decoding loop never copies a layer's KV cache: each token's keys
  and values are written into the loop-carried buffers in place (before: the cache
  was restacked every token, and XLA:CPU duplicated each update into the attention's
  reshape, each duplicate starting from a copy of the cache). Scanned params decode
  through the unrolled layout."""
  from pdl_jax.eval import decode as decode_lib
  cfg = model_config.DecoderConfig(vocab_size=V, d_model=D, num_layers=3, num_heads=4,
                                  num_kv_heads=2, head_dim=K, mlp_dim=F, scan_layers=scan)
  model = decoder.Decoder(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  prompt, new = 11, 13
  tokens = jnp.ones((B, prompt), jnp.int32)
  hlo = decode_lib.generate.lower(model, params, tokens, jnp.ones_like(tokens), jax.random.key(0),
                              max_new_tokens=new, eos_id=-1, pad_id=0).compile().as_text()
  cache_shape = f"f32[{B},2,{prompt + new},{K}]"  # one layer's keys or values
  assert f"{cache_shape}" in hlo and " while(" in hlo
  copies = [line for line in hlo.splitlines() if " copy(" in line and cache_shape in line]
  assert not copies, copies[:3]
  # Nor is it restacked: no array of every layer's cache exists.
  assert f"f32[3,{B},2,{prompt + new},{K}]" not in hlo


def test_top_p_sampler_never_sorts_the_vocabulary():
  """The sampler's top_k stays a top-k in the compiled program: a slice of its last
  column (the old fast-path check) made XLA:CPU lower it as a sort of the whole
  vocabulary, 406 vs 5 ms a step at 64 x 49152 (every top-p step, 4x greedy's time)."""
  import re
  from pdl_jax.eval import decode as decode_lib
  logits = jax.ShapeDtypeStruct((8, 5000), jnp.float32)
  hlo = jax.jit(lambda x: decode_lib._top_p_sample(jax.random.key(0), x, 0.9, 1.0)).lower(
      logits).compile().as_text()
  assert not re.findall(r"\bsort\(", hlo)
  assert "topk" in hlo.lower()

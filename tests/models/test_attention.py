"""Attention implementations (pdl_jax/models/attention.py): the splash kernel in Pallas
interpret mode against the xla einsum and a float64 numpy reference (values and
gradients; causal, packed segments, a sliding window, grouped KV heads, a length that
is not a block multiple), at the function and at the model level; `auto` and the
cuDNN fallback on CPU."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdl_jax import sharding
from pdl_jax.models import attention
from pdl_jax.models import config as model_config
from pdl_jax.models import decoder


def numpy_attention(q, k, v, segment_ids=None, window=None) -> np.ndarray:
  """Float64 causal attention: q [B, L, H, K] (scaled), k, v [B, G, S, K]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, l, h, _ = q.shape
  r = h // k.shape[1]
  k, v = np.repeat(k, r, axis=1), np.repeat(v, r, axis=1)  # query head i: KV head i // r
  scores = np.einsum("blhk,bhsk->bhls", q, k)
  i, j = np.arange(l)[:, None], np.arange(l)[None, :]
  allowed = np.broadcast_to(j <= i, (b, l, l))
  if window is not None:
    allowed = allowed & (i - j < window)
  if segment_ids is not None:
    seg = np.asarray(segment_ids)
    allowed = allowed & (seg[:, :, None] == seg[:, None, :])
  scores = np.where(allowed[:, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhls,bhsk->blhk", probs, v)


B, L, H, G, K = 2, 40, 4, 2, 32  # L = 40: padded to one 128 block
SEGMENTS = np.array([[0] * 15 + [1] * 20 + [2] * 5, [0] * 40])


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(B, L, H, K)) * K ** -0.5, jnp.float32)
  k = jnp.asarray(rng.normal(size=(B, G, L, K)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(B, G, L, K)), jnp.float32)
  return q, k, v


def run(impl, q, k, v, segments, window):
  seg = None if segments is None else jnp.asarray(segments)
  bias = decoder.attention_bias(jnp.arange(L), L, None, seg, window)
  return attention.attend(impl, q, k, v, bias,
                          dtype=jnp.float32, segment_ids_BxL=seg, window=window)


@pytest.mark.parametrize("segments,window", [(None, None), (SEGMENTS, None), (SEGMENTS, 7)])
def test_splash_equals_xla_and_numpy(segments, window):
  q, k, v = inputs()
  want = numpy_attention(q, k, v, segments, window)
  np.testing.assert_allclose(run("xla", q, k, v, segments, window), want, atol=2e-6)
  np.testing.assert_allclose(run("splash", q, k, v, segments, window), want, atol=2e-6)


def test_splash_gradients_equal_xla():
  q, k, v = inputs(1)
  w = jnp.asarray(np.random.default_rng(2).normal(size=(B, L, H, K)), jnp.float32)

  def loss(impl, q, k, v):
    return jnp.sum(run(impl, q, k, v, SEGMENTS, 7) * w)

  grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)
  want, got = grad("xla", q, k, v), grad("splash", q, k, v)
  for g_want, g_got in zip(want, got):
    scale = float(jnp.max(jnp.abs(g_want)))
    np.testing.assert_allclose(g_got, g_want, atol=1e-5 * scale)


@pytest.mark.parametrize("axes", [{"data": 2, "model": 2}, {"fsdp": 2, "model": 2}])
def test_splash_sharded_over_batch_and_heads_equals_numpy(axes):
  """On a mesh the kernel runs under shard_map: rows over the batch axis, KV heads (and
  their query heads) over the model axis; each shard's result is the numpy one's."""
  q, k, v = inputs(3)
  mesh = sharding.make_mesh({"data": 1, **axes}, devices=jax.devices()[:4])
  with jax.set_mesh(mesh):
    got = jax.jit(lambda q, k, v: run("splash", q, k, v, SEGMENTS, 7))(q, k, v)
  np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, SEGMENTS, 7),
                             atol=2e-6)


def test_auto_is_xla_on_cpu_and_the_kernels_on_accelerators():
  assert attention.resolve("auto") == "xla"  # the tests run on CPU
  assert attention.resolve("auto", "tpu") == "splash"
  assert attention.resolve("auto", "gpu") == "cudnn"
  with pytest.raises(ValueError, match="model.attention='flash'.*expected one of"):
    attention.resolve("flash")


def test_splash_off_a_tpu_says_it_interprets_once(caplog):
  """An explicit splash on the CPU is right but slow (the Pallas interpreter): one
  log line says so and what to use instead."""
  q, k, v = inputs()
  attention._LOGGED.clear()
  with caplog.at_level(logging.WARNING):
    run("splash", q, k, v, None, None)
    run("splash", q, k, v, None, None)
  lines = [r.message for r in caplog.records if "Pallas interpreter" in r.message]
  assert len(lines) == 1 and "model.attention=auto or xla" in lines[0], caplog.records


def test_cudnn_on_cpu_falls_back_to_xla_with_one_log_line(caplog):
  q, k, v = inputs()
  attention._LOGGED.clear()
  with caplog.at_level(logging.WARNING):
    got = run("cudnn", q, k, v, None, None)
    run("cudnn", q, k, v, None, None)
  lines = [r.message for r in caplog.records if "cudnn attention needs a GPU" in r.message]
  assert len(lines) == 1 and "using the xla attention" in lines[0]
  assert attention.fallbacks() == lines  # what gpu_check reads to label the row
  attention.clear_log()
  assert attention.fallbacks() == []
  np.testing.assert_array_equal(got, run("xla", q, k, v, None, None))


def tiny_gqa(attention_impl: str, scan: bool) -> decoder.Decoder:
  """Two layers, grouped KV heads, Gemma 3's pattern: a local (window 6) layer, then a
  global one; scanned (a traced flag picks the kernel) or unrolled (remat full)."""
  return decoder.Decoder(model_config.DecoderConfig(
      vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
      mlp_dim=48, sliding_window=6, local_layers=(True, False), attention=attention_impl,
      scan_layers=scan, remat="full"))


@pytest.mark.parametrize("scan,grads", [(True, True), (False, False)])
def test_model_logits_loss_and_grads_with_splash_equal_xla_on_packed_rows(scan, grads):
  """Scanned: a traced flag picks each layer's kernel (lax.cond), with gradients;
  unrolled (each layer's window static through remat): the forward pass."""
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, size=(B, L)), jnp.int32)
  seg = jnp.asarray(SEGMENTS)
  # Positions restart in each segment (data/packing.py's layout).
  positions = jnp.asarray(np.stack([np.r_[np.arange(15), np.arange(20), np.arange(5)],
                                    np.arange(40)]), jnp.int32)
  xla, splash = tiny_gqa("xla", scan), tiny_gqa("splash", scan)
  params = xla.init(jax.random.key(0), tokens)["params"]

  def loss(model, p):
    logits, _ = model.apply({"params": p}, tokens, positions, segment_ids_BxL=seg)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1)), logits

  if not grads:
    np.testing.assert_allclose(jax.jit(lambda p: loss(splash, p)[1])(params),
                               jax.jit(lambda p: loss(xla, p)[1])(params), atol=1e-5)
    return
  (l_x, logits_x), g_x = jax.jit(jax.value_and_grad(lambda p: loss(xla, p), has_aux=True))(
      params)
  (l_s, logits_s), g_s = jax.jit(jax.value_and_grad(lambda p: loss(splash, p), has_aux=True))(
      params)
  np.testing.assert_allclose(logits_s, logits_x, atol=1e-5)
  np.testing.assert_allclose(l_s, l_x, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_x)):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-8)


def test_config_field_is_checked_and_left_out_of_the_fingerprint():
  from configs.common import load_config
  from pdl_jax.models import factory

  c = load_config("configs/dialogue.py:pretrained=none")
  described = {}
  for impl in ("xla", "splash"):
    c.model.attention = impl
    model = factory.make_model(c.model, 64)
    assert model.cfg.attention == impl
    described[impl] = factory.describe(model)
  assert described["xla"] == described["splash"] and "attention" not in described["xla"]
  c.model.attention = "flash"
  with pytest.raises(ValueError, match="config.model.attention='flash'; expected one of"):
    factory.check(c.model)


def test_cudnn_refused_while_tracing_falls_back_to_xla(caplog, monkeypatch):
  """A refusal cudnn_refusal does not foresee (here: jax's own, cuDNN on a CPU) is
  caught while tracing: the xla attention, one log line."""
  monkeypatch.setattr(attention, "cudnn_refusal", lambda *a: None)
  q, k, v = inputs()
  attention._LOGGED.clear()
  with caplog.at_level(logging.WARNING):
    got = run("cudnn", q, k, v, None, None)
  lines = [r.message for r in caplog.records if "cudnn attention refused this call" in r.message]
  assert len(lines) == 1 and "using the xla attention" in lines[0], caplog.records
  np.testing.assert_array_equal(got, run("xla", q, k, v, None, None))

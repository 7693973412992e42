"""Gemma 3 (gemma3_text) and sliding-window attention against transformers' committed
logits (tests/fixtures/hf/{gemma3,gemma3_v4,mistral_window}, made by
tools/make_hf_fixtures.py): parity within 1e-5, each Gemma 3 trait breaking it when
removed, packed rows, the config's two layouts and its refusals.
"""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from pdl_jax.models import decoder
from pdl_jax.models.hf import families as hf_families
from pdl_jax.models.hf import weights as hf_weights

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "fixtures", "hf")
WINDOWED = ("gemma3", "gemma3_v4", "mistral_window")


def _dir(name):
  return os.path.join(FIXTURES, name)


def _ref(name):
  return np.load(os.path.join(_dir(name), "reference.npz"))


def _rel_err(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _hf(name):
  with open(os.path.join(_dir(name), "config.json")) as f:
    return json.load(f)


# Scanned layers: test_pretrained's parity test (1e-4) and the packed test below (1e-5).
@pytest.mark.parametrize("scan_layers", [False])
@pytest.mark.parametrize("name", WINDOWED)
def test_logits_within_1e5_of_transformers(name, scan_layers):
  ref = _ref(name)
  assert ref["tokens"].shape[1] > hf_families.read_config(_dir(name)).sliding_window
  out = hf_weights.logits(_dir(name), ref["tokens"], scan_layers=scan_layers)
  assert _rel_err(out, ref["logits"]) <= 1e-5


def test_read_config_gemma3_both_layouts():
  v5 = hf_families.read_config(_dir("gemma3"))
  assert (v5.local_layers, v5.sliding_window, v5.local_rope_theta, v5.rope_theta,
          v5.rope_type, v5.rope_factor) == ((True, False, True, True), 5, 100.0, 1e6,
                                            "linear", 2.0)
  assert (v5.norm, v5.qk_norm, v5.post_norms, v5.embed_scale, v5.tied_embeddings,
          v5.activation, v5.final_logit_softcap) == (
              "rms_plus_one", True, True, True, True, "gelu_tanh", 3.0)
  assert v5.query_scale == pytest.approx(24 ** -0.5)
  assert [v5.layer_window(i) for i in range(4)] == [5, None, 5, 5]
  v4 = hf_families.read_config(_dir("gemma3_v4"))  # sliding_window_pattern 2
  assert (v4.local_layers, v4.local_rope_theta, v4.rope_theta, v4.rope_type,
          v4.final_logit_softcap) == ((True, False, True), 50.0, 10000.0, "default", None)
  # The v4 spelling of the v5 fixture's config reads to the same DecoderConfig.
  hf = _hf("gemma3")
  rope = hf.pop("rope_parameters")
  old = dict(hf, rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0},
             rope_local_base_freq=100.0)
  assert hf_families.config_from_hf(old) == v5
  # Without layer_types, every 6th layer is global (transformers' default pattern).
  del hf["layer_types"]
  hf.update(num_hidden_layers=7, rope_parameters=rope)
  assert hf_families.config_from_hf(hf).local_layers == (True,) * 5 + (False, True)


@pytest.mark.parametrize("change", [
    dict(local_layers=(False,) * 4),  # the window and local RoPE matter
    dict(local_layers=(True,) * 4),  # the global layer is global
    dict(sliding_window=4), dict(sliding_window=6),  # transformers' band: i - 5 < j <= i
    dict(local_rope_theta=None),  # local layers' own RoPE base
    dict(query_scale=None),  # query_pre_attn_scalar, not head_dim
    dict(final_logit_softcap=None),
    dict(norm="rms"),  # (1 + w), in the q/k norms and post norms too
])
def test_fixture_catches_each_gemma3_trait(change):
  cfg = hf_families.read_config(_dir("gemma3"))
  params = hf_weights.load_params(_dir("gemma3"), cfg)
  ref = _ref("gemma3")
  out, _ = decoder.Decoder(dataclasses.replace(cfg, **change)).apply(
      {"params": params}, jnp.asarray(ref["tokens"]))
  assert _rel_err(np.asarray(out), ref["logits"]) > 1e-3


def test_post_norms_matter():
  cfg = hf_families.read_config(_dir("gemma3"))
  params = hf_weights.load_params(_dir("gemma3"), cfg)
  for i in range(cfg.num_layers):
    params[f"block_{i}"]["mlp_post_norm"]["scale"] = np.zeros_like(
        params[f"block_{i}"]["mlp_post_norm"]["scale"])
  out, _ = decoder.Decoder(cfg).apply({"params": params}, jnp.asarray(_ref("gemma3")["tokens"]))
  assert _rel_err(np.asarray(out), _ref("gemma3")["logits"]) > 1e-3


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("name", ["gemma3", "mistral_window"])
def test_packed_row_equals_each_example_alone(name, scan_layers):
  """Two examples packed in one row (segment ids, positions restarting): each
  segment's logits are transformers' logits of that example alone (a causal model's
  logits of a prefix are those of the whole row's first positions), both segments
  longer than the window."""
  cfg = dataclasses.replace(hf_families.read_config(_dir(name)), scan_layers=scan_layers)
  params = hf_weights.load_params(_dir(name), cfg)  # stacked when scanned
  ref = _ref(name)
  a, b = 7, 9
  tokens = np.concatenate([ref["tokens"][0, :a], ref["tokens"][1, :b]])[None]
  segments = np.array([[1] * a + [2] * b])
  positions = np.concatenate([np.arange(a), np.arange(b)])[None]
  out, _ = decoder.Decoder(cfg).apply({"params": params}, jnp.asarray(tokens),
                                      jnp.asarray(positions), segment_ids_BxL=jnp.asarray(segments))
  want = np.concatenate([ref["logits"][0, :a], ref["logits"][1, :b]])[None]
  assert _rel_err(np.asarray(out), want) <= 1e-5


def test_attention_allowed_is_the_band():
  allowed = np.asarray(decoder.attention_allowed(jnp.arange(6), 6, window=3))[0]
  i, j = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
  np.testing.assert_array_equal(allowed, (j <= i) & (j > i - 3))
  seg = jnp.asarray([[1, 1, 1, 2, 2, 2]])
  packed = np.asarray(decoder.attention_allowed(jnp.arange(6), 6, segment_ids_BxL=seg,
                                                window=2))[0]
  same = np.asarray(seg[0][:, None] == seg[0][None, :])
  np.testing.assert_array_equal(packed, (j <= i) & (j > i - 2) & same)


@pytest.mark.parametrize("change,match", [
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(layer_types=["sliding_attention"] * 3), "layer_types"),
    (dict(layer_types=["chunked_attention"] * 4), "layer_types"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "linear", "factor": 2.0,
                                                 "rope_theta": 1e4}}), "local layers' rope"),
])
def test_unsupported_gemma3_config_is_refused(change, match):
  with pytest.raises(ValueError, match=match):
    hf_families.config_from_hf(dict(_hf("gemma3"), **change))


def test_qwen_windows_only_layers_from_max_window_layers():
  hf = dict(_hf("qwen2"), use_sliding_window=True, sliding_window=8, max_window_layers=1)
  hf.pop("layer_types", None)
  cfg = hf_families.config_from_hf(hf)
  assert (cfg.sliding_window, cfg.local_layers) == (8, (False, True))
  assert hf_families.config_from_hf(dict(hf, max_window_layers=0)).local_layers == ()  # all
  assert hf_families.config_from_hf(dict(hf, max_window_layers=2)).sliding_window is None
  assert hf_families.config_from_hf(dict(hf, use_sliding_window=False)).sliding_window is None

"""Hugging Face checkpoints: parity with PyTorch transformers (committed golden logits),
KV-cache decoding, export round trip, sharded loading, errors, and the HF tokenizer.

The fixtures under tests/fixtures/hf were made by tools/make_hf_fixtures.py
(torch + transformers in a side venv); these tests need neither.
"""

import dataclasses
import hashlib
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from pdl_jax.eval import decode as decode_lib
import reference_transformer as model_lib
from pdl_jax import sharding
from pdl_jax.tokenizers.hf import HFTokenizer
from pdl_jax.models import decoder
from pdl_jax.models import config as model_config
from pdl_jax.models.hf import export as hf_export
from pdl_jax.models.hf import families as hf_families
from pdl_jax.models.hf import weights as hf_weights

# The tests/ folder (this file is 2 levels below it): shared fixtures live there.
TESTS = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FIXTURES = os.path.join(TESTS, "fixtures", "hf")
FAMILIES = sorted(os.listdir(FIXTURES))


def _dir(name):
  return os.path.join(FIXTURES, name)


def _rel_err(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_all_families_have_fixtures():
  assert set(FAMILIES) >= {"llama", "llama3_rope", "llama_linear_rope", "mistral", "qwen2",
                           "qwen3", "gemma", "gpt2"}
  # One fixture is written as shards with an index, as large checkpoints are.
  assert os.path.exists(os.path.join(_dir("mistral"), "model.safetensors.index.json"))


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(name, scan_layers):
  ref = np.load(os.path.join(_dir(name), "reference.npz"))
  out = hf_weights.logits(_dir(name), ref["tokens"], scan_layers=scan_layers)
  assert out.dtype == np.float32 and out.shape == ref["logits"].shape
  assert _rel_err(out, ref["logits"]) <= 1e-4


@pytest.mark.parametrize("name,change", [
    ("llama3_rope", dict(rope_type="default")),  # llama3 frequency bands matter
    ("gemma", dict(norm="rms")),  # Gemma's RMSNorm is x * (1 + w)
    ("gemma", dict(embed_scale=False)),
    ("qwen2", dict(unembed_scale=32 ** -0.5)),  # the own model's tied scale is not HF's
    ("mistral_window", dict(sliding_window=None)),  # the window is in use at 16 tokens
    ("mistral_window", dict(sliding_window=6)),  # transformers' window: i - 5 < j <= i
])
def test_fixtures_catch_the_traps(name, change):
  """The fixtures are sensitive: each known trap, made on purpose, breaks parity."""
  cfg = hf_families.read_config(_dir(name))
  params = hf_weights.load_params(_dir(name), cfg)
  ref = np.load(os.path.join(_dir(name), "reference.npz"))
  wrong = decoder.Decoder(dataclasses.replace(cfg, **change))
  out, _ = wrong.apply({"params": params}, jnp.asarray(ref["tokens"]))
  assert _rel_err(np.asarray(out), ref["logits"]) > 1e-3


def test_read_config_fields():
  llama3 = hf_families.read_config(_dir("llama3_rope"))
  assert (llama3.rope_type, llama3.rope_theta, llama3.num_heads, llama3.num_kv_heads,
          llama3.tied_embeddings) == ("llama3", 500000.0, 4, 2, False)
  linear = hf_families.read_config(_dir("llama_linear_rope"))  # a v4-layout config.json
  assert (linear.rope_type, linear.rope_factor, linear.tied_embeddings, linear.qkv_bias,
          linear.out_bias, linear.mlp_bias) == ("linear", 2.0, True, True, True, True)
  gemma = hf_families.read_config(_dir("gemma"))
  assert (gemma.activation, gemma.norm, gemma.head_dim, gemma.embed_scale) == (
      "gelu_tanh", "rms_plus_one", 16, True)
  qwen3 = hf_families.read_config(_dir("qwen3"))
  assert qwen3.qk_norm and qwen3.head_dim == 16 and qwen3.d_model == 32
  gpt2 = hf_families.read_config(_dir("gpt2"))
  assert (gpt2.norm, gpt2.positions, gpt2.mlp, gpt2.activation, gpt2.mlp_dim) == (
      "layer", "learned", "plain", "gelu_tanh", 128)
  assert hf_families.read_config(_dir("qwen2"), dtype="bfloat16").dtype == "bfloat16"


def test_v4_and_v5_config_layouts_agree():
  with open(os.path.join(_dir("llama3_rope"), "config.json")) as f:
    v5 = json.load(f)
  v4 = json.loads(json.dumps(v5))
  rope = v4.pop("rope_parameters")
  v4["rope_theta"] = rope.pop("rope_theta")
  v4["rope_scaling"] = dict(rope, type=rope.pop("rope_type"))  # legacy key
  v4["torch_dtype"] = v4.pop("dtype")
  assert hf_families.config_from_hf(v4) == hf_families.config_from_hf(v5)
  # Gemma: hidden_activation beside hidden_act wins.
  gemma = dict(json.load(open(os.path.join(_dir("gemma"), "config.json"))),
               hidden_activation="gelu_pytorch_tanh", hidden_act="gelu")
  assert hf_families.config_from_hf(gemma).activation == "gelu_tanh"


@pytest.mark.parametrize("change,match", [
    (dict(model_type="mixtral"), "model_type 'mixtral' is not supported.*llama"),
    (dict(num_local_experts=8), "mixture-of-experts"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     "rope type 'yarn' is not supported"),
    (dict(hidden_act="quick_gelu"), "activation 'quick_gelu' is not supported"),
])
def test_unsupported_config_is_refused(change, match):
  with open(os.path.join(_dir("llama"), "config.json")) as f:
    hf = dict(json.load(f), **change)
  with pytest.raises(ValueError, match=match):
    hf_families.config_from_hf(hf)


def test_sliding_window_read_only_when_in_use():
  assert hf_families.read_config(_dir("mistral")).sliding_window == 4096
  assert hf_families.read_config(_dir("mistral_window")).sliding_window == 5  # < 16 tokens
  assert hf_families.read_config(_dir("qwen2")).sliding_window is None  # use_sliding_window off


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2", "gemma3", "mistral_window"])
def test_kv_cache_decoding_equals_full_forward(name):
  cfg = hf_families.read_config(_dir(name))
  model, params = decoder.Decoder(cfg), hf_weights.load_params(_dir(name), cfg)
  ref = np.load(os.path.join(_dir(name), "reference.npz"))
  prompts = [ref["tokens"][0, :5].tolist(), ref["tokens"][1, :9].tolist()]
  tokens, mask = decode_lib.left_pad(prompts, 9, pad_id=0)
  new = 6
  cached = np.asarray(decode_lib.generate(model, params, jnp.asarray(tokens), jnp.asarray(mask),
                                      jax.random.key(0), max_new_tokens=new, eos_id=-1,
                                      pad_id=0))
  # Repeated full forward passes, all at once: one pass without a cache over prompt +
  # generated tokens; greedy decoding by full passes emits token t iff it is the argmax
  # at the position before it, given the same earlier tokens (one compile, not `new`).
  full_tokens = np.concatenate([tokens, cached], axis=1)
  full_mask = np.concatenate([mask, np.ones_like(cached)], axis=1)
  positions = np.maximum(np.cumsum(full_mask, axis=1) - 1, 0)
  logits, _ = jax.jit(model.apply)({"params": params}, full_tokens, positions, full_mask)
  np.testing.assert_array_equal(np.asarray(logits)[:, 8:8 + new].argmax(-1), cached)
  cache = decoder.init_cache(cfg, 2, 15)  # one buffer per layer, KV heads only
  assert [k.shape for k in cache["k"]] == [(2, cfg.num_kv_heads, 15, cfg.head_dim)] * cfg.num_layers
  scanned = decoder.init_cache(dataclasses.replace(cfg, scan_layers=True), 2, 15)
  assert scanned["k"].shape == (cfg.num_layers, 2, cfg.num_kv_heads, 15, cfg.head_dim)


# A multimodal base exports as its text model (test_multimodal_gemma3_...).
@pytest.mark.parametrize("name", [f for f in FAMILIES if f != "gemma3_mm"])
def test_export_then_load_is_bit_identical(name, tmp_path):
  cfg = hf_families.read_config(_dir(name))
  params = hf_weights.load_params(_dir(name), cfg)
  out = hf_export.export(params, cfg, tmp_path / "out", tokenizer_dir=_dir(name))
  assert sorted(os.listdir(out)) == ["config.json", "generation_config.json",
                                     "model.safetensors", "tokenizer.json",
                                     "tokenizer_config.json"]
  again = hf_weights.load_params(out, hf_families.read_config(out))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, again)
  # Same tensor names and values as the checkpoint transformers wrote (layouts included).
  original = {}
  for f in os.listdir(_dir(name)):
    if f.endswith(".safetensors"):
      original.update(load_file(os.path.join(_dir(name), f)))
  exported = load_file(os.path.join(out, "model.safetensors"))
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  with open(os.path.join(_dir(name), "config.json")) as f:
    src = json.load(f)
  with open(os.path.join(out, "config.json")) as f:
    dst = json.load(f)
  assert {k: v for k, v in dst.items() if "dtype" not in k} == {
      k: v for k, v in src.items() if "dtype" not in k}


def test_multimodal_gemma3_is_read_as_its_text_model_and_exports_as_one(tmp_path):
  """gemma-3-4b-it's layout (Gemma3ForConditionalGeneration, fixture gemma3_mm): a
  text_config naming only what differs from Gemma3TextConfig's defaults, tensors named
  language_model.model.* (the Hub's) or model.language_model.* (transformers v5's),
  a vision tower that is skipped. Its logits are checked in
  test_logits_match_transformers; here the fields, both name layouts, the export."""
  src = _dir("gemma3_mm")
  cfg = hf_families.read_config(src)
  assert (cfg.model_type, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("gemma3", 8, 4, 16)
  assert cfg.query_scale == 256 ** -0.5 and cfg.vocab_size == 320 and cfg.tied_embeddings
  assert cfg.local_layers == (True, False, True) and cfg.sliding_window == 5
  assert (cfg.rope_type, cfg.rope_factor, cfg.rope_theta, cfg.local_rope_theta) == (
      "linear", 2.0, 1e6, 1e4)
  ref = np.load(os.path.join(src, "reference.npz"))
  # transformers v5's names, vision tower under model.: the same logits.
  v5 = tmp_path / "v5"
  shutil.copytree(src, v5)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  assert "language_model.model.norm.weight" in tensors
  renamed = {("model.language_model." + k[len("language_model.model."):]
              if k.startswith("language_model.model.") else "model." + k): v
             for k, v in tensors.items()}
  save_file(renamed, os.path.join(v5, "model.safetensors"), metadata={"format": "pt"})
  np.testing.assert_array_equal(hf_weights.logits(str(v5), ref["tokens"]),
                                hf_weights.logits(src, ref["tokens"]))
  # A text tensor missing is named; the vision tower's are not needed.
  del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
  tensors = {k: v for k, v in tensors.items() if not k.startswith("vision_tower.")}
  save_file(tensors, os.path.join(v5, "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"missing tensor 'model\.language_model\.layers\.1\."
                     r"mlp\.up_proj\.weight' .*the Hub's checkpoints name it "
                     r"'language_model\.model\.layers\.1\.mlp\.up_proj\.weight'"):
    hf_weights.load_params(str(v5), cfg)
  # Export: a Gemma3ForCausalLM folder (the text model alone), whose config is the
  # completed text_config and whose tensors are the text model's under model.*.
  params = hf_weights.load_params(src, cfg)
  out = hf_export.export(params, cfg, tmp_path / "out", tokenizer_dir=src)
  with open(os.path.join(out, "config.json")) as f:
    dst = json.load(f)
  with open(os.path.join(src, "config.json")) as f:
    text = json.load(f)["text_config"]
  assert dst["model_type"] == "gemma3_text" and dst["architectures"] == ["Gemma3ForCausalLM"]
  assert {k: dst[k] for k in text if k != "model_type"} == {
      k: v for k, v in text.items() if k != "model_type"}
  assert dst["num_attention_heads"] == 8 and dst["tie_word_embeddings"] is True
  exported = load_file(os.path.join(out, "model.safetensors"))
  original = load_file(os.path.join(src, "model.safetensors"))
  assert sorted(exported) == sorted(k.removeprefix("language_model.") for k in original
                                    if k.startswith("language_model."))
  for key, value in exported.items():
    np.testing.assert_array_equal(value, original["language_model." + key], err_msg=key)
  again = hf_families.read_config(out)
  assert dataclasses.replace(again, source_config_json=None) == dataclasses.replace(
      cfg, model_type="gemma3_text", source_config_json=None)
  np.testing.assert_allclose(hf_weights.logits(str(out), ref["tokens"]), ref["logits"],
                             rtol=1e-5, atol=1e-5)


def test_export_shards_bfloat16_and_refuses_existing_dir(tmp_path):
  cfg = hf_families.read_config(_dir("llama"))
  params = hf_weights.load_params(_dir("llama"), cfg)
  out = hf_export.export(params, cfg, tmp_path / "sharded", dtype="bfloat16",
                          max_shard_bytes=20_000)
  files = sorted(os.listdir(out))
  shards = [f for f in files if f.startswith("model-")]
  assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    index = json.load(f)
  assert set(index["weight_map"].values()) == set(shards)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["dtype"] == "bfloat16"
  again = hf_weights.load_params(out, hf_families.read_config(out))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32), np.asarray(b)), params, again)
  with pytest.raises(FileExistsError):
    hf_export.export(params, cfg, out)
  assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # nothing half-written


def test_own_model_runs_in_decoder_and_exports_as_llama(tmp_path):
  own_cfg = model_lib.preset_config("tiny", vocab_size=96, num_layers=2)
  own = model_lib.Transformer(own_cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 7)), jnp.int32)
  params = nn.meta.unbox(jax.jit(own.init)(jax.random.key(1), tokens)["params"])
  own_logits, _ = jax.jit(own.apply)({"params": params}, tokens)
  cfg = model_config.from_model_config(own_cfg)
  # Same param names and shapes: the own model's params run in the decoder.
  dec_logits, _ = jax.jit(decoder.Decoder(cfg).apply)({"params": params}, tokens)
  np.testing.assert_allclose(dec_logits, own_logits, rtol=1e-5, atol=1e-5)
  out = hf_export.export(params, cfg, tmp_path / "own")
  hf_cfg = hf_families.read_config(out)
  # The d**-0.5 scale of the tied unembedding is exported untied (lm_head = scaled embed).
  assert hf_cfg.model_type == "llama" and not hf_cfg.tied_embeddings
  hf_params = hf_weights.load_params(out, hf_cfg)
  np.testing.assert_array_equal(
      hf_params["unembed"], np.asarray(params["embed"]["embedding"]).T * own_cfg.d_model ** -0.5)
  # Everything else is the same tensors: the Llama model computes the own model's logits
  # (through transformers too: tools/check_hf_export.py, 2.9e-7).
  jax.tree.map(np.testing.assert_array_equal, {**params, "unembed": hf_params["unembed"]},
               hf_params)
  assert dataclasses.replace(hf_cfg, tied_embeddings=True, unembed_scale=cfg.unembed_scale,
                             model_type="pdl") == cfg


def _copy(name, tmp_path):
  dst = tmp_path / name
  shutil.copytree(_dir(name), dst)
  return dst


def test_dir_without_config_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*no config.json"):
    hf_families.read_config(tmp_path)


def test_missing_shard_is_named(tmp_path):
  d = _copy("mistral", tmp_path)
  os.remove(d / "model-00002-of-00004.safetensors")
  with pytest.raises(ValueError, match="shard file 'model-00002-of-00004.safetensors'") as err:
    hf_weights.load_params(d, hf_families.read_config(d))
  assert "missing tensor" not in str(err.value)  # its tensors are covered by the file


def test_original_gpt2_names_without_prefix_and_buffers_load(tmp_path):
  """The original gpt2 checkpoints: no "transformer." prefix, attn.bias buffers."""
  d = _copy("gpt2", tmp_path)
  tensors = {k.removeprefix("transformer."): v
             for k, v in load_file(d / "model.safetensors").items()}
  tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
  save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
  cfg = hf_families.read_config(d)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               hf_weights.load_params(_dir("gpt2"), cfg), hf_weights.load_params(d, cfg))
  del tensors["h.1.mlp.c_fc.bias"]
  tensors["h.1.mlp.extra"] = np.zeros(2, np.float32)
  save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match="unexpected tensor 'h.1.mlp.extra'.*missing tensor "
                     "'transformer.h.1.mlp.c_fc.bias'"):
    hf_weights.load_params(d, cfg)


def test_bfloat16_compute_stays_close():
  cfg = hf_families.read_config(_dir("gemma"), dtype="bfloat16")
  params = hf_weights.load_params(_dir("gemma"), cfg)
  ref = np.load(os.path.join(_dir("gemma"), "reference.npz"))
  out, _ = jax.jit(decoder.Decoder(cfg).apply)({"params": params}, ref["tokens"])
  assert out.dtype == jnp.float32 and _rel_err(np.asarray(out), ref["logits"]) < 2e-2


def test_every_param_has_logical_axes():
  for name in ("gpt2", "qwen3", "llama_linear_rope"):
    boxed = hf_weights.abstract_params(hf_families.read_config(_dir(name)))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for box in leaves:  # every name has a rule
      sharding.logical_to_spec(box.names)


@pytest.mark.parametrize("kind,shape,part", [
    ("copy", (6, 4), 0), ("T", (6, 4), 0), ("in_heads", (4, 6, 2), 0),
    ("heads_out", (6, 2, 4), 0), ("bias_heads", (6, 2), 0),
    ("conv_in_heads", (4, 6, 2), 2), ("conv_bias_heads", (6, 2), 1),
    ("conv_heads_out", (6, 2, 4), 0)])
def test_sliced_reads_equal_slices_of_the_full_read(kind, shape, part):
  """What make_array_from_callback asks for (one device's block) is read exactly."""
  t = hf_families.Tensor("w", ("w",), kind, part)
  src = np.arange(np.prod(hf_families.source_shape(t, shape)), dtype=np.float32).reshape(
      hf_families.source_shape(t, shape))
  full = hf_weights.read_block(src, t, shape, tuple(slice(None) for _ in shape))
  assert full.shape == shape
  blocks = [tuple(slice(0, n // 2) for n in shape), tuple(slice(n // 2, n) for n in shape),
            tuple(slice(1, n) for n in shape)]
  for idx in blocks:
    np.testing.assert_array_equal(hf_weights.read_block(src, t, shape, idx), full[idx])
  if kind not in ("conv_in_heads", "conv_bias_heads"):  # fused parts export together
    np.testing.assert_array_equal(hf_export.to_hf(t, full), src)


def test_all_checkpoint_mismatches_in_one_error(tmp_path):
  d = _copy("qwen2", tmp_path)
  tensors = load_file(d / "model.safetensors")
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 32), np.float32)
  tensors["model.layers.1.mlp.extra.weight"] = np.zeros((2,), np.float32)
  del tensors["model.layers.1.self_attn.q_proj.bias"]
  save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError) as err:
    hf_weights.load_params(d, hf_families.read_config(d))
  msg = str(err.value)
  assert "'model.layers.0.self_attn.k_proj.weight'" in msg and "[3, 32]" in msg
  assert "expected [16, 32]" in msg
  assert "unexpected tensor 'model.layers.1.mlp.extra.weight'" in msg
  assert "missing tensor 'model.layers.1.self_attn.q_proj.bias'" in msg


def test_sharded_load_on_4x2_mesh_equals_unsharded():
  mesh = sharding.make_mesh({"data": 4, "model": 2})
  for name in ("gpt2", "llama"):
    cfg = hf_families.read_config(_dir(name))
    plain = hf_weights.load_params(_dir(name), cfg)
    shardings = hf_weights.param_shardings(cfg, mesh)
    sharded = hf_weights.load_params(_dir(name), cfg, shardings)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 plain, sharded)
    query = sharded["block_0"]["attn"]["query"]["kernel"]
    assert query.sharding.spec == jax.sharding.PartitionSpec(None, "model", None)
    assert query.addressable_shards[0].data.shape == (32, 2, 8)  # each device: its heads
    assert sharded["embed"]["embedding"].sharding.spec[0] == "model"
  # The sharded llama (last of the loop; GQA, KV heads replicated by the kv_heads rule)
  # computes the reference logits under jit.
  ref = np.load(os.path.join(_dir("llama"), "reference.npz"))
  out, _ = jax.jit(decoder.Decoder(cfg).apply)({"params": sharded}, ref["tokens"])
  assert _rel_err(np.asarray(out), ref["logits"]) <= 1e-4


def test_hf_tokenizer_round_trip_and_special_ids():
  tok = HFTokenizer.load(_dir("llama3_rope"))
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.sep_id) == (
      300, 0, 1, 2, 3, 2)
  assert tok.eos_ids == (2, 3)  # generation_config lists two
  texts = ["In the beginning God created the heaven.", "Héllo, wörld!  two  spaces"]
  ids = tok.encode_batch(texts, num_threads=2)
  assert all(0 <= i < tok.vocab_size for seq in ids for i in seq) and 1 not in ids[0]
  assert tok.decode_batch(ids) == texts
  # Specials and padded embedding rows (300..319) never reach the text.
  assert tok.decode_batch([[1] + ids[0] + [2, 0, 310]]) == texts[:1]
  assert tok.padding_ids(hf_families.read_config(_dir("llama3_rope")).vocab_size) == tuple(
      range(300, 320))
  assert "".join(tok.id_to_piece(ids[0])).replace("Ġ", " ") == texts[0]
  with open(os.path.join(_dir("llama3_rope"), "tokenizer.json"), "rb") as f:
    assert tok.sha256 == hashlib.sha256(f.read()).hexdigest()
  gpt2 = HFTokenizer.load(os.path.join(_dir("gpt2"), "tokenizer.json"))
  assert gpt2.pad_id == gpt2.eos_id == 2  # no pad token: pad falls back to eos
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    HFTokenizer.load(FIXTURES)


def test_remote_model_folder_is_copied_once_per_host_and_only_its_weights(tmp_path):
  """A gs:// model folder is cached locally: config.json and the files the index
  names (not an unrelated consolidated.safetensors), copied again only when a
  source file's size or mtime changes; the copy loads as the source does."""
  src = tmp_path / "src"
  shutil.copytree(os.path.join(FIXTURES, "mistral"), src)
  (src / "consolidated.safetensors").write_bytes(b"unrelated" * 1000)
  cache = str(tmp_path / "cache")
  folder = hf_weights.cached_copy(str(src), cache)
  index = json.load(open(src / "model.safetensors.index.json"))
  want = {"config.json", "model.safetensors.index.json", *index["weight_map"].values()}
  assert set(os.listdir(folder)) == want | {"manifest.json"}
  mtimes = {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in want}
  assert hf_weights.cached_copy(str(src), cache) == folder  # reused, nothing rewritten
  assert {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in want} == mtimes
  shard = sorted(set(index["weight_map"].values()))[0]
  data = (src / shard).read_bytes()
  (src / shard).write_bytes(data + b" ")  # another size: copied again
  hf_weights.cached_copy(str(src), cache)
  assert open(os.path.join(folder, shard), "rb").read() == data + b" "
  (src / shard).write_bytes(data)
  hf_weights.cached_copy(str(src), cache)
  cfg = hf_families.read_config(folder)
  np.testing.assert_array_equal(
      jax.tree.leaves(hf_weights.load_params(folder, cfg))[0],
      jax.tree.leaves(hf_weights.load_params(str(src), cfg))[0])


def test_scanned_kv_cache_decoding_of_local_and_global_layers():
  """Gemma 3 scanned: each layer picks its window and RoPE tables by a traced flag;
  greedy decoding with the KV cache past the window equals the unrolled model's."""
  cfg = hf_families.read_config(_dir("gemma3"))
  params = hf_weights.load_params(_dir("gemma3"), cfg)
  ref = np.load(os.path.join(_dir("gemma3"), "reference.npz"))
  tokens, mask = decode_lib.left_pad([ref["tokens"][0, :5].tolist(),
                                      ref["tokens"][1, :9].tolist()], 9, pad_id=0)
  out = []
  for c, p in ((cfg, params), (dataclasses.replace(cfg, scan_layers=True),
                               decoder.stack_layers(params, cfg.num_layers))):
    out.append(np.asarray(decode_lib.generate(
        decoder.Decoder(c), p, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0),
        max_new_tokens=6, eos_id=-1, pad_id=0)))
  assert cfg.sliding_window < 15 and any(cfg.local_layers) and not all(cfg.local_layers)
  np.testing.assert_array_equal(out[1], out[0])

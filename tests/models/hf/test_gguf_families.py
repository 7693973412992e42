"""GGUF `qwen2`, `qwen3`, `gemma` and Mistral (`llama` with a Mistral general.name).

For each, a tiny GGUF is written with gguf.GGUFWriter from the committed HF fixture of
that family as llama.cpp's convert_hf_to_gguf.py writes it (Qwen2's q/k/v biases,
Qwen3's q/k norms, Gemma's norm weights stored as w + 1, q/k rows permuted only for
"llama"), converted back and run through the project's loader: the fixture's
transformers logits. Gemma's fixture was made with the exact GELU, and llama.cpp's
Gemma uses the tanh approximation (which a Gemma GGUF's config must say): its
reference is the fixture with hidden_act gelu_pytorch_tanh, run by the loader.
"""

import glob
import json
import os
import shutil

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from test_gguf import add_bpe_vocab

from pdl_jax.models.hf import families as hf_families
from pdl_jax.models.hf import gguf as gguf_lib
from pdl_jax.models.hf import weights as hf_weights

TESTS = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
# fixture -> (general.architecture, general.name).
_CASES = {"qwen2": ("qwen2", "Qwen2.5 tiny"), "qwen3": ("qwen3", "Qwen3 tiny"),
          "mistral": ("llama", "Mistral-7B-Instruct-v0.1 tiny"), "gemma": ("gemma", "gemma tiny")}


def _permute(w, n_head):
  # convert_hf_to_gguf.py's LlamaModel.permute.
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _tensors(folder):
  """The fixture's tensors (the mistral fixture is sharded)."""
  out = {}
  for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
    out.update(load_file(f))
  return out


def _write_gguf(path, fixture):
  folder = os.path.join(TESTS, "fixtures", "hf", fixture)
  arch, name = _CASES[fixture]
  layer_names = {v: k for k, v in gguf_lib._ARCH_TENSORS[arch][0].items()}
  with open(os.path.join(folder, "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(folder, "tokenizer.json")) as f:
    tok = json.load(f)
  heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
  w = gguf.GGUFWriter(str(path), arch)
  w.add_name(name)
  w.add_block_count(cfg["num_hidden_layers"])
  w.add_embedding_length(cfg["hidden_size"])
  w.add_feed_forward_length(cfg["intermediate_size"])
  w.add_head_count(heads)
  w.add_head_count_kv(kv_heads)
  w.add_key_length(head_dim)
  w.add_value_length(head_dim)
  w.add_context_length(cfg["max_position_embeddings"])
  w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
  add_bpe_vocab(w, tok)
  for hf_name, t in _tensors(folder).items():
    m = hf_name.split(".")
    gname = (_GLOBAL[hf_name] if hf_name in _GLOBAL
             else f"blk.{m[2]}.{layer_names['.'.join(m[3:])]}")
    t = t.astype(np.float32)
    if arch == "gemma" and hf_name.endswith("norm.weight"):
      t = t + np.float32(1.0)  # llama.cpp's Gemma norm_shift
    if arch == "llama" and hf_name.endswith("q_proj.weight"):
      t = _permute(t, heads)
    elif arch == "llama" and hf_name.endswith("k_proj.weight"):
      t = _permute(t, kv_heads)
    w.add_tensor(gname, t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return folder


@pytest.mark.parametrize("fixture", sorted(_CASES))
def test_gguf_gives_the_fixture_logits(tmp_path, fixture):
  folder = _write_gguf(tmp_path / "tiny.gguf", fixture)
  out_dir = gguf_lib.convert(tmp_path / "tiny.gguf", tmp_path / "hf")
  with open(os.path.join(out_dir, "config.json")) as f:
    got_cfg = json.load(f)
  with open(os.path.join(folder, "config.json")) as f:
    want_cfg = json.load(f)
  assert (got_cfg["model_type"], got_cfg["architectures"]) == (
      want_cfg["model_type"], want_cfg["architectures"])
  ref = np.load(os.path.join(folder, "reference.npz"))
  want = ref["logits"]
  if fixture == "gemma":
    assert got_cfg["hidden_act"] == "gelu_pytorch_tanh"
    tanh = tmp_path / "gemma_tanh"
    shutil.copytree(folder, tanh)
    (tanh / "config.json").write_text(json.dumps({**want_cfg, "hidden_act": "gelu_pytorch_tanh"}))
    want = hf_weights.logits(str(tanh), ref["tokens"])
    # (At this fixture's scale the two GELUs differ by < 1e-5 relative: the
    # transformers reference holds too.)
    out = hf_weights.logits(out_dir, ref["tokens"])
    assert float(np.abs(out - ref["logits"]).max() / np.abs(ref["logits"]).max()) <= 1e-5
  cfg, fam = hf_families.read_config(out_dir), hf_families.read_config(folder)
  assert (cfg.qkv_bias, cfg.qk_norm, cfg.tied_embeddings, cfg.head_dim) == (
      fam.qkv_bias, fam.qk_norm, fam.tied_embeddings, fam.head_dim)
  out = hf_weights.logits(out_dir, ref["tokens"])
  assert float(np.abs(out - want).max() / np.abs(want).max()) <= 1e-5


def test_mistral_is_told_apart_by_name_and_unpermuted(tmp_path):
  _write_gguf(tmp_path / "m.gguf", "mistral")
  reader = gguf_lib.open_gguf(tmp_path / "m.gguf")
  cfg = gguf_lib.hf_config(reader)
  assert cfg["model_type"] == "mistral" and cfg["sliding_window"] is None
  tensors = gguf_lib.hf_state_dict(reader, cfg)
  orig = _tensors(os.path.join(TESTS, "fixtures", "hf", "mistral"))
  np.testing.assert_array_equal(tensors["model.layers.0.self_attn.q_proj.weight"],
                                orig["model.layers.0.self_attn.q_proj.weight"])


def test_unsupported_architecture_is_named(tmp_path):
  w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mistral3")
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match=r"general.architecture 'mistral3' is not supported; "
                     r"supported: \('llama', 'qwen2', 'qwen3', 'gemma', 'gemma3'\)"):
    gguf_lib.hf_config(gguf_lib.open_gguf(tmp_path / "x.gguf"))

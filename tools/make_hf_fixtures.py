"""Writes the golden Hugging Face fixtures of tests/models/hf/test_pretrained.py (needs torch).

Tiny random models of each supported family, made and saved by PyTorch transformers
(`save_pretrained`), with a byte-level BPE tokenizer trained on the repo's fixture
texts and the reference float32 logits of a fixed batch (eval mode). Norm weights are
perturbed away from their default and every bias away from zero, so a wrong norm or a
dropped bias fails the parity test. CI has no torch: the tests only read the files.

torch and transformers are not project dependencies; make a side venv:

    python3 -m venv /work/hfvenv
    /work/hfvenv/bin/pip install torch==2.13.0 transformers safetensors tokenizers numpy
    /work/hfvenv/bin/python tools/make_hf_fixtures.py   # from the repo root

Made with torch 2.13.0+cpu, transformers 5.24.0 (gemma3, gemma3_v4, gemma3_mm, mistral_window:
5.25.0;
a fixture's seed is its place in FAMILIES; each folder's versions.json records
the versions actually used). Output: tests/fixtures/hf/<name>/ with config.json,
model*.safetensors (+ index json for the sharded one), tokenizer.json,
tokenizer_config.json, generation_config.json, reference.npz (tokens int32 [B, L],
logits float32 [B, L, V]) and versions.json.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import sys

import numpy as np
import safetensors
import safetensors.numpy
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "hf")
TOKENIZER_VOCAB = 300  # byte-level: 256 bytes + 4 specials + merges
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3
PAD, BOS, EOS = 0, 1, 2
BATCH, LENGTH = 2, 16

_LLAMA = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rms_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
              initializer_range=0.1)  # larger than 0.02: peaked attention, so RoPE matters

# name -> (config class, kwargs, save_pretrained kwargs)
FAMILIES = {
    "llama": ("LlamaConfig", dict(_LLAMA, tie_word_embeddings=False), {}),
    "llama3_rope": ("LlamaConfig", dict(
        _LLAMA, num_hidden_layers=3, tie_word_embeddings=False, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=16)), {}),
    "llama_linear_rope": ("LlamaConfig", dict(
        _LLAMA, vocab_size=TOKENIZER_VOCAB, tie_word_embeddings=True, attention_bias=True,
        mlp_bias=True, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)), {}),
    "mistral": ("MistralConfig", dict(_LLAMA, sliding_window=4096, tie_word_embeddings=False),
                dict(max_shard_size="40KB")),
    "qwen2": ("Qwen2Config", dict(_LLAMA, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                  use_sliding_window=False, sliding_window=4096), {}),
    "qwen3": ("Qwen3Config", dict(_LLAMA, num_key_value_heads=1, head_dim=16,
                                  tie_word_embeddings=False, rms_norm_eps=1e-6,
                                  use_sliding_window=False), {}),
    "gemma": ("GemmaConfig", dict(_LLAMA, num_key_value_heads=1, head_dim=16,
                                  hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
                                  rms_norm_eps=1e-6), {}),
    "gpt2": ("GPT2Config", dict(vocab_size=TOKENIZER_VOCAB, n_embd=32, n_layer=2, n_head=4,
                                n_positions=64, activation_function="gelu_new",
                                layer_norm_epsilon=1e-5, initializer_range=0.1, bos_token_id=BOS,
                                eos_token_id=EOS), {}),
    # A window shorter than the fixture's 16 tokens: the sliding window is in use.
    "mistral_window": ("MistralConfig", dict(_LLAMA, sliding_window=5,
                                             tie_word_embeddings=False), {}),
    # Gemma 3 (v5 config layout): local and global layers in an irregular pattern, a
    # window of 5 < 16 tokens, local RoPE base 100 (far from the global 1e6, linear x2),
    # a score scale unlike head_dim's, final logit soft-capping that bites (cap 3).
    "gemma3": ("Gemma3TextConfig", dict(
        _LLAMA, num_hidden_layers=4, head_dim=16, hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True, rms_norm_eps=1e-6, query_pre_attn_scalar=24,
        sliding_window=5, final_logit_softcapping=3.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention",
                     "sliding_attention"],
        rope_parameters={"full_attention": dict(rope_type="linear", factor=2.0,
                                                rope_theta=1e6),
                         "sliding_attention": dict(rope_type="default", rope_theta=100.0)}),
        {}),
    # Gemma 3 with the v4 config.json that downloaded checkpoints carry (rewritten
    # below): sliding_window_pattern 2, rope_theta / rope_local_base_freq, no soft-cap.
    "gemma3_v4": ("Gemma3TextConfig", dict(
        _LLAMA, num_hidden_layers=3, num_key_value_heads=1, head_dim=16,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, rms_norm_eps=1e-6,
        query_pre_attn_scalar=16, sliding_window=3, sliding_window_pattern=2,
        rope_parameters={"full_attention": dict(rope_type="default", rope_theta=10000.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=50.0)}),
        {}),
    # The multimodal Gemma 3 (Gemma3ForConditionalGeneration, gemma-3-4b and larger):
    # a tiny SigLIP tower the project skips, and its text model read from text_config.
    # Rewritten below into the layout of the Hub's checkpoints: text_config lists only
    # what differs from Gemma3TextConfig's defaults (heads 8/4, the
    # RoPE bases, query_pre_attn_scalar 256 are the defaults here), tensors named
    # language_model.model.*, vision_tower.*, multi_modal_projector.*.
    "gemma3_mm": ("Gemma3Config", dict(
        text_config=dict(vocab_size=320, hidden_size=32, intermediate_size=64, head_dim=16,
                         num_hidden_layers=3, max_position_embeddings=128, sliding_window=5,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                         initializer_range=0.1, sliding_window_pattern=2,
                         rope_parameters={
                             "full_attention": dict(rope_type="linear", factor=2.0,
                                                    rope_theta=1e6),
                             "sliding_attention": dict(rope_type="default", rope_theta=1e4)}),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=16,
                           intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=300, boi_token_index=301,
        eoi_token_index=302), {}),
}


def train_tokenizer() -> tokenizers.Tokenizer:
  """Byte-level BPE trained on the repo's own fixture texts (deterministic)."""
  texts = []
  for path in sorted(glob.glob(os.path.join(ROOT, "tests", "fixtures", "*"))):
    if os.path.isfile(path):
      with open(path, encoding="utf-8", errors="replace") as f:
        texts.extend(line.strip() for line in f if line.strip())
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2, 3]
  return tok


def perturb(model: torch.nn.Module, seed: int) -> None:
  """Norm weights away from their default, biases away from zero."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name or ".ln_" in name:
        p.add_(0.2 * torch.randn(p.shape, generator=g))


def make(name: str, tok: tokenizers.Tokenizer, seed: int) -> None:
  cls_name, kwargs, save_kwargs = FAMILIES[name]
  torch.manual_seed(seed)
  config = getattr(transformers, cls_name)(**kwargs)
  config.dtype = torch.float32
  if name == "gemma3_mm":
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
  else:
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  perturb(model, seed)
  out = os.path.join(OUT, name)
  shutil.rmtree(out, ignore_errors=True)
  model.save_pretrained(out, **save_kwargs)

  tok.save(os.path.join(out, "tokenizer.json"))
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
               "eos_token": "</s>", "pad_token": None if name == "gpt2" else "<pad>",
               "unk_token": "<unk>", "model_max_length": 64}, f, indent=2)
  # One fixture lists two EOS ids (Llama 3 style); gpt2 has no pad (falls back to eos).
  gen = {"bos_token_id": BOS, "eos_token_id": [EOS, 3] if name == "llama3_rope" else EOS}
  if name != "gpt2":
    gen["pad_token_id"] = PAD
  with open(os.path.join(out, "generation_config.json"), "w") as f:
    json.dump(gen, f, indent=2)

  if name == "llama_linear_rope":
    # Rewrite config.json in the transformers v4 layout (top-level rope_theta,
    # rope_scaling with the legacy key "type", torch_dtype): what most downloaded
    # checkpoints carry. Checked below to give transformers the same model.
    path = os.path.join(out, "config.json")
    with open(path) as f:
      cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["rope_scaling"] = {"type": "linear", "factor": rope["factor"]}
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    with open(path, "w") as f:
      json.dump(cfg, f, indent=2)

  if name == "gemma3_v4":
    path = os.path.join(out, "config.json")
    with open(path) as f:
      cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    cfg.pop("layer_types")
    cfg.update(rope_theta=rope["full_attention"]["rope_theta"], rope_scaling=None,
               rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
               sliding_window_pattern=2, torch_dtype=cfg.pop("dtype", "float32"))
    with open(path, "w") as f:
      json.dump(cfg, f, indent=2)

  if name == "gemma3_mm":
    _hub_layout(out)

  if name == "gemma":
    # Official Gemma configs say hidden_act "gelu", a legacy value that transformers
    # maps to the tanh GELU: the reader must too.
    path = os.path.join(out, "config.json")
    with open(path) as f:
      cfg = json.load(f)
    cfg["hidden_act"] = "gelu"
    with open(path, "w") as f:
      json.dump(cfg, f, indent=2)

  texts = ["In the beginning God created the heavens and the earth.",
           "Enter the King, with attendants; and the Queen follows them slowly."]
  tokens = np.zeros((BATCH, LENGTH), np.int32)
  for i, ids in enumerate(tok.encode_batch(texts)):
    ids = [BOS] + ids.ids
    assert len(ids) >= LENGTH, (name, len(ids))
    tokens[i] = ids[:LENGTH]
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens).long()).logits.float().numpy()
    loader = (transformers.Gemma3ForConditionalGeneration if name == "gemma3_mm"
              else transformers.AutoModelForCausalLM)
    reloaded = loader.from_pretrained(out, dtype=torch.float32)
    again = reloaded.eval()(torch.from_numpy(tokens).long()).logits.float().numpy()
  assert np.array_equal(logits, again), f"{name}: saved model differs from the made one"
  if name.startswith("gemma3"):  # the reloaded (rewritten) config is the made one
    text = lambda c: c.get_text_config()
    assert text(reloaded.config).layer_types == text(config).layer_types, name
    assert text(reloaded.config).rope_parameters == text(config).rope_parameters, name
  np.savez(os.path.join(out, "reference.npz"), tokens=tokens, logits=logits.astype(np.float32))
  with open(os.path.join(out, "versions.json"), "w") as f:
    json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
               "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__,
               "numpy": np.__version__, "python": platform.python_version(),
               "seed": seed}, f, indent=2)


def _hub_layout(out: str) -> None:
  """Rewrites a saved Gemma3ForConditionalGeneration as the Hub's checkpoints are laid
  out: text_config without the keys equal to Gemma3TextConfig's defaults, tensors
  named as transformers 4.50 saved them (language_model.model.*, vision_tower.*,
  multi_modal_projector.*; lm_head tied, not stored)."""
  path = os.path.join(out, "config.json")
  with open(path) as f:
    cfg = json.load(f)
  defaults = transformers.Gemma3TextConfig().to_dict()
  text = cfg["text_config"]
  # As in gemma-3-4b-it's config.json: the local pattern and RoPE in their v4 keys.
  rope = text.pop("rope_parameters")
  assert rope["sliding_attention"]["rope_theta"] == 1e4, rope  # the default local base
  text["rope_scaling"] = {k: rope["full_attention"][k] for k in ("rope_type", "factor")}
  for k in ("layer_types", "_sliding_window_pattern", "dtype"):
    text.pop(k, None)
  keep = {"model_type", "sliding_window_pattern", "rope_scaling"}
  cfg["text_config"] = {k: v for k, v in text.items()
                        if k in keep or k not in defaults or defaults[k] != v}
  with open(path, "w") as f:
    json.dump(cfg, f, indent=2)
  weights = os.path.join(out, "model.safetensors")
  tensors = safetensors.numpy.load_file(weights)
  renamed = {}
  for k, v in tensors.items():
    if k.startswith("model.language_model."):
      k = "language_model.model." + k[len("model.language_model."):]
    elif k.startswith("model."):
      k = k[len("model."):]
    if k != "lm_head.weight":
      renamed[k] = v
  safetensors.numpy.save_file(renamed, weights, metadata={"format": "pt"})


def main() -> None:
  tok = train_tokenizer()
  names = sys.argv[1:] or list(FAMILIES)
  for name in names:
    make(name, tok, list(FAMILIES).index(name))  # a fixture's seed is its place in FAMILIES
    print(name, sorted(os.listdir(os.path.join(OUT, name))))


if __name__ == "__main__":
  main()

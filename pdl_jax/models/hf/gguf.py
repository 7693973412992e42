"""GGUF (llama.cpp) file -> Hugging Face model folder (config.json, float32 safetensors,
tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json).

Supported: architectures "llama" and "gemma3" (text), tokenizers "gpt2" (byte-level
BPE) and "llama" (SentencePiece BPE; pdl_jax.models.hf.gguf_tokenizer); tensors in
any type `gguf.quants.dequantize` handles. transformers' own GGUF loader
(integrations/ggml.py, modeling_gguf_pytorch_utils.py) is the reference.

Gemma 3 as llama.cpp's convert_hf_to_gguf.py writes it: every RMSNorm weight
("*norm.weight", q/k norms included) stored with Gemma's +1 folded in (w + 1; read
back as w), q/k not permuted (Gemma's RoPE is rotate-half, llama.cpp's NEOX), the
layer pattern and local RoPE base not in the file (llama.cpp's fixed Gemma 3 values:
every 6th layer global, local base 10000, unless gemma3.attention.sliding_window_pattern
/ gemma3.rope.freq_base_swa say otherwise), the score scale 1/sqrt(key_length).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from typing import Any, Mapping

import gguf
import numpy as np
import safetensors.numpy
from etils import epath

from pdl_jax.models.hf import gguf_tokenizer
from pdl_jax.models.hf.gguf_reader import _REQUIRED, metadata, open_gguf  # noqa: F401

hf_tokenizer_files = gguf_tokenizer.hf_tokenizer_files


# llama.cpp tensor names (after "blk.N.") -> transformers' LlamaForCausalLM names.
_LAYER_TENSORS = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# Gemma 3's layer tensors beyond Llama's (its ffn_norm is pre_feedforward_layernorm).
_GEMMA3_LAYER_TENSORS = {
    **{k: v for k, v in _LAYER_TENSORS.items() if k != "ffn_norm.weight"},
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_ARCHITECTURES = ("llama", "gemma3")
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _architecture(reader: gguf.GGUFReader) -> str:
  arch = metadata(reader, "general.architecture")
  if arch not in _ARCHITECTURES:
    raise ValueError(f"{reader.data.filename}: general.architecture {arch!r} is not "
                     f"supported; supported: {_ARCHITECTURES}.")
  return arch


def _tensor_shapes(reader: gguf.GGUFReader) -> dict[str, tuple[int, ...]]:
  # GGUF lists dims fastest-first (ne0 = columns); numpy / PyTorch order is reversed.
  return {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}


def hf_config(reader: gguf.GGUFReader) -> dict[str, Any]:
  """transformers LlamaConfig-style config.json dict from the GGUF metadata.

  Raises:
    ValueError: unsupported architecture or option, or a missing metadata key.
  """
  arch = _architecture(reader)
  get = lambda key, default=_REQUIRED: metadata(reader, f"{arch}.{key}", default)  # noqa: E731
  path = reader.data.filename
  d, heads = int(get("embedding_length")), int(get("attention.head_count"))
  kv_heads = int(get("attention.head_count_kv", heads))
  head_dim = int(get("attention.key_length", d // heads))
  if int(get("attention.value_length", head_dim)) != head_dim:
    raise ValueError(f"{path}: {arch}.attention.value_length differs from key_length; "
                     "not supported.")
  if int(get("rope.dimension_count", head_dim)) != head_dim:
    raise ValueError(f"{path}: {arch}.rope.dimension_count {get('rope.dimension_count')} "
                     f"!= head_dim {head_dim}: partial RoPE is not supported.")
  scaling = get("rope.scaling.type", "none")
  if scaling not in ("none", "") and not (arch == "gemma3" and scaling == "linear"):
    raise ValueError(f"{path}: {arch}.rope.scaling.type {scaling!r} is not supported "
                     "(only unscaled RoPE; Gemma 3: linear).")
  if get("expert_count", 0):
    raise ValueError(f"{path}: mixture-of-experts ({arch}.expert_count) is not supported.")
  shapes = _tensor_shapes(reader)
  if "token_embd.weight" not in shapes:
    raise ValueError(f"{path}: GGUF tensor 'token_embd.weight' is missing.")
  tokens = metadata(reader, "tokenizer.ggml.tokens")
  # The embedding may have more rows than the tokenizer has tokens (padded vocabulary):
  # the weights decide vocab_size, as in a Hugging Face config.
  vocab_size = shapes["token_embd.weight"][0]
  if vocab_size < len(tokens):
    raise ValueError(f"{path}: {len(tokens)} tokens but token_embd.weight has only "
                     f"{vocab_size} rows.")
  special = {name: metadata(reader, f"tokenizer.ggml.{key}_token_id", None)
             for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
  out = {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "hidden_size": d,
      "intermediate_size": int(get("feed_forward_length")),
      "num_hidden_layers": int(get("block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": kv_heads,
      "head_dim": head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": int(get("context_length")),
      "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
      "rope_theta": float(get("rope.freq_base", 10000.0)),
      "rope_scaling": None,
      "attention_bias": False,
      "mlp_bias": False,
      "tie_word_embeddings": "output.weight" not in shapes,
      "vocab_size": vocab_size,
      "bos_token_id": special["bos"],
      "eos_token_id": special["eos"],
      "pad_token_id": special["pad"],
      "initializer_range": 0.02,
      "use_cache": True,
      "torch_dtype": "float32",
      "dtype": "float32",
  }
  return _gemma3_config(reader, out, get) if arch == "gemma3" else out


def _gemma3_config(reader: gguf.GGUFReader, llama: dict[str, Any], get) -> dict[str, Any]:
  """Gemma3TextConfig fields (v4 layout) of a gemma3 GGUF; see the module docstring."""
  n = llama["num_hidden_layers"]
  pattern = get("attention.sliding_window_pattern", 6)
  if isinstance(pattern, list):  # newer llama.cpp: one bool per layer, True = local
    if len(pattern) != n:
      raise ValueError(f"{reader.data.filename}: gemma3.attention.sliding_window_pattern "
                       f"has {len(pattern)} entries for {n} layers.")
    types = ["sliding_attention" if p else "full_attention" for p in pattern]
  else:
    types = ["sliding_attention" if (i + 1) % int(pattern) else "full_attention"
             for i in range(n)]
  scaling = get("rope.scaling.type", "none")
  cap = get("final_logit_softcapping", None)
  out = {k: v for k, v in llama.items() if k not in ("hidden_act", "mlp_bias")}
  out.update(
      architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
      hidden_activation="gelu_pytorch_tanh", layer_types=types,
      sliding_window=int(get("attention.sliding_window")),
      rope_local_base_freq=float(get("rope.freq_base_swa", 10000.0)),
      rope_scaling=({"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
                    if scaling == "linear" else None),
      query_pre_attn_scalar=llama["head_dim"], final_logit_softcapping=cap,
      attn_logit_softcapping=None, use_bidirectional_attention=False)
  return out


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes convert_hf_to_gguf.py's q/k row permutation (interleaved RoPE pairs back to
  Hugging Face's rotate-half halves), as transformers' reverse_permute does."""
  return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def dequantize(tensor: Any) -> np.ndarray:
  """float32 numpy array of a GGUFReader tensor, in PyTorch's dim order."""
  shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
  out = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  return np.ascontiguousarray(np.asarray(out, np.float32).reshape(shape))


def hf_state_dict(reader: gguf.GGUFReader, config: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """transformers-named float32 tensors of the GGUF, q/k permutation undone.

  Raises:
    ValueError: unknown / missing tensors or wrong shapes (all named in one error).
  """
  path = reader.data.filename
  layers, d = config["num_hidden_layers"], config["hidden_size"]
  heads, kv_heads, hd = (config["num_attention_heads"], config["num_key_value_heads"],
                         config["head_dim"])
  ff, vocab = config["intermediate_size"], config["vocab_size"]
  gemma3 = config["model_type"] == "gemma3_text"
  layer_tensors = _GEMMA3_LAYER_TENSORS if gemma3 else _LAYER_TENSORS
  expected = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
  if not config["tie_word_embeddings"]:
    expected["lm_head.weight"] = (vocab, d)
  for i in range(layers):
    p = f"model.layers.{i}."
    expected.update({
        p + "self_attn.q_proj.weight": (heads * hd, d),
        p + "self_attn.k_proj.weight": (kv_heads * hd, d),
        p + "self_attn.v_proj.weight": (kv_heads * hd, d),
        p + "self_attn.o_proj.weight": (d, heads * hd),
        p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
        p + "mlp.down_proj.weight": (d, ff),
        p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
    if gemma3:
      expected.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                       p + "pre_feedforward_layernorm.weight": (d,),
                       p + "post_feedforward_layernorm.weight": (d,)})
  out: dict[str, np.ndarray] = {}
  errors: list[str] = []
  for t in reader.tensors:
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
    name = (f"model.layers.{m[1]}.{layer_tensors[m[2]]}" if m and m[2] in layer_tensors
            else _GLOBAL_TENSORS.get(t.name))
    if name is None or name not in expected:
      errors.append(f"unexpected tensor {t.name!r}")
      continue
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    if shape != expected[name]:
      errors.append(f"{t.name!r} has shape {shape}, expected {expected[name]}")
      continue
    try:
      w = dequantize(t)
    except NotImplementedError as e:
      errors.append(f"{t.name!r}: type {t.tensor_type.name} cannot be dequantised ({e})")
      continue
    if gemma3:  # llama.cpp folds Gemma's (1 + w) into the stored norm weights
      w = w - np.float32(1.0) if name.endswith("norm.weight") else w
    elif name.endswith("q_proj.weight"):
      w = _unpermute(w, heads)
    elif name.endswith("k_proj.weight"):
      w = _unpermute(w, kv_heads)
    out[name] = w
  errors += [f"missing tensor for {name!r}" for name in expected if name not in out]
  if errors:
    raise ValueError(f"{path}: " + "; ".join(errors) + ".")
  return out


def convert(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> str:
  """Writes the Hugging Face folder of a GGUF file to out_dir; returns out_dir.

  Everything is written to a temporary sibling folder first and renamed into place, so
  out_dir is either absent or complete. Paths may be remote (etils.epath, gs://...): a
  remote GGUF is first copied to a local temporary file (GGUFReader memory-maps it).

  Raises:
    FileExistsError: out_dir exists.
    ValueError: see open_gguf, hf_config, hf_state_dict, hf_tokenizer_files.
  """
  src, out = epath.Path(gguf_path), epath.Path(out_dir)
  if out.exists():
    raise FileExistsError(f"{os.fspath(out)} exists; give a new folder to convert "
                          f"{os.fspath(src)} into.")
  with tempfile.TemporaryDirectory() as local_tmp:
    local = os.fspath(src)
    if "://" in local:
      if not src.exists():
        raise FileNotFoundError(f"{local}: no such GGUF file.")
      local = os.path.join(local_tmp, src.name)
      src.copy(local)
    reader = open_gguf(local)
    try:
      config = hf_config(reader)
      files = hf_tokenizer_files(reader)
      tensors = hf_state_dict(reader, config)
    except ValueError as e:
      # The reader reports its memmap's name, which for a copied remote file is a
      # temporary path: name the file the caller gave.
      raise ValueError(str(e).replace(local, os.fspath(src))) from e
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
      (tmp / "config.json").write_text(json.dumps(config, indent=2))
      for name, text in files.items():
        (tmp / name).write_text(text)
      if "://" in os.fspath(tmp):
        (tmp / "model.safetensors").write_bytes(
            safetensors.numpy.save(tensors, metadata={"format": "pt"}))
      else:
        safetensors.numpy.save_file(tensors, os.fspath(tmp / "model.safetensors"),
                                    metadata={"format": "pt"})
      tmp.rename(out)
    except BaseException:
      tmp.rmtree(missing_ok=True)
      raise
  return os.fspath(out)

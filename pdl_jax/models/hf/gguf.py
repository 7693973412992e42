"""GGUF (llama.cpp) file -> Hugging Face model folder (config.json, float32 safetensors,
tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json).

Supported: architecture "llama" with a "gpt2" (byte-level BPE) tokenizer; tensors in
any type `gguf.quants.dequantize` handles. transformers' own GGUF loader
(integrations/ggml.py, modeling_gguf_pytorch_utils.py) is the reference.
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
import tokenizers
from etils import epath
from tokenizers import decoders, models, pre_tokenizers, processors

_MAGIC = b"GGUF"
_REQUIRED = object()

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
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# tokenizer.ggml.pre values whose pre-tokenisation we reproduce. llama.cpp's "smollm"
# (like "starcoder") splits every digit off before the GPT-2 regex, as the original
# Hugging Face tokenizer.json of those models does (Digits + ByteLevel).
_PLAIN_PRE = ("default", "gpt2")
_DIGIT_PRE = ("smollm", "starcoder")
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's enum)


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
  """A GGUFReader of a local file, with errors that name the file.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a GGUF file (wrong magic), or truncated / corrupt.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such GGUF file.")
  with open(path, "rb") as f:
    head = f.read(4)
  if head != _MAGIC:
    raise ValueError(f"{path} is not a GGUF file: it starts with {head!r}, a GGUF file "
                     f"with {_MAGIC!r}" + (" (the file is empty or truncated)"
                                           if len(head) < 4 else "") + ".")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # the reader fails in many ways on a short file (reshape, index)
    raise ValueError(f"{path}: cannot read the GGUF file (truncated or corrupt?): "
                     f"{type(e).__name__}: {e}") from e
  # The reader memory-maps the file and may build tensors on a short tail without
  # noticing; check that every tensor's bytes lie inside the file.
  size = os.path.getsize(path)
  for t in reader.tensors:
    if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
      raise ValueError(f"{path}: truncated GGUF file: tensor {t.name!r} needs bytes up to "
                       f"{t.data_offset + t.n_bytes}, the file has {size}.")
  return reader


def metadata(reader: gguf.GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
  """The value of metadata `key` (a Python scalar, str or list); `default` when absent.

  Raises:
    ValueError: the key is absent and no default was given (names the key and file).
  """
  field = reader.fields.get(key)
  if field is None:
    if default is _REQUIRED:
      raise ValueError(f"{reader.data.filename}: GGUF metadata key {key!r} is missing.")
    return default
  value = field.contents()
  if field.types and field.types[0] == gguf.GGUFValueType.FLOAT32:
    # float32 metadata (1e-5 reads back as 9.99999974e-06): keep the decimal it came from.
    value = float(f"{value:.7g}")
  return value


def _architecture(reader: gguf.GGUFReader) -> str:
  arch = metadata(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"{reader.data.filename}: general.architecture {arch!r} is not "
                     "supported; supported: 'llama'.")
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
  if scaling not in ("none", ""):
    raise ValueError(f"{path}: {arch}.rope.scaling.type {scaling!r} is not supported "
                     "(only unscaled RoPE).")
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
  return {
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
  out: dict[str, np.ndarray] = {}
  errors: list[str] = []
  for t in reader.tensors:
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
    name = (f"model.layers.{m[1]}.{_LAYER_TENSORS[m[2]]}" if m and m[2] in _LAYER_TENSORS
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
    if name.endswith("q_proj.weight"):
      w = _unpermute(w, heads)
    elif name.endswith("k_proj.weight"):
      w = _unpermute(w, kv_heads)
    out[name] = w
  errors += [f"missing tensor for {name!r}" for name in expected if name not in out]
  if errors:
    raise ValueError(f"{path}: " + "; ".join(errors) + ".")
  return out


def hf_tokenizer_files(reader: gguf.GGUFReader) -> dict[str, str]:
  """{file name: text} of tokenizer.json, tokenizer_config.json, chat_template.jinja
  (when the GGUF has a template) and generation_config.json.

  Raises:
    ValueError: a tokenizer model other than "gpt2" (byte-level BPE), an unsupported
      pre-tokenizer, or missing metadata.
  """
  path = reader.data.filename
  kind = metadata(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"{path}: tokenizer.ggml.model {kind!r} is not supported; supported: "
                     "'gpt2' (byte-level BPE)" + (" ('llama' is SentencePiece)"
                                                 if kind == "llama" else "") + ".")
  pre = metadata(reader, "tokenizer.ggml.pre", "default")
  if pre not in _PLAIN_PRE + _DIGIT_PRE:
    raise ValueError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported; supported: "
                     f"{_PLAIN_PRE + _DIGIT_PRE}.")
  tokens = metadata(reader, "tokenizer.ggml.tokens")
  types = metadata(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
  merges = metadata(reader, "tokenizer.ggml.merges")
  vocab: dict[str, int] = {}
  for i, tok in enumerate(tokens):
    vocab.setdefault(tok, i)  # a duplicated token string: the first id wins
  tok = tokenizers.Tokenizer(models.BPE(
      vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], dropout=None,
      fuse_unk=False, byte_fallback=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.pre_tokenizer = (byte_level if pre in _PLAIN_PRE else pre_tokenizers.Sequence(
      [pre_tokenizers.Digits(individual_digits=True), byte_level]))
  tok.decoder = decoders.ByteLevel()
  # Control tokens (<|im_start|>, ...) are special added tokens: never split, dropped
  # when decoding; user-defined ones (stored as plain text by llama.cpp) are added
  # tokens that decode as text.
  tok.add_tokens([tokenizers.AddedToken(t, special=types[i] == _CONTROL, normalized=False)
                  for i, t in enumerate(tokens) if types[i] in (_CONTROL, _USER_DEFINED)])
  ids = {name: metadata(reader, f"tokenizer.ggml.{name}_token_id", None)
         for name in ("bos", "eos", "padding", "unknown")}
  add_bos = bool(metadata(reader, "tokenizer.ggml.add_bos_token", False))
  add_eos = bool(metadata(reader, "tokenizer.ggml.add_eos_token", False))
  if add_bos or add_eos:
    for name, on in (("bos", add_bos), ("eos", add_eos)):
      if on and ids[name] is None:
        raise ValueError(f"{path}: tokenizer.ggml.add_{name}_token is set but "
                         f"tokenizer.ggml.{name}_token_id is missing.")
    def template(seq: str, type_id: int) -> str:
      pieces = ([f"{tokens[ids['bos']]}:{type_id}"] if add_bos else []) + [f"{seq}:{type_id}"]
      return " ".join(pieces + ([f"{tokens[ids['eos']]}:{type_id}"] if add_eos else []))
    specials = sorted({ids[name] for name, on in (("bos", add_bos), ("eos", add_eos)) if on})
    tok.post_processor = processors.TemplateProcessing(
        single=template("$A", 0), pair=template("$A", 0) + " " + template("$B", 1),
        special_tokens=[(tokens[i], i) for i in specials])
  config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
  for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
    if ids[key] is not None:
      config[f"{name}_token"] = tokens[ids[key]]
  config.update(add_bos_token=add_bos, add_eos_token=add_eos,
                clean_up_tokenization_spaces=False,
                model_max_length=int(metadata(reader, "llama.context_length", 2048)))
  files = {"tokenizer.json": tok.to_str(pretty=True)}
  template = metadata(reader, "tokenizer.chat_template", None)
  if template is not None:
    config["chat_template"] = template
    files["chat_template.jinja"] = template
  files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False)
  generation = {f"{name}_token_id": ids[key] for name, key in
                (("bos", "bos"), ("eos", "eos"), ("pad", "padding")) if ids[key] is not None}
  files["generation_config.json"] = json.dumps(generation, indent=2)
  return files


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

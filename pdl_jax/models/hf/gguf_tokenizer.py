"""A GGUF's tokenizer -> Hugging Face tokenizer files (tokenizer.json,
tokenizer_config.json, chat_template.jinja, generation_config.json).

Two tokenizer models (`tokenizer.ggml.model`):
  "gpt2": byte-level BPE with the file's merges and pre-tokenizer.
  "llama": a SentencePiece BPE vocabulary (pieces, scores, token types, byte
    fallback), rebuilt as a `tokenizers` BPE the way transformers' GGUF loader does
    (integrations/gguf/gguf_tokenizer_mapping.py, the reference): SentencePiece
    merges the adjacent pair whose joined piece ranks best, so the merges are every
    split of every piece into two pieces, ranked by the joined piece (by score; for
    Gemma, whose scores are not its merge order, by its place in the file). Spaces
    become "▁" (a normaliser), a leading "▁" only with add_space_prefix (Gemma 3: off),
    unknown bytes fall back to <0xNN> pieces, control tokens are special added tokens
    and user-defined ones ("\n", runs of newlines) added tokens matched whole.
    llama.cpp stores Gemma's whitespace-run pieces as real spaces: respelled "▁" x n.
"""

from __future__ import annotations

import json
from typing import Any

import gguf
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from pdl_jax.models.hf import gguf_reader as gguf_lib

# tokenizer.ggml.pre values whose pre-tokenisation we reproduce. llama.cpp's "smollm"
# (like "starcoder") splits every digit off before the GPT-2 regex, as the original
# Hugging Face tokenizer.json of those models does (Digits + ByteLevel).
_PLAIN_PRE = ("default", "gpt2")
_DIGIT_PRE = ("smollm", "starcoder")
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's enum)
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")


def _byte_level_bpe(reader: gguf.GGUFReader, tokens: list[str], types: list[int]
                    ) -> tokenizers.Tokenizer:
  path = reader.data.filename
  pre = gguf_lib.metadata(reader, "tokenizer.ggml.pre", "default")
  if pre not in _PLAIN_PRE + _DIGIT_PRE:
    raise ValueError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported; supported: "
                     f"{_PLAIN_PRE + _DIGIT_PRE}.")
  merges = gguf_lib.metadata(reader, "tokenizer.ggml.merges")
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
  return tok


def sentencepiece_merges(pieces: list[str], rank: list[float]) -> list[tuple[str, str]]:
  """BPE merges that reproduce SentencePiece's BPE on `pieces`: every split of a piece
  into two pieces of the vocabulary, best joined piece first (higher rank first;
  ties: the longer left part first), as transformers' generate_merges."""
  ids = {p: i for i, p in reversed(list(enumerate(pieces)))}  # first id of a duplicate
  found = []
  for piece, score in zip(pieces, rank):
    local = [(piece[:k], piece[k:]) for k in range(1, len(piece))
             if piece[:k] in ids and piece[k:] in ids]
    local.sort(key=lambda lr: (ids[lr[0]], ids[lr[1]]))
    found.extend((l, r, score) for l, r in local)
  found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
  return [(l, r) for l, r, _ in found]


def _sentencepiece_bpe(reader: gguf.GGUFReader, tokens: list[str], types: list[int]
                       ) -> tokenizers.Tokenizer:
  arch = gguf_lib.metadata(reader, "general.architecture")
  gemma = arch in _GEMMA_ARCHS
  pieces = [("\u2581" * len(t) if gemma and " " in t and not t.strip() else t) for t in tokens]
  if gemma:  # Gemma's scores are not its merge order; the file's order is
    rank = [-float(i) for i in range(len(pieces))]
  else:
    rank = [float(x) for x in gguf_lib.metadata(reader, "tokenizer.ggml.scores")]
  vocab = {p: i for i, p in reversed(list(enumerate(pieces)))}
  unk_id = gguf_lib.metadata(reader, "tokenizer.ggml.unknown_token_id", None)
  tok = tokenizers.Tokenizer(models.BPE(
      vocab=vocab, merges=sentencepiece_merges(pieces, rank), dropout=None, fuse_unk=True,
      unk_token=None if unk_id is None else tokens[unk_id], byte_fallback=True))
  space_prefix = bool(gguf_lib.metadata(reader, "tokenizer.ggml.add_space_prefix", not gemma))
  replace = normalizers.Replace(" ", "\u2581")
  tok.normalizer = (normalizers.Sequence([normalizers.Prepend("\u2581"), replace])
                    if space_prefix else replace)
  tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                   decoders.Fuse()] + ([decoders.Strip(" ", 1, 0)]
                                                       if space_prefix else []))
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t, ty in zip(tokens, types) if ty == _CONTROL])
  # User-defined pieces whose spelling is a piece (after respelling): "\n", "<table>"...
  tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                  for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])
  return tok


def hf_tokenizer_files(reader: gguf.GGUFReader) -> dict[str, str]:
  """{file name: text} of tokenizer.json, tokenizer_config.json, chat_template.jinja
  (when the GGUF has a template) and generation_config.json.

  Raises:
    ValueError: a tokenizer model other than "gpt2" (byte-level BPE) or "llama"
      (SentencePiece BPE), an unsupported pre-tokenizer, or missing metadata.
  """
  path = reader.data.filename
  kind = gguf_lib.metadata(reader, "tokenizer.ggml.model")
  if kind not in ("gpt2", "llama"):
    raise ValueError(f"{path}: tokenizer.ggml.model {kind!r} is not supported; supported: "
                     "'gpt2' (byte-level BPE), 'llama' (SentencePiece BPE).")
  tokens = gguf_lib.metadata(reader, "tokenizer.ggml.tokens")
  types = gguf_lib.metadata(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
  tok = (_byte_level_bpe if kind == "gpt2" else _sentencepiece_bpe)(reader, tokens, types)
  ids = {name: gguf_lib.metadata(reader, f"tokenizer.ggml.{name}_token_id", None)
         for name in ("bos", "eos", "padding", "unknown")}
  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
  add_bos = bool(gguf_lib.metadata(reader, "tokenizer.ggml.add_bos_token", kind == "llama"))
  add_eos = bool(gguf_lib.metadata(reader, "tokenizer.ggml.add_eos_token", False))
  _post_processor(tok, path, tokens, ids, add_bos, add_eos)
  config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
  for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
    if ids[key] is not None:
      config[f"{name}_token"] = tokens[ids[key]]
  arch = gguf_lib.metadata(reader, "general.architecture")
  config.update(add_bos_token=add_bos, add_eos_token=add_eos,
                clean_up_tokenization_spaces=False,
                model_max_length=int(gguf_lib.metadata(reader, f"{arch}.context_length", 2048)))
  files = {"tokenizer.json": tok.to_str(pretty=True)}
  template = gguf_lib.metadata(reader, "tokenizer.chat_template", None)
  if template is not None:
    config["chat_template"] = template
    files["chat_template.jinja"] = template
  files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False)
  generation = {f"{name}_token_id": ids[key] for name, key in
                (("bos", "bos"), ("eos", "eos"), ("pad", "padding")) if ids[key] is not None}
  files["generation_config.json"] = json.dumps(generation, indent=2)
  return files


def _post_processor(tok: tokenizers.Tokenizer, path: str, tokens: list[str],
                    ids: dict[str, int | None], add_bos: bool, add_eos: bool) -> None:
  """BOS / EOS added around every encoded text, as the GGUF's add_*_token say."""
  if not (add_bos or add_eos):
    return
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

"""Hugging Face `tokenizers` tokenizer (tokenizer.json) behind the interface of
`pdl_jax.tokenizers.Tokenizer`, for pretrained checkpoints.

Special ids come from the model directory: tokenizer_config.json (token strings or
AddedToken dicts), then generation_config.json, then config.json; the first source
that names an id wins, and every EOS id found (generation_config may list several,
as Llama 3 does) is kept in `eos_ids`. Without a pad token, pad = eos. Ids a model
lacks are -1 (as SentencePiece reports a disabled id).

`vocab_size` is the tokenizer's size; a model's embedding may have more rows
(padding to a multiple of 64/128); decoding drops such ids.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np
import tokenizers
from etils import epath


def _token_content(token: Any) -> str | None:
  """'</s>' from '</s>' or from an AddedToken dict {'content': '</s>', ...}."""
  if isinstance(token, dict):
    return token.get("content")
  return token if isinstance(token, str) else None


# Between prompt and target in the plain format: a pretrained model's prompt format is
# text, so no new token is added to its vocabulary.
_SEPARATOR = "\n"


def read_chat_template(folder: epath.Path, tokenizer_config: dict[str, Any]) -> str | None:
  """The model's chat template: chat_template.jinja (as transformers v5 saves it), else
  tokenizer_config.json's "chat_template" (a string, or a list of named templates of
  which "default" is the chat one); None when the model has none."""
  if (folder / "chat_template.jinja").exists():
    return (folder / "chat_template.jinja").read_text()
  template = tokenizer_config.get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  return template if isinstance(template, str) and template else None


def _ids(value: Any) -> list[int]:
  if value is None:
    return []
  if isinstance(value, (list, tuple)):
    return [int(v) for v in value]
  return [int(value)]


class HFTokenizer:
  """A tokenizer.json with batch encode/decode, special ids and a content hash."""

  def __init__(self, tokenizer_json: bytes, path: str = "<memory>",
               special_sources: Sequence[dict[str, Any]] = (),
               chat_template: str | None = None):
    """Wraps tokenizer.json bytes; `special_sources` are the parsed
    tokenizer_config.json, generation_config.json and config.json (in that order of
    precedence); `chat_template` the model's jinja chat template, if any; use
    `load` for a directory."""
    self.path = path
    try:
      self._tok = tokenizers.Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    except Exception as e:  # the library raises plain Exception subclasses
      raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from e
    self.sha256 = hashlib.sha256(tokenizer_json).hexdigest()
    ids: dict[str, list[int]] = {"bos": [], "eos": [], "pad": [], "unk": []}
    for source in special_sources:
      for kind in ids:
        found = []
        token = _token_content(source.get(f"{kind}_token"))
        if token is not None and self._tok.token_to_id(token) is not None:
          found = [self._tok.token_to_id(token)]
        found += _ids(source.get(f"{kind}_token_id"))
        if not ids[kind]:
          ids[kind] = found
        elif kind == "eos":
          ids[kind] += [i for i in found if i not in ids[kind]]
    self.eos_ids: tuple[int, ...] = tuple(ids["eos"])
    self._bos = ids["bos"][0] if ids["bos"] else -1
    self._eos = ids["eos"][0] if ids["eos"] else -1
    self._pad = ids["pad"][0] if ids["pad"] else self._eos
    self._unk = ids["unk"][0] if ids["unk"] else -1
    # Ids never shown in decoded text: the library's special tokens and ours.
    self._special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    self._special |= {i for i in (self._bos, self._pad, *self.eos_ids) if i >= 0}
    # Text is encoded with special-token strings split as text ("<|im_end|>" written in
    # a target is not the EOS); the chat template's own markup with them parsed.
    self._markup = tokenizers.Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    self._tok.encode_special_tokens = True
    config = special_sources[0] if special_sources else {}
    # The special token strings a chat template refers to (bos_token, eos_token, ...).
    self.special_tokens = {f"{kind}_token": _token_content(config.get(f"{kind}_token"))
                           for kind in ("bos", "eos", "unk", "pad")}
    self.chat_template = chat_template
    self._prefix = self._added_prefix(config.get("add_bos_token"))

  def _added_prefix(self, add_bos_token: Any) -> list[int]:
    """The ids the tokenizer itself puts before a text: BOS when tokenizer_config's
    add_bos_token says so, else what tokenizer.json's post-processor adds (Llama 3:
    <|begin_of_text|>; Qwen, GPT-2, SmolLM: nothing). A named bos_token alone is
    not a BOS the model was trained with."""
    if isinstance(add_bos_token, bool):
      return [self._bos] if add_bos_token and self._bos >= 0 else []
    plain = self._markup.encode("a", add_special_tokens=False).ids
    full = self._markup.encode("a", add_special_tokens=True).ids
    start = next((i for i in range(len(full)) if full[i:i + len(plain)] == plain), 0)
    return full[:start]

  @classmethod
  def load(cls, path: str | os.PathLike) -> "HFTokenizer":
    """Loads a model directory (or its tokenizer.json) with the special ids beside it."""
    path = epath.Path(path)
    folder, file = (path, path / "tokenizer.json") if path.is_dir() else (path.parent, path)
    if not file.exists():
      raise FileNotFoundError(
          f"tokenizer {os.fspath(file)!r} does not exist; give a Hugging Face model "
          "directory with a tokenizer.json (or the file itself).")
    sources = []
    for name in ("tokenizer_config.json", "generation_config.json", "config.json"):
      sources.append(json.loads((folder / name).read_text())
                     if (folder / name).exists() else {})
    return cls(file.read_bytes(), os.fspath(file), sources,
               read_chat_template(folder, sources[0]))

  @property
  def special_ids(self) -> frozenset[int]:
    """Ids never shown in decoded text: the tokenizer's special tokens and BOS, pad and
    every EOS."""
    return frozenset(self._special)

  @property
  def vocab_size(self) -> int:
    """Tokens the tokenizer knows (added tokens included); the embedding may be larger."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self._pad

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def bos_id(self) -> int:
    return self._bos

  @property
  def unk_id(self) -> int:
    return self._unk

  @property
  def sep_id(self) -> int:
    """EOS: a pretrained model has no separator token (its prompt format is plain text),
    so the prompt/target boundary uses EOS, as the SentencePiece tokenizer does for
    models trained elsewhere."""
    return self._eos

  @property
  def prompt_prefix_ids(self) -> list[int]:
    """What the tokenizer adds before a text (its BOS where it adds one: Llama 3 and
    Gemma expect it at the start; SmolLM2 and Qwen add none)."""
    return list(self._prefix)

  @property
  def separator_ids(self) -> list[int]:
    """A newline between prompt and target: a pretrained model's prompt format is
    plain text, so no special token is added to its vocabulary."""
    return self.encode_batch([_SEPARATOR])[0]

  def padding_ids(self, num_embeddings: int) -> tuple[int, ...]:
    """Embedding rows past the tokenizer (a model's padded vocabulary): ids no text has,
    to pass to decoding as banned ids so they are never generated."""
    return tuple(range(self.vocab_size, num_embeddings))

  def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
    """Token ids of each text, no special tokens added (no BOS/EOS).

    Batched in the library's own thread pool; its size is process-wide
    (RAYON_NUM_THREADS), so `num_threads` is accepted for interface parity only.
    """
    del num_threads
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def encode_parts(self, prompts: Sequence[str], targets: Sequence[str]
                   ) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """(prompt ids, separator ids, target ids) of each example, as the joined text
    `prompt + "\n" + target` is tokenized: one encode and its character offsets (a
    token belongs to the part its text ends in). Encoding the parts alone differs
    for Metaspace tokenizers (Llama 2, Mistral: each text alone starts with '▁', so
    "\n" alone is ['▁', '\n'] and "The" alone '▁The', where the joined text has
    '\n', 'The') and where a BPE merge crosses a boundary."""
    texts = [p + _SEPARATOR + t for p, t in zip(prompts, targets)]
    encs = self._tok.encode_batch(texts, add_special_tokens=False)
    if not encs:
      return [], [], []
    # Vectorised over every token of every example (a Python loop per token cost
    # more than the tokenizer).
    lengths = np.fromiter((len(e.ids) for e in encs), np.int64, count=len(encs))
    total = int(lengths.sum())
    ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encs), np.int64,
                      count=total)
    ends = np.fromiter(itertools.chain.from_iterable(e.offsets for e in encs),
                       np.dtype((np.int64, 2)), count=total)[:, 1] if total else ids
    prompt_end = np.repeat(np.fromiter(map(len, prompts), np.int64, count=len(encs)),
                           lengths)
    # A token belongs to the part its text ends in: one that merges the newline with
    # the target's first letters ('\nThe') is the target's, so the loss covers them
    # (and no token is ever split).
    part = (ends > prompt_end).astype(np.int8) + (ends > prompt_end + len(_SEPARATOR))
    row = np.repeat(np.arange(len(encs)), lengths)
    out = []
    for j in range(3):
      sel = part == j
      counts = np.bincount(row[sel], minlength=len(encs))
      out.append([x.tolist() for x in np.split(ids[sel], np.cumsum(counts)[:-1])])
    return out[0], out[1], out[2]

  def encode_markup(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of template text, its special-token strings as those tokens (no
    BOS/EOS added): for chat markup, never for data."""
    return [e.ids for e in self._markup.encode_batch(list(texts), add_special_tokens=False)]

  def encode_markup_offsets(self, texts: Sequence[str]
                            ) -> list[tuple[list[int], list[int]]]:
    """(ids, end offsets) of each text encoded as encode_markup encodes it: token k
    covers text[..:ends[k]] (a character offset; the byte-fallback pieces of one
    character share its end)."""
    encs = self._markup.encode_batch(list(texts), add_special_tokens=False)
    return [(e.ids, [end for _, end in e.offsets]) for e in encs]

  @property
  def special_strings(self) -> tuple[str, ...]:
    """The text of every special added token (what encode_markup parses as markup)."""
    return tuple(t.content for t in self._markup.get_added_tokens_decoder().values()
                 if t.special)

  def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]:
    """Text of each id sequence; special ids and ids past the tokenizer (padded
    embedding rows) are dropped."""
    n = self.vocab_size
    clean = [[int(i) for i in seq if 0 <= int(i) < n and int(i) not in self._special]
             for seq in ids]
    return self._tok.decode_batch(clean, skip_special_tokens=True)

  def id_to_piece(self, ids: Iterable[int]) -> list[str]:
    """The token string of each id (byte-level pieces look like 'Ġthe'); '' if unknown."""
    return [self._tok.id_to_token(int(i)) or "" for i in ids]

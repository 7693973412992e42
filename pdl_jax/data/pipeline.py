"""The data part of a run from its settings: the tokenizer (a pretrained model's,
or the own model's SentencePiece, trained once into the workdir), the encoded train
and validation splits, and packing."""

from __future__ import annotations

import dataclasses
import datetime
import time
from typing import Any, Callable
import jax
from pdl_jax import tokenizers as tok_lib
from pdl_jax import multihost
from pdl_jax import paths
from pdl_jax.models.hf import families as hf_families
from pdl_jax.tokenizers import Tokenizer
from pdl_jax.tokenizers import chat
from pdl_jax.tokenizers import sentencepiece as sp_tokenizer
from pdl_jax.data import sources
from pdl_jax.data import packing
from pdl_jax.data import examples as examples_lib


TOKENIZER_FILENAME = "tokenizer.model"


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """The data part of a run's settings (train.run builds it from the config)."""

  task: str  # config.task
  dataset: Any  # config.dataset: which data (TFDS name or the user's files)
  tokenizer: Any  # config.tokenizer: the own model's SentencePiece
  layout: Any  # config.data: packing and the prompt format
  seq_len: int  # model input length
  max_target_len: int  # target tokens kept
  seed: int  # tokenizer training seed
  pretrained: str | None  # the base model (config.model.pretrained, as recorded)
  pretrained_dir: str | None  # its local folder (offline names resolved), for loading
  init_from: str | None  # a run whose tokenizer this one continues with


def get_tokenizer(data: DataSettings, workdir: str,
                  train_texts: Callable[[], tuple[list[str], list[str]]]) -> Tokenizer:
  """A pretrained model's tokenizer (in the configured prompt format), the configured
  one, init_from's, or one trained once in the workdir."""
  if data.pretrained is not None:
    tokenizer = tok_lib.load(data.pretrained_dir)  # never retrained or resized
    if tokenizer.eos_id < 0:  # -1 would index the embedding's last row
      raise ValueError(
          f"the tokenizer {tokenizer.path} of {data.pretrained!r} has no EOS token "
          "(no eos_token in tokenizer_config.json, no eos_token_id in "
          "generation_config.json or config.json): targets could not end and generation "
          "could not stop; add one to tokenizer_config.json.")
    return with_prompt_format(tokenizer, data.layout.prompt_format,
                              data.layout.get("chat_date"))
  path = data.tokenizer.path
  if path is None and data.init_from is not None:
    path = str(paths.path(data.init_from) / TOKENIZER_FILENAME)
  if path is not None:
    return tok_lib.load(path)
  path = str(paths.path(workdir) / TOKENIZER_FILENAME)
  if jax.process_index() == 0:  # one process trains; the others wait, then load it
    if not paths.path(path).exists():
      multihost.log(f"tokenizer: training a {data.tokenizer.vocab_size}-piece unigram model")
    texts = (t for pair in zip(*train_texts()) for t in pair if t)
    sp_tokenizer.load_or_train(path, texts, data.tokenizer.vocab_size, seed=data.seed,
                               max_sentences=data.tokenizer.train_sentences)
  multihost.sync("tokenizer")
  return tok_lib.load(path)


def with_prompt_format(tokenizer: Tokenizer, prompt_format: str | None,
                       chat_date: str | None = None) -> Tokenizer:
  """The tokenizer that lays out examples in `prompt_format`: "plain" (prompt,
  newline, target, EOS), "chat" (the model's chat template: tokenizers.chat), or None
  for "chat" when the tokenizer has a chat template and "plain" otherwise. chat_date
  (YYYY-MM-DD, config.data.chat_date; None: chat.CHAT_DATE) is what the template's
  strftime_now writes.

  Raises:
    ValueError: an unknown format, or "chat" for a tokenizer without a template.
  """
  if prompt_format not in examples_lib.PROMPT_FORMATS + (None,):
    raise ValueError(f"config.data.prompt_format={prompt_format!r}; expected one of "
                     f"{examples_lib.PROMPT_FORMATS} or None.")
  template = getattr(tokenizer, "chat_template", None)
  if prompt_format == "chat" and template is None:
    raise ValueError(f"config.data.prompt_format='chat' but the tokenizer {tokenizer.path} "
                     "has no chat template; use 'plain'.")
  if prompt_format == "plain" or template is None:
    return tokenizer
  return chat.ChatTokenizer(tokenizer, template, tokenizer.special_tokens,
                            date=parse_chat_date(chat_date))


def parse_chat_date(chat_date: str | None) -> datetime.date:
  """config.data.chat_date as a date (None: chat.CHAT_DATE).

  Raises:
    ValueError: not a YYYY-MM-DD date (named).
  """
  if chat_date is None:
    return chat.CHAT_DATE
  try:  # strptime, not fromisoformat: that takes 20260101 and week dates too
    return datetime.datetime.strptime(str(chat_date), "%Y-%m-%d").date()
  except ValueError:
    raise ValueError(f"config.data.chat_date={chat_date!r}; expected a date as YYYY-MM-DD "
                     "(what a chat template's strftime_now writes), e.g. '2026-01-01'.") from None


def encode_split(data: DataSettings, tokenizer: Tokenizer,
                 texts: tuple[list[str], list[str]]) -> examples_lib.Examples:
  """encode_examples with the settings' lengths."""
  return examples_lib.encode_examples(*texts, tokenizer, seq_len=data.seq_len,
                                      max_target_len=data.max_target_len)


def load_split(data: DataSettings, tokenizer: Tokenizer, split: str,
               limit: int | None = None) -> examples_lib.Examples:
  """A split of the settings' data, encoded (the validation examples of a run)."""
  return encode_split(data, tokenizer,
                      sources.load_split_texts(data.task, data.dataset, split, limit))


def vocab_size(data: DataSettings, tokenizer: Tokenizer) -> int:
  """The run's vocabulary: a pretrained model's embedding rows (often more than its
  tokenizer has tokens), else the tokenizer's size.

  Raises:
    ValueError: a tokenizer with more tokens than the embedding has rows.
  """
  if data.pretrained is None:
    return tokenizer.vocab_size
  rows = hf_families.read_config(data.pretrained_dir).vocab_size
  if tokenizer.vocab_size > rows:
    raise ValueError(f"the tokenizer {tokenizer.path!r} has {tokenizer.vocab_size} tokens, "
                     f"more than the {rows} embedding rows of {data.pretrained!r}.")
  return rows


def prepare_train(data: DataSettings, workdir: str
                  ) -> tuple[Tokenizer, examples_lib.Examples, int]:
  """The run's tokenizer (trained once in the workdir, or the pretrained model's),
  its encoded train split, and the run's vocabulary size."""
  # Every process loads the texts (and passes the dataset barrier) before process 0
  # may train the tokenizer on them.
  texts = sources.load_split_texts(data.task, data.dataset, "train",
                                   data.dataset.max_train_examples)
  tokenizer = get_tokenizer(data, workdir, lambda: texts)
  vocab = vocab_size(data, tokenizer)  # before any long work: a clear error
  train_ex = encode_split(data, tokenizer, texts)
  multihost.log(f"data: {len(train_ex)} train examples ({train_ex.dropped_empty} with empty "
            f"targets dropped, {train_ex.truncated} truncated, "
            f"{train_ex.targets_truncated} of them in the target: no EOS)")
  return tokenizer, train_ex, vocab


def pack_split(data: DataSettings, tokenizer: Tokenizer, examples: examples_lib.Examples
               ) -> examples_lib.Examples:
  """The train split packed (config.data.packing), with what it saved logged."""
  t0 = time.perf_counter()
  packed = packing.pack_examples(examples, pad_id=tokenizer.pad_id, loss_capacity=(
      packing.packed_capacity(data.max_target_len, data.seq_len)))
  multihost.log(f"data: packed {len(examples)} examples into {len(packed)} rows "
            f"({len(examples) / len(packed):.2f} a row) in {time.perf_counter() - t0:.1f} s; "
            f"padding {examples_lib.padding_share(examples):.0%} -> {examples_lib.padding_share(packed):.0%} of the "
            "positions")
  return packed


def check_layout(layout, pretrained: str | None) -> None:
  """The layout settings (config.data) against the base (config.model.pretrained):
  raises ValueError naming the bad key."""
  prompt_format = layout.prompt_format
  parse_chat_date(layout.get("chat_date"))
  if prompt_format not in ("plain", "chat", None):
    raise ValueError(f"config.data.prompt_format={prompt_format!r}; expected 'plain', "
                     "'chat' or None (chat when the model has a chat template).")
  if prompt_format == "chat" and pretrained is None:
    raise ValueError("config.data.prompt_format='chat' needs a pretrained model with a chat "
                     "template (config.model.pretrained); the own model has none.")

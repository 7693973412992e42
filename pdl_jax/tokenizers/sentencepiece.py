"""SentencePiece tokenizer (pdl_jax.tokenizers' interface): load a .model, or train
one offline, with a content hash.

The hash (sha256 of the serialized model proto) identifies the tokenizer in token
stats and checkpoints, so a run can refuse stats counted with another tokenizer.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from pdl_jax import paths

# Ids fixed at training time. pad = 0 so zero-padded batches are padding.
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
# Separates prompt from target in the prefix-LM input; a piece of its own so text
# can never produce it.
SEP_PIECE = "<sep>"


class SentencePieceTokenizer:
  """A loaded SentencePiece model with batch encode/decode and a content hash."""

  def __init__(self, model_proto: bytes, path: str = "<memory>"):
    """Wraps a serialized model proto; use `load` for a file."""
    self.path = path
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(model_proto)
    except (RuntimeError, OSError) as e:
      raise ValueError(f"{path} is not a valid SentencePiece model: {e}") from e
    self.sha256 = hashlib.sha256(model_proto).hexdigest()

  @classmethod
  def load(cls, path: str) -> "SentencePieceTokenizer":
    """Loads a SentencePiece .model file (local or gs://); a clear error if missing
    or invalid."""
    p = paths.path(path)
    if not p.is_file():
      raise FileNotFoundError(
          f"SentencePiece model {path!r} does not exist; give an existing .model "
          "file or let the run train one into its workdir.")
    return cls(p.read_bytes(), str(path))

  @property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """Every id that ends a generation: the one EOS."""
    return (self.eos_id,)

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def sep_id(self) -> int:
    """Id of the prompt/target separator; EOS for models trained elsewhere."""
    sep = self._sp.PieceToId(SEP_PIECE)
    return self.eos_id if sep == self.unk_id else sep

  @property
  def prompt_prefix_ids(self) -> list[int]:
    """No prefix: the own model is trained without BOS."""
    return []

  @property
  def separator_ids(self) -> list[int]:
    """The `<sep>` piece between prompt and target."""
    return [self.sep_id]

  def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
    """Token ids of each text (no BOS/EOS added)."""
    return self._sp.Encode(list(texts), out_type=int, num_threads=num_threads)

  def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]:
    """Text of each id sequence; pad, eos and other control ids are dropped."""
    return self._sp.Decode([[int(i) for i in seq] for seq in ids])

  def id_to_piece(self, ids: Iterable[int]) -> list[str]:
    """The piece of each id, e.g. '▁the'."""
    return [self._sp.IdToPiece(int(i)) for i in ids]


def train(texts: Iterable[str], model_path: str, vocab_size: int, *, seed: int = 0,
          max_sentences: int = 1_000_000, num_threads: int | None = None
          ) -> SentencePieceTokenizer:
  """Trains a unigram SentencePiece model offline and writes it atomically.

  Args:
    texts: training text, one example per item (newlines inside are kept as one
      sentence by replacing them with spaces).
    model_path: where the .model goes; written to a temporary name, then renamed.
    vocab_size: number of pieces, including pad/eos/bos/unk and <sep>.
    seed: seed of SentencePiece's sampling, for a reproducible model.
    max_sentences: cap on the sentences read (the first ones, no shuffling).
    num_threads: trainer threads; default all cores.

  Raises:
    ValueError: vocab_size too small, or no text.
  """
  if vocab_size < 16:
    raise ValueError(f"vocab_size must be >= 16; got {vocab_size}.")
  if hasattr(spm, "set_random_generator_seed"):
    spm.set_random_generator_seed(seed)
  sentences = list(_sentences(texts, max_sentences))
  if not sentences:
    raise ValueError(f"no training text for the tokenizer {model_path!r}.")
  proto = io.BytesIO()
  spm.SentencePieceTrainer.Train(
      sentence_iterator=iter(sentences), model_writer=proto,
      model_type="unigram", vocab_size=vocab_size,
      pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
      user_defined_symbols=[SEP_PIECE],
      input_sentence_size=max_sentences, shuffle_input_sentence=False,
      character_coverage=0.9995, num_threads=num_threads or os.cpu_count() or 1,
      hard_vocab_limit=False, minloglevel=2)
  paths.atomic_write_bytes(model_path, proto.getvalue())
  return SentencePieceTokenizer(proto.getvalue(), model_path)


def load_or_train(model_path: str, texts: Iterable[str] | None, vocab_size: int,
                  **train_kwargs) -> SentencePieceTokenizer:
  """Loads model_path if it exists (train once per workdir, then reuse), else trains."""
  if paths.path(model_path).exists():
    return SentencePieceTokenizer.load(model_path)
  if texts is None:
    raise FileNotFoundError(f"SentencePiece model {model_path!r} does not exist.")
  return train(texts, model_path, vocab_size, **train_kwargs)


def _sentences(texts: Iterable[str], limit: int) -> Iterator[str]:
  n = 0
  for text in texts:
    text = " ".join(text.split())
    if text:
      yield text
      n += 1
      if n >= limit:
        return

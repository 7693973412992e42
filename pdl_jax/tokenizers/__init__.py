"""The tokenizer interface every part of a run uses (data, frequency pass, decoding,
metrics), and `load`, which picks the implementation from the file.

Implementations: SentencePiece (`.model`, pdl_jax.tokenizers.sentencepiece), the one
the project trains for its own model; Hugging Face `tokenizers` (`tokenizer.json`,
pdl_jax.tokenizers.hf), the one of a pretrained model directory.
"""

from __future__ import annotations

from typing import Iterable, Protocol, Sequence, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
  """What the pipeline needs of a tokenizer.

  Ids: `pad_id` pads batches; `eos_id` ends every target; `sep_id` separates the
  prompt from the target in the prefix-LM input; `sha256` identifies the tokenizer
  in token stats and checkpoints (a run refuses stats of another tokenizer).
  """

  path: str
  sha256: str

  @property
  def vocab_size(self) -> int: ...

  @property
  def pad_id(self) -> int: ...

  @property
  def eos_id(self) -> int: ...

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """Every id that ends a generation (eos_id among them; Llama 3 instruct has three)."""

  @property
  def bos_id(self) -> int: ...

  @property
  def unk_id(self) -> int: ...

  @property
  def sep_id(self) -> int: ...

  @property
  def prompt_prefix_ids(self) -> list[int]:
    """Ids every input starts with (a pretrained model's BOS; none for the own)."""

  @property
  def separator_ids(self) -> list[int]:
    """Ids between prompt and target (the own `<sep>`; a pretrained model's: text)."""

  def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
    """Token ids of each text, no BOS/EOS added."""

  def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]:
    """Text of each id sequence, control ids dropped."""

  def id_to_piece(self, ids: Iterable[int]) -> list[str]:
    """The piece of each id."""


def load(path: str) -> Tokenizer:
  """The tokenizer stored at `path`: a SentencePiece `.model`, a Hugging Face
  `tokenizer.json`, or a model directory holding a tokenizer.json: a local (or
  gs://) path; an offline model's name is resolved to its folder by the caller
  (models.hf.locate.local_dir), so tokenizers/ imports nothing of models/.

  Raises:
    ValueError: a file of a kind no implementation reads.
    FileNotFoundError: nothing at `path`.
  """
  from pdl_jax import paths
  from pdl_jax.tokenizers import hf as hf_tokenizer
  from pdl_jax.tokenizers import sentencepiece as sp_tokenizer

  text = str(path)
  if text.endswith(".model"):
    return sp_tokenizer.SentencePieceTokenizer.load(text)
  if text.endswith(".json") or (paths.path(text) / "tokenizer.json").exists():
    return hf_tokenizer.HFTokenizer.load(text)
  raise ValueError(f"tokenizer {text!r}: expected a SentencePiece .model file, a "
                   "tokenizer.json, or a model directory with a tokenizer.json.")

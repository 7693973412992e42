"""The chat prompt format: a task's prompt as the user message, its target as the
assistant message, laid out by the model's own chat template.

The template is rendered with jinja2 as transformers' `apply_chat_template` renders it
(sandboxed environment, trim_blocks and lstrip_blocks, loop controls, the
`raise_exception` and `strftime_now` helpers, the special token strings as
variables), so no torch or transformers is needed. For a template that places the
message contents verbatim (ChatML, Llama 3, Gemma, ...), rendering with a sentinel
content splits every example into constant parts:

    [head: system prompt, "<|im_start|>user\\n"] [prompt] [tail: "<|im_end|>\\n
     <|im_start|>assistant\\n"] [target] [end of turn: "<|im_end|>"]

which is the prefix-LM layout of pdl_jax.data with prefix = head, separator = tail
and EOS = the end-of-turn token: the loss covers the assistant span and the token
that closes it, and decoding from head + prompt + tail is the rendered generation
prompt (`add_generation_prompt=True`). `ChatTokenizer` wraps the model's tokenizer
with those ids, so data, the frequency pass, evaluation and decoding use the chat
layout unchanged.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
from typing import Any, Iterable, Sequence

import jinja2
from jinja2 import sandbox

# Stands for a message's content while rendering: letters only, so trimming or
# escaping leave it as it is, and mixed case, so a template that changes case is seen.
_SENTINEL = "PdlJaxChatContentSentinel"


def _raise(message: str):
  raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
  env.globals["raise_exception"] = _raise
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template)


def render(template: str, messages: Sequence[dict[str, str]], *,
           add_generation_prompt: bool, special_tokens: dict[str, str | None]) -> str:
  """The template rendered for `messages` as transformers' apply_chat_template(...,
  tokenize=False) does; special_tokens: {"bos_token": "<s>", ...}."""
  return _compile(template).render(messages=list(messages),
                                   add_generation_prompt=add_generation_prompt,
                                   **special_tokens)


def split_template(template: str, special_tokens: dict[str, str | None]
                   ) -> tuple[str, str, str]:
  """(head, tail, end): the text before the user content, between it and the
  assistant content (the generation prompt, and whatever a finished conversation
  writes before the assistant's content: Qwen3's empty <think></think> block), and
  after the assistant content, for a single-turn conversation. Special tokens that
  are not set (None) are left undefined, as transformers leaves them.

  Raises:
    ValueError: a template that does not place a message's content verbatim, once,
      or whose generation prompt does not start the assistant message.
  """
  special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
  user = [{"role": "user", "content": _SENTINEL}]
  try:
    prompt = render(template, user, add_generation_prompt=True,
                    special_tokens=special_tokens)
    full = render(template, user + [{"role": "assistant", "content": _SENTINEL}],
                  add_generation_prompt=False, special_tokens=special_tokens)
  except jinja2.exceptions.TemplateError as e:
    raise ValueError(f"the chat template cannot be rendered: {e}") from e
  if prompt.count(_SENTINEL) != 1 or full.count(_SENTINEL) != 2:
    raise ValueError("the chat template does not place the message contents verbatim "
                     "(once each); use data.prompt_format='plain'.")
  head, tail = prompt.split(_SENTINEL)
  if not full.startswith(prompt):
    raise ValueError("the chat template's generation prompt does not start the assistant "
                     f"message it renders ({prompt!r} vs {full!r}); use "
                     "data.prompt_format='plain'.")
  # The assistant content may follow more text than the generation prompt (an empty
  # think block): that text is part of what the model is shown before its answer.
  before, _, end = full[len(prompt):].partition(_SENTINEL)
  return head, tail + before, end


class ChatTokenizer:
  """A tokenizer (pdl_jax.tokenizers.Tokenizer) whose prompt prefix, separator and
  EOS lay examples out in the model's chat format; everything else is the wrapped
  tokenizer's. The message contents are encoded as text (special-token strings in
  the data stay text); the template's parts with the tokenizer's special tokens."""

  def __init__(self, base: Any, template: str, special_tokens: dict[str, str | None]):
    self.base = base
    self.template = template
    head, tail, end = split_template(template, special_tokens)
    self.head_ids, self.tail_ids, end_ids = base.encode_markup([head, tail, end])
    if not end_ids:
      raise ValueError(f"the chat template ends an assistant turn with nothing ({end!r}); "
                       "no end-of-turn token to learn.")
    # The end-of-turn token (ChatML's <|im_end|>, Llama 3's <|eot_id|>, Llama 2's </s>
    # after a space) is what the model emits to stop: the EOS of training and
    # decoding. It is the first special token (or EOS id) after the content; text the
    # template writes around it (a space before, a newline after) is no part of it.
    stops = set(getattr(base, "eos_ids", ())) | set(base.special_ids)
    found = [i for i in end_ids if i in stops]
    if not found:
      raise ValueError(f"the chat template ends an assistant turn with {end!r}, which has "
                       "no special or EOS token to stop on; use data.prompt_format='plain'.")
    self.end_id = found[0]
    self.path = base.path
    self.sha256 = hashlib.sha256(f"{base.sha256}\nchat\n{template}".encode()).hexdigest()

  @property
  def vocab_size(self) -> int:
    return self.base.vocab_size

  @property
  def pad_id(self) -> int:
    return self.base.pad_id

  @property
  def eos_id(self) -> int:
    return self.end_id

  @property
  def eos_ids(self) -> tuple[int, ...]:
    return (self.end_id,) + tuple(i for i in getattr(self.base, "eos_ids", ())
                                  if i != self.end_id)

  @property
  def bos_id(self) -> int:
    return self.base.bos_id

  @property
  def unk_id(self) -> int:
    return self.base.unk_id

  @property
  def sep_id(self) -> int:
    return self.end_id

  @property
  def prompt_prefix_ids(self) -> list[int]:
    """The template's text before the user message (system prompt included)."""
    return list(self.head_ids)

  @property
  def separator_ids(self) -> list[int]:
    """The end of the user turn and the generation prompt of the assistant turn."""
    return list(self.tail_ids)

  def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
    return self.base.encode_batch(texts, num_threads)

  def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]:
    return self.base.decode_batch(ids)

  def id_to_piece(self, ids: Iterable[int]) -> list[str]:
    return self.base.id_to_piece(ids)

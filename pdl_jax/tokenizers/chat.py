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

Three things keep the layout equal to tokenizing the rendered conversation:
- `ChatTokenizer.encode_parts` encodes head + prompt + tail + target + end once and
  splits the ids at the parts' character offsets (a token belongs to the part its
  text ends in), as HFTokenizer.encode_parts does for the plain format: encoding the
  parts alone gives a SentencePiece / Metaspace tokenizer a '▁' at each part's start.
- Templates that `| trim` the content (Llama 3.x, Gemma) are detected (content with
  whitespace around it renders as the bare content) and the data trimmed the same
  way; a template that changes the content's whitespace otherwise is refused. One
  that drops an assistant content's leading newlines (Qwen3's `lstrip('\\n')`, which
  the trim probe does not see) is detected too, and the targets lose them the same way.
- `strftime_now` (Llama 3.2 writes today's date into its system prompt) returns a
  date pinned by the ChatTokenizer (`date`: config.data.chat_date, default
  CHAT_DATE), never today's: a resumed run and both evaluations see the same prompt.
  For a template that dates or trims, the date and the rendered head and tail ids are
  in the tokenizer's checksum (one that does neither keeps its earlier checksum).
"""

from __future__ import annotations

import datetime
import re
import functools
import hashlib
from typing import Any, Iterable, Sequence

import jinja2
from jinja2 import sandbox

# Stands for a message's content while rendering: letters only, so trimming or
# escaping leave it as it is, and mixed case, so a template that changes case is seen.
_SENTINEL = "PdlJaxChatContentSentinel"
# The sentinel with whitespace around it: a template that trims renders it bare.
_PADDED = " \n" + _SENTINEL + "\n "
# The date strftime_now gives while a ChatTokenizer renders (transformers gives today's).
CHAT_DATE = datetime.date(2026, 1, 1)
# Contents whose first characters merge differently with the head's last tokens:
# letters of each case, a space, newlines, digits, punctuation, markup-like text.
_PROBES = ("x", "line", "What", "a b", " x", "  x", "\nx", "\n\nx", "\n", "0", "1.", ".",
           "?", "-", "<", "[", "(", '"', "'", "\t", "é", "ΩΩ", "\u2581x")


def _raise(message: str):
  raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile(template: str, date: datetime.date | None) -> jinja2.Template:
  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
  env.globals["raise_exception"] = _raise
  if date is None:
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  else:
    pinned = datetime.datetime(date.year, date.month, date.day)
    env.globals["strftime_now"] = pinned.strftime
  return env.from_string(template)


def render(template: str, messages: Sequence[dict[str, str]], *,
           add_generation_prompt: bool, special_tokens: dict[str, str | None],
           date: datetime.date | None = None) -> str:
  """The template rendered for `messages` as transformers' apply_chat_template(...,
  tokenize=False) does; special_tokens: {"bos_token": "<s>", ...}; `date`: what
  strftime_now formats (None: now, as transformers)."""
  return _compile(template, date).render(messages=list(messages),
                                         add_generation_prompt=add_generation_prompt,
                                         **special_tokens)


def _exchange(template: str, user: str, answer: str,
              special_tokens: dict[str, str | None], date: datetime.date | None) -> str:
  """A finished single-turn conversation rendered (unset special tokens left out)."""
  special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
  return render(template, [{"role": "user", "content": user},
                           {"role": "assistant", "content": answer}],
                add_generation_prompt=False, special_tokens=special_tokens, date=date)


def trims_content(template: str, special_tokens: dict[str, str | None],
                  date: datetime.date | None = None) -> bool:
  """Whether the template trims the message contents (`| trim`: Llama 3.x, Gemma);
  False when it places them verbatim.

  Raises:
    ValueError: the template changes the whitespace around a content otherwise.
  """
  conversation = lambda c: _exchange(template, c, c, special_tokens, date)
  bare, padded = conversation(_SENTINEL), conversation(_PADDED)
  if padded == bare.replace(_SENTINEL, _PADDED):
    return False
  if padded == bare:
    return True
  raise ValueError("the chat template changes the whitespace around a message's content "
                   "other than by trimming it; use data.prompt_format='plain'.")


def strips_answer_newlines(template: str, special_tokens: dict[str, str | None],
                           date: datetime.date | None = None) -> bool:
  """Whether the template drops the newlines that start an assistant content
  (Qwen3's `content.split('</think>')[-1].lstrip('\\n')`), which the trim probe does
  not see (its padded content starts with a space)."""
  return (_exchange(template, _SENTINEL, "\n\n" + _SENTINEL, special_tokens, date)
          == _exchange(template, _SENTINEL, _SENTINEL, special_tokens, date))


def split_template(template: str, special_tokens: dict[str, str | None],
                   date: datetime.date | None = None) -> tuple[str, str, str]:
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
                    special_tokens=special_tokens, date=date)
    full = render(template, user + [{"role": "assistant", "content": _SENTINEL}],
                  add_generation_prompt=False, special_tokens=special_tokens, date=date)
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

  def __init__(self, base: Any, template: str, special_tokens: dict[str, str | None],
               date: datetime.date = CHAT_DATE):
    self.base = base
    self.template = template
    self.date = date
    head, tail, end = split_template(template, special_tokens, date)
    self.trim = trims_content(template, special_tokens, date)
    # Targets lose their leading newlines as the template writes them (Qwen3).
    self.strip_answer_newlines = (not self.trim and
                                  strips_answer_newlines(template, special_tokens, date))
    self._parts = (head, tail, end)
    self.head_ids, self.tail_ids, end_ids = base.encode_markup([head, tail, end])
    # The constant prefix of every example: the head's tokens that end inside it when a
    # content follows (Metaspace tokenizers merge a head's trailing space into the
    # content's first word: Mistral's "[INST] " + "The" is '▁[INST]', '▁The').
    # Which head tokens merge depends on the content's first characters (a Metaspace
    # "user\n" + "line" is '▁user', '\nline' but + "x" '▁user', '\n', '▁x'): the
    # prefix is what the head tokenizes to before every probe of _PROBES.
    self.prefix_ids = list(self.head_ids)
    if hasattr(base, "encode_markup_offsets"):
      probes = base.encode_markup_offsets([head + c + tail for c in _PROBES])
      for probe_ids, probe_ends in probes:
        stable = [i for i, e in zip(probe_ids, probe_ends) if e <= len(head)]
        n = next((k for k, (a, b) in enumerate(zip(self.prefix_ids, stable)) if a != b),
                 min(len(self.prefix_ids), len(stable)))
        self.prefix_ids = self.prefix_ids[:n]
    # The head's tokens past the prefix start every prompt's ids (merged or not with
    # its first characters): a prompt cut for length keeps them (examples._layout).
    self.prompt_head_len = len(self.head_ids) - len(self.prefix_ids)
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
    # The template, the date it was rendered with and what it rendered to: a change of
    # any is another tokenizer (a run resumed with it is refused).
    # (A template that neither dates nor trims keeps the checksum it always had.)
    extra = ""
    if "strftime_now" in template or self.trim:
      extra = (f"\n{date.isoformat() if 'strftime_now' in template else ''}\n"
               f"{self.prefix_ids}\n{self.tail_ids}\ntrim={self.trim}")
    if self.strip_answer_newlines:
      extra += "\nstrip_answer_newlines"
    self.sha256 = hashlib.sha256(
        f"{base.sha256}\nchat\n{template}{extra}".encode()).hexdigest()

  def content(self, text: str) -> str:
    """A message's content as the template places it (trimmed when it trims)."""
    return text.strip() if self.trim else text

  def answer(self, text: str) -> str:
    """An assistant content as the template places it (trimmed when it trims; without
    its leading newlines where it strips them)."""
    text = self.content(text)
    return text.lstrip("\n") if self.strip_answer_newlines else text

  def encode_parts(self, prompts: Sequence[str], targets: Sequence[str]
                   ) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """(prompt ids, separator ids, target ids) of each example, as the rendered
    conversation head + prompt + tail + target + end tokenizes (one encode, split at
    the parts' character offsets: a token belongs to the part its text ends in; a
    token that crosses the head's end is the prompt's). An example whose content
    holds a special-token string (kept as text, never markup), or whose encoding does
    not start with the constant prefix, is encoded part by part."""
    head, tail, end = self._parts
    prompts = [self.content(p) for p in prompts]
    targets = [self.answer(t) for t in targets]
    specials = tuple(getattr(self.base, "special_strings", ()))
    # One compiled alternation: Gemma's vocabulary has 6,249 special strings, which
    # a loop of `in` tests per example made a minute per 50k examples.
    special_re = (re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))))
                  if specials else None)
    out: tuple[list, list, list] = ([], [], [])
    whole = self.base.encode_markup_offsets(
        [head + p + tail + t + end for p, t in zip(prompts, targets)])
    for p, t, (ids, ends) in zip(prompts, targets, whole):
      parts = None
      if special_re is None or not (special_re.search(p) or special_re.search(t)):
        parts = _split_at(ids, ends, self.prefix_ids, (len(head), len(head) + len(p),
                                                      len(head) + len(p) + len(tail),
                                                      len(head) + len(p) + len(tail) + len(t)))
      if parts is None:
        rest = list(self.head_ids[len(self.prefix_ids):])
        parts = (rest + self.base.encode_batch([p])[0], list(self.tail_ids),
                 self.base.encode_batch([t])[0])
      for acc, part in zip(out, parts):
        acc.append(part)
    return out

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
    """The template's text before the user message (system prompt included), but a
    last token that merges with the user's text (then the prompt's)."""
    return list(self.prefix_ids)

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


def _split_at(ids: list[int], ends: list[int], prefix_ids: list[int],
              bounds: tuple[int, int, int, int]
              ) -> tuple[list[int], list[int], list[int]] | None:
  """The prompt, tail and target ids of one conversation's ids (end offsets `ends`)
  at the character bounds of head | prompt | tail | target | end, after the constant
  prefix (head tokens past it are the prompt's); None when it does not start so."""
  if ids[:len(prefix_ids)] != list(prefix_ids) or (
      prefix_ids and ends[len(prefix_ids) - 1] > bounds[0]):
    return None
  parts: tuple[list[int], list[int], list[int]] = ([], [], [])
  for i, e in zip(ids[len(prefix_ids):], ends[len(prefix_ids):]):
    k = max(1, sum(e > b for b in bounds))  # 1 prompt (or head), 2 tail, 3 target, 4 end
    if k <= 3:
      parts[k - 1].append(i)
  return parts

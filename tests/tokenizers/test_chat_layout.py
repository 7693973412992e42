"""The chat layout equals tokenizing the rendered conversation (pdl_jax.tokenizers.chat):
one encode split at character offsets (a Metaspace tokenizer, where encoding the
parts alone differs), templates that trim the content, and strftime_now pinned.

The reference is rendering the whole conversation (jinja2, as apply_chat_template)
and tokenizing it in one piece with the `tokenizers` library.
"""

import datetime

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from configs import common
from pdl_jax.data import examples as examples_lib
from pdl_jax.tokenizers import chat
from pdl_jax.tokenizers.hf import HFTokenizer

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}
# ChatML-like, verbatim content.
VERBATIM = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Llama 3.x-like: content trimmed, today's date in the head.
TRIM_DATE = ("{{ bos_token }}<|im_start|>system\nToday Date: {{ strftime_now('%d %b %Y') }}"
             "<|im_end|>\n{% for m in messages %}<|im_start|>{{ m['role'] }}\n\n"
             "{{ m['content'] | trim }}<|im_end|>{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}")
# Qwen3-like: an assistant content loses its leading newlines (and a think block).
ANSWER_LSTRIP = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                 "{% if m['role'] == 'assistant' %}"
                 "{{ m['content'].split('</think>')[-1].lstrip('\\n') }}"
                 "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPTS = ["the quick brown fox", "  leading and trailing spaces  ", "line\nbreaks\n",
           "ends with a newline\n"]
TARGETS = ["jumps over", "answer\n", " leading space", "two\n\nparagraphs "]


def _metaspace_tokenizer() -> HFTokenizer:
  """A SentencePiece-style BPE (Metaspace: '▁' before each word, and before a text
  encoded alone) trained on a few sentences, with ChatML's markers as specials."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
  tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
  specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
  text = [" ".join(PROMPTS + TARGETS), "the user and the assistant answer in two lines",
          "system today date jan"] * 20
  tok.train_from_iterator(text, trainers.BpeTrainer(
      vocab_size=200, special_tokens=specials, show_progress=False,
      initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789 \n:")))
  config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": False}
  return HFTokenizer(tok.to_str().encode(), special_sources=[config])


def _conversation_ids(base, template, prompt, target, date):
  text = chat.render(template, [{"role": "user", "content": prompt},
                                {"role": "assistant", "content": target}],
                     add_generation_prompt=False, special_tokens=SPECIALS, date=date)
  return base.encode_markup([text])[0]


@pytest.mark.parametrize("template", [VERBATIM, TRIM_DATE])
def test_layout_equals_the_tokenized_conversation(template):
  base = _metaspace_tokenizer()
  tok = chat.ChatTokenizer(base, template, SPECIALS)
  ex = examples_lib.encode_examples(PROMPTS, TARGETS, tok, seq_len=96, max_target_len=40)
  assert int(ex.truncated) == 0
  for i, (p, t) in enumerate(zip(PROMPTS, TARGETS)):
    want = _conversation_ids(base, template, p, t, chat.CHAT_DATE)
    n = int(ex.lengths[i])
    assert ex.seqs[i, :n].tolist() == want[:n], (p, t)
    assert want[n - 1] == tok.eos_id  # the end-of-turn token closes the example
    # Decoding starts from the rendered generation prompt.
    gen = chat.render(template, [{"role": "user", "content": p}], add_generation_prompt=True,
                      special_tokens=SPECIALS, date=chat.CHAT_DATE)
    assert ex.seqs[i, :ex.target_start[i]].tolist() == base.encode_markup([gen])[0]


def test_answer_newlines_a_template_strips_are_stripped_from_the_targets():
  """A template that drops an assistant content's leading newlines (Qwen3's
  lstrip('\\n'), unseen by the trim probe): targets that start with newlines are laid
  out as the conversation renders them; the checksum says so."""
  assert chat.strips_answer_newlines(ANSWER_LSTRIP, SPECIALS)
  assert not chat.strips_answer_newlines(VERBATIM, SPECIALS)
  assert not chat.trims_content(ANSWER_LSTRIP, SPECIALS)
  base = _metaspace_tokenizer()
  tok = chat.ChatTokenizer(base, ANSWER_LSTRIP, SPECIALS)
  targets = ["\njumps over", "\n\ntwo lines\n", " leading space", "answer"]
  ex = examples_lib.encode_examples(PROMPTS, targets, tok, seq_len=96, max_target_len=40)
  for i, (p, t) in enumerate(zip(PROMPTS, targets)):
    want = _conversation_ids(base, ANSWER_LSTRIP, p, t, chat.CHAT_DATE)
    n = int(ex.lengths[i])
    assert ex.seqs[i, :n].tolist() == want[:n], (p, t)
    assert want[n - 1] == tok.eos_id
  verbatim = chat.ChatTokenizer(base, ANSWER_LSTRIP.replace(".lstrip('\\n')", ""), SPECIALS)
  assert verbatim.sha256 != tok.sha256


def test_parts_encoded_alone_would_differ():
  """The defect the one encode fixes: with Metaspace each part alone starts with '▁'."""
  base = _metaspace_tokenizer()
  tok = chat.ChatTokenizer(base, VERBATIM, SPECIALS)
  alone = base.encode_batch([PROMPTS[0]])[0]
  p_ids, _, _ = tok.encode_parts(PROMPTS[:1], TARGETS[:1])
  assert p_ids[0] != alone


def test_trimming_template_is_detected_and_the_data_trimmed():
  base = _metaspace_tokenizer()
  assert chat.trims_content(TRIM_DATE, SPECIALS) and not chat.trims_content(VERBATIM, SPECIALS)
  tok = chat.ChatTokenizer(base, TRIM_DATE, SPECIALS)
  _, _, t_ids = tok.encode_parts(["q"], ["answer\n"])
  # The target is learned without the newline the template trims away.
  assert base.decode_batch(t_ids)[0] == "answer"
  with pytest.raises(ValueError, match="whitespace around a message's content"):
    chat.trims_content(VERBATIM.replace("m['content']", "m['content'].rstrip()"), SPECIALS)


def test_strftime_now_is_pinned_and_in_the_checksum(monkeypatch):
  base = _metaspace_tokenizer()
  a = chat.ChatTokenizer(base, TRIM_DATE, SPECIALS)
  head = chat.split_template(TRIM_DATE, SPECIALS, chat.CHAT_DATE)[0]
  assert chat.CHAT_DATE.strftime("%d %b %Y") in head
  b = chat.ChatTokenizer(base, TRIM_DATE, SPECIALS, date=datetime.date(2027, 3, 4))
  assert a.head_ids != b.head_ids and a.sha256 != b.sha256
  # The run's config.data.chat_date is the date: recorded in its config.json.
  base.chat_template, base.special_tokens = TRIM_DATE, SPECIALS
  from pdl_jax.data import pipeline
  assert common.get_base_config("dialogue").data.chat_date == chat.CHAT_DATE.isoformat()
  for given, want in ((None, a), ("2026-01-01", a), ("2027-03-04", b)):
    got = pipeline.with_prompt_format(base, "chat", given)
    assert (got.date, got.head_ids, got.sha256) == (want.date, want.head_ids, want.sha256)

  class Tomorrow(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
      return datetime.datetime(2031, 5, 6)

  monkeypatch.setattr(chat.datetime, "datetime", Tomorrow)  # another day: same layout
  chat._compile.cache_clear()
  c = chat.ChatTokenizer(base, TRIM_DATE, SPECIALS)
  assert (c.head_ids, c.sha256) == (a.head_ids, a.sha256)
  # Without a pinned date the renderer says today, as transformers does.
  assert "06 May 2031" in chat.render(TRIM_DATE, [], add_generation_prompt=False,
                                      special_tokens=SPECIALS)
  chat._compile.cache_clear()


def test_special_token_strings_in_the_data_stay_text():
  base = _metaspace_tokenizer()
  tok = chat.ChatTokenizer(base, VERBATIM, SPECIALS)
  _, _, t_ids = tok.encode_parts(["q"], ["say <|im_end|> please"])
  assert tok.eos_id not in t_ids[0]
  assert t_ids[0] == base.encode_batch(["say <|im_end|> please"])[0]  # as text

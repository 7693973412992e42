"""The chat layout of real templates (SmolLM2, Llama 3.2, Mistral v0.1, Gemma 3, Qwen2.5)
equals transformers' `apply_chat_template` tokenizing the whole conversation.

The reference is tests/fixtures/chat/conversations.json, made by
tools/make_chat_fixtures.py in a side venv with transformers: each template with a
ByteLevel and a Metaspace tokenizer (tiny vocabularies: the layout is what is
tested), prompts and targets with leading and trailing spaces and newlines. The
project's ids of an example (head + prompt + tail + target + end of turn) must be
the conversation's ids up to and including the end-of-turn token, and its decode
prompt the rendered generation prompt's ids.
"""

import json
import os

import pytest

from pdl_jax.data import examples as examples_lib
from pdl_jax.tokenizers import chat
from pdl_jax.tokenizers.hf import HFTokenizer

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "chat")
with open(os.path.join(FIXTURES, "conversations.json"), encoding="utf-8") as _f:
  DATA = json.load(_f)
TEMPLATES = sorted(DATA["templates"])


def _tokenizers(template_name: str, tokenizer_name: str):
  entry = DATA["templates"][template_name]
  specials = entry["special_tokens"]
  with open(os.path.join(FIXTURES, f"{tokenizer_name}.json"), "rb") as f:
    base = HFTokenizer(f.read(), special_sources=[{**specials, "add_bos_token": False}])
  return base, chat.ChatTokenizer(base, entry["template"], specials)


def test_fixture_covers_every_template_and_whitespace():
  assert set(TEMPLATES) == {"smollm2", "llama3.2", "mistral-v0.1", "gemma3", "qwen2.5"}
  assert DATA["date_string"] == chat.CHAT_DATE.strftime("%d %b %Y")
  texts = [c["prompt"] for c in DATA["cases"]] + [c["target"] for c in DATA["cases"]]
  for edge in (str.startswith, str.endswith):
    assert any(edge(t, " ") for t in texts) and any(edge(t, "\n") for t in texts)


@pytest.mark.parametrize("tokenizer_name", ["bytelevel", "metaspace"])
@pytest.mark.parametrize("template_name", TEMPLATES)
def test_layout_equals_apply_chat_template(template_name, tokenizer_name):
  base, tok = _tokenizers(template_name, tokenizer_name)
  cases = [c for c in DATA["cases"]
           if c["template"] == template_name and c["tokenizer"] == tokenizer_name]
  assert len(cases) == 5
  ex = examples_lib.encode_examples([c["prompt"] for c in cases], [c["target"] for c in cases],
                                    tok, seq_len=160, max_target_len=60)
  assert int(ex.truncated) == 0 and ex.dropped_empty == 0
  crossing = []
  for i, c in enumerate(cases):
    n, want = int(ex.lengths[i]), c["ids"]
    got = ex.seqs[i, :n].tolist()
    assert got == want[:n], (c["prompt"], c["target"], base.id_to_piece(got),
                             base.id_to_piece(want))
    assert want[n - 1] == tok.eos_id  # the end-of-turn token closes the example
    # Whatever the template writes after the end-of-turn token is no token to learn.
    assert base.decode_batch([want[n:]])[0].strip() == ""
    # Decoding starts from the rendered generation prompt, unless the generation
    # prompt's last token merges with the answer's first characters in the whole
    # conversation (Metaspace: "assistant\n" + "\n\ntwo" -> '\n\n\ntwo'): that token is
    # the target's, as training sees it.
    gen = c["generation_ids"]
    if want[:len(gen)] == gen:
      assert ex.seqs[i, :ex.target_start[i]].tolist() == gen, c["prompt"]
      crossing.append(False)
    else:
      assert ex.target_start[i] < len(gen) and want[:ex.target_start[i]] == gen[:-1]
      crossing.append(True)
    # The target's loss tokens decode to the target as the template places it.
    target = base.decode_batch([ex.seqs[i, ex.target_start[i]:n - 1].tolist()])[0]
    assert target.strip() == c["target"].strip()
  assert crossing.count(False) >= 4  # the generation prompt is checked on most cases


def test_a_cut_prompt_keeps_the_head():
  """A prompt cut for length keeps the head's tokens past the constant prefix (the
  newline after "user", which some contents merge with) and the end of the text."""
  base, tok = _tokenizers("smollm2", "metaspace")
  assert tok.prompt_head_len >= 1 and tok.prefix_ids == tok.head_ids[:len(tok.prefix_ids)]
  prompt = " ".join(["word"] * 150) + " the end"
  ex = examples_lib.encode_examples([prompt], ["Paris."], tok, seq_len=48, max_target_len=8)
  assert int(ex.truncated) == 1
  assert ex.seqs[0, :len(tok.head_ids)].tolist() == tok.head_ids
  gen = ex.seqs[0, :ex.target_start[0]].tolist()
  assert gen[-len(tok.tail_ids):] == tok.tail_ids
  assert base.decode_batch([gen[len(tok.head_ids):-len(tok.tail_ids)]])[0].endswith("the end")

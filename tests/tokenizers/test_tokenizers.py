"""pdl_jax.tokenizers: the Hugging Face tokenizer's BOS and special-token handling, the
chat format (tokenizers.chat) and the layout it gives pdl_jax.data, and the export of
what transformers needs of a chat model."""

import json
import os
import shutil

import pytest
import tokenizers

from pdl_jax.data import examples as examples_lib
from pdl_jax.data import pipeline
from pdl_jax.models.hf import export as hf_export
from pdl_jax.tokenizers import chat
from pdl_jax.tokenizers.hf import HFTokenizer

# The tests/ folder (this file is 1 level below it): shared fixtures live there.
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIXTURE = os.path.join(TESTS, "fixtures", "hf", "llama")

# SmolLM2-135M-Instruct's chat template (ChatML with a default system prompt), as its
# GGUF carries it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
# What transformers 5.24's apply_chat_template(..., add_generation_prompt=True,
# tokenize=False) gives for one user message "Hello" (tools/check_gguf.py, real GGUF).
SMOLLM2_RENDERED = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
# A ChatML-like template over the fixture tokenizer's specials <s> and </s>.
FIXTURE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] | trim }}"
    "</s>\n{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def chat_fixture(tmp_path, template=FIXTURE_TEMPLATE, as_file=True):
  """The llama fixture's tokenizer folder with a chat template (as transformers v5
  saves it: chat_template.jinja, or in tokenizer_config.json)."""
  folder = tmp_path / "chat_model"
  shutil.copytree(FIXTURE, folder)
  if as_file:
    (folder / "chat_template.jinja").write_text(template)
  else:
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
  return folder


def test_render_matches_transformers_for_smollm2():
  specials = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
  got = chat.render(SMOLLM2_TEMPLATE, [{"role": "user", "content": "Hello"}],
                    add_generation_prompt=True, special_tokens=specials)
  assert got == SMOLLM2_RENDERED
  head, tail, end = chat.split_template(SMOLLM2_TEMPLATE, specials)
  assert head + "Hello" + tail == SMOLLM2_RENDERED
  assert tail == "<|im_end|>\n<|im_start|>assistant\n" and end == "<|im_end|>\n"


@pytest.mark.parametrize("as_file", [True, False])
def test_chat_layout_equals_the_rendered_conversation(tmp_path, as_file):
  base = HFTokenizer.load(chat_fixture(tmp_path, as_file=as_file))
  assert base.chat_template == FIXTURE_TEMPLATE
  tok = pipeline.with_prompt_format(base, None)  # None: chat, the model has a template
  assert isinstance(tok, chat.ChatTokenizer)
  prompts, targets = ["the quick brown fox", "she sells shells"], ["jumps over", "by the sea"]
  ex = examples_lib.encode_examples(prompts, targets, tok, seq_len=48, max_target_len=16)
  end_id = base.encode_markup(["</s>"])[0][0]
  assert tok.eos_id == end_id
  for i, (p, t) in enumerate(zip(prompts, targets)):
    conversation = chat.render(FIXTURE_TEMPLATE, [
        {"role": "user", "content": p}, {"role": "assistant", "content": t}],
        add_generation_prompt=False, special_tokens=base.special_tokens)
    want = base.encode_markup([conversation])[0]
    n = int(ex.lengths[i])
    # The example is the conversation's tokens up to the end-of-turn token (the
    # newline the template writes after it is no part of the turn).
    assert ex.seqs[i, :n].tolist() == want[:n] and want[n - 1] == end_id
    # The loss covers exactly the assistant content and its end-of-turn token.
    loss_ids = ex.seqs[i][ex.loss_positions()[i]].tolist()
    assert loss_ids == base.encode_batch([t])[0] + [end_id]
    # The prompt the model decodes from is the rendered generation prompt.
    gen_prompt = chat.render(FIXTURE_TEMPLATE, [{"role": "user", "content": p}],
                             add_generation_prompt=True, special_tokens=base.special_tokens)
    assert ex.seqs[i, :ex.target_start[i]].tolist() == base.encode_markup([gen_prompt])[0]
  # Decoded text never contains the chat markers.
  assert tok.decode_batch([ex.seqs[0, :ex.lengths[0]].tolist()])[0].count("<s>") == 0


def test_prompt_format_choice_and_errors(tmp_path):
  plain = HFTokenizer.load(FIXTURE)
  assert plain.chat_template is None
  assert pipeline.with_prompt_format(plain, None) is plain
  with pytest.raises(ValueError, match="'chat' but the tokenizer .* has no chat template"):
    pipeline.with_prompt_format(plain, "chat")
  with pytest.raises(ValueError, match=r"prompt_format='markdown'.*expected one of"):
    pipeline.with_prompt_format(plain, "markdown")
  with_template = HFTokenizer.load(chat_fixture(tmp_path))
  assert pipeline.with_prompt_format(with_template, "plain") is with_template
  assert isinstance(pipeline.with_prompt_format(with_template, "chat"), chat.ChatTokenizer)
  # The chat format changes what is counted and trained: another identity.
  assert pipeline.with_prompt_format(with_template, "chat").sha256 != with_template.sha256


def test_template_that_rewrites_the_content_is_refused():
  template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
  with pytest.raises(ValueError, match="does not place the message contents verbatim"):
    chat.split_template(template, {})
  with pytest.raises(ValueError, match="cannot be rendered: no system"):
    chat.split_template("{{ raise_exception('no system') }}", {})


def test_special_token_strings_in_data_are_text():
  tok = HFTokenizer.load(FIXTURE)
  ids = tok.encode_batch(["end </s> here"])[0]
  assert tok.eos_id not in ids  # the text "</s>" is not the EOS
  assert tok.decode_batch([ids])[0] == "end </s> here"
  assert tok.eos_id in tok.encode_markup(["end </s> here"])[0]  # markup: it is


def _with_post_processor(tmp_path, add_bos_token=None):
  folder = tmp_path / "bos_model"
  shutil.copytree(FIXTURE, folder)
  tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
  tok.save(str(folder / "tokenizer.json"))
  if add_bos_token is not None:
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = add_bos_token
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
  return folder


def test_bos_only_where_the_tokenizer_adds_one(tmp_path):
  # The fixture names a bos_token but its tokenizer.json adds none.
  plain = HFTokenizer.load(FIXTURE)
  assert plain.bos_id >= 0 and plain.prompt_prefix_ids == []
  # A post-processor that adds BOS (Llama 3's <|begin_of_text|>).
  adds = HFTokenizer.load(_with_post_processor(tmp_path))
  assert adds.prompt_prefix_ids == [adds.bos_id]
  ex = examples_lib.encode_examples(["a b"], ["c"], adds, seq_len=16, max_target_len=4)
  assert ex.seqs[0, 0] == adds.bos_id
  # tokenizer_config's add_bos_token decides when it is given.
  shutil.rmtree(tmp_path / "bos_model")
  assert HFTokenizer.load(_with_post_processor(tmp_path, False)).prompt_prefix_ids == []


def test_export_keeps_the_chat_template_and_every_eos(tmp_path):
  src = chat_fixture(tmp_path)  # template only as chat_template.jinja
  gen = json.loads((src / "generation_config.json").read_text())
  gen["eos_token_id"] = [2, 3]
  (src / "generation_config.json").write_text(json.dumps(gen))
  out = tmp_path / "out"
  out.mkdir()
  hf_export.copy_tokenizer_files(str(src), out)
  assert (out / "chat_template.jinja").read_text() == FIXTURE_TEMPLATE
  assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == \
      FIXTURE_TEMPLATE
  eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
  end_id = HFTokenizer.load(src).encode_markup(["</s>"])[0][0]
  assert eos == [2, 3] and end_id in eos
  # The export reads back with the same template and layout.
  back = pipeline.with_prompt_format(HFTokenizer.load(out), None)
  orig = pipeline.with_prompt_format(HFTokenizer.load(src), None)
  assert (back.prompt_prefix_ids, back.separator_ids, back.eos_id) == (
      orig.prompt_prefix_ids, orig.separator_ids, orig.eos_id)


def _metaspace_folder(tmp_path, newline_merges: bool):
  """A Metaspace BPE tokenizer (the Llama 2 / Mistral kind: every text encoded alone
  starts with '▁'), trained here on a few texts, in a model folder."""
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
  tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
  texts = ["The quick brown fox jumps over the lazy dog.", "She sells sea shells by the sea."]
  if newline_merges:
    texts = [t + "\nThe end." for t in texts]
  tok.train_from_iterator(texts * 20, trainers.BpeTrainer(
      vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=["\n"]))
  folder = tmp_path / ("meta_merge" if newline_merges else "meta")
  folder.mkdir()
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
  return folder


@pytest.mark.parametrize("newline_merges", [False, True])
def test_plain_layout_equals_the_joined_text_for_metaspace_tokenizers(tmp_path,
                                                                      newline_merges):
  tok = HFTokenizer.load(_metaspace_folder(tmp_path, newline_merges))
  raw = tokenizers.Tokenizer.from_file(str(tmp_path / ("meta_merge" if newline_merges
                                                       else "meta") / "tokenizer.json"))
  prompts, targets = ["the lazy fox", "she sells"], ["The quick dog", "sea shells"]
  ex = examples_lib.encode_examples(prompts, targets, tok, seq_len=40, max_target_len=16)
  for i, (p, t) in enumerate(zip(prompts, targets)):
    joined = raw.encode(p + "\n" + t, add_special_tokens=False).ids
    n = int(ex.lengths[i])
    assert ex.seqs[i, :n].tolist() == joined + [tok.eos_id]  # the text the model sees
    # Encoded alone, the separator and the target would each start with '▁'.
    alone = tok.encode_batch([p])[0] + tok.separator_ids + tok.encode_batch([t])[0]
    assert alone != joined
    # The loss covers the target's tokens (a token merging the newline into the
    # target's first word included) and EOS.
    loss_text = tok.decode_batch([ex.seqs[i][ex.loss_positions()[i]].tolist()])[0]
    assert loss_text.strip() == t


QWEN3_LIKE = (  # writes an empty think block before a finished assistant turn
    "{% for m in messages %}<s>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
    "<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
LLAMA2_LIKE = (  # the answer after a space, then ' </s>'; add_generation_prompt unused
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
    "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}"
    "{% endfor %}")


@pytest.mark.parametrize("template,tail_end", [(QWEN3_LIKE, "<think>\n\n</think>\n\n"),
                                               (LLAMA2_LIKE, " [/INST] ")])
def test_end_of_turn_is_the_special_token_after_the_content(tmp_path, template, tail_end):
  base = HFTokenizer.load(chat_fixture(tmp_path, template))
  head, tail, end = chat.split_template(template, base.special_tokens)
  assert tail.endswith(tail_end) and "PdlJax" not in end  # the text before the answer
  tok = pipeline.with_prompt_format(base, None)
  end_id = base.encode_markup(["</s>"])[0][0]
  assert tok.eos_id == end_id  # not a text piece of "ChatContent...", not the space
  ex = examples_lib.encode_examples(["the fox"], ["jumps over"], tok, seq_len=48,
                                max_target_len=16)
  loss_ids = ex.seqs[0][ex.loss_positions()[0]].tolist()
  assert loss_ids == base.encode_batch(["jumps over"])[0] + [end_id]


def test_special_tokens_that_are_not_set_render_as_nothing():
  """transformers leaves an unset token undefined (empty), never the text 'None'."""
  head, _, _ = chat.split_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
                                   "{% endfor %}", {"bos_token": None})
  assert head == ""

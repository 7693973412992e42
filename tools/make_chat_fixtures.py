"""Writes tests/fixtures/chat/: real chat templates rendered and tokenized by transformers
(`apply_chat_template`), the reference of tests/tokenizers/test_chat_templates.py.

Five templates (SmolLM2, Llama 3.2, Mistral v0.1, Gemma 3, Qwen2.5), each with two tiny
tokenizers: the ByteLevel BPE of tests/fixtures/hf/llama and a Metaspace
(SentencePiece-style) BPE trained here, both with the templates' markers added as
special tokens (the vocabulary is not the model's: the point is the layout). For
every template x tokenizer x (prompt, target) the fixture holds the ids of the whole
rendered conversation and of the rendered generation prompt, tokenized as
apply_chat_template(tokenize=True) does.

No network: SmolLM2's template is read from the converted SmolLM2 in the pdl_jax
cache (~/.cache/pdl_jax/models/smollm2-135m-instruct/hf/chat_template.jinja, which
its GGUF carries); the others are their published Jinja text (the `chat_template`
of the tokenizer_config.json of meta-llama/Llama-3.2-1B-Instruct,
mistralai/Mistral-7B-Instruct-v0.1, google/gemma-3-1b-it, Qwen/Qwen2.5-0.5B-Instruct
on the Hub), written out in TEMPLATES; the branches for tool calls of Llama 3.2
and Qwen2.5 are left out (they render nothing without tools). Llama 3.2 writes the
date: it is pinned by passing date_string = pdl_jax's CHAT_DATE, which is what the
project's pinned strftime_now renders.

torch and transformers are not project dependencies; a side venv:

    python3 -m venv /work/venvs/hf
    /work/venvs/hf/bin/pip install torch==2.13.0 transformers==5.25.0 tokenizers
    /work/venvs/hf/bin/python tools/make_chat_fixtures.py   # from the repo root

Output: tests/fixtures/chat/{bytelevel,metaspace}.json (tokenizer.json files) and
tests/fixtures/chat/conversations.json.
"""

from __future__ import annotations

import json
import os
import platform

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "chat")
SMOLLM2 = os.path.expanduser("~/.cache/pdl_jax/models/smollm2-135m-instruct/hf/"
                             "chat_template.jinja")
CHAT_DATE = "01 Jan 2026"  # pdl_jax.tokenizers.chat.CHAT_DATE as "%d %b %Y"

LLAMA32 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

MISTRAL01 = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
             "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
             "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
             "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
             "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception("
             "'Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

QWEN25 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# name -> (source, template or None (read from SMOLLM2), special token strings).
TEMPLATES = {
    "smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct (its GGUF's tokenizer.chat_template, "
                "via the pdl_jax cache)", None,
                {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}),
    "llama3.2": ("meta-llama/Llama-3.2-1B-Instruct tokenizer_config.json chat_template "
                 "(tool-call branches left out)", LLAMA32,
                 {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "mistral-v0.1": ("mistralai/Mistral-7B-Instruct-v0.1 tokenizer_config.json chat_template",
                     MISTRAL01, {"bos_token": "<s>", "eos_token": "</s>"}),
    "gemma3": ("google/gemma-3-1b-it tokenizer_config.json chat_template", GEMMA3,
               {"bos_token": "<bos>", "eos_token": "<eos>"}),
    "qwen2.5": ("Qwen/Qwen2.5-0.5B-Instruct tokenizer_config.json chat_template "
                "(tool-call branches left out)", QWEN25,
                {"bos_token": None, "eos_token": "<|im_end|>"}),
}
MARKERS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>", "<start_of_turn>",
           "<end_of_turn>", "<s>", "</s>"]
# Leading/trailing spaces and newlines on either side; an empty-looking edge case.
PAIRS = [("What is the capital of France?", "Paris."),
         ("  leading and trailing spaces  ", " The answer is 42. "),
         ("line one\nline two\n", "answer\n"),
         ("\nstarts with a newline", "\n\ntwo paragraphs\n\nhere"),
         ("ends with a newline\n", "Sure: 1, 2, 3\n")]
CORPUS = [" ".join(p + " " + t for p, t in PAIRS),
          "the user and the assistant answer in two lines: system today date jan",
          "Cutting Knowledge Date December 2023 You are Qwen created by Alibaba Cloud",
          "You are a helpful AI assistant named SmolLM trained by Hugging Face"] * 10


def metaspace_tokenizer() -> tokenizers.Tokenizer:
  """A SentencePiece-style BPE ('▁' before each word, and before a text's start)."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
  tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<unk>"] + MARKERS, show_progress=False,
      initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                            "0123456789 \n:.,?![]/|<>_")))
  return tok


def bytelevel_tokenizer() -> tokenizers.Tokenizer:
  """The ByteLevel BPE of the llama HF fixture with the markers as special tokens."""
  tok = tokenizers.Tokenizer.from_file(os.path.join(ROOT, "tests", "fixtures", "hf", "llama",
                                                    "tokenizer.json"))
  tok.add_special_tokens(MARKERS)
  return tok


def main() -> None:
  os.makedirs(OUT, exist_ok=True)
  cases = []
  templates = {}
  for tok_name, make in (("bytelevel", bytelevel_tokenizer), ("metaspace", metaspace_tokenizer)):
    path = os.path.join(OUT, f"{tok_name}.json")
    make().save(path)
    for name, (source, template, specials) in TEMPLATES.items():
      if template is None:
        with open(SMOLLM2, encoding="utf-8") as f:
          template = f.read()
      templates[name] = {"source": source, "template": template, "special_tokens": specials}
      hf = transformers.PreTrainedTokenizerFast(
          tokenizer_file=path, **{k: v for k, v in specials.items() if v is not None})
      for prompt, target in PAIRS:
        conv = [{"role": "user", "content": prompt}, {"role": "assistant", "content": target}]
        kw = {"chat_template": template, "date_string": CHAT_DATE}
        text = hf.apply_chat_template(conv, tokenize=False, **kw)
        ids = hf.apply_chat_template(conv, tokenize=True, return_dict=False, **kw)
        gen_text = hf.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True,
                                          **kw)
        gen_ids = hf.apply_chat_template(conv[:1], tokenize=True, return_dict=False,
                                         add_generation_prompt=True, **kw)
        cases.append({"template": name, "tokenizer": tok_name, "prompt": prompt,
                      "target": target, "text": text, "ids": list(ids),
                      "generation_text": gen_text, "generation_ids": list(gen_ids)})
  out = {"made_by": {"transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__,
                     "python": platform.python_version()},
         "date_string": CHAT_DATE, "templates": templates, "cases": cases}
  tmp = os.path.join(OUT, "conversations.json.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(out, f, ensure_ascii=False)
  os.replace(tmp, os.path.join(OUT, "conversations.json"))
  print(f"wrote {len(cases)} conversations to {OUT}")


if __name__ == "__main__":
  main()

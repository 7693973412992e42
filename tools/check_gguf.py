"""The GGUF import (pdl_jax.models.hf.gguf) agrees with transformers' own GGUF loader.

Token ids of ~20 unseen texts (prose, code, numbers, unicode, whitespace runs, chat
markers) and the float32 logits of a right-padded batch of the first LOGIT_TEXTS texts
(only each text's own positions are compared: the models are causal) are computed by
transformers from the GGUF file, then by pdl_jax from the folder gguf.convert writes.

Two steps, two venvs (torch is not a project dependency). The side venv:

    python3 -m venv /work/hfvenv && /work/hfvenv/bin/pip install torch==2.13.0 \\
        transformers==5.24.0 accelerate gguf==0.19.0 safetensors tokenizers numpy sentencepiece

    # 0. (optional) a tiny GGUF from tests/fixtures/hf/llama: float32, or quantised
    #    (attention Q4_1, other matrices Q8_0, norms F32); either venv
    python tools/check_gguf.py tiny /tmp/gguf_check/tiny_f32.gguf
    python tools/check_gguf.py tiny-quant /tmp/gguf_check/tiny_quant.gguf
    # 1. the reference: transformers' tokenizer, logits and chat template, into an npz
    /work/hfvenv/bin/python tools/check_gguf.py reference GGUF_FILE OUT.npz
    # 2. convert with pdl_jax, load with pdl_jax (and the tokenizers library), compare
    /work/main/.venv/bin/python tools/check_gguf.py compare GGUF_FILE OUT.npz

Step 2 exits non-zero when any text's ids differ, when the logits' max relative error
(max |a - b| / max |b|) exceeds 1e-4, or when the converted folder's chat template
differs from the GGUF's or renders differently from transformers' apply_chat_template.
Two known deviations of transformers' GGUF tokenizer are printed but not counted (see
_id_diff): an id past the GGUF's token list (its own default '<|endoftext|>'), and ids
that the converted tokenizer gives once its Digits pre-tokenizer is removed
(transformers ignores tokenizer.ggml.pre 'smollm'; llama.cpp splits digits first).

Last run (transformers 5.24.0, torch 2.13.0+cpu, gguf 0.19.0; CPU, 2 threads), 22 texts:
  tiny_f32.gguf    encode_batch ids 22/22 identical; logits max rel err 5.0e-7, argmax
                   100%; chat template identical. (tokenizer.json with special tokens
                   parsed: 21/22, the other is transformers' own extra '<|endoftext|>'.)
  tiny_quant.gguf  the same; logits max rel err 5.9e-7, argmax 100%.
  SmolLM2-135M-Instruct.Q4_1.gguf  ids 21/22 identical; the other (a whitespace run
                   before a digit) is transformers' missing digit split for
                   tokenizer.ggml.pre 'smollm'; logits max rel err 3.4e-6, argmax 100%
                   over 249 positions; chat template rendered identically.
  gemma-3-270m-q4_k_m.gguf (offline name gemma3-270m; transformers 5.25.0, torch
                   2.13.0+cpu), CHECK_GGUF_EXTRA_TEXTS=200: ids identical on 222/222
                   texts (the 22 above and 200 unseen paragraphs of Python's docs),
                   decode identical; logits max rel err 2.3e-6, argmax 100% over 238
                   positions; no chat template in the file, none in the folder.
                   CHECK_GGUF_LONG_TOKENS=700 (one text longer than its 512-token
                   sliding window): logits max rel err 6.2e-6, argmax 100%.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf", "llama")
TOL = 1e-4
LOGIT_TEXTS = 8  # the first texts, as one right-padded batch

# None of these are among the project's test texts.
TEXTS = [
    "The committee postponed its decision until the spring, citing unresolved "
    "questions about funding and staffing.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n",
    "Order #48213 shipped on 2024-03-17 for $1,299.95 (qty: 3, weight 0.75kg).",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "na\u00efve fa\u00e7ade \u2014 Z\u00fcrich, S\u00e3o Paulo, Krak\u00f3w; "
    "\u6771\u4eac\u30bf\u30ef\u30fc and \u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac "
    "\U0001f642\U0001f680",
    "   leading spaces,\t\ttabs,\n\n\nblank lines   and trailing   ",
    "a</s>b<s>c <pad> d<unk>e",
    "3.14159265358979 + 2.71828 = 5.85987; 1e-9 < 10^12 and 2025 20250 202500",
    "if (x != NULL && y >= 0x1F) { return x->next[y] ?: -1; }  // C-ish",
    "SELECT name, COUNT(*) FROM users WHERE age > 30 GROUP BY name;",
    "Mr. O'Neil's dog\u2014named \"Rex\"\u2014won't stop barking!!! I'm sure we'd've known.",
    "<|endoftext|>The next document starts here.",
    "https://example.org/path?query=a%20b&x=1#frag",
    "ALL CAPS SENTENCE WITH SOME lowercase AND MiXeD cAsE",
    "\u03b1\u03b2\u03b3 \u03b4\u03b5\u03b6 \u2211\u222b\u2202\u221a\u221e \u2260 \u2264 \u2265",
    "<file_sep>src/main.rs\nfn main() { println!(\"hello\"); }",
    "\n\n\n\n",
    "e\u0301 a\u0308 n\u0303 (combining marks) vs \u00e9 \u00e4 \u00f1",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}",
    "    ",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 7*6?<|im_end|>\n",
    # A whitespace run before a digit: split differently when digits are split off first.
    "Steps:\n    1. install\n    2. run\n\n        10. done\nx = [\n    0,\n    1,\n]",
]


def unseen_paragraphs(n: int) -> list[str]:
  """n paragraphs of Python's own documentation (pydoc_data.topics, in the standard
  library of either venv): unseen English prose with code, evenly spaced over it."""
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  paras = [p.strip() for key in sorted(topics.topics) for p in topics.topics[key].split("\n\n")]
  paras = [p for p in paras if 40 <= len(p) <= 800]
  return [paras[i * len(paras) // n] for i in range(n)] if n else []


# CHECK_GGUF_EXTRA_TEXTS=200: the reference step also tokenizes 200 such paragraphs.
CHAT = [{"role": "user", "content": "Hello"}]
TINY_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                 "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n"
                 "{% endif %}")


# --------------------------------------------------------------------- tiny GGUF
def tiny(out: str, quant: bool) -> None:
  """The llama fixture written as a GGUF, as llama.cpp's convert_hf_to_gguf.py does
  (Q/K rows permuted to interleaved RoPE pairs, then quantised)."""
  import gguf  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  with open(os.path.join(FIXTURE, "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(FIXTURE, "tokenizer.json")) as f:
    tok = json.load(f)
  q = gguf.GGMLQuantizationType
  heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]

  def permute(w, n_head):  # convert_hf_to_gguf.py LlamaModel.permute
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))

  w = gguf.GGUFWriter(out, "llama")
  w.add_block_count(cfg["num_hidden_layers"])
  w.add_context_length(cfg["max_position_embeddings"])
  w.add_embedding_length(cfg["hidden_size"])
  w.add_feed_forward_length(cfg["intermediate_size"])
  w.add_head_count(heads)
  w.add_head_count_kv(kv_heads)
  w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
  w.add_rope_dimension_count(cfg["head_dim"])
  # The embedding has more rows (320) than the tokenizer has tokens (300): like
  # convert_hf_to_gguf.py, fill the list with [PADi] tokens of type UNUSED (5) and
  # write llama.vocab_size (transformers takes the vocabulary size from either).
  vocab = tok["model"]["vocab"]
  tokens = [f"[PAD{i}]" for i in range(cfg["vocab_size"])]
  for piece, i in vocab.items():
    tokens[i] = piece
  special = {t["id"] for t in tok["added_tokens"] if t["special"]}
  w.add_vocab_size(cfg["vocab_size"])
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("gpt2")
  w.add_token_list(tokens)
  w.add_token_types([3 if i in special else 1 if i < len(vocab) else 5
                     for i in range(len(tokens))])
  w.add_token_merges([" ".join(m) if isinstance(m, list) else m
                      for m in tok["model"]["merges"]])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(0)
  w.add_unk_token_id(3)
  w.add_add_bos_token(False)
  w.add_chat_template(TINY_TEMPLATE)
  names = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
  layer = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
           "self_attn.v_proj.weight": "attn_v.weight",
           "self_attn.o_proj.weight": "attn_output.weight",
           "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
           "mlp.down_proj.weight": "ffn_down.weight",
           "input_layernorm.weight": "attn_norm.weight",
           "post_attention_layernorm.weight": "ffn_norm.weight"}
  for name, t in sorted(load_file(os.path.join(FIXTURE, "model.safetensors")).items()):
    parts = name.split(".")
    gname = names.get(name) or f"blk.{parts[2]}.{layer['.'.join(parts[3:])]}"
    t = t.astype(np.float32)
    if name.endswith("q_proj.weight"):
      t = permute(t, heads)
    elif name.endswith("k_proj.weight"):
      t = permute(t, kv_heads)
    qtype = (q.F32 if not quant or t.ndim == 1 else
             q.Q4_1 if "self_attn" in name else q.Q8_0)
    w.add_tensor(gname, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  print(f"wrote {out} ({'Q4_1 attention, Q8_0 other matrices' if quant else 'F32'})")


def _padded(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
  lengths = np.array([len(x) for x in ids], np.int32)
  tokens = np.zeros((len(ids), max(lengths.max(), 1)), np.int32)
  for i, x in enumerate(ids):
    tokens[i, :len(x)] = x
  return tokens, lengths


# --------------------------------------------------------------------- reference
def reference(gguf_file: str, out: str) -> None:
  import time  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
  folder, name = os.path.split(os.path.abspath(gguf_file))
  t0 = time.time()
  tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, gguf_file=name, dtype=torch.float32,
      quantization_config=transformers.GgufConfig(dequantize=True)).eval()
  t1 = time.time()
  texts = TEXTS + unseen_paragraphs(int(os.environ.get("CHECK_GGUF_EXTRA_TEXTS", "0")))
  ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
  # Special-token strings in the text split as plain text (what a data pipeline wants).
  ids_split = [tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"]
               for t in texts]
  tokens, lengths = _padded(ids[:LOGIT_TEXTS])
  mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int64)
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens).long(),
                   attention_mask=torch.from_numpy(mask)).logits.float().numpy()
  long_tokens, long_logits = _long_reference(tok, model, torch)
  t2 = time.time()
  template = getattr(tok, "chat_template", None)
  chat = (tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
          if template else "")
  decoded = [tok.decode(x, skip_special_tokens=True) for x in ids]
  info = {"transformers": transformers.__version__, "torch": torch.__version__,
          "tokenizer_class": type(tok).__name__, "model_class": type(model).__name__,
          "config": json.loads(model.config.to_json_string()),
          "special": {k: getattr(tok, k, None) for k in
                      ("bos_token", "eos_token", "pad_token", "unk_token")},
          "load_s": round(t1 - t0, 1), "forward_s": round(t2 - t1, 1)}
  np.savez(out, ids=np.array([json.dumps(x) for x in ids]), texts=np.array(texts),
           ids_split=np.array([json.dumps(x) for x in ids_split]),
           tokens=tokens, lengths=lengths, logits=logits.astype(np.float32),
           chat_template=np.array(template or ""), chat=np.array(chat),
           decoded=np.array(decoded), info=np.array(json.dumps(info)),
           long_tokens=long_tokens, long_logits=long_logits)
  print(f"{gguf_file}: {type(model).__name__} + {type(tok).__name__} "
        f"(transformers {transformers.__version__}, torch {torch.__version__}); "
        f"load {t1 - t0:.1f}s, forward {t2 - t1:.1f}s; logits {logits.shape} -> {out}")
  if chat:
    print(f"chat template rendered by transformers: {chat!r}")


def _long_reference(tok, model, torch):
  """CHECK_GGUF_LONG_TOKENS=N: one text of N tokens (unseen paragraphs joined) and its
  logits, for models whose sliding window is shorter than N; else empty arrays."""
  n = int(os.environ.get("CHECK_GGUF_LONG_TOKENS", "0"))
  if not n:
    return np.zeros((1, 0), np.int32), np.zeros((1, 0, 0), np.float32)
  ids = tok("\n\n".join(unseen_paragraphs(200)), add_special_tokens=True)["input_ids"][:n]
  tokens = np.asarray([ids], np.int32)
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens).long()).logits.float().numpy()
  return tokens, logits.astype(np.float32)


# --------------------------------------------------------------------- compare
def _render(template: str, bos: str | None, eos: str | None) -> str:
  """The template rendered as transformers renders it (sandboxed jinja2, trim_blocks,
  lstrip_blocks, loopcontrols)."""
  import jinja2  # pylint: disable=import-outside-toplevel
  import jinja2.ext  # pylint: disable=import-outside-toplevel
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=import-outside-toplevel

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[jinja2.ext.loopcontrols])
  env.globals["raise_exception"] = raise_exception
  return env.from_string(template).render(messages=CHAT, add_generation_prompt=True,
                                          bos_token=bos or "", eos_token=eos or "")


def _id_diff(name: str, texts, mine, want, piece, n_tokens: int, no_digits=None
             ) -> list[int]:
  """Prints how many texts' ids agree and the first difference of each other text;
  returns the differing texts, less those explained by two known deviations of
  transformers 5.24's GGUF tokenizer (both printed, neither counted):
  - an id past the GGUF's token list: a token transformers added itself (its
    GPT2Tokenizer adds its default '<|endoftext|>' to a vocabulary without one);
  - `no_digits` (the converted tokenizer.json without its Digits pre-tokenizer)
    gives transformers' ids: transformers has no entry for tokenizer.ggml.pre
    'smollm' / 'starcoder' and keeps GPT-2's split, where llama.cpp (llama-vocab.cpp:
    regex "\\p{N}" first) and the models' own tokenizer.json split digits off first."""
  differ = [i for i in range(len(texts)) if mine[i] != want[i]]
  print(f"  {name}: identical for {len(texts) - len(differ)}/{len(texts)} texts")
  excused = set()
  for i in differ:
    a, b = mine[i], want[i]
    k = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
    print(f"    text {i} {texts[i][:48]!r}: first difference at token {k}: pdl_jax "
          f"{a[k:k + 4]} {[piece(t) for t in a[k:k + 4]]} vs transformers {b[k:k + 4]} "
          f"{[piece(t) for t in b[k:k + 4]]} (lengths {len(a)} vs {len(b)})"
          + (f"; transformers' id {max(b)} is past the GGUF's {n_tokens} tokens "
             "(not counted)" if max(b) >= n_tokens else ""))
    if max(b, default=0) >= n_tokens:
      excused.add(i)
    elif no_digits is not None and no_digits[i] == b:
      excused.add(i)
      print("      = pdl_jax's tokenizer without the digit split (transformers' known "
            "deviation from llama.cpp; not counted)")
  return [i for i in differ if i not in excused]


def compare(gguf_file: str, ref_file: str) -> int:
  import time  # pylint: disable=import-outside-toplevel
  import tokenizers  # pylint: disable=import-outside-toplevel
  from pdl_jax.tokenizers import hf as hf_tokenizer
  from pdl_jax.models.hf import families as hf_families
  from pdl_jax.models.hf import gguf as gguf_lib
  from pdl_jax.models.hf import weights as hf_weights
  ref = np.load(ref_file)
  info = json.loads(str(ref["info"]))
  texts = [str(t) for t in ref["texts"]]
  ref_ids = [json.loads(str(x)) for x in ref["ids"]]
  ref_split = [json.loads(str(x)) for x in ref["ids_split"]]
  bad = []
  print(f"{gguf_file} vs transformers {info['transformers']} (torch {info['torch']}, "
        f"{info['model_class']} + {info['tokenizer_class']})")
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.time()
    folder = gguf_lib.convert(gguf_file, os.path.join(tmp, "hf"))
    t1 = time.time()
    print(f"  convert {t1 - t0:.1f}s")
    tok = hf_tokenizer.HFTokenizer.load(folder)
    lib = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    piece = lib.id_to_token
    n_tokens = len(gguf_lib.metadata(gguf_lib.open_gguf(gguf_file), "tokenizer.ggml.tokens"))
    with open(os.path.join(folder, "tokenizer.json")) as f:
      tj = json.load(f)
    pre = tj.get("pre_tokenizer") or {}
    no_digits = no_digits_split = None
    if pre.get("type") == "Sequence" and any(p["type"] == "Digits"
                                             for p in pre["pretokenizers"]):
      tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
          p for p in pre["pretokenizers"] if p["type"] != "Digits"]}
      alt = tokenizers.Tokenizer.from_str(json.dumps(tj))
      no_digits = [e.ids for e in alt.encode_batch(texts, add_special_tokens=False)]
      alt.encode_special_tokens = True
      no_digits_split = [e.ids for e in alt.encode_batch(texts, add_special_tokens=False)]
    # HFTokenizer.encode_batch may split special-token strings as text (the data path):
    # compare it with transformers' split_special_tokens=True when it does.
    ids = tok.encode_batch(texts)
    specials = [t.content for t in lib.get_added_tokens_decoder().values() if t.special]
    splits = any(len(x) > 1 for x in tok.encode_batch(specials))
    want = ref_split if splits else ref_ids
    differ = _id_diff(f"HFTokenizer.encode_batch vs transformers (split_special_tokens="
                      f"{splits})", texts, ids, want, piece, n_tokens,
                      no_digits_split if splits else no_digits)
    if differ:
      bad.append(f"encode_batch ids differ on {len(differ)} texts")
    lib_ids = [e.ids for e in lib.encode_batch(texts, add_special_tokens=False)]
    differ = _id_diff("tokenizers.Tokenizer(tokenizer.json) vs transformers", texts,
                      lib_ids, ref_ids, piece, n_tokens, no_digits)
    if differ:
      bad.append(f"tokenizer.json ids differ on {len(differ)} texts")
    if hasattr(tok, "encode_markup"):
      differ = _id_diff("HFTokenizer.encode_markup vs transformers", texts,
                        tok.encode_markup(texts), ref_ids, piece, n_tokens, no_digits)
      if differ:
        bad.append(f"encode_markup ids differ on {len(differ)} texts")
    dec = tok.decode_batch(ref_ids)
    dec_differ = [i for i in range(len(texts)) if dec[i] != str(ref["decoded"][i])]
    print(f"  decode (special tokens skipped) of transformers' ids: identical for "
          f"{len(texts) - len(dec_differ)}/{len(texts)} texts (informational)"
          + "".join(f"\n    text {i}: {dec[i]!r} vs {str(ref['decoded'][i])!r}"
                    for i in dec_differ[:3]))
    # Logits on transformers' own padded batch of ids, so that a tokenizer difference
    # does not hide the model comparison.
    cfg = hf_families.read_config(folder)
    t2 = time.time()
    logits = hf_weights.logits(folder, ref["tokens"])
    t3 = time.time()
    want = ref["logits"]
    if logits.shape != want.shape:
      print(f"  logits shape {logits.shape} vs transformers {want.shape}")
      bad.append("logits shape")
    else:
      valid = np.arange(want.shape[1])[None] < ref["lengths"][:, None]
      a, b = logits[valid], want[valid]
      err = float(np.abs(a - b).max() / np.abs(b).max())
      agree = float(np.mean(a.argmax(-1) == b.argmax(-1)))
      print(f"  logits ({cfg.model_type}, {int(valid.sum())} positions of {len(valid)} "
            f"texts, vocab {want.shape[-1]}; load+forward {t3 - t2:.1f}s): max rel err "
            f"{err:.3g}, argmax agreement {agree:.2%}")
      if not err <= TOL:
        bad.append(f"logits max rel err {err:.3g} > {TOL}")
    if "long_tokens" in ref and ref["long_tokens"].size:
      long = hf_weights.logits(folder, ref["long_tokens"])
      want = ref["long_logits"]
      err = float(np.abs(long - want).max() / np.abs(want).max())
      window = cfg.sliding_window
      print(f"  logits of one {want.shape[1]}-token text (sliding window {window}): max rel "
            f"err {err:.3g}, argmax agreement {np.mean(long.argmax(-1) == want.argmax(-1)):.2%}")
      if not err <= TOL:
        bad.append(f"long text logits max rel err {err:.3g} > {TOL}")
    # Chat template: the file equals the GGUF's, and renders as transformers renders it.
    reader_template = gguf_lib.metadata(gguf_lib.open_gguf(gguf_file),
                                        "tokenizer.chat_template", None)
    path = os.path.join(folder, "chat_template.jinja")
    mine = open(path).read() if os.path.exists(path) else None
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
      tc = json.load(f)
    if reader_template is None:
      ok = mine is None and not str(ref["chat_template"])
      print(f"  no chat template in the GGUF; converted folder has none: {ok}")
    else:
      same = (mine == reader_template == tc.get("chat_template")
              == str(ref["chat_template"]))
      rendered = _render(mine or "", tc.get("bos_token"), tc.get("eos_token"))
      ok = same and rendered == str(ref["chat"])
      print(f"  chat_template.jinja == GGUF's == tokenizer_config's == transformers': "
            f"{same}; rendered (jinja2 here) identically: {rendered == str(ref['chat'])}")
      try:  # the project's own renderer, where it has one
        from pdl_jax.tokenizers import chat
      except ImportError:
        chat = None
      if chat is not None and getattr(tok, "chat_template", None) is not None:
        own = chat.render(tok.chat_template, CHAT, add_generation_prompt=True,
                          special_tokens=tok.special_tokens)
        ok = ok and own == str(ref["chat"])
        print(f"  pdl_jax.tokenizers.chat.render identical: {own == str(ref['chat'])}")
        rendered = own
      print(f"    transformers: {str(ref['chat'])!r}\n    pdl_jax:      {rendered!r}")
    if not ok:
      bad.append("chat template")
    hf_cfg = info["config"]
    with open(os.path.join(folder, "config.json")) as f:
      my_cfg = json.load(f)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
            "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
            "eos_token_id", "pad_token_id")
    cfg_diff = {k: (my_cfg.get(k), hf_cfg.get(k)) for k in keys if my_cfg.get(k) != hf_cfg.get(k)}
    theta = (my_cfg.get("rope_theta"),
             (hf_cfg.get("rope_parameters") or {}).get("rope_theta", hf_cfg.get("rope_theta")))
    if theta[0] != theta[1]:
      cfg_diff["rope_theta"] = theta
    print(f"  config differences (pdl_jax, transformers; informational): {cfg_diff or 'none'}")
  print("  " + ("OK" if not bad else "FAIL: " + "; ".join(bad)))
  return 1 if bad else 0


if __name__ == "__main__":
  args = sys.argv[1:]
  if len(args) == 2 and args[0] in ("tiny", "tiny-quant"):
    tiny(args[1], quant=args[0] == "tiny-quant")
  elif len(args) == 3 and args[0] == "reference":
    reference(args[1], args[2])
  elif len(args) == 3 and args[0] == "compare":
    sys.exit(compare(args[1], args[2]))
  else:
    sys.exit(__doc__)

"""Your own data (pdl_jax/data/files.py): JSONL, CSV and TSV files and chat records as a
task; field options, the held-out split, clear errors naming file and line, the files'
checksum in the run fingerprint, and a CLI run on the example file."""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import dialogue
from pdl_jax.train import checkpoint as ckpt_lib
from pdl_jax.train import provenance
from pdl_jax import config_checks
from pdl_jax.data import examples as examples_lib
from pdl_jax.data import pipeline
from pdl_jax.data import sources
from pdl_jax.train import run as run_lib
from pdl_jax.data import files as data_files
from pdl_jax.tokenizers import chat
from pdl_jax.tokenizers.hf import HFTokenizer

from test_faults import ROOT, env
from test_tokenizers import FIXTURE_TEMPLATE, chat_fixture
from test_train import tiny_config

# Texts the formats must carry unchanged: commas, quotes, tabs, a newline inside a
# value, non-ASCII, and U+2028 (a line separator to str.splitlines, not to JSON).
RECORDS = [
    {"prompt": "Refund, please: I was charged twice.", "target": "Double charge; refund."},
    {"prompt": 'The app says "session expired"\tevery time.', "target": "Logged out."},
    {"prompt": "Line one\nline two of the ticket", "target": "Two-line ticket."},
    {"prompt": "Café crème, naïve façade \u2028 end", "target": "Unicode ticket."},
    {"prompt": "Empty target below", "target": ""},
]


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                  encoding="utf-8")
  return str(path)


def write_table(path, records, delimiter=","):
  with open(path, "w", encoding="utf-8", newline="") as f:
    w = csv.writer(f, delimiter=delimiter)
    w.writerow(list(records[0]))
    w.writerows([list(r.values()) for r in records])
  return str(path)


def write_tsv(path, records):
  """A TSV file as written by hand or by a tab join: cells as they are, no quoting."""
  lines = ["\t".join(records[0])] + ["\t".join(r.values()) for r in records]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


def test_tsv_cells_keep_their_quotes(tmp_path):
  """TSV cells are their text as written: an entirely quoted cell keeps its quotes
  (read with CSV's quoting rules it lost them); a CSV-quoted cell (quotes doubled
  inside) and a row with a tab too many are clear errors."""
  records = [{"prompt": '"Hi, can you help?"', "target": '"Yes."'},
             {"prompt": 'She said "no" twice', "target": '"no" means no'},
             {"prompt": '"a"b', "target": "plain"}]
  got = data_files.read_pairs(write_tsv(tmp_path / "q.tsv", records), data_files.Fields(),
                              None)[0]
  assert got == pairs_of(records)
  bad = tmp_path / "bad.tsv"
  bad.write_text('prompt\ttarget\n"The app says ""expired"""\tok\n', encoding="utf-8")
  with pytest.raises(data_files.DataFileError,
                     match=r"bad\.tsv: line 2: the 'prompt' cell .* looks CSV-quoted"):
    data_files.read_pairs(str(bad), data_files.Fields(), None)
  bad.write_text("prompt\ttarget\na\tb\tc\n", encoding="utf-8")
  with pytest.raises(data_files.DataFileError, match=r"line 2: 3 values; expected 2.*a "
                     r"value with a tab or a newline needs a CSV or JSONL file"):
    data_files.read_pairs(str(bad), data_files.Fields(), None)


def files_config(train_path, validation=None, **fields):
  """A dialogue smoke config on the user's files."""
  c = dialogue.get_config("smoke,dataset=files")
  c.dataset.train = None if train_path is None else str(train_path)
  c.dataset.validation = None if validation is None else str(validation)
  for key, value in fields.items():
    c.dataset[key] = value
  return c


def read(c, split="train", limit=None):
  lines = []
  prompts, targets = data_files.load_split(c.dataset, split, limit, log=lines.append)
  return list(zip(prompts, targets)), lines


def pairs_of(records, prompt="prompt", target="target"):
  return [(r[prompt], r[target]) for r in records]


# ---------------------------------------------------------------------------
# Formats and fields.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_each_format_reads_the_same_examples(tmp_path, fmt):
  renamed = [{"ticket": r["prompt"], "summary": r["target"], "id": str(i)}
             for i, r in enumerate(RECORDS)]
  if fmt == "tsv":  # TSV has no quoting: no tab or newline in a value
    renamed = [{k: v.replace("\t", " ").replace("\n", " ") for k, v in r.items()}
               for r in renamed]
  path = {"jsonl": lambda: write_jsonl(tmp_path / "d.jsonl", renamed),
          "csv": lambda: write_table(tmp_path / "d.csv", renamed),
          "tsv": lambda: write_tsv(tmp_path / "d.tsv", renamed)}[fmt]()
  val = write_jsonl(tmp_path / "val.jsonl", renamed[:2])
  c = files_config(path, val, prompt_field="ticket", target_field="summary")
  config_checks.validate_config(c)
  got, lines = read(c)
  assert got == pairs_of(renamed, "ticket", "summary")  # the empty target is kept here
  assert "data: files train: 5 examples from" in lines[0]
  # A suffix the format cannot be inferred from, with dataset.format given.
  other = tmp_path / "d.txt"
  other.write_bytes(open(path, "rb").read())
  c = files_config(other, val, prompt_field="ticket", target_field="summary", format=fmt)
  assert read(c)[0] == got
  c.dataset.format = None
  with pytest.raises(ValueError, match=r"d\.txt: cannot infer the format from the suffix "
                                       r"'\.txt'.*dataset\.format"):
    config_checks.validate_config(c)


def test_empty_targets_are_dropped_and_counted_by_encode_examples(tmp_path):
  from pdl_jax.tokenizers import sentencepiece as sp_tokenizer
  from test_frequency import make_texts
  c = files_config(write_jsonl(tmp_path / "d.jsonl", RECORDS), tmp_path / "d.jsonl")
  prompts, targets = zip(*read(c)[0])
  tok = sp_tokenizer.train(make_texts(300, 0) + list(prompts), str(tmp_path / "t.model"), 60)
  ex = examples_lib.encode_examples(list(prompts), list(targets), tok, seq_len=48,
                                max_target_len=16)
  assert len(ex) == 4 and ex.dropped_empty == 1


def test_context_field_joins_turns_as_the_dialogue_task(tmp_path):
  records = [{"context": ["Hello.", "Hi, how can I help?"], "prompt": "My order is late.",
              "target": "Sorry, let me check."},
             {"context": [], "prompt": "Hi", "target": "Hello"}]
  want = [("Hello.\nHi, how can I help?\nMy order is late.", "Sorry, let me check."),
          ("Hi", "Hello")]
  c = files_config(write_jsonl(tmp_path / "d.jsonl", records), tmp_path / "d.jsonl",
                   context_field="context")
  assert read(c)[0] == want
  # In CSV, the list is a cell of JSON text.
  table = [{**r, "context": json.dumps(r["context"])} for r in records]
  c.dataset.train = write_table(tmp_path / "d.csv", table)
  assert read(c)[0] == want
  # The hub dialogue dataset's joining, reused (tasks.DatasetSpec.format).
  from pdl_jax.data import tasks as tasks_lib
  sgd = tasks_lib.get_dataset("dialogue", "gem/schema_guided_dialog")
  assert sgd.format(records[0]) == want[0]


CHATS = [
    {"messages": [{"role": "user", "content": "My parcel never came."},
                  {"role": "assistant", "content": "Parcel missing."}]},
    {"messages": [{"role": "system", "content": "Summarize tickets."},
                  {"role": "user", "content": "Charged twice."},
                  {"role": "assistant", "content": "Double charge."},
                  {"role": "user", "content": "Thanks!"}]},  # after the last: ignored
    {"messages": [{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello, what happened?"},
                  {"role": "user", "content": "Login fails."},
                  {"role": "assistant", "content": "Login failure."}]},
]
CHAT_PAIRS = [("My parcel never came.", "Parcel missing."),
              ("system: Summarize tickets.\nuser: Charged twice.", "Double charge."),
              ("user: Hi\nassistant: Hello, what happened?\nuser: Login fails.",
               "Login failure.")]


def test_messages_field_last_assistant_turn_is_the_target(tmp_path):
  c = files_config(write_jsonl(tmp_path / "chats.jsonl", CHATS), tmp_path / "chats.jsonl",
                   messages_field="messages")
  config_checks.validate_config(c)
  assert read(c)[0] == CHAT_PAIRS
  c.dataset.train = write_table(tmp_path / "chats.csv",
                                [{"messages": json.dumps(r["messages"])} for r in CHATS])
  assert read(c)[0] == CHAT_PAIRS
  c.dataset.context_field = "context"
  with pytest.raises(ValueError, match="set one of them"):
    config_checks.validate_config(c)


def test_chat_records_in_a_models_chat_template(tmp_path):
  base = HFTokenizer.load(chat_fixture(tmp_path))
  tok = pipeline.with_prompt_format(base, None)
  assert isinstance(tok, chat.ChatTokenizer)
  c = files_config(write_jsonl(tmp_path / "chats.jsonl", CHATS), tmp_path / "chats.jsonl",
                   messages_field="messages")
  prompts, targets = map(list, zip(*read(c)[0]))
  ex = examples_lib.encode_examples(prompts, targets, tok, seq_len=160, max_target_len=32)
  assert ex.truncated == 0
  for i, (p, t) in enumerate(zip(prompts, targets)):
    # The earlier messages are one user turn of the template, the target the reply.
    conversation = chat.render(FIXTURE_TEMPLATE, [
        {"role": "user", "content": p}, {"role": "assistant", "content": t}],
        add_generation_prompt=False, special_tokens=base.special_tokens)
    want = base.encode_markup([conversation])[0]
    n = int(ex.lengths[i])
    assert ex.seqs[i, :n].tolist() == want[:n] and want[n - 1] == tok.eos_id


# ---------------------------------------------------------------------------
# Splits, shards, overlap.
# ---------------------------------------------------------------------------


def test_held_out_split_is_deterministic_and_disjoint(tmp_path):
  records = [{"prompt": f"ticket {i}", "target": f"summary {i}"} for i in range(100)]
  c = files_config(write_jsonl(tmp_path / "d.jsonl", records))
  config_checks.validate_config(c)
  train_pairs, train_lines = read(c, "train")
  val_pairs, val_lines = read(c, "validation")
  assert len(val_pairs) == 5 and len(train_pairs) == 95  # validation_fraction 0.05
  assert not set(train_pairs) & set(val_pairs)
  assert sorted(train_pairs + val_pairs) == sorted(pairs_of(records))
  assert train_pairs == sorted(train_pairs, key=lambda p: int(p[0].split()[1]))  # file order
  assert read(c, "validation")[0] == val_pairs and read(c, "train")[0] == train_pairs
  assert "5 of its 100 records held out for validation (validation_fraction=0.05, " \
         "seed 0)" in train_lines[0]
  assert "0 of these also in train" in val_lines[0]
  assert read(c, "train", limit=10)[0] == train_pairs[:10]  # the cap after the split
  c.dataset.validation_fraction = 0.2
  assert len(read(c, "validation")[0]) == 20
  np.testing.assert_array_equal(data_files.held_out_mask(100, 0.05),
                                data_files.held_out_mask(100, 0.05))


def test_glob_reads_shards_in_sorted_order_and_reports_overlap(tmp_path):
  records = [{"prompt": f"ticket {i}", "target": f"summary {i}"} for i in range(12)]
  (tmp_path / "data").mkdir()
  write_jsonl(tmp_path / "data" / "train-1.jsonl", records[6:])
  write_jsonl(tmp_path / "data" / "train-0.jsonl", records[:6])
  write_jsonl(tmp_path / "data" / "other.jsonl", records[:1])  # not matched
  val = write_jsonl(tmp_path / "val.jsonl", records[:2] + [{"prompt": "new", "target": "x"}])
  c = files_config(tmp_path / "data" / "train-*.jsonl", val)
  got, lines = read(c)
  assert got == pairs_of(records) and "(2 files)" in lines[0]
  assert "2 of these also in train (identical prompt and target)" in read(
      c, "validation")[1][0]
  # The checksum: the files' bytes in sorted path order.
  import hashlib
  want = hashlib.sha256(b"".join(open(tmp_path / "data" / f"train-{i}.jsonl", "rb").read()
                                 for i in (0, 1))).hexdigest()
  assert data_files.files_sha256(c.dataset.train) == want


# ---------------------------------------------------------------------------
# Bad input: clear errors naming the file and the line.
# ---------------------------------------------------------------------------

GOOD = '{"prompt": "a", "target": "b"}\n'
BAD_FILES = [
    ("malformed.jsonl", GOOD + '{"prompt": "a", "target": }\n', {},
     r"malformed\.jsonl: line 2: malformed JSON \(Expecting value: column 27\); expected "
     r"one JSON object per line"),
    ("array.jsonl", '[\n  {"prompt": "a"}\n]\n', {},
     r"array\.jsonl: line 1: malformed JSON .*a JSON array file\? expected JSON Lines"),
    ("notobject.jsonl", GOOD + '["a", "b"]\n', {},
     r"notobject\.jsonl: line 2: a JSON array; expected a JSON object"),
    ("missing.jsonl", GOOD + '\n{"question": "a", "answer": "b"}\n', {},
     r"missing\.jsonl: line 3: no field 'prompt' \(config\.dataset\.prompt_field\); the "
     r"record has the fields \['answer', 'question'\]"),
    ("number.jsonl", GOOD + '{"prompt": "a", "target": 42}\n', {},
     r"number\.jsonl: line 2: field 'target' is a int \(42\); expected a string"),
    ("null.jsonl", GOOD + '{"prompt": null, "target": "b"}\n', {},
     r"null\.jsonl: line 2: field 'prompt' is a null \(null\); expected a string"),
    ("context.jsonl", '{"prompt": "a", "target": "b", "context": ["x", 3]}\n',
     {"context_field": "context"},
     r"context\.jsonl: line 1: item 2 of field 'context' is a int \(3\); expected a string"),
    ("empty.jsonl", "\n  \n", {}, r"empty\.jsonl: empty: no records; expected one JSON "
     r"object per line"),
    ("header_only.csv", "prompt,target\n", {}, r"header_only\.csv: empty: no records; "
     r"expected a header row and data rows"),
    ("ragged.csv", "prompt,target\na,b\nc,d,e\n", {},
     r"ragged\.csv: line 3: 3 values; expected 2, one per header column"),
    ("quotes.csv", 'prompt,target\n"a"b,c\n', {},
     r"quotes\.csv: line 2: malformed CSV \(.*\); expected CSV with a header row"),
    ("one.jsonl", GOOD, {},
     r"config\.dataset\.train has 1 record\(s\): too few to hold out "
     r"validation_fraction=0\.05"),
    ("noassistant.jsonl", GOOD.replace('"prompt": "a", "target": "b"',
                                       '"messages": [{"role": "user", "content": "hi"}]'),
     {"messages_field": "messages"},
     r"noassistant\.jsonl: line 1: no assistant message in field 'messages' \(roles "
     r"\['user'\]\); expected one: the last is the target"),
    ("badmessage.jsonl", '{"messages": [{"role": "user"}]}\n', {"messages_field": "messages"},
     r"badmessage\.jsonl: line 1: message 1 of field 'messages' is \{\"role\": \"user\"\}; "
     r"expected an object with \"role\" and \"content\""),
    ("notlist.csv", 'messages\n"{""role"": ""user""}"\n', {"messages_field": "messages"},
     r"notlist\.csv: line 2: field 'messages' is a object; expected a list"),
]


@pytest.mark.parametrize("name,text,fields,message", BAD_FILES,
                         ids=[b[0] for b in BAD_FILES])
def test_bad_files_are_clear_errors(tmp_path, name, text, fields, message):
  (tmp_path / name).write_text(text, encoding="utf-8")
  val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "a", "target": "b"}])
  c = files_config(tmp_path / name, None if name == "one.jsonl" else val, **fields)
  config_checks.validate_config(c)  # files exist: records are checked when read
  with pytest.raises(data_files.DataFileError, match=message):
    sources.load_split_texts(c.task, c.dataset, "train")


def test_non_utf8_bytes_name_the_line(tmp_path):
  path = tmp_path / "latin1.jsonl"
  path.write_bytes(GOOD.encode() + '{"prompt": "café", "target": "b"}\n'.encode("latin-1"))
  c = files_config(path, path)
  with pytest.raises(ValueError, match=r"latin1\.jsonl: line 2: not UTF-8 \(byte 0xe9 at "
                                       r"offset 46\); expected UTF-8 text"):
    read(c)
  path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())  # a byte-order mark is fine
  assert read(c)[0] == [("a", "b")]


def test_bad_config_values_fail_before_anything_is_read(tmp_path):
  good = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "target": "b"}] * 3)
  cases = [
      (files_config(str(tmp_path / "nothing-*.jsonl")),
       r"config\.dataset\.train='.*nothing-\*\.jsonl': no file matches the glob"),
      (files_config(str(tmp_path / "absent.jsonl")),
       r"config\.dataset\.train='.*absent\.jsonl': no such file"),
      (files_config(good, str(tmp_path / "val-*.jsonl")),
       r"config\.dataset\.validation='.*val-\*\.jsonl': no file matches"),
      (files_config(None), r"needs config\.dataset\.train"),
      (files_config(good, format="parquet"), r"config\.dataset\.format='parquet'"),
      (files_config(good, validation_fraction=0.0), r"validation_fraction=0\.0; expected a "
       r"fraction in \(0, 1\)"),
      (files_config(good, prompt_field=""), r"config\.dataset\.prompt_field=''"),
  ]
  other = dialogue.get_config("smoke")
  other.dataset.train = good
  cases.append((other, r"config\.dataset\.train='.*' is only read with "
                       r"config\.dataset\.name='files' \(now 'shakespeare_dialogue'\)"))
  for c, message in cases:
    with pytest.raises(ValueError, match=message):
      config_checks.validate_config(c)
  with pytest.raises(ValueError, match="has the splits"):
    read(files_config(good), "test")


# ---------------------------------------------------------------------------
# The run fingerprint; training through the CLI.
# ---------------------------------------------------------------------------


class _Tok:
  sha256, vocab_size = "t", 10


def test_fingerprint_has_the_files_checksum_only_for_files(tmp_path):
  plain = provenance.fingerprint(dialogue.get_config("smoke"), _Tok, {})
  assert not any(k.startswith("dataset_files") for k in plain)  # old runs resume
  path = tmp_path / "d.jsonl"
  write_jsonl(path, RECORDS)
  fp = provenance.fingerprint(files_config(path), _Tok, {})
  assert fp["dataset_files_sha256"] == data_files.files_sha256(str(path))
  assert fp["dataset_files"]["prompt_field"] == "prompt"
  write_jsonl(path, RECORDS[:-1])
  with pytest.raises(ValueError, match=r"dataset_files_sha256: stored '[0-9a-f]{64}', now "
                                       r"'[0-9a-f]{64}'"):
    provenance.check_fingerprint(fp, provenance.fingerprint(files_config(path), _Tok, {}), "w")


def test_a_changed_training_file_refuses_the_resume(tmp_path):
  from test_frequency import make_texts
  texts = make_texts(80, 5)
  path = tmp_path / "train.jsonl"
  write_jsonl(path, [{"prompt": a, "target": b} for a, b in zip(texts[:40], texts[40:])])

  def config():
    c = tiny_config(num_steps=2, checkpoint_every=2, eval_every=100)
    c.dataset.name, c.dataset.train = "files", str(path)
    return c

  run_lib.train_and_evaluate(config(), str(tmp_path / "w"))
  assert ckpt_lib.manager(str(tmp_path / "w")).latest_step() == 2
  write_jsonl(path, [{"prompt": a, "target": b} for a, b in zip(texts[:40], texts[41:])])
  # The token stats, counted from the file as it was, are the first to refuse.
  with pytest.raises(ValueError, match=r"\(dataset_files_sha256: stored '[0-9a-f]+', now "
                                       r"'[0-9a-f]+'\).*resume=False"):
    run_lib.train_and_evaluate(config(), str(tmp_path / "w"))


def test_cli_finetunes_on_the_example_file(tmp_path):
  work = tmp_path / "run"
  cmd = [sys.executable, "-m", "pdl_jax.main",
         "--config=configs/summarization.py:smoke,dataset=files",
         "--config.dataset.train=examples/support_summaries.jsonl",
         f"--workdir={work}", "--config.mesh.data=1", "--config.num_steps=4",
         "--config.batch_size=8", "--config.log_every=2", "--config.checkpoint_every=4",
         "--config.eval_every=4", "--config.eval.num_examples=2",
         "--config.eval.batch_size=2", "--config.eval.max_new_tokens=4",
         "--config.tokenizer.vocab_size=200"]
  done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  log = done.stderr
  assert re.search(r"data: files train: 38 examples from examples/support_summaries\.jsonl "
                   r"\(1 file\), 2 of its 40 records held out", log), log
  assert "data: files validation: 2 examples" in log and "also in train" in log
  records = [json.loads(line) for line in open(work / "metrics.jsonl")]
  assert [r["step"] for r in records if "eval/nll" in r] == [4]
  meta = json.load(open(work / "checkpoints" / "4" / "meta" / "metadata"))
  assert meta["fingerprint"]["dataset_files_sha256"] == data_files.files_sha256(
      os.path.join(ROOT, "examples", "support_summaries.jsonl"))
  print("\n".join(line for line in log.splitlines() if line.startswith(("data:", "step",
                                                                         "eval"))))


def test_token_stats_of_an_earlier_version_of_the_file_are_refused(tmp_path):
  """A workdir with token stats but no checkpoint (a frequency pass): its counts were
  made from the file as it was; the stats' settings carry the file's checksum."""
  from pdl_jax.data import token_stats
  path = tmp_path / "d.jsonl"
  write_jsonl(path, RECORDS)
  before = token_stats.count_settings(run_lib.data_settings(files_config(path)))
  assert before["dataset_files_sha256"] == data_files.files_sha256(str(path))
  write_jsonl(path, RECORDS[:-1])
  assert token_stats.count_settings(run_lib.data_settings(files_config(path))) != before
  assert "dataset_files_sha256" not in token_stats.count_settings(run_lib.data_settings(dialogue.get_config("smoke")))

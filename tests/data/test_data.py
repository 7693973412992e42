"""Prefix-LM layout, loss mask, truncation, deterministic and restorable batches."""

import numpy as np
import pytest

from pdl_jax.data import examples as examples_lib
from pdl_jax.data import batches as batches_lib
from pdl_jax.tokenizers import sentencepiece as sp_tokenizer

from test_frequency import make_texts


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return sp_tokenizer.train(make_texts(1500, 0), str(tmp_path_factory.mktemp("t") / "m.model"), 100)


def test_layout_and_mask(tok):
  ex = examples_lib.encode_examples(["the man said"], ["no more"], tok, seq_len=20, max_target_len=10)
  p, t = tok.encode_batch(["the man said"])[0], tok.encode_batch(["no more"])[0]
  seq = p + [tok.sep_id] + t + [tok.eos_id]
  assert ex.seqs[0, :len(seq)].tolist() == seq
  assert (ex.seqs[0, len(seq):] == tok.pad_id).all()
  b = batches_lib.make_batch(ex, np.array([0]))
  assert b["inputs"][0].tolist() == ex.seqs[0, :-1].tolist()
  assert b["labels"][0].tolist() == ex.seqs[0, 1:].tolist()
  # Loss exactly on the target tokens and EOS as labels.
  labelled = b["labels"][0][b["loss_mask"][0] > 0].tolist()
  assert labelled == t + [tok.eos_id]


def test_truncation_and_empty_targets(tok):
  long_prompt = " ".join(["the man"] * 50)
  ex = examples_lib.encode_examples([long_prompt, "a", "b"], ["and so on " * 20, "", "  "], tok,
                          seq_len=16, max_target_len=5)
  assert len(ex) == 1 and ex.dropped_empty == 2 and ex.truncated == 1
  b = batches_lib.make_batch(ex, np.array([0]))
  # 5 target tokens and no EOS: the target was cut, it did not end there.
  assert int(b["loss_mask"].sum()) == 5 and ex.targets_truncated == 1
  assert tok.eos_id not in b["labels"][0][b["loss_mask"][0] > 0].tolist()
  assert ex.seqs[0, ex.target_start[0] - 1] == tok.sep_id
  assert ex.lengths[0] == 17  # full: one more prompt token where the EOS would be
  with pytest.raises(ValueError, match="seq_len must be >= 4.*got 3"):
    examples_lib.encode_examples(["a"], ["b"], tok, seq_len=3, max_target_len=2)


def test_batches_are_a_function_of_seed_and_step(tok):
  texts = make_texts(50, 3)
  ex = examples_lib.encode_examples(texts, texts, tok, seq_len=24, max_target_len=8)
  a, b = batches_lib.TrainBatches(ex, 8, seed=1), batches_lib.TrainBatches(ex, 8, seed=1)
  for step in (0, 5, 7, 3, 12):  # any order: a resumed run gets the same batch
    np.testing.assert_array_equal(a(step)["inputs"], b(step)["inputs"])
  epoch = np.concatenate([a.indices(s) for s in range(a.steps_per_epoch)])
  assert len(set(epoch.tolist())) == len(epoch) == 48  # no repeats; partial batch dropped
  assert not np.array_equal(a.indices(0), a.indices(a.steps_per_epoch))  # reshuffled
  assert not np.array_equal(a.indices(0), batches_lib.TrainBatches(ex, 8, seed=2).indices(0))
  # Two processes' parts make up the one-process batch.
  parts = [batches_lib.TrainBatches(ex, 8, seed=1, process_index=i, process_count=2) for i in (0, 1)]
  for step in (0, 9):
    np.testing.assert_array_equal(np.concatenate([p.indices(step) for p in parts]),
                                  a.indices(step))
  with pytest.raises(ValueError, match="fewer than the batch size 64"):
    batches_lib.TrainBatches(ex, 64, seed=0)


def test_eval_batches_pad_with_masked_rows(tok):
  texts = make_texts(5, 4)
  ex = examples_lib.encode_examples(texts, texts, tok, seq_len=24, max_target_len=8)
  batches = list(batches_lib.eval_batches(ex, 4))
  assert len(batches) == 2
  assert batches[1]["example_mask"].tolist() == [1, 0, 0, 0]
  assert batches[1]["loss_mask"][1:].sum() == 0


def _layout_by_loop(p_ids, sep_ids, t_ids, prefix, eos, pad, total, max_target_len):
  """The per-example layout loop encode_examples ran before it was vectorised."""
  seqs = np.full((len(p_ids), total), pad, np.int32)
  starts, lengths, truncated, targets_truncated = [], [], 0, 0
  for i, (p, sep, t) in enumerate(zip(p_ids, sep_ids, t_ids)):
    fixed = len(prefix) + len(sep)
    room_for_target = max(1, min(max_target_len, total - fixed - 2))
    cut_t = t[:room_for_target] if len(t) > room_for_target else t + [eos]
    room = total - fixed - len(cut_t)
    cut_p = p[-room:] if len(p) > room else p
    target_cut = len(t) > room_for_target
    targets_truncated += int(target_cut)
    truncated += int(len(cut_p) < len(p) or target_cut)
    seq = prefix + cut_p + sep + cut_t
    seqs[i, :len(seq)] = seq
    starts.append(len(prefix) + len(cut_p) + len(sep))
    lengths.append(len(seq))
  return seqs, np.array(starts), np.array(lengths), truncated, targets_truncated


@pytest.mark.parametrize("prefix", [[], [7, 8, 9]])
def test_vectorised_layout_equals_the_per_example_loop(prefix):
  r = np.random.default_rng(0)
  n = 300
  ids = lambda lo, hi: [r.integers(10, 99, r.integers(lo, hi)).tolist() for _ in range(n)]
  p_ids, t_ids = ids(0, 40), ids(1, 30)  # short and long prompts and targets
  sep_ids = [[3] if i % 3 else [3, 4] for i in range(n)]  # encode_parts: per example
  for total, max_target_len in ((33, 12), (17, 40), (64, 8)):
    got = examples_lib._layout(p_ids, sep_ids, t_ids, prefix=prefix, eos=2, pad=0, total=total,
                     max_target_len=max_target_len)
    want = _layout_by_loop(p_ids, sep_ids, t_ids, prefix, 2, 0, total, max_target_len)
    np.testing.assert_array_equal(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):
      np.testing.assert_array_equal(a, b)
    assert 0 < got[3] < n and 0 < got[4] <= got[3]  # both kinds of cut happen

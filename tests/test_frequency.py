"""Tokenizer and frequency pass: counts against collections.Counter, storage, errors."""

import collections
import os

import numpy as np
import pytest
import tensorflow as tf

from pdl_jax import frequency as F
from pdl_jax import loss as L
from pdl_jax import tokenizer as T

WORDS = ("the a of and to in is was he for it with as his on be at by i this had not "
         "are but from or have an they which one you were her all she there would "
         "their we him been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then "
         "do first any my now such like our over man me even most made after also "
         "did many before must through back years where much your way well down "
         "should because each just those people mr how too little state good very "
         "make world still own see men work long get here between both life being "
         "under never day same another know while last might us great old year off "
         "come since against go came right used take three").split()


def make_texts(n, seed):
  rng = np.random.default_rng(seed)
  p = 1.0 / np.arange(1, len(WORDS) + 1)
  p /= p.sum()
  return [" ".join(rng.choice(WORDS, rng.integers(3, 25), p=p)) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "spm.model")
  return T.train(make_texts(2000, 0), path, vocab_size=120, seed=0)


def dataset(n, seed=1):
  return tf.data.Dataset.from_tensor_slices(
      {"inputs": make_texts(n, seed + 100), "targets": make_texts(n, seed)})


def counter_reference(tok, texts, add_eos=True):
  c = collections.Counter()
  for t in texts:
    c.update(tok.encode_batch([t])[0])
    if add_eos:
      c[tok.eos_id] += 1
  out = np.zeros(tok.vocab_size, np.int64)
  for k, v in c.items():
    out[k] = v
  return out


def test_tokenizer_ids_hash_and_roundtrip(tokenizer, tmp_path):
  assert tokenizer.vocab_size == 120
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.unk_id) == (0, 1, 2, 3)
  assert tokenizer.sep_id == 4 and tokenizer.id_to_piece([4]) == ["<sep>"]
  texts = ["the man said no", "and then there were two"]
  assert tokenizer.decode_batch(tokenizer.encode_batch(texts)) == texts
  again = T.Tokenizer.load(tokenizer.path)
  assert again.sha256 == tokenizer.sha256 and len(again.sha256) == 64
  # Training is deterministic: same text and seed, same model.
  other = T.train(make_texts(2000, 0), str(tmp_path / "b.model"), vocab_size=120, seed=0)
  assert other.sha256 == tokenizer.sha256
  assert [p for p in os.listdir(tmp_path)] == ["b.model"]  # no temporary left


def test_load_or_train_reuses(tokenizer, tmp_path):
  path = str(tmp_path / "x.model")
  first = T.load_or_train(path, make_texts(500, 3), 60)
  second = T.load_or_train(path, None, 60)
  assert first.sha256 == second.sha256
  with pytest.raises(FileNotFoundError, match="nope.model"):
    T.Tokenizer.load(str(tmp_path / "nope.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="bad.model.*not a valid SentencePiece"):
    T.Tokenizer.load(str(bad))


@pytest.mark.parametrize("batch_size, fields", [(7, ("targets",)), (64, ("inputs", "targets"))])
def test_counts_equal_counter(tokenizer, batch_size, fields):
  n = 300
  stats = F.count_tokens(dataset(n), tokenizer, fields=fields, batch_size=batch_size,
                         dataset_name="toy", split="train", log=lambda _: None)
  texts = [t for f, seed in (("inputs", 101), ("targets", 1)) if f in fields
           for t in make_texts(n, seed)]
  want = counter_reference(tokenizer, texts)
  np.testing.assert_array_equal(stats.counts, want)
  assert stats.counts.dtype == np.int64
  assert stats.num_tokens == want.sum() and stats.num_examples == n
  assert (stats.dataset, stats.split, stats.fields) == ("toy", "train", tuple(fields))
  np.testing.assert_allclose(stats.weights(0.5), L.power_law_weights(want, 0.5))


def test_progress_lines(tokenizer):
  lines = []
  F.count_tokens(dataset(50), tokenizer, batch_size=10, progress_every_s=0.0,
                 log=lines.append)
  assert any("examples" in l and "tokens/s" in l for l in lines)
  assert "50 examples" in lines[-1]


def test_empty_dataset_and_missing_field(tokenizer):
  with pytest.raises(ValueError, match="toy.*train.*no examples"):
    F.count_tokens(dataset(10).take(0), tokenizer, dataset_name="toy", split="train",
                   log=lambda _: None)
  with pytest.raises(ValueError, match=r"\['summary'\] are not in the dataset"):
    F.count_tokens(dataset(10), tokenizer, fields=("summary",), log=lambda _: None)


def test_shards_sum_to_whole(tokenizer):
  ds = dataset(257)
  whole = F.count_tokens(ds, tokenizer, batch_size=32, log=lambda _: None)
  parts = [F.count_tokens(ds.shard(2, i), tokenizer, batch_size=32, log=lambda _: None)
           for i in range(2)]
  merged = parts[0].merge(parts[1])
  np.testing.assert_array_equal(merged.counts, whole.counts)
  assert merged.num_examples == 257 and merged.num_tokens == whole.num_tokens
  assert F.sum_across_processes(whole) is whole  # one process: no-op


def test_save_load_roundtrip_and_errors(tokenizer, tmp_path):
  stats = F.count_tokens(dataset(40), tokenizer, dataset_name="toy", split="train",
                         log=lambda _: None)
  path = stats.save(str(tmp_path))
  assert path == str(tmp_path / F.STATS_FILENAME)
  assert os.listdir(tmp_path) == [F.STATS_FILENAME]
  back = F.TokenStats.load(path)
  np.testing.assert_array_equal(back.counts, stats.counts)
  assert back.metadata() == stats.metadata()
  back.check_tokenizer(tokenizer)

  with pytest.raises(FileNotFoundError, match="missing.npz"):
    F.TokenStats.load(str(tmp_path / "missing.npz"))
  raw = open(path, "rb").read()
  truncated = tmp_path / "trunc.npz"
  truncated.write_bytes(raw[: len(raw) // 2])
  with pytest.raises(ValueError, match="trunc.npz.*corrupt or truncated"):
    F.TokenStats.load(str(truncated))
  # A consistent-looking file whose counts were altered fails the checksum.
  meta = stats.metadata()
  counts = stats.counts.copy()
  counts[5] += 1
  with pytest.raises(ValueError, match="corrupt.*checksum"):
    F.TokenStats.from_parts(counts, meta, "somewhere")


def test_tokenizer_mismatch_is_refused(tokenizer, tmp_path):
  stats = F.count_tokens(dataset(40), tokenizer, log=lambda _: None)
  other = T.train(make_texts(800, 9), str(tmp_path / "o.model"), vocab_size=120, seed=0)
  with pytest.raises(ValueError, match="sha256"):
    stats.check_tokenizer(other)
  smaller = T.train(make_texts(800, 9), str(tmp_path / "s.model"), vocab_size=90, seed=0)
  with pytest.raises(ValueError, match="vocab size 120.*has 90"):
    stats.check_tokenizer(smaller)


def test_load_or_count_reuses_and_checks(tokenizer, tmp_path):
  path = str(tmp_path / "ckpt" / F.STATS_FILENAME)
  calls = []

  def count():
    calls.append(1)
    return F.count_tokens(dataset(30), tokenizer, dataset_name="toy", split="train",
                          log=lambda _: None)

  first = F.load_or_count(path, tokenizer, count, dataset="toy", split="train",
                          fields=("targets",), log=lambda _: None)
  second = F.load_or_count(path, tokenizer, count, dataset="toy", split="train",
                           fields=("targets",), log=lambda _: None)
  assert len(calls) == 1
  np.testing.assert_array_equal(first.counts, second.counts)
  with pytest.raises(ValueError, match="split 'train'.*'validation'"):
    F.load_or_count(path, tokenizer, count, split="validation", log=lambda _: None)
  other = T.train(make_texts(800, 9), str(tmp_path / "o.model"), vocab_size=120, seed=0)
  with pytest.raises(ValueError, match="sha256"):
    F.load_or_count(path, other, count, log=lambda _: None)


def test_most_and_least_frequent_table(tokenizer):
  stats = F.count_tokens(dataset(100), tokenizer, log=lambda _: None)
  w = stats.weights(1.0)
  table = F.most_and_least_frequent(stats, tokenizer, 3, w)
  top = int(np.argmax(stats.counts))
  assert tokenizer.id_to_piece([top])[0] in table.splitlines()[2]
  assert "most frequent" in table and "least frequent" in table


def test_count_split_reads_a_tfds_split(tokenizer):
  import tensorflow_datasets as tfds

  import pdl_jax.datasets  # noqa: F401
  with tfds.testing.mock_data(num_examples=30, policy=tfds.testing.MockPolicy.USE_CODE):
    stats = F.count_split("shakespeare_dialogue", "train", tokenizer, log=lambda _: None)
    ds = tfds.load("shakespeare_dialogue", split="train")
    texts = [ex["targets"].decode() for ex in tfds.as_numpy(ds)]
  np.testing.assert_array_equal(stats.counts, counter_reference(tokenizer, texts))
  assert (stats.dataset, stats.split, stats.num_examples) == ("shakespeare_dialogue", "train", 30)

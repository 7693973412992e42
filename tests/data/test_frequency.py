"""Tokenizer and frequency pass: counts of the loss's tokens against
collections.Counter, the stored weights, storage, errors."""

import collections
import os

import numpy as np
import pytest

from pdl_jax.data import batches as batches_lib
from pdl_jax.data import examples as examples_lib
from pdl_jax.data import token_stats
from pdl_jax.losses import weights as loss_weights
from pdl_jax.tokenizers import sentencepiece as sp_tokenizer
from pdl_jax.losses import pdl
from pdl_jax.losses import registry

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
  return sp_tokenizer.train(make_texts(2000, 0), path, vocab_size=120, seed=0)


def examples(tok, n, seed=1, max_target_len=12, seq_len=40):
  return examples_lib.encode_examples(make_texts(n, seed + 100), make_texts(n, seed), tok,
                           seq_len=seq_len, max_target_len=max_target_len)


def counter_reference(tok, targets, max_target_len):
  """Counter over what the loss sees: each target cut to max_target_len tokens, EOS
  only after a target that was not cut."""
  c = collections.Counter()
  for t in targets:
    ids = tok.encode_batch([t])[0]
    c.update(ids[:max_target_len])
    if len(ids) <= max_target_len:
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
  again = sp_tokenizer.SentencePieceTokenizer.load(tokenizer.path)
  assert again.sha256 == tokenizer.sha256 and len(again.sha256) == 64
  # Training is deterministic: same text and seed, same model.
  other = sp_tokenizer.train(make_texts(2000, 0), str(tmp_path / "b.model"), vocab_size=120, seed=0)
  assert other.sha256 == tokenizer.sha256
  assert [p for p in os.listdir(tmp_path)] == ["b.model"]  # no temporary left


def test_load_or_train_reuses(tokenizer, tmp_path):
  path = str(tmp_path / "x.model")
  first = sp_tokenizer.load_or_train(path, make_texts(500, 3), 60)
  second = sp_tokenizer.load_or_train(path, None, 60)
  assert first.sha256 == second.sha256
  with pytest.raises(FileNotFoundError, match="nope.model"):
    sp_tokenizer.SentencePieceTokenizer.load(str(tmp_path / "nope.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="bad.model.*not a valid SentencePiece"):
    sp_tokenizer.SentencePieceTokenizer.load(str(bad))


@pytest.mark.parametrize("max_target_len", [4, 12, 30])
def test_counts_are_the_loss_tokens(tokenizer, max_target_len):
  n = 300
  ex = examples(tokenizer, n, max_target_len=max_target_len, seq_len=48)
  stats = token_stats.count_examples(ex, tokenizer, dataset_name="toy", split="train")
  want = counter_reference(tokenizer, make_texts(n, 1), max_target_len)
  np.testing.assert_array_equal(stats.counts, want)
  assert stats.counts.dtype == np.int64
  assert stats.num_tokens == want.sum() and stats.num_examples == n
  assert (stats.dataset, stats.split, stats.fields) == ("toy", "train", ("targets",))
  np.testing.assert_allclose(pdl.power_law_weights(stats.counts, 0.5), pdl.power_law_weights(want, 0.5))
  # The same tokens as the loss mask of the batches.
  b = batches_lib.make_batch(ex, np.arange(n))
  np.testing.assert_array_equal(
      np.bincount(b["labels"][b["loss_mask"] > 0], minlength=tokenizer.vocab_size), want)


def test_truncated_targets_get_no_eos(tokenizer):
  ex = examples_lib.encode_examples(["a b"] * 2, ["the man said no more to me", "no"], tokenizer,
                         seq_len=40, max_target_len=3)
  assert ex.targets_truncated == 1
  b = batches_lib.make_batch(ex, np.arange(2))
  first = b["labels"][0][b["loss_mask"][0] > 0].tolist()
  assert len(first) == 3 and tokenizer.eos_id not in first
  second = b["labels"][1][b["loss_mask"][1] > 0].tolist()
  assert second[-1] == tokenizer.eos_id


def test_empty_examples(tokenizer):
  ex = examples(tokenizer, 3)
  empty = examples_lib.Examples(ex.seqs[:0], ex.target_start[:0], ex.lengths[:0], [], [], 0, 0)
  with pytest.raises(ValueError, match="toy.*train.*no examples"):
    token_stats.count_examples(empty, tokenizer, dataset_name="toy", split="train")


def test_process_shards_sum_to_whole(tokenizer):
  ex = examples(tokenizer, 257)
  whole = token_stats.count_examples(ex, tokenizer)
  parts = [token_stats.count_examples(ex, tokenizer, process_index=i, process_count=2) for i in range(2)]
  merged = parts[0].merge(parts[1])
  np.testing.assert_array_equal(merged.counts, whole.counts)
  assert merged.num_examples == 257 and merged.num_tokens == whole.num_tokens
  assert token_stats.sum_across_processes(whole) is whole  # one process: no-op


def test_save_load_roundtrip_and_errors(tokenizer, tmp_path):
  stats = token_stats.count_examples(examples(tokenizer, 40), tokenizer, dataset_name="toy",
                             split="train")
  path = stats.save(str(tmp_path))
  assert path == str(tmp_path / token_stats.STATS_FILENAME)
  assert os.listdir(tmp_path) == [token_stats.STATS_FILENAME]
  back = token_stats.TokenStats.load(path)
  np.testing.assert_array_equal(back.counts, stats.counts)
  assert back.metadata() == stats.metadata()
  back.check_tokenizer(tokenizer)

  with pytest.raises(FileNotFoundError, match="missing.npz"):
    token_stats.TokenStats.load(str(tmp_path / "missing.npz"))
  raw = open(path, "rb").read()
  truncated = tmp_path / "trunc.npz"
  truncated.write_bytes(raw[: len(raw) // 2])
  with pytest.raises(ValueError, match="trunc.npz.*corrupt or truncated"):
    token_stats.TokenStats.load(str(truncated))
  # A consistent-looking file whose counts were altered fails the checksum.
  meta = stats.metadata()
  counts = stats.counts.copy()
  counts[5] += 1
  with pytest.raises(ValueError, match="corrupt.*checksum"):
    token_stats.TokenStats.from_parts(counts, meta, "somewhere")


def test_tokenizer_mismatch_is_refused(tokenizer, tmp_path):
  stats = token_stats.count_examples(examples(tokenizer, 40), tokenizer)
  other = sp_tokenizer.train(make_texts(800, 9), str(tmp_path / "o.model"), vocab_size=120, seed=0)
  with pytest.raises(ValueError, match="sha256"):
    stats.check_tokenizer(other)
  smaller = sp_tokenizer.train(make_texts(800, 9), str(tmp_path / "s.model"), vocab_size=90, seed=0)
  with pytest.raises(ValueError, match="vocab size 120.*has 90"):
    stats.check_tokenizer(smaller)


def test_load_or_count_reuses_and_checks(tokenizer, tmp_path):
  path = str(tmp_path / "ckpt" / token_stats.STATS_FILENAME)
  calls = []

  def count():
    calls.append(1)
    return token_stats.count_examples(examples(tokenizer, 30), tokenizer, dataset_name="toy",
                            split="train")

  first = token_stats.load_or_count(path, tokenizer, count, dataset="toy", split="train",
                          fields=("targets",), log=lambda _: None)
  second = token_stats.load_or_count(path, tokenizer, count, dataset="toy", split="train",
                           fields=("targets",), log=lambda _: None)
  assert len(calls) == 1
  np.testing.assert_array_equal(first.counts, second.counts)
  with pytest.raises(ValueError, match="split 'train'.*'validation'"):
    token_stats.load_or_count(path, tokenizer, count, split="validation", log=lambda _: None)
  other = sp_tokenizer.train(make_texts(800, 9), str(tmp_path / "o.model"), vocab_size=120, seed=0)
  with pytest.raises(ValueError, match="sha256"):
    token_stats.load_or_count(path, other, count, log=lambda _: None)


def test_most_and_least_frequent_table(tokenizer):
  stats = token_stats.count_examples(examples(tokenizer, 100), tokenizer)
  w = pdl.power_law_weights(stats.counts, 1.0)
  table = token_stats.most_and_least_frequent(stats, tokenizer, 3, w)
  top = int(np.argmax(stats.counts))
  assert tokenizer.id_to_piece([top])[0] in table.splitlines()[2]
  assert "most frequent" in table and "least frequent" in table


class _Cfg:
  """The loss section of a config, as weight_settings reads it."""

  def __init__(self, **kw):
    import ml_collections
    self.loss = ml_collections.ConfigDict({
        **dict(name="pdl", alpha=0.5, epsilon=None, frequency="relative", normalize=True,
               max_weight=None, eos_weight=None, itf_lambda=0.4, tlat_A=None, tlat_T=1.0),
        **kw})


def test_weights_file_roundtrip_and_resume_checks(tokenizer, tmp_path):
  stats = token_stats.count_examples(examples(tokenizer, 60), tokenizer, dataset_name="toy",
                           split="train")
  path = str(tmp_path / loss_weights.WEIGHTS_FILENAME)
  w = loss_weights.load_or_save_weights(path, _Cfg().loss, stats, eos_id=1)
  stored, meta = loss_weights.load_weights(path)
  # The exact float32 array the run trains with, and what made it.
  assert stored.dtype == np.float32
  np.testing.assert_array_equal(stored, w)
  np.testing.assert_array_equal(stored, pdl.power_law_weights(stats.counts, 0.5))
  assert meta["settings"] == {"loss": "pdl", "alpha": 0.5, "epsilon": None,
                              "frequency": "relative", "normalize": True, "max_weight": None,
                              "eos_weight": None}
  assert meta["counts_sha256"] == stats.metadata()["counts_sha256"]
  np.testing.assert_array_equal(loss_weights.load_or_save_weights(path, _Cfg().loss, stats, eos_id=1), w)
  # Other settings, or other counts: refused, every difference listed.
  with pytest.raises(ValueError, match="alpha: stored 0.5, now 1.0.*max_weight: stored "
                                       "None, now 3.0"):
    loss_weights.load_or_save_weights(path, _Cfg(alpha=1.0, max_weight=3.0).loss, stats, eos_id=1)
  other = token_stats.count_examples(examples(tokenizer, 61), tokenizer, dataset_name="toy",
                           split="train")
  with pytest.raises(ValueError, match="other token counts"):
    loss_weights.load_or_save_weights(path, _Cfg().loss, other, eos_id=1)
  # A file whose weights were altered fails its checksum.
  loss_weights.save_weights(path, w, registry.weight_settings(_Cfg().loss), stats)
  raw = bytearray(open(path, "rb").read())
  data = np.load(path)
  assert data["weights"].size == w.size
  tampered = tmp_path / "t.npz"
  import io
  buf = io.BytesIO()
  np.savez(buf, weights=w * 2, meta=data["meta"])
  tampered.write_bytes(buf.getvalue())
  with pytest.raises(ValueError, match="t.npz.*checksum"):
    loss_weights.load_weights(str(tampered))
  trunc = tmp_path / "trunc.npz"
  trunc.write_bytes(bytes(raw[: len(raw) // 2]))
  with pytest.raises(ValueError, match="corrupt or truncated"):
    loss_weights.load_weights(str(trunc))


def test_weights_per_loss_and_eos_weight(tokenizer):
  from pdl_jax.losses import baselines
  stats = token_stats.count_examples(examples(tokenizer, 60), tokenizer)
  eos = tokenizer.eos_id
  np.testing.assert_array_equal(loss_weights.loss_weights(_Cfg(name="itf").loss, stats, eos),
                                baselines.itf_weights(stats.counts, 0.4))
  np.testing.assert_array_equal(loss_weights.loss_weights(_Cfg(name="tlat_chi2").loss, stats, eos),
                                baselines.tlat_weights(stats.counts, "chi2", None, 1.0))
  for name in ("ce", "face", "focal", "unlikelihood", "label_smoothing"):
    np.testing.assert_array_equal(loss_weights.loss_weights(_Cfg(name=name).loss, stats, eos),
                                  np.ones(stats.vocab_size, np.float32))
  assert registry.weight_settings(_Cfg(name="itf").loss) == {"loss": "itf", "itf_lambda": 0.4,
                                                 "eos_weight": None}
  # EOS at the weight of an average corpus token: mean over tokens of w is 1 after
  # normalisation, so EOS gets 1, and every other token keeps its weight.
  w = loss_weights.loss_weights(_Cfg(eos_weight=1.0).loss, stats, eos)
  base = loss_weights.loss_weights(_Cfg().loss, stats, eos)
  assert w[eos] == pytest.approx(1.0, rel=1e-6)
  np.testing.assert_array_equal(np.delete(w, eos), np.delete(base, eos))
  assert base[eos] < 0.9  # EOS is frequent: PDL down-weights it by default

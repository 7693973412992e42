"""pdl_jax.baselines (and the loss registry) against independent float64 numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdl_jax import losses
from pdl_jax.losses import baselines
from pdl_jax.losses import chunked as chunked_loss
from pdl_jax.losses import pdl
from pdl_jax.losses import registry


# ---------------------------------------------------------------------------
# Independent numpy references (float64), written from the papers' formulas.
# ---------------------------------------------------------------------------


def np_logp(logits):
  x = np.asarray(logits, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_valid(labels, mask, vocab):
  return (mask > 0) & (labels >= 0) & (labels < vocab)


def np_nll(logits, labels):
  logp = np_logp(logits)
  safe = np.where((labels >= 0) & (labels < logits.shape[-1]), labels, 0)
  return -np.take_along_axis(logp, safe[..., None], -1)[..., 0]


def np_weighted(logits, labels, w, mask, reduction):
  on = np_valid(labels, mask, logits.shape[-1])
  m = np.where(on, mask, 0.0)
  tw = m * np.asarray(w, np.float64)[np.where(on, labels, 0)]
  den = tw.sum() if reduction == "weights" else m.sum()
  return (tw * np_nll(logits, labels)).sum() / den


def np_unlikelihood(logits, labels, mask, alpha):
  """Per-row loop: C_t = set of earlier target labels of the row, minus y_t."""
  on = np_valid(labels, mask, logits.shape[-1])
  p = np.exp(np_logp(logits))
  nll = np_nll(logits, labels)
  total, count = 0.0, 0.0
  for b in range(labels.shape[0]):
    for t in range(labels.shape[1]):
      if not on[b, t]:
        continue
      cands = {labels[b, s] for s in range(t) if on[b, s]} - {labels[b, t]}
      ul = sum(-np.log(max(1.0 - p[b, t, c], 1e-5)) for c in cands)
      total += mask[b, t] * (nll[b, t] + alpha * ul)
      count += mask[b, t]
  return total / count


def np_focal(logits, labels, mask, gamma):
  on = np_valid(labels, mask, logits.shape[-1])
  m = np.where(on, mask, 0.0)
  nll = np_nll(logits, labels)
  return (m * (1 - np.exp(-nll)) ** gamma * nll).sum() / m.sum()


def np_label_smoothing(logits, labels, mask, eps):
  on = np_valid(labels, mask, logits.shape[-1])
  m = np.where(on, mask, 0.0)
  per = (1 - eps) * np_nll(logits, labels) + eps * (-np_logp(logits)).mean(-1)
  return (m * per).sum() / m.sum()


def np_itf(counts, lam):
  return 1.0 / np.maximum(np.asarray(counts, np.float64), 1.0) ** lam


def np_tlat(counts, kind, A=None, T=1.0):
  counts = np.asarray(counts, np.float64)
  seen = np.sort(counts[counts > 0])
  n = len(seen)
  median = seen[n // 2] if n % 2 else 0.5 * (seen[n // 2 - 1] + seen[n // 2])
  x = counts / median
  f = np.exp(-T * x) * (x ** 2 if kind == "chi2" else 1.0)
  if A is None:  # normalised over the seen tokens (the code's dictionary), capped at e
    return np.minimum((math.e - 1) * f / f[counts > 0].max() + 1, math.e)
  return A * f + 1


def np_face_weights(counts):
  counts = np.asarray(counts, np.float64)
  rf = counts / counts.sum()
  w = 1 - rf / rf.max()
  return w * len(w) / w.sum()


def random_case(seed, shape=(3, 6), vocab=11, scale=2.0, mask_p=0.3):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, scale, shape + (vocab,)).astype(np.float32)
  # Few distinct labels so unlikelihood candidates repeat.
  labels = rng.integers(0, min(vocab, 6), shape).astype(np.int32)
  mask = (rng.random(shape) > mask_p).astype(np.float32)
  mask.reshape(-1)[0] = 1.0
  labels.reshape(-1)[-1] = -100  # an invalid label counts as masked
  counts = rng.zipf(1.3, vocab).astype(np.int64)
  counts[rng.random(vocab) < 0.2] = 0
  counts[0] = max(counts[0], 1)
  return logits, labels, mask, counts


def weights_for(name, counts):
  if name == "itf":
    return baselines.itf_weights(counts, 0.4)
  if name in ("tlat_exp", "tlat_chi2"):
    return baselines.tlat_weights(counts, name[5:])
  if name == "face":
    return np.asarray(baselines.face_weights(jnp.asarray(counts, jnp.int32)))
  if name == "pdl":
    return pdl.power_law_weights(counts, 0.7)
  return np.ones(len(counts), np.float32)


# (name, params, numpy reference(logits, labels, mask, weights))
LOSSES = [
    ("itf", {}, lambda lg, lb, m, w: np_weighted(lg, lb, w, m, "tokens")),
    ("face", {}, lambda lg, lb, m, w: np_weighted(lg, lb, w, m, "tokens")),
    ("tlat_exp", {}, lambda lg, lb, m, w: np_weighted(lg, lb, w, m, "tokens")),
    ("tlat_chi2", {"reduction": "weights"},
     lambda lg, lb, m, w: np_weighted(lg, lb, w, m, "weights")),
    ("pdl", {"reduction": "tokens"}, lambda lg, lb, m, w: np_weighted(lg, lb, w, m, "tokens")),
    ("unlikelihood", {"ul_alpha": 0.7}, lambda lg, lb, m, w: np_unlikelihood(lg, lb, m, 0.7)),
    ("focal", {"gamma": 2.0}, lambda lg, lb, m, w: np_focal(lg, lb, m, 2.0)),
    ("focal", {"gamma": 0.5}, lambda lg, lb, m, w: np_focal(lg, lb, m, 0.5)),
    ("label_smoothing", {"smoothing": 0.2},
     lambda lg, lb, m, w: np_label_smoothing(lg, lb, m, 0.2)),
]
IDS = [f"{n}-{p}" for n, p, _ in LOSSES]


# ---------------------------------------------------------------------------
# Every loss: value and gradient against the numpy reference.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, params, ref", LOSSES, ids=IDS)
def test_value_and_finite_difference_gradient(name, params, ref):
  logits, labels, mask, counts = random_case(sum(map(ord, name)))
  w = weights_for(name, counts)
  fn = losses.get_loss(name, **params)
  f = lambda x: fn(x, jnp.asarray(labels), jnp.asarray(w), mask=jnp.asarray(mask))
  (value, aux), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logits))
  assert value.dtype == jnp.float32
  assert float(value) == pytest.approx(ref(logits, labels, mask, w), rel=2e-5)
  # aux.nll is always the plain masked mean NLL.
  ones = np.ones_like(w)
  assert float(aux.nll) == pytest.approx(np_weighted(logits, labels, ones, mask, "tokens"),
                                         rel=2e-5)
  # Central differences of the float64 reference, every logit.
  h = 1e-6
  x = logits.astype(np.float64)
  fd = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[idx] += h
    down[idx] -= h
    fd[idx] = (ref(up, labels, mask, w) - ref(down, labels, mask, w)) / (2 * h)
  np.testing.assert_allclose(np.asarray(grad), fd, rtol=1e-3, atol=2e-6)


@pytest.mark.parametrize("name", registry.LOSS_NAMES)
def test_all_masked_is_zero_with_zero_grads_and_bf16_accumulates(name):
  logits, labels, _, counts = random_case(3)
  fn = losses.get_loss(name)
  w = jnp.asarray(weights_for(name, counts))
  f = jax.value_and_grad(lambda x, m: fn(x, jnp.asarray(labels), w, mask=m)[0])
  value, grad = f(jnp.asarray(logits), jnp.zeros(labels.shape))
  assert float(value) == 0.0
  np.testing.assert_array_equal(np.asarray(grad), 0.0)
  bf = jnp.asarray(logits, jnp.bfloat16)
  value, grad = f(bf, jnp.ones(labels.shape))
  want, _ = f(bf.astype(jnp.float32), jnp.ones(labels.shape))
  assert value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
  assert float(value) == pytest.approx(float(want), rel=1e-6)
  assert bool(jnp.all(jnp.isfinite(grad)))


@pytest.mark.parametrize("name, params", [("unlikelihood", {"ul_alpha": 0.0}),
                                          ("focal", {"gamma": 0.0}),
                                          ("label_smoothing", {"smoothing": 0.0}),
                                          ("itf", {"reduction": "weights"})])
def test_degenerate_settings_equal_cross_entropy(name, params):
  logits, labels, mask, _ = random_case(4)
  args = (jnp.asarray(logits), jnp.asarray(labels), jnp.ones(11, jnp.float32))
  got, _ = losses.get_loss(name, **params)(*args, mask=jnp.asarray(mask))
  want, _ = losses.get_loss("ce")(*args, mask=jnp.asarray(mask))
  assert float(got) == pytest.approx(float(want), rel=1e-6)


# ---------------------------------------------------------------------------
# Reduction.
# ---------------------------------------------------------------------------


def test_reduction_both_ways_and_scale():
  logits, labels, mask, counts = random_case(5)
  w = baselines.itf_weights(counts, 0.5)
  args = (jnp.asarray(logits), jnp.asarray(labels))
  m = jnp.asarray(mask)
  for reduction in pdl.REDUCTIONS:
    fn = losses.get_loss("itf", reduction=reduction)
    got, aux = fn(*args, jnp.asarray(w), mask=m)
    assert float(got) == pytest.approx(np_weighted(logits, labels, w, mask, reduction),
                                       rel=1e-5)
    got3, _ = fn(*args, jnp.asarray(3 * w), mask=m)
    # "weights": the scale cancels; "tokens": it multiplies the loss.
    factor = 1.0 if reduction == "weights" else 3.0
    assert float(got3) == pytest.approx(factor * float(got), rel=1e-5)
    num = float(got) * float(pdl.loss_denominator(aux, reduction))
    on = np_valid(labels, mask, 11)
    assert num == pytest.approx(
        (np.where(on, mask * w[np.where(on, labels, 0)], 0) * np_nll(logits, labels)).sum(),
        rel=1e-5)
  # Paper defaults: PDL by the weights, the baselines by token count.
  assert [registry.resolve_reduction(n) for n in registry.WEIGHTED_LOSSES] == [
      "weights", "tokens", "tokens", "tokens", "tokens"]
  assert registry.resolve_reduction("focal", "weights") == "tokens"


# ---------------------------------------------------------------------------
# Static weights: ITF, TLAT; EOS weight.
# ---------------------------------------------------------------------------


def test_itf_weights_formula_unseen_and_unnormalised():
  counts = np.array([0, 1, 4, 100, 12345])
  for lam in (0.0, 0.4, 1.0):
    w = baselines.itf_weights(counts, lam)
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, np_itf(counts, lam), rtol=1e-6)
  w = baselines.itf_weights(counts, 1.0)
  assert w[0] == w[1] == 1.0 and w[2] == 0.25  # unseen weighs like a singleton


@pytest.mark.parametrize("kind", baselines.TLAT_KINDS)
def test_tlat_weights_formula_and_range(kind):
  rng = np.random.default_rng(0)
  counts = rng.zipf(1.5, 501)
  counts[:20] = 0
  w = baselines.tlat_weights(counts, kind)
  np.testing.assert_allclose(w, np_tlat(counts, kind), rtol=1e-6)
  assert w.min() >= 1.0 and w.max() == pytest.approx(math.e, rel=1e-6)
  # Frequent tokens weigh about 1; the unseen get e (exp) or 1 (chi2); the heaviest
  # seen token weighs e.
  assert w[np.argmax(counts)] == pytest.approx(1.0, abs=1e-6)
  assert w[0] == pytest.approx(math.e if kind == "exp" else 1.0, rel=1e-6)
  assert w[20:].max() == pytest.approx(math.e, rel=1e-6)
  if kind == "exp":  # the rarest seen token
    assert w[20:][np.argmin(counts[20:])] == pytest.approx(math.e, rel=1e-6)
  np.testing.assert_allclose(baselines.tlat_weights(counts, kind, A=0.5, T=2.0),
                             np_tlat(counts, kind, 0.5, 2.0), rtol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: baselines.itf_weights([1, 2], -0.1), r"lam \(itf_lambda\).*-0.1"),
    (lambda: baselines.itf_weights([0, 0], 1.0), "all zero"),
    (lambda: baselines.tlat_weights([1, 2], "gauss"), "kind.*'gauss'"),
    (lambda: baselines.tlat_weights([1, 2], "exp", T=0.0), r"T \(tlat_T\).*0.0"),
    (lambda: baselines.tlat_weights([1, 2], "exp", A=-1.0), r"A \(tlat_A\).*-1.0"),
    (lambda: baselines.tlat_weights([[1, 2]], "exp"), r"1-D.*\(1, 2\)"),
])
def test_weight_builders_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_fix_token_weight_numpy_jax_and_mean_relative():
  counts = np.array([10, 0, 5, 85])
  w = baselines.itf_weights(counts, 1.0)
  got = pdl.fix_token_weight(w, 2, 1.5)
  assert isinstance(got, np.ndarray) and got.dtype == np.float32
  np.testing.assert_array_equal(got, np.where(np.arange(4) == 2, 1.5, w).astype(np.float32))
  assert w[2] != 1.5  # a copy
  # With counts: 1 = the mean weight of a corpus token.
  mean = (counts * w.astype(np.float64)).sum() / counts.sum()
  rel = pdl.fix_token_weight(w, 2, 2.0, counts_V=counts)
  assert rel[2] == pytest.approx(2.0 * mean, rel=1e-6)
  # PDL's normalised weights: both ways agree.
  pw = pdl.power_law_weights(counts, 1.0)
  assert pdl.fix_token_weight(pw, 3, 1.0, counts_V=counts)[3] == pytest.approx(1.0, rel=1e-6)
  # Inside jit, after FACE's weights.
  f = jax.jit(lambda c: pdl.fix_token_weight(baselines.face_weights(c), 0, 1.0))
  out = f(jnp.array([7, 1, 0, 2], jnp.int32))
  assert isinstance(out, jax.Array) and float(out[0]) == 1.0
  np.testing.assert_allclose(np.asarray(out)[1:], np_face_weights([7, 1, 0, 2])[1:],
                             rtol=1e-6)
  # The fixed weight reaches the loss.
  logits, labels, mask, _ = random_case(6, vocab=4)
  labels = np.where(labels >= 0, labels % 4, labels)
  w2 = pdl.fix_token_weight(pw, 2, 0.0)
  got, _ = losses.get_loss("pdl")(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(w2),
                             mask=jnp.asarray(mask))
  assert float(got) == pytest.approx(np_weighted(logits, labels, w2, mask, "weights"),
                                     rel=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(token_id=4), r"token_id must be in \[0, 4\); got 4"),
    (dict(token_id=-1), r"got -1"),
    (dict(value=-0.5), "value.*-0.5"),
    (dict(value=float("inf")), "value.*inf"),
    (dict(counts_V=np.ones(5)), r"counts length \(5\).*\(4\)"),
])
def test_fix_token_weight_bad_input(kwargs, match):
  args = dict(weights_V=np.ones(4, np.float32), token_id=1, value=1.0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    pdl.fix_token_weight(**args)


# ---------------------------------------------------------------------------
# FACE: counts and weights over several steps against a numpy simulation.
# ---------------------------------------------------------------------------


def test_face_counts_and_weights_over_steps_match_simulation():
  vocab = 9
  counts = jnp.zeros(vocab, jnp.int32)
  np_counts = np.zeros(vocab, np.int64)
  np.testing.assert_array_equal(np.asarray(baselines.face_weights(counts)), 1.0)  # start: CE
  update = baselines.face_count_update
  fn = losses.get_loss("face")
  for step in range(5):
    logits, labels, mask, _ = random_case(10 + step, shape=(4, 5), vocab=vocab, scale=1.0)
    # Skew predictions towards token 2 so the weights become uneven.
    logits[..., 2] += 1.0
    # FACE's order: update with this batch's predictions, then weight this batch.
    counts = update(counts, jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    preds = logits.argmax(-1)
    for idx in np.ndindex(labels.shape):
      if mask[idx] > 0 and 0 <= labels[idx] < vocab:
        np_counts[preds[idx]] += 1
    assert counts.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(counts), np_counts)
    w = baselines.face_weights(counts)
    np.testing.assert_allclose(np.asarray(w), np_face_weights(np_counts), rtol=1e-5,
                               atol=1e-6)
    assert float(jnp.mean(w)) == pytest.approx(1.0, rel=1e-5)
    assert float(w[np.argmax(np_counts)]) == 0.0
    got, _ = fn(jnp.asarray(logits), jnp.asarray(labels), w, mask=jnp.asarray(mask))
    assert float(got) == pytest.approx(
        np_weighted(logits, labels, np_face_weights(np_counts), mask, "tokens"), rel=1e-5)


def test_face_edge_cases():
  # All counts equal: every raw weight would be 0; ones instead.
  np.testing.assert_array_equal(np.asarray(baselines.face_weights(jnp.full(5, 3, jnp.int32))), 1.0)
  # Saturates instead of wrapping.
  big = jnp.full(3, np.iinfo(np.int32).max - 1, jnp.int32)
  out = baselines.face_count_update(big, jnp.zeros((4, 3)).at[:, 0].set(1.0),
                            jnp.zeros(4, jnp.int32))
  assert int(out[0]) == np.iinfo(np.int32).max and int(out[1]) == int(big[1])
  with pytest.raises(ValueError, match="int32; got dtype float32"):
    baselines.face_count_update(jnp.zeros(3), jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32))
  with pytest.raises(ValueError, match=r"last axis \(3\).*\(5\)"):
    baselines.face_count_update(jnp.zeros(5, jnp.int32), jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32))


# ---------------------------------------------------------------------------
# Unlikelihood: candidates from the same sequence only.
# ---------------------------------------------------------------------------


def test_unlikelihood_candidates_stay_in_their_row():
  vocab = 8
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 1, (2, 4, vocab)).astype(np.float32)
  logits[1, :, 5] = 4.0  # row 1 strongly predicts token 5
  # Row 0 holds 5 early; row 1 never has 5 as a label. Leaking candidates across
  # rows would penalise p(5) in row 1 and raise its loss by a lot.
  labels = np.array([[5, 1, 2, 3], [0, 1, 2, 3]], np.int32)
  mask = np.ones((2, 4), np.float32)
  fn = losses.get_loss("unlikelihood", ul_alpha=1.0)
  both, _ = fn(jnp.asarray(logits), jnp.asarray(labels), None, mask=jnp.asarray(mask))
  row = [float(fn(jnp.asarray(logits[i:i + 1]), jnp.asarray(labels[i:i + 1]), None)[0])
         for i in range(2)]
  assert float(both) == pytest.approx(np.mean(row), rel=1e-6)
  assert float(both) == pytest.approx(np_unlikelihood(logits, labels, mask, 1.0), rel=1e-5)
  # The flattened-batch version (the authors' code) differs.
  flat = np_unlikelihood(logits.reshape(1, 8, vocab), labels.reshape(1, 8),
                         mask.reshape(1, 8), 1.0)
  assert abs(flat - float(both)) > 0.1
  # Row 1's first position has no candidates (row 0's 5 would be one if leaked): its
  # gradient is CE's alone, p - onehot over the 8 tokens.
  g = jax.grad(lambda x: fn(x, jnp.asarray(labels), None, mask=jnp.asarray(mask))[0])(
      jnp.asarray(logits))
  p = np.exp(np_logp(logits))
  np.testing.assert_allclose(np.asarray(g)[1, 0], (p[1, 0] - np.eye(vocab)[0]) / 8,
                             rtol=1e-5, atol=1e-7)


def test_unlikelihood_candidates_are_distinct_earlier_targets():
  vocab = 6
  logits = np.random.default_rng(1).normal(0, 1, (1, 6, vocab)).astype(np.float32)
  # Position 0 is a prompt token (masked): never a candidate. Token 2 repeats:
  # counted once. The current label is never its own candidate.
  labels = np.array([[4, 2, 2, 3, 2, 1]], np.int32)
  mask = np.array([[0, 1, 1, 1, 1, 1]], np.float32)
  got, _ = losses.get_loss("unlikelihood")(jnp.asarray(logits), jnp.asarray(labels), None,
                                      mask=jnp.asarray(mask))
  p = np.exp(np_logp(logits))[0]
  nll = np_nll(logits, labels)[0]
  ul = {1: [], 2: [], 3: [2], 4: [3], 5: [2, 3]}
  want = np.mean([nll[t] - sum(np.log(1 - p[t, c]) for c in ul[t]) for t in range(1, 6)])
  assert float(got) == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------
# Registry and chunked path.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("call, match", [
    (lambda: losses.get_loss("focal", smoothing=0.1), r"'focal' takes.*\('gamma',\).*smoothing"),
    (lambda: losses.get_loss("ce", reduction="tokens"), "'ce' takes"),
    (lambda: losses.get_loss("itf", reduction="mean"), "reduction.*'mean'"),
    (lambda: losses.get_loss("focal", gamma=-1.0), "gamma.*-1.0"),
    (lambda: losses.get_loss("unlikelihood", ul_alpha=float("nan")), "ul_alpha.*nan"),
    (lambda: losses.get_loss("label_smoothing", smoothing=1.0), r"smoothing.*\[0, 1\).*1.0"),
    (lambda: registry.supports_chunked("hinge"), "'hinge'"),
    (lambda: losses.get_loss("itf")(jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32), None),
     "weights.*got None"),
    (lambda: chunked_loss.get_loss_from_hidden("unlikelihood"), "'unlikelihood' has no chunked path"),
    (lambda: chunked_loss.get_loss_from_hidden("focal", gamma=-1.0), "gamma"),
])
def test_registry_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_every_loss_has_params_and_chunk_flag():
  assert set(registry.LOSS_PARAMS) == set(registry.LOSS_NAMES)
  assert {n for n in registry.LOSS_NAMES if registry.supports_chunked(n)} == {
      "ce", "pdl", "itf", "tlat_exp", "tlat_chi2", "face", "focal", "label_smoothing",
      "dft"}
  for name in registry.LOSS_NAMES:
    assert callable(losses.get_loss(name))


@pytest.mark.parametrize("name, params", [("itf", {}), ("tlat_chi2", {"reduction": "weights"})])
def test_chunked_equals_unchunked(name, params):
  rng = np.random.default_rng(7)
  n, d, v = 24, 8, 50
  hidden = jnp.asarray(rng.normal(0, 1, (n, d)), jnp.float32)
  unembed = jnp.asarray(rng.normal(0, 1, (d, v)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, v, n), jnp.int32).at[3].set(-1)
  mask = jnp.asarray(rng.random(n) > 0.3, jnp.float32)
  counts = rng.zipf(1.4, v)
  w = jnp.asarray(weights_for(name, counts))

  def naive(h, u):
    return losses.get_loss(name, **params)(h @ u, labels, w, mask=mask)

  def chunked(h, u):
    return chunked_loss.get_loss_from_hidden(name, **params)(h, u, labels, w, mask_N=mask,
                                                  chunk_size=16)

  (want, want_aux), want_g = jax.value_and_grad(naive, (0, 1), has_aux=True)(hidden, unembed)
  (got, got_aux), got_g = jax.value_and_grad(chunked, (0, 1), has_aux=True)(hidden, unembed)
  assert float(got) == pytest.approx(float(want), rel=1e-5)
  for field in pdl.LossAux._fields:
    assert float(getattr(got_aux, field)) == pytest.approx(float(getattr(want_aux, field)),
                                                           rel=1e-5)
  for a, b in zip(got_g, want_g):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-6 * float(jnp.abs(b).max()))
